"""Random packed microbatches (THD rows of whole preference groups) for the log-prob tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from solopo_megatron.data.cp_sharding import zigzag_indices
from solopo_megatron.logprobs import sequence_logprobs, token_logprobs
from solopo_megatron.objectives import SoLoPOConfig, required_roles, solopo_loss

IGNORE_INDEX = -100


@dataclass
class PackedProblem:
    logits: Tensor  # [T, V] full vocab
    labels: Tensor  # [T], pre-shifted inside each sequence; IGNORE_INDEX at each sequence's end
    loss_mask: Tensor  # [T] bool, response tokens
    segment_ids: Tensor  # [T], -1 on the trailing padding
    cu_seqlens: list[int]
    roles: tuple[str, ...]
    batch: int
    num_tokens: dict[str, Tensor]  # role -> [B], response tokens of the full sequence
    ref_logps: dict[str, Tensor]

    @property
    def num_segments(self) -> int:
        return self.batch * len(self.roles)


def make_packed_problem(
    cfg: SoLoPOConfig, *, seed: int, batch: int = 3, vocab: int = 48, multiple: int = 8, dtype=torch.float64
) -> PackedProblem:
    """``batch`` groups of ``required_roles(cfg)`` sequences, lengths multiples of ``multiple``, then padding."""
    g = torch.Generator().manual_seed(seed)
    roles = required_roles(cfg)
    labels, mask, segments, cu = [], [], [], [0]
    for seq in range(batch * len(roles)):
        length = multiple * int(torch.randint(1, 6, (), generator=g))
        prompt = int(torch.randint(1, length, (), generator=g))
        seq_labels = torch.randint(0, vocab, (length,), generator=g)
        seq_labels[-1] = IGNORE_INDEX  # the last token has no successor
        seq_mask = torch.zeros(length, dtype=torch.bool)
        seq_mask[prompt - 1 : length - 1] = True  # positions whose label is a response token
        labels.append(seq_labels)
        mask.append(seq_mask)
        segments.append(torch.full((length,), seq))
        cu.append(cu[-1] + length)
    # Trailing padding: its own padded "sequence" slot in cu_seqlens, segment -1, nothing scored.
    labels.append(torch.full((multiple,), IGNORE_INDEX))
    mask.append(torch.zeros(multiple, dtype=torch.bool))
    segments.append(torch.full((multiple,), -1))
    cu.append(cu[-1] + multiple)

    loss_mask = torch.cat(mask)
    segment_ids = torch.cat(segments)
    counts = torch.zeros(batch * len(roles), dtype=torch.int64).index_add(
        0, segment_ids.clamp(min=0), loss_mask.long() * (segment_ids >= 0)
    )
    by_role = counts.view(batch, len(roles))
    return PackedProblem(
        logits=(torch.randn(cu[-1], vocab, generator=g, dtype=torch.float64) * 3).to(dtype),
        labels=torch.cat(labels),
        loss_mask=loss_mask,
        segment_ids=segment_ids,
        cu_seqlens=cu,
        roles=roles,
        batch=batch,
        num_tokens={role: by_role[:, i] for i, role in enumerate(roles)},
        ref_logps={role: -10 * torch.rand(batch, generator=g, dtype=torch.float64) for role in roles},
    )


@dataclass
class Outcome:
    token_logps: Tensor
    sequence_sums: Tensor
    loss: Tensor
    grad_logits: Tensor


def run_sharded(
    problem: PackedProblem,
    cfg: SoLoPOConfig,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    cp_size: int = 1,
    cp_rank: int = 0,
    cp_group: dist.ProcessGroup | None = None,
) -> Outcome:
    """This rank's view: its zigzag tokens and vocab shard -> mean SoLoPO loss and its logits' gradient."""
    vocab = problem.logits.shape[1]
    local_vocab = vocab // tp_size
    start = tp_rank * local_vocab
    tokens = zigzag_indices(problem.cu_seqlens, cp_size, cp_rank)
    logits = problem.logits[tokens, start : start + local_vocab].clone().requires_grad_()
    token_logps = token_logprobs(
        logits, problem.labels[tokens], vocab_start_index=start, tp_group=tp_group, ignore_index=IGNORE_INDEX
    )
    sums = sequence_logprobs(
        token_logps,
        problem.loss_mask[tokens],
        problem.segment_ids[tokens],
        problem.num_segments,
        cp_group=cp_group,
    )
    by_role = sums.view(problem.batch, len(problem.roles))
    logps = {role: by_role[:, i] for i, role in enumerate(problem.roles)}
    loss, _ = solopo_loss(logps, problem.num_tokens, cfg, problem.ref_logps)
    loss = loss.mean()
    loss.backward()
    return Outcome(token_logps.detach(), sums.detach(), loss.detach(), logits.grad)
