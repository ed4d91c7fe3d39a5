"""Personalisation at the hospital: the federated model fine-tuned on one hospital's own
records (no DP, the model stays there), compared with training alone, as a library call
and as `fedmtl datasite personalise` on an export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmtl.cli import main
from fedmtl.contract.jobspec import JobSpec
from fedmtl.models import model_to_vector
from fedmtl.models.preprocessing import Preprocessor
from fedmtl.researcher.baselines import SiteData
from fedmtl.researcher.personalise import compare_at_site, finetune_sites, local_only_spec
from fedmtl.researcher.result import JobResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _result(schema) -> JobResult:
    """A 'federated' result whose model never trained: what fine-tuning starts from."""
    spec = JobSpec(name="toy", tasks=[{"label": "diabetes"}, {"label": "stage"}], model={"widths": [8]},
                   noise_multiplier=1.0, scaling="range", rounds=2)
    pre = Preprocessor(schema)
    net = spec.build_model(schema, n_features=pre.n_features)
    return JobResult(spec=spec, model_config=net.config, preprocessor=pre.to_dict(), global_vector=model_to_vector(net))


def test_finetuning_learns_the_site_and_leaves_the_federated_model_alone(schema, make_site_records):
    # Prepare
    result = _result(schema)
    before = result.global_vector.copy()
    df = make_site_records(600, seed=3)
    site = SiteData("h1", df[df["split"] == "train"], df[df["split"] == "test"])
    # Execute
    cmp, tuned_here = compare_at_site(result, site, seed=0)
    # Assert: three models on the site's own test split; the fine-tuned one learnt the signal
    rows = cmp["rows"]
    assert set(rows) == {"federated", "federated, fine-tuned here", "local-only, no DP"}
    assert rows["federated, fine-tuned here"]["auroc"]["diabetes"] > 0.7
    assert rows["federated, fine-tuned here"]["auroc"]["diabetes"] > rows["federated"]["auroc"]["diabetes"] + 0.05
    assert cmp["gain_finetuned_vs_local"] == pytest.approx(
        rows["federated, fine-tuned here"]["mean"] - rows["local-only, no DP"]["mean"])
    assert cmp["n_train"] == len(site.train) and cmp["n_test"] == len(site.test)
    np.testing.assert_array_equal(result.global_vector, before)  # fine-tuning works on a copy
    assert not np.array_equal(model_to_vector(tuned_here), before)
    # the local-only comparison trains without DP, with the non-private recipe
    loc = local_only_spec(result.spec)
    assert loc.dp is False and (loc.lr, loc.momentum) == (0.2, 0.9) and loc.model == result.spec.model
    # every hospital fine-tunes its own copy
    tuned = finetune_sites(result, [site, SiteData("h2", site.train.iloc[:50], site.test)], seed=0)
    assert set(tuned) == {"h1", "h2"} and tuned["h1"] is not tuned["h2"]


def test_empty_test_split_is_refused(schema, make_site_records):
    df = make_site_records(100, seed=4)
    with pytest.raises(ValueError, match="test split is empty"):
        compare_at_site(_result(schema), SiteData("h1", df, df.iloc[:0]))


def test_cli_personalise_on_an_export(tmp_path, schema, make_site_records, capsys):
    # Prepare: the researcher's shared result folder and the hospital's own export
    _result(schema).save(tmp_path / "result")
    df = make_site_records(500, seed=5)
    df.to_csv(tmp_path / "export.csv", index=False)
    schema.save(tmp_path / "schema.toml")
    out = tmp_path / "mine"
    # Execute
    rc = main(["datasite", "personalise", "--result", str(tmp_path / "result"), "--records",
               str(tmp_path / "export.csv"), "--schema", str(tmp_path / "schema.toml"), "--site", "h1",
               "--out", str(out), "--epochs", "3"])
    text = capsys.readouterr().out
    # Assert: the table, the comparison and a usable fine-tuned model, kept at the hospital
    assert rc == 0
    assert "| federated, fine-tuned here |" in text and "| local-only, no DP |" in text
    cmp = json.loads((out / "comparison.json").read_text())
    assert cmp["site"] == "h1" and cmp["finetune"]["epochs"] == 3.0 and "models" not in cmp
    preds = JobResult.load(out / "model").predict(df)
    assert preds["diabetes"].shape == (len(df),)


def test_cli_personalise_says_what_to_fix(tmp_path, schema, make_site_records, capsys):
    # Prepare: a schema whose features differ from the model's, and a folder with no result
    _result(schema).save(tmp_path / "result")
    make_site_records(100, seed=6).to_csv(tmp_path / "export.csv", index=False)
    other = json.loads(json.dumps(schema.to_dict()))
    other["columns"] = [c for c in other["columns"] if c["name"] != "bmi"]
    from fedmtl.schema import Schema

    Schema.from_dict(other).save(tmp_path / "other.toml")
    base = ["datasite", "personalise", "--records", str(tmp_path / "export.csv")]
    # Execute
    rc_schema = main([*base, "--result", str(tmp_path / "result"), "--schema", str(tmp_path / "other.toml")])
    err_schema = capsys.readouterr().err
    rc_none = main([*base, "--result", str(tmp_path / "nothing"), "--schema", str(tmp_path / "other.toml")])
    err_none = capsys.readouterr().err
    # Assert
    assert rc_schema == 2 and "bmi" in err_schema and "launched with" in err_schema
    assert rc_none == 2 and "holds no saved job result" in err_none
