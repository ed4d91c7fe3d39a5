"""The package's own exceptions, every one a user can hit, and its warnings.
Each message says what was wrong and what to do.

The tree, by who raises them:

* base and records: :class:`SchemaError`, :class:`RecordsValidationError`,
  :class:`ConfigError`, :class:`JobSpecError` (the job spec), :class:`WireError` (the
  data-plane wire format);
* the owner's side (:class:`DatasiteError` and below): :class:`CredentialsError`,
  :class:`PeerError`, :class:`ManualReviewError`, :class:`LedgerError` with
  :class:`LedgerCorruptError` and :class:`RoundRefusedError`; :class:`PolicyError`,
  :class:`ReviewError`, :class:`CohortError`, :class:`MockError`,
  :class:`DataPlaneRefused` with :class:`JobClosedRefused`, :class:`LaunchWarning`; :class:`KeyMismatch` (the audit's
  pinned key);
* privacy: :class:`PrivacyBudgetError`, :class:`SecureRNGUnavailableWarning`, and the
  secure-aggregation errors under :class:`SecAggError` (:class:`ShamirError`, the key
  errors, the protocol errors);
* rounds and jobs: :class:`RoundError`, :class:`PassAlreadyExecutedError`,
  :class:`JobError`, :class:`PassLostError`.

The modules that raise them keep their names importable (``from
fedmtl.datasites.ledger.ledger import LedgerError`` still works): they import them from
here. This module imports nothing of fedmtl.
"""

from __future__ import annotations

from typing import Sequence


class FedMTLError(Exception):
    """Base class of every error a fedmtl user can hit."""


class SchemaError(FedMTLError, ValueError):
    """A schema file is malformed (unknown role or type, a column named twice, ...)."""


class RecordsValidationError(FedMTLError, ValueError):
    """Records do not match their schema. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], source: str = "records"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{source} failed validation with {len(self.problems)} problem(s); "
            f"nothing was written. Fix these and try again:\n{lines}"
        )


class DatasiteError(FedMTLError, RuntimeError):
    """A datasite could not be launched, reached or used."""


class CredentialsError(DatasiteError):
    """Wrong email or password for a datasite."""


class ConfigError(FedMTLError, ValueError):
    """A job spec, policy or sites file is invalid."""


class JobSpecError(ConfigError):
    """A job spec is invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[str], source: str = "job spec") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s); fix these and try again:\n{lines}")


class PolicyError(ConfigError):
    """A policy file or value is invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], source: str = "policy"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{source} is invalid ({len(self.problems)} problem(s)); fix these and try again:\n{lines}"
        )


class WireError(FedMTLError):
    """A malformed, oversized or badly signed data-plane message."""


# -- the owner's side ------------------------------------------------------------------------


class PeerError(DatasiteError):
    """A peer cannot be pinned or removed as asked."""


class ManualReviewError(DatasiteError):
    """A manual review cannot be done as asked (unknown request, already decided...)."""


class LedgerError(DatasiteError):
    """The ledger cannot be used as asked."""


class LedgerCorruptError(LedgerError):
    """The ledger does not verify (edited, truncated, or signed by another key).
    Do not append to it; run ``fedmtl audit`` and restore from a backup."""


class RoundRefusedError(LedgerError):
    """A round may not run: the request is not approved, the round is a replay, or it is
    beyond the approved number of rounds."""


class ReviewError(FedMTLError, ValueError):
    """A manual decision is not allowed (e.g. approving a request the policy denies)."""


class CohortError(FedMTLError, ValueError):
    """The demo cohort cannot be prepared with these arguments."""


class MockError(FedMTLError, ValueError):
    """A mock could not be made (for example, every possible row is a real row)."""


class DataPlaneRefused(FedMTLError):
    """A data-plane request this datasite refuses (not signed, not approved, a replay...).

    ``status`` is the HTTP status it is answered with."""

    def __init__(self, message: str, *, status: int = 403):
        super().__init__(message)
        self.status = status


class JobClosedRefused(DataPlaneRefused):
    """A pass message for a job this datasite has closed (finished, after its last pass or
    a close request, or aborted): no pass of it runs any more."""


class LaunchWarning(UserWarning):
    """Something a data owner should fix, found at launch (the datasite still starts)."""


class PrivacyBudgetError(FedMTLError):
    """A job or round would spend more privacy budget than allowed."""


class SecureRNGUnavailableWarning(UserWarning):
    """secure_mode was requested but torchcsprng is unavailable; a weaker RNG is used."""


class SecAggError(FedMTLError):
    """Base class of secure-aggregation protocol errors."""


class ShamirError(SecAggError, ValueError):
    """Shares are malformed, inconsistent, duplicated or too few to reconstruct."""


class KeyFormatError(SecAggError, ValueError):
    """Key or parameter bytes have the wrong length or encoding."""


class SignatureError(SecAggError):
    """A signature did not verify: the data or the key was altered or substituted."""


class DecryptionError(SecAggError):
    """An AES-GCM ciphertext failed authentication (tampered, wrong key, nonce or AAD)."""


class KeyAgreementError(SecAggError):
    """X25519 produced no usable shared secret (a low-order peer public key)."""


class KeyFileError(SecAggError, OSError):
    """A private-key file is missing, malformed or readable by others."""


class TooFewSitesError(SecAggError):
    """Fewer than t sites are left at some stage; the round is aborted, nothing revealed."""


class ProtocolStateError(SecAggError):
    """A stage was called out of order or twice (a replayed request)."""


class MessageError(SecAggError, ValueError):
    """A message is malformed, for another job/round/parameter set, from an unknown or
    duplicated sender, or inconsistent with earlier messages."""


class UnmaskRefusedError(SecAggError):
    """An honest site refuses an unmask request that could reveal a site's input."""


class KeyMismatch(FedMTLError):
    """``fedmtl audit --verify-key``: the pinned value is neither the home's key nor its
    fingerprint; the audit fails (exit 1) as a verification would."""


class JobError(FedMTLError):
    """A job cannot be submitted, run or resumed; the message says which site and why."""


class PassLostError(JobError):
    """Every site that answered had already completed this pass (and charged it), but the
    researcher never saved its aggregate (it stopped in between). The pass cannot run
    again; the job continues with the next one."""


class RoundError(FedMTLError):
    """A round call the datasite's runtime refuses (replay, beyond the approved count, bad
    weights...). Raised by :mod:`fedmtl.datasites.runtime` and the ledger it charges."""


class PassAlreadyExecutedError(RoundError):
    """The pass was completed (and charged) at this site; it never runs twice."""
