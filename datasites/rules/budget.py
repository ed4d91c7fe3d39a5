"""The one privacy-budget check: does spending some records keep a budget, and what is left.

Both the reviewer (:func:`fedmtl.datasites.rules.review.decide`, before a job is
approved) and the ledger (:meth:`fedmtl.datasites.ledger.ledger.Ledger.charge_pass`,
before each pass runs) ask the same question through :func:`check_budget`, so the two
can never disagree about whether a job fits:

* **over** -- the epsilon of what was counted before, composed with the new records
  (never added up), exceeds the limit by more than float noise
  (:data:`EPS_TOLERANCE`, relative, plus the same absolute slack);
* **left** -- always the budget left *before* the new records: ``limit`` minus the
  epsilon of what was counted before them (for the reviewer that is spent plus
  committed, for the ledger what its passes charged). What the new records bring the
  total to is :attr:`BudgetCheck.after`; ``limit - after`` is what would remain.

Pure: imports neither syft nor torch (epsilon comes from
:mod:`fedmtl.privacy.accounting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of

#: relative (and absolute) slack when comparing a composed epsilon with a limit: float
#: noise only (records composed in another order, or pass by pass instead of at once)
EPS_TOLERANCE = 1e-9


def exceeds(value: float, limit: float) -> bool:
    """Whether ``value`` is above ``limit`` by more than float noise.

    Args:
        value: a composed epsilon.
        limit: the budget or cap it must stay within.

    Returns:
        ``True`` when ``value > limit * (1 + EPS_TOLERANCE) + EPS_TOLERANCE``.
    """
    return value > limit * (1 + EPS_TOLERANCE) + EPS_TOLERANCE


@dataclass(frozen=True)
class BudgetCheck:
    """One budget checked against new records.

    Attributes:
        limit: the budget (or cap).
        before: epsilon of the records counted before the new ones.
        after: epsilon of those records composed with the new ones.
    """

    limit: float
    before: float
    after: float

    @property
    def over(self) -> bool:
        """Whether the new records would exceed the limit (see :func:`exceeds`)."""
        return exceeds(self.after, self.limit)

    @property
    def left(self) -> float:
        """The budget left before the new records: ``limit - before``."""
        return self.limit - self.before


def check_budget(
    *,
    before: Sequence[PrivacyRecord],
    new: Sequence[PrivacyRecord],
    limit: float,
    delta: float,
    accountant: str,
) -> BudgetCheck:
    """Compose ``new`` with ``before`` and compare the epsilon with ``limit``.

    Args:
        before: records already counted against this budget.
        new: the records to be spent (a whole job, or one pass).
        limit: the budget, in epsilon at ``delta``.
        delta: the delta every epsilon is taken at (the policy's).
        accountant: the accountant that composes the records (the policy's).

    Returns:
        A :class:`BudgetCheck` with the epsilon before and after, its ``over`` verdict
        and the budget ``left`` before ``new``.

    Raises:
        ValueError: from the accountant, for an unknown accountant or a bad delta.
    """
    eps_before = epsilon_of(list(before), delta=delta, accountant=accountant)
    eps_after = epsilon_of([*before, *new], delta=delta, accountant=accountant)
    return BudgetCheck(limit=float(limit), before=float(eps_before), after=float(eps_after))


__all__ = ["EPS_TOLERANCE", "BudgetCheck", "check_budget", "exceeds"]
