"""The site spec: what one datasite approves and runs, parsed once.

For each datasite of a job the researcher binds one *site spec* to the round template as
the syft ``Constant`` named ``spec`` (and the data plane carries the same mapping in every
request's envelope)::

    {"job": JobSpec.to_dict(), "job_id": str, "site": str,
     "roster": {site: ed25519 hex}, "schema": Schema.to_dict(), "max_count": int,
     "template": str,            # optional: the round template's name
     "dataplane_key": hex}       # optional: the job's data-plane key (Ed25519, public)

The reviewer (:mod:`fedmtl.datasites.review.autoreview`), the runtime
(:mod:`fedmtl.datasites.runtime`) and the data plane each read that mapping once, with
:meth:`SiteSpec.parse`, at their edge; everything behind the edge takes the
:class:`SiteSpec`. "spec" alone means the :class:`~fedmtl.contract.jobspec.JobSpec`.

The hash a datasite's ledger records for an approval is computed over the mapping the
request carried, so :meth:`SiteSpec.to_dict` returns exactly that mapping (a copy), never
a re-serialisation. Pure: no syft.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.schedule import PassSchedule
from fedmtl.errors import ConfigError, SchemaError
from fedmtl.schema import Schema

__all__ = ["OPTIONAL_SITE_SPEC_KEYS", "SITE_SPEC_KEYS", "SiteSpec"]

#: keys of the site spec the library sends (researcher.job.Job.create), in its order
SITE_SPEC_KEYS = ("job", "job_id", "site", "roster", "schema", "max_count", "template", "dataplane_key")
#: keys a site spec may leave out (a job without a data-plane key runs over syft only)
OPTIONAL_SITE_SPEC_KEYS = ("template", "dataplane_key")


@dataclass(frozen=True)
class SiteSpec:
    """One datasite's approved job: the job spec and what binds it to this site.

    Build one with :meth:`parse` (from the bound mapping) or :meth:`build` (from its
    parts, as the researcher does). Equality compares the parsed fields.

    Attributes:
        job: the job spec every site of the job shares.
        job_id: the job's id (the ledger's request id; a safe folder name).
        site: the datasite this spec is addressed to.
        roster: site name -> Ed25519 identity key (hex) of every site of the job, in the
            order the spec lists them (read-only). Empty in a dry run without keys.
        schema: the schema the spec carries (a datasite replaces it with its own,
            :meth:`with_schema`).
        max_count: the largest training-record count among the sites (the
            secure-aggregation bound).
        template: the round template's name, if the spec names it.
        dataplane_key: the job's data-plane key (hex), if the job uses the data plane.
    """

    job: JobSpec
    job_id: str
    site: str
    roster: Mapping[str, str]
    schema: Schema
    max_count: int
    template: str | None = None
    dataplane_key: str | None = None
    #: the mapping this spec was parsed from (what the spec hash is computed over)
    _bound: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roster", MappingProxyType(dict(self.roster)))

    # -- construction ----------------------------------------------------------------
    @classmethod
    def parse(cls, bound: Mapping[str, Any]) -> "SiteSpec":
        """Parse the mapping a request binds (the syft ``Constant``, or a data-plane
        envelope's spec).

        Args:
            bound: the site spec as plain data (see the module docs).

        Returns:
            The parsed spec; :meth:`to_dict` gives ``bound`` back, unchanged.

        Raises:
            ConfigError: what is missing or malformed, by key (a :class:`JobSpecError`,
                itself a ``ConfigError``, for the job).
        """
        if not isinstance(bound, Mapping):
            raise ConfigError(f"the site spec must be a table, got {type(bound).__name__}")
        problems: list[str] = []
        unknown = sorted(str(k) for k in bound if k not in SITE_SPEC_KEYS)
        if unknown:
            problems.append(f"unknown key(s) {unknown}; allowed: {list(SITE_SPEC_KEYS)}")
        missing = [k for k in SITE_SPEC_KEYS if k not in OPTIONAL_SITE_SPEC_KEYS and k not in bound]
        if missing:
            problems.append(f"it lacks {missing}")
        if problems:
            raise ConfigError("the site spec is malformed: " + "; ".join(problems))
        job_id = bound["job_id"]
        if not isinstance(job_id, str) or not job_id or "/" in job_id or job_id.startswith("."):
            raise ConfigError(f"invalid job id {job_id!r}")
        site = bound["site"]
        if not isinstance(site, str) or not site:
            raise ConfigError(f"the site spec's site must be a site name, got {site!r}")
        roster = bound["roster"]
        if not isinstance(roster, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in roster.items()):
            raise ConfigError("the site spec's roster must be a table of site name -> Ed25519 public key (hex)")
        max_count = bound["max_count"]
        if isinstance(max_count, bool) or not isinstance(max_count, int):
            raise ConfigError(f"the site spec's max_count must be an integer, got {max_count!r}")
        for key in OPTIONAL_SITE_SPEC_KEYS:
            v = bound.get(key)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"the site spec's {key} must be a string, got {type(v).__name__}")
        job = JobSpec.from_dict(bound["job"])
        schema_raw = bound["schema"]
        if not isinstance(schema_raw, Mapping):
            raise ConfigError(f"the site spec's schema must be a table, got {type(schema_raw).__name__}")
        try:
            schema = Schema.from_dict(dict(schema_raw), source="the job's schema")
        except SchemaError as e:
            raise ConfigError(str(e)) from None
        return cls(job=job, job_id=job_id, site=site, roster=roster, schema=schema, max_count=max_count,
                   template=bound.get("template"), dataplane_key=bound.get("dataplane_key"),
                   _bound=copy.deepcopy(dict(bound)))

    @classmethod
    def build(
        cls,
        *,
        job: JobSpec,
        job_id: str,
        site: str,
        roster: Mapping[str, str],
        schema: Schema,
        max_count: int,
        template: str | None = None,
        dataplane_key: str | None = None,
    ) -> "SiteSpec":
        """A site spec from its parts (what the researcher submits to ``site``).

        Args:
            job: the job spec.
            job_id: the job's id.
            site: the datasite it is addressed to.
            roster: site name -> Ed25519 identity key (hex).
            schema: the job's shared schema.
            max_count: the largest training-record count among the sites.
            template: the round template's name (left out of the mapping when ``None``).
            dataplane_key: the job's data-plane key, hex (left out when ``None``).

        Returns:
            The spec, checked as :meth:`parse` checks a bound one.

        Raises:
            ConfigError: a part is malformed.
        """
        d: dict[str, Any] = {"job": job.to_dict(), "job_id": job_id, "site": site, "roster": dict(roster),
                             "schema": schema.to_dict(), "max_count": max_count}
        if template is not None:
            d["template"] = template
        if dataplane_key is not None:
            d["dataplane_key"] = dataplane_key
        return cls.parse(d)

    @classmethod
    def coerce(cls, spec: "SiteSpec | Mapping[str, Any]") -> "SiteSpec":
        """``spec`` itself, or :meth:`parse` of a mapping (for callers that still hold the
        bound mapping; parse at the edge instead where you can).

        Args:
            spec: a :class:`SiteSpec` or the bound mapping.

        Returns:
            The :class:`SiteSpec`.

        Raises:
            ConfigError: the mapping is malformed.
        """
        return spec if isinstance(spec, SiteSpec) else cls.parse(spec)

    # -- use -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The site spec as plain data: a copy of exactly the mapping it was parsed from
        (the spec hash is computed over it), or for a spec made from its parts the mapping
        :meth:`build` writes.

        Returns:
            A fresh dict (changing it does not change this spec).
        """
        if self._bound is not None:
            return copy.deepcopy(dict(self._bound))
        d: dict[str, Any] = {"job": self.job.to_dict(), "job_id": self.job_id, "site": self.site,
                             "roster": dict(self.roster), "schema": self.schema.to_dict(),
                             "max_count": self.max_count}
        if self.template is not None:
            d["template"] = self.template
        if self.dataplane_key is not None:
            d["dataplane_key"] = self.dataplane_key
        return d

    def with_schema(self, schema: Schema) -> "SiteSpec":
        """This spec with ``schema`` in place of the one it carries (a datasite's own
        schema is authoritative, never the researcher's copy).

        Args:
            schema: the datasite's schema.

        Returns:
            The changed spec; its :meth:`to_dict` carries ``schema.to_dict()``.
        """
        d = self.to_dict()
        d["schema"] = schema.to_dict()
        return dataclasses.replace(self, schema=schema, _bound=d)

    @property
    def schedule(self) -> PassSchedule:
        """The job's :class:`~fedmtl.contract.schedule.PassSchedule`."""
        return self.job.schedule
