"""One real federation for the whole security suite.

The trust model (DESIGN.md, "Trust model") says a researcher is malicious: they hold a
valid account, read our source and submit anything syft 0.9.5 accepts with the raw syft
client. Every test here plays such a researcher against three datasites launched exactly
as ``fedmtl datasite launch`` does (a server subprocess per home, the DEFAULT policy, the
owners pinning each other) and FAILS when the attack succeeds.

``federation`` (session-scoped) is a :class:`security_kit.Federation`: the running
datasites (``general``, ``riverside``, ``st-mary``), researcher accounts made on demand,
connected sessions, legit jobs and the raw-submission helpers. Tests import the kit as
``import security_kit as K`` (registered here: pytest runs with --import-mode=importlib,
so sibling modules are not importable by path).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fedmtl.datasites.server.launch import free_port, launch


def _register_security_kit() -> None:
    name = "security_kit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)


_register_security_kit()


@pytest.fixture(scope="session")
def federation(tmp_path_factory):
    """Three datasites launched as ``fedmtl datasite launch`` does (default policy), the
    owners pinning each other (name + identity fingerprint); stopped at the end."""
    import security_kit as K

    from fedmtl.datasites.data.cohort import prepare

    out = tmp_path_factory.mktemp("security-cohort")
    files = prepare(out, sites=3, seed=0)
    homes = tmp_path_factory.mktemp("security-homes")
    handles = []
    try:
        for f in files:
            h = launch(home=homes / f.name, name=f.name, records=f.records, schema=f.schema, port=free_port())
            handles.append(h)
        from fedmtl.datasites.server.peers import pin_federation  # lazily: it may land after collection

        pin_federation([h.home for h in handles])
        fed = K.Federation(handles, tmp_path_factory.mktemp("security-jobs"))
        fed.ensure_account(K.ATTACKER)
        yield fed
    finally:
        for h in handles:
            h.stop()

