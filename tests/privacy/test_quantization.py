"""fedmtl.privacy.quantization: headroom bound, unbiased rounding, exact decode of sums,
per-head weighting."""

from __future__ import annotations

import numpy as np
import pytest

import fedmtl.privacy.quantization as quantization
from fedmtl.privacy.quantization import (
    QuantizationConfig,
    average_by_group,
    dequantize_sum,
    quantize,
    quantize_into,
    weight_by_group,
    weighted_bound,
)

CHUNK = quantization._CHUNK


def _reference_quantize(values, config, rng):
    """The previous implementation (full-length temporaries, rng.random for the noise)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    scaled = np.clip(x, -config.bound, config.bound) * config.scale
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    return q.astype(np.int64).astype(config.dtype)


def _signed(q, cfg):
    return q.view(np.int32 if cfg.bits == 32 else np.int64)


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


# --------------------------------------------------------------- keystream quantiser


@pytest.mark.parametrize(
    "frac", [1e-3, 0.1, 1 / 3, 0.5, 0.9, 1 - 1e-3], ids=lambda f: f"frac={f:.3g}"
)
def test_keystream_rounding_is_unbiased_between_grid_points(frac):
    # Prepare: values `frac` of a quantum above a grid point, both signs, off the origin;
    # frac_bits=3 makes a quantum 1/8 so every value lies strictly between two grid points
    cfg = QuantizationConfig(bound=4.0, num_sites=1, frac_bits=3)
    draws = 200_000
    grid = np.array([-3.0, -0.5, 0.0, 1.25, 2.875])
    x = grid + frac / cfg.scale
    values = np.repeat(x, draws)
    # Execute: default randomness (AES-CTR keystream), several chunks
    q = _signed(quantize(values, cfg), cfg).reshape(len(x), draws)
    # Assert: only the two neighbouring grid points occur ...
    low = np.floor(x * cfg.scale)
    assert np.all((q == low[:, None]) | (q == low[:, None] + 1))
    # ... and the mean decodes to x within 5 standard errors (Bernoulli(frac) per draw)
    mean = q.mean(axis=1) / cfg.scale
    stderr = np.sqrt(frac * (1 - frac) / draws) / cfg.scale
    assert np.all(np.abs(mean - x) < 5 * stderr), (mean - x) / stderr


def test_keystream_rounding_probability_follows_the_fraction_per_element():
    # Prepare: a fine sweep of fractions in one call (every value a different position)
    cfg = QuantizationConfig(bound=1.0, num_sites=1, frac_bits=0)
    fracs = np.linspace(0.0, 1.0, 64, endpoint=False)
    draws = 20_000
    # Execute
    ups = _signed(quantize(np.tile(fracs, draws), cfg), cfg).reshape(draws, len(fracs)).mean(axis=0)
    # Assert: P(round up) == frac (exactly 0 on the grid), within 5 standard errors
    stderr = np.sqrt(fracs * (1 - fracs) / draws)
    assert ups[0] == 0.0
    assert np.all(np.abs(ups - fracs) <= 5 * stderr + 1e-12)


def test_rounding_direction_is_decided_by_the_keystream(monkeypatch):
    # Prepare: replace the keystream by constant bytes: r = 0 rounds every fraction up,
    # r = 2^32 - 1 rounds every fraction < 1 - 2^-32 down
    cfg = QuantizationConfig(bound=2.0, num_sites=1, frac_bits=4)
    x = np.array([-1.99, -0.03, 0.0, 0.01, 0.5, 1.2345, 1.9999])
    calls = []

    def constant(byte):
        def keystream(seed, nbytes):
            calls.append(seed)
            return bytes([byte]) * nbytes

        return keystream

    # Execute / Assert
    monkeypatch.setattr(quantization, "keystream", constant(0x00))
    np.testing.assert_array_equal(_signed(quantize(x, cfg), cfg), np.ceil(x * cfg.scale))
    monkeypatch.setattr(quantization, "keystream", constant(0xFF))
    np.testing.assert_array_equal(_signed(quantize(x, cfg), cfg), np.floor(x * cfg.scale))
    assert len(calls) == 2 and all(len(seed) == 32 for seed in calls)


def test_each_call_and_each_chunk_uses_a_fresh_key(monkeypatch):
    # Prepare
    cfg = QuantizationConfig(bound=1.0, num_sites=2, frac_bits=8)
    real = quantization.keystream
    seeds = []

    def spy(seed, nbytes):
        seeds.append(seed)
        return real(seed, nbytes)

    monkeypatch.setattr(quantization, "keystream", spy)
    x = np.full(2 * CHUNK + 5, 0.5 / cfg.scale)  # half a quantum: a fair coin per value
    # Execute
    a, b = quantize(x, cfg), quantize(x, cfg)
    # Assert: 3 chunks per call, 6 distinct keys; the two encodings differ
    assert len(seeds) == 6 and len(set(seeds)) == 6
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bound,frac_bits,n", [(1.0, 16, 10), (3.0, 20, 7), (1e5, 16, 20), (0.3, 2, 3)])
def test_keystream_quantiser_keeps_clipping_overflow_and_round_trip(bound, frac_bits, n):
    # Prepare: in-range values, values far beyond the bound, +-inf-free extremes, both rings
    cfg = QuantizationConfig(bound=bound, num_sites=n, frac_bits=frac_bits)
    rng = np.random.default_rng(7)
    inside = rng.uniform(-bound, bound, CHUNK + 123)
    outside = np.array([bound * 10, -bound * 10, 1e300, -1e300, np.finfo(np.float64).max])
    x = np.concatenate([inside, outside])
    # Execute
    q = quantize(x, cfg)
    # Assert: the ring dtype, |q| <= bound * 2^f + 1 (the headroom bound), and a round trip
    # within one quantum of the clipped value
    assert q.dtype == cfg.dtype and q.shape == x.shape
    assert np.abs(_signed(q, cfg).astype(np.float64)).max() <= bound * cfg.scale + 1
    np.testing.assert_allclose(
        dequantize_sum(q, cfg), np.clip(x, -bound, bound), rtol=0, atol=1 / cfg.scale
    )
    # the worst case sum of n sites at +-bound decodes without wrap-around
    for sign in (1.0, -1.0):
        total = np.zeros(4, dtype=cfg.dtype)
        for _ in range(n):
            total += quantize(np.full(4, sign * bound * 5), cfg)
        np.testing.assert_allclose(dequantize_sum(total, cfg), sign * n * bound, rtol=0, atol=n / cfg.scale)


def test_clipped_off_grid_bound_is_still_rounded_without_bias():
    # Prepare: bound 0.3 is 1.2 quanta at frac_bits=2: clipped values round to 0.25 / 0.5
    cfg = QuantizationConfig(bound=0.3, num_sites=1, frac_bits=2)
    # Execute
    q = dequantize_sum(quantize(np.full(200_000, 7.0), cfg), cfg)
    # Assert: mean 0.3 within 5 standard errors (up with probability 0.2 per value)
    assert set(np.unique(q)) == {0.25, 0.5}
    assert abs(q.mean() - 0.3) < 5 * np.sqrt(0.2 * 0.8 / 200_000) / cfg.scale


def test_with_a_generator_the_encoding_is_bit_identical_to_the_reference():
    # Prepare: edge values (grid points, halves, negatives, clipping, huge, tiny, -0.0),
    # random values over several chunks, float32 and float64 input, both rings
    edge = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1e300, -1e300, 1e-300, -1e-300, 0.1, -0.1])
    rand = np.random.default_rng(3).uniform(-1.5, 1.5, 2 * CHUNK + 17)
    for cfg in (QuantizationConfig(1.0, 10, 16), QuantizationConfig(1e5, 20, 16), QuantizationConfig(0.3, 3, 2)):
        for x in (np.concatenate([edge, rand]), rand.astype(np.float32), rand.reshape(-1, 7)[:100]):
            # Execute
            got = quantize(x, cfg, rng=np.random.default_rng(11))
            want = _reference_quantize(x, cfg, np.random.default_rng(11))
            # Assert
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


def test_quantize_leaves_its_input_alone_and_handles_empty_and_shapes():
    cfg = QuantizationConfig(bound=1.0, num_sites=2, frac_bits=8)
    x = np.linspace(-2, 2, 1001).reshape(7, 143)
    before = x.copy()
    q = quantize(x, cfg)
    np.testing.assert_array_equal(x, before)
    assert q.shape == (1001,)
    assert quantize(np.zeros(0), cfg).shape == (0,)
    np.testing.assert_allclose(dequantize_sum(quantize([0.25, -0.5, 3], cfg), cfg), [0.25, -0.5, 1.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_anywhere_is_refused(bad):
    cfg = QuantizationConfig(bound=1.0, num_sites=2)
    for pos in (0, CHUNK - 1, CHUNK + 3):
        x = np.zeros(CHUNK + 10)
        x[pos] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            quantize(x, cfg)


@pytest.mark.parametrize("bound", [1.0, 1e5])  # 32- and 64-bit rings
def test_quantize_into_may_reuse_the_input_buffer(bound):
    # Prepare: the secure-aggregation call site's pattern: a float64 vector it owns, the
    # encoding written into the start of the same memory
    cfg = QuantizationConfig(bound=bound, num_sites=4, frac_bits=16)
    x = np.random.default_rng(5).uniform(-bound, bound, 3 * CHUNK + 11)
    work = x.copy()
    # Execute
    out = quantize_into(work, cfg, work.view(cfg.dtype)[: work.size], rng=np.random.default_rng(2))
    # Assert: identical to quantising a separate copy with the same randomness
    assert np.shares_memory(out, work)
    np.testing.assert_array_equal(out, quantize(x, cfg, rng=np.random.default_rng(2)))


def test_quantize_into_refuses_bad_outputs():
    cfg = QuantizationConfig(bound=1.0, num_sites=2, frac_bits=8)
    x = np.zeros(16)
    with pytest.raises(ValueError, match="shape"):
        quantize_into(x, cfg, np.empty(15, dtype=cfg.dtype))
    with pytest.raises(ValueError, match="uint32"):
        quantize_into(x, cfg, np.empty(16, dtype=np.uint64))
    with pytest.raises(ValueError, match="contiguous"):
        quantize_into(x, cfg, np.empty(32, dtype=cfg.dtype)[::2])
    with pytest.raises(ValueError, match="overlaps"):  # shifted: would overwrite unread input
        quantize_into(x, cfg, x.view(cfg.dtype)[1:17])
