"""Strategies: the pure aggregation math against hand computations, the client half
(configure_fit, the shared and personal masks) and the registry the job spec asks."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.contract.strategies import (
    STRATEGY_NAMES,
    FedAdam,
    FedAvg,
    FedPer,
    FedProx,
    adam_step,
    groups_of_layout,
    make_strategy,
    strategy_defaults,
    strategy_problems,
    touched_mask,
    weighted_average,
)
from fedmtl.models import TaskSpec, build_model, parameter_layout, task_slices

# a 10-entry vector: trunk [0:4], head "a" [4:7], head "b" [7:10]
GROUPS = {"trunk": [slice(0, 4)], "a": [slice(4, 7)], "b": [slice(7, 10)]}


def _tiny_model():
    tasks = [TaskSpec(name="a", kind="binary", label="a"), TaskSpec(name="b", kind="regression", label="b")]
    return build_model(n_features=3, tasks=tasks, widths=[4], seed=0)


def test_weighted_average_matches_hand_computation():
    # Prepare
    u1, u2 = np.arange(10, dtype=float), -np.ones(10)
    c1 = {"trunk": 3, "a": 1, "b": 0}
    c2 = {"trunk": 1, "a": 3, "b": 2}
    # Execute
    avg, totals = weighted_average([u1, u2], [c1, c2], groups=GROUPS)
    # Assert
    expected = np.empty(10)
    expected[0:4] = (3 * u1[0:4] + 1 * u2[0:4]) / 4
    expected[4:7] = (1 * u1[4:7] + 3 * u2[4:7]) / 4
    expected[7:10] = u2[7:10]  # site 1 holds no labels for b: only site 2 counts
    np.testing.assert_allclose(avg, expected)
    assert totals == {"trunk": 4.0, "a": 4.0, "b": 2.0}


def test_weighted_average_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one counts mapping per update"):
        weighted_average([np.zeros(10)], [], groups=GROUPS)
    with pytest.raises(ValueError, match="name"):
        weighted_average([np.zeros(10)], [{"trunk": 1}], groups=GROUPS)
    with pytest.raises(ValueError, match="exactly once"):
        weighted_average([np.zeros(10)], [{"trunk": 1}], groups={"trunk": [slice(0, 4)]})


def test_fedavg_applies_weighted_average_per_head():
    # Prepare: two sites' local models; FedAvg with server_lr 1 must give their per-head
    # weighted average
    rng = np.random.default_rng(0)
    x = rng.normal(size=10).astype(np.float32)
    local1, local2 = x + rng.normal(size=10), x + rng.normal(size=10)
    c1, c2 = {"trunk": 10, "a": 4, "b": 6}, {"trunk": 30, "a": 12, "b": 2}
    avg, totals = weighted_average([local1 - x, local2 - x], [c1, c2], groups=GROUPS)
    # Execute
    new = FedAvg().aggregate_fit(x, avg, totals, groups=GROUPS)
    # Assert
    expected = np.empty(10)
    expected[0:4] = (10 * local1[0:4] + 30 * local2[0:4]) / 40
    expected[4:7] = (4 * local1[4:7] + 12 * local2[4:7]) / 16
    expected[7:10] = (6 * local1[7:10] + 2 * local2[7:10]) / 8
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)


def test_head_with_zero_count_is_left_untouched():
    # Prepare: nobody holds labels for "b"; the update there is garbage that must be ignored
    x = np.linspace(-1, 1, 10).astype(np.float32)
    update = np.full(10, 0.5)
    counts = {"trunk": 8.0, "a": 5.0, "b": 0.0}
    for strategy in (FedAvg(), FedProx(mu=0.1), FedAdam(server_lr=0.1), FedPer()):
        # Execute
        new = strategy.aggregate_fit(x, update, counts, groups=GROUPS)
        # Assert
        np.testing.assert_array_equal(new[7:10], x[7:10])
        assert not np.allclose(new[0:4], x[0:4]), strategy.name


def test_server_lr_scales_the_step():
    x = np.zeros(10, dtype=np.float32)
    counts = {"trunk": 1, "a": 1, "b": 1}
    new = FedAvg(server_lr=0.5).aggregate_fit(x, np.ones(10), counts, groups=GROUPS)
    np.testing.assert_allclose(new, 0.5)


def test_non_finite_update_is_refused():
    x = np.zeros(10, dtype=np.float32)
    bad = np.zeros(10)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        FedAvg().aggregate_fit(x, bad, {"trunk": 1, "a": 1, "b": 1}, groups=GROUPS)
    with pytest.raises(ValueError, match="same size"):
        FedAvg().aggregate_fit(x, np.zeros(9), {"trunk": 1, "a": 1, "b": 1}, groups=GROUPS)


def test_fedprox_server_side_is_fedavg_and_hands_mu_to_clients():
    # Prepare
    x = np.zeros(10, dtype=np.float32)
    upd = np.arange(10, dtype=float)
    counts = {"trunk": 2, "a": 1, "b": 1}
    # Execute
    prox, avg = FedProx(mu=0.05), FedAvg()
    # Assert
    np.testing.assert_array_equal(prox.aggregate_fit(x, upd, counts, groups=GROUPS), avg.aggregate_fit(x, upd, counts, groups=GROUPS))
    assert prox.configure_fit() == {"fedprox_mu": 0.05}
    assert avg.configure_fit() == {"fedprox_mu": 0.0}
    with pytest.raises(ValueError, match="mu > 0"):
        FedProx(mu=0.0)


def _manual_adam(x, deltas, *, lr, b1, b2, tau):
    m = np.zeros_like(x, dtype=float)
    v = np.zeros_like(x, dtype=float)
    x = x.astype(float)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        x = x + lr * m / (np.sqrt(v) + tau)
    return x, m, v


def test_fedadam_matches_manual_numpy_for_two_steps():
    # Prepare
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=10).astype(np.float32)
    d1, d2 = rng.normal(size=10), rng.normal(size=10)
    counts = {"trunk": 5, "a": 2, "b": 3}
    s = FedAdam(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)
    # Execute
    x1 = s.aggregate_fit(x0, d1, counts, groups=GROUPS)
    x2 = s.aggregate_fit(x1, d2, counts, groups=GROUPS)
    # Assert
    ex, em, ev = _manual_adam(x0, [d1, d2], lr=0.05, b1=0.8, b2=0.95, tau=1e-2)
    np.testing.assert_allclose(x2, ex, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.state_dict()["m"], em)
    np.testing.assert_allclose(s.state_dict()["v"], ev)


def test_fedadam_state_round_trip_continues_identically():
    # Prepare
    rng = np.random.default_rng(2)
    x = rng.normal(size=10).astype(np.float32)
    deltas = [rng.normal(size=10) for _ in range(3)]
    counts = {"trunk": 1, "a": 1, "b": 1}
    straight = FedAdam()
    xs = x
    for d in deltas:
        xs = straight.aggregate_fit(xs, d, counts, groups=GROUPS)
    # Execute: stop after one step, restore into a fresh strategy, continue
    first = FedAdam()
    xr = first.aggregate_fit(x, deltas[0], counts, groups=GROUPS)
    resumed = FedAdam()
    resumed.load_state_dict(first.state_dict())
    for d in deltas[1:]:
        xr = resumed.aggregate_fit(xr, d, counts, groups=GROUPS)
    # Assert
    np.testing.assert_array_equal(xr, xs)
    assert resumed.rounds_applied == 3


def test_fedadam_zero_count_keeps_moments():
    # Prepare
    x = np.zeros(10, dtype=np.float32)
    s = FedAdam()
    s.aggregate_fit(x, np.ones(10), {"trunk": 1, "a": 1, "b": 1}, groups=GROUPS)
    m_before, v_before = s.m.copy(), s.v.copy()
    # Execute
    s.aggregate_fit(x, np.full(10, 3.0), {"trunk": 1, "a": 0, "b": 1}, groups=GROUPS)
    # Assert
    np.testing.assert_array_equal(s.m[4:7], m_before[4:7])
    np.testing.assert_array_equal(s.v[4:7], v_before[4:7])
    assert not np.array_equal(s.m[0:4], m_before[0:4])


def test_adam_step_pure_function_leaves_inputs_alone():
    x, d = np.zeros(3, dtype=np.float32), np.ones(3)
    m, v = np.zeros(3), np.zeros(3)
    mask = np.array([True, False, True])
    nx, nm, nv = adam_step(x, d, m, v, mask, server_lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
    assert np.all(m == 0) and np.all(v == 0) and np.all(x == 0)
    assert nx[1] == 0 and nm[1] == 0 and nv[1] == 0
    np.testing.assert_allclose(nx[0], 0.1 / (np.sqrt(0.01) + 1e-3))


def test_load_state_dict_refuses_other_strategy_or_bad_moments():
    with pytest.raises(ValueError, match="not 'fedadam'"):
        FedAdam().load_state_dict(FedAvg().state_dict())
    with pytest.raises(ValueError, match="both"):
        FedAdam().load_state_dict({"name": "fedadam", "m": np.zeros(3)})


def test_fedper_aggregates_only_the_trunk_of_a_real_model():
    # Prepare
    net = _tiny_model()
    groups = task_slices(net)
    n = sum(s.stop - s.start for sl in groups.values() for s in sl)
    x = np.zeros(n, dtype=np.float32)
    counts = {g: 10 for g in groups}
    s = FedPer()
    # Execute
    new = s.aggregate_fit(x, np.ones(n), counts, groups=groups)
    mask_from_groups = s.shared_mask(groups)
    mask_from_layout = s.shared_mask(parameter_layout(net))
    # Assert
    np.testing.assert_array_equal(mask_from_groups, mask_from_layout)
    trunk = np.zeros(n, dtype=bool)
    for sl in groups["trunk"]:
        trunk[sl] = True
    np.testing.assert_array_equal(mask_from_groups, trunk)
    np.testing.assert_array_equal(new[~trunk], 0.0)  # heads unchanged
    np.testing.assert_array_equal(new[trunk], 1.0)
    assert FedAvg().shared_mask(groups).all()


def test_groups_of_layout_matches_task_slices():
    net = _tiny_model()
    assert groups_of_layout(parameter_layout(net)) == task_slices(net)


def test_touched_mask_checks_counts():
    m = touched_mask(GROUPS, {"trunk": 1, "a": 0, "b": 2})
    assert m.tolist() == [True] * 4 + [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="no count"):
        touched_mask(GROUPS, {"trunk": 1})


def test_make_strategy_registry():
    # Execute / Assert
    assert set(STRATEGY_NAMES) == {"fedavg", "fedprox", "fedadam", "fedper"}
    assert isinstance(make_strategy("fedavg"), FedAvg)
    assert make_strategy({"name": "fedprox", "mu": 0.2}).configure_fit() == {"fedprox_mu": 0.2}
    adam = make_strategy({"name": "fedadam", "server_lr": 0.3, "beta1": 0.5, "mu": None})
    assert isinstance(adam, FedAdam) and adam.server_lr == 0.3 and adam.beta1 == 0.5
    assert isinstance(make_strategy("fedper"), FedPer)
    with pytest.raises(ValueError, match=r"unknown strategy 'fedsgd'.*fedavg.*fedprox.*fedadam.*fedper"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match="only applies to fedprox"):
        make_strategy({"name": "fedavg", "mu": 0.1})
    with pytest.raises(ValueError, match="server_lr"):
        make_strategy({"name": "fedavg", "server_lr": -1.0})


def test_make_strategy_from_spec_config():
    from fedmtl.contract.jobspec import StrategyConfig

    s = make_strategy(StrategyConfig(name="fedadam"))
    assert isinstance(s, FedAdam) and s.server_lr == 0.1 and s.tau == 1e-3
    p = make_strategy(StrategyConfig(name="fedprox"))
    assert isinstance(p, FedProx) and p.mu == 0.01


# -- the client half ------------------------------------------------------------------------------
def test_personal_mask_is_what_the_strategy_keeps_at_the_site():
    # Prepare
    net = _tiny_model()
    groups = task_slices(net)
    trunk = FedPer().shared_mask(groups)
    # Execute / Assert: FedPer keeps the heads, everything else shares every entry
    np.testing.assert_array_equal(FedPer().personal_mask(groups), ~trunk)
    np.testing.assert_array_equal(FedPer().personal_mask(parameter_layout(net)), ~trunk)
    assert trunk.any() and (~trunk).any()
    for s in (FedAvg(), FedProx(mu=0.1), FedAdam()):
        assert not s.personal_mask(groups).any(), s.name


def test_configure_fit_is_what_the_job_spec_hands_to_local_training():
    # Prepare
    from fedmtl.contract.jobspec import JobSpec

    for strategy, mu in (("fedavg", 0.0), ({"name": "fedprox", "mu": 0.3}, 0.3), ("fedadam", 0.0), ("fedper", 0.0)):
        spec = JobSpec(name="x", tasks=[{"label": "a"}], noise_multiplier=1.0, strategy=strategy)
        # Execute
        client = make_strategy(spec.strategy).configure_fit()
        # Assert
        assert client == {"fedprox_mu": mu}
        assert spec.client_config()["fedprox_mu"] == mu


# -- the registry ---------------------------------------------------------------------------------
def test_registry_holds_the_names_and_defaults_the_job_spec_uses():
    # Prepare
    from fedmtl.contract.jobconfig import StrategyConfig

    # Execute / Assert: the spec's names come from the registry, in the registry's order
    assert STRATEGY_NAMES == ("fedavg", "fedprox", "fedadam", "fedper")
    assert strategy_defaults("fedprox") == {"mu": 0.01, "server_lr": 1.0}
    assert strategy_defaults("fedadam") == {"mu": 0.0, "server_lr": 0.1}
    assert strategy_defaults("fedsgd") == {"mu": 0.0, "server_lr": 1.0}  # the spec reports the name
    for name in STRATEGY_NAMES:
        cfg = StrategyConfig(name=name)
        assert {"mu": cfg.mu, "server_lr": cfg.server_lr} == strategy_defaults(name)
        built = make_strategy(cfg)
        assert type(built).name == name and built.server_lr == cfg.server_lr


def test_strategy_problems_name_the_rule_broken():
    assert strategy_problems("fedprox", mu=0.1) == [] and strategy_problems("fedavg", mu=0.0) == []
    assert strategy_problems("fedprox", mu=0.0) == ["strategy.mu must be > 0 for fedprox (mu = 0 is plain fedavg)"]
    for name in ("fedavg", "fedadam", "fedper", "fedsgd"):
        (problem,) = strategy_problems(name, mu=0.5)
        assert problem.startswith("strategy.mu only applies to fedprox;"), name


def test_make_strategy_refuses_mu_for_every_strategy_without_a_proximal_term():
    for name in ("fedavg", "fedadam", "fedper"):
        with pytest.raises(ValueError, match=f"mu=0.5 only applies to fedprox, not {name}"):
            make_strategy({"name": name, "mu": 0.5})
        assert make_strategy({"name": name, "mu": 0.0}).name == name
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy({"name": ["fedavg"]})
