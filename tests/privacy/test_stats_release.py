"""The noised release of feature statistics (standard scaling): sensitivity, noise scale,
the researcher's derivation and the site's check of what comes back."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedmtl.models.preprocessing import Preprocessor, local_stats
from fedmtl.privacy import stats_release as sr
from fedmtl.schema import Schema

SCHEMA = Schema.from_dict({
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
        {"name": "crp", "role": "feature", "type": "numeric", "min": 0, "max": 6000, "missing": True,
         "transform": "log1p"},
        {"name": "sex", "role": "feature", "type": "categorical", "categories": ["F", "M"]},
        {"name": "y", "role": "label", "type": "binary", "missing": True},
    ]
})


def _records(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    crp = np.exp(rng.normal(2.0, 1.0, n)).clip(0, 6000)
    crp[rng.random(n) < 0.2] = np.nan
    return pd.DataFrame({"id": np.arange(n), "age": rng.uniform(18, 90, n), "crp": crp,
                         "sex": rng.choice(["F", "M"], n), "y": rng.integers(0, 2, n).astype(float)})


def test_one_record_moves_the_statistics_by_at_most_the_sensitivity():
    # Prepare: a table and its neighbours with one extreme record added
    df = _records(50)
    base = sr.site_statistics(SCHEMA, df)
    extremes = [{"age": 18.0, "crp": 0.0}, {"age": 90.0, "crp": 6000.0}, {"age": 90.0, "crp": np.nan},
                {"age": 500.0, "crp": 1e9}]  # out of range: clipped first
    # Execute / Assert
    assert sr.size(SCHEMA) == 6 and sr.sensitivity(SCHEMA) == pytest.approx(math.sqrt(6))
    for row in extremes:
        more = pd.concat([df, pd.DataFrame([{"id": 999, "sex": "F", "y": 1.0, **row}])], ignore_index=True)
        moved = np.linalg.norm(sr.site_statistics(SCHEMA, more) - base)
        assert moved <= sr.sensitivity(SCHEMA) + 1e-9, row


def test_noise_has_the_calibrated_standard_deviation():
    # Prepare
    vec = sr.site_statistics(SCHEMA, _records(200))
    rng = np.random.default_rng(7)
    # Execute: many releases of the same statistics
    draws = np.stack([sr.noise_statistics(vec, SCHEMA, noise_multiplier=2.0, rng=rng) for _ in range(4000)])
    # Assert: unbiased, std = sigma * sqrt(3 F) on every entry (5% = many standard errors)
    expected = 2.0 * math.sqrt(6)
    np.testing.assert_allclose(draws.mean(axis=0), vec, atol=4 * expected / math.sqrt(4000))
    np.testing.assert_allclose(draws.std(axis=0), expected, rtol=0.05)
    assert sr.noise_std(SCHEMA, 2.0) == pytest.approx(expected)
    assert sr.privacy_record(2.0).to_dict() == {"noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1}


@pytest.mark.parametrize("sigma", [0, -1.0, float("nan"), True, "5"])
def test_releasing_without_noise_is_refused(sigma):
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0"):
        sr.noise_statistics(np.zeros(6), SCHEMA, noise_multiplier=sigma)


def test_a_vector_of_the_wrong_shape_or_not_finite_is_never_released():
    with pytest.raises(ValueError, match=r"need \(6,\)"):
        sr.noise_statistics(np.zeros(5), SCHEMA, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        sr.noise_statistics(np.array([0, 0, np.inf, 0, 0, 0.0]), SCHEMA, noise_multiplier=1.0)


def test_the_release_needs_declared_ranges():
    sch = Schema.from_dict({"columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric"},
        {"name": "y", "role": "label", "type": "binary"},
    ]})
    with pytest.raises(ValueError, match=r"\['age'\] declare no min/max"):
        sr.site_statistics(sch, pd.DataFrame({"id": [1], "age": [40.0], "y": [1]}))


def test_derived_scaling_matches_exact_statistics_when_the_noise_is_small():
    # Prepare: three sites, exact pooled reference (transformed, clipped values)
    sites = [_records(n, seed=s) for s, n in enumerate((300, 500, 700))]
    summed = sum(sr.site_statistics(SCHEMA, df) for df in sites)
    exact = Preprocessor.from_stats(SCHEMA, {k: sum(local_stats(SCHEMA, df)[k] for df in sites)
                                             for k in ("count", "sum", "sumsq")})
    # Execute
    got = sr.derive_scaling(summed, SCHEMA, noise_multiplier=1e-6, n_sites=3)
    # Assert
    for name in ("age", "crp"):
        assert got["mean"][name] == pytest.approx(exact.mean[name], rel=1e-6)
        assert got["std"][name] == pytest.approx(exact.std[name], rel=1e-6)
    assert sr.check_scaling(got, SCHEMA) == got  # what the researcher derives, the site accepts


def test_derived_scaling_clamps_what_noise_made_impossible():
    # Prepare: a negative variance, a mean beyond the range, and a feature with no values
    F = 2
    summed = np.array([1000.0, 0.5,  # counts: crp below the noise level
                       1500.0, 0.0,  # sum(u): mean 1.5 > 1
                       100.0, 0.0])  # sum(u^2): variance 0.1 - 2.25 < 0
    # Execute
    got = sr.derive_scaling(summed, SCHEMA, noise_multiplier=1.0, n_sites=3)
    # Assert: mean at the top of the range, std at its floor; crp falls back to the range
    c, h = sr.unit_frame(SCHEMA)
    assert got["mean"]["age"] == pytest.approx(90.0) and 0 < got["std"]["age"] <= h[0]
    assert got["mean"]["crp"] == pytest.approx(c[1]) and got["std"]["crp"] == pytest.approx(h[1])
    assert len(summed) == 3 * F
    sr.check_scaling(got, SCHEMA)  # still acceptable to the sites


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("std"), "exactly the keys ['mean', 'std']"),
        (lambda s: s["mean"].pop("crp"), "missing ['crp']"),
        (lambda s: s["mean"].update(sex=1.0), "unknown ['sex']"),
        (lambda s: s["mean"].update(age=float("nan")), "scaling.mean['age'] must be a finite number"),
        (lambda s: s["std"].update(age=True), "scaling.std['age'] must be a finite number"),
        (lambda s: s["mean"].update(age=120.0), "outside the feature's (transformed) declared range [18, 90]"),
        (lambda s: s["std"].update(age=50.0), "scaling.std['age'] = 50 is outside [0.036, 36]"),
        (lambda s: s["std"].update(crp=0.0), "scaling.std['crp'] = 0 is outside"),
        (lambda s: s["mean"].update(crp=50.0), "scaling.mean['crp'] = 50 is outside"),  # untransformed units
    ],
)
def test_the_site_refuses_a_bad_scaling_with_what_is_wrong(change, message):
    # Prepare
    good = {"mean": {"age": 54.0, "crp": 2.0}, "std": {"age": 20.0, "crp": 1.0}}
    assert sr.check_scaling(good, SCHEMA) == good
    bad = {k: dict(v) for k, v in good.items()}
    change(bad)
    # Execute / Assert
    with pytest.raises(ValueError) as e:
        sr.check_scaling(bad, SCHEMA)
    assert message in str(e.value)


def test_preprocessor_from_a_checked_scaling_standardises_the_transformed_values():
    scaling = {"mean": {"age": 54.0, "crp": 2.0}, "std": {"age": 20.0, "crp": 1.0}}
    df = _records(5)
    X = sr.preprocessor(SCHEMA, scaling).transform(df)
    pre = Preprocessor(SCHEMA, scaling="standard", mean=scaling["mean"], std=scaling["std"])
    i = pre.feature_names.index("crp")
    np.testing.assert_allclose(X[:, i].numpy(), np.where(df["crp"].isna(), 0.0, np.log1p(df["crp"]) - 2.0),
                               rtol=1e-5)


@pytest.mark.parametrize("age", [np.inf, -np.inf, 1e308, -1e308, np.nan, "n/a", 3.4e38])
def test_no_record_makes_the_statistics_overflow(age):
    # Prepare: one record holding what a float32 or float64 computation could overflow on
    df = _records(40)
    odd = pd.concat([df, pd.DataFrame([{"id": 99, "age": age, "crp": 1e308, "sex": "F", "y": 1.0}])],
                    ignore_index=True)
    # Execute
    base, vec = sr.site_statistics(SCHEMA, df), sr.site_statistics(SCHEMA, odd)
    # Assert: finite, and the record moved each entry by at most 1 (its unit value)
    assert np.isfinite(vec).all(), f"age={age!r} made the statistics non-finite: {vec}"
    assert np.abs(vec - base).max() <= 1.0 + 1e-12
    assert np.linalg.norm(vec - base) <= sr.sensitivity(SCHEMA) + 1e-9
    sr.noise_statistics(vec, SCHEMA, noise_multiplier=1.0)  # releasable
