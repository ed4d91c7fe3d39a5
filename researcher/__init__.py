"""fedmtl.researcher — the scientist's side: connect to datasites, define a multi-task DP
job, dry-run, submit, run it with secure aggregation, resume, and read the result."""

from fedmtl.contract.jobspec import JobSpec, JobSpecError
from fedmtl.contract.strategies import make_strategy
from fedmtl.researcher.checkpoint import CheckpointStore
from fedmtl.researcher.job import Job, JobError
from fedmtl.researcher.result import JobResult
from fedmtl.researcher.session import Session

__all__ = ["CheckpointStore", "Job", "JobError", "JobResult", "JobSpec", "JobSpecError", "Session", "make_strategy"]
