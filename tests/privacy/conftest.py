"""Shared fixtures for the secure-aggregation tests: identities, parameters, inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedmtl.privacy.keys import SigningKey
from fedmtl.privacy.quantization import QuantizationConfig
from fedmtl.privacy.secagg import SecAggParams


def _make_params(
    n: int, t: int, *, shapes=((3, 4), (5,)), job_id: str = "job-1", round: int = 0, bound: float = 10.0
) -> tuple[SecAggParams, dict[str, SigningKey]]:
    identities = {f"site{i}": SigningKey.generate() for i in range(n)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weak thresholds are allowed in property tests
        params = SecAggParams(
            job_id=job_id,
            round=round,
            roster={s: k.verify_key for s, k in identities.items()},
            threshold=t,
            shapes=shapes,
            quantization=QuantizationConfig(bound=bound, num_sites=n, frac_bits=16),
        )
    return params, identities


def _make_inputs(params: SecAggParams, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {s: [rng.uniform(-1, 1, size=shape) for shape in params.shapes] for s in params.sites}


@pytest.fixture
def make_params():
    """Factory: ``make_params(n, t, shapes=..., round=..., bound=...) -> (params, identities)``."""
    return _make_params


@pytest.fixture
def make_inputs():
    """Factory: ``make_inputs(params, seed=0) -> {site: [arrays]}`` uniform in [-1, 1]."""
    return _make_inputs


@pytest.fixture
def five_sites():
    """n=5, t=3: (params, identities, inputs)."""
    params, identities = _make_params(5, 3)
    return params, identities, _make_inputs(params)
