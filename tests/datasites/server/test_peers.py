"""Pinned peers: add / remove / list on a datasite home with a ledger (no server), every
change recorded in the ledger, and a change made from another process is seen by a
datasite that has its ledger open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import compliance_helpers as H  # registered by tests/datasites/conftest.py
import pytest

from fedmtl.cli import main as cli_main
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.rules.policy import Peer, Policy, PolicyError
from fedmtl.datasites.server import admin, peers
from fedmtl.datasites.site import home as home_mod
from fedmtl.datasites.site import identity
from fedmtl.errors import DatasiteError
from fedmtl.privacy.keys import SigningKey

OWNER = H.OWNER


def _fp() -> str:
    return SigningKey.generate().verify_key.fingerprint()


def make_home(root: Path, name: str) -> Path:
    """A datasite home as a first launch leaves it (config, identity keys, a ledger with
    the policy), without a syft server."""
    home = root / name
    home.mkdir(parents=True)
    home_mod.write_config(home, {"name": name, "admin_email": f"admin@{name}.datasite", "dataset": f"{name}-records"})
    identity.create(home, name)
    site_ledger.install_policy(home, H.make_policy(), who="owner (first launch)")
    return home


def _policy_entries(home: Path) -> list[dict]:
    return [e for e in site_ledger.open_ledger(home).entries() if e["kind"] == "policy_changed"]


@pytest.fixture
def home(tmp_path) -> Path:
    return make_home(tmp_path, "riverside")


def test_add_list_remove_each_recorded_in_the_ledger(home):
    # Prepare
    general, mercy = _fp(), _fp()
    # Execute
    peers.add_peer(home, name="mercy", fingerprint=mercy, who=OWNER)
    peers.add_peer(home, name="general", fingerprint=general, who="it@riverside.example")
    listed = peers.list_peers(home)
    after_remove = peers.remove_peer(home, name="mercy", who=OWNER)
    # Assert
    assert listed == (Peer("general", general), Peer("mercy", mercy))  # sorted by name
    assert peers.list_peers(home) == (Peer("general", general),) == after_remove.peers
    entries = _policy_entries(home)
    assert [e["body"]["who"] for e in entries] == ["owner (first launch)", OWNER, "it@riverside.example", OWNER]
    assert entries[-1]["body"]["policy"]["peers"] == [{"name": "general", "fingerprint": general}]
    assert entries[-1]["body"]["old_hash"] == entries[-2]["body"]["new_hash"]
    # the file on disk is the recorded policy
    assert Policy.load(home / site_ledger.POLICY_FILE) == site_ledger.current_policy(home) == after_remove


def test_re_pinning_replaces_and_an_identical_pin_records_nothing(home):
    old, new = _fp(), _fp()
    peers.add_peer(home, name="general", fingerprint=old, who=OWNER)
    n = len(_policy_entries(home))
    peers.add_peer(home, name="general", fingerprint=old, who=OWNER)
    assert len(_policy_entries(home)) == n
    peers.add_peer(home, name="general", fingerprint=new.upper(), who=OWNER)  # pasted upper-case
    assert peers.list_peers(home) == (Peer("general", new),)
    assert len(_policy_entries(home)) == n + 1


def test_removing_an_unknown_peer_says_so_and_changes_nothing(home):
    peers.add_peer(home, name="general", fingerprint=_fp(), who=OWNER)
    n = len(site_ledger.open_ledger(home).entries())
    with pytest.raises(peers.PeerError) as info:
        peers.remove_peer(home, name="mercy", who=OWNER)
    msg = str(info.value)
    assert "no peer named 'mercy' is pinned" in msg and "pinned: general" in msg and "peers list" in msg
    assert isinstance(info.value, DatasiteError)
    assert len(site_ledger.open_ledger(home).entries()) == n


@pytest.mark.parametrize(
    "name,fingerprint,expected",
    [
        ("general", "abc", "peers[0].fingerprint: must be 64 lowercase hex characters"),
        ("general", "g" * 64, "peers[0].fingerprint: must be 64 lowercase hex characters"),
        ("St Mary", "a" * 64, "peers[0].name: must be a datasite name"),
    ],
)
def test_invalid_pins_are_refused_before_anything_is_written(home, name, fingerprint, expected):
    n = len(site_ledger.open_ledger(home).entries())
    text = (home / site_ledger.POLICY_FILE).read_text()
    with pytest.raises(PolicyError) as info:
        peers.add_peer(home, name=name, fingerprint=fingerprint, who=OWNER)
    assert expected in str(info.value), str(info.value)
    assert len(site_ledger.open_ledger(home).entries()) == n
    assert (home / site_ledger.POLICY_FILE).read_text() == text


def test_one_key_is_one_site_and_a_site_does_not_pin_itself(home):
    fp = _fp()
    peers.add_peer(home, name="general", fingerprint=fp, who=OWNER)
    with pytest.raises(PolicyError, match=r"peers\[\d\]\.fingerprint: .* is already pinned"):
        peers.add_peer(home, name="mercy", fingerprint=fp, who=OWNER)
    own = peers.own_fingerprint(home)
    assert own.name == "riverside" and own.fingerprint == identity.load_public(home).fingerprint
    with pytest.raises(peers.PeerError, match="this datasite's own name"):
        peers.add_peer(home, name="riverside", fingerprint=_fp(), who=OWNER)
    with pytest.raises(peers.PeerError, match="this datasite's own fingerprint"):
        peers.add_peer(home, name="mercy", fingerprint=own.fingerprint, who=OWNER)
    with pytest.raises(peers.PeerError, match="who makes the change"):
        peers.add_peer(home, name="mercy", fingerprint=_fp(), who=" ")
    assert peers.list_peers(home) == (Peer("general", fp),)


def test_not_a_home_is_named(tmp_path):
    with pytest.raises(DatasiteError, match="is not a fedmtl datasite home"):
        peers.list_peers(tmp_path)


def test_pin_federation_pins_every_other_site(tmp_path):
    homes = [make_home(tmp_path, n) for n in ("general", "mercy", "riverside")]
    fps = {h.name: identity.load_public(h).fingerprint for h in homes}
    out = peers.pin_federation(homes)
    for h in homes:
        expected = tuple(Peer(n, fp) for n, fp in sorted(fps.items()) if n != h.name)
        assert peers.list_peers(h) == expected == out[h.name].peers
        assert _policy_entries(h)[-1]["body"]["who"] == "owner"
    # pinning again changes nothing
    peers.pin_federation(homes, who="someone")
    assert all(_policy_entries(h)[-1]["body"]["who"] == "owner" for h in homes)


def test_cli_in_another_process_reaches_a_datasite_with_its_ledger_open(home, capsys):
    """The server keeps its ledger open (cached per home); `fedmtl datasite peers add` runs
    in another process; the server's next read of the policy sees the new pin."""
    # Prepare: this process stands in for the running datasite
    served = site_ledger.open_ledger(home)
    assert site_ledger.current_policy(home).peers == ()
    fp = _fp()
    # Execute
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmtl.cli", "datasite", "peers", "add", "--home", str(home),
         "--name", "general", "--fingerprint", fp, "--who", OWNER],
        capture_output=True, text=True, timeout=120, env=env,
    )
    # Assert
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pinned peer general {fp}" in proc.stdout
    assert site_ledger.open_ledger(home) is served
    assert site_ledger.current_policy(home).peer_by_fingerprint(fp) == Peer("general", fp)
    assert served.entries()[-1]["body"]["who"] == OWNER

    # list and remove through the CLI (in process)
    assert cli_main(["datasite", "peers", "list", "--home", str(home), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["self"] == {"name": "riverside", "fingerprint": identity.load_public(home).fingerprint}
    assert listed["peers"] == [{"name": "general", "fingerprint": fp}]
    assert cli_main(["datasite", "peers", "remove", "--home", str(home), "--name", "mercy", "--who", OWNER]) == 2
    assert "no peer named 'mercy' is pinned" in capsys.readouterr().err
    assert cli_main(["datasite", "peers", "remove", "--home", str(home), "--name", "general", "--who", OWNER]) == 0
    assert "removed peer general" in capsys.readouterr().out
    assert site_ledger.current_policy(home).peers == ()
    assert cli_main(["datasite", "peers", "list", "--home", str(home)]) == 0
    assert "no peers pinned" in capsys.readouterr().out


def test_status_prints_the_sites_own_fingerprint(home):
    st = admin.status(home)  # not running: no server needed
    fp = identity.load_public(home).fingerprint
    assert st.fingerprint == fp and st.to_dict()["fingerprint"] == fp
    assert f"fingerprint: {fp}" in st.render()
