"""The pass schedule of a job: which pass is the statistics pass, which train, which evaluate.

A *pass* is one trip of the job through the five secure-aggregation stages; a *round* is a
pass that trains. A job of ``R`` rounds runs, in order:

- with ``scaling = "standard"``: pass 1, the *statistics pass* (it releases noised feature
  statistics and trains and evaluates nothing), passes ``2..R+1`` (the training rounds) and
  pass ``R+2`` (the final evaluation);
- with ``scaling = "range"``: passes ``1..R`` (the training rounds) and pass ``R+1``.

The final pass always releases evaluation statistics; with ``eval_every = k >= 1`` so do
the passes of training rounds ``1, 1 + k, 1 + 2k, ...`` (each evaluates the model it
receives). One :class:`PassSchedule` answers every question about this for the job spec
(:attr:`fedmtl.contract.jobspec.JobSpec.schedule`), the reviewer's limits
(:mod:`fedmtl.datasites.rules.limits`) and the runtime that charges each pass, so the
reviewer bounds exactly what the runtime charges. Pure: imports nothing of fedmtl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PassSchedule"]


@dataclass(frozen=True)
class PassSchedule:
    """Which of a job's passes releases what.

    Args:
        rounds: the training rounds ``R`` (an int >= 0).
        eval_every: ``0`` to evaluate the final model only; ``k >= 1`` to also evaluate
            the model each ``k``-th training round receives, from round 1 on.
        stats_pass: whether pass 1 is the statistics pass (``scaling = "standard"``).

    Raises:
        TypeError: ``rounds`` or ``eval_every`` is not an int, or ``stats_pass`` not a bool.
        ValueError: ``rounds`` or ``eval_every`` is negative.
    """

    rounds: int
    eval_every: int = 0
    stats_pass: bool = False

    def __post_init__(self) -> None:
        for name in ("rounds", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"PassSchedule.{name} must be an int, got {type(v).__name__} {v!r}")
            if v < 0:
                raise ValueError(f"PassSchedule.{name} must be >= 0, got {v}")
        if not isinstance(self.stats_pass, bool):
            raise TypeError(f"PassSchedule.stats_pass must be a bool, got {self.stats_pass!r}")

    @classmethod
    def of(cls, job: Any) -> "PassSchedule":
        """The schedule of a job spec.

        Args:
            job: a :class:`~fedmtl.contract.jobspec.JobSpec` (anything with ``rounds``,
                ``eval_every`` and ``scaling``).

        Returns:
            Its schedule (a statistics pass exactly when ``scaling == "standard"``).
        """
        return cls(rounds=int(job.rounds), eval_every=int(job.eval_every), stats_pass=job.scaling == "standard")

    @property
    def n_passes(self) -> int:
        """Passes of the whole job: the statistics pass (if any), the rounds, the final
        evaluation."""
        return self.rounds + 1 + int(self.stats_pass)

    @property
    def last_pass(self) -> int:
        """The job's last pass (its final evaluation): :attr:`n_passes`."""
        return self.n_passes

    def passes(self) -> range:
        """Every pass number of the job, ``1..n_passes``.

        Returns:
            ``range(1, n_passes + 1)``.
        """
        return range(1, self.n_passes + 1)

    def is_stats_pass(self, pass_no: int) -> bool:
        """Whether ``pass_no`` is the statistics pass.

        Args:
            pass_no: a pass number.

        Returns:
            ``True`` for pass 1 of a schedule with a statistics pass.
        """
        return self.stats_pass and pass_no == 1

    def training_round(self, pass_no: int) -> int | None:
        """The training round that ``pass_no`` runs.

        Args:
            pass_no: a pass number.

        Returns:
            The round (``1..rounds``), or ``None`` for a pass that trains nothing.
        """
        r = int(pass_no) - int(self.stats_pass)
        return r if 1 <= r <= self.rounds else None

    def rounds_before(self, pass_no: int) -> int:
        """Training rounds completed before ``pass_no`` runs (what the model it evaluates
        has been trained for).

        Args:
            pass_no: a pass number.

        Returns:
            A count in ``0..rounds``.
        """
        return max(0, min(self.rounds, int(pass_no) - 1 - int(self.stats_pass)))

    def evaluates(self, pass_no: int) -> bool:
        """Whether ``pass_no`` releases (noised, charged) evaluation statistics.

        Args:
            pass_no: a pass number.

        Returns:
            ``True`` for the final pass, and with ``eval_every = k >= 1`` for the passes of
            training rounds ``1, 1 + k, 1 + 2k, ...``; never for the statistics pass.
        """
        r = self.training_round(pass_no)
        return pass_no == self.n_passes or (self.eval_every >= 1 and r is not None and (r - 1) % self.eval_every == 0)

    def eval_passes(self) -> tuple[int, ...]:
        """The passes that release evaluation statistics, in order.

        Returns:
            The pass numbers for which :meth:`evaluates` holds.
        """
        return tuple(p for p in self.passes() if self.evaluates(p))

    @property
    def n_eval_passes(self) -> int:
        """How many passes release evaluation statistics (what ``limits.max_eval_passes``
        bounds): ``len(eval_passes())``, computed in constant time (the reviewer asks
        before it has bounded anything but the numbers' magnitude)."""
        if self.eval_every == 0:
            return 1
        return -(-self.rounds // self.eval_every) + 1
