"""The DP training benchmark's worker runs each mode (smoke test; no timing asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "dp_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dp_training_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["nonprivate", "dp_hooks", "dp_ghost", "dp_ghost_opacus"])
def test_worker_reports_throughput_and_memory(bench, mode):
    # Execute
    row = bench.worker(size="demo", mode=mode, n=256, batch=32, steps=3, threads=1, seed=0)
    # Assert
    assert row["mode"] == mode and row["steps"] == 3
    assert row["params"] == 4037
    assert row["samples"] > 0 and row["samples_per_s"] > 0
    assert row["peak_rss_growth_mb"] >= 0


def test_unknown_mode_is_a_key_error(bench):
    with pytest.raises(KeyError):
        bench.worker(size="demo", mode="dp_magic", n=64, batch=8, steps=1, threads=1, seed=0)
