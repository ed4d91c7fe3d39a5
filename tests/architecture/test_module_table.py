"""docs/architecture.md's ``## Modules`` table lists every module of the package, each in the
layer the ``.importlinter`` contracts put it in (no syft, fast)."""

from __future__ import annotations

import configparser
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"


def _walker():
    spec = importlib.util.spec_from_file_location("_import_cycles", Path(__file__).with_name("test_import_cycles.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer_items(value: str) -> list[list[str]]:
    """A layers option, top first; each layer as its sibling names."""
    return [[x.strip() for x in re.split(r"[|:]", line) if x.strip()] for line in value.strip().splitlines()]


def contract_layers() -> tuple[list[list[str]], dict[str, list[list[str]]]]:
    """The one-way layers (full module names) and the layers of each container."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".importlinter")
    top: list[list[str]] = []
    containers: dict[str, list[list[str]]] = {}
    for section in cfg.sections():
        if cfg.get(section, "type", fallback="") != "layers":
            continue
        if cfg.has_option(section, "containers"):
            for c in cfg.get(section, "containers").split():
                containers[c] = _layer_items(cfg.get(section, "layers"))
        else:
            top = _layer_items(cfg.get(section, "layers"))
    return top, containers


BASE = ("fedmtl.schema", "fedmtl.errors", "fedmtl.fsutil", "fedmtl.interrupts")


def layer_of(module: str) -> str:
    """The layer name a module has by the contracts: ``base`` (fedmtl, errors, fsutil, interrupts, schema),
    ``models``, ``privacy``, ``contract``, ``datasites`` or ``datasites.<its layer>``,
    ``researcher``, ``cli``."""
    top, containers = contract_layers()
    names = [n for layer in top for n in layer]
    hits = [n for n in names if module == n or module.startswith(n + ".")]
    if not hits:
        assert module == "fedmtl", f"{module} is in no layer of .importlinter"
        return "base"
    pkg = max(hits, key=len)
    if pkg in BASE:
        return "base"
    name = pkg.removeprefix("fedmtl.")
    if pkg == "fedmtl.datasites" and pkg in containers and module != pkg:
        rest = module[len(pkg) + 1:].split(".")[0]
        for layer in containers[pkg]:
            if rest in layer:
                return f"{name}.{rest}"
        raise AssertionError(f"{module} is in no layer of the {pkg} contract")
    return name


def table_rows() -> dict[str, str]:
    """``module -> layer`` from the ``## Modules`` table of docs/architecture.md."""
    text = DOC.read_text()
    assert "\n## Modules\n" in text, "docs/architecture.md has no '## Modules' section"
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([\w.]+)`\s*\|\s*`?([\w.]+)`?\s*\|", line)
        if m:
            assert m[1] not in rows, f"{m[1]} has two rows"
            rows[m[1]] = m[2]
    return rows


def test_every_module_has_one_row_and_no_row_is_stale():
    # Prepare
    tree = set(_walker().package_modules(REPO))
    rows = set(table_rows())
    # Assert
    assert not tree - rows, f"add rows for: {sorted(tree - rows)}"
    assert not rows - tree, f"stale rows (no such module): {sorted(rows - tree)}"


def test_each_row_names_the_layer_the_contracts_give():
    rows = table_rows()
    wrong = {m: (layer, layer_of(m)) for m, layer in rows.items() if layer != layer_of(m)}
    assert not wrong, "module: (table, contracts): " + repr(wrong)


def test_every_contract_layer_appears_in_the_table():
    # Prepare
    top, containers = contract_layers()
    expected = {"base"}
    for layer in top:
        for n in layer:
            if n not in BASE:
                expected.add(n.removeprefix("fedmtl."))
    for layer in containers.get("fedmtl.datasites", []):
        expected.update(f"datasites.{n}" for n in layer)
    # Assert
    assert not expected - set(table_rows().values()), sorted(expected - set(table_rows().values()))
