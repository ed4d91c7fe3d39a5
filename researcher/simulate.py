"""Federated training simulated in one process, with the real round code.

:func:`simulate` runs a :class:`~fedmtl.contract.jobspec.JobSpec` over in-memory site
tables through exactly the code a datasite runs (:mod:`fedmtl.datasites.runtime`) and
exactly the researcher's pass loop and secure aggregation (:mod:`fedmtl.researcher.job`),
but without syft servers: each site gets a throw-away home with fresh identity keys and no
ledger (:class:`~fedmtl.researcher.local_site.LocalSite`). :meth:`Job.dry_run` runs a job's
first passes the same way on mock data; the demo runs its comparison rows (other epsilons,
no DP, single-task) through :func:`simulate` on the demo cohort.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping

import pandas as pd

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites import runtime as rt
from fedmtl.researcher.job import Job
from fedmtl.researcher.local_site import LocalSite
from fedmtl.researcher.result import JobResult
from fedmtl.researcher.session import Session
from fedmtl.schema import Schema

__all__ = ["LocalSite", "simulate"]


def simulate(
    spec: JobSpec,
    site_data: Mapping[str, pd.DataFrame],
    schema: Schema,
    *,
    out: str | Path | None = None,
    progress: bool = False,
) -> JobResult:
    """Run ``spec`` over ``site_data`` in process, every pass through the datasite runtime
    and secure aggregation.

    Args:
        spec: the job.
        site_data: site name -> records with the schema's columns and split column.
        schema: the records schema every site shares.
        out: the job folder (checkpoints, aggregates); default a temporary one.
        progress: show a progress bar.

    Returns:
        The job's :class:`~fedmtl.researcher.result.JobResult`.
    """
    with tempfile.TemporaryDirectory(prefix="fedmtl-sim-") as tmp:
        sites = {n: LocalSite(n, df, schema, Path(tmp) / "homes" / n) for n, df in site_data.items()}
        try:
            session = Session(sites)
            job = Job.create(session, spec, out=Path(out) if out else Path(tmp) / "job")
            transport = rt.LocalTransport({n: s.data for n, s in sites.items()}, job.site_specs)
            return job.run(progress=progress, transport=transport)
        finally:
            for n in sites:
                rt.unregister_home(n)
