"""The parts of a job spec: tasks, model, strategy, secure aggregation (each a frozen
dataclass that records its problems instead of raising), the names they may take, and
the small coercion helpers :class:`fedmtl.contract.jobspec.JobSpec` shares with them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from fedmtl.contract.strategies import STRATEGY_NAMES, strategy_defaults, strategy_problems
from fedmtl.errors import JobSpecError  # noqa: F401 - defined in fedmtl.errors, importable here
from fedmtl.models.tasks import TASK_KINDS
from fedmtl.schema import Column

CLIPPINGS: tuple[str, ...] = ("flat", "per_layer")
#: how Opacus computes per-sample gradient norms (fedmtl.privacy.dp.GRAD_SAMPLE_MODES); the
#: accountant is the same for all of them. Ghost clipping needs flat clipping.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ghost")
OPTIMIZERS: tuple[str, ...] = ("sgd",)
SCALINGS: tuple[str, ...] = ("range", "standard")
_SUFFIXES = (".toml", ".yaml", ".yml", ".json")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KIND_OF_TYPE = {"binary": "binary", "categorical": "multiclass", "numeric": "regression"}


def kind_of_column(column: Column) -> str:
    """The task kind a label column implies: binary -> binary, categorical -> multiclass,
    numeric -> regression."""
    return _KIND_OF_TYPE[column.type]


# -- small coercion helpers: they record problems instead of raising ---------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float(v: Any, where: str, problems: list[str]) -> Any:
    if v is None:
        return None
    if not _is_num(v) or not math.isfinite(float(v)):
        problems.append(f"{where} must be a finite number, got {v!r}")
        return v
    return float(v)


def _int(v: Any, where: str, problems: list[str]) -> Any:
    if v is None:
        return None
    if _is_num(v) and float(v).is_integer():
        return int(v)
    problems.append(f"{where} must be a whole number, got {v!r}")
    return v


def _bool(v: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(v, bool):
        problems.append(f"{where} must be true or false, got {v!r}")
    return v


def _unknown_keys(d: Mapping[str, Any], allowed: Sequence[str], where: str, problems: list[str]) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")


def _from_mapping(cls: type, d: Any, where: str, problems: list[str]) -> Any:
    """Build a sub-config dataclass from a mapping, recording unknown keys as problems."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        problems.append(f"{where} must be a table/mapping, got {type(d).__name__}")
        return cls()  # type: ignore[call-arg]
    allowed = [f.name for f in fields(cls)]
    _unknown_keys(d, allowed, where, problems)
    return cls(**{k: v for k, v in d.items() if k in allowed})


def _coerce(obj: Any, floats: Sequence[str] = (), ints: Sequence[str] = ()) -> None:
    """Normalise numeric types in place on a frozen dataclass (1 -> 1.0 for float fields,
    3.0 -> 3 for int fields) so that equal specs serialise and hash equal; values of the
    wrong type are left for the problem checks."""
    for k in floats:
        v = getattr(obj, k)
        if _is_num(v):
            object.__setattr__(obj, k, float(v))
    for k in ints:
        v = getattr(obj, k)
        if _is_num(v) and float(v).is_integer():
            object.__setattr__(obj, k, int(v))


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


# -- sub-configs -------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """One task: its label column, optional kind (inferred from the schema when omitted),
    loss weight, and head name (defaults to the label; must be an identifier)."""

    label: str = ""
    kind: str | None = None
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        _coerce(self, floats=("weight",))

    @property
    def task_name(self) -> str:
        return self.name if self.name is not None else self.label

    def _problems(self, where: str) -> list[str]:
        p: list[str] = []
        if not isinstance(self.label, str) or not self.label:
            p.append(f"{where}: 'label' must name a label column (a non-empty string), got {self.label!r}")
        if self.kind is not None and self.kind not in TASK_KINDS:
            p.append(f"{where}: kind {self.kind!r} is not one of {list(TASK_KINDS)} (or leave it out to infer it)")
        w = _float(self.weight, f"{where}: weight", p)
        if _is_num(w) and w < 0:
            p.append(f"{where}: weight must be >= 0, got {w}")
        n = self.task_name
        if isinstance(n, str) and n and not _IDENT.match(n):
            p.append(
                f"{where}: task name {n!r} is not an identifier (letters, digits, underscore); "
                "give the task a 'name' such as " + repr(re.sub(r"\W", "_", n))
            )
        return p

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "weight": self.weight, "name": self.name}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The network: a trunk from the registry (:func:`fedmtl.models.trunk_names`) and its
    options; one linear head per task is added by the model builder."""

    trunk: str = "mlp"
    widths: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    layer_norm: bool = True
    activation: str = "relu"

    def __post_init__(self) -> None:
        if isinstance(self.widths, list):
            object.__setattr__(self, "widths", tuple(self.widths))
        if isinstance(self.widths, tuple):
            object.__setattr__(self, "widths", tuple(int(w) if _is_num(w) and float(w).is_integer() else w for w in self.widths))
        _coerce(self, floats=("dropout",))

    def trunk_options(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths),
            "dropout": self.dropout,
            "layer_norm": self.layer_norm,
            "activation": self.activation,
        }

    def _problems(self) -> list[str]:
        from fedmtl.models.nets import trunk_names

        p: list[str] = []
        if self.trunk not in trunk_names():
            p.append(f"model.trunk {self.trunk!r} is unknown; registered trunks are {trunk_names()}")
        if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
            p.append(f"model.widths must be a non-empty list of positive whole numbers, got {list(self.widths)!r}")
        d = _float(self.dropout, "model.dropout", p)
        if _is_num(d) and not 0.0 <= d < 1.0:
            p.append(f"model.dropout must be in [0, 1), got {d}")
        _bool(self.layer_norm, "model.layer_norm", p)
        if self.activation not in ("relu", "gelu", "tanh"):
            p.append(f"model.activation {self.activation!r} is not one of ['gelu', 'relu', 'tanh']")
        return p

    def to_dict(self) -> dict[str, Any]:
        return {"trunk": self.trunk, **self.trunk_options()}


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """The server strategy (see :mod:`fedmtl.contract.strategies`, whose registry holds the
    names, the defaults and the per-strategy rules this table asks for).

    ``mu`` is FedProx's proximal weight (default 0.01 for fedprox, must stay 0 for the
    others); ``server_lr`` the server step (default 1.0, 0.1 for fedadam); ``beta1``,
    ``beta2``, ``tau`` FedAdam's moment decays and adaptivity (Reddi et al. 2021).
    """

    name: str = "fedavg"
    mu: float | None = None
    server_lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        defaults = strategy_defaults(self.name)
        if self.mu is None:
            object.__setattr__(self, "mu", defaults["mu"])
        if self.server_lr is None:
            object.__setattr__(self, "server_lr", defaults["server_lr"])
        _coerce(self, floats=("mu", "server_lr", "beta1", "beta2", "tau"))

    def _problems(self) -> list[str]:
        p: list[str] = []
        if self.name not in STRATEGY_NAMES:
            p.append(f"strategy.name {self.name!r} is unknown; choose one of {list(STRATEGY_NAMES)}")
        mu = _float(self.mu, "strategy.mu", p)
        if _is_num(mu):
            if mu < 0:
                p.append(f"strategy.mu must be >= 0, got {mu}")
            else:
                p += strategy_problems(self.name, mu=mu)
        lr = _float(self.server_lr, "strategy.server_lr", p)
        if _is_num(lr) and lr <= 0:
            p.append(f"strategy.server_lr must be > 0, got {lr}")
        for key in ("beta1", "beta2"):
            b = _float(getattr(self, key), f"strategy.{key}", p)
            if _is_num(b) and not 0.0 <= b < 1.0:
                p.append(f"strategy.{key} must be in [0, 1), got {b}")
        tau = _float(self.tau, "strategy.tau", p)
        if _is_num(tau) and tau <= 0:
            p.append(f"strategy.tau must be > 0, got {tau}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """Secure aggregation: ``threshold`` sites must survive a round (and fewer than it
    learn nothing); ``clip`` bounds each update entry in L-inf before quantisation;
    ``frac_bits`` is the fixed-point resolution.

    ``threshold`` left out (``None``) means a majority of the job's sites,
    ``floor(n/2) + 1``: :class:`~fedmtl.contract.jobspec.JobSpec` fills it in from ``sites``, or
    the job does from the sites it is made for. A datasite denies ``t <= n/2``."""

    threshold: int | None = None
    clip: float = 1.0
    frac_bits: int = 16

    def __post_init__(self) -> None:
        _coerce(self, floats=("clip",), ints=("threshold", "frac_bits"))

    def _problems(self) -> list[str]:
        p: list[str] = []
        t = _int(self.threshold, "secagg.threshold", p)
        if isinstance(t, int) and t < 2:
            p.append(f"secagg.threshold must be >= 2 (with 1, one site's update would be revealed), got {t}")
        c = _float(self.clip, "secagg.clip", p)
        if _is_num(c) and c <= 0:
            p.append(f"secagg.clip must be > 0, got {c}")
        fb = _int(self.frac_bits, "secagg.frac_bits", p)
        if isinstance(fb, int) and not 0 <= fb <= 52:
            p.append(f"secagg.frac_bits must be in 0..52, got {fb}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "clip": self.clip, "frac_bits": self.frac_bits}


