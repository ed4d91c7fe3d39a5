"""`fedmtl audit` on a ledger built in a temporary datasite home (no server needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedmtl.cli import main as cli_main
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.ledger.ledger import LEDGER_FILE
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.rules.review import RequestFacts
from fedmtl.datasites.site import identity
from fedmtl.datasites.template import TEMPLATE_NAME, TEMPLATE_SHA256
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.keys import SigningKey

ALICE, BOB = "alice@uni.example", "bob@lab.example"
ROUND = PrivacyRecord(noise_multiplier=1.5, sample_rate=0.05, steps=20)


def _facts(request_id: str, researcher: str, **kw) -> RequestFacts:
    base = dict(
        request_id=request_id, researcher=researcher, dataset="riverside-records",
        code_name=f"{TEMPLATE_NAME}_{request_id.replace('-', '_')}", code_hash=TEMPLATE_SHA256,
        tasks=("diabetes_5y",), noise_multiplier=1.5, max_grad_norm=1.0, rounds=2, local_epochs=1,
        sample_rate=0.05, steps_per_round=20, delta=1e-5, n_sites=3, secagg_threshold=2,
        spec_hash="ab" * 32,
    )
    base.update(kw)
    return RequestFacts(**base)


@pytest.fixture(scope="module")
def sealed_home(tmp_path_factory) -> Path:
    """A datasite home with identity keys, a policy, an approved job with one charged
    round (Alice), and a denied request (Bob: noise below the minimum)."""
    home = tmp_path_factory.mktemp("sealed") / "riverside"
    home.mkdir()
    identity.create(home, "riverside")
    policy = Policy.default(allowed_tasks=["diabetes_5y"], templates={TEMPLATE_NAME: TEMPLATE_SHA256})
    site_ledger.install_policy(home, policy, who="owner@riverside.example")
    led = site_ledger.open_ledger(home)
    assert led.review_and_record(_facts("mtl-aaaa0001", ALICE)).status == "approved"
    assert led.review_and_record(_facts("mtl-bbbb0002", BOB, noise_multiplier=0.1)).status == "denied"
    spec = {"job_id": "mtl-aaaa0001", "roster": {"riverside": "00", "general": "11", "st-mary": "22"}}
    site_ledger.charge_pass(home, spec, 1, [ROUND])
    return home


@pytest.fixture
def home(sealed_home: Path, tmp_path: Path) -> Path:
    """A fresh copy of the sealed home, for tests that tamper with it."""
    copy = tmp_path / "riverside"
    shutil.copytree(sealed_home, copy)
    return copy


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_audit_ok_prints_requests_and_writes_html_and_json(home, tmp_path, capsys):
    # Execute
    rc = cli_main(["audit", "--home", str(home), "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    # Assert: verified, both requests listed with decision and epsilon, report written
    assert rc == 0, out
    assert "verification: OK (7 entries" in out
    assert "read from" in out and "not pinned" in out  # the default key source is named
    assert "mtl-aaaa0001" in out and "approved" in out and "auto (automatic)" in out
    assert "mtl-bbbb0002" in out and "denied" in out and "privacy.min_noise_multiplier" in out
    eps_round = epsilon_of([ROUND], delta=1e-5)
    assert f"{eps_round:.4g}" in out
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["verification"]["ok"] is True
    rows = {r["request_id"]: r for r in data["requests"]}
    assert rows["mtl-aaaa0001"]["epsilon_charged"] == pytest.approx(eps_round)
    assert rows["mtl-bbbb0002"]["status"] == "denied"
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Ledger verified" in html and 'id="epsilon-plot"' in html and "mtl-aaaa0001" in html


def test_audit_with_pinned_key_and_json_output(home, tmp_path, capsys):
    # Prepare: the key a compliance officer pinned out of band
    pinned = json.loads((home / "public_keys.json").read_text())["ed25519"]
    # Execute
    rc = cli_main(["audit", "--home", str(home), "--verify-key", pinned, "--json", "--out", str(tmp_path / "r")])
    data = json.loads(capsys.readouterr().out)
    # Assert
    assert rc == 0
    assert data["verification"]["ok"] and data["verification"]["entries"] == 7
    assert Path(data["html"]).is_file() and Path(data["json"]).is_file()


def test_audit_detects_an_edited_line(home, tmp_path, capsys):
    # Prepare: lower the epsilon charged in the round entry, keep its hash and signature
    path = home / LEDGER_FILE
    lines = _lines(path)
    i = next(k for k, line in enumerate(lines) if '"round_executed"' in line)
    entry = json.loads(lines[i])
    entry["body"]["epsilon_round"] = 0.001
    lines[i] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    # Execute
    rc = cli_main(["audit", "--home", str(home), "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    # Assert: exit 1, the problem names the entry and what happened; the report says so too
    assert rc == 1
    assert "verification: FAILED" in out
    assert f"entry seq {entry['seq']} (round_executed) does not match its hash: it was edited" in out
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["verification"]["ok"] is False
    assert "FAILED verification" in (tmp_path / "report" / "report.html").read_text()


def test_audit_detects_a_deleted_line_and_a_rollback(home, tmp_path, capsys):
    # Prepare: drop the denied request's two entries (the ledger then ends before the head)
    path = home / LEDGER_FILE
    lines = _lines(path)
    assert cli_main(["audit", "--home", str(home), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    path.write_text("\n".join(lines[:-1]) + "\n")
    # Execute
    rc = cli_main(["audit", "--home", str(home), "--out", str(tmp_path / "b"), "--expected-count", "7"])
    out = capsys.readouterr().out
    # Assert
    assert rc == 1
    assert "the ledger was truncated" in out
    assert "fewer than the 7 expected" in out


def test_audit_accepts_the_fingerprint_owner_commands_print(home, tmp_path, capsys):
    # Prepare: the fingerprint as `fedmtl datasite status` prints it, as an auditor may type it
    fp = identity.load_public(home).fingerprint
    spaced = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    for pinned in (fp, spaced):
        # Execute
        rc = cli_main(["audit", "--home", str(home), "--verify-key", pinned, "--out", str(tmp_path / "r")])
        out = capsys.readouterr().out
        # Assert
        assert rc == 0, out
        assert f"verify key: fingerprint {fp} pinned with --verify-key (fingerprint)" in out
        assert "verification: OK (7 entries" in out


def test_audit_with_another_key_or_fingerprint_fails_naming_both(home, tmp_path, capsys):
    own = identity.load_public(home).fingerprint
    other = SigningKey.generate().verify_key
    for pinned, pinned_fp in ((other.to_bytes().hex(), other.fingerprint()), (other.fingerprint(), None)):
        rc = cli_main(["audit", "--home", str(home), "--verify-key", pinned, "--out", str(tmp_path / "r")])
        out = capsys.readouterr().out
        assert rc == 1
        assert "verification: FAILED" in out and "is not this datasite's key" in out
        assert own in out and pinned in out
        if pinned_fp:
            assert pinned_fp in out
    assert not (tmp_path / "r").exists()  # no report claims anything about an unpinned ledger


def test_audit_of_a_home_re_signed_with_another_key_fails(home, tmp_path, capsys):
    # Prepare: the attacker re-keys the home (their key in public_keys.json); the auditor pins the real one
    real = identity.load_public(home).fingerprint
    (tmp_path / "attacker").mkdir()
    (home / "public_keys.json").write_text(json.dumps(identity.create(tmp_path / "attacker", "x").public.to_dict()))
    # Execute
    rc = cli_main(["audit", "--home", str(home), "--verify-key", real, "--out", str(tmp_path / "r")])
    # Assert
    assert rc == 1 and real in capsys.readouterr().out
    # and without a pin the ledger itself names the key it was created for
    assert cli_main(["audit", "--home", str(home), "--out", str(tmp_path / "r")]) == 1
    out = capsys.readouterr().out
    assert "re-signed with another key (or you pinned the wrong key)" in out and real[:16] in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--verify-key", "zz"], "--verify-key must be the datasite's fingerprint (or its Ed25519 public key) as "
                                 "64 hex characters (not hex)"),
        (["--verify-key", "ab" * 16], "64 hex characters (16 bytes)"),
        (["--expected-count", "-1"], "--expected-count must be >= 0"),
    ],
)
def test_audit_usage_errors_exit_2(home, argv, message, capsys):
    rc = cli_main(["audit", "--home", str(home), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_audit_of_a_folder_without_ledger_exits_2(tmp_path, capsys):
    rc = cli_main(["audit", "--home", str(tmp_path)])
    assert rc == 2
    assert "holds no ledger" in capsys.readouterr().err
    rc = cli_main(["audit", "--home", str(tmp_path / "nope")])
    assert rc == 2
    assert "is not a folder" in capsys.readouterr().err


def test_audit_researcher_view_shows_only_their_own_entries(home, capsys):
    # Execute
    rc = cli_main(["audit", "--home", str(home), "--researcher", ALICE])
    out = capsys.readouterr().out
    # Assert: Alice sees her job, spend and budget left; nothing of Bob's
    assert rc == 0
    assert "ledger verification: OK" in out
    assert "mtl-aaaa0001" in out and "budget left" in out
    assert BOB not in out and "mtl-bbbb0002" not in out
    rc = cli_main(["audit", "--home", str(home), "--researcher", BOB, "--json"])
    view = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["request_id"] for r in view["requests"]] == ["mtl-bbbb0002"]
    assert view["epsilon_spent"] == {"riverside-records": 0.0}
    assert ALICE not in json.dumps(view)
    # no report files are written for a researcher's view
    assert not (home / "audit").exists()
