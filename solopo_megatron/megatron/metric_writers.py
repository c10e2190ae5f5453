"""Where step metrics go (logging rank only): JSON lines, TensorBoard, and Weights & Biases if asked for.

An entry is ``{"step": N, "train": {...}, "eval": {...}}``; TensorBoard and wandb get scalars named
``train/<metric>`` and ``eval/<metric>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..recipe.schema import LoggerSection


class MetricWriters:
    """Writes each step's metrics entry to JSON lines, TensorBoard and wandb (logging rank only)."""

    def __init__(
        self, logger: LoggerSection, run_config: dict[str, Any], *, enabled: bool, resumed_step: int = 0
    ):
        self.enabled = enabled
        self.metrics_file = logger.metrics_file if enabled else None
        self.tensorboard = None
        self.wandb_run = None
        if not enabled:
            return
        if self.metrics_file:  # its folder was checked before launch (recipe.preflight): create it
            Path(self.metrics_file).parent.mkdir(parents=True, exist_ok=True)
        if logger.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            self.tensorboard = SummaryWriter(
                logger.tensorboard_dir, purge_step=resumed_step + 1 if resumed_step else None
            )
        if logger.wandb_project:
            import wandb

            self.wandb_run = wandb.init(
                project=logger.wandb_project,
                name=logger.wandb_run_name,
                mode=logger.wandb_mode,
                config=run_config,
                resume="allow",
                id=logger.wandb_run_id,
            )

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.metrics_file:
            with open(self.metrics_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        step = int(entry["step"])
        scalars = {
            f"{part}/{name}": value
            for part in ("train", "eval")
            for name, value in entry.get(part, {}).items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        }
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
