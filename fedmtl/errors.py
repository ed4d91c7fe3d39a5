"""The package's own exceptions. Each message says what was wrong and what to do."""


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


class PrivacyBudgetError(FedMTLError):
    """A job or round would spend more privacy budget than allowed."""


class SecAggError(FedMTLError):
    """Base class of secure-aggregation protocol errors."""


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
