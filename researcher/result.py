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

Per-site heads hold the values of the head entries only (``~shared_mask``, i.e. every
entry outside ``"trunk"``), in flat-vector order; :meth:`JobResult.model` with a
``site`` puts them over the global vector.

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

from fedmtl.errors import ConfigError
from fedmtl.jobspec import JobSpec
from fedmtl.researcher.checkpoint import atomic_write_bytes

__all__ = ["JobResult", "head_mask"]

_FORMAT = 1


def head_mask(model) -> np.ndarray:
    """Boolean mask of the flat-vector entries outside the trunk (the task heads)."""
    from fedmtl.models.flat import slice_mask

    return ~slice_mask(model, ["trunk"])


@dataclass
class JobResult:
    """See the module docs. ``metrics`` is the history (one entry per evaluated round)."""

    spec: JobSpec
    model_config: dict[str, Any]
    preprocessor: dict[str, Any]
    global_vector: np.ndarray
    site_heads: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    rounds_done: int = 0
    site_status: dict[str, Any] = field(default_factory=dict)

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
        k = int(head_mask(net).sum())
        for site, h in list(self.site_heads.items()):
            h = np.asarray(h, dtype=np.float32)
            if h.shape != (k,):
                raise ValueError(f"site {site!r}: head entries have shape {h.shape}; the heads hold {k} values")
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
        from fedmtl.models.nets import model_from_config

        vec[head_mask(model_from_config(self.model_config))] = self.site_heads[site]
        return vec

    def model(self, site: str | None = None):
        """The trained :class:`~fedmtl.models.MultiTaskNet` (global, or with ``site``'s heads)."""
        from fedmtl.models.flat import vector_to_model
        from fedmtl.models.nets import model_from_config

        net = model_from_config(self.model_config)
        vector_to_model(net, self.vector(site))
        net.eval()
        return net

    def preprocess(self, df: pd.DataFrame):
        from fedmtl.models.preprocessing import Preprocessor

        return Preprocessor.from_dict(self.preprocessor).transform(df)

    def predict(self, df: pd.DataFrame, *, site: str | None = None) -> dict[str, np.ndarray]:
        """Per task: P(y=1) (binary, ``(n,)``), class probabilities (multiclass, ``(n, C)``),
        the predicted value in label units (regression, ``(n,)``)."""
        return self.model(site).predict(self.preprocess(df))

    # -- reporting -----------------------------------------------------------------------------
    def metrics_table(self) -> pd.DataFrame:
        """Rows ``round, site, task, metric, value``; ``site`` is ``"pooled"`` for the
        pooled metrics."""
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
        """The pooled metrics of the last evaluation (``{}`` if none)."""
        return dict(self.metrics[-1]["pooled"]) if self.metrics else {}

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
            "sites_with_heads": sorted(self.site_heads),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``result.json``, ``weights.npz`` and ``job.toml`` into ``directory``
        (created if needed; each file atomically; all serialised before any is written)."""
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
        )


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
