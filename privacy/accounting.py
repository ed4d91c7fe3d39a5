"""Privacy accounting: records in, epsilon out.

A :class:`PrivacyRecord` is what one run of DP-SGD costs: ``steps`` steps of the
Poisson-subsampled Gaussian mechanism with ``noise_multiplier`` and ``sample_rate``.
A datasite keeps a list of records (every round of every job on the same dataset);
:func:`epsilon_of` composes all of them into one epsilon at a given delta, so the site
can answer both "what have I spent?" and "what would this job cost on top?"
(``epsilon_of(spent + planned, delta=...)``).

The math is Opacus's own (``opacus.accountants.analysis``): this module only keeps
state-free records and composes them, the way ``RDPAccountant`` / ``PRVAccountant`` do
with their ``history``, so the numbers match Opacus on the same records (tested).

* ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov et al. 2019), summed
  over records per order, converted to (epsilon, delta) at the best order.
* ``"prv"``: numerical composition of privacy loss random variables (Gopi et al. 2021);
  tighter; returns the upper bound of the estimate (``eps_error`` 0.01 by default).

Each is an :class:`Accountant` registered by name, as in Opacus's
``accountants/registry.py``: :func:`create_accountant` builds one and raises
``ValueError`` on an unknown name; :func:`epsilon_of` and :func:`calibrate_noise` take the
name. The math is :func:`rdp_epsilon` / :func:`prv_epsilon`, pure functions of the records.

This module imports neither torch nor syft.
"""

from __future__ import annotations

import abc
import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from fedmtl.errors import PrivacyBudgetError

#: RDP orders, the same as ``opacus.accountants.RDPAccountant.DEFAULT_ALPHAS``.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

#: Largest noise multiplier :func:`calibrate_noise` will try before giving up.
MAX_NOISE_MULTIPLIER = 1e4


@dataclass(frozen=True)
class PrivacyRecord:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is sigma / max_grad_norm, ``sample_rate`` the Poisson sampling
    probability q of each record per step. A record with ``steps == 0`` or
    ``sample_rate == 0`` costs nothing; ``noise_multiplier == 0`` (no noise) with
    ``steps > 0`` costs infinite epsilon.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "sample_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"PrivacyRecord.{name} must be a finite number, got {v!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)):
            raise ValueError(f"PrivacyRecord.steps must be an int, got {self.steps!r}")
        if self.noise_multiplier < 0:
            raise ValueError(
                f"PrivacyRecord.noise_multiplier must be >= 0, got {self.noise_multiplier}"
            )
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(
                f"PrivacyRecord.sample_rate must be in [0, 1], got {self.sample_rate}"
            )
        if self.steps < 0:
            raise ValueError(f"PrivacyRecord.steps must be >= 0, got {self.steps}")
        # normalise numeric types so equal records compare and serialise equal
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", float(self.sample_rate))
        object.__setattr__(self, "steps", int(self.steps))

    @property
    def is_free(self) -> bool:
        """True when the record costs no privacy (no steps, or nobody sampled)."""
        return self.steps == 0 or self.sample_rate == 0.0

    def to_dict(self) -> dict[str, Any]:
        """The record as ``{"noise_multiplier", "sample_rate", "steps"}``.

        Returns:
            A plain dict (what the ledger stores).
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrivacyRecord":
        """The record of :meth:`to_dict`'s output.

        Args:
            d: a mapping with the three fields.

        Returns:
            The record.

        Raises:
            ValueError: a missing field or a value out of range.
        """
        missing = {"noise_multiplier", "sample_rate", "steps"} - set(d)
        if missing:
            raise ValueError(
                f"a privacy record needs noise_multiplier, sample_rate and steps; "
                f"missing {sorted(missing)} in {dict(d)!r}"
            )
        return cls(
            noise_multiplier=float(d["noise_multiplier"]),
            sample_rate=float(d["sample_rate"]),
            steps=int(d["steps"]),
        )


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")


def merge_records(records: Iterable[PrivacyRecord]) -> list[PrivacyRecord]:
    """Group records with the same (noise_multiplier, sample_rate), summing their steps.

    Composition is commutative, so this does not change epsilon; it keeps the PRV
    convolution small. Free records are dropped. Order of first appearance is kept.

    Args:
        records: the records.

    Returns:
        One record per distinct (noise_multiplier, sample_rate).

    Raises:
        TypeError: an entry that is not a :class:`PrivacyRecord`.
    """
    steps: dict[tuple[float, float], int] = {}
    for r in records:
        if not isinstance(r, PrivacyRecord):
            raise TypeError(f"expected PrivacyRecord, got {type(r).__name__}: {r!r}")
        if r.is_free:
            continue
        key = (r.noise_multiplier, r.sample_rate)
        steps[key] = steps.get(key, 0) + r.steps
    return [PrivacyRecord(noise_multiplier=s, sample_rate=q, steps=n) for (s, q), n in steps.items()]


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    from opacus.accountants.analysis import rdp as rdp_analysis

    v = np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)), dtype=float)
    v.setflags(write=False)
    return v


def rdp_epsilon(
    records: Sequence[PrivacyRecord], *, delta: float, orders: Sequence[float] = RDP_ORDERS
) -> tuple[float, float]:
    """(epsilon, best order) of the composed records under RDP.

    Args:
        records: the records (free ones are dropped).
        delta: in (0, 1).
        orders: the RDP orders to try.

    Returns:
        ``(epsilon, best order)``; ``(0.0, nan)`` for no costly record.
    """
    from opacus.accountants.analysis import rdp as rdp_analysis

    recs = merge_records(records)
    if not recs:
        return 0.0, float("nan")
    total = np.zeros(len(orders))
    for r in recs:
        # RDP of the sampled Gaussian is linear in the number of steps
        total = total + r.steps * _rdp_per_step(r.sample_rate, r.noise_multiplier, tuple(orders))
    eps, best = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=total, delta=delta)
    return float(eps), float(best)


def prv_epsilon(
    records: Sequence[PrivacyRecord],
    *,
    delta: float,
    eps_error: float = 0.01,
    delta_error: float | None = None,
) -> float:
    """Upper bound on epsilon of the composed records under PRV composition.

    Mirrors ``opacus.accountants.PRVAccountant.get_epsilon`` step for step.

    Args:
        records: the records (free ones are dropped; each needs noise > 0).
        delta: in (0, 1).
        eps_error: the allowed error in epsilon.
        delta_error: the allowed error in delta (``delta / 1000`` by default).

    Returns:
        The upper bound of the estimate; 0.0 for no costly record.
    """
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        compute_safe_domain_size,
        discretize,
    )

    recs = merge_records(records)
    if not recs:
        return 0.0
    if delta_error is None:
        delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(r.sample_rate, r.noise_multiplier) for r in recs]
    n_self = [r.steps for r in recs]
    size = compute_safe_domain_size(
        prvs=prvs, max_self_compositions=n_self, eps_error=eps_error, delta_error=delta_error
    )
    mesh = eps_error / np.sqrt(sum(n_self) * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-size, size, mesh)
    tprvs = [TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max) for p in prvs]
    dprvs = [discretize(t, domain) for t in tprvs]
    composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=n_self)
    _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)


class Accountant(abc.ABC):
    """Composes privacy records into one epsilon (Opacus's ``IAccountant``, without the
    state: the records are the state, kept by the ledger). Subclasses hold settings only;
    the math is :func:`rdp_epsilon` / :func:`prv_epsilon` (Opacus's analysis)."""

    #: the name :func:`create_accountant` knows it by (also Opacus's name for it)
    name: ClassVar[str]

    @abc.abstractmethod
    def epsilon(self, records: Sequence[PrivacyRecord], *, delta: float) -> float:
        """Epsilon at ``delta`` of ``records`` composed.

        Args:
            records: costly records with noise (:func:`epsilon_of` handles free and
                noiseless ones before it asks an accountant).
            delta: in (0, 1).

        Returns:
            The epsilon.
        """


class RDPAccountant(Accountant):
    """Renyi DP of the sampled Gaussian mechanism at ``orders``, converted at the best one."""

    name = "rdp"

    def __init__(self, orders: Sequence[float] = RDP_ORDERS) -> None:
        self.orders = tuple(orders)

    def epsilon(self, records: Sequence[PrivacyRecord], *, delta: float) -> float:
        return rdp_epsilon(records, delta=delta, orders=self.orders)[0]


class PRVAccountant(Accountant):
    """Numerical composition of privacy loss random variables; the upper bound."""

    name = "prv"

    def __init__(self, eps_error: float = 0.01, delta_error: float | None = None) -> None:
        self.eps_error = eps_error
        self.delta_error = delta_error

    def epsilon(self, records: Sequence[PrivacyRecord], *, delta: float) -> float:
        return prv_epsilon(records, delta=delta, eps_error=self.eps_error, delta_error=self.delta_error)


#: name -> accountant class; a new accountant is a class and one line here
ACCOUNTANT_TYPES: dict[str, type[Accountant]] = {cls.name: cls for cls in (RDPAccountant, PRVAccountant)}

#: the names :func:`create_accountant` accepts (what a spec's or a policy's ``accountant`` may say)
ACCOUNTANTS: tuple[str, ...] = tuple(ACCOUNTANT_TYPES)


def create_accountant(name: str) -> Accountant:
    """The accountant registered as ``name``, with its default settings.

    Args:
        name: one of :data:`ACCOUNTANTS` (``"rdp"``, ``"prv"``).

    Returns:
        A new :class:`Accountant`.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    cls = ACCOUNTANT_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown accountant {name!r}; choose one of {list(ACCOUNTANTS)}")
    return cls()


def epsilon_of(
    records: Sequence[PrivacyRecord], *, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of all ``records`` composed (rounds, jobs, in any order).

    Args:
        records: the records to compose.
        delta: in (0, 1).
        accountant: a name :func:`create_accountant` knows.

    Returns:
        0.0 for no (or only free) records, ``inf`` when any costly record has no noise,
        else the accountant's epsilon.

    Raises:
        ValueError: an unknown accountant or a delta outside (0, 1).
        TypeError: an entry of ``records`` that is not a :class:`PrivacyRecord`.
    """
    acc = create_accountant(accountant)
    _check_delta(delta)
    recs = merge_records(records)
    if not recs:
        return 0.0
    if any(r.noise_multiplier == 0.0 for r in recs):
        return math.inf
    return acc.epsilon(recs, delta=delta)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence[PrivacyRecord] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``tolerance`` in epsilon) such that ``steps`` steps
    at ``sample_rate``, composed with the already-spent ``prior`` records, stay within
    ``target_epsilon`` at ``delta``.

    Args:
        target_epsilon: the budget, a positive finite number.
        delta: in (0, 1).
        sample_rate: the Poisson rate of the planned steps, in (0, 1].
        steps: the planned steps, a positive int.
        accountant: a name :func:`create_accountant` knows.
        prior: records already spent on the same data.
        tolerance: how far below the target the result may stay.

    Returns:
        The noise multiplier.

    Raises:
        PrivacyBudgetError: ``prior`` alone already reaches the target, or no noise
            multiplier up to ``MAX_NOISE_MULTIPLIER`` fits.
        ValueError: an argument out of range or an unknown accountant.
    """
    create_accountant(accountant)
    _check_delta(delta)
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    prior = list(prior)
    spent = epsilon_of(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyBudgetError(
            f"the records already spent epsilon={spent:.4g} at delta={delta:g}, which is at or "
            f"above the target {target_epsilon:g}; no amount of noise makes room for more steps. "
            "Raise the budget or train on a fresh dataset."
        )

    def eps(sigma: float) -> float:
        rec = PrivacyRecord(noise_multiplier=sigma, sample_rate=sample_rate, steps=int(steps))
        return epsilon_of(prior + [rec], delta=delta, accountant=accountant)

    lo, hi = 0.0, 1.0
    eps_hi = eps(hi)
    while eps_hi > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps {steps} steps at "
                f"sample_rate={sample_rate:g} within epsilon={target_epsilon:g} (delta={delta:g}); "
                "use fewer steps, a lower sample rate or a larger budget."
            )
        eps_hi = eps(hi)
    while target_epsilon - eps_hi > tolerance and hi - lo > 1e-6:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e <= target_epsilon:
            hi, eps_hi = mid, e
        else:
            lo = mid
    return hi


__all__ = [
    "ACCOUNTANTS",
    "ACCOUNTANT_TYPES",
    "Accountant",
    "PRVAccountant",
    "PrivacyRecord",
    "RDPAccountant",
    "calibrate_noise",
    "create_accountant",
    "epsilon_of",
    "merge_records",
    "prv_epsilon",
    "rdp_epsilon",
]
