"""What several benchmarks share: the source tree laid out as installed, and the machine
facts every result JSON records. Imported by the benchmark scripts (run as
``python benchmarks/NAME.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Sequence

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
