"""Personalisation at the hospital: fine-tune the federated model on the hospital's own
records, and answer the question each hospital asks -- does joining pay off?

The federated model (a :class:`~fedmtl.researcher.result.JobResult`) left every site
under DP. A hospital may then train it further on its **own** training split, without DP:
those are its own records, and the fine-tuned model **stays at the hospital** (it is not
DP with respect to them, so it must not be shared as the federated model is).
:func:`compare_at_site` measures, on the hospital's own test split, the federated model,
the fine-tuned one and a model trained on the hospital's records alone (without DP, the
non-private recipe, :data:`fedmtl.contract.jobspec.RECIPES`), through the job's own features.

``fedmtl datasite personalise`` runs it on a hospital's export; ``fedmtl demo`` reports
the fine-tuned row per hospital next to local-only training.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

from fedmtl.contract.jobspec import RECIPES
from fedmtl.models.preprocessing import Preprocessor, labels_of
from fedmtl.privacy.dp import train_local
from fedmtl.researcher.baselines import Evaluator, train_like_job, without_dp

#: Fine-tuning: passes over the hospital's training split, learning rate, momentum (plain
#: SGD, no DP, the job's sampling rate as the batch fraction). Chosen on the demo cohort:
#: docs/models.md, "Personalisation at the hospital".
FINETUNE: dict[str, float] = {"epochs": 5.0, "lr": 0.05, "momentum": 0.9}


def finetune(model, pre, train, tasks, *, epochs: float = FINETUNE["epochs"], lr: float = FINETUNE["lr"],
             momentum: float = FINETUNE["momentum"], sample_rate: float = 0.05, seed: int | None = None):
    """A copy of ``model`` trained further on ``train`` (a records DataFrame with labels)
    through ``pre`` (the job's :class:`~fedmtl.models.preprocessing.Preprocessor`), without
    DP. ``model`` itself is left as it was."""
    if len(train) == 0:
        raise ValueError("the training split is empty: nothing to fine-tune on")
    tuned = copy.deepcopy(model)
    Y, M = labels_of(train, tasks)
    train_local(model=tuned, X=pre.transform(train), Y=Y, mask=M, tasks=tasks, epochs=float(epochs),
                sample_rate=sample_rate, lr=float(lr), momentum=float(momentum), dp=False, seed=seed)
    tuned.eval()
    return tuned


def local_only_spec(spec):
    """``spec`` as one hospital training alone without DP: the non-private recipe
    (:data:`fedmtl.contract.jobspec.RECIPES` ``["no_dp"]``), the job's model, rounds and sampling."""
    return dataclasses.replace(without_dp(spec), local_steps=None, **RECIPES["no_dp"])


def compare_at_site(result, site, *, seed: int = 0, local: bool = True,
                    finetune_kw: Mapping[str, float] | None = None) -> tuple[dict[str, Any], Any]:
    """Measure, on ``site``'s test split (a :class:`~fedmtl.researcher.baselines.SiteData`
    of one hospital's records), the federated model of ``result``, that model fine-tuned on
    ``site``'s training split, and (``local``) a model trained on that split alone.

    Returns the comparison, JSON-able: ``{"site", "n_train", "n_test", "finetune", "rows":
    {row: {"auroc": {task: value}, "mean": value}}, "gain_finetuned_vs_local",
    "gain_federated_vs_local"}``, and the fine-tuned model."""
    if len(site.test) == 0:
        raise ValueError(f"{site.name}: the test split is empty; the comparison needs held-out records")
    schema = result.schema
    tasks = result.spec.task_specs(schema)
    pre = Preprocessor.from_dict(result.preprocessor)
    ev = Evaluator([site], tasks)
    kw = {**FINETUNE, **(finetune_kw or {})}
    federated = result.model()
    tuned = finetune(federated, pre, site.train, tasks, sample_rate=result.spec.sample_rate, seed=seed, **kw)
    models = {"federated": federated, "federated, fine-tuned here": tuned}
    if local:
        Y, M = labels_of(site.train, tasks)
        models["local-only, no DP"], _ = train_like_job(local_only_spec(result.spec), schema, pre.transform(site.train),
                                                        Y, M, seed=seed)
    rows = {}
    for name, m in models.items():
        auroc = {t: v.get("auroc") for t, v in ev.model(m, pre)["per_site"][site.name].items()}
        vals = [v for v in auroc.values() if v is not None]
        rows[name] = {"auroc": auroc, "mean": sum(vals) / len(vals) if vals else None}

    def gain(a: str, b: str) -> float | None:
        x, y = rows.get(a, {}).get("mean"), rows.get(b, {}).get("mean")
        return None if x is None or y is None else x - y

    return {"site": site.name, "n_train": len(site.train), "n_test": len(site.test), "finetune": kw,
            "rows": rows,
            "gain_finetuned_vs_local": gain("federated, fine-tuned here", "local-only, no DP"),
            "gain_federated_vs_local": gain("federated", "local-only, no DP")}, tuned


def finetune_sites(result, sites: Sequence, *, seed: int = 0, **finetune_kw: float) -> dict[str, Any]:
    """Each of ``sites`` fine-tunes ``result``'s federated model on its own training split
    (what each hospital would do at home; ``finetune_kw``: ``epochs``, ``lr``, ``momentum``
    over :data:`FINETUNE`); returns ``{site name: model}``."""
    tasks = result.spec.task_specs(result.schema)
    pre = Preprocessor.from_dict(result.preprocessor)
    kw = {**FINETUNE, **finetune_kw}
    return {s.name: finetune(result.model(), pre, s.train, tasks, sample_rate=result.spec.sample_rate, seed=seed, **kw)
            for s in sites}


def comparison_table(cmp: Mapping[str, Any]) -> str:
    """``compare_at_site``'s result as a markdown table (AUROC on the site's test split)."""
    rows = cmp["rows"]
    tasks = list(next(iter(rows.values()))["auroc"])
    lines = ["| model | mean over tasks | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for name, r in rows.items():
        cells = [_f(r["auroc"].get(t)) for t in tasks]
        lines.append(f"| {name} | {_f(r['mean'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


__all__ = ["FINETUNE", "compare_at_site", "comparison_table", "finetune", "finetune_sites", "local_only_spec"]
