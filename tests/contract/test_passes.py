"""fedmtl.contract.passes: one pass over a transport, with the sites' real secure-aggregation
halves (fedmtl.privacy.secagg.SiteSession) behind an in-test transport that reads each
message at its edge the way the datasite runtime does. The researcher gets the sum, and a
site that refuses a stage drops out with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from fedmtl.contract import protocol
from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.messages import Advertise, Consistency, MaskedInput, Reply, ShareKeys, parse_message
from fedmtl.contract.passes import CALLS_PER_PASS, run_pass
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.errors import JobError
from fedmtl.models import model_to_vector
from fedmtl.privacy.keys import SigningKey
from fedmtl.privacy.secagg import SiteSession
from fedmtl.schema import Schema

SCHEMA = Schema.from_dict({
    "dataset": {"name": "toy"},
    "columns": [
        {"name": "id", "role": "id", "type": "numeric"},
        {"name": "age", "role": "feature", "type": "numeric", "min": 0, "max": 100},
        {"name": "diabetes", "role": "label", "type": "binary", "missing": True},
    ],
})
SITES = ["s0", "s1", "s2"]


class InTestSites:
    """Three sites answering with SiteSession; ``refuse`` = (site, stage) to refuse."""

    def __init__(self, specs: dict[str, SiteSpec], keys: dict[str, SigningKey], payloads, refuse=None):
        self.specs, self.keys, self.payloads, self.refuse = specs, keys, payloads, refuse
        self.sessions: dict[str, SiteSession] = {}
        self.seen: list[tuple[str, dict]] = []

    def call(self, site: str, message: dict) -> dict:
        self.seen.append((site, message))
        msg = parse_message(message)
        if self.refuse == (site, msg.stage):
            return Reply.refusal(f"{site} refuses {msg.stage}", "RoundError").to_dict()
        spec = self.specs[site]
        if isinstance(msg, Advertise):
            plan = protocol.plan(spec, msg.pass_no)
            params = protocol.secagg_params(spec, msg.pass_no, msg.attempt, plan)
            self.sessions[site] = SiteSession(params, site_id=site, identity=self.keys[site])
            return Reply.stage_reply(self.sessions[site].advertise_keys(), report={"pass": msg.pass_no}).to_dict()
        s = self.sessions[site]
        if isinstance(msg, ShareKeys):
            out = s.share_keys(msg.keys)
        elif isinstance(msg, MaskedInput):
            out = s.masked_input(msg.delivery, self.payloads[site])
        elif isinstance(msg, Consistency):
            out = s.consistency_check(msg.request)
        else:
            out = s.unmask(msg.request)
        return Reply.stage_reply(out).to_dict()


@pytest.fixture()
def federation():
    keys = {s: SigningKey.generate() for s in SITES}
    roster = {s: k.verify_key.to_bytes().hex() for s, k in keys.items()}
    job = JobSpec(name="toy", tasks=[{"label": "diabetes"}], rounds=1, local_steps=1, sample_rate=0.1,
                  noise_multiplier=1.0, scaling="range", secagg={"threshold": 2})
    specs = {s: SiteSpec.build(job=job, job_id="toy-0123abcd", site=s, roster=roster, schema=SCHEMA, max_count=100)
             for s in SITES}
    model, _ = protocol.build_model(specs["s0"])
    plan = protocol.plan(specs["s0"], 1, model=model)
    payloads = {s: [np.full(shape, 0.01 * (i + 1)) for shape in plan.shapes] for i, s in enumerate(SITES)}
    return specs, keys, payloads, model, plan


def test_a_pass_returns_the_sum_of_the_sites_vectors(federation):
    # Prepare
    specs, keys, payloads, model, plan = federation
    sites = InTestSites(specs, keys, payloads)
    weights = model_to_vector(model)
    # Execute
    out = run_pass(transport=sites, site_specs=specs, sites=SITES, pass_no=1, attempt=0, weights=weights, model=model)
    # Assert: only the aggregate, in the plan's names
    assert list(out.arrays) == list(plan.names) == ["update", "counts"]
    for i, name in enumerate(plan.names):
        np.testing.assert_allclose(out.arrays[name], sum(p[i] for p in payloads.values()), atol=1e-3)
    assert sorted(out.survivors) == SITES and out.dropped == {}
    assert out.reports == {s: {"pass": 1} for s in SITES}
    # every site got the five stages, in order, as the wire dicts of the typed messages
    assert len(sites.seen) == CALLS_PER_PASS * len(SITES)
    for s in SITES:
        stages = [m for site, m in sites.seen if site == s]
        assert [m["stage"] for m in stages] == ["advertise", "share_keys", "masked_input", "consistency", "unmask"]
        assert all(m["pass"] == 1 and m["attempt"] == 0 for m in stages)
        assert "scaling" not in stages[0] and stages[0]["weights"].dtype == np.float32


def test_a_site_that_refuses_a_stage_drops_out_with_its_reason(federation):
    # Prepare
    specs, keys, payloads, model, plan = federation
    sites = InTestSites(specs, keys, payloads, refuse=("s2", "masked_input"))
    # Execute
    out = run_pass(transport=sites, site_specs=specs, sites=SITES, pass_no=1, attempt=0,
                   weights=model_to_vector(model), model=model)
    # Assert: the survivors' sum (s2's masks recovered from the shares), s2's reason kept
    assert sorted(out.survivors) == ["s0", "s1"]
    assert out.dropped == {"s2": "masked_input: s2 refuses masked_input"}
    np.testing.assert_allclose(out.arrays["update"], payloads["s0"][0] + payloads["s1"][0], atol=1e-3)


def test_too_few_survivors_abort_the_pass_revealing_nothing(federation):
    specs, keys, payloads, model, _ = federation
    sites = InTestSites(specs, keys, payloads, refuse=None)
    with pytest.raises(JobError, match="pass 1 aborted: .*Nothing was revealed"):
        run_pass(transport=sites, site_specs=specs, sites=["s0"], pass_no=1, attempt=0,
                 weights=model_to_vector(model), model=model)


def test_the_bound_mappings_run_the_same_pass(federation):
    # callers that still hold the bound mappings (not yet parsed at their edge) get the same
    specs, keys, payloads, model, _ = federation
    out = run_pass(transport=InTestSites(specs, keys, payloads), site_specs={s: v.to_dict() for s, v in specs.items()},
                   sites=SITES, pass_no=1, attempt=0, weights=model_to_vector(model), model=model)
    assert sorted(out.survivors) == SITES
