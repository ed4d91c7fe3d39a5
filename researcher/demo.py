"""``fedmtl demo``: three hospitals, one federated multi-task DP job, and the comparison.

1. Prepares the real NAFLD cohort split into hospitals (:mod:`fedmtl.datasites.cohort`).
2. Launches one real syft datasite per hospital on loopback ports, each with its own home
   and a policy that auto-approves the library's template within an epsilon budget.
3. A researcher connects, dry-runs and submits a multi-task job over all cohort tasks
   (DP on, secure aggregation on); the sites approve it automatically; it runs to the end.
4. Comparisons on the same cohort: centralised pooled training (non-private and DP) and
   local-only training (:mod:`fedmtl.researcher.baselines`), and, simulated in process with
   the same round code (:mod:`fedmtl.researcher.simulate`): the multi-task job without DP,
   at several epsilons, and single-task federated jobs.
5. Writes ``OUT/report/``: ``report.html`` (tables, learning curves, AUROC against
   epsilon), ``report.json``, and each site's compliance audit (``audit/<site>/``).
6. Stops the datasites, also on Ctrl-C.
"""

from __future__ import annotations

import base64
import html
import io
import json
import secrets
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable

MARKER = ".fedmtl-demo"
RESEARCHER = "researcher@demo.example"


def _say(msg: str) -> None:
    from fedmtl.datasites.syftio import console

    print(msg, file=console(), flush=True)


def run_demo(
    *,
    out: str | Path = "demo-out",
    sites: int = 3,
    rounds: int = 5,
    epsilon: float = 3.0,
    sweep: tuple[float, ...] = (1.0, 3.0, 8.0),
    quick: bool = False,
    seed: int = 0,
    log: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Run the demo; returns the report dict (also written to ``OUT/report``)."""
    from fedmtl.datasites import admin, site_ledger
    from fedmtl.datasites.cohort import prepare
    from fedmtl.datasites.launch import free_port, launch
    from fedmtl.datasites.peers import pin_federation
    from fedmtl.datasites.records import load_records
    from fedmtl.researcher.session import Session
    from fedmtl.schema import Schema

    t_start = time.perf_counter()
    out = Path(out).resolve()
    _fresh_out(out)
    if quick:
        rounds, sweep = min(rounds, 2), tuple(sorted({1.0, epsilon}))
    command = "fedmtl demo " + " ".join(
        shlex.quote(a) for a in (["--out", str(out), "--sites", str(sites), "--rounds", str(rounds),
                                  "--epsilon", str(epsilon)] + (["--quick"] if quick else []))
    )
    log(f"[1/5] preparing the NAFLD cohort for {sites} hospitals ...")
    files = prepare(out / "cohort", sites=sites, seed=seed)
    schema = Schema.load(files[0].schema)
    tasks = [c.name for c in schema.labels]
    data = {f.name: load_records(f.records, schema) for f in files}

    policy = site_ledger.default_policy(
        schema,
        min_sites=min(3, sites),
        max_epsilon_per_job=max(10.0, epsilon),
        dataset_epsilon_budget=max(30.0, 3 * epsilon),
        researcher_epsilon_budget=max(20.0, 2 * epsilon),
        max_rounds=max(50, rounds),
    )
    handles = []
    report: dict[str, Any] = {"command": command, "seed": seed, "sites": {}, "tasks": tasks}
    try:
        log(f"[2/5] launching {sites} datasites (real syft servers on loopback) ...")
        password = secrets.token_urlsafe(16)
        for f in files:
            h = launch(home=out / "sites" / f.name, name=f.name, records=f.records, schema=f.schema,
                       port=free_port(), policy=policy)
            handles.append(h)
            admin.add_researcher(home=h.home, email=RESEARCHER, password=password)
            log(f"      {f.name}: {h.url}  ({f.n_patients} patients)")
            report["sites"][f.name] = {"url": h.url, "patients": f.n_patients,
                                       "missing_tasks": list(f.missing_tasks)}
        # the owners pin each other (name + identity fingerprint): a job's roster may
        # only name pinned datasites
        pin_federation([h.home for h in handles], who="owner (demo)")

        log("[3/5] researcher: connect, dry-run, submit, run the multi-task DP job ...")
        session = Session.connect([{"url": h.url, "email": RESEARCHER, "password": password} for h in handles])
        spec = _spec("mtl-dp", tasks, rounds=rounds, epsilon=epsilon, seed=seed, n_sites=sites)
        job = session.job(spec, out=out / "jobs" / "mtl-dp")
        job.dry_run(passes=1)
        job.submit()
        status = job.wait_for_review(300)
        log("      review: " + ", ".join(f"{s} {v['status']}" for s, v in sorted(status.items())))
        main = job.run(progress=True)
        report["federated"] = _summary(main, data, schema)
        main.save(out / "jobs" / "mtl-dp" / "result")

        log("[4/5] comparisons (same cohort) ...")
        report["comparisons"] = _comparisons(schema, data, tasks, rounds=rounds, epsilon=epsilon,
                                             sweep=sweep, seed=seed, quick=quick, n_sites=sites,
                                             main=report["federated"], out=out, log=log)
    finally:
        # also on Ctrl-C: stop every site (one failing to stop does not keep the others
        # running), then say so on the user's terminal (``log`` writes to syftio.console(),
        # never to the sink of a syft call that the interrupt cut short)
        failed = []
        for h in handles:
            try:
                h.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                failed.append(f"{h.name} ({type(e).__name__}: {e}; `fedmtl datasite stop --home {h.home}`)")
        if failed:
            log("      could not stop: " + "; ".join(failed))
        elif handles:
            log("      datasites stopped")

    log("[5/5] writing the report and each site's compliance audit ...")
    report["audit"] = _audits(out, [f.name for f in files])
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(report, out / "report")
    log(f"done in {report['seconds']:.0f}s: {out / 'report' / 'report.html'}")
    return report


def _fresh_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            from fedmtl.errors import FedMTLError

            raise FedMTLError(f"{out} exists and was not written by `fedmtl demo`; choose another --out")
        for sub in ("cohort", "sites", "jobs", "report"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by fedmtl demo\n")


def _spec(name: str, tasks: list[str], *, rounds: int, epsilon: float | None, seed: int, n_sites: int):
    from fedmtl.jobspec import JobSpec

    privacy = {"target_epsilon": float(epsilon)} if epsilon else {"dp": False}
    return JobSpec(
        name=name,
        tasks=[{"label": t} for t in tasks],
        rounds=rounds,
        local_epochs=1.0,
        sample_rate=0.05,
        lr=0.5,
        max_grad_norm=1.0,
        secagg={"threshold": n_sites // 2 + 1, "clip": 1.0},
        seed=seed,
        **privacy,
    )


def _summary(result, data=None, schema=None) -> dict[str, Any]:
    """The final model's pooled test AUROC per task and epsilon per site.

    ``final_auroc`` is measured here, on every hospital's test split pooled, with the same
    evaluator as the centralised and local baselines (the demo holds the whole cohort, a
    real researcher does not); ``released_auroc`` is what the sites released through
    secure aggregation: noised and charged to their budgets, so only approximate."""
    released: dict[str, list[float | None]] = {}
    for row in result.metrics:
        for task, m in row["pooled"].items():
            released.setdefault(task, []).append(m.get("auroc"))
    final = {t: v[-1] for t, v in released.items()}
    out = {"auroc_by_round": released, "released_auroc": final, "final_auroc": final,
           "epsilon": dict(result.epsilon), "rounds": result.rounds_done}
    if data is not None and schema is not None:
        out["final_auroc"] = _pooled_test_auroc(result, data, schema)
    return out


def _pooled_test_auroc(result, data, schema) -> dict[str, float]:
    """AUROC per task of ``result``'s global model on the pooled test splits, with the
    baselines' evaluator (fedmtl.models.metrics.TaskMetrics, 1000 bins)."""
    import pandas as pd
    import torch

    from fedmtl.models import vector_to_model
    from fedmtl.models.metrics import TaskMetrics
    from fedmtl.models.preprocessing import Preprocessor

    split = schema.split_column
    test = pd.concat([df[df[split] == "test"] for df in data.values()], ignore_index=True)
    tasks = result.spec.task_specs(schema)
    pre = Preprocessor(schema)
    model = result.spec.build_model(schema, n_features=pre.n_features)
    vector_to_model(model, result.global_vector)
    model.eval()
    with torch.no_grad():
        pred = model.predict(pre.transform(test))
    Y, M = pre.labels(test, tasks)
    tm = TaskMetrics(tasks)
    tm.update(pred, Y, M)
    return {t: float(v["auroc"]) for t, v in tm.compute().items() if "auroc" in v}


def _comparisons(schema, data, tasks, *, rounds, epsilon, sweep, seed, quick, n_sites, main, out, log):
    from fedmtl.researcher.baselines import BaselineConfig, SiteData, run_baselines
    from fedmtl.researcher.simulate import simulate

    split = schema.split_column
    comp: dict[str, Any] = {}
    cfg = BaselineConfig(methods=("pooled_mtl", "pooled_mtl_dp", "local_mtl"), dp_target_epsilon=epsilon,
                         epochs=2.0 if quick else 8.0, dp_epochs=2.0 if quick else 8.0)
    sites = [SiteData(n, df[df[split] == "train"].reset_index(drop=True),
                      df[df[split] == "test"].reset_index(drop=True)) for n, df in data.items()]
    log("      centralised pooled (non-private, DP) and local-only ...")
    base = run_baselines(schema, sites, cfg=cfg, seed=seed)
    for method, r in base["results"].items():
        if "error" in r:
            comp[method] = {"error": r["error"]}
            continue
        comp[method] = {"final_auroc": {t: r["pooled"].get(t, {}).get("auroc") for t in tasks},
                        "epsilon": r.get("training", {}).get("epsilon") if method.endswith("_dp") else None}
    log("      federated multi-task without DP (simulated in process) ...")
    comp["federated_mtl_nodp"] = _summary(simulate(_spec("mtl-nodp", tasks, rounds=rounds, epsilon=None,
                                                         seed=seed, n_sites=n_sites), data, schema), data, schema)
    comp["epsilon_sweep"] = {}
    for eps in sweep:
        if abs(eps - epsilon) < 1e-9:
            comp["epsilon_sweep"][str(eps)] = {"final_auroc": main["final_auroc"], "source": "datasites"}
            continue
        log(f"      federated multi-task at epsilon={eps:g} (simulated in process) ...")
        s = _summary(simulate(_spec(f"mtl-eps{eps:g}", tasks, rounds=rounds, epsilon=eps, seed=seed,
                                    n_sites=n_sites), data, schema), data, schema)
        comp["epsilon_sweep"][str(eps)] = {"final_auroc": s["final_auroc"], "source": "simulated"}
    single: dict[str, float | None] = {}
    for t in tasks:
        log(f"      single-task federated: {t} (simulated in process) ...")
        s = _summary(simulate(_spec(f"single-{t}", [t], rounds=rounds, epsilon=epsilon, seed=seed,
                                    n_sites=n_sites), data, schema), data, schema)
        single[t] = s["final_auroc"].get(t)
    comp["federated_single_task"] = {"final_auroc": single}
    return comp


def _audits(out: Path, names: list[str]) -> dict[str, Any]:
    from fedmtl.datasites import identity
    from fedmtl.datasites.audit import audit

    res = {}
    for n in names:
        home = out / "sites" / n
        rep = audit(home, identity.load_public(home).verify_key, out_dir=out / "report" / "audit" / n)
        d = rep.to_dict() if hasattr(rep, "to_dict") else {}
        res[n] = {"verified": bool(getattr(rep, "ok", d.get("ok", False))),
                  "report": f"audit/{n}/report.html"}
    return res


# ---------------------------------------------------------------------------- report


METHOD_LABELS = {
    "federated": "federated multi-task, DP (datasites)",
    "federated_mtl_nodp": "federated multi-task, no DP (simulated)",
    "federated_single_task": "federated single-task, DP (simulated)",
    "pooled_mtl": "centralised pooled, no DP",
    "pooled_mtl_dp": "centralised pooled, DP",
    "local_mtl": "local-only (each hospital alone)",
}


def results_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, float | None]]]:
    rows = [("federated", report["federated"]["final_auroc"])]
    comp = report.get("comparisons", {})
    for key in ("federated_mtl_nodp", "federated_single_task", "pooled_mtl", "pooled_mtl_dp", "local_mtl"):
        if key in comp and "final_auroc" in comp[key]:
            rows.append((key, comp[key]["final_auroc"]))
    return rows


def markdown_table(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for key, vals in results_rows(report):
        cells = [_fmt(vals.get(t)) for t in tasks]
        lines.append(f"| {METHOD_LABELS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    import numpy as np

    tasks = report["tasks"]
    fed = report["federated"]
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    measured = [fed["final_auroc"].get(t) or 0.0 for t in tasks]
    released = [fed.get("released_auroc", {}).get(t) or 0.0 for t in tasks]
    ax.bar(x - 0.2, measured, width=0.4, label="measured on the pooled test splits")
    ax.bar(x + 0.2, released, width=0.4, label="released by the sites (noised, charged)")
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=20, fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("AUROC of the final model")
    ax.set_title("Federated multi-task DP job: measured vs released evaluation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    out["federated_evaluation"] = _png(fig)
    plt.close(fig)

    sweep = report.get("comparisons", {}).get("epsilon_sweep", {})
    if sweep:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        eps = sorted(sweep, key=float)
        for task in report["tasks"]:
            ax.plot([float(e) for e in eps], [sweep[e]["final_auroc"].get(task) for e in eps], marker="o", label=task)
        nodp = report["comparisons"].get("federated_mtl_nodp", {}).get("final_auroc", {})
        if nodp:
            mean = sum(v for v in nodp.values() if v is not None) / max(1, len(nodp))
            ax.axhline(mean, color="grey", linestyle="--", label="no DP (mean over tasks)")
        ax.set_xscale("log")
        ax.set_xticks([float(e) for e in eps])
        ax.set_xticklabels([f"{float(e):g}" for e in eps])
        ax.minorticks_off()
        ax.set_xlabel("epsilon per site (delta = 1e-5)")
        ax.set_ylabel("pooled test AUROC")
        ax.set_title("AUROC against epsilon")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["auroc_vs_epsilon"] = _png(fig)
        plt.close(fig)
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_report(report: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plots = _plots(report)
    tasks = report["tasks"]
    e = html.escape
    rows = "".join(
        "<tr><td>" + e(METHOD_LABELS[k]) + "</td>" + "".join(f"<td>{_fmt(v.get(t))}</td>" for t in tasks) + "</tr>"
        for k, v in results_rows(report)
    )
    sweep = report.get("comparisons", {}).get("epsilon_sweep", {})
    sweep_rows = "".join(
        f"<tr><td>{e(k)}</td><td>{e(v['source'])}</td>"
        + "".join(f"<td>{_fmt(v['final_auroc'].get(t))}</td>" for t in tasks)
        + "</tr>"
        for k, v in sorted(sweep.items(), key=lambda kv: float(kv[0]))
    )
    eps_rows = "".join(f"<tr><td>{e(s)}</td><td>{v:.3f}</td></tr>"
                       for s, v in sorted(report["federated"]["epsilon"].items()))
    audit_rows = "".join(
        f"<tr><td>{e(s)}</td><td>{'verified' if a['verified'] else 'FAILED'}</td>"
        f"<td><a href='{e(a['report'])}'>{e(a['report'])}</a></td></tr>"
        for s, a in sorted(report.get("audit", {}).items())
    )
    head = "".join(f"<th>{e(t)}</th>" for t in tasks)
    imgs = "".join(f"<figure><img alt='{e(k)}' src='data:image/png;base64,{v}'></figure>" for k, v in plots.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedmtl demo report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>
<h1>fedmtl demo report</h1>
<p>Reproduce with <code>{e(report['command'])}</code> (seed {report['seed']}); took {report.get('seconds', 0):.0f}s.</p>
<h2>Final pooled test AUROC per task</h2>
<table id="results"><tr><th>method</th>{head}</tr>{rows}</table>
<h2>Plots</h2>{imgs}
<h2>AUROC against epsilon (federated multi-task)</h2>
<table id="sweep"><tr><th>epsilon</th><th>run</th>{head}</tr>{sweep_rows}</table>
<h2>Privacy spent per site (datasite job)</h2>
<table id="epsilon"><tr><th>site</th><th>epsilon</th></tr>{eps_rows}</table>
<h2>Compliance audit of each site</h2>
<table id="audit"><tr><th>site</th><th>ledger</th><th>report</th></tr>{audit_rows}</table>
</body></html>"""
    (folder / "report.html").write_text(doc, encoding="utf-8")
    (folder / "results.md").write_text(markdown_table(report) + "\n")
    return folder / "report.html"
