"""The launch's warning about declared ranges far wider than the data, with transforms."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedmtl.datasites.data.records import range_warnings
from fedmtl.schema import Schema


def _schema(**lab) -> Schema:
    return Schema.from_dict({"columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "lab", "role": "feature", "type": "numeric", "min": 0, "max": 6000, **lab},
        {"name": "y", "role": "label", "type": "binary"},
    ]})


def _skewed(n: int = 500) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"id": np.arange(n), "lab": np.exp(rng.normal(3.0, 0.6, n)).round(1),
                         "y": rng.integers(0, 2, n)})


def test_a_wide_range_on_skewed_data_warns_for_both_scalings_and_suggests_log1p():
    # Prepare: a lab value with median about 20 declared 0..6000
    df = _skewed()
    # Execute
    (msg,) = range_warnings(df, _schema())
    # Assert
    assert "'lab'" in msg and "[0, 6000]" in msg and "far wider than the data" in msg
    assert "scaling = 'standard'" in msg and "noise of the released feature statistics" in msg
    assert 'transform = "log1p"' in msg and "right-skewed" in msg


def test_the_transform_is_taken_into_account():
    # after log1p the same range covers the data well: no warning
    assert range_warnings(_skewed(), _schema(transform="log1p")) == []
    # a range wide even after log1p still warns, naming the transform (and suggests no other)
    tiny = pd.DataFrame({"id": [1, 2, 3], "lab": [0.0, 0.01, 0.02], "y": [0, 1, 0]})
    (msg,) = range_warnings(tiny, _schema(transform="log1p"))
    assert "after log1p" in msg and "right-skewed" not in msg
