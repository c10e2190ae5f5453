"""Which pytest sessions run on the GPU (tests/conftest.py hides it from the others)."""

from __future__ import annotations

import re


def selects_gpu_tests(markexpr: str) -> bool:
    """Whether ``-m markexpr`` runs a test marked ``gpu`` and nothing else (an empty expression runs all)."""
    if not markexpr.strip():
        return True
    try:
        from _pytest.mark.expression import Expression  # pytest's own parser (no public API for it)

        return Expression.compile(markexpr).evaluate(lambda name, **_: name == "gpu")
    except Exception:  # noqa: BLE001  (another pytest): the plain reading of the expression
        return re.search(r"\bgpu\b", markexpr) is not None and re.search(r"\bnot\s+gpu\b", markexpr) is None
