"""No import cycles, counting every import statement (those inside functions too): no module
imports itself through others, and no two folders import each other (each package folder
counted on its own: fedmtl/*.py, fedmtl/contract/, datasites/*.py, datasites/ledger/, ...).

The algorithm of the issue's measurement (/work/shared/tools/import_cycles.py), with each
subpackage as its own folder. import-linter's contracts see function-local imports too, but
only between the layers they name; this test looks at every pair.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def package_modules(repo: Path = REPO) -> dict[str, Path]:
    """Every module of the installed package, by dotted name -> its file, walking pyproject's
    package-dir (a folder mapped to a subpackage is left out of its parent's walk).

    Args:
        repo: the repository root (holds pyproject.toml).

    Returns:
        ``{"fedmtl.contract.jobspec": Path(...), ...}``; a package is named by its
        ``__init__.py`` as the package itself.
    """
    pp = tomllib.loads((repo / "pyproject.toml").read_text())
    pkgdir = pp["tool"]["setuptools"]["package-dir"]
    roots = {folder: pkg for pkg, folder in pkgdir.items() if pkg}
    mods: dict[str, Path] = {}
    for folder, pkg in roots.items():
        for f in sorted((repo / folder).rglob("*.py")):
            rel = f.relative_to(repo / folder).with_suffix("").parts
            if folder == "fedmtl" and rel[0] in {d for d in roots if d != "fedmtl"}:
                continue
            if "__pycache__" in rel:
                continue
            mods[".".join((pkg,) + tuple(p for p in rel if p != "__init__"))] = f
    return mods


def import_edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, from every import statement in its file
    (module level and inside functions), relative imports resolved; an import of a name
    from a package counts as an import of the submodule when one has that name."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        here = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for n in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    base = ".".join(here[: len(here) - n.level + 1] + ([base] if base else []))
                targets = [base + "." + a.name for a in n.names] + [base]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + ".") and not (
                    f.name == "__init__.py" and t.startswith(m + ".")
                ):
                    edges[m].add(t)
    return edges


def module_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def folder_of(module: str, mods: dict[str, Path]) -> str:
    """The folder that holds ``module``'s file, relative to the repository (``datasites/ledger``)."""
    return str(mods[module].parent.relative_to(REPO))


def folder_pairs(edges: dict[str, set[str]], mods: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    """Pairs of folders that import each other, each with a few of the imports."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            fa, fb = folder_of(a, mods), folder_of(b, mods)
            if fa != fb:
                pairs.setdefault((fa, fb), []).append(f"{a} -> {b}")
    out = []
    for (fa, fb), ex in sorted(pairs.items()):
        if fa < fb and (fb, fa) in pairs:
            out.append((fa, fb, sorted(ex)[:3] + sorted(pairs[(fb, fa)])[:3]))
    return out


def test_the_walk_finds_the_package():
    mods = package_modules()
    # Assert: the walk sees every layer (a broken package-dir would make the checks vacuous)
    for m in ("fedmtl.errors", "fedmtl.contract.jobspec", "fedmtl.models", "fedmtl.privacy.dp",
              "fedmtl.datasites.runtime", "fedmtl.datasites.ledger.site_ledger", "fedmtl.researcher.job",
              "fedmtl.cli"):
        assert m in mods, sorted(mods)
    edges = import_edges(mods)
    assert "fedmtl.datasites.runtime" in edges["fedmtl.datasites.template"]  # a function-local import


def test_no_module_import_cycle():
    edges = import_edges(package_modules())
    assert module_cycles(edges) == []


def test_no_two_folders_import_each_other():
    mods = package_modules()
    pairs = folder_pairs(import_edges(mods), mods)
    assert pairs == [], "\n".join(f"{a} <-> {b}: {'; '.join(ex)}" for a, b, ex in pairs)


def test_a_cycle_is_found():
    # Prepare: a two-module cycle made of function-local imports
    edges = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    # Assert
    assert module_cycles(edges) == [["p.a", "p.b"]]
