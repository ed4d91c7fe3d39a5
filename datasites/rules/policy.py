"""The datasite policy: what a data owner allows to run on their records.

One file per datasite, TOML (or YAML with the same structure)::

    [review]
    approval = "auto"             # "auto": conforming requests are approved without a person
                                  # "manual": every request waits for `fedmtl datasite review`
    templates_only = true         # code that is not an allowed template is denied
                                  # (PySyft <= 0.9.5 runs approved code in the server
                                  # process with no isolation: advisory PYSEC-2026-546)
    release_per_site_metrics = false

    [privacy]
    accountant = "rdp"            # "rdp" | "prv", see fedmtl.privacy.accounting
    delta = 1e-5                  # every epsilon below is at this delta
    min_noise_multiplier = 0.8
    max_grad_norm = 2.0           # largest per-sample clipping norm allowed
    max_epsilon_per_job = 3.0
    dataset_epsilon_budget = 10.0     # all jobs of all researchers on this dataset, composed
    researcher_epsilon_budget = 5.0   # all jobs of one researcher on this dataset, composed

    [training]
    allowed_tasks = ["diabetes_5y", "fibrosis_stage"]   # label columns
    min_sites = 3                 # fewest participating sites (secure aggregation)
    min_secagg_threshold = 2      # smallest Shamir threshold t a job may use; review
                                  # also always requires t > n/2 of the job's roster
    max_rounds = 50
    max_local_epochs = 5

    [limits]                      # caps on what one job may make this site spend
    max_model_params = 2_000_000  # parameters of the whole multi-task network
    max_memory_mb = 2048          # estimated peak memory of one round
    max_local_steps = 5000        # optimiser steps per round
    max_eval_passes = 1           # passes that may release evaluation statistics
                                  # (the final evaluation counts as one; 0: none)
    min_eval_noise_multiplier = 2.0   # smallest noise on released evaluation statistics
    min_secagg_clip = 1e-3        # range allowed for the secure-aggregation clip
    max_secagg_clip = 10.0
    allowed_clipping = ["flat", "per_layer"]   # DP-SGD clipping modes
    max_sample_rate = 0.5         # largest Poisson sampling rate, in (0, 1]
    max_batch_size = 4096         # largest expected batch (sample_rate x records)
    max_width = 1024              # largest hidden layer
    max_layers = 8                # most hidden layers
    max_abs_weight = 1000.0       # largest |weight| a researcher may send for a pass; checked
                                  # before any record is read (trained demo models stay below 3)
    max_concurrent_jobs_per_researcher = 2   # one researcher's jobs training or evaluating
                                  # here at once (running or queued); one more is refused
    job_idle_close_s = 604800     # an approved job with no pass for this long (7 days) is
                                  # closed by the site (job_aborted) and its unspent passes
                                  # stop being reserved against the budgets

    [[templates]]
    name = "fedmtl.round.v1"
    sha256 = "3b1f..."            # sha256 of the template's exact source (UTF-8)

    [[peers]]                     # the federation: the other datasites a job may name
    name = "general"              # the peer's datasite name
    fingerprint = "9c0e..."       # hex sha256 of its raw Ed25519 identity key
                                  # (`fedmtl datasite status` prints a site's own)

A job's roster may only hold this datasite itself and pinned peers, each under its
pinned name with the key of its pinned fingerprint; this site's own name and key count
as pinned without being listed. Pin peers with ``fedmtl datasite peers add`` (recorded
in the ledger) or by listing them here.

Every key is checked; an unknown key, a wrong type or an out-of-range value raises
:class:`PolicyError` naming the key (``privacy.min_noise_multiplier``) and saying what
is expected. All problems are reported at once.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from fedmtl.errors import PolicyError
from fedmtl.fsutil import canonical_json

ADVISORY_ID = "PYSEC-2026-546"
ADVISORY_TEXT = (
    f"advisory {ADVISORY_ID} (critical): PySyft <= 0.9.5 runs approved code inside the "
    "datasite server process with no isolation, so approved code can read every asset, "
    "secret and key of this datasite; no fixed 0.9 release exists"
)
APPROVAL_MODES: tuple[str, ...] = ("auto", "manual")
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
CLIPPINGS: tuple[str, ...] = ("flat", "per_layer")  # fedmtl.privacy.dp clipping modes
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: the largest ``limits.max_abs_weight`` a policy may set: float32's largest finite value
MAX_ABS_WEIGHT_CEILING = 3.4e38
#: a datasite name (fedmtl.datasites.server.launch checks new sites against the same rule)
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def code_hash(code: str | bytes) -> str:
    """The sha256 (hex) a template is allowed by: the exact source, UTF-8 encoded."""
    data = code.encode("utf-8") if isinstance(code, str) else bytes(code)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Template:
    """A code template the owner allows: a name and the sha256 of its exact source."""

    name: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


@dataclass(frozen=True)
class Peer:
    """A peer datasite the owner pinned: its site name and the fingerprint (hex sha256
    of the raw Ed25519 public key, :meth:`fedmtl.privacy.keys.VerifyKey.fingerprint`) of
    its identity key, exchanged out of band."""

    name: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build with :meth:`load`, :meth:`from_dict` or :meth:`default`."""

    allowed_tasks: tuple[str, ...]
    templates: tuple[Template, ...] = ()
    approval: Literal["auto", "manual"] = "auto"
    templates_only: bool = True
    release_per_site_metrics: bool = False
    accountant: str = "rdp"
    delta: float = 1e-5
    min_noise_multiplier: float = 0.8
    max_grad_norm: float = 2.0
    max_epsilon_per_job: float = 3.0
    dataset_epsilon_budget: float = 10.0
    researcher_epsilon_budget: float = 5.0
    min_sites: int = 3
    min_secagg_threshold: int = 2
    max_rounds: int = 50
    max_local_epochs: int = 5
    # [limits]
    max_model_params: int = 2_000_000
    max_memory_mb: int = 2048
    max_local_steps: int = 5000
    max_eval_passes: int = 1
    min_eval_noise_multiplier: float = 2.0
    max_secagg_clip: float = 10.0
    min_secagg_clip: float = 1e-3
    allowed_clipping: tuple[str, ...] = CLIPPINGS
    max_sample_rate: float = 0.5
    max_batch_size: int = 4096
    max_width: int = 1024
    max_layers: int = 8
    max_abs_weight: float = 1000.0
    max_concurrent_jobs_per_researcher: int = 2
    #: seconds without a pass after which the site aborts an approved job (7 days)
    job_idle_close_s: int = 7 * 24 * 3600
    # [[peers]]
    peers: tuple[Peer, ...] = ()

    # ---------------------------------------------------------------- construction
    def __post_init__(self) -> None:
        for name in ("allowed_tasks", "allowed_clipping", "templates", "peers"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = _validate(self)
        if problems:
            raise PolicyError(problems)
        # canonical form: float keys as floats (``2`` and ``2.0`` hash alike), peers by name
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "peers", tuple(sorted(self.peers, key=lambda p: p.name)))

    @classmethod
    def default(
        cls,
        *,
        allowed_tasks: tuple[str, ...] | list[str],
        templates: tuple[Template, ...] | list[Template] | Mapping[str, str] = (),
        peers: tuple[Peer, ...] | list[Peer] | Mapping[str, str] = (),
        **overrides: Any,
    ) -> "Policy":
        """The conservative default: templates only, automatic approval of conforming
        requests, no per-site metrics, no peers pinned. ``templates`` may be
        ``{name: sha256}``, ``peers`` ``{site name: fingerprint}``; ``overrides`` are any
        other field (``max_rounds=20``, ``max_model_params=10**6``)."""
        if isinstance(templates, Mapping):
            templates = [Template(name=n, sha256=h) for n, h in templates.items()]
        if isinstance(peers, Mapping):
            peers = [Peer(name=n, fingerprint=f) for n, f in peers.items()]
        unknown = set(overrides) - set(_FIELDS)
        if unknown:
            raise PolicyError([f"unknown policy field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}"])
        if isinstance(overrides.get("allowed_clipping"), list):
            overrides["allowed_clipping"] = tuple(overrides["allowed_clipping"])
        return cls(allowed_tasks=tuple(allowed_tasks), templates=tuple(templates), peers=tuple(peers), **overrides)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "policy") -> "Policy":
        """Build from the nested file structure (``[review]``, ``[privacy]``, ...)."""
        problems: list[str] = []
        if not isinstance(d, Mapping):
            raise PolicyError([f"expected a table at the top level, got {type(d).__name__}"], source)
        kwargs: dict[str, Any] = {}
        for section in d:
            if section not in _SECTIONS and section not in _ARRAYS:
                problems.append(
                    f"{section}: unknown section; known: {sorted([*_SECTIONS, *_ARRAYS])}"
                )
        for section, keys in _SECTIONS.items():
            table = d.get(section, {})
            if not isinstance(table, Mapping):
                problems.append(f"{section}: must be a table, got {type(table).__name__}")
                continue
            for key, value in table.items():
                if key not in keys:
                    problems.append(f"{section}.{key}: unknown key; known in [{section}]: {sorted(keys)}")
                    continue
                kwargs[key] = value
        if "allowed_tasks" not in kwargs:
            problems.append(
                "training.allowed_tasks: required; list the label columns researchers may train on"
            )
        templates = [Template(**t) for t in _array_of_tables(d, "templates", ("name", "sha256"), problems)]
        peers = [Peer(**t) for t in _array_of_tables(d, "peers", ("name", "fingerprint"), problems)]
        for name in ("allowed_tasks", "allowed_clipping"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        kwargs.setdefault("allowed_tasks", ())
        # validate the values too, so one run reports every problem
        unchecked = object.__new__(cls)
        for f in _DATACLASS_FIELDS:
            object.__setattr__(unchecked, f, kwargs.get(f, cls.__dataclass_fields__[f].default))
        object.__setattr__(unchecked, "templates", tuple(templates))
        object.__setattr__(unchecked, "peers", tuple(peers))
        problems += _validate(unchecked)
        if problems:
            raise PolicyError(problems, source)
        return cls(templates=tuple(templates), peers=tuple(peers), **kwargs)

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        """Read a ``.toml`` or ``.yaml``/``.yml`` policy file."""
        path = Path(path)
        if not path.is_file():
            raise PolicyError([f"no policy file at {path}"], str(path))
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = tomllib.loads(text)
        except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError
            raise PolicyError([f"cannot parse the file: {e}"], str(path)) from None
        return cls.from_dict(data, source=str(path))

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict[str, Any]:
        """The nested file structure; ``Policy.from_dict(p.to_dict()) == p``."""
        out: dict[str, Any] = {}
        for section, keys in _SECTIONS.items():
            out[section] = {}
            for k in keys:
                v = getattr(self, k)
                out[section][k] = list(v) if isinstance(v, tuple) else v
        out["templates"] = [t.to_dict() for t in self.templates]
        out["peers"] = [p.to_dict() for p in self.peers]
        return out

    def dumps(self) -> str:
        """TOML text of :meth:`to_dict`."""
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps(), encoding="utf-8")

    def hash(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`to_dict`; stable across runs,
        key order and file format."""
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()

    # ---------------------------------------------------------------- queries
    def template_for(self, code_sha256: str) -> Template | None:
        """The allowed template with this code hash, if any."""
        for t in self.templates:
            if t.sha256 == code_sha256:
                return t
        return None

    def peer_by_fingerprint(self, fingerprint: str) -> Peer | None:
        """The pinned peer whose identity key has this fingerprint, if any. Only listed
        peers: this datasite's own name and key are not in :attr:`peers`."""
        for p in self.peers:
            if p.fingerprint == fingerprint:
                return p
        return None

    def peer_by_name(self, name: str) -> Peer | None:
        """The pinned peer with this site name, if any."""
        for p in self.peers:
            if p.name == name:
                return p
        return None

    def with_peer(self, name: str, fingerprint: str) -> "Policy":
        """This policy with peer ``name`` pinned to ``fingerprint`` (a peer of that name
        already pinned is replaced). Raises :class:`PolicyError` if the values are invalid
        or the fingerprint is pinned under another name."""
        others = tuple(p for p in self.peers if p.name != name)
        return dataclasses.replace(self, peers=(*others, Peer(name=name, fingerprint=fingerprint)))

    def without_peer(self, name: str) -> "Policy":
        """This policy without peer ``name``; :class:`PolicyError` if it is not pinned."""
        if self.peer_by_name(name) is None:
            pinned = ", ".join(p.name for p in self.peers) or "none"
            raise PolicyError([f"peers: no peer named {name!r} is pinned (pinned: {pinned})"])
        return dataclasses.replace(self, peers=tuple(p for p in self.peers if p.name != name))


_SECTIONS: dict[str, tuple[str, ...]] = {
    "review": ("approval", "templates_only", "release_per_site_metrics"),
    "privacy": (
        "accountant",
        "delta",
        "min_noise_multiplier",
        "max_grad_norm",
        "max_epsilon_per_job",
        "dataset_epsilon_budget",
        "researcher_epsilon_budget",
    ),
    "training": ("allowed_tasks", "min_sites", "min_secagg_threshold", "max_rounds", "max_local_epochs"),
    "limits": (
        "max_model_params",
        "max_memory_mb",
        "max_local_steps",
        "max_eval_passes",
        "min_eval_noise_multiplier",
        "max_secagg_clip",
        "min_secagg_clip",
        "allowed_clipping",
        "max_sample_rate",
        "max_batch_size",
        "max_width",
        "max_layers",
        "max_concurrent_jobs_per_researcher",
        "max_abs_weight",
        "job_idle_close_s",
    ),
}
_ARRAYS: tuple[str, ...] = ("templates", "peers")  # [[templates]], [[peers]]
_SECTION_OF = {k: s for s, ks in _SECTIONS.items() for k in ks}
_FIELDS = tuple(_SECTION_OF)
_DATACLASS_FIELDS = _FIELDS
_FLOAT_FIELDS: tuple[str, ...] = (
    "delta",
    "min_noise_multiplier",
    "max_grad_norm",
    "max_epsilon_per_job",
    "dataset_epsilon_budget",
    "researcher_epsilon_budget",
    "min_eval_noise_multiplier",
    "max_secagg_clip",
    "min_secagg_clip",
    "max_sample_rate",
    "max_abs_weight",
)


def _array_of_tables(
    d: Mapping[str, Any], section: str, keys: tuple[str, ...], problems: list[str]
) -> list[dict[str, Any]]:
    """The tables of ``[[section]]`` that have exactly ``keys`` (problems recorded)."""
    raw = d.get(section, [])
    wanted = " and ".join(keys)
    if not isinstance(raw, list):
        problems.append(f"{section}: must be an array of tables ([[{section}]] {', '.join(keys)})")
        return []
    out: list[dict[str, Any]] = []
    for i, t in enumerate(raw):
        where = f"{section}[{i}]"
        if not isinstance(t, Mapping):
            problems.append(f"{where}: must be a table with {wanted}")
            continue
        extra = set(t) - set(keys)
        if extra:
            problems.append(f"{where}: unknown key(s) {sorted(extra)}; only {wanted}")
        if not all(k in t for k in keys):
            problems.append(f"{where}: needs both {wanted}")
            continue
        out.append({k: t[k] for k in keys})
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(p: Policy) -> list[str]:
    problems: list[str] = []

    def key(name: str) -> str:
        return f"{_SECTION_OF[name]}.{name}"

    if p.approval not in APPROVAL_MODES:
        problems.append(f"{key('approval')}: must be one of {list(APPROVAL_MODES)}, got {p.approval!r}")
    for name in ("templates_only", "release_per_site_metrics"):
        if not isinstance(getattr(p, name), bool):
            problems.append(f"{key(name)}: must be true or false, got {getattr(p, name)!r}")
    if p.accountant not in ACCOUNTANTS:
        problems.append(f"{key('accountant')}: must be one of {list(ACCOUNTANTS)}, got {p.accountant!r}")
    if not (_is_number(p.delta) and 0 < p.delta < 1):
        problems.append(f"{key('delta')}: must be a number in (0, 1) such as 1e-5, got {p.delta!r}")
    for name in (
        "min_noise_multiplier",
        "max_grad_norm",
        "max_epsilon_per_job",
        "dataset_epsilon_budget",
        "researcher_epsilon_budget",
    ):
        v = getattr(p, name)
        if not (_is_number(v) and v > 0):
            problems.append(f"{key(name)}: must be a finite number > 0, got {v!r}")
    if _is_number(p.max_epsilon_per_job) and _is_number(p.researcher_epsilon_budget):
        if p.max_epsilon_per_job > p.researcher_epsilon_budget + 1e-12:
            problems.append(
                f"{key('max_epsilon_per_job')}: {p.max_epsilon_per_job:g} is larger than "
                f"{key('researcher_epsilon_budget')} {p.researcher_epsilon_budget:g}; no job could use it"
            )
    if _is_number(p.researcher_epsilon_budget) and _is_number(p.dataset_epsilon_budget):
        if p.researcher_epsilon_budget > p.dataset_epsilon_budget + 1e-12:
            problems.append(
                f"{key('researcher_epsilon_budget')}: {p.researcher_epsilon_budget:g} is larger than "
                f"{key('dataset_epsilon_budget')} {p.dataset_epsilon_budget:g}"
            )
    for name, lo in (("min_sites", 1), ("min_secagg_threshold", 1), ("max_rounds", 1), ("max_local_epochs", 1)):
        v = getattr(p, name)
        if not (_is_int(v) and v >= lo):
            problems.append(f"{key(name)}: must be an integer >= {lo}, got {v!r}")
    if _is_int(p.min_sites) and _is_int(p.min_secagg_threshold) and p.min_secagg_threshold > p.min_sites >= 1:
        problems.append(
            f"{key('min_secagg_threshold')}: {p.min_secagg_threshold} is larger than "
            f"{key('min_sites')} {p.min_sites}; a job with the minimum number of sites could never unmask"
        )
    tasks = p.allowed_tasks
    if not isinstance(tasks, tuple) or not all(isinstance(t, str) and t for t in tasks):
        problems.append(
            f"{key('allowed_tasks')}: must be a list of label column names (strings), got {tasks!r}"
        )
    elif len(set(tasks)) != len(tasks):
        problems.append(f"{key('allowed_tasks')}: lists a column twice: {list(tasks)}")
    if not isinstance(p.templates, tuple):
        problems.append(f"templates: must be a list, got {type(p.templates).__name__}")
    else:
        seen_names: set[str] = set()
        for i, t in enumerate(p.templates):
            if not isinstance(t, Template):
                problems.append(f"templates[{i}]: must be a Template, got {t!r}")
                continue
            if not isinstance(t.name, str) or not t.name:
                problems.append(f"templates[{i}].name: must be a non-empty string, got {t.name!r}")
            elif t.name in seen_names:
                problems.append(f"templates[{i}].name: {t.name!r} is listed twice")
            else:
                seen_names.add(t.name)
            if not isinstance(t.sha256, str) or not _SHA256.match(t.sha256):
                problems.append(
                    f"templates[{i}].sha256: must be 64 lowercase hex characters "
                    f"(sha256 of the template source), got {t.sha256!r}"
                )
    problems += _validate_limits(p, key)
    problems += _validate_peers(p)
    return problems


def _validate_limits(p: Policy, key: Callable[[str], str]) -> list[str]:
    problems: list[str] = []
    for name, lo in (
        ("max_model_params", 1),
        ("max_memory_mb", 1),
        ("max_local_steps", 1),
        ("max_eval_passes", 0),
        ("max_batch_size", 1),
        ("max_width", 1),
        ("max_layers", 1),
        ("max_concurrent_jobs_per_researcher", 1),
        ("job_idle_close_s", 1),
    ):
        v = getattr(p, name)
        if not (_is_int(v) and v >= lo):
            problems.append(f"{key(name)}: must be an integer >= {lo}, got {v!r}")
    for name in ("min_eval_noise_multiplier", "max_secagg_clip", "min_secagg_clip"):
        v = getattr(p, name)
        if not (_is_number(v) and v > 0):
            problems.append(f"{key(name)}: must be a finite number > 0, got {v!r}")
    if _is_number(p.min_secagg_clip) and _is_number(p.max_secagg_clip) and p.min_secagg_clip > p.max_secagg_clip:
        problems.append(
            f"{key('min_secagg_clip')}: {p.min_secagg_clip:g} is larger than "
            f"{key('max_secagg_clip')} {p.max_secagg_clip:g}; no job could use it"
        )
    if not (_is_number(p.max_abs_weight) and 0 < p.max_abs_weight <= MAX_ABS_WEIGHT_CEILING):
        problems.append(
            f"{key('max_abs_weight')}: must be a number in (0, {MAX_ABS_WEIGHT_CEILING:g}] (the largest "
            f"|weight| a researcher may send; 1000 is far above any trained model's), got {p.max_abs_weight!r}"
        )
    if not (_is_number(p.max_sample_rate) and 0 < p.max_sample_rate <= 1):
        problems.append(f"{key('max_sample_rate')}: must be a number in (0, 1], got {p.max_sample_rate!r}")
    clip = p.allowed_clipping
    if not isinstance(clip, tuple) or not all(isinstance(c, str) for c in clip):
        problems.append(
            f"{key('allowed_clipping')}: must be a list of clipping modes from {list(CLIPPINGS)}, got {clip!r}"
        )
    elif not clip:
        problems.append(
            f"{key('allowed_clipping')}: is empty, so no job could run; allow some of {list(CLIPPINGS)}"
        )
    else:
        unknown = [c for c in clip if c not in CLIPPINGS]
        if unknown:
            problems.append(f"{key('allowed_clipping')}: unknown mode(s) {unknown}; known: {list(CLIPPINGS)}")
        if len(set(clip)) != len(clip):
            problems.append(f"{key('allowed_clipping')}: lists a mode twice: {list(clip)}")
    return problems


def _validate_peers(p: Policy) -> list[str]:
    problems: list[str] = []
    if not isinstance(p.peers, tuple):
        return [f"peers: must be a list, got {type(p.peers).__name__}"]
    names: dict[str, int] = {}
    fingerprints: dict[str, int] = {}
    for i, peer in enumerate(p.peers):
        if not isinstance(peer, Peer):
            problems.append(f"peers[{i}]: must be a Peer, got {peer!r}")
            continue
        if not isinstance(peer.name, str) or not SITE_NAME.match(peer.name):
            problems.append(
                f"peers[{i}].name: must be a datasite name (lower-case letters, digits and '-', "
                f"e.g. st-mary), got {peer.name!r}"
            )
        elif peer.name in names:
            problems.append(f"peers[{i}].name: {peer.name!r} is pinned twice (also peers[{names[peer.name]}])")
        else:
            names[peer.name] = i
        if not isinstance(peer.fingerprint, str) or not _SHA256.match(peer.fingerprint):
            problems.append(
                f"peers[{i}].fingerprint: must be 64 lowercase hex characters (sha256 of the peer's "
                f"Ed25519 public key, as `fedmtl datasite status` prints it), got {peer.fingerprint!r}"
            )
        elif peer.fingerprint in fingerprints:
            j = fingerprints[peer.fingerprint]
            other = p.peers[j].name if isinstance(p.peers[j], Peer) else "?"
            problems.append(
                f"peers[{i}].fingerprint: {peer.fingerprint[:16]}... is already pinned as peers[{j}] "
                f"({other!r}); one key is one site"
            )
        else:
            fingerprints[peer.fingerprint] = i
    return problems


__all__ = [
    "ADVISORY_ID",
    "ADVISORY_TEXT",
    "CLIPPINGS",
    "Peer",
    "Policy",
    "PolicyError",
    "SITE_NAME",
    "Template",
    "canonical_json",
    "code_hash",
]
