"""The demo NAFLD cohort: every patient once, unequal non-IID sites, partial labels."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from fedmtl.datasites.data import cohort
from fedmtl.datasites.data.cohort import CohortError, SiteFiles, prepare
from fedmtl.schema import Schema

TASKS = ["diabetes_5y", "htn_5y", "dyslipidemia_5y", "cvd_5y", "death_5y"]


@pytest.fixture(scope="module")
def built() -> pd.DataFrame:
    return cohort.build_cohort()


@pytest.fixture(scope="module")
def raw_tables():
    return cohort._load_tables()


def _digest(files: list[SiteFiles]) -> list[str]:
    return [
        hashlib.sha256(sf.records.read_bytes() + sf.schema.read_bytes()).hexdigest() for sf in files
    ]


def test_files_and_names(demo_cohort):
    out, files = demo_cohort
    assert [sf.name for sf in files] == ["st-mary", "general", "riverside"]
    for sf in files:
        assert sf.records == out / sf.name / "records.csv" and sf.records.is_file()
        assert sf.schema == out / sf.name / "schema.toml" and sf.schema.is_file()
        assert Schema.load(sf.schema).name == f"{sf.name}-records"  # the dataset the site publishes


def test_every_patient_once_and_unequal_sizes(demo_cohort, demo_records, raw_tables):
    _, files = demo_cohort
    ids = np.concatenate([df["id"].to_numpy() for _, df in demo_records.values()])
    assert len(ids) == 17549 == sum(sf.n_patients for sf in files)
    assert len(set(ids)) == 17549
    assert set(ids) == set(raw_tables[0]["id"])
    sizes = [sf.n_patients for sf in files]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    assert sizes[0] > 1.5 * sizes[2]


def test_sites_are_non_iid(demo_records):
    age = {n: df["age"].median() for n, (_, df) in demo_records.items()}
    male = {n: df["male"].mean() for n, (_, df) in demo_records.items()}
    assert age["st-mary"] > age["general"] > age["riverside"]
    assert male["riverside"] > male["st-mary"] > male["general"]


def test_one_site_lacks_a_task_entirely(demo_cohort, demo_records):
    _, files = demo_cohort
    assert [sf.missing_tasks for sf in files] == [(), (), ("dyslipidemia_5y",)]
    schema, river = demo_records["riverside"]
    assert river["dyslipidemia_5y"].isna().all() and river["hx_dyslipidemia"].isna().all()
    assert schema.column("dyslipidemia_5y").missing  # still declared, may be missing
    for name in ("st-mary", "general"):
        _, df = demo_records[name]
        assert df["dyslipidemia_5y"].notna().sum() > 1000


def test_labels_are_partial_with_both_classes(demo_records):
    for name, (schema, df) in demo_records.items():
        assert [c.name for c in schema.labels] == TASKS
        for task in TASKS:
            if name == "riverside" and task == "dyslipidemia_5y":
                continue
            s = df[task]
            assert 0.2 < s.isna().mean() < 0.8, (name, task)
            assert set(s.dropna()) == {0.0, 1.0}, (name, task)


def test_same_schema_columns_everywhere_and_own_split(demo_records):
    columns = {n: schema.columns for n, (schema, _) in demo_records.items()}
    assert len({tuple(c) for c in columns.values()}) == 1
    for name, (schema, df) in demo_records.items():
        assert schema.split_column == "split"
        share = (df["split"] == "test").mean()
        assert abs(share - 0.2) < 0.005, name
        for c in schema.columns:  # ranges are plausible and hold
            if c.type == "numeric" and c.role == "feature":
                assert c.min is not None and c.max is not None
                v = df[c.name].dropna()
                assert v.between(c.min, c.max).all()
    schema = next(iter(demo_records.values()))[0]
    assert schema.column("age").min >= 10 and schema.column("age").max <= 110
    assert schema.column("bmi").max <= 100 and schema.column("sbp").max <= 300


def test_label_rules_against_raw_events(built, raw_tables):
    t1, _, t3 = raw_tables
    h = cohort.HORIZON_DAYS
    df = built.set_index("id")
    diab = t3[t3.event == "diabetes"]
    prior = set(diab[diab.days <= 0].id)
    incident = set(diab[(diab.days > 0) & (diab.days <= h)].id) - prior
    futime = t1.set_index("id")["futime"]
    assert df.loc[sorted(prior), "diabetes_5y"].isna().all()
    assert (df.loc[sorted(incident), "diabetes_5y"] == 1).all()
    rest = df.index.difference(sorted(prior | incident))
    long = rest[futime.loc[rest] >= h]
    short = rest[futime.loc[rest] < h]
    assert (df.loc[long, "diabetes_5y"] == 0).all()
    assert df.loc[short, "diabetes_5y"].isna().all()
    assert (df.loc[sorted(prior), "hx_diabetes"] == 1).all()
    # death: died by the horizon -> 1; followed past it -> 0; censored alive before -> NaN
    st = t1.set_index("id")
    dead = st.index[(st.status == 1) & (st.futime <= h)]
    alive_short = st.index[(st.status == 0) & (st.futime < h)]
    assert (df.loc[dead, "death_5y"] == 1).all()
    assert df.loc[alive_short, "death_5y"].isna().all()
    assert (df.loc[st.index[st.futime > h], "death_5y"] == 0).all()


def test_labs_come_from_the_window_before_index(built, raw_tables):
    _, t2, _ = raw_tables
    w = cohort.LAB_WINDOW_DAYS
    hdl = t2[(t2.test == "hdl") & t2.days.between(-w, 0) & t2.value.between(10, 200)]
    has = set(hdl.id)
    df = built.set_index("id")
    assert df["hdl"].notna().sum() == len(has)
    pid = hdl.sort_values("days").id.iloc[-1]  # someone measured nearest day 0
    last = hdl[hdl.id == pid]
    last = last[last.days == last.days.max()].value.median()
    assert df.loc[pid, "hdl"] == last


def test_prepare_is_deterministic(demo_cohort, tmp_path):
    _, files = demo_cohort
    again = prepare(tmp_path / "again", sites=3, seed=0)
    assert _digest(again) == _digest(files)


def test_seed_changes_assignment_and_more_sites(built):
    a = cohort.assign_sites(built, 3, seed=0)
    b = cohort.assign_sites(built, 3, seed=1)
    assert (a != b).mean() > 0.3
    np.testing.assert_array_equal(a, cohort.assign_sites(built, 3, seed=0))
    five = cohort.assign_sites(built, 5, seed=0)
    assert sorted(set(five)) == [0, 1, 2, 3, 4]
    assert cohort.site_names(10)[:3] == ["st-mary", "general", "riverside"]
    assert cohort.site_names(10)[-1] == "hospital-10"
    assert len(set(cohort.site_names(10))) == 10


def test_bad_arguments_write_nothing(tmp_path):
    for kwargs in ({"sites": 0}, {"sites": 3, "test_fraction": 1.5}, {"seed": -1}):
        with pytest.raises(CohortError):
            prepare(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_task_suffix():
    assert cohort.task_suffix(1826) == "_5y"
    assert cohort.task_suffix(365) == "_1y"
    assert cohort.task_suffix(1000) == "_1000d"
