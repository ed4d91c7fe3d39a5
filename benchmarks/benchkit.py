"""What several benchmarks share: the source tree laid out as installed, and the machine
facts every result JSON records. Imported by the benchmark scripts (run as
``python benchmarks/NAME.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import importlib
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Sequence

#: the top-level folders pyproject installs as fedmtl.<name>
SUBPACKAGES = ("models", "privacy", "datasites", "researcher")


def layout_installed(src: Path, dst: Path) -> Path:
    """``src`` (a checkout) laid out as pyproject installs it: dst/fedmtl/{*,models,...}."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(src / "fedmtl", dst / "fedmtl", ignore=ignore)
    for d in SUBPACKAGES:
        shutil.copytree(src / d, dst / "fedmtl" / d, ignore=ignore)
    return dst


def machine_info(loadavg_before: Sequence[float]) -> dict:
    """CPU count, Python, platform and the load average before and now."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": [round(x, 2) for x in loadavg_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def fedmtl_attr(*places: str) -> Any:
    """The first of ``places`` (``"module:attr"``, or a dotted module path) that imports.

    A before/after benchmark runs the same worker code against two source trees; issue 20
    moved modules (``fedmtl.jobspec`` -> ``fedmtl.contract.jobspec``, ``fedmtl.datasites.launch``
    -> ``fedmtl.datasites.server.launch``, ...), so a worker names each thing at its new place
    and its old one.

    Raises:
        ImportError: none of ``places`` imports.
    """
    errors = []
    for place in places:
        mod_name, _, attr = place.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            errors.append(str(e))
            continue
        if not attr:
            return mod
        if hasattr(mod, attr):
            return getattr(mod, attr)
        errors.append(f"{mod_name} has no {attr}")
    raise ImportError(f"none of {places} imports: {errors}")


def grid_arg(text: str) -> list[dict]:
    """``--grid``: a JSON list of objects (argparse type)."""
    import argparse
    import json

    try:
        grid = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--grid is not JSON: {e}") from None
    if not isinstance(grid, list) or not all(isinstance(g, dict) for g in grid):
        raise argparse.ArgumentTypeError("--grid must be a JSON list of objects")
    return grid


def save_runs(out: Path, script: str, argv: Sequence[str], loadavg_before: Sequence[float], runs: list) -> None:
    """Write a sweep's ``runs`` so far to ``out`` with the command and the machine."""
    import json
    import shlex

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": f"python benchmarks/{script} " + shlex.join(argv),
                               "machine": machine_info(loadavg_before), "runs": runs}, indent=1) + "\n")
