"""Attack class 4 — spec fields the policy must check: the researcher's spec chooses within
the datasite's schema and policy, and never redefines a column.

Each variant edits one thing in an otherwise legit site spec (the syft ``Constant`` the
reviewer sees) and must be DENIED: a task whose label is the id, split or a feature
column; the spec's schema re-typing a column (the id or split column, or another label,
declared a feature; a type or range changed; a column dropped); a model over the width,
layer or parameter caps; a secure-aggregation clip of 1e6; a clipping mode the policy
does not allow; more evaluation passes than the policy allows; per-site metrics; and the
plain privacy limits (noise below the minimum, sampling rate and local steps above the
maximum).

All variants go to ``riverside`` from the attacker's account in one batch.
"""

from __future__ import annotations

from typing import Callable

import pytest
import security_kit as K

pytestmark = pytest.mark.integration

SITE = "riverside"


def _column(spec: dict, name: str) -> dict:
    return next(c for c in spec["schema"]["columns"] if c["name"] == name)


def _label(col: str) -> Callable[[dict], None]:
    def edit(spec: dict) -> None:
        spec["job"]["tasks"][0]["label"] = col

    return edit


def _as_feature(col: str, **extra) -> Callable[[dict], None]:
    def edit(spec: dict) -> None:
        c = _column(spec, col)
        c["role"] = "feature"
        c.update(extra)

    return edit


def _retype(spec: dict) -> None:
    c = _column(spec, "male")
    c["type"] = "numeric"
    c["min"], c["max"] = 0.0, 1.0


def _range(spec: dict) -> None:
    c = _column(spec, "age")
    c["min"], c["max"] = -1e6, 1e6


def _drop(spec: dict) -> None:
    spec["schema"]["columns"] = [c for c in spec["schema"]["columns"] if c["name"] != "smoker"]


def _job(**values) -> Callable[[dict], None]:
    def edit(spec: dict) -> None:
        spec["job"].update(values)

    return edit


def _model(**values) -> Callable[[dict], None]:
    def edit(spec: dict) -> None:
        spec["job"]["model"].update(values)

    return edit


def _secagg(**values) -> Callable[[dict], None]:
    def edit(spec: dict) -> None:
        spec["job"]["secagg"].update(values)

    return edit


VARIANTS: dict[str, Callable[[dict], None]] = {
    # tasks on columns that are not allowed labels
    "task-label-is-the-id-column": _label("id"),
    "task-label-is-the-split-column": _label("split"),
    "task-label-is-a-feature": _label("age"),
    # the spec's schema redefines columns
    "schema-id-declared-a-feature": _as_feature("id", min=0.0, max=1e6),
    "schema-split-declared-a-feature": _as_feature("split"),
    "schema-label-declared-a-feature": _as_feature("htn_5y"),
    "schema-column-type-changed": _retype,
    "schema-column-range-changed": _range,
    "schema-column-dropped": _drop,
    # the model: width, depth, parameter caps
    "model-width-50000": _model(widths=[50_000]),
    "model-params-over-the-cap": _model(widths=[1024, 1024, 1024, 1024]),
    "model-too-many-layers": _model(widths=[8] * 9),
    # secure aggregation and clipping
    "secagg-clip-1e6": _secagg(clip=1e6),
    "clipping-mode-not-allowed": _job(clipping="none"),
    # releases
    "eval-passes-above-the-policy": _job(rounds=3, eval_every=1),
    "per-site-metrics": _job(per_site_metrics=True),
    # plain privacy limits
    "noise-below-the-minimum": _job(noise_multiplier=0.3),
    "eval-noise-below-the-minimum": _job(eval_noise_multiplier=0.5),
    "sample-rate-above-the-maximum": _job(sample_rate=0.9),
    "local-steps-above-the-maximum": _job(local_steps=6000),
}


@pytest.fixture(scope="module")
def fields_batch(federation):
    base, _ = federation.legit_site_spec(SITE)
    subs = {}
    for i, (label, edit) in enumerate(VARIANTS.items()):
        spec, fn = federation.variant_spec(base, f"f{i:02d}")
        edit(spec)
        subs[label] = federation.forge(label, SITE, spec, fn)
    return K.Batch(federation, subs)


@pytest.mark.parametrize("label", list(VARIANTS))
def test_spec_outside_schema_or_policy_is_denied(fields_batch, federation, label):
    sub, decision = fields_batch.decision(label)
    print(f"{label}: {decision.status}: {decision.reason[:300]}")
    federation.assert_denied(sub, decision, allow_refused=False)
