"""Megatron glue for rows whose prompts are shared (``dataset.share_prompt``): the packed-sequence
parameters that carry the branch structure, and the rotary embedding that reads tree positions.

A shared slot holds one prompt and several answers (branches) after it; every branch continues the
prompt's positions (see ``data.packing``). Megatron's THD RoPE restarts positions at every slot, so
branch tokens would get the positions of their row offsets instead. ``TreeRotaryEmbedding`` gives
megatron-core one frequency row per token of the packed row instead (its THD RoPE then takes each
token's own row, under CP too: ``_apply_rotary_pos_emb_thd`` with ``freqs.size(0) == cu_seqlens[-1]``,
in megatron-core 0.16 and 0.19 alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

__all__ = ["SharedPromptSeqParams", "TreeRotaryEmbedding", "use_tree_positions"]


@dataclass
class SharedPromptSeqParams(PackedSeqParams):
    """PackedSeqParams of a row with shared prompts; both tensors cover the whole row (before CP
    sharding), on the model's device.

    ``branch_ids``: 0 for a token every later token of its slot may see (a shared prompt, any token of
    an unshared sequence), b >= 1 for the tokens of a slot's branch b: a token attends to keys of its
    slot at or before its row index whose branch is 0 or its own.
    ``position_ids``: every token's position in its own (context, answer) sequence, for RoPE.
    """

    branch_ids: Tensor | None = None
    position_ids: Tensor | None = None


class TreeRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RotaryEmbedding that, for a row with ``SharedPromptSeqParams``, returns one
    frequency row per token of the packed row (its tree position) instead of one per slot offset.

    GPTModel asks ``get_rotary_seq_len`` (which sees the packed-sequence parameters) and then calls
    the module with that length only, so the first call leaves the positions for the second.
    """

    _tree_positions: Tensor | None = None

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params=None, **kwargs) -> int:  # fmt: skip
        positions = getattr(packed_seq_params, "position_ids", None)
        self._tree_positions = positions
        if positions is None:
            return super().get_rotary_seq_len(
                inference_context, transformer, transformer_input, transformer_config, packed_seq_params,
                **kwargs,
            )  # fmt: skip
        return positions.numel()

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        positions, self._tree_positions = self._tree_positions, None
        if positions is None or positions.numel() != max_seq_len or offset:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        # A tree position is below its slot's length, and no slot is longer than the row.
        return self.get_emb(max_seq_len)[positions]


def use_tree_positions(model) -> None:
    """Switches ``model.rotary_pos_emb`` (a GPTModel's, any pipeline stage) to ``TreeRotaryEmbedding``:
    the same module and buffers, a forward that also serves rows with shared prompts."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if type(rotary) is not RotaryEmbedding:
        raise TypeError(
            "sharing prompts needs megatron-core's RotaryEmbedding (position_embedding_type='rope'), "
            f"got {type(rotary).__name__}"
        )
    rotary.__class__ = TreeRotaryEmbedding
