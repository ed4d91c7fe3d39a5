"""The Gaussian-release interface both noised releases (statistics, evaluation) use."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmtl.models import TaskSpec
from fedmtl.privacy import eval_release, stats_release
from fedmtl.privacy.accounting import PrivacyRecord
from fedmtl.privacy.gaussian_release import GaussianRelease, check_noise_multiplier, gaussian_record
from fedmtl.schema import Schema

SCHEMA = Schema.from_dict({
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
        {"name": "crp", "role": "feature", "type": "numeric", "min": 0, "max": 6000, "transform": "log1p"},
        {"name": "y", "role": "label", "type": "binary"},
    ]
})
TASKS = [
    TaskSpec(name="dia", kind="binary", label="dia"),
    TaskSpec(name="stage", kind="multiclass", label="stage", classes=("F0", "F1", "F2")),
    TaskSpec(name="alt", kind="regression", label="alt", shift=30.0, scale=30.0),
]


def _releases(sigma=1.3):
    return [stats_release.StatisticsRelease(SCHEMA, noise_multiplier=sigma),
            eval_release.EvaluationRelease(TASKS, n_bins=10, noise_multiplier=sigma)]


def test_both_releases_are_the_gaussian_mechanism_on_their_vector():
    for release in _releases():
        # Prepare
        assert isinstance(release, GaussianRelease)
        vec = np.linspace(0.0, 5.0, release.shape[0])
        w = release.scales()
        # Execute
        got = release.noise(vec, rng=np.random.default_rng(11))
        # Assert: vec + w * N(0, (sigma * sensitivity)^2), drawn from the given generator
        draw = np.random.default_rng(11).normal(0.0, 1.3 * release.sensitivity, size=vec.shape)
        assert np.array_equal(got, vec + (draw if w is None else w * draw))
        assert release.noise_std == 1.3 * release.sensitivity
        assert release.privacy_record() == PrivacyRecord(1.3, 1.0, 1)


def test_module_functions_are_the_release_objects():
    # Prepare
    stats = np.arange(stats_release.size(SCHEMA), dtype=float)
    metrics = np.arange(eval_release.metric_scales(TASKS, n_bins=10).size, dtype=float)
    # Execute
    a = stats_release.noise_statistics(stats, SCHEMA, noise_multiplier=2.0, rng=np.random.default_rng(1))
    b = eval_release.noise_statistics(metrics, TASKS, n_bins=10, noise_multiplier=2.0, rng=np.random.default_rng(2))
    s, e = _releases(2.0)
    # Assert
    assert np.array_equal(a, s.noise(stats, rng=np.random.default_rng(1)))
    assert np.array_equal(b, e.noise(metrics, rng=np.random.default_rng(2)))
    assert stats_release.noise_std(SCHEMA, 2.0) == pytest.approx(2.0 * math.sqrt(6))
    assert stats_release.privacy_record(2.0) == eval_release.privacy_record(2) == gaussian_record(2.0)


@pytest.mark.parametrize("sigma", [0, -1.0, float("nan"), float("inf"), True, "1.0", None])
def test_no_release_without_noise(sigma):
    for make in (lambda: stats_release.StatisticsRelease(SCHEMA, noise_multiplier=sigma),
                 lambda: eval_release.EvaluationRelease(TASKS, n_bins=10, noise_multiplier=sigma),
                 lambda: stats_release.privacy_record(sigma), lambda: eval_release.privacy_record(sigma)):
        with pytest.raises(ValueError, match="without noise is not differentially private"):
            make()
    with pytest.raises(ValueError, match="releasing feature statistics"):
        check_noise_multiplier(sigma, released="feature statistics")


def test_a_vector_of_the_wrong_shape_or_not_finite_is_never_released():
    for release in _releases():
        # Prepare
        n = release.shape[0]
        poisoned = np.zeros(n)
        poisoned[0] = np.inf
        # Execute / Assert: the message says what the shape should be; nothing comes back
        with pytest.raises(ValueError, match=rf"the statistics of .* need \({n},\)"):
            release.noise(np.zeros(n + 1))
        with pytest.raises(ValueError, match="NaN or inf"):
            release.noise(poisoned)
