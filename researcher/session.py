"""A researcher's connection to N datasites.

>>> session = Session.connect("sites.toml")                    # doctest: +SKIP
>>> session.schemas["st-mary"], session.mock("st-mary").head()  # doctest: +SKIP
>>> job = session.submit(spec, out="runs/job1")                # doctest: +SKIP

A sites file (TOML)::

    [[sites]]
    url = "http://127.0.0.1:8081"
    email = "ada@uni.example"
    password_env = "ST_MARY_PASSWORD"   # or: password = "..."
    fingerprint = "9f2c..."             # optional: pin the site's Ed25519 key
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.server.launch import parse_meta
from fedmtl.datasites.site import syftio
from fedmtl.datasites.site.identity import PublicIdentity
from fedmtl.errors import ConfigError, DatasiteError
from fedmtl.researcher.job import Job
from fedmtl.schema import Schema


@dataclass
class SiteConnection:
    """One connected datasite: its client, dataset, schema, counts and public keys."""

    name: str
    url: str
    email: str
    client: Any = field(repr=False)
    dataset: Any = field(repr=False)
    meta: dict[str, Any] = field(repr=False)

    @property
    def schema(self) -> Schema:
        return Schema.from_dict(self.meta["schema"], source=f"{self.name}'s schema")

    @property
    def identity(self) -> PublicIdentity:
        return PublicIdentity.from_dict(self.meta["identity"])

    @property
    def asset(self):
        with syftio.quiet():
            return self.dataset.assets[0]

    @property
    def label_counts(self) -> dict[str, Any]:
        return self.meta["label_counts"]

    @property
    def n_records(self) -> int:
        return int(self.meta["n_records"])

    def mock(self):
        with syftio.quiet():
            return self.asset.mock


def load_sites_file(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read sites file {path}: {e}") from e
    sites = data.get("sites")
    if not isinstance(sites, list) or not sites:
        raise ConfigError(f"{path}: declare one [[sites]] table per datasite (url, email, password_env)")
    out = []
    for i, s in enumerate(sites, 1):
        missing = [k for k in ("url", "email") if k not in s]
        if missing:
            raise ConfigError(f"{path}: [[sites]] #{i} lacks {missing}")
        pw = s.get("password")
        if pw is None and s.get("password_env"):
            pw = os.environ.get(s["password_env"])
            if pw is None:
                raise ConfigError(f"{path}: [[sites]] #{i}: environment variable {s['password_env']} is not set")
        if pw is None:
            raise ConfigError(f"{path}: [[sites]] #{i} needs password or password_env")
        out.append({**s, "password": pw})
    return out


class Session:
    """Connected datasites, by name."""

    def __init__(self, sites: Mapping[str, SiteConnection]):
        self.sites: dict[str, SiteConnection] = dict(sites)

    @classmethod
    def connect(cls, sites: str | Path | Sequence[Mapping[str, Any]]) -> "Session":
        """Log in to every site (a sites file, or dicts with url, email, password and an
        optional pinned ``fingerprint``), read its dataset's schema, counts and public keys."""
        entries = load_sites_file(sites) if isinstance(sites, (str, Path)) else list(sites)
        if not entries:
            raise ConfigError("no sites to connect to")
        conns: dict[str, SiteConnection] = {}
        for e in entries:
            client = syftio.login(e["url"], e["email"], e["password"])
            with syftio.quiet():
                datasets = list(client.datasets.get_all())
            found = None
            for ds in datasets:
                try:
                    found = (ds, parse_meta(ds.description.text))
                    break
                except DatasiteError:
                    continue
            if found is None:
                raise DatasiteError(f"{e['url']} publishes no fedmtl dataset; is it a fedmtl datasite?")
            ds, meta = found
            conn = SiteConnection(meta["site"], e["url"], e["email"], client, ds, meta)
            ident = conn.identity  # parses and checks the key encodings
            if e.get("fingerprint") and e["fingerprint"] != ident.fingerprint:
                raise DatasiteError(
                    f"{conn.name} at {e['url']} presents identity key {ident.fingerprint[:16]}..., "
                    f"not the pinned {e['fingerprint'][:16]}...; do not proceed until the site's "
                    "owner confirms the key"
                )
            if conn.name in conns:
                raise ConfigError(f"two entries connect to site {conn.name!r}")
            conns[conn.name] = conn
        return cls(conns)

    @property
    def schemas(self) -> dict[str, Schema]:
        return {n: s.schema for n, s in self.sites.items()}

    def mock(self, site: str):
        return self._site(site).mock()

    def _site(self, name: str) -> SiteConnection:
        if name not in self.sites:
            raise ConfigError(f"not connected to {name!r}; connected: {sorted(self.sites)}")
        return self.sites[name]

    def overview(self) -> pd.DataFrame:
        """One row per site and task: labelled and positive counts (no record values)."""
        rows = []
        for name, s in self.sites.items():
            for task, c in s.label_counts.items():
                rows.append({"site": name, "task": task, "labelled": c.get("labelled"), "positive": c.get("positive")})
        return pd.DataFrame(rows)

    def job(self, spec: JobSpec, *, out: str | Path) -> Job:
        """A job (not yet submitted) of ``spec`` over the connected sites."""
        return Job.create(self, spec, out=out)

    def submit(self, spec: JobSpec, *, out: str | Path) -> Job:
        """Validate ``spec`` against the sites and send one code request per site."""
        job = self.job(spec, out=out)
        job.submit()
        return job
