"""``solopo-export``: a solopo-train checkpoint -> a Hugging Face model directory.

    solopo-export --checkpoint runs/solopo --out hf-model                 # the latest iteration, bf16
    solopo-export --checkpoint runs/solopo --iteration 200 --out hf-model --dtype fp32 --overwrite

One CPU process, no GPU and no process group, whatever layout trained the checkpoint; see
``solopo_megatron.megatron.hf_export`` (also callable from Python: ``export_checkpoint``).
"""

from __future__ import annotations

import argparse
import re
import sys

from .data.errors import DataError
from .megatron.hf_export import DEFAULT_SHARD_BYTES, DTYPES, export_checkpoint
from .recipe.errors import RecipeError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_size(text: str) -> int:
    """``500MB``, ``2GiB`` or a byte count -> bytes (argparse type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB, 2GiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="solopo-export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run's checkpoint.save folder, or one iter_* folder"
    )
    parser.add_argument(
        "--iteration", type=int, help="which iteration of the run folder (default: the latest)"
    )
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="bf16", help="weights' dtype (default bf16)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists and is not empty"
    )
    parser.add_argument(
        "--allow-huge-weights",
        action="store_true",
        help="export weights beyond 1e6 in magnitude (a diverged run's) with a warning instead of refusing",
    )
    parser.add_argument(
        "--max-shard-size",
        type=shard_size,
        default=DEFAULT_SHARD_BYTES,
        help="largest safetensors shard, e.g. 500MB or 2GiB (default 1GiB; about the peak memory)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``solopo-export``; returns the exit code (2 with one line on stderr for a bad checkpoint or --out)."""
    args = parse_args(argv)
    try:
        export_checkpoint(
            args.checkpoint,
            args.out,
            iteration=args.iteration,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_bytes=args.max_shard_size,
            allow_huge_weights=args.allow_huge_weights,
            log=lambda text: print(text, flush=True),
        )
    except (RecipeError, DataError, ValueError, OSError) as error:  # e.g. a config.yaml the schema refuses
        print(f"solopo-export: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
