"""fedmtl.privacy.quantization: headroom bound, unbiased rounding, exact decode of sums,
per-head weighting."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.privacy.quantization import (
    QuantizationConfig,
    average_by_group,
    dequantize_sum,
    quantize,
    weight_by_group,
    weighted_bound,
)


def test_bits_follow_the_documented_headroom_bound():
    # Prepare / Execute
    small = QuantizationConfig(bound=1.0, num_sites=3, frac_bits=16)
    big = QuantizationConfig(bound=1e5, num_sites=20, frac_bits=16)
    # Assert: n * (bound * 2^f + 1) < 2^(k-1)
    for cfg in (small, big):
        assert cfg.num_sites * (cfg.bound * cfg.scale + 1) < 2 ** (cfg.bits - 1)
    assert small.bits == 32 and small.dtype == np.uint32
    assert big.bits == 64 and big.dtype == np.uint64


def test_config_too_large_for_64_bits_refused():
    with pytest.raises(ValueError, match="more than 64"):
        QuantizationConfig(bound=1e12, num_sites=100, frac_bits=40)


@pytest.mark.parametrize("bad", [dict(bound=0.0), dict(bound=float("inf")), dict(num_sites=0), dict(frac_bits=-1)])
def test_config_rejects_bad_values(bad):
    kwargs = dict(bound=1.0, num_sites=3, frac_bits=16) | bad
    with pytest.raises(ValueError):
        QuantizationConfig(**kwargs)


def test_sum_of_extreme_values_decodes_without_wraparound():
    # Prepare: every site at +bound, then every site at -bound (the worst cases)
    cfg = QuantizationConfig(bound=3.0, num_sites=7, frac_bits=20)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        parts = [quantize(np.full(10, sign * 3.0), cfg, rng=rng) for _ in range(7)]
        # Execute
        total = np.zeros(10, dtype=cfg.dtype)
        for p in parts:
            total += p
        # Assert
        np.testing.assert_allclose(dequantize_sum(total, cfg), sign * 21.0, atol=7 / cfg.scale)


def test_values_beyond_bound_are_clipped():
    cfg = QuantizationConfig(bound=1.0, num_sites=1, frac_bits=8)
    q = quantize(np.array([5.0, -5.0, 0.5]), cfg, rng=np.random.default_rng(0))
    np.testing.assert_allclose(dequantize_sum(q, cfg), [1.0, -1.0, 0.5])


def test_stochastic_rounding_is_unbiased():
    # Prepare: 0.3 / 2^-2 = 1.2 quanta; deterministic rounding would give 0.25 always
    cfg = QuantizationConfig(bound=1.0, num_sites=1, frac_bits=2)
    # Execute
    q = dequantize_sum(quantize(np.full(200_000, 0.3), cfg, rng=np.random.default_rng(1)), cfg)
    # Assert
    assert set(np.unique(q)) == {0.25, 0.5}
    assert abs(q.mean() - 0.3) < 0.002


def test_quantize_rejects_nan_and_wrong_dtype_on_decode():
    cfg = QuantizationConfig(bound=1.0, num_sites=2)
    with pytest.raises(ValueError):
        quantize(np.array([np.nan]), cfg)
    with pytest.raises(TypeError):
        dequantize_sum(np.zeros(3, dtype=np.int64), cfg)


def test_weighted_per_head_average_equals_weighted_fedavg():
    # Prepare: vector = trunk[0:4] + headA[4:6] + headB[6:9]; site 2 has no labels for B
    groups = {"trunk": [slice(0, 4)], "A": [slice(4, 6)], "B": [slice(6, 9)]}
    u1, u2 = np.linspace(-1, 1, 9), np.linspace(0.5, -0.5, 9)
    c1 = {"trunk": 10, "A": 4, "B": 6}
    c2 = {"trunk": 30, "A": 12, "B": 0}
    # Execute
    w1, n1 = weight_by_group(u1, groups=groups, counts=c1, clip=2.0)
    w2, n2 = weight_by_group(u2, groups=groups, counts=c2, clip=2.0)
    avg, totals = average_by_group(w1 + w2, n1 + n2, groups=groups)
    # Assert
    np.testing.assert_allclose(avg[0:4], (10 * u1[0:4] + 30 * u2[0:4]) / 40)
    np.testing.assert_allclose(avg[4:6], (4 * u1[4:6] + 12 * u2[4:6]) / 16)
    np.testing.assert_allclose(avg[6:9], u1[6:9])  # only site 1 touched head B
    assert totals == {"A": 16.0, "B": 6.0, "trunk": 40.0}


def test_weighted_bound_covers_counts_and_weighted_values():
    assert weighted_bound(clip=0.1, max_count=1000) == 1000.0
    assert weighted_bound(clip=5.0, max_count=10) == 50.0


def test_groups_must_partition_the_vector():
    with pytest.raises(ValueError, match="exactly once"):
        weight_by_group(np.zeros(5), groups={"a": [slice(0, 3)]}, counts={"a": 1}, clip=1.0)
    with pytest.raises(ValueError, match="exactly once"):
        weight_by_group(
            np.zeros(4), groups={"a": [slice(0, 3)], "b": [slice(2, 4)]}, counts={"a": 1, "b": 1}, clip=1.0
        )
    with pytest.raises(ValueError, match="must match"):
        weight_by_group(np.zeros(3), groups={"a": [slice(0, 3)]}, counts={"b": 1}, clip=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        weight_by_group(np.zeros(3), groups={"a": [slice(0, 3)]}, counts={"a": -1}, clip=1.0)
