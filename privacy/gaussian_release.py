"""The Gaussian mechanism as one interface, for every vector a datasite releases noised.

A release is a vector of fixed shape computed from the site's records, whose L2 change
when one record is added or removed is at most ``sensitivity`` once each coordinate is
divided by its scale ``w[i]`` (1 everywhere unless the release says otherwise). Releasing
``vec + w * N(0, (noise_multiplier * sensitivity)^2)`` per coordinate is the Gaussian
mechanism with noise multiplier ``sigma``: Renyi DP ``alpha / (2 sigma^2)`` at every order
(Mironov 2017, Prop. 7), i.e. ``PrivacyRecord(sigma, sample_rate=1.0, steps=1)``
(:func:`gaussian_record`), charged to the ledger before the vector is computed.

:class:`GaussianRelease` holds what every such release repeats: the noise-multiplier
check (no noise is never allowed), the shape and finiteness check of the vector (nothing
is released otherwise), the noise, and the privacy record. A release is a subclass that
says what it releases, its shape, its sensitivity and (optionally) its scales:
:class:`fedmtl.privacy.stats_release.StatisticsRelease` and
:class:`fedmtl.privacy.eval_release.EvaluationRelease`.

Pure: numpy and :mod:`fedmtl.privacy.accounting` only.
"""

from __future__ import annotations

import abc
import math
import secrets
from typing import Any, ClassVar

import numpy as np

from fedmtl.privacy.accounting import PrivacyRecord


def check_noise_multiplier(noise_multiplier: Any, *, released: str = "evaluation statistics") -> float:
    """The noise multiplier of a Gaussian-mechanism release, checked.

    Args:
        noise_multiplier: a finite number > 0 (not a bool).
        released: what would be released, named in the error.

    Returns:
        ``noise_multiplier`` as a float.

    Raises:
        ValueError: anything else (releasing without noise is not differentially private).
    """
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float, np.integer, np.floating))
        or not math.isfinite(float(noise_multiplier))
        or float(noise_multiplier) <= 0
    ):
        raise ValueError(
            f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}; "
            f"releasing {released} without noise is not differentially private"
        )
    return float(noise_multiplier)


def gaussian_record(noise_multiplier: Any, *, released: str = "evaluation statistics") -> PrivacyRecord:
    """What one Gaussian-mechanism release with ``noise_multiplier`` costs: one step at
    sample rate 1 (RDP ``alpha / (2 sigma^2)``).

    Args:
        noise_multiplier: as :func:`check_noise_multiplier` accepts it.
        released: what is released, named in the error.

    Returns:
        ``PrivacyRecord(sigma, sample_rate=1.0, steps=1)``.

    Raises:
        ValueError: a bad noise multiplier.
    """
    return PrivacyRecord(noise_multiplier=check_noise_multiplier(noise_multiplier, released=released),
                         sample_rate=1.0, steps=1)


class GaussianRelease(abc.ABC):
    """One noised release of a fixed-shape vector (see the module docs).

    Subclasses set :attr:`released` and implement :attr:`shape`, :attr:`sensitivity` and
    :meth:`describe`; they may override :meth:`scales`. The noise multiplier is checked
    when the release is built, before anything else about it is computed.

    Args:
        noise_multiplier: the Gaussian mechanism's noise multiplier, a finite number > 0.

    Raises:
        ValueError: a bad noise multiplier.
    """

    #: what the release holds, as error messages name it
    released: ClassVar[str] = "statistics"

    def __init__(self, *, noise_multiplier: Any) -> None:
        self.noise_multiplier = check_noise_multiplier(noise_multiplier, released=self.released)

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The shape of the released vector."""

    @property
    @abc.abstractmethod
    def sensitivity(self) -> float:
        """L2 sensitivity of the ``w``-scaled vector to adding or removing one record."""

    @abc.abstractmethod
    def describe(self) -> str:
        """What the vector is the statistics of, for the shape error (``"this schema"``)."""

    def scales(self) -> np.ndarray | None:
        """Per-coordinate scales ``w`` of the noise (``None``: 1 everywhere)."""
        return None

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each ``w``-scaled coordinate."""
        return self.noise_multiplier * self.sensitivity

    def check(self, vec: Any) -> np.ndarray:
        """``vec`` as float64, if it may be released.

        Args:
            vec: the exact statistics.

        Returns:
            The vector, float64.

        Raises:
            ValueError: a wrong shape, or a NaN or infinite entry.
        """
        x = np.asarray(vec, dtype=np.float64)
        if x.shape != tuple(self.shape):
            raise ValueError(f"vec has shape {x.shape}; the statistics of {self.describe()} need {tuple(self.shape)}")
        if not np.all(np.isfinite(x)):
            raise ValueError("vec contains NaN or inf; refusing to release it")
        return x

    def noise(self, vec: Any, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """``vec + w * N(0, noise_std^2)`` per coordinate.

        Args:
            vec: the exact statistics (checked with :meth:`check`; nothing is noised or
                returned if it fails).
            rng: the generator; default seeded with 128 bits from the OS CSPRNG. Pass one
                only in tests.

        Returns:
            The noised vector, float64.

        Raises:
            ValueError: from :meth:`check`.
        """
        x = self.check(vec)
        if rng is None:
            rng = np.random.default_rng(secrets.randbits(128))
        draw = rng.normal(0.0, self.noise_std, size=x.shape)
        w = self.scales()
        return x + draw if w is None else x + w * draw

    def privacy_record(self) -> PrivacyRecord:
        """What one :meth:`noise` costs (:func:`gaussian_record`)."""
        return gaussian_record(self.noise_multiplier, released=self.released)


__all__ = ["GaussianRelease", "check_noise_multiplier", "gaussian_record"]
