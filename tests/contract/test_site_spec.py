"""fedmtl.contract.site_spec: the site spec parsed once, given back byte for byte.

The spec hash a ledger records is computed over the mapping a request bound, so
``SiteSpec.parse(d).to_dict()`` must be ``d`` exactly, for every spec the library and the
tests build, and also for one the library would never write (a researcher controls every
byte of it).
"""

from __future__ import annotations

import copy
import json

import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.site_spec import SITE_SPEC_KEYS, SiteSpec
from fedmtl.datasites.review.autoreview import site_spec_hash
from fedmtl.errors import ConfigError, JobSpecError
from fedmtl.privacy.keys import SigningKey
from fedmtl.schema import Schema

SCHEMA = {
    "dataset": {"name": "toy"},
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 100},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
    ],
}
ROSTER = {f"s{i}": SigningKey.generate().verify_key.to_bytes().hex() for i in range(3)}
JOB = JobSpec(name="toy", tasks=[{"label": "diabetes"}], rounds=2, local_steps=2, sample_rate=0.1,
              noise_multiplier=1.0)


def _library_spec() -> dict:
    # what researcher.job.Job.create binds, key for key
    return {"job": JOB.to_dict(), "job_id": "toy-0123abcd", "site": "s0", "roster": dict(ROSTER),
            "schema": Schema.from_dict(copy.deepcopy(SCHEMA)).to_dict(), "max_count": 100, "template": "fedmtl_round",
            "dataplane_key": "ab" * 32}


def _specs() -> dict[str, dict]:
    lib = _library_spec()
    minimal = {k: v for k, v in lib.items() if k not in ("template", "dataplane_key")}
    dry_run = {**minimal, "roster": {}}  # tests/datasites/test_runtime_outcomes.py's
    odd = copy.deepcopy(lib)
    # a hand-written job the library would not write: int-valued floats, keys out of order
    odd["job"] = {"tasks": [{"label": "diabetes"}], "name": "toy", "rounds": 2.0, "local_steps": 2,
                  "noise_multiplier": 1, "sample_rate": 0.1}
    odd["schema"] = copy.deepcopy(SCHEMA)  # not Schema.to_dict()'s canonical form
    return {"library": lib, "minimal": minimal, "dry_run": dry_run, "hand_written": odd}


@pytest.mark.parametrize("name", list(_specs()))
def test_to_dict_gives_back_the_bound_mapping_and_its_hash(name):
    # Prepare
    d = _specs()[name]
    # Execute
    spec = SiteSpec.parse(d)
    # Assert: the same dict, the same canonical bytes, the same ledger hash
    assert spec.to_dict() == d
    assert json.dumps(spec.to_dict(), sort_keys=True) == json.dumps(d, sort_keys=True)
    assert list(spec.to_dict()) == list(d)
    assert site_spec_hash(spec.to_dict()) == site_spec_hash(d)


def test_parse_reads_every_field():
    spec = SiteSpec.parse(_library_spec())
    assert spec.job == JOB and spec.job_id == "toy-0123abcd" and spec.site == "s0"
    assert dict(spec.roster) == ROSTER and list(spec.roster) == list(ROSTER)
    assert spec.schema == Schema.from_dict(copy.deepcopy(SCHEMA))
    assert (spec.max_count, spec.template, spec.dataplane_key) == (100, "fedmtl_round", "ab" * 32)
    assert spec.schedule == JOB.schedule


def test_build_writes_the_mapping_the_library_binds():
    built = SiteSpec.build(job=JOB, job_id="toy-0123abcd", site="s0", roster=ROSTER,
                           schema=Schema.from_dict(copy.deepcopy(SCHEMA)), max_count=100,
                           template="fedmtl_round", dataplane_key="ab" * 32)
    assert built.to_dict() == _library_spec() and list(built.to_dict()) == list(SITE_SPEC_KEYS)
    assert built == SiteSpec.parse(_library_spec())


def test_the_spec_does_not_change_when_the_caller_changes_its_dict():
    # Prepare
    d = _library_spec()
    spec = SiteSpec.parse(d)
    # Execute: the caller edits its mapping, then the one it got back
    d["job"]["rounds"] = 50
    d["roster"]["evil"] = "00" * 32
    out = spec.to_dict()
    out["max_count"] = 1
    # Assert
    assert spec.to_dict() == _library_spec()
    with pytest.raises(TypeError):
        spec.roster["evil"] = "00" * 32  # read-only


def test_with_schema_replaces_the_carried_schema_everywhere():
    own = Schema.from_dict(copy.deepcopy(SCHEMA)).to_dict()
    own["columns"][1]["max"] = 120
    spec = SiteSpec.parse(_library_spec()).with_schema(Schema.from_dict(own))
    assert spec.schema.to_dict()["columns"][1]["max"] == 120
    assert spec.to_dict()["schema"] == Schema.from_dict(own).to_dict()
    assert {k: v for k, v in spec.to_dict().items() if k != "schema"} == \
        {k: v for k, v in _library_spec().items() if k != "schema"}


def test_coerce_keeps_a_parsed_spec_and_parses_a_mapping():
    spec = SiteSpec.parse(_library_spec())
    assert SiteSpec.coerce(spec) is spec
    assert SiteSpec.coerce(_library_spec()) == spec


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda d: d.pop("roster"), r"lacks \['roster'\]"),
    (lambda d: d.update(job_id="../etc"), "invalid job id"),
    (lambda d: d.update(job_id=".hidden"), "invalid job id"),
    (lambda d: d.update(job_id=7), "invalid job id"),
    (lambda d: d.update(site=""), "site must be a site name"),
    (lambda d: d.update(roster=["s0"]), "roster must be a table"),
    (lambda d: d.update(max_count="100"), "max_count must be an integer"),
    (lambda d: d.update(max_count=True), "max_count must be an integer"),
    (lambda d: d.update(template=5), "template must be a string"),
    (lambda d: d.update(schema=[]), "schema must be a table"),
    (lambda d: d.update(schema={"columns": []}), "the job's schema"),
])
def test_a_malformed_spec_is_refused_naming_the_key(edit, match):
    # Prepare
    d = _library_spec()
    edit(d)
    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        SiteSpec.parse(d)


def test_a_malformed_job_is_a_job_spec_error():
    d = _library_spec()
    d["job"]["rounds"] = 0
    with pytest.raises(JobSpecError, match="rounds must be >= 1"):
        SiteSpec.parse(d)
    with pytest.raises(ConfigError, match="must be a table"):
        SiteSpec.parse(["not", "a", "table"])  # type: ignore[arg-type]


def test_protocol_reads_the_parsed_spec_and_the_mapping_alike():
    d = _library_spec()
    spec = SiteSpec.parse(d)
    assert protocol.job_of(spec) == protocol.job_of(d) == JOB
    assert protocol.schema_of(spec) == protocol.schema_of(d)
    assert protocol.threshold_of(spec) == protocol.threshold_of(d) == 2
    assert protocol.plan(spec, 2) == protocol.plan(d, 2)
