"""``solopo-train --config RECIPE.yaml [key=value ...]``: SoLoPO training, launchable with torchrun.

    solopo-train --dry-run --config RECIPE.yaml     # validate and plan, no GPUs, no process groups

    torchrun --standalone --nproc-per-node 2 -m solopo_megatron.train --config recipes/tiny-cpu.yaml
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m solopo_megatron.train --config RECIPE.yaml train.train_iters=1000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .data.errors import DataError
from .recipe.errors import RecipeError
from .recipe.loading import load_config
from .recipe.validation import validate_recipe

# Expected on machines without Transformer Engine / Apex (CPU runs): megatron-core says so at import.
EXPECTED_WARNINGS = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*MimoModelConfig is experimental.*",  # 0.19 warns at import; this project does not use MiMo
)
# megatron-core 0.19 logs this for every GPTModel built: the model this plugin is written for (see
# docs/recipes.md, How a step runs).
EXPECTED_LOG_LINES = ("GPTModel IS DEPRECATED",)


class _DropExpectedLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(EXPECTED_LOG_LINES)


def _quiet_expected_warnings() -> None:
    """Installed by the command-line entry points only (never on import)."""
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_DropExpectedLines())


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    """The command line of ``solopo-train`` / ``solopo-ref-logps``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="overrides: key=value (e.g. train.train_iters=50), +key=value, ++key=value, ~key",
    )
    if prog == "solopo-train":
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="validate without GPUs and print the layout, lengths, microbatches, tokens and memory",
        )
        parser.add_argument(
            "--eval-only",
            action="store_true",
            help="evaluate the latest checkpoint of checkpoint.load (or checkpoint.save) and exit",
        )
        parser.add_argument(
            "--world-size",
            type=int,
            default=None,
            help="dry run: GPUs to plan for (default: cluster.num_nodes x cluster.gpus_per_node)",
        )
    return parser.parse_intermixed_args(argv)  # flags may come after overrides


def _run(
    argv: list[str] | None, prog: str, job, *, check_reference: bool = True, resuming: bool = True
) -> int:
    """Loads and validates the recipe, then runs ``job(cfg)`` inside the CPU compatibility layer (a
    no-op on CUDA). Configuration and data errors (RecipeError, DataError, OSError before launch)
    become one line on stderr and exit code 2; any other error keeps its traceback."""
    _quiet_expected_warnings()
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "dry_run", False):
            from .recipe.planner import dry_run

            print(dry_run(cfg, args.config, args.world_size))
            return 0
        # The job-wide checks (run lock, reference-store fingerprint: hashing the data) on rank 0 only:
        # if they fail there, torchrun stops the other ranks.
        validate_recipe(
            cfg,
            int(os.environ.get("WORLD_SIZE", "1")),
            check_reference=check_reference,
            check_run_state=os.environ.get("RANK", "0") == "0",
            resuming=resuming,
        )
    except (ValueError, OSError) as error:
        from .megatron.parallel import report_error

        # Every rank checks the same recipe: rank 0 says it, once per job (even under torchrun).
        report_error(str(error), here=os.environ.get("RANK", "0") == "0")
        return 2
    from .megatron import cpu_compat
    from .megatron.checkpoint import release_run_locks
    from .megatron.parallel import destroy
    from .megatron.trainer import sigint_handling, sigint_received

    # SIGINT (Ctrl-C; under torchrun every worker gets it): one line on the logging rank, exit 130.
    with sigint_handling(), cpu_compat.enabled():
        try:
            job(cfg)
        except KeyboardInterrupt as interrupt:
            if getattr(interrupt, "report", os.environ.get("RANK", "0") == "0"):
                line = getattr(interrupt, "message", "interrupted during start-up; no training step was run")
                print(line, file=sys.stderr, flush=True)
            return 130
        except (RecipeError, DataError) as error:
            from .megatron.parallel import report_error

            release_run_locks()  # before report_error's wait, which torchrun may end
            # Raised alike on every rank (collective checks): one rank says it, by default rank 0.
            report_error(str(error), here=getattr(error, "report", os.environ.get("RANK", "0") == "0"))
            return 2
        except Exception:
            if sigint_received():  # a peer's exit seen as a collective error: part of the interrupt
                return 130
            raise
        finally:
            release_run_locks()  # the checkpoint folder's run lock, also after errors and SIGINT
            destroy()
    return 0


def _train(cfg) -> None:
    from .megatron import trainer as training

    training.train(training.setup(cfg))


def _evaluate(cfg) -> None:
    from .megatron import trainer as training

    training.evaluate_only(training.setup(cfg, evaluation=True))


def main(argv: list[str] | None = None) -> int:
    """``solopo-train``: validates, then trains; returns the exit code."""
    if "--eval-only" in (sys.argv[1:] if argv is None else argv):
        return _run(argv, "solopo-train", _evaluate, resuming=False)
    return _run(argv, "solopo-train", _train)


def _write_reference_store(cfg) -> None:
    from .megatron import trainer as training
    from .megatron.reference import write_reference_store

    trainer = training.setup(cfg, reference_pass=True)
    path, count = write_reference_store(cfg, trainer.ctx, trainer.chunks, trainer.data)
    trainer.log(f"wrote {count} examples' reference log-probs to {path}")


def ref_logps_main(argv: list[str] | None = None) -> int:
    """``solopo-ref-logps``: writes the reference store (solopo.reference_store) from the current weights."""
    return _run(argv, "solopo-ref-logps", _write_reference_store, check_reference=False, resuming=False)


if __name__ == "__main__":
    raise SystemExit(main())
