"""The bundled tiny tokenizer: byte-level BPE trained on the synthetic data, with a chat template.

It is built by the project itself (no download) and shipped in the package for the tiny recipe and
the tests. Byte-level BPE encodes any text, so it also tokenises user files, just not compactly.
Rebuild with ``python -m solopo_megatron.data.tiny_tokenizer --overwrite`` (deterministic).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-tokenizer"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer(out_dir: str | Path, corpus: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Trains the tokenizer on ``corpus`` and saves it (Hugging Face format) to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _vocab_size(text: str) -> int:
    """argparse type: at least the 256 byte tokens plus the special tokens."""
    minimum = 256 + len(SPECIAL_TOKENS)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum} (bytes + special tokens), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``solopo-data tiny-tokenizer``: trains and writes the tiny tokenizer.

    The folder is built beside ``--out`` and renamed into place when complete; an existing ``--out``
    is replaced only with ``--overwrite`` (and only if it is a tokenizer folder or empty).
    """
    from .errors import DataError
    from .files import atomic_directory
    from .synthetic import synthetic_tokenizer_corpus

    parser = argparse.ArgumentParser(description="Rebuild the bundled tiny tokenizer.")
    parser.add_argument("--out", type=Path, default=TINY_TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=_vocab_size, default=VOCAB_SIZE)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer folder")
    args = parser.parse_args(argv)
    try:
        with atomic_directory(
            args.out,
            overwrite=args.overwrite,
            markers=("tokenizer_config.json", "tokenizer.json"),
            label=f"--out {args.out}",
        ) as tmp:
            tokenizer = build_tiny_tokenizer(tmp, synthetic_tokenizer_corpus(seed=0), args.vocab_size)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(tokenizer)} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
