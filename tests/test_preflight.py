"""recipe.preflight: the paths a run writes and the variables it reads, judged before launch."""

from __future__ import annotations

from pathlib import Path

import pytest

from solopo_megatron.recipe import preflight
from solopo_megatron.recipe.loading import load_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"


def test_kernel_backends_are_the_dispatchers():
    from solopo_kernels.dispatch import BACKENDS

    assert preflight.BACKENDS == BACKENDS


@pytest.mark.parametrize(
    "environ, problem",
    [
        ({}, None),
        ({"SOLOPO_KERNELS": " Torch "}, None),  # the dispatcher strips and lower-cases it too
        ({"SOLOPO_DIST_TIMEOUT_MIN": "45"}, None),
        ({"SOLOPO_FAULT_INJECT": "kill_during_save:3"}, None),
        ({"SOLOPO_KERNELS": "cuda"}, "SOLOPO_KERNELS: must be one of auto, triton, torch"),
        ({"SOLOPO_DIST_TIMEOUT_MIN": "1.5"}, "SOLOPO_DIST_TIMEOUT_MIN: must be a whole number"),
        ({"SOLOPO_DIST_TIMEOUT_MIN": "-3"}, "SOLOPO_DIST_TIMEOUT_MIN: must be a whole number"),
        ({"SOLOPO_FAULT_INJECT": "kill_during_save"}, "SOLOPO_FAULT_INJECT: tests only"),
    ],
)
def test_environment_variables(environ, problem):
    problems = preflight.environment_problems(environ)
    assert len(problems) == (0 if problem is None else 1), problems
    if problem is not None:
        assert problems[0].startswith(problem), problems


def test_paths_are_probed_by_a_real_write_and_leave_nothing(tmp_path, monkeypatch):
    """A folder that exists, one that can be created, and a metrics file in a missing folder pass and
    leave no probe file; a file where a folder is needed, and the reverse, are named by key."""
    cfg = load_config(
        RECIPE,
        [
            f"dataset.cache_dir={tmp_path / 'new' / 'cache'}",
            f"logger.metrics_file={tmp_path / 'logs' / 'metrics.jsonl'}",
            f"logger.tensorboard_dir={tmp_path}",
        ],
    )
    assert preflight.output_path_problems(cfg) == []
    assert list(tmp_path.iterdir()) == []  # nothing created, no probe left
    (tmp_path / "file").write_text("x")
    cfg = load_config(
        RECIPE,
        [
            f"dataset.cache_dir={tmp_path / 'file' / 'cache'}",
            f"logger.metrics_file={tmp_path}",
            f"logger.tensorboard_dir={tmp_path / 'file'}",
        ],
    )
    keys = [problem.split(":")[0] for problem in preflight.output_path_problems(cfg)]
    assert keys == ["dataset.cache_dir", "logger.metrics_file", "logger.tensorboard_dir"]

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "TemporaryFile", refuse)
    monkeypatch.setenv("SOLOPO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(RECIPE, ["dataset.cache_dir=null"])
    assert preflight.output_path_problems(cfg) == [
        f"SOLOPO_CACHE_DIR (dataset.cache_dir is unset): cannot write in {tmp_path} ({tmp_path / 'cache'}'s "
        "nearest existing folder): Read-only file system; point it at a writable folder"
    ]
