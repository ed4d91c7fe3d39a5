"""Attack class 8 — an outcome oracle: "whether a record-reading stage succeeds, and the
fields and sizes of its reply, depend only on the approved spec and the researcher's
message" (DESIGN.md, "No bit outside the mechanisms").

The researcher chooses the weights a pass runs with. Weights that overflow float32 only
for a patient older than T make that patient's prediction (or gradient) NaN; a datasite
that then answers ``ok=False`` (or replies with other fields) tells the researcher, outside
every mechanism, whether such a patient is in its records.

Three datasites of our own (the default policy, the owners pinning each other) hold the
same records except one: ``twin-b`` has one test-split patient aged 99, ``twin-c`` one
training-split patient aged 99, ``twin-a`` neither (everybody else is at most 80). One
approved job (standard scaling: a statistics pass, a training pass, the final evaluation)
runs every pass with weights crafted from the model's first layer so that only an age
above 90 overflows; the replies of every stage must have the same status and the same
shape at the three sites. The issue's original attack (weights up to about 1e38) and
weights just over ``limits.max_abs_weight`` must be refused identically at every site
before anything is charged; weights at the cap run.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import pytest
import security_kit as K
import torch

from fedmtl.datasites.server.launch import free_port, launch
from fedmtl.errors import JobError

pytestmark = pytest.mark.integration

TWINS = ("twin-a", "twin-b", "twin-c")  # names of equal length: replies carry them
OLD_AGE, CUT_AGE, MAX_AGE = 99.0, 90.0, 80.0
TASK = "diabetes_5y"
DEFAULT_CAP = 1000.0  # limits.max_abs_weight of the default policy
#: 8 layers of 256 without layer norm: each layer can multiply by cap * 256, enough to
#: reach inf (not only a huge logit: a fused multiply-add turns inf - huge into inf, while
#: inf * +cap + inf * -cap in the head is NaN) from the slope the first layer may have
WIDTH = 256


# ----------------------------------------------------------------------------- the twins


def _twin_records(src: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """600 patients aged <= 80; twin-b/-c with one labelled test/train patient made 99."""
    base = src[(src["age"] <= MAX_AGE)].sample(n=600, random_state=0).sort_values("id").reset_index(drop=True)
    out = {"twin-a": base}
    for name, split in (("twin-b", "test"), ("twin-c", "train")):
        df = base.copy()
        i = df.index[(df["split"] == split) & df[TASK].notna()][0]
        df.loc[i, "age"] = OLD_AGE
        out[name] = df
    return out


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Three datasites launched as ``fedmtl datasite launch`` does, differing in one record."""
    from fedmtl.datasites.data.cohort import prepare
    from fedmtl.datasites.server.peers import pin_federation

    cohort = tmp_path_factory.mktemp("oracle-cohort")
    src = prepare(cohort, sites=3, seed=0)[1]
    records = _twin_records(pd.read_csv(src.records))
    homes = tmp_path_factory.mktemp("oracle-homes")
    handles = []
    try:
        for name, df in records.items():
            path = cohort / f"{name}.csv"
            df.to_csv(path, index=False)
            handles.append(launch(home=homes / name, name=name, records=path, schema=src.schema, port=free_port()))
        pin_federation([h.home for h in handles])
        fed = K.Federation(handles, tmp_path_factory.mktemp("oracle-jobs"))
        fed.records = records
        yield fed
    finally:
        for h in handles:
            h.stop()


# ----------------------------------------------------------------------------- the weights


def _age_index(site_spec: dict) -> int:
    from fedmtl.models.preprocessing import Preprocessor

    pre = Preprocessor(K.protocol().schema_of(site_spec))
    return pre.feature_names.index("age")


def _cut(scaling: dict | None) -> float:
    """The model's input value of age ``CUT_AGE`` under the pass's scaling."""
    if scaling is None:  # the statistics pass: the weights are never applied to a record
        return 2.0
    return (CUT_AGE - float(scaling["mean"]["age"])) / float(scaling["std"]["age"])


def _crafted(model, age: int, cut: float, *, cap: float = DEFAULT_CAP, original: bool = False) -> np.ndarray:
    """Weights whose prediction for an input ``x[age] > cut`` is NaN and exactly the bias
    (0) for every other record.

    ``original=False`` (every |weight| <= ``cap``): layer 1 gives ``relu(a (x - cut))``,
    zero below the cut; each further layer multiplies by ``cap * width`` until it is inf;
    the head adds ``+cap`` and ``-cap`` times it, which is ``inf - inf`` above the cut.
    ``original=True`` (the issue's attack, |weight| up to 1e38): layer 1 itself overflows
    above the cut, later layers pass ``inf`` on and shrink everything finite."""
    from fedmtl.models import model_to_vector

    m = copy.deepcopy(model)
    linears = [mod for mod in m.trunk if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        first = linears[0]
        if original:
            big = 1e38
            first.weight[:, age] = big
            first.bias[:] = min(3.4e38 - big * cut, 3.4e38)
            later = 1e-3
        else:
            a = cap / max(1.0, abs(cut))
            first.weight[:, age] = a
            first.bias[:] = -a * cut
            later = cap
        for lin in linears[1:]:
            lin.weight.fill_(later)
        for head in m.heads.values():
            half = head.weight.shape[1] // 2
            head.weight[:, :half] = later
            head.weight[:, half:] = -later
    return model_to_vector(m).astype(np.float32)


# ----------------------------------------------------------------------------- the replies


def _shape(x: Any) -> Any:
    """What a reply looks like, without its values: keys, lengths, array shapes/dtypes."""
    if isinstance(x, dict):  # keyed by peer site names in places: the names are not the shape
        return sorted(([_anonymous(k), _shape(v)] for k, v in x.items()), key=repr)
    if isinstance(x, (list, tuple)):
        return [type(x).__name__, [_shape(v) for v in x]]
    if isinstance(x, np.ndarray):
        return ["ndarray", str(x.dtype), list(x.shape)]
    if isinstance(x, (bytes, bytearray)):
        return ["bytes", len(x)]
    if isinstance(x, str):
        return ["str", len(x)]
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, (int, float, np.integer, np.floating)):
        return "number"
    return type(x).__name__


def _anonymous(key: Any) -> str:
    return "<site>" if str(key) in TWINS else str(key)


def _blank(x: Any) -> Any:
    """The reply with every value made neutral (same types, shapes, lengths)."""
    if isinstance(x, dict):
        return {(str(k) if str(k) not in TWINS else f"site-{i}"): _blank(v) for i, (k, v) in enumerate(x.items())}
    if isinstance(x, (list, tuple)):
        return [_blank(v) for v in x]
    if isinstance(x, np.ndarray):
        return np.zeros(x.shape, dtype=x.dtype)
    if isinstance(x, (bytes, bytearray)):
        return bytes(len(x))
    if isinstance(x, str):
        return "x" * len(x)
    if isinstance(x, (bool, type(None))):
        return x
    if isinstance(x, (int, float, np.integer, np.floating)):
        return 0
    return type(x).__name__


def _size(reply: dict) -> int:
    from fedmtl.contract import wire

    return len(wire.encode(_blank(reply)))


class Recorder:
    """A transport that keeps every reply, by (stage, site)."""

    def __init__(self, inner):
        self.inner = inner
        self.replies: dict[tuple[str, str], dict] = {}

    def call(self, site: str, message: dict) -> dict:
        reply = self.inner.call(site, message)
        self.replies[(str(message.get("stage")), site)] = reply
        return reply


def _assert_same_outcome(replies: dict[str, dict], what: str) -> None:
    """The replies of one stage at the three twins: same status, same error text, same
    report, same shape and encoded size."""
    oks = {s: r.get("ok") for s, r in replies.items()}
    assert len(set(oks.values())) == 1, (
        f"ATTACK SUCCEEDED ({what}): the status differs between datasites that differ in one record: "
        f"{ {s: (r.get('ok'), r.get('error')) for s, r in replies.items()} }"
    )
    errors = {s: r.get("error") for s, r in replies.items()}
    assert len(set(errors.values())) == 1, f"ATTACK SUCCEEDED ({what}): the errors differ: {errors}"
    reports = {s: r.get("report") for s, r in replies.items()}
    assert all(v == reports[TWINS[0]] for v in reports.values()), f"({what}): the reports differ: {reports}"
    shapes = {s: _shape(r) for s, r in replies.items()}
    assert all(v == shapes[TWINS[0]] for v in shapes.values()), (
        f"ATTACK SUCCEEDED ({what}): the replies' fields or sizes differ: {shapes}"
    )
    sizes = {s: _size(r) for s, r in replies.items()}
    assert len(set(sizes.values())) == 1, f"ATTACK SUCCEEDED ({what}): encoded sizes differ: {sizes}"


def _charges(fed, job_id: str) -> dict[str, int]:
    out = {}
    for name, h in fed.handles.items():
        st = K.site_ledger().open_ledger(h.home).request(job_id)
        out[name] = 0 if st is None else len(st.records)
    return out


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def oracle_run(twins):
    """Every pass of one approved job, each first tried with the issue's weights and with
    weights just over the cap (both must be refused the same way, uncharged), then run
    in full with the crafted weights at the cap. Returns what each stage answered."""
    from fedmtl.contract.passes import run_pass

    email = twins.researcher("oracle")
    spec = K.legit_spec(
        name="oracle", tasks=[{"label": TASK}], rounds=1, local_steps=4, sample_rate=0.5, lr=0.1,
        noise_multiplier=3.0, scaling="standard", eval_noise_multiplier=8.0, stats_noise_multiplier=8.0,
        model={"widths": [WIDTH] * 8, "layer_norm": False, "dropout": 0.0},
    )
    job = twins.job(spec, email=email)
    job.submit()
    status = job.wait_for_review(timeout=K.DECISION_TIMEOUT)
    assert {v["status"] for v in status.values()} == {"approved"}, f"the job was not approved: {status}"
    any_spec = next(iter(job.site_specs.values()))
    model = job.model
    age = _age_index(any_spec)
    out: dict[str, Any] = {"refused": {}, "passes": {}, "charges_before": {}, "charges_after": {}}
    scaling = None
    for p in range(1, K.protocol().last_pass(job.spec) + 1):
        plan = K.protocol().plan(any_spec, p, model=model)
        kind = "statistics" if plan.stats else "training" if plan.train else "evaluation"
        at_cap = _crafted(model, age, _cut(scaling))
        over = at_cap.copy()
        over[int(np.argmax(np.abs(over)))] = np.nextafter(np.float32(DEFAULT_CAP), np.float32(np.inf))
        extra = {} if plan.stats else {"scaling": scaling}
        inner = job.transport()
        out["charges_before"][kind] = _charges(twins, job.job_id)
        tries = (("original", _crafted(model, age, _cut(scaling), original=True)), ("just-over-cap", over))
        for attempt, (label, w) in enumerate(tries):
            # attempts 0, 1 and then 2 for the pass itself: a site that accepted a try
            # (no cap) keeps that payload for the pass, which then differs as the try did
            msg = {"stage": "advertise", "pass": p, "attempt": attempt, "weights": w, **extra}
            out["refused"][(kind, label)] = {s: inner.call(s, copy.deepcopy(msg)) for s in TWINS}
        out["charges_after"][kind] = _charges(twins, job.job_id)
        rec = Recorder(inner)
        try:
            outcome = run_pass(transport=rec, site_specs=job.site_specs, sites=list(TWINS), pass_no=p,
                               attempt=len(tries), weights=at_cap, model=model,
                               scaling=None if plan.stats else scaling)
        except JobError as e:  # the pass aborted: the tests compare what each stage answered
            outcome = e
        out["passes"][kind] = (rec.replies, outcome)
        if kind == "evaluation":
            pre = K.protocol().scaling_preprocessor(any_spec, scaling)
            out["check"] = (at_cap, pre, copy.deepcopy(model), twins.records["twin-a"])
        if isinstance(outcome, JobError):
            continue
        if "stats" in outcome.arrays:
            scaling = K.protocol().derive_scaling(any_spec, outcome.arrays["stats"], n_sites=len(TWINS))
    return out


# ----------------------------------------------------------------------------- the tests

KINDS = ("statistics", "training", "evaluation")


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_weights_at_the_cap_get_the_same_reply_at_every_stage(oracle_run, kind):
    replies, outcome = oracle_run["passes"][kind]
    stages = sorted({st for st, _ in replies})
    assert "advertise" in stages, f"{kind}: stages run: {stages}"
    for stage in stages:
        got = {s: replies[(stage, s)] for s in TWINS if (stage, s) in replies}
        _assert_same_outcome(got, f"{kind} pass, stage {stage}")
        assert set(got) == set(TWINS), f"{kind}/{stage}: only {sorted(got)} were asked ({outcome})"
    assert not isinstance(outcome, JobError), f"({kind}): the pass aborted: {outcome}"
    assert not outcome.dropped, f"ATTACK SUCCEEDED ({kind}): sites dropped out: {outcome.dropped}"
    assert "masked_input" in stages, f"{kind}: stages run: {stages}"
    for name, arr in outcome.arrays.items():
        assert np.isfinite(arr).all(), f"{kind}: the aggregate {name!r} is not finite"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label", ["original", "just-over-cap"])
def test_weights_over_the_cap_are_refused_the_same_way_before_any_charge(oracle_run, kind, label):
    replies = oracle_run["refused"][(kind, label)]
    _assert_same_outcome(replies, f"{kind} pass, {label} weights")
    for s, r in replies.items():
        assert r.get("ok") is False and "max_abs_weight" in str(r.get("error")), (
            f"{s} did not refuse {label} weights by the cap: {r.get('ok')} {r.get('error')}"
        )
    assert oracle_run["charges_after"][kind] == oracle_run["charges_before"][kind], (
        f"refused weights were charged: {oracle_run['charges_before'][kind]} -> {oracle_run['charges_after'][kind]}"
    )


def test_the_crafted_weights_overflow_only_for_the_old_patient(oracle_run):
    """The attack is real: with the evaluation pass's scaling, the weights at the cap give
    a NaN prediction for a patient aged 99 and a finite one for patients aged 20 and 80."""
    from fedmtl.models import vector_to_model

    weights, pre, model, records = oracle_run["check"]
    rows = records.head(3).copy()
    rows["age"] = [20.0, MAX_AGE, OLD_AGE]
    vector_to_model(model, weights)
    pred = model.predict(pre.transform(rows))[TASK]
    assert np.abs(weights).max() <= DEFAULT_CAP
    assert np.isfinite(pred[:2]).all() and np.isnan(pred[2]), pred
