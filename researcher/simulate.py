"""Federated training simulated in one process, with the real round code.

:func:`simulate` runs a :class:`~fedmtl.jobspec.JobSpec` over in-memory site
tables through exactly the code a datasite runs (:mod:`fedmtl.datasites.runtime`) and
exactly the researcher's pass loop and secure aggregation (:mod:`fedmtl.researcher.job`),
but without syft servers: each site gets a throw-away home with fresh identity keys and no
ledger. It is what :meth:`Job.dry_run` does on mock data, and what the demo uses for its
comparison runs (other epsilons, no DP, single-task) on the demo cohort.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from fedmtl.datasites import identity
from fedmtl.datasites import runtime as rt
from fedmtl.schema import Schema


@dataclass
class LocalSite:
    """A site held in memory, with the attributes a :class:`Session` site has."""

    name: str
    data: pd.DataFrame = field(repr=False)
    schema: Schema = field(repr=False)
    home: Path
    url: str = "local"

    def __post_init__(self) -> None:
        split = self.schema.split_column
        sizes = {str(k): int(v) for k, v in self.data[split].value_counts().items()} if split else {}
        self.meta = {
            "site": self.name,
            "schema": self.schema.to_dict(),
            "n_records": int(len(self.data)),
            "split_sizes": sizes,
            "label_counts": {},
        }
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / rt.DRY_RUN_MARKER).write_text("throw-away home: no ledger\n")
        self._identity = identity.create(self.home, self.name)
        rt.register_home(self.name, self.home)

    @property
    def identity(self) -> identity.PublicIdentity:
        return self._identity.public

    @property
    def n_records(self) -> int:
        return int(len(self.data))

    def mock(self) -> pd.DataFrame:
        return self.data


def simulate(
    spec,
    site_data: Mapping[str, pd.DataFrame],
    schema: Schema,
    *,
    out: str | Path | None = None,
    progress: bool = False,
):
    """Run ``spec`` over ``site_data`` (site -> records with the schema's split column)
    in process; returns the :class:`~fedmtl.researcher.result.JobResult`."""
    from fedmtl.researcher.job import Job, LocalTransport
    from fedmtl.researcher.session import Session

    with tempfile.TemporaryDirectory(prefix="fedmtl-sim-") as tmp:
        sites = {n: LocalSite(n, df, schema, Path(tmp) / "homes" / n) for n, df in site_data.items()}
        try:
            session = Session(sites)
            job = Job.create(session, spec, out=Path(out) if out else Path(tmp) / "job")
            transport = LocalTransport({n: s.data for n, s in sites.items()}, job.site_specs)
            return job.run(progress=progress, transport=transport)
        finally:
            for n in sites:
                rt.unregister_home(n)


def run_local_passes(job, data: Mapping[str, Any], *, passes: int) -> dict[str, Any]:
    """Dry-run ``passes`` passes of ``job`` on ``data`` (site -> table), with throw-away
    identities; weights stay at their initial values. Raises on any site error."""
    import secrets

    import numpy as np

    from fedmtl import protocol
    from fedmtl.models import model_to_vector
    from fedmtl.researcher.job import JobError, LocalTransport, run_pass

    with tempfile.TemporaryDirectory(prefix="fedmtl-dryrun-") as tmp:
        schema = protocol.schema_of(next(iter(job.site_specs.values())))
        sites = {s: LocalSite(s, data[s], schema, Path(tmp) / s) for s in job.sites}
        try:
            roster = {s: site.identity.verify_key.to_bytes().hex() for s, site in sites.items()}
            dry_id = f"dryrun-{secrets.token_hex(3)}"
            specs = {s: {**job.site_specs[s], "roster": roster, "job_id": dry_id} for s in job.sites}
            transport = LocalTransport(data, specs)
            weights = model_to_vector(job.model).astype(np.float64)
            metrics = {}
            scaling = None
            for p in range(1, min(passes, protocol.last_pass(job.spec)) + 1):
                outcome = run_pass(transport=transport, site_specs=specs, sites=job.sites, pass_no=p,
                                   attempt=0, weights=weights, model=job.model, scaling=scaling)
                if outcome.dropped:
                    raise JobError("dry run failed: " + "; ".join(f"{s}: {w}" for s, w in outcome.dropped.items()))
                if "stats" in outcome.arrays:  # standard scaling: every later pass needs it
                    scaling = protocol.derive_scaling(specs[job.sites[0]], outcome.arrays["stats"],
                                                      n_sites=len(outcome.survivors))
                if "metrics" in outcome.arrays:
                    metrics[p] = protocol.compute_metrics(outcome.arrays["metrics"], job._tasks())
        finally:
            for s in sites:
                rt.unregister_home(s)
    return {"ok": True, "passes": len(metrics), "metrics": metrics}
