"""A new data owner: an unseen export (not the demo cohort) to a running datasite with a
test split, using only the command line: `schema infer`, `launch --test-fraction`,
`status`, `stop`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fedmtl.contract.jobspec import JobSpec
from fedmtl.datasites.server import admin
from fedmtl.datasites.server.launch import free_port, parse_meta
from fedmtl.datasites.site import syftio
from fedmtl.models import model_to_vector
from fedmtl.models.preprocessing import Preprocessor
from fedmtl.researcher.result import JobResult
from fedmtl.schema import Schema


def _fedmtl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "fedmtl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _write_export(path, n: int = 400, seed: int = 11) -> pd.DataFrame:
    """~400 patients: id, age, integer-coded tumour size, a skewed lab value, two binary
    outcomes with missing values, no split column."""
    rng = np.random.default_rng(seed)
    size = rng.choice([1, 2, 3], n, p=[0.5, 0.3, 0.2]).astype(float)
    size[rng.random(n) < 0.05] = np.nan  # the export writes the codes as 1.0, 2.0, 3.0
    risk = 0.15 + 0.15 * np.nan_to_num(size, nan=1.0)
    df = pd.DataFrame(
        {
            "patient_id": rng.permutation(np.arange(100000, 100000 + n)),
            "age": rng.normal(64, 10, n).clip(30, 95).round(1),
            "tumour_size": size,
            "ldh": np.exp(rng.normal(5.3, 0.9, n)).round(1),  # skewed lab value
            "recurrence_5y": (rng.random(n) < risk).astype(float),
            "death_event": (rng.random(n) < risk / 2).astype(float),
        }
    )
    df.loc[rng.random(n) < 0.12, "recurrence_5y"] = np.nan
    df.loc[rng.random(n) < 0.2, "death_event"] = np.nan
    df.to_csv(path, index=False)
    return df


@pytest.mark.integration
def test_unseen_export_to_running_datasite_with_test_split(tmp_path):
    # Prepare: the hospital's export
    records = tmp_path / "oncology_export.csv"
    df = _write_export(records)
    schema = tmp_path / "schema.toml"
    home = tmp_path / "north"

    # Execute 1: draft the schema from the export
    r = _fedmtl("datasite", "schema", "infer", "--records", str(records), "--out", str(schema),
                "--name", "north-oncology")
    assert r.returncode == 0, r.stderr
    draft = Schema.load(schema)
    assert draft.id_column == "patient_id"
    assert draft.column("tumour_size").type == "categorical"
    assert draft.column("tumour_size").categories == ("1", "2", "3")
    assert [c.name for c in draft.labels] == ["recurrence_5y", "death_event"]
    assert draft.split_column is None and "--test-fraction" in r.stderr

    # Execute 2: launch it with a held-out test split, detached
    port = free_port()
    try:
        r = _fedmtl("datasite", "launch", "--home", str(home), "--name", "north", "--records", str(records),
                    "--schema", str(schema), "--port", str(port), "--test-fraction", "0.2", "--detach")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no test split" not in r.stderr
        assert "made at launch: test fraction 0.2, seed 0, stratified by 'recurrence_5y'" in r.stdout

        # Assert: running, the split recorded in the metadata and the published description
        st = admin.status(home)
        assert st.running and st.datasets == ["north-oncology"]  # the schema's [dataset] name
        meta = json.loads((home / "dataset_meta.json").read_text())
        assert meta["split"] == {"column": "split", "source": "launch", "test_fraction": 0.2, "seed": 0,
                                 "stratified_by": "recurrence_5y"}
        assert meta["split_sizes"] == {"train": 320, "test": 80}
        assert meta["n_records"] == len(df)
        assert Schema.load(home / "schema.toml").split_column == "split"
        client = syftio.login(st.url, _admin_email(home), _admin_password(home))
        with syftio.quiet():
            (ds,) = client.datasets.get_all()
            description = ds.description.text
        assert parse_meta(description)["split"]["test_fraction"] == 0.2
        assert "made at launch" in description
    finally:
        stop = _fedmtl("datasite", "stop", "--home", str(home), timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert not admin.status(home).running

    # Execute 3: personalise a (never trained) 'federated' model of this datasite's schema at
    # the hospital, from its own export (no split column) and its home (the launch record)
    site_schema = Schema.load(home / "schema.toml")
    spec = JobSpec(name="onc", tasks=[{"label": "recurrence_5y"}, {"label": "death_event"}], model={"widths": [8]},
                   noise_multiplier=1.0, scaling="range", rounds=1)
    pre = Preprocessor(site_schema)
    net = spec.build_model(site_schema, n_features=pre.n_features)
    JobResult(spec=spec, model_config=net.config, preprocessor=pre.to_dict(),
              global_vector=model_to_vector(net)).save(tmp_path / "result")
    r = _fedmtl("datasite", "personalise", "--result", str(tmp_path / "result"), "--records", str(records),
                "--home", str(home), "--site", "north", "--epochs", "2", "--bootstrap", "200",
                "--out", str(tmp_path / "mine"))
    # Assert: the datasite's own split, rebuilt; every difference with its interval
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rebuilt from the datasite's launch record" in r.stdout and "paired-bootstrap" in r.stdout
    cmp = json.loads((tmp_path / "mine" / "comparison.json").read_text())
    assert cmp["split"] == meta["split"] and cmp["n_test"] == 80 and cmp["n_train"] == 320
    assert set(cmp["differences"]) == {"fine-tuned - federated", "fine-tuned - local-only", "federated - local-only"}
    for d in cmp["differences"].values():
        assert d["mean"]["low"] <= d["mean"]["diff"] <= d["mean"]["high"]


def _admin_email(home) -> str:
    from fedmtl.datasites.site import home as home_mod

    return home_mod.read_config(home)["admin_email"]


def _admin_password(home) -> str:
    from fedmtl.datasites.site import home as home_mod

    return home_mod.read_secret(home, "admin_password")
