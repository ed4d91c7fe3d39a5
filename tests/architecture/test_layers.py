"""The architecture contracts (.importlinter) hold for this tree, and they catch an upward
import: .ci/lint is run on a temporary copy of the package folders with one import
added that points the wrong way."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("fedmtl", "models", "privacy", "datasites", "researcher")


def _copy_tree(dst: Path) -> Path:
    for name in FOLDERS:
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".importlinter", "pyproject.toml"):
        shutil.copy(REPO / name, dst / name)
    return dst


def _lint(repo: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(["bash", str(REPO / ".ci" / "lint"), str(repo)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def lint_bin_available():
    if shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("lint-imports is not installed: install the test extra (pip install -e '.[test]')")


def test_the_tree_keeps_every_contract(tmp_path, lint_bin_available):
    # Execute
    res = _lint(_copy_tree(tmp_path))
    # Assert
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "5 kept, 0 broken" in res.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("models/flat.py", "import fedmtl.researcher.session  # noqa: F401\n", "One-way layers"),
        ("privacy/accounting.py", "import fedmtl.datasites.ledger.ledger  # noqa: F401\n", "One-way layers"),
        ("datasites/runtime.py", "import fedmtl.researcher.job  # noqa: F401\n", "One-way layers"),
        ("fedmtl/schema.py", "import fedmtl.models  # noqa: F401\n", "One-way layers"),
        ("datasites/rules/review.py", "import syft  # noqa: F401\n", "Only the syft-facing modules import syft"),
        ("datasites/ledger/ledger.py", "from cryptography.hazmat.primitives import hashes  # noqa: F401\n",
         "Only fedmtl.privacy.keys imports cryptography"),
        ("datasites/ledger/site_ledger.py", "import fedmtl.datasites.review.autoreview  # noqa: F401\n",
         "The owner's side in layers"),
        ("datasites/site/home.py", "import fedmtl.datasites.data.records  # noqa: F401\n", "The owner's side in layers"),
        ("fedmtl/contract/wire.py", "import fedmtl.contract.passes  # noqa: F401\n", "The round contract in layers"),
    ],
)
def test_an_import_that_breaks_a_contract_fails_the_lint(tmp_path, lint_bin_available, module, line, contract):
    # Prepare: a copy of the tree with one forbidden import added at the end of a module
    repo = _copy_tree(tmp_path)
    path = repo / module
    path.write_text(path.read_text() + "\n" + line)
    # Execute
    res = _lint(repo)
    # Assert
    assert res.returncode != 0
    broken = res.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, res.stdout[-3000:]
