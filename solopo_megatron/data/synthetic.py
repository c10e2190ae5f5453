"""Synthetic multi-document QA in SoLoPO's record format, for tiny CPU recipes, tests and demos.

Each record hides one fact ("The code of the blue falcon is 4821.") in a short evidence document;
the long context buries that document among generated filler documents (built with
:func:`build_long_context`, counting words as tokens). The fact's attribute words ("code",
"serial", ...) never occur in filler text, so the question is answerable only from the evidence.

With ``facts_per_context`` K > 1 the short context also states K - 1 *confounders*: the same
attribute of other subjects, each in its own document, in random order. The ``in_context``
rejected answer gives the asked subject a confounder's value, so chosen and rejected both quote a
number of the context and only a model that reads which subject a value belongs to prefers the
chosen one; ``metadata.candidates`` lists the K answers (the chosen one first) for likelihood-based
answer accuracy.
Everything comes from an embedded vocabulary, so a small tokenizer trained on
:func:`synthetic_tokenizer_corpus` covers all text, and every output is a pure function of the seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from os import PathLike
from typing import IO, Any

from solopo_megatron.data.files import atomic_write
from solopo_megatron.data.long_context import build_long_context

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_REJECTED_KINDS",
    "REJECTED_KINDS",
    "SYSTEM_PROMPT",
    "UNANSWERABLE",
    "VOCABULARY",
    "count_words",
    "generate_distractor_documents",
    "generate_synthetic_records",
    "synthetic_tokenizer_corpus",
    "write_jsonl",
]

# --------------------------------------------------------------------------- vocabulary

NOUNS = tuple(
    """
    falcon fox wolf bear otter rabbit horse tiger lion eagle owl crow heron swan goose duck whale
    shark dolphin turtle frog snake lizard beetle spider moth bee ant goat sheep cow pig dog cat
    mouse deer camel zebra monkey parrot robot wizard farmer sailor baker painter doctor teacher
    pilot miner hunter singer dancer knight king queen child student driver lamp chair table boat
    ship cart wagon bell drum flute book letter map coin ring crown sword shield hammer rope basket
    bottle cup plate spoon kettle clock mirror window door wheel engine candle blanket pillow apple
    pear plum melon carrot onion potato bean cake bread cookie stone rock shell leaf flower tree
    cloud storm star planet rocket train truck tower bridge tent
    """.split()
)

PLACES = tuple(
    """
    garden river forest city village harbor market valley mountain desert island meadow lake beach
    cave castle school library kitchen station museum farm field bakery workshop hill canyon
    """.split()
)

ADJECTIVES = tuple(
    """
    red blue green yellow orange purple black white gray brown pink golden silver small large tiny
    huge tall short long old young new ancient quiet loud calm brave shy clever lazy busy happy
    sleepy hungry gentle wild proud quick slow bright dark shiny dusty wooden rusty soft hard warm
    cold heavy light clean muddy noisy friendly strange curious lucky
    """.split()
)

# Present tense, third person: the form the templates use, so the vocabulary lists surface forms.
VERBS = tuple(
    """
    sees finds follows watches carries helps visits paints builds moves cleans opens closes pushes
    pulls lifts drops holds chases greets feeds guards hides reads writes draws fixes counts
    catches throws kicks hugs likes loves needs wants brings sells buys keeps shares touches
    """.split()
)

# The attribute of each hidden fact. These words are never used in filler text.
ATTRIBUTES = tuple("code serial password pin ticket badge locker voucher".split())

FUNCTION_WORDS = tuple(
    """
    the a an of is are was in on at near by under behind beside with and every there day each
    what text does not say lives sits waits sleeps plays walks often always sometimes morning
    evening night seen many some
    """.split()
)

DIGITS = tuple("0123456789")

UNANSWERABLE = "The text does not say."
SYSTEM_PROMPT = "Answer the question using only the text."
# wrong: a value absent from the context; unanswerable: UNANSWERABLE; in_context: a confounder's
# value (needs facts_per_context >= 2).
REJECTED_KINDS = ("wrong", "unanswerable", "in_context")
DEFAULT_REJECTED_KINDS = ("wrong", "unanswerable")


_IRREGULAR_PLURALS = {
    "wolf": "wolves", "mouse": "mice", "sheep": "sheep", "deer": "deer", "goose": "geese",
    "child": "children", "leaf": "leaves", "potato": "potatoes", "shelf": "shelves",
}  # fmt: skip


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


def _build_vocabulary() -> tuple[str, ...]:
    words = [*FUNCTION_WORDS, *NOUNS, *map(_plural, NOUNS), *PLACES, *ADJECTIVES, *VERBS]
    words += [*ATTRIBUTES, *"answer question using only".split(), *DIGITS]
    return tuple(dict.fromkeys(words))  # ordered, unique


# Every lowercase word (or digit) that generated text can contain.
VOCABULARY = _build_vocabulary()


def count_words(text: str) -> int:
    """Token count for synthetic data: whitespace-separated words."""
    return len(text.split())


# --------------------------------------------------------------------------- sentences


def _thing(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def _filler_sentence(rng: random.Random) -> str:
    """One simple sentence; never uses an attribute word, so never states a hidden fact."""
    template = rng.randrange(7)
    noun, place, verb = rng.choice(NOUNS), rng.choice(PLACES), rng.choice(VERBS)
    if template == 0:
        return f"The {_thing(rng)} {verb} the {_thing(rng)}."
    if template == 1:
        return f"A {_thing(rng)} {verb} a {noun} near the {place}."
    if template == 2:
        many = f"{rng.randint(2, 99)} {rng.choice(ADJECTIVES)} {_plural(noun)}"
        return f"There are {many} in the {place}."
    if template == 3:
        return f"The {noun} in the {place} is {rng.choice(ADJECTIVES)}."
    if template == 4:
        return f"Every {noun} {verb} the {rng.choice(NOUNS)} in the {place}."
    if template == 5:
        return f"The {_thing(rng)} was seen near the {place} on day {rng.randint(1, 30)}."
    when = rng.choice(("often", "always", "sometimes"))
    return f"The {_thing(rng)} {when} {rng.choice(_REST_VERBS)} by the {place}."


_REST_VERBS = ("sits", "waits", "sleeps", "plays")


def _subject_sentence(subject: str, rng: random.Random) -> str:
    """A filler sentence about the fact's subject, to pad the evidence document."""
    template = rng.randrange(3)
    if template == 0:
        return f"The {subject} lives near the {rng.choice(PLACES)}."
    if template == 1:
        return f"The {subject} {rng.choice(VERBS)} the {_thing(rng)}."
    where = f"{rng.choice(ADJECTIVES)} {rng.choice(PLACES)}"
    when = rng.choice(("morning", "evening", "night"))
    return f"In the {where} the {subject} {rng.choice(_REST_VERBS)} every {when}."


def _document(rng: random.Random, sentences_per_document: tuple[int, int]) -> str:
    low, high = sentences_per_document
    return " ".join(_filler_sentence(rng) for _ in range(rng.randint(low, high)))


def generate_distractor_documents(
    num_documents: int, *, seed: int, sentences_per_document: tuple[int, int] = (3, 8)
) -> list[str]:
    """``num_documents`` filler documents of simple sentences (no hidden-fact attribute words)."""
    _check_int("num_documents", num_documents, minimum=0)
    _check_int("seed", seed)
    if (
        not isinstance(sentences_per_document, Sequence)
        or len(sentences_per_document) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in sentences_per_document)
        or not 1 <= sentences_per_document[0] <= sentences_per_document[1]
    ):
        raise ValueError(
            "sentences_per_document must be (low, high) with 1 <= low <= high, "
            f"got {sentences_per_document!r}"
        )
    rng = random.Random(_stable_seed("distractors", seed))
    bounds = (sentences_per_document[0], sentences_per_document[1])
    return [_document(rng, bounds) for _ in range(num_documents)]


# --------------------------------------------------------------------------- records

# A fixed pool size keeps record i independent of how many records are generated.
_DISTRACTOR_POOL = 256


def generate_synthetic_records(
    num_records: int,
    *,
    seed: int,
    long_target_words: int = 300,
    rejected_kinds: Sequence[str] = DEFAULT_REJECTED_KINDS,
    id_prefix: str = "syn",
    facts_per_context: int = 1,
) -> list[dict[str, Any]]:
    """``num_records`` SoLoPO records, each asking for one fact hidden in its evidence document.

    Record i depends only on (seed, i): asking for more records extends the list, it does not
    change the first ones. The rejected answer is a wrong value, :data:`UNANSWERABLE` or (with
    ``facts_per_context`` >= 2) a confounder's value from the same context, chosen per record among
    ``rejected_kinds``. With ``facts_per_context`` >= 2, ``metadata.candidates`` holds every
    answer the context supports (chosen first).
    """
    _check_int("num_records", num_records, minimum=0)
    _check_int("seed", seed)
    _check_int("long_target_words", long_target_words, minimum=0)
    _check_int("facts_per_context", facts_per_context, minimum=1)
    if facts_per_context > len(NOUNS):
        raise ValueError(f"facts_per_context must be <= {len(NOUNS)}, got {facts_per_context}")
    kinds_ok = not isinstance(rejected_kinds, str) and all(k in REJECTED_KINDS for k in rejected_kinds)
    if not kinds_ok or not rejected_kinds:
        raise ValueError(
            f"rejected_kinds must be a non-empty subset of {REJECTED_KINDS}, got {rejected_kinds!r}"
        )
    if "in_context" in rejected_kinds and facts_per_context < 2:
        raise ValueError("rejected kind 'in_context' needs facts_per_context >= 2 (a confounder's value)")
    if not isinstance(id_prefix, str) or not id_prefix:
        raise ValueError(f"id_prefix must be a non-empty string, got {id_prefix!r}")
    distractors = generate_distractor_documents(_DISTRACTOR_POOL, seed=seed)
    return [
        _record(i, seed, distractors, long_target_words, tuple(rejected_kinds), id_prefix, facts_per_context)
        for i in range(num_records)
    ]


def _record(
    index: int,
    seed: int,
    distractors: list[str],
    long_target_words: int,
    rejected_kinds: tuple[str, ...],
    id_prefix: str,
    facts_per_context: int = 1,
) -> dict[str, Any]:
    rng = random.Random(_stable_seed("record", seed, index))
    attribute, subject = rng.choice(ATTRIBUTES), _thing(rng)
    gold = str(rng.randint(1000, 9999))
    fact = f"The {attribute} of the {subject} is {gold}."
    short_context = _evidence_document(fact, subject, rng)
    confounders: list[tuple[str, str]] = []  # (subject, value) of the other facts
    if facts_per_context > 1:
        confounders = _confounders(subject, gold, facts_per_context - 1, rng)
        documents = [f"The {attribute} of the {other} is {value}." for other, value in confounders]
        documents.insert(rng.randint(0, len(documents)), short_context)
        short_context = "\n\n".join(documents)
    long_context, info = build_long_context(
        short_context, distractors, target_tokens=long_target_words, count_tokens=count_words,
        depth=rng.random(), rng=rng,
    )  # fmt: skip
    kind = rng.choice(rejected_kinds)
    if kind == "wrong":
        rejected = f"The {attribute} of the {subject} is {_wrong_value(gold, rng)}."
    elif kind == "in_context":
        rejected = f"The {attribute} of the {subject} is {rng.choice(confounders)[1]}."
    else:
        rejected = UNANSWERABLE
    metadata: dict[str, Any] = {
        "gold_answer": gold,
        "rejected_kind": kind,
        "evidence_depth": info["depth"],
        "long_tokens": info["long_tokens"],
        "num_distractors": info["num_distractors"],
    }
    if confounders:
        answers = [gold] + [value for _, value in confounders]
        metadata["candidates"] = [f"The {attribute} of the {subject} is {value}." for value in answers]
    return {
        "id": f"{id_prefix}-{index:06d}",
        "question": f"What is the {attribute} of the {subject}?",
        "short_context": short_context,
        "long_context": long_context,
        "chosen": fact,
        "rejected": rejected,
        "system": SYSTEM_PROMPT,
        "metadata": metadata,
    }


def _confounders(subject: str, gold: str, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` (subject, value) pairs: subjects with nouns other than the asked subject's (and each
    other's), values distinct from the gold one and each other."""
    nouns = [noun for noun in NOUNS if noun != subject.split()[-1]]
    values: set[str] = {gold}
    pairs = []
    for noun in rng.sample(nouns, count):
        value = gold
        while value in values:
            value = str(rng.randint(1000, 9999))
        values.add(value)
        pairs.append((f"{rng.choice(ADJECTIVES)} {noun}", value))
    return pairs


def _evidence_document(fact: str, subject: str, rng: random.Random) -> str:
    """1-3 sentences: the fact, at a random position among sentences about the same subject."""
    sentences = [_subject_sentence(subject, rng) for _ in range(rng.randint(0, 2))]
    sentences.insert(rng.randint(0, len(sentences)), fact)
    return " ".join(sentences)


def _wrong_value(gold: str, rng: random.Random) -> str:
    value = gold
    while value == gold:
        value = str(rng.randint(1000, 9999))
    return value


# --------------------------------------------------------------------------- output helpers


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | PathLike) -> int:
    """Write records as UTF-8 JSON lines (non-ASCII kept as is); returns the number written.

    Atomic: the lines go to a temporary file beside ``path``, renamed over it only once all are
    written, so an error leaves ``path`` as it was (DataError for a missing folder or a folder path).
    """
    with atomic_write(path) as f:
        return write_json_lines(records, f)


def write_json_lines(records: Iterable[Mapping[str, Any]], handle: IO[str]) -> int:
    """Writes records to an open text file, one JSON object a line (non-ASCII kept); returns the count."""
    count = 0
    for record in records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def synthetic_tokenizer_corpus(seed: int = 0, *, num_records: int = 200) -> Iterator[str]:
    """Text for training a small tokenizer: the whole vocabulary (lowercase and capitalised, so
    sentence-initial forms are seen), then every text field of generated records."""
    _check_int("seed", seed)
    words = list(VOCABULARY)
    for start in range(0, len(words), 32):
        chunk = words[start : start + 32]
        yield " ".join(chunk)
        yield " ".join(w.capitalize() for w in chunk)
    yield "0 1 2 3 4 5 6 7 8 9 . , ? !"
    for record in generate_synthetic_records(num_records, seed=seed, long_target_words=60):
        for field in ("system", "question", "short_context", "long_context", "chosen", "rejected"):
            yield record[field]


# --------------------------------------------------------------------------- helpers


def _stable_seed(*parts: object) -> int:
    """A seed from the parts via hashlib (Python's hash() of a str changes between runs)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
