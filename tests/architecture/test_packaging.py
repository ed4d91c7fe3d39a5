"""pyproject's ``packages`` lists exactly the folders that are packages (have an
``__init__.py``), under the package-dir roots: a new subpackage left out of the list would
be missing from a wheel, and a stale entry would fail the build."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_packages_are_the_folders_with_an_init():
    # Prepare
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkgdir = setup["package-dir"]
    roots = {folder: pkg for pkg, folder in pkgdir.items() if pkg}
    found = set()
    for folder, pkg in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            if folder == "fedmtl" and rel and rel[0] in {d for d in roots if d != "fedmtl"}:
                continue
            found.add(".".join((pkg, *rel)))
    # Assert
    assert sorted(setup["packages"]) == sorted(found)
    # only the review console ships non-.py files (its templates and CSS), and they exist
    data = setup.get("package-data", {})
    assert set(data) == {"fedmtl.datasites.console"}
    for pattern in data["fedmtl.datasites.console"]:
        assert list((REPO / "datasites" / "console").glob(pattern)), pattern
