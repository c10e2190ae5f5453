"""``solopo-train --config RECIPE.yaml [key=value ...]``: SoLoPO training, launchable with torchrun.

    solopo-train --dry-run --config RECIPE.yaml     # validate and plan, no GPUs, no process groups

    torchrun --standalone --nproc-per-node 2 -m solopo_megatron.train --config recipes/tiny-cpu.yaml
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m solopo_megatron.train --config RECIPE.yaml train.train_iters=1000
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .config import load_config
from .validation import validate_recipe

# Expected on machines without Transformer Engine / Apex (CPU runs): megatron-core says so at import.
for _message in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*",
                 r".*full scope is deprecated.*"):
    warnings.filterwarnings("ignore", message=_message)


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*",
                        help="overrides: key=value (e.g. train.train_iters=50), +key=value, ++key=value, ~key")
    if prog == "solopo-train":
        parser.add_argument("--dry-run", action="store_true",
                            help="validate without GPUs and print the layout, lengths, microbatches, tokens and memory")
        parser.add_argument("--world-size", type=int, default=None,
                            help="dry run: GPUs to plan for (default: cluster.num_nodes x cluster.gpus_per_node)")
    return parser.parse_args(argv)


def _run(argv: list[str] | None, prog: str, job, *, check_reference: bool = True) -> int:
    """Loads the recipe, runs ``job(training_module, cfg)``, and turns configuration and data errors
    (ValueError, DataError included) into one line on stderr and exit code 2."""
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "dry_run", False):
            from .planner import dry_run

            print(dry_run(cfg, args.config, args.world_size))
            return 0
        validate_recipe(cfg, int(os.environ.get("WORLD_SIZE", "1")), check_reference=check_reference)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .megatron import trainer as training
    from .megatron.parallel import destroy

    try:
        job(training, cfg)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        destroy()
    return 0


def main(argv: list[str] | None = None) -> int:
    return _run(argv, "solopo-train", lambda training, cfg: training.train(training.setup(cfg)))


def _write_reference_store(training, cfg) -> None:
    trainer = training.setup(cfg, load_reference=False)
    path = training.reference_store_path(trainer)
    store = training.compute_reference_store(trainer, training.reference_datasets(trainer), path,
                                             training.reference_fingerprint(trainer.data))
    trainer.log(f"wrote {len(store)} examples' reference log-probs to {path}")


def ref_logps_main(argv: list[str] | None = None) -> int:
    """``solopo-ref-logps``: writes the reference store (solopo.reference_store) from the current weights."""
    return _run(argv, "solopo-ref-logps", _write_reference_store, check_reference=False)


if __name__ == "__main__":
    raise SystemExit(main())
