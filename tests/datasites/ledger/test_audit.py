"""Compliance audit: verification, request listing, epsilon over time, HTML/JSON report
(rendered in headless Chromium), and the researcher's own view."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import compliance_helpers as H  # registered by tests/datasites/conftest.py
import numpy as np
import pytest

from fedmtl.datasites.ledger import ledger as L
from fedmtl.datasites.ledger.audit import PALETTE, audit, pass_progress, researcher_view
from fedmtl.datasites.ledger.ledger import Ledger
from fedmtl.privacy.accounting import epsilon_of
from fedmtl.privacy.keys import SigningKey

R = H.ROUND


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    key = SigningKey.generate()
    ids = H.populate(home, key)
    return home, key, ids


@pytest.fixture(scope="module")
def report(sealed):
    home, key, _ = sealed
    return audit(home, key.verify_key)


def test_audit_lists_requests_decisions_and_epsilon(sealed, report):
    _, _, ids = sealed
    assert report.ok and report.verification.entries == 20
    rows = {r["request_id"]: r for r in report.requests}
    assert rows[ids["alice"]]["status"] == "finished" and rows[ids["alice"]]["mode"] == "automatic"
    assert rows[ids["alice"]]["epsilon_charged"] == pytest.approx(epsilon_of([R] * 3, delta=1e-5))
    assert rows[ids["denied"]]["status"] == "denied" and "PYSEC-2026-546" in rows[ids["denied"]]["reasons"][0]
    manual = rows[ids["manual"]]
    assert manual["status"] == "approved" and manual["mode"] == "manual" and manual["warning_shown"] is True
    assert manual["decided_by"] == H.OWNER
    assert [c["changed"] for c in report.policy_changes] == [["initial policy"], ["review.templates_only: True -> False"]]


def test_epsilon_over_time_is_composed_and_monotone(report):
    alice = report.researcher_series[H.ALICE]
    bob = report.researcher_series[H.BOB]
    data = report.dataset_series["nafld"]
    assert len(alice) == 4 and len(bob) == 2 and len(data) == 6
    for s in (alice, bob, data):
        assert [t for t, _ in s] == sorted(t for t, _ in s)
        assert all(b[1] > a[1] for a, b in zip(s, s[1:]))
    assert alice[-1][1] == pytest.approx(epsilon_of([R] * 4, delta=1e-5))
    assert data[-1][1] == pytest.approx(epsilon_of([R] * 6, delta=1e-5))
    assert report.dataset_spent["nafld"] < report.researcher_spent[H.ALICE] + report.researcher_spent[H.BOB]


def test_report_json_matches(report):
    data = json.loads(report.json_path.read_text())
    assert data["verification"]["ok"] is True
    assert len(data["requests"]) == 4
    assert data["epsilon_spent"]["dataset"]["nafld"] == pytest.approx(report.dataset_spent["nafld"])
    assert data["epsilon_over_time"]["researcher"][H.ALICE][0][0].startswith("2026-01-05T")
    bob = next(r for r in data["requests"] if r["researcher"] == H.BOB)  # old fields kept, clearer ones added
    assert bob["rounds_approved"] == 2 and bob["rounds_executed"] == [1, 2] and bob["rounds_run"] == 2
    assert bob["progress"] in report.html_path.read_text() and 'id="passes-note"' in report.html_path.read_text()


@pytest.mark.parametrize("rounds, passes, executed, progress", [
    (5, 7, [1, 2, 3, 4, 5, 6, 7], "5 of 5 rounds run; 7 of 7 passes (1 statistics, 5 training, 1 final evaluation)"),
    (5, 6, [1, 2, 3], "3 of 5 rounds run; 3 of 6 passes (3 training)"),
    (5, 7, [1], "0 of 5 rounds run; 1 of 7 passes (1 statistics)"),
    (3, 0, [], "0 of 3 rounds run; 0 of 3 passes"),  # a ledger from before passes were recorded
])
def test_pass_progress_never_reads_passes_as_rounds(rounds, passes, executed, progress):
    out = pass_progress(rounds, passes, executed)
    assert out["progress"] == progress
    assert out["rounds_run"] <= rounds and out["passes_run"] == len(executed)


def test_html_escapes_ledger_strings(report):
    text = report.html_path.read_text()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Content-Security-Policy" in text


def test_tampered_ledger_audit_fails_loudly(sealed, tmp_path):
    home, key, _ = sealed
    copy = tmp_path / "copy"
    shutil.copytree(home, copy)
    lines = (copy / L.LEDGER_FILE).read_bytes().splitlines(keepends=True)
    (copy / L.LEDGER_FILE).write_bytes(b"".join(lines[:-1]))
    rep = audit(copy, key.verify_key, out_dir=tmp_path / "out")
    assert not rep.ok
    assert "Ledger FAILED verification" in rep.html_path.read_text()
    assert "truncated" in rep.html_path.read_text()


def test_researcher_view_shows_only_their_own(sealed):
    home, key, ids = sealed
    # Execute: from a path and from an open ledger
    views = [researcher_view(home / L.LEDGER_FILE, H.BOB), researcher_view(Ledger.open(home, key), H.BOB)]
    for view in views:
        # Assert
        assert {r["request_id"] for r in view.requests} == {ids["bob"], ids["denied"]}
        assert view.epsilon_spent["nafld"] == pytest.approx(epsilon_of([R] * 2, delta=1e-5))
        assert view.budget_left["nafld"] == pytest.approx(4.0 - view.epsilon_spent["nafld"])
        assert list(view.series) == [H.BOB]
        dumped = json.dumps(view.to_dict())
        assert H.ALICE not in dumped and ids["alice"] not in dumped and ids["manual"] not in dumped


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chrome(args: list[str]) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=90,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _hex_rgb(h: str) -> np.ndarray:
    return np.array([int(h[i:i + 2], 16) for i in (1, 3, 5)], dtype=float) / 255.0


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(report, tmp_path):
    import matplotlib.image

    url = report.html_path.resolve().as_uri()
    # Execute: the DOM as Chromium built it
    dom = _chrome(["--dump-dom", url])
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # Assert: the tables with their rows, and the plot as an inline image
    assert 'id="requests"' in html and html.count('<tr class="request">') == 4
    assert html.count('<tr class="researcher">') == 2 and html.count('<tr class="dataset">') == 1
    assert re.search(r'<img id="epsilon-plot"[^>]+src="data:image/png;base64,', html)
    assert "Ledger verified: 20 entries" in html
    # Execute: a screenshot
    shot = tmp_path / "report.png"
    res = _chrome([f"--screenshot={shot}", "--window-size=1200,1600", url])
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = matplotlib.image.imread(str(shot))[..., :3]
    # Assert: not blank, and the plot's line colours (first two series) are on screen
    assert img.std() > 0.05
    flat = img.reshape(-1, 3)
    for colour in PALETTE[:2]:
        close = np.abs(flat - _hex_rgb(colour)).max(axis=1) < 0.06
        assert close.sum() > 200, f"plot colour {colour} not found in the screenshot"
    # the verified banner's green is visible too
    green = np.abs(flat - _hex_rgb("#dff5e1")).max(axis=1) < 0.03
    assert green.sum() > 1000
    if os.environ.get("FEDMTL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FEDMTL_KEEP_SCREENSHOT"])
