"""`fedmtl demo --quick` end to end: real datasites, the job, comparisons, report, audits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmtl.datasites import home as home_mod

CHROMIUM = "/usr/bin/chromium"


def _no_datasite_running(out: Path) -> bool:
    return all(home_mod.running(h) is None for h in (out / "sites").iterdir())


@pytest.mark.integration
@pytest.mark.slow
def test_quick_demo_writes_report_and_stops_sites(tmp_path):
    # Execute
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "fedmtl.cli", "demo", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=1500)
    # Assert: success, progress shown, syft's own chatter kept out of the way
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[5/5]" in run.stdout
    assert "SyftSuccess" not in run.stdout + run.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    tasks = report["tasks"]
    assert len(tasks) == 5
    # every method has a real AUROC per task (a site lacking a task still has the others)
    fed = report["federated"]["final_auroc"]
    assert all(0.3 < fed[t] < 1.0 for t in tasks)
    comp = report["comparisons"]
    for key in ("pooled_mtl", "pooled_mtl_dp", "local_mtl", "federated_mtl_nodp", "federated_single_task"):
        assert all(comp[key]["final_auroc"][t] is not None for t in tasks), key
    assert {"1.0", "3.0"} <= set(comp["epsilon_sweep"])
    assert all(abs(e - 3.0) < 0.05 for e in report["federated"]["epsilon"].values())
    assert all(a["verified"] for a in report["audit"].values())
    assert (out / "report" / "audit" / "st-mary" / "report.html").exists()
    assert _no_datasite_running(out)
    # the report opens in headless Chromium with its tables and plots
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (.ci/run installs it)")
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom", (out / "report" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert 'id="results"' in dom and dom.count("<img") >= 2
    assert "federated multi-task, DP (datasites)" in dom


@pytest.mark.integration
@pytest.mark.slow
def test_ctrl_c_stops_the_datasites(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "fedmtl.cli", "demo", "--quick", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "[3/5]" in line:
            break
        assert proc.poll() is None, seen
    # Execute: Ctrl-C while the job runs
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    # Assert: it stopped every datasite and said so
    assert proc.returncode == 130, seen + rest
    assert "datasites stopped" in rest
    assert _no_datasite_running(out)
    for h in (out / "sites").iterdir():
        info = (h / "server.pid")
        assert not info.exists()
