"""The recipe adapts to small sites: a DP job whose smallest site has fewer than
SMALL_SITE_N_TRAIN training records takes SMALL_SITE_RECIPE for the fields its spec left
out, and only those; the sites review (and the hash covers) the resolved values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from fedmtl.contract.jobspec import RECIPES, SMALL_SITE_N_TRAIN, SMALL_SITE_RECIPE, JobSpec
from fedmtl.schema import Column, Schema

SITES = ["a", "b", "c"]
SMALL = {"a": 300, "b": 450, "c": 5000}
LARGE = {s: SMALL_SITE_N_TRAIN for s in SITES}


def _spec(**kw) -> JobSpec:
    return JobSpec(name="recipe", tasks=[{"label": "y"}], target_epsilon=3.0, **kw)


def test_left_out_fields_take_the_small_site_recipe() -> None:
    spec = _spec()
    assert (spec.sample_rate, spec.lr, spec.local_epochs, spec.model.widths) == (
        RECIPES["dp"]["sample_rate"], RECIPES["dp"]["lr"], RECIPES["dp"]["local_epochs"], (64, 32))
    small = spec.for_sites(SITES, SMALL)
    assert small.sample_rate == SMALL_SITE_RECIPE["sample_rate"]
    assert small.lr == SMALL_SITE_RECIPE["lr"]
    assert small.momentum == SMALL_SITE_RECIPE["momentum"]
    assert small.local_epochs == SMALL_SITE_RECIPE["local_epochs"]
    assert small.model.widths == SMALL_SITE_RECIPE["widths"]
    assert small.secagg.threshold == 2
    # what the sites review is the resolved recipe: it round-trips and hashes as written
    again = JobSpec.from_dict(small.to_dict())
    assert again.spec_hash() == small.spec_hash() != spec.for_sites(SITES).spec_hash()
    assert "left_out" not in small.to_dict()
    # resolving twice changes nothing more
    assert small.for_sites(SITES, SMALL).spec_hash() == small.spec_hash()


@pytest.mark.parametrize("n_train", [LARGE, None], ids=["every site large", "sizes unknown"])
def test_large_or_unknown_sites_keep_the_standard_recipe(n_train) -> None:
    spec = _spec()
    out = spec.for_sites(SITES, n_train)
    assert (out.sample_rate, out.lr, out.local_epochs, out.model.widths) == (
        spec.sample_rate, spec.lr, spec.local_epochs, spec.model.widths)


def test_given_values_are_kept() -> None:
    spec = _spec(lr=1.0, sample_rate=0.1, local_steps=7, model={"widths": [8, 8]})
    out = spec.for_sites(SITES, SMALL)
    assert (out.lr, out.sample_rate, out.local_steps, out.local_epochs, out.model.widths) == (1.0, 0.1, 7, None, (8, 8))
    assert out.momentum == SMALL_SITE_RECIPE["momentum"]  # the one field left out
    # a value set through dataclasses.replace counts as given, the others stay left out
    changed = dataclasses.replace(_spec(), lr=0.5)
    out = changed.for_sites(SITES, SMALL)
    assert out.lr == 0.5 and out.sample_rate == SMALL_SITE_RECIPE["sample_rate"]
    # a spec read from a file: what the file leaves out is left out
    loaded = JobSpec.loads('name = "f"\ntarget_epsilon = 3.0\nlr = 3.0\n[[tasks]]\nlabel = "y"\n')
    out = loaded.for_sites(SITES, SMALL)
    assert out.lr == 3.0 and out.local_epochs == SMALL_SITE_RECIPE["local_epochs"]


def test_without_dp_nothing_adapts() -> None:
    spec = JobSpec(name="nodp", tasks=[{"label": "y"}], dp=False)
    out = spec.for_sites(SITES, SMALL)
    assert (out.lr, out.momentum, out.sample_rate) == (RECIPES["no_dp"]["lr"], RECIPES["no_dp"]["momentum"],
                                                       RECIPES["no_dp"]["sample_rate"])


def test_a_job_over_small_sites_trains_and_charges_the_small_recipe() -> None:
    """Through Job.create and the datasite runtime (in process): the site specs carry the
    small-site recipe, and the model the job returns has its trunk."""
    from fedmtl.researcher.simulate import simulate

    cols = (Column("pid", "id", "numeric"), Column("x1", "feature", "numeric", min=-5, max=5),
            Column("x2", "feature", "numeric", min=-5, max=5), Column("y", "label", "binary"),
            Column("split", "split", "categorical", categories=("train", "test")))
    schema = Schema(columns=cols, name="small")
    rng = np.random.default_rng(0)
    data = {}
    for k, name in enumerate(SITES):
        n = 150
        x = rng.normal(size=(n, 2))
        y = (x[:, 0] + rng.normal(size=n) > 0).astype(float)
        data[name] = pd.DataFrame({"pid": np.arange(n) + 1000 * k, "x1": x[:, 0], "x2": x[:, 1], "y": y,
                                   "split": np.where(np.arange(n) < 120, "train", "test")})
    res = simulate(JobSpec(name="small", tasks=[{"label": "y"}], target_epsilon=3.0, rounds=2), data, schema)
    job = res.spec
    assert job.sample_rate == SMALL_SITE_RECIPE["sample_rate"] and job.model.widths == SMALL_SITE_RECIPE["widths"]
    assert res.model().trunk.out_features == SMALL_SITE_RECIPE["widths"][-1]
