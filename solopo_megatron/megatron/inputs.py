"""This rank's training inputs: the tokenised datasets (rank 0 tokenises, the others then read its
cache) and, per step, the microbatches planned for its DP rank and sharded for its CP rank."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from ..data.dataset import TokenizedDataset, check_group_budget
from ..data.errors import DataError
from ..data.loading import step_microbatches
from ..data.packing import Microbatch, pad_multiple_for, shard_microbatch
from ..data.records import ROLES
from ..data.reference_store import ReferenceStore
from ..data.tokenize import pad_token_id
from ..objectives import required_roles
from ..recipe.schema import RecipeConfig
from ..recipe.sources import cache_dir, data_paths, model_vocab_size, sequence_encoder, write_synthetic_files
from .model import resolve_attention_backend, resolve_share_prompt, resolve_transformer_impl
from .parallel import ParallelState

T = TypeVar("T")


@dataclass
class Data:
    """The run's datasets and the packing settings every step uses."""

    train: TokenizedDataset
    valid: TokenizedDataset | None
    roles: tuple[str, ...]  # the roles training forwards (validation forwards all of ROLES)
    pad_id: int
    vocab_size: int  # embedding rows before Megatron's padding
    pad_multiple: int
    max_tokens: int
    share_prompt: bool = False  # the answers of one context share a slot (dataset.share_prompt resolved)

    def skipped_records(self) -> dict[str, int]:
        """Records ``dataset.on_error=skip`` left out, per split (for the metrics file)."""
        counts = {"train": self.train.skipped}
        if self.valid is not None:
            counts["valid"] = self.valid.skipped
        return counts

    def skip_report(self) -> list[str]:
        """Start-up lines about skipped records: a count per file and its first problems; [] if none."""
        lines = []
        for split, dataset in (("train", self.train), ("valid", self.valid)):
            if dataset is None or not dataset.skipped:
                continue
            lines.append(f"dataset.on_error=skip: skipped {dataset.skipped} {split} record(s); the first:")
            lines.extend(f"  {problem}" for problem in dataset.skipped_problems)
        return lines


def rank_zero_first(rank: int, build: Callable[[], T]) -> T:
    """``build()`` on rank 0, then (after a barrier) on every other rank: rank 0 fills a cache (the
    tokenised data) that the others then read instead of building it again. Collective."""
    result = None
    for rank_turn in (True, False):
        if (rank == 0) == rank_turn:
            result = build()
        dist.barrier()
    return result


def prepare_data(cfg: RecipeConfig, parallel: ParallelState, *, training: bool = True) -> Data:
    """Writes the synthetic files if the recipe uses them, then tokenises (rank 0 first) and opens the data.

    ``training``: the run will take steps, so the training data must fill one global batch (the
    reference pass and ``--eval-only`` score whatever there is)."""
    ds = cfg.dataset
    if ds.train_path is None and parallel.rank == 0:
        write_synthetic_files(cfg)
    dist.barrier()
    train_path, valid_path = data_paths(cfg)
    encoder = sequence_encoder(ds)
    tokenizer = encoder.tokenizer
    roles = required_roles(cfg.solopo.loss_config())

    def build(path: str, needed_roles) -> TokenizedDataset:
        return TokenizedDataset.build(
            path,
            encoder,
            needed_roles,
            cache_dir=cache_dir(cfg),
            on_error=ds.on_error,
            progress=parallel.rank == 0,
        )[0]

    def build_both() -> tuple[TokenizedDataset, TokenizedDataset | None]:
        # Validation forwards every role, so long-context accuracy is measured even in chosen-only mode.
        return build(train_path, roles), build(valid_path, ROLES) if valid_path else None

    train, valid = rank_zero_first(parallel.rank, build_both)
    pad_id = pad_token_id(tokenizer)
    m = cfg.model
    multiple = pad_multiple_for(m.context_parallel_size, m.tensor_model_parallel_size, m.sequence_parallel)
    share = resolve_share_prompt(ds.share_prompt, resolve_attention_backend(m, resolve_transformer_impl(m)))
    # Every rank checks (the same answer everywhere, so all stop together, before any step).
    for dataset, path in ((train, train_path), (valid, valid_path)):
        if dataset is not None:
            check_group_budget(
                dataset, path, max_tokens=ds.max_tokens, pad_multiple=multiple, share_prompt=share
            )
    if training:
        check_fills_a_batch(cfg, train, train_path)
    return Data(
        train,
        valid,
        roles,
        pad_id,
        model_vocab_size(cfg, len(tokenizer)),
        multiple,
        ds.max_tokens,
        share,
    )


def check_fills_a_batch(cfg: RecipeConfig, train: TokenizedDataset, train_path: str) -> None:
    """A DataError naming the data file and ``train.global_batch_size`` if the training data holds
    fewer usable examples than one step takes."""
    size, count = cfg.train.global_batch_size, len(train)
    if count >= size:
        return
    skipped = f" ({train.skipped} more skipped under dataset.on_error=skip)" if train.skipped else ""
    if cfg.dataset.train_path is None:
        num_train = cfg.dataset.synthetic.num_train
        raise DataError(
            f"dataset.synthetic.num_train={num_train}: the synthetic data {train_path} holds {count} usable "
            f"example(s){skipped}, fewer than train.global_batch_size={size} (one step's examples); raise "
            "dataset.synthetic.num_train or lower train.global_batch_size"
        )
    raise DataError(
        f"dataset.train_path {train_path}: {count} usable example(s){skipped}, fewer than "
        f"train.global_batch_size={size} (one step's examples); add records or lower train.global_batch_size"
    )


def step_batches(
    data: Data,
    dataset: TokenizedDataset,
    indices: Sequence[int],
    roles: Sequence[str],
    parallel: ParallelState,
    store: ReferenceStore | None,
) -> list[Microbatch]:
    """This rank's microbatches for one global batch: planned for its DP rank, sharded for its CP rank.

    A row ends with its last sequence (never padded to ``dataset.max_tokens``), so no compute goes to
    padding; under pipeline parallelism the stages exchange each row's shape (``variable_seq_lengths``).
    """
    mbs = step_microbatches(
        dataset,
        indices,
        roles,
        max_tokens=data.max_tokens,
        pad_multiple=data.pad_multiple,
        pad_id=data.pad_id,
        dp_size=parallel.dp,
        dp_rank=parallel.dp_rank,
        ref_store=store,
        pad_to_max_tokens=False,
        share_prompt=data.share_prompt,
    )
    return [shard_microbatch(mb, parallel.cp, parallel.cp_rank).to(parallel.device) for mb in mbs]
