"""Sites held in memory, and a job's passes run on them with the real round code.

A :class:`LocalSite` has the attributes a :class:`~fedmtl.researcher.session.Session` site
has (name, url, meta, identity, n_records, mock), a throw-away home with fresh identity keys
and no ledger, and is registered with the datasite runtime
(:func:`fedmtl.datasites.runtime.register_home`) so that a
:class:`~fedmtl.datasites.runtime.LocalTransport` reaches it in process.
:func:`run_local_passes` is :meth:`Job.dry_run <fedmtl.researcher.job.Job.dry_run>`;
:func:`fedmtl.researcher.simulate.simulate` runs whole jobs over local sites.
"""

from __future__ import annotations

import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from fedmtl.contract import protocol
from fedmtl.contract.passes import run_pass
from fedmtl.datasites import runtime as rt
from fedmtl.datasites.site import identity
from fedmtl.errors import JobError
from fedmtl.models import model_to_vector
from fedmtl.schema import Schema


@dataclass
class LocalSite:
    """A site held in memory, with the attributes a :class:`Session` site has.

    Args:
        name: the site's name (registered with the runtime under it).
        data: its records, with the schema's columns (and split column, if any).
        schema: the records schema.
        home: a throw-away home folder, created with fresh identity keys and a marker that it
            keeps no ledger. The caller unregisters the site
            (:func:`fedmtl.datasites.runtime.unregister_home`) when done.
        url: shown where a connected site shows its URL.
    """

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
        """The site's public identity (its fresh Ed25519 and X25519 keys)."""
        return self._identity.public

    @property
    def n_records(self) -> int:
        """How many records the site holds."""
        return int(len(self.data))

    def mock(self) -> pd.DataFrame:
        """The site's records themselves (a local site has no separate mock)."""
        return self.data


def run_local_passes(job: Any, data: Mapping[str, Any], *, passes: int) -> dict[str, Any]:
    """Dry-run the first passes of ``job`` on local sites, with throw-away identities.

    Every pass goes through the datasite runtime and secure aggregation exactly as on the
    datasites; the weights stay at their initial values.

    Args:
        job: a :class:`~fedmtl.researcher.job.Job` (its sites, per-site specs and model).
        data: site name -> records table, for every site of the job.
        passes: how many passes to run (at most the job's last pass).

    Returns:
        ``{"ok": True, "passes": number of passes that released metrics, "metrics": {pass:
        metrics}}``.

    Raises:
        JobError: a site failed (its error is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="fedmtl-dryrun-") as tmp:
        schema = protocol.schema_of(next(iter(job.site_specs.values())))
        sites = {s: LocalSite(s, data[s], schema, Path(tmp) / s) for s in job.sites}
        try:
            roster = {s: site.identity.verify_key.to_bytes().hex() for s, site in sites.items()}
            dry_id = f"dryrun-{secrets.token_hex(3)}"
            specs = {s: {**job.site_specs[s], "roster": roster, "job_id": dry_id} for s in job.sites}
            transport = rt.LocalTransport(data, specs)
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
                    metrics[p], _ = protocol.read_release(outcome.arrays["metrics"], specs[job.sites[0]],
                                                          n_sites=len(outcome.survivors), recalibrate=False)
        finally:
            for s in sites:
                rt.unregister_home(s)
    return {"ok": True, "passes": len(metrics), "metrics": metrics}
