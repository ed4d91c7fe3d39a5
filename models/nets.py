"""Multi-task networks: a shared trunk (picked by name from a registry) and one head per task.

Everything here is Opacus-compatible: no BatchNorm (normalisation is LayerNorm), no
buffers, so per-sample gradients exist for every parameter and the flat vector holds
the whole state (see :mod:`fedmtl.models.flat`).

Parameter order (``named_parameters``): the trunk's parameters first, then each head's
``weight`` and ``bias`` in task order. That order defines the flat vector.

Add a trunk::

    @register_trunk("cnn")
    def _cnn(in_features: int, *, channels=(8, 16)) -> nn.Module: ...

A trunk factory takes ``in_features`` and keyword options and returns a module with an
integer ``out_features`` attribute, mapping ``(batch, in_features)`` (or whatever input
the trunk expects) to ``(batch, out_features)``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedmtl.models.tasks import TaskSpec, check_tasks

TrunkFactory = Callable[..., nn.Module]
_TRUNKS: dict[str, TrunkFactory] = {}


def register_trunk(name: str) -> Callable[[TrunkFactory], TrunkFactory]:
    """Decorator adding a trunk factory under ``name``. Names are unique."""

    def deco(factory: TrunkFactory) -> TrunkFactory:
        if name in _TRUNKS and _TRUNKS[name] is not factory:
            raise ValueError(f"a trunk named {name!r} is already registered")
        _TRUNKS[name] = factory
        return factory

    return deco


def trunk_names() -> list[str]:
    """Names of the registered trunks."""
    return sorted(_TRUNKS)


def build_trunk(name: str, in_features: int, **options: Any) -> nn.Module:
    """Build the registered trunk ``name``; ``ValueError`` naming the options if unknown."""
    if name not in _TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; registered trunks are {trunk_names()}")
    trunk = _TRUNKS[name](in_features, **options)
    if not isinstance(getattr(trunk, "out_features", None), int):
        raise TypeError(f"trunk {name!r} must have an integer 'out_features' attribute")
    return trunk


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPTrunk(nn.Sequential):
    """``[Linear -> LayerNorm? -> activation -> Dropout?] * len(widths)``."""

    def __init__(
        self,
        in_features: int,
        *,
        widths: Sequence[int] = (64, 32),
        dropout: float = 0.1,
        layer_norm: bool = True,
        activation: str = "relu",
    ) -> None:
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        widths = list(widths)
        if not widths or any((not isinstance(w, int)) or w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        layers: list[nn.Module] = []
        prev = in_features
        for w in widths:
            layers.append(nn.Linear(prev, w))
            if layer_norm:
                layers.append(nn.LayerNorm(w))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = w
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = prev


@register_trunk("mlp")
def _mlp(in_features: int, **options: Any) -> nn.Module:
    return MLPTrunk(in_features, **options)


class MultiTaskNet(nn.Module):
    """A shared trunk and one linear head per task.

    ``forward(x)`` returns ``{task name: output}``: one logit for a binary task, C
    logits for a multiclass task, one value for a regression task (each ``(batch, k)``).
    """

    def __init__(self, trunk: nn.Module, tasks: Sequence[TaskSpec], *, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.tasks: list[TaskSpec] = check_tasks(tasks)
        self.trunk = trunk
        self.heads = nn.ModuleDict({t.name: nn.Linear(trunk.out_features, t.out_dim) for t in self.tasks})
        self.config: dict[str, Any] = dict(config or {})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Scores per task in eval mode: P(y=1) for binary (n,), class probabilities for
        multiclass (n, C), the predicted value for regression (n,)."""
        was_training = self.training
        self.eval()
        try:
            out = self(x)
        finally:
            self.train(was_training)
        res: dict[str, np.ndarray] = {}
        ranges = self.config.get(RISK_RANGE_KEY) or {}
        for t in self.tasks:
            o = out[t.name]
            if t.kind == "binary":
                z = o[:, 0]
                if t.name in ranges:
                    z = soft_range(z, *ranges[t.name])
                res[t.name] = torch.sigmoid(z).numpy()
            elif t.kind == "multiclass":
                res[t.name] = torch.softmax(o, dim=1).numpy()
            else:
                res[t.name] = (o[:, 0] * t.scale + t.shift).numpy()
        return res

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def recalibrate(self, platt: Mapping[str, tuple[float, float]],
                    logit_range: tuple[float, float] | None = None) -> None:
        """Fold each binary task's Platt recalibration ``logit -> a * logit + b`` into its
        head (weights times ``a``; bias ``a * bias + b``), in place: the ranking of the
        risks does not change, their level and spread do.

        Args:
            platt: ``{binary task name: (a, b)}``; tasks not named are left alone.
            logit_range: the raw logits ``(lo, hi)`` the fit read its lowest and highest
                bins at (an open-ended bin's records all read at its centre). Kept in
                :attr:`config` (``RISK_RANGE_KEY``, in recalibrated logits): :meth:`predict`
                then reads a logit beyond it as the fit did (:func:`soft_range`), so the
                risks are as calibrated as the fit, and their ranking is unchanged.

        Raises:
            ValueError: a name that is not a binary task of the model, or a non-finite
                or non-positive ``a``, or a non-finite ``b``.
        """
        kinds = {t.name: t.kind for t in self.tasks}
        for name, (a, b) in platt.items():
            if kinds.get(name) != "binary":
                raise ValueError(f"recalibrate: {name!r} is not a binary task of this model ({sorted(kinds)})")
            if not (np.isfinite(a) and a > 0 and np.isfinite(b)):
                raise ValueError(f"recalibrate: {name!r} needs a finite a > 0 and a finite b, got ({a}, {b})")
            head = self.heads[name]
            head.weight.mul_(float(a))
            head.bias.mul_(float(a)).add_(float(b))
            if logit_range is not None:
                lo, hi = (float(a) * float(v) + float(b) for v in logit_range)
                self.config.setdefault(RISK_RANGE_KEY, {})[name] = [lo, hi]


#: MultiTaskNet.config key: {binary task: [lo, hi]} of :func:`soft_range` in predict
RISK_RANGE_KEY = "risk_logit_range"
#: slope of :func:`soft_range` beyond its range: small enough that the risks there stay
#: those of the range's end, positive so that their ranking stays
SOFT_RANGE_SLOPE = 0.01


def soft_range(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``z`` inside ``[lo, hi]``; beyond it, ``lo`` or ``hi`` plus :data:`SOFT_RANGE_SLOPE`
    times the excess (strictly increasing: the order of the logits is kept)."""
    z = torch.where(z < lo, lo + (z - lo) * SOFT_RANGE_SLOPE, z)
    return torch.where(z > hi, hi + (z - hi) * SOFT_RANGE_SLOPE, z)


def build_model(
    *,
    n_features: int,
    tasks: Sequence[TaskSpec],
    trunk: str = "mlp",
    seed: int | None = None,
    **trunk_options: Any,
) -> MultiTaskNet:
    """Build a :class:`MultiTaskNet`. With ``seed`` the initial weights are a
    deterministic function of the arguments, so every party can build the same model.

    ``model.config`` holds everything needed to rebuild the architecture with
    :func:`model_from_config`.
    """
    tasks = check_tasks(tasks)
    config = {
        "n_features": int(n_features),
        "tasks": [t.to_dict() for t in tasks],
        "trunk": trunk,
        "trunk_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in trunk_options.items()},
        "seed": seed,
    }
    if seed is None:
        net = MultiTaskNet(build_trunk(trunk, int(n_features), **trunk_options), tasks, config=config)
    else:
        # the whole build under the lock: another build's seed between ours and the weights
        # would give this model another seed's weights
        with global_rng(seed, hold=True):
            net = MultiTaskNet(build_trunk(trunk, int(n_features), **trunk_options), tasks, config=config)
    return net


#: Serialises every read, seed and restore of torch's global CPU generator in this process.
#: torch's ``manual_seed`` waits for the generator's mutex holding the GIL, and a thread in
#: ``get_rng_state`` can hold that mutex while it waits for the GIL: two site threads (the
#: in-process transport, or two jobs at one datasite) building or training at once
#: deadlocked that way. Waiting on this lock releases the GIL.
RNG_LOCK = threading.RLock()


@contextmanager
def global_rng(seed: int, *, hold: bool = False) -> Iterator[None]:
    """torch's global CPU generator seeded with ``seed`` for the body, and restored after
    (like ``torch.random.fork_rng(devices=[])``), every generator call under
    :data:`RNG_LOCK`. ``hold``: keep the lock for the whole body, so that no other seeded
    build runs meanwhile (initial weights); otherwise other threads may seed and draw from
    the generator meanwhile (training's dropout: its randomness, not its privacy, which
    draws from the training run's own generator). A training thread's dropout may still
    draw during a held body: a job's initial weights come from the researcher's one
    thread, and the sites train from the weights each pass sends."""
    with RNG_LOCK:
        state = torch.get_rng_state()
        torch.manual_seed(int(seed))
        if hold:
            try:
                yield
            finally:
                torch.set_rng_state(state)
            return
    try:
        yield
    finally:
        with RNG_LOCK:
            torch.set_rng_state(state)


def model_from_config(config: Mapping[str, Any]) -> MultiTaskNet:
    """Rebuild a model from ``MultiTaskNet.config`` (JSON-able)."""
    net = build_model(
        n_features=int(config["n_features"]),
        tasks=[TaskSpec.from_dict(t) for t in config["tasks"]],
        trunk=config.get("trunk", "mlp"),
        seed=config.get("seed"),
        **dict(config.get("trunk_options", {})),
    )
    if config.get(RISK_RANGE_KEY):
        net.config[RISK_RANGE_KEY] = {k: [float(v[0]), float(v[1])] for k, v in config[RISK_RANGE_KEY].items()}
    return net
