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
    name = "st-mary"                    # optional: how a site that is down is named

A site that does not answer does not stop :meth:`Session.connect`: it is recorded in
``session.down`` (its ``name``, else its URL -> why) and can join later through
:meth:`Session.reconnect` (a running job does that itself before each pass; see
:meth:`fedmtl.researcher.job.Job.run`'s ``rejoin_wait``).
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import httpx
import pandas as pd

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.server.launch import parse_meta
from fedmtl.datasites.site import syftio
from fedmtl.datasites.site.identity import PublicIdentity
from fedmtl.errors import ConfigError, CredentialsError, DatasiteError
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


def _open(e: Mapping[str, Any]) -> SiteConnection:
    """Log in to one sites-file entry and read its fedmtl dataset."""
    if not answers(e["url"]):
        raise DatasiteError(f"cannot reach the datasite at {e['url']} (no answer); is it running?")
    client = syftio.login(e["url"], e["email"], e["password"])
    try:
        with syftio.quiet():
            datasets = list(client.datasets.get_all())
    except Exception as err:  # noqa: BLE001 - the site went away between login and listing
        raise DatasiteError(f"cannot reach the datasite at {e['url']} ({type(err).__name__}); is it running?") \
            from None
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
    if e.get("name") and e["name"] != conn.name:
        raise DatasiteError(f"{e['url']} is site {conn.name!r}, not {e['name']!r} as the sites file names it; "
                            "fix the sites file")
    return conn


def answers(url: str, *, timeout: float = 2.0) -> bool:
    """Whether a server answers at ``url`` (syft's metadata route, no login): a quick check
    before the login, which retries for seconds against a closed port.

    Args:
        url: the datasite's base URL.
        timeout: seconds to wait for the answer.

    Returns:
        True when it answered with HTTP 200.
    """
    try:
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or True  # as syft's
        return httpx.get(url.rstrip("/") + "/api/v2/metadata", timeout=timeout, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def _unreachable(err: DatasiteError) -> bool:
    """Whether ``err`` says the site could not be reached (down), not that it answered wrongly."""
    return str(err).startswith("cannot reach the datasite")


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Session:
    """Connected datasites, by name, and the ones that did not answer.

    Attributes:
        sites: site name -> its :class:`SiteConnection`.
        down: the sites-file entries that did not answer, keyed by their ``name`` (else
            their URL) -> why; :meth:`reconnect` moves one back into ``sites``.
    """

    def __init__(self, sites: Mapping[str, SiteConnection], *, down: Mapping[str, str] | None = None,
                 entries: Mapping[str, Mapping[str, Any]] | None = None):
        self.sites: dict[str, SiteConnection] = dict(sites)
        self.down: dict[str, str] = dict(down or {})
        #: key (site name once connected, else the entry's ``name`` or URL) -> sites-file entry
        self._entries: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (entries or {}).items()}

    @classmethod
    def connect(cls, sites: str | Path | Sequence[Mapping[str, Any]], *,
                log: Callable[[str], None] | None = None) -> "Session":
        """Log in to every site and read its dataset's schema, counts and public keys.

        A site that cannot be reached is recorded in :attr:`down` (and a line says so)
        instead of stopping the others; it can join later (:meth:`reconnect`).

        Args:
            sites: a sites file (TOML), or dicts with ``url``, ``email``, ``password`` and
                optionally a pinned ``fingerprint`` and a ``name``.
            log: where the line about down sites goes (default: standard error).

        Returns:
            The session.

        Raises:
            ConfigError: no sites, an entry is malformed, or two entries are one site.
            CredentialsError: a site refused the login (wrong email or password).
            DatasiteError: a site is not a fedmtl datasite or presents another key than
                the pinned one, or no site answered at all.
        """
        entries = load_sites_file(sites) if isinstance(sites, (str, Path)) else [dict(e) for e in sites]
        if not entries:
            raise ConfigError("no sites to connect to")
        conns: dict[str, SiteConnection] = {}
        down: dict[str, str] = {}
        keyed: dict[str, dict[str, Any]] = {}
        for e in entries:
            key = str(e.get("name") or e["url"])
            try:
                conn = _open(e)
            except CredentialsError:
                raise  # the site answered: a problem to fix, not an outage
            except DatasiteError as err:
                if not _unreachable(err):
                    raise
                if key in down or key in conns:
                    raise ConfigError(f"two entries connect to site {key!r}") from None
                down[key], keyed[key] = str(err), e
                continue
            if conn.name in conns or conn.name in down:
                raise ConfigError(f"two entries connect to site {conn.name!r}")
            conns[conn.name], keyed[conn.name] = conn, e
        if not conns:
            raise DatasiteError("no datasite answered: " + "; ".join(f"{k}: {why}" for k, why in down.items()))
        session = cls(conns, down=down, entries=keyed)
        if down:
            (log or _stderr)(f"connected to {', '.join(sorted(conns))}; down: "
                             + "; ".join(f"{k} ({why})" for k, why in sorted(down.items()))
                             + ". A down site can join later (session.reconnect)")
        return session

    def reconnect(self, site: str, *, verify_key: str | None = None) -> SiteConnection:
        """Log in again to ``site`` (a connected site's name, or a key of :attr:`down`, or a
        URL of the sites file) and use the fresh connection from now on (the syft transport
        and the data plane read it from this session).

        Args:
            site: the site's name, its :attr:`down` key, or its URL.
            verify_key: the Ed25519 key (hex) the site must present (e.g. a job's roster
                entry for it); checked before the connection is used.

        Returns:
            The new :class:`SiteConnection`; the site is no longer in :attr:`down`.

        Raises:
            ConfigError: no entry of this session is ``site``.
            DatasiteError: the site is still unreachable (kept in :attr:`down` with the
                reason), or it now presents another name or identity key than before.
            CredentialsError: the site refused the login.
        """
        key = self._key_of(site)
        entry = self._entries[key]
        try:
            conn = _open(entry)
        except DatasiteError as err:
            if _unreachable(err):
                self.down[key] = str(err)
            raise
        before = self.sites.get(key)
        expected = before.name if before is not None else entry.get("name")
        if expected and conn.name != expected:
            raise DatasiteError(f"{entry['url']} now presents site {conn.name!r}, not {expected!r}; "
                                "check the sites file and ask the owner which datasite runs there")
        if before is not None and conn.identity.fingerprint != before.identity.fingerprint:
            raise DatasiteError(
                f"{conn.name} at {entry['url']} now presents identity key {conn.identity.fingerprint[:16]}..., "
                f"not the {before.identity.fingerprint[:16]}... it presented before; do not proceed until "
                "the site's owner confirms the key")
        if verify_key is not None and conn.identity.verify_key.to_bytes().hex() != verify_key:
            raise DatasiteError(f"{conn.name} at {entry['url']} now presents identity key "
                                f"{conn.identity.fingerprint[:16]}..., not the one the job's roster holds; do not "
                                "proceed until the site's owner confirms the key")
        if conn.name != key and conn.name in self.sites:
            raise ConfigError(f"{site!r} connects to site {conn.name!r}, which this session already holds")
        self.down.pop(key, None)
        del self._entries[key]
        self._entries[conn.name] = entry
        self.sites[conn.name] = conn
        return conn

    def url_of(self, site: str) -> str | None:
        """The URL the sites file gives for ``site`` (a name, a :attr:`down` key or a URL),
        or ``None`` when this session has no entry for it."""
        try:
            return str(self._entries[self._key_of(site)]["url"])
        except ConfigError:
            return None

    def answers(self, site: str, *, timeout: float = 2.0) -> bool:
        """Whether ``site``'s server answers now (no login; see :func:`answers`).

        Args:
            site: a site name, a :attr:`down` key or a URL of the sites file.
            timeout: seconds to wait.

        Returns:
            True when it answered.

        Raises:
            ConfigError: this session has no entry for ``site``.
        """
        return answers(self._entries[self._key_of(site)]["url"], timeout=timeout)

    def down_key(self, name: str, url: str | None = None) -> str | None:
        """The :attr:`down` key of the site ``name`` (or at ``url``), or ``None`` if it is
        not down."""
        if name in self.down:
            return name
        if url is not None:
            for key, entry in self._entries.items():
                if key in self.down and _same_url(entry.get("url", ""), url):
                    return key
        return None

    def _key_of(self, site: str) -> str:
        if site in self._entries:
            return site
        for key, entry in self._entries.items():
            if _same_url(entry.get("url", ""), site):
                return key
        known = sorted(self._entries)
        raise ConfigError(f"this session has no site {site!r} (its sites: {known}); connect with a sites file "
                          "that lists it")

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
