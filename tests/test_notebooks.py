"""The three notebooks in ``notebooks/``: committed without outputs, and each executes end
to end (nbclient, a kernel on this interpreter) against real datasites it launches itself,
leaving no datasite running."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("data_owner.ipynb", "researcher.ipynb", "compliance.ipynb")
CELL_TIMEOUT = 600  # seconds per cell; launching three datasites on a busy 2-core machine
KERNEL = "fedmtl-test-kernel"
SERVER_MODULE = "fedmtl.datasites.server"


# ----------------------------------------------------------------------------- helpers


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(cell) -> str:
    """Everything a code cell showed: streams (as written), plain-text and HTML results,
    error tracebacks."""
    parts = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            if parts and parts[-1][0] == "stream":
                parts[-1] = ("stream", parts[-1][1] + o.text)  # a stream may arrive in chunks
            else:
                parts.append(("stream", o.text))
        elif o.output_type in ("execute_result", "display_data"):
            parts.append(("data", o.data.get("text/plain", "") + "\n" + o.data.get("text/html", "")))
        elif o.output_type == "error":
            parts.append(("error", "\n".join(o.traceback)))
    return "\n".join(text for _, text in parts)


def _out(nb, snippet: str) -> str:
    """The output of the first code cell whose source contains ``snippet``."""
    return next(_text(c) for c in _code_cells(nb) if snippet in c.source)


def _all_text(nb) -> str:
    return "\n".join(_text(c) for c in _code_cells(nb))


def _images(nb) -> int:
    return sum(
        1 for c in _code_cells(nb) for o in c.get("outputs", [])
        if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
    )


def _servers_under(root: Path) -> list[int]:
    """Pids of datasite servers whose home lies under ``root`` (read from /proc)."""
    root_s = str(root.resolve())
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args]
        if SERVER_MODULE in args and "--home" in args:
            home = args[args.index("--home") + 1] if args.index("--home") + 1 < len(args) else ""
            if home.startswith(root_s):
                pids.append(int(d.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(") ", 1)[1][0] != "Z"  # a zombie is gone
    except (OSError, IndexError):
        return False


def _execute(name: str, tmp_path: Path, monkeypatch, params: str | None = None):
    """Execute ``notebooks/name`` with the working folder under ``tmp_path``; always stop
    any datasite it left running, and fail if there was one."""
    from nbclient import NotebookClient

    # a kernel spec that runs exactly this interpreter (the project's venv)
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fedmtl test kernel", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("TMPDIR", str(work))  # the notebook's tempfile.mkdtemp() lands here

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if params is not None:
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        cell.source = params
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        leftover = _servers_under(tmp_path)
        _kill(leftover)
    assert not leftover, f"{name} left {len(leftover)} datasite(s) running"
    # the last cell stopped every site and removed the notebook's temporary folder (torch
    # may leave its own compile cache there)
    left = [p.name for p in work.iterdir() if p.name.startswith("fedmtl-")]
    assert left == [], f"{name} did not remove its working folder: {left}"
    return nb


# ----------------------------------------------------------------------------- fast


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs_and_cleans_up_last(name):
    # Prepare
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Assert: valid, outputs stripped, the last code cell stops what the notebook started
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert cells
    for c in cells:
        assert c.outputs == [], f"{name}: a code cell has outputs; strip them before committing"
        assert c.execution_count is None, f"{name}: a code cell has an execution count"
    assert "stop_all()" in cells[-1].source and "rmtree(WORK" in cells[-1].source
    assert "atexit.register(stop_all)" in cells[0].source


# ----------------------------------------------------------------------------- executed


@pytest.mark.integration
@pytest.mark.slow
def test_data_owner_notebook(tmp_path, monkeypatch):
    # Execute
    nb = _execute("data_owner.ipynb", tmp_path, monkeypatch)
    # Assert: policy shown, datasite launched, researcher added, counts published, no requests
    text = _all_text(nb)
    assert "min_noise_multiplier = 0.8" in text and 'name = "fedmtl_round"' in text
    assert "datasite riverside running at http://127.0.0.1:" in text
    assert "researchers: ada@uni.example" in text
    assert "pending requests: 0" in text
    counts = _out(nb, "label_counts = pd.DataFrame")
    dys = next(line for line in counts.splitlines() if line.startswith("dyslipidemia_5y"))
    assert dys.split()[1:4] == ["binary", "0", "3896"]  # riverside lacks this task
    assert "ledger verified: True" in text
    assert "status: stopped" in _text(_code_cells(nb)[-1])


@pytest.mark.integration
@pytest.mark.slow
def test_researcher_notebook(tmp_path, monkeypatch):
    # Execute
    nb = _execute("researcher.ipynb", tmp_path, monkeypatch)
    text = _all_text(nb)
    # Assert: dry run, approval at every site, two rounds, an AUROC table of the final model
    # (only the final pass releases noised, charged evaluation statistics by default)
    assert "dry run ok: True" in text
    status = _out(nb, "job.submit()")
    assert status.count("approved") >= 3 and "denied" not in status
    assert "2 rounds in" in text
    table = _out(nb, "table = result.metrics_table()")
    lines = table.splitlines()
    assert lines[0] == "pooled test AUROC per task and round"
    assert {"diabetes_5y", "htn_5y", "dyslipidemia_5y"} <= set(lines[1].split())
    rows = [line.split() for line in lines[3:] if line.strip()]
    assert [r[0] for r in rows] == ["2"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])
    # the learning-curve plot was drawn; epsilon per site; predictions are probabilities
    assert _images(nb) >= 1
    eps = _out(nb, 'print("epsilon spent per site')
    for site in ("general", "riverside", "st-mary"):
        line = next(x for x in eps.splitlines() if x.strip().startswith(site))
        assert float(line.split()[1]) > 0
    assert "status: stopped" in _text(_code_cells(nb)[-1])
    assert _text(_code_cells(nb)[-1]).count("status: stopped") == 3


@pytest.mark.integration
@pytest.mark.slow
def test_compliance_notebook(tmp_path, monkeypatch):
    # Prepare: keep the exported reports outside the notebook's temporary folder
    reports = tmp_path / "reports"
    # Execute
    nb = _execute("compliance.ipynb", tmp_path, monkeypatch, params=f"REPORTS = Path({str(reports)!r})")
    text = _all_text(nb)
    # Assert: every ledger verified, approvals and denials listed, tampering caught
    for site in ("general", "riverside", "st-mary"):
        assert f"{site:10s} ledger VERIFIED" in text
    denied = _out(nb, 'print("denied requests')
    assert denied.count("noise") >= 3
    assert "tampered copy verified: False" in text and "was edited" in text
    assert _images(nb) >= 1
    # the exported reports exist, verified, with one finished and one denied request each
    for site in ("general", "riverside", "st-mary"):
        html = (reports / site / "report.html").read_text()
        assert "Ledger verified" in html
        data = json.loads((reports / site / "report.json").read_text())
        assert data["verification"]["ok"] is True
        assert sorted(r["status"] for r in data["requests"]) == ["denied", "finished"]
        assert data["epsilon_spent"]["dataset"][f"{site}-records"] > 0
    assert _text(_code_cells(nb)[-1]).count("status: stopped") == 3
