"""Shared fixtures for the datasite tests: a small valid schema and records, and the
demo NAFLD cohort prepared once per session.

Used by test_records, test_mock, test_cohort and test_launch (whose bad-records cases edit
``small_csv`` by text replacement: keep rows ``1,34,F`` and ``2,51,M`` as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedmtl.schema import Schema

SMALL_SCHEMA = {
    "dataset": {"name": "tiny", "description": "a small test hospital"},
    "columns": [
        {"name": "pid", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 120},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "bmi", "role": "feature", "type": "numeric", "min": 10, "max": 80, "missing": True},
        {"name": "smoker", "role": "feature", "type": "binary", "missing": True},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
        {"name": "stage", "role": "label", "type": "categorical", "categories": ["a", "b", "c"], "missing": True},
        {"name": "los", "role": "label", "type": "numeric", "min": 0, "max": 365, "missing": True},
        {"name": "split", "role": "split", "type": "categorical", "categories": ["train", "test"]},
    ],
}

# header is row 1, so the patients are rows 2..7
SMALL_CSV = (
    "pid,age,sex,bmi,smoker,diabetes,stage,los,split\n"
    "1,34,F,22.5,0,0,a,3,train\n"
    "2,51,M,31.4159,1,1,b,12.5,train\n"
    "3,47,F,,0,,a,,test\n"
    "4,62,M,27,1,1,c,0,train\n"
    "5,29,F,19.8,,0,,7,train\n"
    "6,70,M,NaN,0,NA,,,test\n"
)


@pytest.fixture
def small_schema() -> Schema:
    return Schema.from_dict(SMALL_SCHEMA)


@pytest.fixture
def small_csv() -> str:
    return SMALL_CSV


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str | bytes], Path]:
    """``write_file(name, text_or_bytes) -> Path`` inside the test's tmp dir."""

    def _write(name: str, content: str | bytes) -> Path:
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p

    return _write


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory):
    """``(out_dir, [SiteFiles])``: the demo cohort (3 sites, seed 0), prepared once per session."""
    from fedmtl.datasites.cohort import prepare

    out = tmp_path_factory.mktemp("demo-cohort")
    return out, prepare(out, sites=3, seed=0)


@pytest.fixture(scope="session")
def demo_records(demo_cohort):
    """``{site name: (schema, records DataFrame)}`` for the demo cohort."""
    from fedmtl.datasites.records import load_records

    _, files = demo_cohort
    out = {}
    for sf in files:
        schema = Schema.load(sf.schema)
        out[sf.name] = (schema, load_records(sf.records, schema))
    return out


def _register_compliance_helpers() -> None:
    """Make ``import compliance_helpers`` work in the policy/review/ledger/audit tests
    (pytest runs with --import-mode=importlib, so sibling modules are not importable)."""
    import importlib.util
    import sys

    name = "compliance_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)


_register_compliance_helpers()
