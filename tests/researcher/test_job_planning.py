"""Planning a job before running it: ``price`` / ``Job.cost``, the ``fedmtl job price``
table, and why a request is pending (``Job.status``). Pure: fake syft clients."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.researcher import job as jobmod
from fedmtl.researcher.job import PENDING_AUTO, PENDING_MANUAL, Job, price, price_table
from fedmtl.schema import Schema

SCHEMA = Schema.from_dict({
    "dataset": {"name": "toy"},
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 18, "max": 90},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
        {"name": "split", "role": "split", "type": "categorical", "categories": ["train", "test"]},
    ],
})
SPEC = JobSpec(name="plan", tasks=[{"label": "diabetes"}], rounds=3, local_steps=10, sample_rate=0.02,
               noise_multiplier=1.0, secagg={"threshold": 2})
FUNC = "fedmtl_round_plan_abcd1234"


class _Result:
    """What a syft code call returns: an object with ``.get()``."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Code:
    def __init__(self, views):
        self.views, self.calls = views, []

    def __getattr__(self, name):
        if name not in self.views:
            raise AttributeError(name)

        def call(*, data, message):
            self.calls.append((name, dict(message)))
            return _Result({"ok": True, "view": self.views[name]})

        return call


def _request(func, status="PENDING", *, tags=(), deny="", age=0.0):
    return SimpleNamespace(
        id=f"uid-{func}", code=SimpleNamespace(service_func_name=func), status=SimpleNamespace(name=status),
        tags=list(tags), deny_reason=deny, request_time=SimpleNamespace(utc_timestamp=time.time() - age),
    )


def _site(name, n_records, train, *, requests=(), views=None):
    client = SimpleNamespace(requests=SimpleNamespace(get_all=lambda: list(requests)), code=_Code(views or {}))
    meta = {"n_records": n_records, "split_sizes": {"train": train, "test": n_records - train},
            "schema": SCHEMA.to_dict()}
    return SimpleNamespace(name=name, meta=meta, client=client, asset="asset", dataset=SimpleNamespace(name="toy"),
                           schema=SCHEMA)


def _session(*sites):
    s = SimpleNamespace(sites={x.name: x for x in sites}, down={})
    s.schemas = {x.name: x.schema for x in sites}
    return s


def _view(left):
    return {"email": "ada@uni.example", "requests": [], "epsilon_spent": {"toy": 5.0 - left},
            "budget_left": {"toy": left}}


def test_price_gives_the_whole_jobs_epsilon_per_site_on_its_training_split():
    session = _session(_site("a", 1000, 750), _site("b", 4000, 3000))
    rows = price(session, SPEC, budget=False)
    assert sorted(rows) == ["a", "b"]
    for name, n_train in (("a", 750), ("b", 3000)):
        r = rows[name]
        assert r["n_train"] == n_train and r["rounds"] == 3 and r["noise_multiplier"] == 1.0
        assert r["epsilon"] == pytest.approx(SPEC.epsilon_for_site(n_train))  # training + evaluation
        assert r["epsilon"] > SPEC.epsilon_for_site(n_train, rounds=3)  # the evaluation release counts
        assert r["budget_left"] is None and r["fits"] is None


def test_budget_left_is_unknown_before_a_first_approved_job():
    session = _session(_site("a", 1000, 750, requests=[_request(FUNC)]), _site("b", 1000, 750))
    rows = price(session, SPEC)
    for r in rows.values():
        assert r["budget_left"] is None and r["fits"] is None
        assert "publishes no budgets" in r["budget_from"] and "approved" in r["budget_from"]


def test_budget_left_is_read_through_an_approved_job_and_charges_nothing():
    # Prepare: site a has an older approved job of this researcher; b has a denied one only
    old = "fedmtl_round_old_1111"
    a = _site("a", 1000, 750, requests=[_request(old, "APPROVED"), _request("other_code", "APPROVED")],
              views={old: _view(3.5)})
    b = _site("b", 1000, 750, requests=[_request("fedmtl_round_x_2", "REJECTED")])
    # Execute
    rows = price(_session(a, b), SPEC)
    # Assert: only the spend query ran, through the approved round function
    assert a.client.code.calls == [(old, {"stage": "spend"})]
    assert rows["a"]["budget_left"] == 3.5 and rows["a"]["fits"] == (rows["a"]["epsilon"] <= 3.5)
    assert old in rows["a"]["budget_from"]
    assert rows["b"]["budget_left"] is None
    # a budget the job does not fit
    a.client.code.views[old] = _view(0.01)
    assert price(_session(a, b), SPEC)["a"]["fits"] is False


def _job(session, tmp_path, **state):
    sites = sorted(session.sites)
    base = {"job_id": "plan-abcd1234", "func_name": FUNC, "spec": SPEC.to_dict(), "sites": sites,
            "site_specs": {s: {} for s in sites}, "submitted": True, "attempts": {}}
    base.update(state)
    return Job(session, tmp_path, base)


def test_job_cost_prefers_this_job_once_approved(tmp_path):
    old = "fedmtl_round_old_1111"
    a = _site("a", 1000, 750, requests=[_request(FUNC, "APPROVED"), _request(old, "APPROVED")],
              views={old: _view(1.0), FUNC: _view(2.0)})
    rows = _job(_session(a), tmp_path).cost()
    assert rows["a"]["budget_left"] == 2.0 and "this job" in rows["a"]["budget_from"]
    assert rows["a"]["epsilon"] == pytest.approx(SPEC.epsilon_for_site(750))


def test_price_table_prints_one_row_per_site_and_why_a_budget_is_unknown():
    old = "fedmtl_round_old_1111"
    a = _site("a", 1000, 750, requests=[_request(old, "APPROVED")], views={old: _view(3.5)})
    text = price_table(price(_session(a, _site("b", 1000, 750)), SPEC))
    lines = text.splitlines()
    assert lines[0].split() == ["site", "n_train", "rounds", "noise", "epsilon", "budget", "left", "fits"]
    assert lines[1].split()[:3] == ["a", "750", "3"] and lines[1].split()[-2:] == ["3.5", "yes"]
    assert lines[2].split()[0] == "b" and lines[2].split()[-2:] == ["-", "-"]
    assert lines[3].startswith("b: budget left unknown:")


def test_cli_job_price(monkeypatch, tmp_path, capsys):
    from fedmtl import cli
    from fedmtl.researcher.session import Session

    SPEC.save(tmp_path / "job.toml")
    (tmp_path / "sites.toml").write_text("")
    monkeypatch.setattr(Session, "connect",
                        classmethod(lambda cls, path: _session(_site("a", 1000, 750), _site("b", 2000, 1500))))
    assert cli.main(["job", "price", "--job", str(tmp_path / "job.toml"), "--sites", str(tmp_path / "sites.toml")]) == 0
    out = capsys.readouterr().out
    assert "job 'plan': epsilon per site at delta=1e-05 (rdp)" in out
    assert f"{SPEC.epsilon_for_site(750):.4g}" in out and "a: budget left unknown" in out
    assert "b: budget left unknown" in out
    # the command line's advice names the command, not (only) a Python call
    assert "then `fedmtl job price` shows it" in out


# -- the job's folder -------------------------------------------------------------------------
def test_pricing_a_job_claims_nothing_and_only_one_job_claims_a_folder(tmp_path):
    import json
    import os
    import stat

    from fedmtl.errors import JobError
    from fedmtl.privacy.keys import SigningKey, load_private_key

    # Prepare: two sites with identities (what Job.create binds into the specs)
    sites = [_site("a", 1000, 750), _site("b", 2000, 1500)]
    for s in sites:
        s.identity, s.url, s.n_records = SimpleNamespace(verify_key=SigningKey.generate().verify_key), "http://x", 1000
    session = _session(*sites)
    out = tmp_path / "job"
    # Execute: the same pricing script, run twice
    for _ in range(2):
        rows = Job.create(session, SPEC, out=out).cost()
        # Assert: priced, and nothing written
        assert sorted(rows) == ["a", "b"] and rows["a"]["epsilon"] == pytest.approx(SPEC.epsilon_for_site(750))
        assert not out.exists()
    # Execute: two jobs prepared for one folder; the first to submit claims it
    first, second = Job.create(session, SPEC, out=out), Job.create(session, SPEC, out=out)
    first.claim()
    # Assert: job.json and the data-plane key the sites' specs bind (0600) are the first job's
    assert json.loads((out / "job.json").read_text())["job_id"] == first.job_id
    key = out / "secrets" / "dataplane.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert SigningKey.from_bytes(load_private_key(key)).verify_key.to_bytes().hex() == \
        first.site_specs["a"]["dataplane_key"] != second.site_specs["a"]["dataplane_key"]
    with pytest.raises(JobError, match="already holds a job: continue it with `fedmtl train"):
        second.claim()
    with pytest.raises(JobError, match="already holds a job"):
        second.submit()  # refused before anything is sent
    assert json.loads((out / "job.json").read_text())["job_id"] == first.job_id
    assert Job.resume(session, out).job_id == first.job_id


# -- why a request is pending ----------------------------------------------------------------
def test_status_says_who_a_pending_request_waits_for(tmp_path, monkeypatch):
    sites = [
        _site("fresh", 1000, 750, requests=[_request(FUNC)]),
        _site("tagged", 1000, 750, requests=[_request(FUNC, tags=["fedmtl:pending_manual"])]),
        _site("denied", 1000, 750, requests=[_request(FUNC, "REJECTED", deny="privacy.max_epsilon_per_job: ...")]),
        _site("approved", 1000, 750, requests=[_request(FUNC, "APPROVED")]),
        _site("none", 1000, 750),
    ]
    job = _job(_session(*sites), tmp_path, submitted_at=time.time())
    st = job.status()
    assert st["fresh"]["status"] == "pending" and st["fresh"]["reason"] == PENDING_AUTO == "queued for the automatic reviewer"
    assert st["fresh"]["waiting_s"] < jobmod.AUTO_REVIEW_SECONDS
    assert st["tagged"]["reason"] == PENDING_MANUAL == "waiting for a person (this datasite approves by hand)"
    assert st["denied"] == {"status": "denied", "reason": "privacy.max_epsilon_per_job: ..."}
    assert st["approved"] == {"status": "approved", "reason": ""}
    assert st["none"]["status"] == "not submitted"
    # still pending long after submission: the automatic reviewer would have answered
    job.state["submitted_at"] = time.time() - jobmod.AUTO_REVIEW_SECONDS - 5
    assert job.status()["fresh"]["reason"] == PENDING_MANUAL
    # a job from before submitted_at was recorded: syft's request time counts
    del job.state["submitted_at"]
    old = _site("old", 1000, 750, requests=[_request(FUNC, age=600)])
    assert _job(_session(old), tmp_path).status()["old"]["reason"] == PENDING_MANUAL


def test_wait_for_review_returns_pending_with_the_reason_on_timeout(tmp_path):
    job = _job(_session(_site("a", 1000, 750, requests=[_request(FUNC)])), tmp_path, submitted_at=time.time())
    st = job.wait_for_review(timeout=0.0, poll=0.0)
    assert st["a"]["status"] == "pending" and st["a"]["reason"] == PENDING_AUTO


def test_cli_job_price_json(monkeypatch, tmp_path, capsys):
    import json

    from fedmtl import cli
    from fedmtl.researcher.session import Session

    SPEC.save(tmp_path / "job.toml")
    monkeypatch.setattr(Session, "connect",
                        classmethod(lambda cls, path: _session(_site("a", 1000, 750), _site("b", 2000, 1500))))
    rc = cli.main(["job", "price", "--job", str(tmp_path / "job.toml"), "--sites", "x.toml", "--json", "--no-budget"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and sorted(rows) == ["a", "b"]
    assert rows["a"]["epsilon"] == pytest.approx(SPEC.epsilon_for_site(750)) and rows["a"]["budget_left"] is None
