"""The round runtime answers a record-reading pass the same way whatever happens inside it:
a release that fails after the charge is replaced by its null release (same keys, shapes,
dtypes, same report), and weights above ``limits.max_abs_weight`` are refused before any
record is read. In process, on the demo cohort, through the real runtime (the integration
test against real datasites is tests/security/test_8_outcome_oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites import runtime as rt


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from fedmtl.datasites.data.cohort import prepare
    from fedmtl.datasites.data.records import load_records
    from fedmtl.schema import Schema

    files = prepare(tmp_path_factory.mktemp("cohort"), sites=3, seed=0)
    schema = Schema.load(files[0].schema)
    return schema, {f.name: load_records(f.records, schema).head(400) for f in files}


def _spec(name: str) -> JobSpec:
    return JobSpec(name=name, tasks=[{"label": "diabetes_5y"}], rounds=1, local_steps=2, sample_rate=0.1,
                   noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0}, scaling="standard", seed=0)


class Recording(rt.LocalTransport):
    def __init__(self, inner: rt.LocalTransport, replies: list):
        super().__init__(inner.data, inner.site_specs)
        self.replies = replies

    def call(self, site, message):
        reply = super().call(site, message)
        payload = None
        if message.get("stage") == "advertise" and reply.get("ok"):
            home = rt.home_for(site)
            spec = self.site_specs[site]
            with np.load(home / "jobs" / spec["job_id"] / "payload.npz") as z:
                payload = {k: (z[k].shape, z[k].dtype, bool(np.isfinite(z[k]).all())) for k in z.files}
        self.replies.append((site, message.get("stage"), message.get("pass"), reply, payload))
        return reply


def _run(cohort, monkeypatch, name: str, *, broken: bool):
    from fedmtl.researcher import simulate as sim

    schema, data = cohort
    replies: list = []
    original = rt.LocalTransport

    def recording(data, site_specs):
        return Recording(original(data, site_specs), replies)

    monkeypatch.setattr(rt, "LocalTransport", recording)
    if broken:
        def boom(*_a, **_k):
            raise RuntimeError("a release failed after the charge")

        for release in ("_stats_release", "_eval_release", "_train_release"):
            monkeypatch.setattr(rt.JobRuntime, release, boom)
    result = sim.simulate(_spec(name), data, schema)
    monkeypatch.undo()
    return result, replies


def _shape(reply):
    if isinstance(reply, dict):
        return sorted((str(k) if not str(k).startswith(("general", "riverside", "st-mary")) else "<site>", _shape(v))
                      for k, v in reply.items())
    if isinstance(reply, (list, tuple)):
        return [_shape(v) for v in reply]
    if isinstance(reply, np.ndarray):
        return ("ndarray", str(reply.dtype), reply.shape)
    if isinstance(reply, (bytes, str)):
        return (type(reply).__name__, len(reply))
    return type(reply).__name__


def test_a_release_that_fails_after_the_charge_gives_the_same_reply(cohort, monkeypatch, caplog):
    # Execute: the same job, once normally and once with every release raising
    normal, ok_replies = _run(cohort, monkeypatch, "outcome-normal", broken=False)
    with caplog.at_level("ERROR", logger="fedmtl.runtime"):
        failed, bad_replies = _run(cohort, monkeypatch, "outcome-broken", broken=True)
    # Assert: every call answered ok, with the same fields, sizes, report and payload layout
    assert all(r.get("ok") for *_, r, _ in bad_replies), [r for *_, r, _ in bad_replies if not r.get("ok")]
    ok_by = {(s, st, p): (r, pay) for s, st, p, r, pay in ok_replies}  # the sites answer in parallel
    bad_by = {(s, st, p): (r, pay) for s, st, p, r, pay in bad_replies}
    assert sorted(ok_by) == sorted(bad_by) and len(bad_by) == len(bad_replies)
    for (s1, st1, p1), (r1, pay1) in ok_by.items():
        r2, pay2 = bad_by[(s1, st1, p1)]
        assert _shape(r1) == _shape(r2), (s1, st1, p1)
        if st1 == "advertise":
            assert r1["report"] == r2["report"], (p1, r1["report"], r2["report"])
            assert pay1 == pay2 and all(fin for *_, fin in pay2.values()), (p1, pay1, pay2)
    assert failed.rounds_done == normal.rounds_done == 1
    assert np.isfinite(failed.global_vector).all()
    # the failure is in the site's log, never in a reply
    assert "null release was sent instead" in caplog.text
    assert not any("a release failed" in str(r) for *_, r, _ in bad_replies)


def test_weights_over_the_cap_are_refused_before_any_record_is_read(cohort, tmp_path, monkeypatch):
    from fedmtl.models import model_to_vector

    schema, data = cohort
    # Prepare: a dry-run home (the default policy's cap) and a spec for it
    home = tmp_path / "home"
    home.mkdir()
    (home / rt.DRY_RUN_MARKER).write_text("test\n")
    rt.register_home("general", home)
    spec = {"job": _spec("cap").to_dict(), "job_id": "cap-1", "site": "general", "roster": {},
            "schema": schema.to_dict(), "max_count": 10}
    model, _ = protocol.build_model(spec)
    w = model_to_vector(model).astype(np.float32)
    read = []
    monkeypatch.setattr(rt.JobRuntime, "_compute_payload", lambda *a, **k: read.append(1) or ({}, {}))
    try:
        for value in (np.nextafter(np.float32(1000.0), np.float32(np.inf)), 1e38, -2000.0):
            bad = w.copy()
            bad[3] = value
            # Execute
            reply = rt.handle(data=data["general"], spec=spec, message={"stage": "advertise", "pass": 1,
                                                                        "attempt": 0, "weights": bad})
            # Assert
            assert reply["ok"] is False and "limits.max_abs_weight 1000" in reply["error"], reply
        assert not read, "the records were read for weights over the cap"
    finally:
        rt.unregister_home("general")
