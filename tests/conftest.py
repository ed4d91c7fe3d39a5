"""Shared fixtures: a small schema and synthetic records shaped like the demo cohort."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmtl.schema import Schema

SCHEMA_DICT = {
    "dataset": {"name": "toy"},
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
        {"name": "bmi", "role": "feature", "type": "numeric", "min": 15, "max": 50, "missing": True},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "smoker", "role": "feature", "type": "binary", "missing": True},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
        {"name": "stage", "role": "label", "type": "categorical", "categories": ["F0", "F1", "F2"], "missing": True},
        {"name": "alt", "role": "label", "type": "numeric", "min": 0, "max": 60, "missing": True},
        {"name": "split", "role": "split", "type": "categorical", "categories": ["train", "test"]},
    ],
}


def make_records(n: int, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    """Synthetic records with learnable signal: diabetes depends on age and bmi."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 90, n) + shift
    bmi = rng.normal(28, 5, n).clip(15, 50)
    sex = rng.choice(["F", "M"], n)
    smoker = rng.integers(0, 2, n).astype(float)
    logit = 0.06 * (age - 55) + 0.25 * (bmi - 28) + 0.5 * smoker
    diabetes = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    stage_idx = np.digitize(0.04 * (age - 55) + 0.1 * (bmi - 28) + rng.normal(0, 0.7, n), [-0.5, 0.5])
    stage = np.array(["F0", "F1", "F2"], dtype=object)[stage_idx]
    alt = 20 + 0.5 * (bmi - 28) + rng.normal(0, 2, n)
    df = pd.DataFrame(
        {
            "id": np.arange(n),
            "age": age,
            "bmi": bmi,
            "sex": sex,
            "smoker": smoker,
            "diabetes": diabetes,
            "stage": stage,
            "alt": alt,
            "split": np.where(rng.random(n) < 0.75, "train", "test"),
        }
    )
    # partial labels and missing features
    df.loc[rng.random(n) < 0.3, "diabetes"] = np.nan
    df.loc[rng.random(n) < 0.4, "stage"] = None
    df.loc[rng.random(n) < 0.5, "alt"] = np.nan
    df.loc[rng.random(n) < 0.1, "bmi"] = np.nan
    df.loc[rng.random(n) < 0.1, "smoker"] = np.nan
    return df


@pytest.fixture
def one_torch_thread():
    """Train on one torch thread (small models: threads only add overhead), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def schema() -> Schema:
    return Schema.from_dict(SCHEMA_DICT)


@pytest.fixture
def records() -> pd.DataFrame:
    return make_records(200, seed=1)


@pytest.fixture
def make_site_records():
    """The synthetic-records factory, for tests that need several sites."""
    return make_records


# -- two test processes ----------------------------------------------------------------
#
# CI runs the suite in two worker processes (pytest-xdist; pyproject's addopts: `-n auto
# --dist loadfile --no-loadscope-reorder`, and `auto` means two for a folder, one process
# for named files: pytest_xdist_auto_num_workers). Each worker runs whole files, so a
# file's module-scoped datasites launch once; a session-scoped federation (tests/security,
# tests/researcher) launches once in each worker that runs one of its files. The slowest
# files (SLOW_FIRST, measured in CI) are handed out first, so that no long file starts
# last while the other worker has nothing left to do.
#
# The body of a test marked ``exclusive`` runs while no other test runs: its worker waits
# until the other worker's current test ends, and the other worker starts nothing new until
# the body is done (its fixtures are set up and torn down beside other tests). It is for tests that assert an ordering between two things a datasite does at once
# (tests/security/test_11_fair_sharing.py), which a second test process competing for the
# same two cores could invert without any bug. In one process all of this does nothing.

SLOW_FIRST = (  # slowest first (seconds in one process, CI of 3 Dec 2026); the fault files
    # of tests/researcher keep their order (test_job_rejoin stops and relaunches sites)
    "tests/researcher/test_federated_job.py",  # 435
    "tests/security/test_3_reviewer_wedge.py",  # 416
    "tests/researcher/test_demo.py",  # 303
    "tests/test_notebooks.py",  # 226+
    "tests/security/test_10_dataplane_exhaustion.py",  # 174
    "tests/datasites/review/test_manual_review.py",  # 136
    "tests/datasites/server/test_launch.py",  # 131
    "tests/researcher/test_cost_checks.py",  # 63
    "tests/researcher/test_job_lifecycle.py",  # 114
    "tests/researcher/test_job_rejoin.py",  # 121
    "tests/security/test_8_outcome_oracle.py",  # 113
    "tests/datasites/console/test_console.py",  # 102
    "tests/security/test_6_unchecked_inputs.py",  # 99
    "tests/security/test_5_releases.py",  # 98
    "tests/security/test_9_secagg_dropout_lie.py",  # 90
    "tests/researcher/test_schema_merge_job.py",  # 77
    "tests/security/test_11_fair_sharing.py",  # 69
)
_LOCKS_ENV = "FEDMTL_TEST_LOCKS"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): two workers for the suite or a folder of it, none
    (one process, no worker start-up) when every argument names a test file or test."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    args = [a for a in config.args if not a.startswith("-")]
    if args and all("::" in a or a.endswith(".py") for a in args):
        return 0
    return min(2, os.cpu_count() or 1)


def _distributed(config: pytest.Config) -> bool:
    """A worker of a distributed run (xdist gives its workers ``workerinput``)."""
    return hasattr(config, "workerinput")


_made_locks: list[str] = []  # the lock folder this process made (the controller)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", None) and _LOCKS_ENV not in os.environ:
        # the controller, before it starts the workers: a folder for their locks (inherited)
        _made_locks.append(tempfile.mkdtemp(prefix="fedmtl-test-locks-"))
        os.environ[_LOCKS_ENV] = _made_locks[-1]


def pytest_unconfigure(config: pytest.Config) -> None:
    while _made_locks:
        shutil.rmtree(_made_locks.pop(), ignore_errors=True)
        os.environ.pop(_LOCKS_ENV, None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under two workers: the slowest files first, each file's tests in their order."""
    if not _distributed(config):
        return

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the rest keep their collected order


@contextlib.contextmanager
def _turn(folder: Path, exclusive: bool):
    """Shared (every test) or exclusive (``exclusive`` tests) hold of the run's lock. An
    exclusive test takes the gate first and keeps it, so no new test starts meanwhile."""
    with open(folder / "gate", "a") as gate, open(folder / "running", "a") as running:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(running, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(running, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)


def _locks(item: pytest.Item) -> Path | None:
    folder = os.environ.get(_LOCKS_ENV)
    return Path(folder) if folder and hasattr(item.config, "workerinput") else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Every test but an exclusive one holds the shared lock from its setup to its teardown."""
    folder = _locks(item)
    if folder is None or item.get_closest_marker("exclusive") is not None:
        return (yield)
    with _turn(folder, exclusive=False):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """An exclusive test runs its body alone (its fixtures were set up beside other tests)."""
    folder = _locks(item)
    if folder is None or item.get_closest_marker("exclusive") is None:
        return (yield)
    with _turn(folder, exclusive=True):
        return (yield)
