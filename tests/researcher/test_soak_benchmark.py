"""The soak benchmark's criteria (benchmarks/soak.py) fail on a leak, a slowdown, a ledger that
does not verify and a charge that differs from the price; pure, no datasite (the benchmark
itself is not CI: it runs minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.fixture()
def soak(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # its `from benchkit import ...`
    spec = importlib.util.spec_from_file_location("soak_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _samples(rss_at) -> list[dict]:
    """201 samples over a run, ``rss_at(frac)`` MB at each share of the passes done."""
    return [{"t": float(i), "frac": i / 200, "rss_mb": {"a": rss_at(i / 200)}} for i in range(201)]


def _times(seconds_at, rounds: int = 20, jobs: int = 3) -> dict:
    return {(f"j{j}", p): seconds_at(p) for j in range(jobs) for p in range(1, rounds + 1)}


def _verdict(soak, *, rss, flat, ledger_ok=True, equal=True, errors=None, dropped=0, run=63, total=63):
    return soak.evaluate(rss=rss, flat=flat, ledgers={"a": {"ok": ledger_ok}},
                         eps_rows=[{"equal": equal}], errors=errors or {}, dropped=dropped,
                         passes_run=run, total=total)


def test_flat_memory_and_pass_time_pass_every_criterion(soak):
    # Prepare: memory grows during warm-up only (first pass caches), pass 1 is cold
    rss = soak.rss_growth(_samples(lambda f: 600 + 80 * min(f, 0.1) / 0.1), ["a"])
    flat = {"a": soak.flatness(_times(lambda p: 9.0 if p == 1 else 1.0), 20)}
    # Execute
    verdict = _verdict(soak, rss=rss, flat=flat)
    # Assert
    assert rss["a"]["growth"] == 0.0 and flat["a"]["ratio"] == 1.0
    assert all(v["ok"] for v in verdict.values()), verdict


def test_a_leak_of_more_than_ten_percent_after_warm_up_fails_rss_growth(soak):
    # Prepare: 680 MB at 25% of the passes, growing linearly to +20% at the end
    rss = soak.rss_growth(_samples(lambda f: 680 * (1 + 0.2 * f)), ["a"])
    flat = {"a": soak.flatness(_times(lambda p: 1.0), 20)}
    # Execute
    verdict = _verdict(soak, rss=rss, flat=flat)
    # Assert
    assert rss["a"]["growth"] > 0.10
    assert not verdict["rss_growth"]["ok"] and verdict["pass_time_flat"]["ok"]


def test_a_pass_time_that_grows_fails_flatness_and_a_faster_tail_does_not(soak):
    # Prepare: +2% per pass (the last quarter about 20% slower than the second)
    slower = {"a": soak.flatness(_times(lambda p: 1.0 + 0.02 * p), 20)}
    faster = {"a": soak.flatness(_times(lambda p: 1.0 - 0.02 * p), 20)}
    rss = soak.rss_growth(_samples(lambda f: 680.0), ["a"])
    # Execute / Assert
    assert slower["a"]["ratio"] > 1.10 and slower["a"]["theil_sen_s_per_pass"] == pytest.approx(0.02)
    assert not _verdict(soak, rss=rss, flat=slower)["pass_time_flat"]["ok"]
    assert _verdict(soak, rss=rss, flat=faster)["pass_time_flat"]["ok"]


@pytest.mark.parametrize("broken, criterion", [
    ({"ledger_ok": False}, "ledgers_verify"),
    ({"equal": False}, "epsilon_charged_equals_priced"),
    ({"errors": {"j0": "JobError: pass 3 aborted"}}, "jobs_completed"),
    ({"dropped": 1}, "jobs_completed"),
    ({"run": 62}, "jobs_completed"),
])
def test_a_ledger_a_charge_or_a_job_that_went_wrong_fails_its_criterion(soak, broken, criterion):
    # Prepare
    rss = soak.rss_growth(_samples(lambda f: 680.0), ["a"])
    flat = {"a": soak.flatness(_times(lambda p: 1.0), 20)}
    # Execute
    verdict = _verdict(soak, rss=rss, flat=flat, **broken)
    # Assert: that criterion, and only it, fails
    assert [k for k, v in verdict.items() if not v["ok"]] == [criterion]
