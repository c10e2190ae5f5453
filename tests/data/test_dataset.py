"""Tokenised cache, global batches, step microbatches and the reference store."""

from __future__ import annotations

import json

import pytest
import torch

from solopo_megatron.data.dataset import TokenizedDataset, data_fingerprint
from solopo_megatron.data.errors import DataError
from solopo_megatron.data.loading import GlobalBatchSampler, step_microbatches
from solopo_megatron.data.packing import pad_multiple_for
from solopo_megatron.data.reference_store import ReferenceStore, load_reference_store
from solopo_megatron.data.synthetic import generate_synthetic_records, write_jsonl
from solopo_megatron.data.tokenize import LengthLimits, SequenceEncoder, load_tokenizer
from solopo_megatron.objectives import SoLoPOConfig, required_roles

ROLES = required_roles(SoLoPOConfig())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(generate_synthetic_records(24, seed=1, long_target_words=120), path)
    return path


def test_cache_round_trip_and_reuse(tmp_path, tokenizer, data_file):
    encoder = SequenceEncoder(tokenizer)
    dataset, report = TokenizedDataset.build(
        data_file, encoder, ROLES, cache_dir=tmp_path / "cache", progress=False
    )
    assert len(dataset) == 24 and report.num_records == 24 and report.ok
    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    from solopo_megatron.data.records import check_record

    expected = encoder.encode_group(check_record(records[5], "f", 6)[0], ROLES)
    group = dataset.group(5)
    assert group.example_id == records[5]["id"] and dict(group.sequences) == expected

    # A second build finds the cache: nothing is re-tokenised.
    class Exploding(SequenceEncoder):
        def encode_group(self, *args, **kwargs):
            raise AssertionError("re-tokenised")

    again, _ = TokenizedDataset.build(
        data_file, Exploding(tokenizer), ROLES, cache_dir=tmp_path / "cache", progress=False
    )
    assert again.directory == dataset.directory
    # Changing the data, the limits or the roles changes the key.
    assert (
        data_fingerprint(
            data_file, SequenceEncoder(tokenizer, limits=LengthLimits(max_long_length=10**6)), ROLES
        )
        != dataset.fingerprint
    )
    assert data_fingerprint(data_file, encoder, ROLES[:2]) != dataset.fingerprint


def test_skip_policy_counts_over_long_records(tmp_path, tokenizer, data_file):
    encoder = SequenceEncoder(tokenizer, limits=LengthLimits(max_long_length=230))
    with pytest.raises(DataError, match=r"train.jsonl:\d+: field 'long_context'"):
        TokenizedDataset.build(data_file, encoder, ROLES, cache_dir=tmp_path / "c1", progress=False)
    dataset, report = TokenizedDataset.build(
        data_file, encoder, ROLES, cache_dir=tmp_path / "c2", on_error="skip", progress=False
    )
    assert 0 < report.num_skipped < 24 and len(dataset) == 24 - report.num_skipped
    assert all(p.field == "long_context" for p in report.problems)


def test_sampler_is_a_seeded_permutation_per_epoch():
    sampler = GlobalBatchSampler(num_examples=10, global_batch_size=4, seed=3)
    assert sampler.steps_per_epoch == 2 and sampler.dropped_per_epoch == 2
    epoch0 = sampler.batch(0) + sampler.batch(1)
    assert len(set(epoch0)) == 8 and sampler.batch(0) == GlobalBatchSampler(10, 4, 3).batch(0)
    assert sampler.batch(2) != sampler.batch(0)  # a new epoch reshuffles
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GlobalBatchSampler(3, 4)


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_step_microbatches_cover_the_batch_once(tmp_path, tokenizer, data_file, dp):
    dataset, _ = TokenizedDataset.build(
        data_file, SequenceEncoder(tokenizer), ROLES, cache_dir=tmp_path / "c", progress=False
    )
    store = ReferenceStore(ROLES)
    for i, example_id in enumerate(dataset.example_ids):
        store.add(example_id, {role: -float(i + r) for r, role in enumerate(ROLES)})
    batch = GlobalBatchSampler(len(dataset), 12, seed=0).batch(0)
    multiple = pad_multiple_for(cp_size=2)
    per_rank = [
        step_microbatches(
            dataset,
            batch,
            ROLES,
            max_tokens=2048,
            pad_multiple=multiple,
            pad_id=0,
            dp_size=dp,
            dp_rank=r,
            ref_store=store,
        )
        for r in range(dp)
    ]
    assert len({len(mbs) for mbs in per_rank}) == 1
    seen = [eid for mbs in per_rank for mb in mbs for eid, ok in zip(mb.example_ids, mb.valid.tolist()) if ok]
    assert sorted(seen) == sorted(dataset.example_ids[i] for i in batch)
    for mbs in per_rank:
        for mb in mbs:
            assert mb.tokens.numel() == 2048
            for g, eid in enumerate(mb.example_ids):
                if mb.valid[g]:
                    i = dataset.example_ids.index(eid)
                    assert mb.ref_logps[g].tolist() == [-float(i + r) for r in range(len(ROLES))]


def test_reference_store_round_trip_is_exact(tmp_path):
    store = ReferenceStore(ROLES, data_fingerprint="abc", info={"model": "tiny"})
    values = torch.randn(50, len(ROLES)) * 100
    for i in range(50):
        store.add(f"id-{i}", dict(zip(ROLES, values[i].tolist())))
    store.save(tmp_path / "ref.jsonl")
    loaded = load_reference_store(tmp_path / "ref.jsonl", data_fingerprint="abc")
    got = torch.tensor([[loaded.lookup(f"id-{i}", ROLES)[r] for r in ROLES] for i in range(50)])
    assert torch.equal(got, values)  # fp32 bit for bit
    assert loaded.info == {"model": "tiny"} and not list(tmp_path.glob("*.tmp-*"))


def test_reference_store_errors(tmp_path):
    store = ReferenceStore(ROLES, data_fingerprint="abc")
    store.add("a", {"short_chosen": -1.0})
    store.save(tmp_path / "ref.jsonl")
    loaded = load_reference_store(tmp_path / "ref.jsonl")
    with pytest.raises(DataError, match=r"ref.jsonl: no reference log-probs for example id 'b'"):
        loaded.lookup("b", ROLES)
    with pytest.raises(
        DataError, match="example id 'a' has no reference log-prob for short_rejected, long_chosen"
    ):
        loaded.lookup("a", ROLES)
    with pytest.raises(
        DataError, match=r"ref.jsonl:1: field 'data_fingerprint': the store was built for other data"
    ):
        load_reference_store(tmp_path / "ref.jsonl", data_fingerprint="xyz")
    (tmp_path / "bad.jsonl").write_text('{"format": "other"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: not a reference log-prob store"):
        load_reference_store(tmp_path / "bad.jsonl")
    lines = (tmp_path / "ref.jsonl").read_text().splitlines()
    (tmp_path / "broken.jsonl").write_text(lines[0] + '\n{"id": "a", "short_chosen": "x"}\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: field 'short_chosen'"):
        load_reference_store(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="not finite"):
        store.add("c", {"short_chosen": float("nan")})


def test_skipped_records_are_exposed_fresh_and_from_the_cache(tmp_path, tokenizer, data_file):
    lines = data_file.read_text().splitlines()
    bad = {
        2: lines[1].replace('"question": "', '"question": "\\ud800', 1),  # used to be a tokenizer TypeError
        4: lines[3][:-1] + ', "chosen": "duplicate"}',
    }
    for n in range(10, 22):  # 12 records with chosen == rejected: more problems than the 10 kept
        record = json.loads(lines[n - 1])
        record["rejected"] = record["chosen"]
        bad[n] = json.dumps(record)
    data_file.write_text("\n".join(bad.get(n, line) for n, line in enumerate(lines, start=1)) + "\n")
    encoder = SequenceEncoder(tokenizer)
    build = dict(cache_dir=tmp_path / "cache", on_error="skip", progress=False)
    dataset, report = TokenizedDataset.build(data_file, encoder, ROLES, **build)
    assert dataset.skipped == report.num_skipped == 14 and len(dataset) == 10
    assert dataset.skipped_problems[:2] == [
        f"{data_file}:2: field 'question': invalid unicode",
        f"{data_file}:4: field 'chosen': duplicate key",
    ]
    assert len(dataset.skipped_problems) == 10
    assert dataset.skipped_problems[2] == f"{data_file}:10: field 'rejected': identical to chosen"

    class Exploding(SequenceEncoder):
        def encode_group(self, *args, **kwargs):
            raise AssertionError("re-tokenised")

    again, _ = TokenizedDataset.build(data_file, Exploding(tokenizer), ROLES, **build)
    assert again.directory == dataset.directory
    assert (again.skipped, again.skipped_problems) == (dataset.skipped, dataset.skipped_problems)


def test_clean_data_has_nothing_skipped(tmp_path, tokenizer, data_file):
    dataset, _ = TokenizedDataset.build(
        data_file, SequenceEncoder(tokenizer), ROLES, cache_dir=tmp_path / "cache", progress=False
    )
    assert dataset.skipped == 0 and dataset.skipped_problems == []


def test_directory_as_data_file_is_named_a_directory(tmp_path, tokenizer):
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(DataError, match=r"train.jsonl: is a directory, not a data file"):
        TokenizedDataset.build(
            tmp_path / "train.jsonl",
            SequenceEncoder(tokenizer),
            ROLES,
            cache_dir=tmp_path / "c",
            progress=False,
        )
