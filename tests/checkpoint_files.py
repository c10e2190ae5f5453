"""Checkpoint folders for the start-up checks' tests: a dist_checkpointing layout without a model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch


def write_checkpoint_files(folder: Path) -> Path:
    """``folder`` with what megatron-core's torch_dist save leaves: ``metadata.json``, a zip ``common.pt``
    and torch.distributed.checkpoint's ``.metadata`` with the shard it lists (``__0_0.distcp``)."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({"iteration": int(folder.name.removeprefix("iter_") or 0)}, folder / "common.pt")
    with warnings.catch_warnings():  # one process without a process group is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"weight": torch.arange(64.0)}, checkpoint_id=str(folder), no_dist=True)
    return folder
