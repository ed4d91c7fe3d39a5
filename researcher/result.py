"""The outcome of a job: the model, its metrics and the privacy it cost.

:class:`JobResult` holds the spec, the model config (:attr:`MultiTaskNet.config`), the
preprocessor (:meth:`Preprocessor.to_dict`), the global flat vector, per-site head
entries where heads are personalised (FedPer), the metrics history, the epsilon spent
per site and the rounds done. It saves to a folder::

    result.json    everything but the weights (JSON; NaN/inf written as NaN/Infinity)
    weights.npz    global_vector, and site/<name> head entries for each site
    job.toml       the spec, for humans and for re-running

Metrics history entries are ``{"round": r, "pooled": {task: {metric: value}},
"sites": {site: {task: {metric: value}}}}`` (``sites`` only where the sites released
them); :meth:`JobResult.metrics_table` flattens them to rows.

Per-site heads hold the values of the entries the job's strategy keeps at the sites
only (:meth:`JobResult.personal_mask`; FedPer's: every entry outside ``"trunk"``), in
flat-vector order; :meth:`JobResult.model` with a ``site`` puts them over the global vector.

Using a result::

    result = job.run()                      # or JobResult.load("runs/mtl/result")
    print(result)                           # tasks, final AUROC / Brier, epsilon charged per site,
                                            # the passes each site took part in
    result.final_metrics()                  # {task: {metric: value}} of the last evaluation
    result.metrics_table()                  # every evaluation, one row per metric
    result.predict(df)                      # {task: predictions}; df checked against the schema
    result.save("runs/mtl/result")          # result.json + weights.npz + job.toml

This module imports no syft.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from fedmtl.contract.jobspec import JobSpec
from fedmtl.contract.strategies import make_strategy
from fedmtl.errors import ConfigError
from fedmtl.researcher.checkpoint import atomic_write_bytes

__all__ = ["JobResult"]

_FORMAT = 1


@dataclass
class JobResult:
    """A trained multi-task model with its metrics and privacy cost (see the module docs).

    ``metrics`` is the history (one entry per evaluated round), ``epsilon`` the epsilon
    charged per site (read back from each site's ledger through your spend view where
    ``epsilon_source`` says ``"ledger"``; else ``"estimate: <why>"``, the figure the passes
    would cost), ``site_passes`` the passes each site's vector is in (the pass's
    survivors), ``rounds_done`` the training rounds run, ``lost_passes`` the passes the sites
    ran while the researcher's process was gone (their aggregates are not in this result; the
    job's last among them: no final metrics, risks not recalibrated). ``print(result)`` shows a short
    summary (never the spec, the schema or the weights)."""

    spec: JobSpec
    model_config: dict[str, Any]
    preprocessor: dict[str, Any]
    global_vector: np.ndarray
    site_heads: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    rounds_done: int = 0
    site_status: dict[str, Any] = field(default_factory=dict)
    epsilon_source: dict[str, str] = field(default_factory=dict)
    site_passes: dict[str, list[int]] = field(default_factory=dict)
    lost_passes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        from fedmtl.models.flat import vector_size
        from fedmtl.models.nets import model_from_config
        from fedmtl.models.preprocessing import Preprocessor

        net = model_from_config(self.model_config)
        n = vector_size(net)
        self.global_vector = np.asarray(self.global_vector, dtype=np.float32)
        if self.global_vector.shape != (n,):
            raise ValueError(f"global_vector has shape {self.global_vector.shape}; the model has {n} parameters")
        pre = Preprocessor.from_dict(self.preprocessor)
        if pre.n_features != int(self.model_config["n_features"]):
            raise ValueError(
                f"the preprocessor makes {pre.n_features} features, the model expects {self.model_config['n_features']}"
            )
        k = int(self.personal_mask(net).sum())
        for site, h in list(self.site_heads.items()):
            h = np.asarray(h, dtype=np.float32)
            if h.shape != (k,):
                raise ValueError(f"site {site!r}: head entries have shape {h.shape}; strategy "
                                 f"{self.spec.strategy.name} keeps {k} values at each site")
            self.site_heads[site] = h
        if isinstance(self.rounds_done, bool) or not isinstance(self.rounds_done, int) or self.rounds_done < 0:
            raise ValueError(f"rounds_done must be a whole number >= 0, got {self.rounds_done!r}")

    # -- building up -------------------------------------------------------------------------
    def add_metrics(
        self,
        round: int,
        pooled: Mapping[str, Mapping[str, float]],
        sites: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    ) -> None:
        """Record one evaluation: pooled ``{task: {metric: value}}`` (as from
        :meth:`fedmtl.models.TaskMetrics.compute`) and, where released, per site."""
        entry: dict[str, Any] = {"round": int(round), "pooled": _plain(pooled)}
        if sites:
            entry["sites"] = _plain(sites)
        self.metrics.append(entry)

    # -- using the model ---------------------------------------------------------------------
    def vector(self, site: str | None = None) -> np.ndarray:
        """The flat weights: global, or with ``site``'s personalised heads over it."""
        vec = self.global_vector.copy()
        if site is None:
            return vec
        if site not in self.site_heads:
            raise KeyError(f"no personalised heads for site {site!r}; sites with heads: {sorted(self.site_heads)}")
        vec[self.personal_mask()] = self.site_heads[site]
        return vec

    def personal_mask(self, model=None) -> np.ndarray:
        """The flat-vector entries the job's strategy keeps at the sites, where
        :attr:`site_heads` go (FedPer: the task heads; none for the other strategies).

        Args:
            model: the job's model (default: one built from :attr:`model_config`).

        Returns:
            A boolean mask over the flat vector
            (:meth:`fedmtl.contract.strategies.Strategy.personal_mask`).
        """
        from fedmtl.models.flat import task_slices
        from fedmtl.models.nets import model_from_config

        net = model_from_config(self.model_config) if model is None else model
        return make_strategy(self.spec.strategy).personal_mask(task_slices(net))

    def model(self, site: str | None = None):
        """The trained :class:`~fedmtl.models.MultiTaskNet` (global, or with ``site``'s heads)."""
        from fedmtl.models.flat import vector_to_model
        from fedmtl.models.nets import model_from_config

        net = model_from_config(self.model_config)
        vector_to_model(net, self.vector(site))
        net.eval()
        return net

    @property
    def schema(self):
        """The records schema the model was trained on (the sites' own)."""
        from fedmtl.schema import Schema

        return Schema.from_dict(self.preprocessor["schema"], source="the result's schema")

    def check_records(self, records: pd.DataFrame | str | Path) -> pd.DataFrame:
        """``records`` (a DataFrame, or a CSV / Parquet file) checked against the schema's
        feature columns exactly as ``fedmtl datasite launch`` checks a hospital's export,
        and typed; raises :class:`~fedmtl.errors.RecordsValidationError` listing every
        problem (missing feature columns, unknown columns, values of the wrong type,
        outside the declared range or categories, missing where the schema forbids it).

        The schema's id, label and split columns are not needed and are ignored when
        present: only the features go into the model."""
        from fedmtl.datasites.data import records as rec
        from fedmtl.schema import Column, Schema

        schema = self.schema
        rownums = None
        if isinstance(records, (str, Path)):
            raw, rownums = rec.read_export(records)  # launch's reader: its row numbers, its errors
            source = f"records file {Path(records)}"
        elif isinstance(records, pd.DataFrame):
            raw, source = records, "records given to predict"
        else:
            raise TypeError(f"predict takes a pandas DataFrame or a CSV/Parquet path, got {type(records).__name__}")
        features = schema.features
        ignored = [c.name for c in schema.columns if c.role != "feature"]
        raw = raw.drop(columns=[c for c in raw.columns if str(c) in ignored])
        # validate_frame checks a whole export, id included: give it a stand-in id
        id_name = schema.id_column
        raw = raw.assign(**{id_name: np.arange(1, len(raw) + 1, dtype=float)})
        sub = Schema(columns=(Column(name=id_name, role="id", type="numeric"), *features), name=schema.name)
        typed = rec.validate_frame(raw, sub, rownums=rownums, source=source)
        return typed[[c.name for c in features]]

    def preprocess(self, df: pd.DataFrame):
        """The model's input features of ``df`` (unchecked: :meth:`predict` checks first)."""
        from fedmtl.models.preprocessing import Preprocessor

        return Preprocessor.from_dict(self.preprocessor).transform(df)

    def predict(self, records: pd.DataFrame | str | Path, *, site: str | None = None) -> dict[str, np.ndarray]:
        """Predictions for ``records`` (a DataFrame or a CSV / Parquet file), per task:
        P(y=1) (binary, ``(n,)``), class probabilities in the schema's category order
        (multiclass, ``(n, C)``), the predicted value in label units (regression,
        ``(n,)``); row ``i`` is the ``i``-th record.

        The records are first checked against the schema as ``fedmtl datasite launch``
        checks an export (:meth:`check_records`: the same
        :class:`~fedmtl.errors.RecordsValidationError` listing every problem); only the
        feature columns are needed. ``site`` uses that site's personalised heads
        (strategy ``fedper``) instead of the global ones."""
        return self.model(site).predict(self.preprocess(self.check_records(records)))

    # -- reporting -----------------------------------------------------------------------------
    def metrics_table(self) -> pd.DataFrame:
        """Every evaluation as rows ``round, site, task, metric, value``; ``site`` is
        ``"pooled"`` for the metrics summed over all sites under secure aggregation (a
        site's own only where the sites released them). Metrics: ``auroc``, ``auprc``,
        ``accuracy``, ``brier`` for classification tasks; for binary tasks also
        ``mean_predicted`` against ``observed_rate`` (calibration in the large) and ``ece``,
        read under the job's Platt recalibration, each with its 95% interval
        ``<metric>_lo`` / ``<metric>_hi`` and ``wide`` (1.0: the AUROC interval is wider
        than +-0.05); ``mae`` and ``rmse`` for regression; ``n`` the labelled test records.
        All are DP-noised releases. A missing value is NaN."""
        rows = []
        for e in self.metrics:
            r = int(e["round"])
            for task, ms in e.get("pooled", {}).items():
                rows += [(r, "pooled", task, m, _num(v)) for m, v in ms.items()]
            for site, tasks in (e.get("sites") or {}).items():
                for task, ms in tasks.items():
                    rows += [(r, site, task, m, _num(v)) for m, v in ms.items()]
        return pd.DataFrame(rows, columns=["round", "site", "task", "metric", "value"])

    def final_metrics(self) -> dict[str, dict[str, float]]:
        """The pooled metrics of the last evaluation, ``{task: {metric: value}}``
        (``{}`` if none); see :meth:`metrics_table` for the metric names."""
        return dict(self.metrics[-1]["pooled"]) if self.metrics else {}

    def site_final_metrics(self, metric: str = "auroc") -> dict[str, dict[str, float]]:
        """Per site, ``{task: value}`` of ``metric`` from the last evaluation that released
        per-site metrics (noised and charged, like the pooled ones); ``{}`` when no
        evaluation did (the job's ``per_site_metrics`` is off, or a site's policy does not
        allow them). Each site's value is the global model on that site's own test split."""
        for entry in reversed(self.metrics):
            sites = entry.get("sites")
            if sites:
                return {s: {t: float(m[metric]) for t, m in tm.items() if metric in m} for s, tm in sites.items()}
        return {}

    def summary(self) -> str:
        """A few lines: the rounds, each task's final AUROC and Brier score (or MAE), the
        epsilon spent per site. Never the spec, the schema or the weights."""
        tasks = [(t["name"], t["kind"]) for t in self.model_config.get("tasks", [])]
        final = self.final_metrics()
        last = self.metrics[-1]["round"] if self.metrics else None
        head = (f"JobResult {self.spec.name!r}: {self.rounds_done} of {self.spec.rounds} round(s), "
                f"{len(tasks)} task(s), strategy {self.spec.strategy.name}")
        rows = [("task", "kind", "AUROC (95% interval)", "Brier", "mean risk/observed", "ECE", "MAE")]
        wide = []
        for name, kind in tasks:
            m = final.get(name, {})
            auroc = _fmt(m.get("auroc"), ".3f")
            if "auroc_lo" in m:
                auroc += f" ({_fmt(m.get('auroc_lo'), '.3f')} to {_fmt(m.get('auroc_hi'), '.3f')})"
            risk = (f"{_fmt(m.get('mean_predicted'), '.3f')}/{_fmt(m.get('observed_rate'), '.3f')}"
                    if "mean_predicted" in m else "-")
            rows.append((name, kind, auroc, _fmt(m.get("brier"), ".3f"), risk, _fmt(m.get("ece"), ".3f"),
                         _fmt(m.get("mae"))))
            if m.get("wide"):
                wide.append(name)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        final_lost = self.spec.schedule.last_pass in self.lost_passes
        if final_lost:
            lines.append("  no final evaluation" + ("" if last is None else
                                                    f" (the table shows the evaluation after round {last})"))
        elif last is not None:
            lines.append(f"  final metrics from the evaluation after round {last} (DP-noised releases; each "
                         "interval covers the noise and the binning)")
        else:
            lines.append("  no evaluation yet")
        if self.lost_passes:
            lines.append(f"  lost: pass(es) {_ranges(sorted(self.lost_passes))} ran at the sites while the researcher's "
                         "process was gone; their aggregates were never saved and are not in this result"
                         + (" (the last pass: no final metrics, and the risks are not recalibrated)" if final_lost else ""))
        if wide:
            lines.append(f"  warning: the AUROC interval of {', '.join(wide)} is wider than +-0.05: too few test "
                         "records for the evaluation noise to tell models apart (a smaller eval_noise_multiplier "
                         "buys a narrower one, at an epsilon cost job.cost() shows)")
        cal = self.metrics[-1].get("calibration") if self.metrics else None
        if cal:
            lines.append("  risks recalibrated (Platt, fitted on the sites' training splits): " + ", ".join(
                f"{t} a={a:.2f} b={b:+.2f}" for t, (a, b) in sorted(cal.items())))
        eps = ", ".join(f"{site}={_fmt(e)}" for site, e in sorted(self.epsilon.items())) or "-"
        if self.epsilon_source and all(v == "ledger" for v in self.epsilon_source.values()):
            lines.append(f"  epsilon charged per site (read back from each site's ledger): {eps}")
        else:
            lines.append(f"  epsilon per site: {eps} (delta={self.spec.delta:g})")
            for site, why in sorted(self.epsilon_source.items()):
                if why != "ledger":
                    lines.append(f"    {site}: not read back from its ledger ({why})")
        if self.site_passes:
            n = max((max(p) for p in self.site_passes.values() if p), default=0)
            lines.append("  passes per site: " + ", ".join(
                f"{site} {_ranges(ps)}" + (f" (missed {_ranges(sorted(set(range(1, n + 1)) - set(ps)))})"
                                           if len(ps) < n else "")
                for site, ps in sorted(self.site_passes.items())))
        if self.site_heads:
            lines.append(f"  personalised heads: {', '.join(sorted(self.site_heads))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return self.summary()

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything but the weights, JSON-ready."""
        return {
            "format": _FORMAT,
            "spec": self.spec.to_dict(),
            "spec_hash": self.spec.spec_hash(),
            "model_config": self.model_config,
            "preprocessor": self.preprocessor,
            "metrics": self.metrics,
            "epsilon": {k: float(v) for k, v in self.epsilon.items()},
            "rounds_done": self.rounds_done,
            "site_status": self.site_status,
            "epsilon_source": dict(self.epsilon_source),
            "site_passes": {k: [int(p) for p in v] for k, v in self.site_passes.items()},
            "sites_with_heads": sorted(self.site_heads),
            "lost_passes": [int(p) for p in self.lost_passes],
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``result.json`` (spec, model config, preprocessor, metrics, epsilon),
        ``weights.npz`` (the weights) and ``job.toml`` (the spec) into ``directory``
        (created if needed; each file atomically; all serialised before any is written;
        ``result.json`` last, so its presence marks a complete result). Returns the
        folder; :meth:`load` reads it back."""
        d = Path(directory)
        meta = (json.dumps(self.to_dict(), indent=2, default=_default) + "\n").encode("utf-8")
        buf = io.BytesIO()
        np.savez(buf, global_vector=self.global_vector, **{f"site/{k}": v for k, v in self.site_heads.items()})
        spec_text = self.spec.dumps("toml").encode("utf-8")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "weights.npz", buf.getvalue())
        atomic_write_bytes(d / "job.toml", spec_text)
        atomic_write_bytes(d / "result.json", meta)  # last: its presence marks a complete result
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "JobResult":
        """Read a result :meth:`save` wrote. Raises :class:`~fedmtl.errors.ConfigError`
        when the folder holds none, a file is damaged, or the spec no longer matches its
        recorded hash (the file was altered)."""
        d = Path(directory)
        meta_path, w_path = d / "result.json", d / "weights.npz"
        if not meta_path.is_file() or not w_path.is_file():
            raise ConfigError(f"{d} holds no saved job result (expected result.json and weights.npz)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            with np.load(w_path, allow_pickle=False) as z:
                vec = np.array(z["global_vector"])
                heads = {k.split("/", 1)[1]: np.array(z[k]) for k in z.files if k.startswith("site/")}
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"the job result in {d} is damaged: {e}") from e
        if meta.get("format") != _FORMAT:
            raise ConfigError(f"{meta_path} has format {meta.get('format')!r}; this fedmtl reads format {_FORMAT}")
        spec = JobSpec.from_dict(meta["spec"], source=f"spec in {meta_path}")
        if spec.spec_hash() != meta.get("spec_hash"):
            raise ConfigError(f"the spec in {meta_path} does not match its recorded hash; the file was altered")
        return cls(
            spec=spec,
            model_config=meta["model_config"],
            preprocessor=meta["preprocessor"],
            global_vector=vec,
            site_heads=heads,
            metrics=meta.get("metrics", []),
            epsilon={k: float(v) for k, v in meta.get("epsilon", {}).items()},
            rounds_done=int(meta.get("rounds_done", 0)),
            site_status=meta.get("site_status", {}),
            epsilon_source={str(k): str(v) for k, v in meta.get("epsilon_source", {}).items()},
            site_passes={str(k): [int(p) for p in v] for k, v in meta.get("site_passes", {}).items()},
            lost_passes=[int(p) for p in meta.get("lost_passes", [])],
        )


def _ranges(passes: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"`` (``"none"`` when empty)."""
    if not passes:
        return "none"
    out, start, prev = [], passes[0], passes[0]
    for p in [*passes[1:], None]:
        if p is not None and p == prev + 1:
            prev = p
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if p is not None:
            start = prev = p
    return ",".join(out)


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-able: {o!r}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (np.generic, int, float)) and not isinstance(obj, bool):
        return float(obj)
    return obj
