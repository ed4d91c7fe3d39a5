"""Task specs, the trunk registry and the multi-task network."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedmtl.models import (
    MultiTaskNet,
    TaskSpec,
    build_model,
    build_trunk,
    model_from_config,
    model_to_vector,
    register_trunk,
    tasks_from_schema,
    trunk_names,
)

TASKS = [
    TaskSpec("diabetes", "binary", "diabetes"),
    TaskSpec("stage", "multiclass", "stage", classes=("F0", "F1", "F2"), weight=0.5),
    TaskSpec("alt", "regression", "alt"),
]


def test_tasks_from_schema_maps_label_types(schema):
    # Execute
    tasks = tasks_from_schema(schema, weights={"alt": 0.2})
    # Assert
    assert [(t.name, t.kind, t.out_dim, t.weight) for t in tasks] == [
        ("diabetes", "binary", 1, 1.0),
        ("stage", "multiclass", 3, 1.0),
        ("alt", "regression", 1, 0.2),
    ]
    assert tasks[1].classes == ("F0", "F1", "F2")


def test_tasks_from_schema_rejects_non_label_columns(schema):
    with pytest.raises(ValueError, match=r"\['age'\] are not label columns"):
        tasks_from_schema(schema, labels=["age"])
    with pytest.raises(ValueError, match="not among the tasks"):
        tasks_from_schema(schema, labels=["diabetes"], weights={"alt": 1.0})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "a.b", "kind": "binary", "label": "x"}, "identifier"),
        ({"name": "a", "kind": "ordinal", "label": "x"}, "kind 'ordinal'"),
        ({"name": "a", "kind": "multiclass", "label": "x", "classes": ("only",)}, "at least 2 classes"),
        ({"name": "a", "kind": "binary", "label": "x", "classes": ("p", "q")}, "only apply to multiclass"),
        ({"name": "a", "kind": "binary", "label": "x", "weight": -1.0}, "weight"),
    ],
)
def test_invalid_task_specs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskSpec(**kwargs)


def test_task_spec_roundtrips_through_dict():
    for t in TASKS:
        assert TaskSpec.from_dict(t.to_dict()) == t


def test_model_has_one_head_per_task_with_right_widths():
    # Prepare
    model = build_model(n_features=7, tasks=TASKS, widths=[16, 8], dropout=0.0, seed=0)
    # Execute
    out = model(torch.randn(5, 7))
    # Assert
    assert {k: tuple(v.shape) for k, v in out.items()} == {"diabetes": (5, 1), "stage": (5, 3), "alt": (5, 1)}
    assert isinstance(model, MultiTaskNet)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_model_is_opacus_compatible():
    # Prepare
    model = build_model(n_features=7, tasks=TASKS, seed=0)
    # Execute
    errors = ModuleValidator.validate(model, strict=False)
    # Assert
    assert errors == []


def test_seeded_models_are_identical_and_do_not_touch_global_rng():
    # Prepare
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    # Execute
    a = build_model(n_features=7, tasks=TASKS, seed=42)
    after = torch.rand(1)
    b = model_from_config(a.config)
    c = build_model(n_features=7, tasks=TASKS, seed=43)
    # Assert
    assert (model_to_vector(a) == model_to_vector(b)).all()
    assert not (model_to_vector(a) == model_to_vector(c)).all()
    assert torch.equal(before, after)


def test_predict_gives_probabilities_and_values():
    # Prepare
    model = build_model(n_features=4, tasks=TASKS, seed=0)
    # Execute
    p = model.predict(torch.randn(6, 4))
    # Assert
    assert p["diabetes"].shape == (6,) and ((p["diabetes"] > 0) & (p["diabetes"] < 1)).all()
    assert p["stage"].shape == (6, 3) and abs(p["stage"].sum(axis=1) - 1).max() < 1e-5
    assert p["alt"].shape == (6,)
    assert model.training  # predict restores the mode


def test_unknown_trunk_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown trunk 'resnet'.*\['mlp'"):
        build_model(n_features=4, tasks=TASKS, trunk="resnet")


def test_registry_accepts_a_new_trunk_and_refuses_duplicates():
    # Prepare
    class Tiny(nn.Module):
        def __init__(self, in_features: int, *, width: int = 3):
            super().__init__()
            self.lin = nn.Linear(in_features, width)
            self.out_features = width

        def forward(self, x):
            return torch.tanh(self.lin(x))

    from fedmtl.models.nets import _TRUNKS

    register_trunk("tiny_test")(Tiny)
    try:
        # Execute
        model = build_model(n_features=4, tasks=TASKS[:1], trunk="tiny_test", width=5)
        # Assert
        assert "tiny_test" in trunk_names()
        assert model(torch.randn(2, 4))["diabetes"].shape == (2, 1)
        with pytest.raises(ValueError, match="already registered"):
            register_trunk("tiny_test")(lambda n: Tiny(n))
    finally:
        _TRUNKS.pop("tiny_test", None)


@pytest.mark.parametrize(
    "options, match",
    [({"widths": []}, "widths"), ({"dropout": 1.0}, "dropout"), ({"activation": "swish"}, "activation")],
)
def test_mlp_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        build_trunk("mlp", 4, **options)


def test_duplicate_task_names_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        build_model(n_features=3, tasks=[TASKS[0], TASKS[0]])


def test_regression_task_is_trained_on_its_scale_and_predicted_in_label_units(schema):
    # Prepare
    alt = tasks_from_schema(schema, labels=["alt"])[0]
    model = build_model(n_features=3, tasks=[alt], dropout=0.0, seed=0)
    x = torch.randn(4, 3)
    # Execute
    raw = model(x)["alt"][:, 0].detach().numpy()
    pred = model.predict(x)["alt"]
    # Assert: schema range [0, 60] -> shift 30, scale 30
    assert (alt.shift, alt.scale) == (30.0, 30.0)
    assert abs(pred - (raw * 30 + 30)).max() < 1e-4
    assert TaskSpec.from_dict(alt.to_dict()) == alt


def test_shift_and_scale_only_for_regression_and_scale_positive():
    with pytest.raises(ValueError, match="only apply to regression"):
        TaskSpec("a", "binary", "a", scale=2.0)
    with pytest.raises(ValueError, match="scale must be"):
        TaskSpec("r", "regression", "r", scale=0.0)
