"""Compliance audit of a datasite's privacy ledger.

:func:`audit` verifies the ledger (chain, signatures, head) against the datasite's
pinned verify key, folds it into a list of requests with their decisions and epsilon,
and the epsilon spent over time per researcher and per dataset, and writes
``report.json`` and a self-contained ``report.html`` (tables and an inline PNG plot).
It only reads the ledger; it never repairs or appends.

:func:`researcher_view` is what one researcher may see: their own requests, decisions,
spend and budget left, and nothing about other researchers.

Epsilon "over time" is recomputed from the records in the ledger (composition, never a
sum) at the delta and with the accountant each round was charged under.

This module imports neither syft nor torch; matplotlib is imported when the plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedmtl.contract.schedule import PassSchedule
from fedmtl.datasites.ledger.ledger import (
    LEDGER_FILE,
    Ledger,
    VerifyReport,
    _State,
    read_entries,
    verify,
)
from fedmtl.datasites.rules.policy import Policy
from fedmtl.fsutil import atomic_write_bytes
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.keys import VerifyKey

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
#: plot colours, in series order (tests look for the first two in the screenshot)
PALETTE: tuple[str, ...] = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

Point = tuple[str, float]  # (ISO timestamp, composed epsilon after that round)


@dataclass
class AuditReport:
    """What :func:`audit` found. ``ok`` mirrors the verification."""

    verification: VerifyReport
    requests: list[dict[str, Any]]
    researcher_series: dict[str, list[Point]]
    dataset_series: dict[str, list[Point]]
    researcher_spent: dict[str, float]
    dataset_spent: dict[str, float]
    policy_changes: list[dict[str, Any]]
    policy: dict[str, Any] | None
    html_path: Path | None = None
    json_path: Path | None = None
    #: what approved, unfinished jobs' passes not yet charged will add (composed), per
    #: researcher and per dataset: reserved, not spent
    researcher_reserved: dict[str, float] = field(default_factory=dict)
    dataset_reserved: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "verification": self.verification.to_dict(),
            "requests": self.requests,
            "epsilon_over_time": {
                "researcher": {k: [list(p) for p in v] for k, v in self.researcher_series.items()},
                "dataset": {k: [list(p) for p in v] for k, v in self.dataset_series.items()},
            },
            "epsilon_spent": {"researcher": self.researcher_spent, "dataset": self.dataset_spent},
            "epsilon_reserved": {"researcher": self.researcher_reserved, "dataset": self.dataset_reserved},
            "policy_changes": self.policy_changes,
            "policy": self.policy,
        }


@dataclass
class ResearcherView:
    """One researcher's own requests, spend and budget left (per dataset)."""

    email: str
    requests: list[dict[str, Any]]
    epsilon_spent: dict[str, float]
    budget_left: dict[str, float]
    series: dict[str, list[Point]] = field(default_factory=dict)
    #: per dataset: what your approved, unfinished jobs' passes not yet charged will add to
    #: ``epsilon_spent`` (composed): reserved for them, not spent; 0 once they are closed
    epsilon_reserved: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "requests": self.requests,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_reserved": self.epsilon_reserved,
            "budget_left": self.budget_left,
            "series": {k: [list(p) for p in v] for k, v in self.series.items()},
        }


# ----------------------------------------------------------------------------- folding


_FIELDS = {"seq", "ts", "kind", "body", "prev_hash", "hash", "sig"}


def _fold(entries: Sequence[Mapping[str, Any]]) -> tuple[_State, list[dict[str, Any]]]:
    """Fold well-formed entries (a tampered ledger is still summarised as far as it reads)."""
    state = _State()
    changes: list[dict[str, Any]] = []
    previous: dict[str, Any] = {}
    for e in entries:
        if not isinstance(e, dict) or not _FIELDS <= set(e):
            continue
        try:
            state.apply(dict(e))
        except (KeyError, TypeError, ValueError):
            continue
        if e["kind"] == "policy_changed":
            b = e["body"]
            new = _flat(b.get("policy") or {})
            changed = [f"{k}: {previous.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(previous) | set(new))
                       if previous.get(k) != new.get(k)] if previous else ["initial policy"]
            previous = new
            changes.append(
                {"seq": e["seq"], "ts": e["ts"], "who": b.get("who"), "old_hash": b.get("old_hash"),
                 "new_hash": b.get("new_hash"), "changed": changed}
            )
    return state, changes


def _flat(policy: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, v in policy.items():
        if isinstance(v, Mapping):
            out.update({f"{section}.{k}": x for k, x in v.items()})
        else:
            out[section] = v
    return out


def _series(entries: Sequence[Mapping[str, Any]], *, only_researcher: str | None = None) -> tuple[
    dict[str, list[Point]], dict[str, list[Point]]
]:
    """Composed epsilon after each executed round, per researcher and per dataset."""
    rounds = [e for e in entries if isinstance(e, dict) and e.get("kind") == "round_executed" and isinstance(e.get("body"), dict)]
    datasets = {e["body"].get("dataset") for e in rounds}
    by_r: dict[str, list[PrivacyRecord]] = {}
    by_d: dict[str, list[PrivacyRecord]] = {}
    rs: dict[str, list[Point]] = {}
    ds: dict[str, list[Point]] = {}
    for e in rounds:
        b = e["body"]
        try:
            recs = [PrivacyRecord.from_dict(r) for r in b["records"]]
            delta, acc = float(b["delta"]), str(b["accountant"])
        except (KeyError, TypeError, ValueError):
            continue
        researcher, dataset = str(b.get("researcher")), str(b.get("dataset"))
        if only_researcher is not None and researcher != only_researcher:
            continue
        rkey = researcher if len(datasets) <= 1 else f"{researcher} on {dataset}"
        by_r.setdefault(rkey, []).extend(recs)
        rs.setdefault(rkey, []).append((e["ts"], epsilon_of(by_r[rkey], delta=delta, accountant=acc)))
        if only_researcher is None:
            by_d.setdefault(dataset, []).extend(recs)
            ds.setdefault(dataset, []).append((e["ts"], epsilon_of(by_d[dataset], delta=delta, accountant=acc)))
    return rs, ds


def _request_rows(state: _State, *, researcher: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for st in state.requests.values():
        if researcher is not None and st.facts.researcher != researcher:
            continue
        d = st.to_dict()
        dec = st.decision
        d["decided_by"] = dec.reviewer if dec else None
        d["mode"] = ("automatic" if dec.automatic else "manual") if dec else None
        d["epsilon_approved"] = dec.to_dict()["epsilon_job"] if dec else None
        d["reasons"] = list(dec.reasons) if dec else []
        d["warning_shown"] = bool(dec.warning_shown) if dec else False
        d.update(pass_progress(st.facts.rounds, st.facts.passes, st.rounds))
        rows.append(d)
    return rows


def pass_progress(rounds: int, passes: int, executed: Sequence[int]) -> dict[str, Any]:
    """How far a job got, in rounds and in passes, as the audit shows it.

    A *round* trains the model; a *pass* is one trip through secure aggregation, and the
    ledger charges passes: with standard scaling pass 1 releases the features' statistics,
    the rounds follow, and the last pass evaluates the final model. So a finished 5-round
    job ran 7 passes (6 with range scaling): never more rounds than approved.

    Args:
        rounds: the training rounds approved (the request's ``rounds``).
        passes: the passes approved (the request's ``passes``; 0 in older ledgers: ``rounds``).
        executed: the pass numbers charged (the ``round`` keys of its ``round_executed`` entries).

    Returns:
        ``rounds_run``, ``passes_approved``, ``passes_run``, ``passes_by_kind`` (statistics,
        training, evaluation) and ``progress``, a sentence such as "5 of 5 rounds run;
        7 of 7 passes (1 statistics, 5 training, 1 final evaluation)".
    """
    try:
        rounds, passes = int(rounds), int(passes) or int(rounds)
    except (TypeError, ValueError):  # a tampered entry: summarised as far as it reads
        return {"rounds_run": None, "passes_approved": None, "passes_run": len(executed),
                "passes_by_kind": None, "progress": f"{len(executed)} passes run (the request's rounds are unreadable)"}
    schedule = PassSchedule(rounds=max(0, rounds), stats_pass=passes == rounds + 2)
    kinds = {"statistics": 0, "training": 0, "evaluation": 0}
    for p in executed:
        if schedule.is_stats_pass(int(p)):
            kinds["statistics"] += 1
        elif schedule.training_round(int(p)) is not None:
            kinds["training"] += 1
        else:
            kinds["evaluation"] += 1
    parts = [f"{n} {'final evaluation' if k == 'evaluation' else k}" for k, n in kinds.items() if n]
    progress = (f"{kinds['training']} of {rounds} rounds run; {len(executed)} of {passes} passes"
                + (f" ({', '.join(parts)})" if parts else ""))
    return {"rounds_run": kinds["training"], "passes_approved": passes, "passes_run": len(executed),
            "passes_by_kind": kinds, "progress": progress}


# ----------------------------------------------------------------------------- audit


def audit(
    source: str | Path,
    verify_key: VerifyKey,
    *,
    out_dir: str | Path | None = None,
    expected_count: int | None = None,
    write: bool = True,
) -> AuditReport:
    """Verify and summarise the ledger at ``source`` (a datasite home or a ledger
    ``.jsonl``); write ``report.html`` and ``report.json`` to ``out_dir`` (default
    ``<home>/audit``) unless ``write`` is False."""
    ledger_path = Path(source)
    if ledger_path.is_dir() or ledger_path.suffix != ".jsonl":
        ledger_path = ledger_path / LEDGER_FILE
    report = verify(ledger_path, verify_key, expected_count=expected_count)
    entries, _ = read_entries(ledger_path)
    state, changes = _fold(entries)
    rs, ds = _series(entries)
    policy = state.policy
    by_r, by_d = _reserved(state, policy)
    report_obj = AuditReport(
        verification=report,
        requests=_request_rows(state),
        researcher_series=rs,
        dataset_series=ds,
        researcher_spent={k: v[-1][1] for k, v in rs.items()},
        dataset_spent={k: v[-1][1] for k, v in ds.items()},
        policy_changes=changes,
        policy=policy.to_dict() if policy else None,
        researcher_reserved=by_r,
        dataset_reserved=by_d,
    )
    if write:
        out = Path(out_dir) if out_dir is not None else ledger_path.parent / "audit"
        out.mkdir(parents=True, exist_ok=True)
        report_obj.json_path = out / REPORT_JSON
        report_obj.html_path = out / REPORT_HTML
        _write_text(report_obj.json_path, json.dumps(report_obj.to_dict(), indent=2, sort_keys=True, default=_jsonable))
        _write_text(report_obj.html_path, render_html(report_obj))
    return report_obj


def reserved_epsilon(state: _State, policy: Policy | None, *, dataset: str, researcher: str | None = None) -> float:
    """What the approved, unfinished jobs (of ``researcher``, or of everyone) on ``dataset``
    still hold against the budgets: epsilon of spent and reserved records composed, minus
    epsilon of the spent ones alone, under ``policy`` (0 without a policy or reservation).

    Args:
        state: the folded ledger.
        policy: the current policy (its delta and accountant).
        dataset: the dataset.
        researcher: one researcher's jobs only (``None``: everyone's).

    Returns:
        The reserved epsilon, >= 0.
    """
    held = state.committed(dataset=dataset, researcher=researcher)
    if policy is None or not held:
        return 0.0
    spent = state.spent(dataset=dataset, researcher=researcher)
    before = epsilon_of(spent, delta=policy.delta, accountant=policy.accountant) if spent else 0.0
    return max(0.0, epsilon_of(spent + held, delta=policy.delta, accountant=policy.accountant) - before)


def _reserved(state: _State, policy: Policy | None) -> tuple[dict[str, float], dict[str, float]]:
    """Reserved epsilon per researcher and per dataset, keyed as :func:`_series` keys them."""
    pairs = {(st.facts.researcher, st.facts.dataset) for st in state.requests.values()}
    datasets = {d for _, d in pairs}
    by_r = {(r if len(datasets) <= 1 else f"{r} on {d}"): reserved_epsilon(state, policy, dataset=d, researcher=r)
            for r, d in sorted(pairs)}
    by_d = {d: reserved_epsilon(state, policy, dataset=d) for d in sorted(datasets)}
    return by_r, by_d


def researcher_view(ledger: Ledger | str | Path, email: str) -> ResearcherView:
    """``email``'s own requests (with decisions and reasons), epsilon spent and
    researcher budget left per dataset under the current policy. Nothing about other
    researchers is included (not even the dataset's total spend)."""
    if isinstance(ledger, Ledger):
        entries = ledger.entries()
    else:
        entries, _ = read_entries(ledger)
    state, _ = _fold(entries)
    policy: Policy | None = state.policy
    spent: dict[str, float] = {}
    left: dict[str, float] = {}
    datasets = {st.facts.dataset for st in state.requests.values() if st.facts.researcher == email}
    for dsn in sorted(datasets):
        recs = state.spent(dataset=dsn, researcher=email)
        if policy is not None:
            eps = epsilon_of(recs, delta=policy.delta, accountant=policy.accountant)
            spent[dsn] = eps
            left[dsn] = policy.researcher_epsilon_budget - eps
    rs, _ = _series(entries, only_researcher=email)
    reserved = {dsn: reserved_epsilon(state, policy, dataset=dsn, researcher=email) for dsn in sorted(datasets)}
    return ResearcherView(email=email, requests=_request_rows(state, researcher=email), epsilon_spent=spent,
                          budget_left=left, series=rs, epsilon_reserved=reserved)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- html


def plot_png(report: AuditReport) -> bytes:
    """PNG of composed epsilon over time: per researcher (left) and per dataset (right),
    with the policy budgets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from datetime import datetime

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100, sharey=False)
    budgets = (report.policy or {}).get("privacy", {})
    for ax, series, title, budget_key in (
        (axes[0], report.researcher_series, "epsilon spent per researcher", "researcher_epsilon_budget"),
        (axes[1], report.dataset_series, "epsilon spent per dataset", "dataset_epsilon_budget"),
    ):
        if not series:
            ax.text(0.5, 0.5, "no rounds executed yet", ha="center", va="center", transform=ax.transAxes)
        for i, (name, pts) in enumerate(sorted(series.items())):
            xs = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t, _ in pts]
            ys = [v for _, v in pts]
            ax.step(xs, ys, where="post", color=PALETTE[i % len(PALETTE)], linewidth=2.5, marker="o", label=name)
        if budget_key in budgets:
            ax.axhline(budgets[budget_key], color="#555555", linestyle="--", linewidth=1, label=f"budget {budgets[budget_key]:g}")
        ax.set_title(title)
        ax.set_xlabel("time (UTC)")
        ax.set_ylabel(f"epsilon (delta={budgets.get('delta', '?')})")
        ax.grid(True, alpha=0.3)
        if series or budget_key in budgets:
            ax.legend(fontsize=8, loc="upper left")
        fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _short_ts(ts: Any) -> str:
    """2026-01-05T12:00:00.000000Z -> 2026-01-05 12:00:00 UTC"""
    return f"{str(ts)[:19].replace('T', ' ')} UTC" if ts else ""


def _f(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, str):
        return _e(x)
    return f"{x:.4g}"


def render_html(report: AuditReport) -> str:
    """A self-contained HTML page (inline CSS and PNG); every ledger string is escaped."""
    v = report.verification
    banner = (
        f'<p class="ok" id="verdict">Ledger verified: {v.entries} entries, chain and signatures intact '
        f"(key {_e(v.fingerprint[:16])}…)</p>"
        if v.ok
        else f'<p class="bad" id="verdict">Ledger FAILED verification: {len(v.problems)} problem(s)</p>'
    )
    problems = "".join(f"<li>{_e(p)}</li>" for p in v.problems)
    warnings = "".join(f"<li>{_e(w)}</li>" for w in v.warnings)
    def request_row(r: Mapping[str, Any]) -> str:
        cells = [
            ("", _e(r["request_id"])),
            ("", _e(r["researcher"])),
            ("", _e(r["dataset"])),
            ("", _e(r["code_name"]) + f'<br><code>{_e((r["code_hash"] or "")[:16])}…</code>'),
            ("", _e(_short_ts(r["received"]))),
            ("status", f'<span class="st-{_e(r["status"])}">{_e(r["status"])}</span>'),
            ("", _e(r["decided_by"]) + (f" ({_e(r['mode'])})" if r["mode"] else "")),
            ("num", _f(r["epsilon_approved"])),
            ("num", _f(r["epsilon_charged"])),
            ("", _e(r["progress"])),
            ("", "yes" if r["warning_shown"] else ""),
            ("reasons", "<br>".join(_e(x) for x in r["reasons"])),
        ]
        tds = "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for c, v in cells)
        return f'<tr class="request">{tds}</tr>'

    req_rows = "".join(request_row(r) for r in report.requests)
    budgets = (report.policy or {}).get("privacy", {})

    def spend_rows(spent: Mapping[str, float], reserved: Mapping[str, float], budget_key: str, css: str) -> str:
        b = budgets.get(budget_key)
        return "".join(
            f'<tr class="{css}"><td>{_e(k)}</td><td>{_f(spent.get(k, 0.0))}</td><td>{_f(reserved.get(k, 0.0))}</td>'
            f'<td>{_f(b)}</td><td>{_f(b - spent.get(k, 0.0)) if b is not None else ""}</td></tr>'
            for k in sorted(set(spent) | {k for k, v in reserved.items() if v > 0})
        )

    pol_rows = "".join(
        f"<tr><td>{c['seq']}</td><td>{_e(_short_ts(c['ts']))}</td><td>{_e(c['who'])}</td>"
        f"<td><code>{_e((c['old_hash'] or '')[:16])}</code></td><td><code>{_e((c['new_hash'] or '')[:16])}</code></td>"
        f"<td class=\"reasons\">{'<br>'.join(_e(x) for x in c['changed'])}</td></tr>"
        for c in report.policy_changes
    )
    png = base64.b64encode(plot_png(report)).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>fedmtl privacy ledger audit</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 24px; font-size: 13px; }}
th, td {{ border: 1px solid #bbb; padding: 4px 8px; vertical-align: top; text-align: left; }}
th {{ background: #e8eef6; }}
.ok {{ background: #dff5e1; padding: 8px; border-left: 6px solid #2e7d32; }}
.bad {{ background: #fde0e0; padding: 8px; border-left: 6px solid #c62828; }}
.st-approved, .st-finished {{ color: #2e7d32; font-weight: bold; }}
.st-denied, .st-aborted {{ color: #c62828; font-weight: bold; }}
.st-pending, .st-pending_manual {{ color: #b26a00; font-weight: bold; }}
code {{ font-size: 11px; }}
#requests {{ width: 100%; table-layout: fixed; }}
#requests td {{ overflow-wrap: anywhere; }}
#requests th.reasons {{ width: 26%; }}
td.reasons {{ overflow-wrap: anywhere; font-size: 12px; }}
img {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>Privacy ledger audit</h1>
{banner}
<ul id="problems">{problems}</ul>
<ul id="warnings">{warnings}</ul>
<h2>Epsilon spent over time</h2>
<img id="epsilon-plot" alt="epsilon spent over time per researcher and per dataset" src="data:image/png;base64,{png}" width="1100">
<h2>Requests</h2>
<table id="requests"><thead><tr><th>request</th><th>researcher</th><th>dataset</th><th>code</th><th>received</th>
<th>status</th><th>decided by</th><th>epsilon approved</th><th>epsilon charged</th><th>rounds and passes run</th>
<th>advisory warning shown</th><th class="reasons">reasons</th></tr></thead><tbody>{req_rows}</tbody></table>
<p id="passes-note">A <em>round</em> trains the model; a <em>pass</em> is one trip through secure aggregation,
and the ledger charges passes: with standard scaling pass 1 releases the features' statistics, then the rounds
run, and the last pass evaluates the final model. A finished 5-round job runs 7 passes (6 with range scaling).</p>
<h2>Spend per researcher</h2>
<table id="researchers"><thead><tr><th>researcher</th><th>epsilon spent</th><th>epsilon reserved</th><th>budget</th><th>left</th></tr></thead>
<tbody>{spend_rows(report.researcher_spent, report.researcher_reserved, "researcher_epsilon_budget", "researcher")}</tbody></table>
<h2>Spend per dataset</h2>
<table id="datasets"><thead><tr><th>dataset</th><th>epsilon spent</th><th>epsilon reserved</th><th>budget</th><th>left</th></tr></thead>
<tbody>{spend_rows(report.dataset_spent, report.dataset_reserved, "dataset_epsilon_budget", "dataset")}</tbody></table>
<p>Reserved: what approved jobs that are not finished or aborted will add when their remaining passes are
charged (composed with what was spent); a job closed by its researcher, its last pass or its idle time
(limits.job_idle_close_s) reserves nothing. Left: the budget minus what was spent.</p>
<h2>Policy changes</h2>
<table id="policy-changes"><thead><tr><th>seq</th><th>time</th><th>who</th><th>old policy</th><th>new policy</th><th>changed</th></tr></thead>
<tbody>{pol_rows}</tbody></table>
<p>Epsilon is composed from the ledger's privacy records (never summed) at delta={_e(budgets.get("delta"))}
with the {_e(budgets.get("accountant"))} accountant. Signed head: seq {_e((v.head or {}).get("seq"))}
(<code>{_e(((v.head or {}).get("hash") or "")[:16])}</code>), {v.entries} entries; keep this count and pass it
as the expected entry count to the next audit to detect a rollback of ledger and head together.</p>
</body></html>
"""


__all__ = ["AuditReport", "ResearcherView", "audit", "pass_progress", "plot_png", "render_html", "researcher_view"]
