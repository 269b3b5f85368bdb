"""The smoke run that ``make test-notebooks`` just made under nbval, checked against the golden run.

Not collected by ``pytest tests`` (no ``test_`` file name): the Makefile passes it after the notebooks, with
``$LLMFT_RESULTS_DIR`` pointing at the folder they wrote. The golden run (tests/golden/smoke/, recorded by
``python tools/capability_matrix.py --record tests/golden/smoke``) holds the tables and per-example
predictions of one smoke run. Every row must be present, every verbalizer log-prob within the ``cpu``
tolerance of llmft_utils/compare.py (inference rows: 1e-4; trained rows: measured spread across CPU kernel
settings, docs/reproducibility.md), and every verdict of every claim table the same. A learning rate x10,
a swapped KL direction or permuted teacher targets moves the trained rows far past that bound.
"""
import os
from pathlib import Path

import pytest

from llmft_utils import compare

GOLDEN = Path(__file__).resolve().parent / "golden" / "smoke"


def test_smoke_run_matches_the_golden_run():
    run = os.environ.get("LLMFT_RESULTS_DIR", "")
    if not run or not (Path(run) / "cd.csv").is_file():
        pytest.fail(f"no smoke run at LLMFT_RESULTS_DIR={run!r}: run this after the notebooks (make test-notebooks)")
    c = compare.compare(GOLDEN, run, compare.DEFAULT_TOLERANCE)
    print(c.report())
    assert c.ok, "the smoke run differs from tests/golden/smoke beyond the tolerance:\n" + c.report()
