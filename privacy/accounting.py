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

This module imports neither torch nor syft.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrivacyRecord":
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


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {list(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")


def merge_records(records: Iterable[PrivacyRecord]) -> list[PrivacyRecord]:
    """Group records with the same (noise_multiplier, sample_rate), summing their steps.

    Composition is commutative, so this does not change epsilon; it keeps the PRV
    convolution small. Free records are dropped. Order of first appearance is kept.
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
    """(epsilon, best order) of the composed records under RDP."""
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


def epsilon_of(
    records: Sequence[PrivacyRecord], *, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of all ``records`` composed (rounds, jobs, in any order).

    Returns 0.0 for no (or only free) records and ``inf`` when any costly record has
    no noise. Raises ``ValueError`` for an unknown accountant or a delta outside (0, 1).
    """
    _check_accountant(accountant)
    _check_delta(delta)
    recs = merge_records(records)
    if not recs:
        return 0.0
    if any(r.noise_multiplier == 0.0 for r in recs):
        return math.inf
    if accountant == "rdp":
        return rdp_epsilon(recs, delta=delta)[0]
    return prv_epsilon(recs, delta=delta)


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

    Raises ``PrivacyBudgetError`` when ``prior`` alone already exceeds the target or no
    noise multiplier up to ``MAX_NOISE_MULTIPLIER`` fits.
    """
    from fedmtl.errors import PrivacyBudgetError

    _check_accountant(accountant)
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
    "PrivacyRecord",
    "calibrate_noise",
    "epsilon_of",
    "merge_records",
    "prv_epsilon",
    "rdp_epsilon",
]
