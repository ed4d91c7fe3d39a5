"""Shared fixtures: a small schema and synthetic records shaped like the demo cohort."""

from __future__ import annotations

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
