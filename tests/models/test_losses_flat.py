"""Masked multi-task loss and the flat weight vector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmtl.models import (
    TaskSpec,
    build_model,
    masked_multitask_loss,
    model_to_vector,
    parameter_layout,
    slice_mask,
    task_slices,
    vector_size,
    vector_to_model,
)

TASKS = [
    TaskSpec("diabetes", "binary", "diabetes"),
    TaskSpec("stage", "multiclass", "stage", classes=("F0", "F1", "F2"), weight=0.5),
    TaskSpec("alt", "regression", "alt", weight=2.0),
]


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g)
    Y = torch.stack([torch.randint(0, 2, (n,), generator=g).float(), torch.randint(0, 3, (n,), generator=g).float(), torch.randn(n, generator=g)], 1)
    mask = torch.ones(n, 3, dtype=torch.bool)
    return X, Y, mask


def test_loss_matches_hand_computation():
    # Prepare
    model = build_model(n_features=5, tasks=TASKS, dropout=0.0, seed=0)
    X, Y, mask = _batch()
    mask[0, 1] = False
    out = model(X)
    # Execute
    loss = masked_multitask_loss(out, Y, mask, TASKS)
    # Assert
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["diabetes"][:, 0], Y[:, 0], reduction="none")
    ce = torch.nn.functional.cross_entropy(out["stage"], Y[:, 1].long(), reduction="none") * mask[:, 1]
    se = (out["alt"][:, 0] - Y[:, 2]) ** 2
    expected = (bce + 0.5 * ce + 2.0 * se).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unlabelled_sample_contributes_no_gradient_even_with_nan_placeholder():
    # Prepare: sample 0 has no label for 'stage' (and a NaN there); sample 1 has no labels at all
    model = build_model(n_features=5, tasks=TASKS, dropout=0.0, seed=0)
    X, Y, mask = _batch()
    mask[0, 1] = False
    Y[0, 1] = float("nan")
    mask[1, :] = False
    Y[1, :] = float("nan")
    # Execute: per-sample gradients of the summed loss
    grads = []
    for i in range(len(X)):
        model.zero_grad()
        masked_multitask_loss(model(X[i : i + 1]), Y[i : i + 1], mask[i : i + 1], TASKS, reduction="sum").backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # Assert
    assert all(torch.isfinite(g).all() for gi in grads for g in gi.values())
    assert all((g == 0).all() for g in grads[1].values())  # no labels -> zero gradient everywhere
    assert (grads[0]["heads.stage.weight"] == 0).all() and (grads[0]["heads.stage.bias"] == 0).all()
    assert (grads[2]["heads.stage.weight"] != 0).any()


def test_masking_a_task_equals_dropping_it_and_weight_zero_too():
    # Prepare
    model = build_model(n_features=5, tasks=TASKS, dropout=0.0, seed=0)
    X, Y, mask = _batch()
    out = model(X)
    only_two = [TASKS[0], TASKS[2]]
    m = mask.clone()
    m[:, 1] = False
    zero_w = [TASKS[0], TaskSpec("stage", "multiclass", "stage", classes=("F0", "F1", "F2"), weight=0.0), TASKS[2]]
    # Execute
    masked = masked_multitask_loss(out, Y, m, TASKS)
    dropped = masked_multitask_loss(out, Y[:, [0, 2]], mask[:, [0, 2]], only_two)
    weighted0 = masked_multitask_loss(out, Y, mask, zero_w)
    # Assert
    assert masked.item() == pytest.approx(dropped.item(), rel=1e-6)
    assert weighted0.item() == pytest.approx(dropped.item(), rel=1e-6)


def test_per_sample_loss_does_not_depend_on_other_samples():
    # Prepare: DP needs loss_i to be a function of sample i only
    model = build_model(n_features=5, tasks=TASKS, dropout=0.0, seed=0)
    X, Y, mask = _batch(8)
    mask[3:, 0] = False
    # Execute
    full = masked_multitask_loss(model(X), Y, mask, TASKS, reduction="none")
    first = masked_multitask_loss(model(X[:2]), Y[:2], mask[:2], TASKS, reduction="none")
    # Assert
    assert torch.allclose(full[:2], first)


def test_loss_rejects_bad_shapes_and_reduction():
    model = build_model(n_features=5, tasks=TASKS, seed=0)
    X, Y, mask = _batch()
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        masked_multitask_loss(model(X), Y[:, :2], mask[:, :2], TASKS)
    with pytest.raises(ValueError, match="reduction"):
        masked_multitask_loss(model(X), Y, mask, TASKS, reduction="avg")


def test_vector_roundtrip_and_layout_order():
    # Prepare
    a = build_model(n_features=5, tasks=TASKS, widths=[8, 4], seed=1)
    b = build_model(n_features=5, tasks=TASKS, widths=[8, 4], seed=2)
    # Execute
    v = model_to_vector(a)
    vector_to_model(b, v)
    layout = parameter_layout(a)
    # Assert
    assert v.dtype == np.float32 and v.shape == (vector_size(a),) == (a.n_parameters(),)
    assert np.array_equal(model_to_vector(b), v)
    assert [s.name for s in layout] == [n for n, _ in a.named_parameters()]
    assert layout[0].name == "trunk.0.weight" and layout[-1].name == "heads.alt.bias"
    assert all(s.stop - s.start == math.prod(s.shape) for s in layout)
    assert all(x.stop == y.start for x, y in zip(layout, layout[1:])) and layout[-1].stop == v.size
    w = dict(a.named_parameters())["trunk.0.weight"]
    assert np.array_equal(v[layout[0].start : layout[0].stop], w.detach().numpy().reshape(-1))


def test_task_slices_partition_the_vector():
    # Prepare
    model = build_model(n_features=5, tasks=TASKS, widths=[8], seed=1)
    v = model_to_vector(model)
    # Execute
    sl = task_slices(model)
    # Assert
    assert list(sl) == ["trunk", "diabetes", "stage", "alt"]
    covered = np.zeros(v.size, dtype=int)
    for parts in sl.values():
        for s in parts:
            covered[s] += 1
    assert (covered == 1).all()
    head = model.heads["stage"]
    stage_vals = np.concatenate([v[s] for s in sl["stage"]])
    assert np.array_equal(stage_vals, torch.cat([head.weight.reshape(-1), head.bias]).detach().numpy())
    assert slice_mask(model, ["stage"]).sum() == head.weight.numel() + head.bias.numel()


def test_vector_to_model_rejects_wrong_size_nan_and_unknown_part():
    model = build_model(n_features=5, tasks=TASKS, seed=1)
    n = vector_size(model)
    with pytest.raises(ValueError, match=f"{n} values"):
        vector_to_model(model, np.zeros(n + 1, dtype=np.float32))
    bad = np.zeros(n, dtype=np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        vector_to_model(model, bad)
    with pytest.raises(ValueError, match="unknown part"):
        slice_mask(model, ["nope"])


def test_regression_loss_uses_the_task_scale():
    # Prepare
    t = TaskSpec("r", "regression", "r", shift=100.0, scale=10.0)
    out = {"r": torch.tensor([[0.5], [-1.0]])}
    Y = torch.tensor([[105.0], [90.0]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    # Execute
    loss = masked_multitask_loss(out, Y, mask, [t], reduction="none")
    # Assert: (0.5 - 0.5)^2 and (-1 - -1)^2
    assert torch.allclose(loss, torch.zeros(2))
