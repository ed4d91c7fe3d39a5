"""Strategies: both halves of a federated algorithm, Flower-style.

A :class:`Strategy` owns what the sites do and what the server does with it, so nobody
else switches on a strategy's name:

* the client half: :meth:`Strategy.configure_fit` (the extra local-training settings,
  e.g. FedProx's proximal ``mu``), :meth:`Strategy.shared_mask` (the entries the sites
  send and the server aggregates) and :meth:`Strategy.personal_mask` (the entries each
  site keeps to itself, e.g. FedPer's heads);
* the server half: :meth:`Strategy.aggregate_fit` (the new global vector from the
  aggregated update) and its checkpointed state (:meth:`Strategy.state_dict`).

The registry (:data:`STRATEGY_NAMES`, :func:`make_strategy`, :func:`strategy_defaults`,
:func:`strategy_problems`) is where the names a job spec may take, their defaults and
their option rules live; :class:`fedmtl.contract.jobconfig.StrategyConfig` asks it.
The aggregation math is pure functions outside the classes.

Per round ``aggregate_fit`` gets (all pure data, no syft):

* ``global_vector``: the current global weights (flat, :mod:`fedmtl.models.flat` order);
* ``update``: the per-group weighted average of the sites' updates (``local - global``)
  as secure aggregation delivers it (:func:`fedmtl.privacy.quantization.average_by_group`,
  or :func:`weighted_average` on plain updates): groups are ``"trunk"`` and each task
  head (:func:`fedmtl.models.flat.task_slices`); a head is averaged over the sites'
  labelled counts for that task, the trunk over their total labelled samples;
* ``counts``: the per-group totals. A group whose total is 0 -- no participating site
  holds labels for that task -- is **left untouched** (weights and optimiser state).

Strategies:

* ``fedavg``: ``x <- x + server_lr * update`` on the touched groups (server_lr 1 gives
  the weighted average of the local models, McMahan et al. 2017).
* ``fedprox``: the same on the server; :meth:`Strategy.configure_fit` hands ``mu`` to
  local training (Li et al. 2020).
* ``fedadam``: Adam on the pseudo-gradient ``-update`` (Reddi et al. 2021, Algorithm 2,
  no bias correction): ``m <- b1 m + (1-b1) d``, ``v <- b2 v + (1-b2) d^2``,
  ``x <- x + server_lr * m / (sqrt(v) + tau)``; ``m`` and ``v`` persist in
  :meth:`Strategy.state_dict`.
* ``fedper``: only the trunk is shared (Arivazhagan et al. 2019); the heads stay at the
  sites (:meth:`Strategy.personal_mask`), so the global head entries never change.

A new strategy is a subclass and one line in the registry. This module imports neither
syft nor torch, nor any other module of the round contract.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

__all__ = [
    "STRATEGY_NAMES",
    "FedAdam",
    "FedAvg",
    "FedPer",
    "FedProx",
    "Strategy",
    "adam_step",
    "apply_update",
    "groups_of_layout",
    "make_strategy",
    "strategy_defaults",
    "strategy_problems",
    "touched_mask",
    "weighted_average",
]

Groups = Mapping[str, Sequence[slice]]


# -- pure aggregation functions -----------------------------------------------------------------
def _size_of(groups: Groups) -> int:
    return max((s.stop for sl in groups.values() for s in sl), default=0)


def _check_cover(groups: Groups, size: int) -> None:
    cover = np.zeros(size, dtype=np.int64)
    for name, sl in groups.items():
        for s in sl:
            if s.step not in (None, 1) or s.start is None or s.stop is None or not 0 <= s.start <= s.stop <= size:
                raise ValueError(f"group {name!r}: slice {s} does not fit a vector of size {size}")
            cover[s] += 1
    if not np.all(cover == 1):
        raise ValueError(
            f"groups must cover the vector of size {size} exactly once "
            f"({int(np.sum(cover == 0))} entries uncovered, {int(np.sum(cover > 1))} overlapping)"
        )


def groups_of_layout(layout: Any) -> dict[str, list[slice]]:
    """Groups (``{"trunk": [...], task: [...]}``) from either a groups mapping (as from
    :func:`fedmtl.models.flat.task_slices`) or a parameter layout (a list of
    ``(name, shape, start, stop)``, as from :func:`fedmtl.models.flat.parameter_layout`):
    parameters named ``heads.<task>.*`` belong to that task, the rest to the trunk."""
    if isinstance(layout, Mapping):
        return {k: list(v) for k, v in layout.items()}
    out: dict[str, list[slice]] = {"trunk": []}
    for slot in layout:
        name, _, start, stop = slot
        parts = name.split(".")
        key = parts[1] if parts[0] == "heads" and len(parts) > 2 else "trunk"
        out.setdefault(key, []).append(slice(int(start), int(stop)))
    return out


def weighted_average(
    updates: Sequence[np.ndarray], counts: Sequence[Mapping[str, int]], *, groups: Groups
) -> tuple[np.ndarray, dict[str, float]]:
    """Plain (unmasked) per-group weighted average of several sites' updates.

    Site ``i`` weighs group ``g`` by ``counts[i][g]``. Returns ``(average, totals)``; a
    group whose total count is 0 averages to 0. This is what secure aggregation computes
    (up to quantisation and the L-inf clip); use it as the reference in tests.
    """
    if len(updates) != len(counts) or not updates:
        raise ValueError(f"need one counts mapping per update and at least one update; got {len(updates)} and {len(counts)}")
    size = int(np.asarray(updates[0]).size)
    _check_cover(groups, size)
    total = np.zeros(size, dtype=np.float64)
    totals = {g: 0.0 for g in groups}
    for i, (u, c) in enumerate(zip(updates, counts)):
        u = np.asarray(u, dtype=np.float64)
        if u.shape != (size,):
            raise ValueError(f"update {i} has shape {u.shape}; expected ({size},)")
        if set(c) != set(groups):
            raise ValueError(f"counts of update {i} name {sorted(c)}, groups are {sorted(groups)}")
        for g, sl in groups.items():
            w = c[g]
            if isinstance(w, bool) or not isinstance(w, (int, np.integer, float)) or w < 0:
                raise ValueError(f"count of group {g!r} in update {i} must be a number >= 0, got {w!r}")
            totals[g] += float(w)
            for s in sl:
                total[s] += float(w) * u[s]
    out = np.zeros(size, dtype=np.float64)
    for g, sl in groups.items():
        if totals[g] > 0:
            for s in sl:
                out[s] = total[s] / totals[g]
    return out, totals


def touched_mask(groups: Groups, counts: Mapping[str, float], size: int | None = None) -> np.ndarray:
    """Boolean mask of the entries whose group has a total count > 0."""
    size = _size_of(groups) if size is None else size
    missing = sorted(set(groups) - set(counts))
    if missing:
        raise ValueError(f"no count for group(s) {missing}; counts name {sorted(counts)}")
    m = np.zeros(size, dtype=bool)
    for g, sl in groups.items():
        c = counts[g]
        if not math.isfinite(float(c)) or c < 0:
            raise ValueError(f"count of group {g!r} must be a finite number >= 0, got {c!r}")
        if c > 0:
            for s in sl:
                m[s] = True
    return m


def _check_vectors(x: np.ndarray, update: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    u = np.asarray(update, dtype=np.float64)
    if x.ndim != 1 or u.shape != x.shape:
        raise ValueError(f"global vector {x.shape} and update {u.shape} must be 1-d and the same size")
    if not np.all(np.isfinite(u)):
        raise ValueError("the aggregated update holds NaN or infinite values; refusing to apply it")
    return x, u


def apply_update(global_vector: np.ndarray, update: np.ndarray, mask: np.ndarray, *, server_lr: float = 1.0) -> np.ndarray:
    """``x + server_lr * update`` where ``mask``; ``x`` elsewhere. Same dtype as ``x``."""
    x, u = _check_vectors(global_vector, update)
    out = x.astype(np.float64, copy=True)
    out[mask] += server_lr * u[mask]
    return out.astype(x.dtype, copy=False)


def adam_step(
    global_vector: np.ndarray,
    update: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray,
    *,
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One FedAdam server step (Reddi et al. 2021) on the entries in ``mask``; ``(x, m, v)``
    are returned as new arrays and left unchanged outside ``mask``."""
    x, d = _check_vectors(global_vector, update)
    m, v = np.array(m, dtype=np.float64), np.array(v, dtype=np.float64)
    m[mask] = beta1 * m[mask] + (1 - beta1) * d[mask]
    v[mask] = beta2 * v[mask] + (1 - beta2) * d[mask] ** 2
    out = x.astype(np.float64, copy=True)
    out[mask] += server_lr * m[mask] / (np.sqrt(v[mask]) + tau)
    return out.astype(x.dtype, copy=False), m, v


# -- strategies -----------------------------------------------------------------------------------
class Strategy:
    """Base of every strategy: FedAvg's two halves; subclasses override the hooks they change.

    Client half: :meth:`configure_fit` (extra local-training settings), :meth:`shared_mask`
    / :meth:`shared_groups` (the entries the sites send and the server aggregates) and
    :meth:`personal_mask` (the entries each site keeps). Server half:
    :meth:`aggregate_fit` (the server step) and :meth:`state_dict` /
    :meth:`load_state_dict` (server state to checkpoint). Registry half, on the class:
    :attr:`name`, the defaults a job spec takes (:attr:`default_server_lr`,
    :attr:`default_mu`), :meth:`option_problems` and :meth:`from_options`.

    Args:
        server_lr: the server step; ``None`` takes :attr:`default_server_lr`.

    Raises:
        ValueError: ``server_lr`` is not a positive finite number.
    """

    #: the name a job spec's ``[strategy] name`` gives
    name: ClassVar[str] = "base"
    #: the server step when the job spec names none
    default_server_lr: ClassVar[float] = 1.0
    #: the proximal weight handed to local training when the job spec names none (0: none)
    default_mu: ClassVar[float] = 0.0

    def __init__(self, *, server_lr: float | None = None) -> None:
        if server_lr is None:
            server_lr = self.default_server_lr
        if not (isinstance(server_lr, (int, float)) and server_lr > 0 and math.isfinite(server_lr)):
            raise ValueError(f"server_lr must be a positive finite number, got {server_lr!r}")
        self.server_lr = float(server_lr)
        self.rounds_applied = 0

    # -- registry half ------------------------------------------------------------------------
    @classmethod
    def option_problems(cls, *, mu: float) -> list[str]:
        """What is wrong with a job spec's strategy options for this strategy.

        Args:
            mu: the spec's ``strategy.mu`` (a number >= 0).

        Returns:
            One sentence per problem (empty when there is none): only FedProx trains with
            a proximal term, so any other strategy needs ``mu == 0``.
        """
        if mu != 0:
            return [f"strategy.mu only applies to {FedProx.name}; remove it or set strategy.name = "
                    f"{FedProx.name!r} (got {mu})"]
        return []

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Strategy:
        """This strategy from a job's strategy options.

        Args:
            options: ``mu``, ``server_lr``, ``beta1``, ``beta2``, ``tau`` (unset options left
                out: the defaults); the base uses ``server_lr`` and ignores FedAdam's.

        Returns:
            The strategy.

        Raises:
            ValueError: ``mu`` is not 0 for a strategy without a proximal term, or an
                option is out of range.
        """
        cls._refuse_mu(options)
        return cls(server_lr=options.get("server_lr"))

    @classmethod
    def _refuse_mu(cls, options: Mapping[str, Any]) -> None:
        mu = options.get("mu", 0.0)
        if mu not in (0, 0.0):
            raise ValueError(f"mu={mu} only applies to {FedProx.name}, not {cls.name}")

    # -- client half --------------------------------------------------------------------------
    def configure_fit(self) -> dict[str, Any]:
        """The settings the sites' local training takes from this strategy.

        Returns:
            Keyword arguments of :func:`fedmtl.privacy.dp.train_local`: ``fedprox_mu``
            (0.0: no proximal term).
        """
        return {"fedprox_mu": 0.0}

    def shared_groups(self, groups: Groups) -> list[str]:
        """The groups that are aggregated.

        Args:
            groups: ``{"trunk": [slices], task: [slices]}``.

        Returns:
            The names of the shared groups (all of them here).

        Raises:
            ValueError: the strategy cannot share these groups.
        """
        return list(groups)

    def shared_mask(self, layout: Any) -> np.ndarray:
        """The entries the sites send and the server aggregates.

        Args:
            layout: a groups mapping or a parameter layout (see :func:`groups_of_layout`).

        Returns:
            A boolean mask over the flat vector.

        Raises:
            ValueError: as :meth:`shared_groups`.
        """
        groups = groups_of_layout(layout)
        size = _size_of(groups)
        m = np.zeros(size, dtype=bool)
        for g in self.shared_groups(groups):
            for s in groups[g]:
                m[s] = True
        return m

    def personal_mask(self, layout: Any) -> np.ndarray:
        """The entries each site keeps to itself: trained locally, never sent (their update
        entries are 0), and used again by the site's next pass. All ``False`` unless the
        strategy personalises (FedPer: the heads).

        Args:
            layout: as :meth:`shared_mask`.

        Returns:
            A boolean mask over the flat vector, ``~shared_mask(layout)``.
        """
        return ~self.shared_mask(layout)

    # -- server half --------------------------------------------------------------------------
    def aggregate_fit(
        self, global_vector: np.ndarray, update: np.ndarray, counts: Mapping[str, float], *, groups: Groups
    ) -> np.ndarray:
        """The new global vector from the aggregated per-group average ``update``.

        Args:
            global_vector: the current global weights (1-d).
            update: the per-group weighted average of the sites' updates, same size.
            counts: the per-group totals; a group whose total is 0 is left untouched.
            groups: the groups, covering the vector exactly once.

        Returns:
            The new global vector (same dtype as ``global_vector``); only the shared,
            touched entries change.

        Raises:
            ValueError: the sizes differ, the groups do not cover the vector, a count is
                missing or negative, or the update is not finite.
        """
        mask = self._mask(global_vector, counts, groups)
        out = self._step(global_vector, update, mask)
        self.rounds_applied += 1
        return out

    def _mask(self, global_vector: np.ndarray, counts: Mapping[str, float], groups: Groups) -> np.ndarray:
        x = np.asarray(global_vector)
        _check_cover(groups, x.size)
        return touched_mask(groups, counts, x.size) & self.shared_mask(groups)

    def _step(self, x: np.ndarray, update: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return apply_update(x, update, mask, server_lr=self.server_lr)

    def state_dict(self) -> dict[str, Any]:
        """The server state to checkpoint.

        Returns:
            JSON-able values and numpy arrays (``name``, ``rounds_applied``, and what the
            strategy keeps, e.g. FedAdam's moments).
        """
        return {"name": self.name, "rounds_applied": self.rounds_applied}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpointed :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.

        Raises:
            ValueError: the state is another strategy's, or malformed.
        """
        if state.get("name") != self.name:
            raise ValueError(f"state is for strategy {state.get('name')!r}, not {self.name!r}")
        self.rounds_applied = int(state.get("rounds_applied", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server_lr={self.server_lr})"


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the base's two halves."""

    name = "fedavg"


class FedProx(FedAvg):
    """FedAvg on the server; local training adds the proximal term ``mu/2 ||w - w_global||^2``
    (Li et al. 2020).

    Args:
        mu: the proximal weight (> 0); ``None`` takes :attr:`default_mu` (0.01).
        server_lr: as :class:`Strategy`.

    Raises:
        ValueError: ``mu`` is not a positive finite number, or as :class:`Strategy`.
    """

    name = "fedprox"
    default_mu = 0.01

    def __init__(self, *, mu: float | None = None, server_lr: float | None = None) -> None:
        super().__init__(server_lr=server_lr)
        if mu is None:
            mu = self.default_mu
        if not (isinstance(mu, (int, float)) and mu > 0 and math.isfinite(mu)):
            raise ValueError(f"fedprox needs mu > 0, got {mu!r}")
        self.mu = float(mu)

    @classmethod
    def option_problems(cls, *, mu: float) -> list[str]:
        """FedProx needs ``mu > 0`` (see :meth:`Strategy.option_problems`)."""
        if mu == 0:
            return [f"strategy.mu must be > 0 for {cls.name} (mu = 0 is plain {FedAvg.name})"]
        return []

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Strategy:
        """FedProx from ``mu`` and ``server_lr`` (see :meth:`Strategy.from_options`)."""
        return cls(mu=options.get("mu"), server_lr=options.get("server_lr"))

    def configure_fit(self) -> dict[str, Any]:
        """Hands ``mu`` to local training (see :meth:`Strategy.configure_fit`)."""
        return {"fedprox_mu": self.mu}


class FedPer(FedAvg):
    """Federated personalisation layers (Arivazhagan et al. 2019): the trunk is shared and
    averaged, the task heads stay at each site (:meth:`personal_mask`)."""

    name = "fedper"

    def shared_groups(self, groups: Groups) -> list[str]:
        """Only ``"trunk"`` (see :meth:`Strategy.shared_groups`); ``ValueError`` without one."""
        if "trunk" not in groups:
            raise ValueError(f"fedper shares the trunk, but the groups {sorted(groups)} have no 'trunk'")
        return ["trunk"]


class FedAdam(Strategy):
    """Adam on the server's pseudo-gradient (Reddi et al. 2021, no bias correction).

    Args:
        server_lr: the server step; ``None`` takes :attr:`default_server_lr` (0.1).
        beta1: the first moment's decay, in [0, 1).
        beta2: the second moment's decay, in [0, 1).
        tau: the adaptivity (> 0).

    Raises:
        ValueError: an argument is out of range.
    """

    name = "fedadam"
    default_server_lr = 0.1

    def __init__(self, *, server_lr: float | None = None, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(server_lr=server_lr)
        for k, b in (("beta1", beta1), ("beta2", beta2)):
            if not (isinstance(b, (int, float)) and 0 <= b < 1):
                raise ValueError(f"{k} must be in [0, 1), got {b!r}")
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Strategy:
        """FedAdam from ``server_lr``, ``beta1``, ``beta2``, ``tau`` (see
        :meth:`Strategy.from_options`)."""
        cls._refuse_mu(options)
        kw = {k: options[k] for k in ("beta1", "beta2", "tau") if k in options}
        return cls(server_lr=options.get("server_lr"), **kw)

    def _step(self, x: np.ndarray, update: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n = np.asarray(x).size
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros(n), np.zeros(n)
        if self.m.shape != (n,):
            raise ValueError(f"FedAdam state has {self.m.size} entries, the model {n}; wrong checkpoint?")
        out, self.m, self.v = adam_step(x, update, self.m, self.v, mask, server_lr=self.server_lr,
                                        beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The base's state plus the moments ``m`` and ``v`` once a step ran."""
        d = super().state_dict()
        if self.m is not None and self.v is not None:
            d["m"], d["v"] = self.m.copy(), self.v.copy()
        return d

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The base's state plus the moments (both or neither); ``ValueError`` otherwise."""
        super().load_state_dict(state)
        if ("m" in state) != ("v" in state):
            raise ValueError("FedAdam state needs both 'm' and 'v' (or neither)")
        if "m" in state:
            m, v = np.asarray(state["m"], dtype=np.float64), np.asarray(state["v"], dtype=np.float64)
            if m.ndim != 1 or m.shape != v.shape:
                raise ValueError(f"FedAdam m {m.shape} and v {v.shape} must be 1-d and the same size")
            self.m, self.v = m.copy(), v.copy()
        else:
            self.m = self.v = None

    def __repr__(self) -> str:
        return f"FedAdam(server_lr={self.server_lr}, beta1={self.beta1}, beta2={self.beta2}, tau={self.tau})"


# -- the registry ---------------------------------------------------------------------------------
#: a new strategy is one line here
_REGISTRY: dict[str, type[Strategy]] = {s.name: s for s in (FedAvg, FedProx, FedAdam, FedPer)}
#: the aggregation strategies a job spec may name, in the order error messages list them
STRATEGY_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _class_of(name: Any) -> type[Strategy]:
    # an unknown name gets the base's defaults and rules; the spec reports the name itself
    return _REGISTRY.get(name, Strategy) if isinstance(name, str) else Strategy


def strategy_defaults(name: str) -> dict[str, float]:
    """The options a job spec's strategy table takes when it leaves them out.

    Args:
        name: the strategy's name (an unknown one gets the base's defaults).

    Returns:
        ``{"mu": ..., "server_lr": ...}``: 0.01 for fedprox's ``mu`` (0 for the others),
        0.1 for fedadam's ``server_lr`` (1.0 for the others).
    """
    cls = _class_of(name)
    return {"mu": cls.default_mu, "server_lr": cls.default_server_lr}


def strategy_problems(name: str, *, mu: float) -> list[str]:
    """What is wrong with a job spec's strategy options for the strategy ``name``.

    Args:
        name: the strategy's name (an unknown one gets the base's rules).
        mu: the spec's ``strategy.mu`` (a number >= 0).

    Returns:
        One sentence per problem (empty when there is none), see
        :meth:`Strategy.option_problems`.
    """
    return _class_of(name).option_problems(mu=mu)


def make_strategy(config: Any) -> Strategy:
    """A strategy from the registry.

    Args:
        config: a name, a mapping or a :class:`~fedmtl.contract.jobconfig.StrategyConfig`
            (``name`` plus ``mu``, ``server_lr``, ``beta1``, ``beta2``, ``tau``; unset or
            ``None`` options take the strategy's defaults).

    Returns:
        A fresh strategy.

    Raises:
        ValueError: the name is unknown (the message lists :data:`STRATEGY_NAMES`), or an
            option does not apply or is out of range.
    """
    if isinstance(config, str):
        cfg: dict[str, Any] = {"name": config}
    elif isinstance(config, Mapping):
        cfg = dict(config)
    else:
        cfg = {k: getattr(config, k) for k in ("name", "mu", "server_lr", "beta1", "beta2", "tau") if hasattr(config, k)}
    name = cfg.get("name")
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of {list(STRATEGY_NAMES)}")
    options = {k: v for k, v in cfg.items() if v is not None and k != "name"}
    return _REGISTRY[name].from_options(options)
