"""Personalisation at the hospital: fine-tune the federated model on the hospital's own
records, and answer the question each hospital asks -- does joining pay off?

The federated model (a :class:`~fedmtl.researcher.result.JobResult`) left every site
under DP. A hospital may then train it further on its **own** training split, without DP:
those are its own records, and the fine-tuned model **stays at the hospital** (it is not
DP with respect to them, so it must not be shared as the federated model is).
:func:`compare_at_site` measures, on the hospital's own test split, the federated model,
the fine-tuned one and a model trained on the hospital's records alone, through the job's
own features:

* a **validation split** is carved from the training split (:func:`validation_split`);
  the test split is used for nothing but the final measurement;
* fine-tuning **stops early** on that validation split and keeps its best epoch, epoch 0
  being the federated model itself, so it never ends worse there than where it started
  (:func:`finetune_early_stopping`);
* the **local-only** model is the better, on that validation split, of an L2-regularised
  logistic regression per task (its strength tuned there) and the job's recipe without DP
  (:func:`local_only`), refitted on the whole training split;
* every difference (fine-tuned - federated, fine-tuned - local-only, federated -
  local-only; per task and the mean over tasks) comes with a **paired-bootstrap** 95%
  interval over the test split's patients (:func:`paired_bootstrap`).

:func:`site_from_export` reads the hospital's export with the split its datasite used:
the export's split column, or the split ``fedmtl datasite launch --test-fraction`` made,
rebuilt from the launch record in the datasite's home. ``fedmtl datasite personalise`` runs
it all on a hospital's export; ``fedmtl demo`` reports the fine-tuned row per hospital
(:func:`finetune_sites`) next to local-only training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from fedmtl.contract.jobspec import RECIPES
from fedmtl.datasites.data.records import add_test_split, load_records, read_export
from fedmtl.datasites.server.launch import home_split
from fedmtl.datasites.site import home as home_mod
from fedmtl.errors import ConfigError
from fedmtl.models.nets import RISK_RANGE_KEY
from fedmtl.models.preprocessing import Preprocessor, labels_of
from fedmtl.models.tasks import TaskSpec
from fedmtl.privacy.dp import train_local
from fedmtl.researcher.baselines import SiteData, train_like_job, without_dp
from fedmtl.schema import Schema

#: Fine-tuning: at most this many passes over the hospital's training split (it stops
#: earlier when the validation split stops improving), learning rate, momentum (plain SGD,
#: no DP, the job's sampling rate as the batch fraction). Chosen on the demo cohort:
#: docs/models.md, "Personalisation at the hospital".
FINETUNE: dict[str, float] = {"epochs": 15.0, "lr": 0.05, "momentum": 0.9}
#: Epochs without a better validation score before fine-tuning stops.
PATIENCE = 3
#: Share of the training split held out as the validation split (stratified, seeded).
VALIDATION_FRACTION = 0.2
#: Inverse L2 strengths the local logistic regression tries (chosen on the validation split).
LOGREG_C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: Bootstrap resamples of the test split for the intervals, and their level.
N_BOOT = 1000
LEVEL = 0.95

FEDERATED, FINETUNED, LOCAL = "federated", "federated, fine-tuned here", "local-only, no DP"
#: The differences :func:`compare_at_site` reports: ``(name, a, b)`` for ``a - b``.
DIFFERENCES: tuple[tuple[str, str, str], ...] = (
    ("fine-tuned - federated", FINETUNED, FEDERATED),
    ("fine-tuned - local-only", FINETUNED, LOCAL),
    ("federated - local-only", FEDERATED, LOCAL),
)


# -- the hospital's export and its split ------------------------------------------------------


def site_from_export(records: str | Path, schema: Schema, *, home: str | Path | None = None,
                     name: str = "this-hospital") -> tuple[SiteData, dict[str, Any]]:
    """Read a hospital's export with the train/test split its datasite used.

    Args:
        records: the export (CSV or Parquet) the datasite was launched with.
        schema: the records schema (the datasite's, with its split column).
        home: the datasite's home folder. The export must then be the very file the
            datasite was launched with (its sha256 is checked), and where the datasite made
            its split at launch (``--test-fraction``) the same split is rebuilt from the
            home's launch record with launch's own split function
            (:func:`fedmtl.datasites.data.records.add_test_split`).
        name: the site's name, for the report.

    Returns:
        ``(site, split)``: the records split into train and test, and where the split came
        from (``{"column", "source": "export" | "launch", ...}``, the launch record's fields).

    Raises:
        ConfigError: the export has no split column and no home says how the split was
            made; the home's datasite has no test split; the export is not the file the
            home's datasite was launched with.
        RecordsValidationError: the export does not match the schema.
    """
    records = Path(records)
    made = home_split(home) if home is not None else None
    column = (made or {}).get("column") or schema.split_column
    if made is not None and made.get("source") == "none":
        raise ConfigError(
            f"the datasite at {home} has no test split (launched without --test-fraction and without a split "
            "column): its federated model may have trained on any of its records, so none is held out for a fair "
            "comparison. Personalise needs held-out records the datasite never trained on")
    if column is None:
        raise ConfigError("the schema has no split column: give --home with your datasite's home (if it made the "
                          "split at launch), or --schema with the split column of your export")
    with_split = schema if schema.split_column == column else _with_split_column(schema, column)
    if made is not None:
        # the datasite's own split, of the very records it published: from another file the
        # test records could be ones the federated model trained on
        cfg = home_mod.read_config(Path(home))  # type: ignore[arg-type]
        if cfg.get("records_sha256") != _sha256(records):
            raise ConfigError(
                f"{records} is not the file the datasite at {home} was launched with ({cfg.get('records_file')}, "
                "sha256 differs): another file's split is not the datasite's, and its test records could be ones "
                "the federated model trained on. Give the export you launched the datasite with")
    if made is not None and made.get("source") == "launch":
        base = Schema(columns=tuple(c for c in with_split.columns if c.role != "split"), name=with_split.name,
                      description=with_split.description, extra=dict(with_split.extra))
        df, _, info = add_test_split(load_records(records, base), base, made["test_fraction"], made["seed"])
        if {k: info.get(k) for k in made} != made:
            raise ConfigError(f"the split rebuilt from {records} ({info}) is not the one the datasite at {home} "
                              f"recorded ({made}): give the schema the datasite was launched with (its "
                              "schema.toml)")
    elif column in read_export(records)[0].columns:
        df = load_records(records, with_split)
        info = dict(made) if made is not None else {"column": column, "source": "export"}
    else:
        raise ConfigError(
            f"{records} has no split column {column!r}. If your datasite made the split at launch "
            "(`fedmtl datasite launch --test-fraction`), give --home with the datasite's home folder: personalise "
            "rebuilds the same split from its launch record. Otherwise add the split column (train/test) to "
            "the export")
    site = SiteData(name, df[df[column] == "train"].reset_index(drop=True),
                    df[df[column] == "test"].reset_index(drop=True))
    return site, info


def _with_split_column(schema: Schema, column: str) -> Schema:
    """``schema`` whose split column is ``column`` (a schema without one gets none added:
    the caller only rebuilds a split that launch made)."""
    return dataclasses.replace(schema, columns=tuple(c for c in schema.columns if c.role != "split"
                                                    or c.name == column))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validation_split(train: pd.DataFrame, tasks: Sequence[TaskSpec], *, fraction: float = VALIDATION_FRACTION,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Carve a validation split from a training split: about ``fraction`` of the rows, drawn
    with ``numpy.random.default_rng(seed)`` within each value of the first task's label
    (missing labels are one more stratum).

    Args:
        train: the training split (records with labels).
        tasks: the job's tasks; the first one's label stratifies the draw.
        fraction: the validation share, between 0 and 1.
        seed: the draw's seed.

    Returns:
        ``(inner training split, validation split)``; neither is empty.

    Raises:
        ValueError: ``fraction`` is not between 0 and 1, or the split has fewer than 2 rows.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction!r}")
    n = len(train)
    if n < 2:
        raise ValueError(f"the training split has {n} record(s): too few to hold out a validation split")
    strata = train[tasks[0].label].astype(str).where(train[tasks[0].label].notna(), "missing").to_numpy() \
        if tasks else np.zeros(n, dtype=object)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(n, dtype=bool)
    for k in sorted(set(strata.tolist()), key=str):
        members = np.flatnonzero(strata == k)
        is_val[rng.permutation(members)[: int(round(len(members) * fraction))]] = True
    if is_val.all() or not is_val.any():  # tiny strata: fall back to one unstratified draw
        is_val[:] = False
        is_val[rng.permutation(n)[: min(n - 1, max(1, int(round(n * fraction))))]] = True
    return train[~is_val].reset_index(drop=True), train[is_val].reset_index(drop=True)


# -- AUROC, exact and bootstrapped ------------------------------------------------------------


def _auroc_weighted(score: np.ndarray, positive: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUROC of ``score`` against ``positive`` under each row of weights ``W`` (k, n) (ties
    count one half, as scikit-learn counts them); NaN where a row has no positive or no
    negative weight."""
    if score.shape[0] == 0 or not np.isfinite(score).all():  # a diverged model's NaN scores rank nothing
        return np.full(W.shape[0], np.nan)
    order = np.argsort(score, kind="mergesort")
    s, pos, W = score[order], positive[order].astype(float), W[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wp = np.add.reduceat(W * pos, starts, axis=1)
    wn = np.add.reduceat(W * (1.0 - pos), starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    P, N = wp.sum(axis=1), wn.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (wp * (neg_below + 0.5 * wn)).sum(axis=1) / (P * N)
    out[(P == 0) | (N == 0)] = np.nan
    return out


def _task_auroc(pred: np.ndarray, y: np.ndarray, mask: np.ndarray, task: TaskSpec, W: np.ndarray) -> np.ndarray:
    """One task's AUROC under each row of ``W``: binary, or one-vs-rest averaged over the
    classes for multiclass; all NaN for a regression task."""
    if task.kind == "binary":
        return _auroc_weighted(np.asarray(pred, dtype=float)[mask], y[mask] > 0.5, W[:, mask])
    if task.kind == "multiclass":
        P = np.asarray(pred, dtype=float)[mask]
        per = [_auroc_weighted(P[:, c], y[mask] == c, W[:, mask]) for c in range(P.shape[1])]
        with warnings.catch_warnings():  # a resample without some class: an all-NaN column
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(per), axis=0)
    return np.full(W.shape[0], np.nan)


def aurocs(preds: Mapping[str, np.ndarray], Y: np.ndarray, M: np.ndarray, tasks: Sequence[TaskSpec],
           W: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each task's exact AUROC (and ``"mean"`` over the tasks that have one) under each row
    of the weights ``W`` (k, n); without ``W``, once on the records as they are (k = 1).

    Args:
        preds: ``{task: scores}`` as :meth:`~fedmtl.models.MultiTaskNet.predict` gives them.
        Y, M: labels and their mask, ``(n, tasks)`` (:func:`~fedmtl.models.preprocessing.labels_of`).
        tasks: the tasks, in ``Y``'s column order.
        W: per-resample weights of the records (a bootstrap's counts).

    Returns:
        ``{task: (k,) array, ..., "mean": (k,) array}``; NaN where undefined.
    """
    Y, M = np.asarray(Y), np.asarray(M, dtype=bool)
    W = np.ones((1, Y.shape[0])) if W is None else np.asarray(W, dtype=float)
    out = {t.name: _task_auroc(preds[t.name], Y[:, j], M[:, j], t, W) for j, t in enumerate(tasks)}
    defined = [v for v in out.values() if np.isfinite(v[0])]
    out["mean"] = np.mean(np.stack(defined), axis=0) if defined else np.full(W.shape[0], np.nan)
    return out


def paired_bootstrap(preds: Mapping[str, Mapping[str, np.ndarray]], Y: np.ndarray, M: np.ndarray,
                     tasks: Sequence[TaskSpec], pairs: Sequence[tuple[str, str, str]], *, n_boot: int = N_BOOT,
                     seed: int = 0, level: float = LEVEL) -> dict[str, dict[str, dict[str, float | None]]]:
    """Differences of AUROC between models on the same records, each with a paired-bootstrap
    interval: every resample draws the records (patients) with replacement once, and every
    model and task is measured on that same draw.

    Args:
        preds: ``{model: {task: scores}}`` on the same records.
        Y, M: labels and their mask, ``(n, tasks)``.
        tasks: the tasks, in ``Y``'s column order.
        pairs: ``(name, a, b)``: report ``a - b`` under ``name``.
        n_boot: resamples (at least 100).
        seed: the resampling's seed (the same seed gives the same intervals).
        level: the interval's coverage, e.g. 0.95 (percentile interval).

    Returns:
        ``{name: {task or "mean": {"diff", "low", "high"}}}``, None where undefined (a task
        without both classes on the records, a regression task).

    Raises:
        ValueError: ``n_boot`` below 100 or ``level`` not between 0 and 1.
    """
    if n_boot < 100:
        raise ValueError(f"n_boot must be at least 100 for a 95% interval, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    n = int(np.asarray(Y).shape[0])
    rng = np.random.default_rng(seed)
    W = np.vstack([np.ones((1, n)), rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)]) if n else np.ones((1, 0))
    needed = {m for _, a, b in pairs for m in (a, b)}
    A = {m: aurocs(preds[m], Y, M, tasks, W) for m in needed}
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, a, b in pairs:
        out[name] = {}
        for key in [*(t.name for t in tasks), "mean"]:
            d = A[a][key] - A[b][key]
            boot = d[1:][np.isfinite(d[1:])]
            if not np.isfinite(d[0]) or len(boot) < n_boot // 2:
                out[name][key] = {"diff": None, "low": None, "high": None}
                continue
            out[name][key] = {"diff": float(d[0]), "low": float(np.percentile(boot, lo)),
                              "high": float(np.percentile(boot, hi))}
    return out


# -- fine-tuning ------------------------------------------------------------------------------


def finetune(model, pre, train, tasks, *, epochs: float = FINETUNE["epochs"], lr: float = FINETUNE["lr"],
             momentum: float = FINETUNE["momentum"], sample_rate: float = 0.05, seed: int | None = None):
    """A copy of ``model`` trained further on ``train`` for ``epochs`` passes, without DP,
    and without early stopping (:func:`finetune_early_stopping` stops on a validation split).

    Args:
        model: the federated :class:`~fedmtl.models.MultiTaskNet`; left as it was.
        pre: the job's :class:`~fedmtl.models.preprocessing.Preprocessor`.
        train: records with labels.
        tasks: the job's tasks.
        epochs, lr, momentum, sample_rate, seed: plain SGD's settings.

    Returns:
        The fine-tuned copy, in eval mode.

    Raises:
        ValueError: ``train`` is empty.
    """
    if len(train) == 0:
        raise ValueError("the training split is empty: nothing to fine-tune on")
    tuned = copy.deepcopy(model)
    Y, M = labels_of(train, tasks)
    train_local(model=tuned, X=pre.transform(train), Y=Y, mask=M, tasks=tasks, epochs=float(epochs),
                sample_rate=sample_rate, lr=float(lr), momentum=float(momentum), dp=False, seed=seed)
    tuned.config.pop(RISK_RANGE_KEY, None)  # the job's recalibration no longer describes these heads
    tuned.eval()
    return tuned


def finetune_early_stopping(model, pre, train: pd.DataFrame, validation: pd.DataFrame, tasks: Sequence[TaskSpec],
                            *, epochs: float = FINETUNE["epochs"], lr: float = FINETUNE["lr"],
                            momentum: float = FINETUNE["momentum"], sample_rate: float = 0.05,
                            seed: int | None = None, patience: int = PATIENCE) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` fine-tuned on ``train`` one epoch at a time (at most ``epochs``),
    scored after each on ``validation`` (mean AUROC over the tasks), stopping after
    ``patience`` epochs without a better score and returning the best epoch's weights.
    Epoch 0 is ``model`` itself and a later epoch must score strictly higher to replace it,
    so the result never scores lower on ``validation`` than ``model``.

    Args:
        model: the federated :class:`~fedmtl.models.MultiTaskNet`; left as it was.
        pre: the job's :class:`~fedmtl.models.preprocessing.Preprocessor`.
        train: the records to train on (the training split less the validation split).
        validation: the records to choose the epoch on (never the test split).
        tasks: the job's tasks.
        epochs, lr, momentum, sample_rate, seed: plain SGD's settings (``epochs``: the most).
        patience: epochs without improvement before stopping (at least 1).

    Returns:
        ``(model, info)``: the chosen copy in eval mode, and ``{"best_epoch", "epochs_run",
        "validation": [mean AUROC after each epoch, epoch 0 first]}``.

    Raises:
        ValueError: ``train`` or ``validation`` is empty, or ``patience`` < 1.
    """
    if len(train) == 0 or len(validation) == 0:
        raise ValueError("fine-tuning needs records to train on and a validation split; one of them is empty")
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    tuned = copy.deepcopy(model)
    tuned.eval()
    Y, M = labels_of(train, tasks)
    X = pre.transform(train)
    Xv = pre.transform(validation)
    Yv, Mv = (a.numpy() for a in labels_of(validation, tasks))

    def score() -> float:
        v = aurocs(tuned.predict(Xv), Yv, Mv, tasks)["mean"][0]
        return float(v) if np.isfinite(v) else float("-inf")

    history = [score()]
    best, best_state, done, since = 0, copy.deepcopy(tuned.state_dict()), 0.0, 0
    while done < float(epochs) - 1e-9 and since < patience:
        step = min(1.0, float(epochs) - done)
        train_local(model=tuned, X=X, Y=Y, mask=M, tasks=tasks, epochs=step, sample_rate=sample_rate, lr=float(lr),
                    momentum=float(momentum), dp=False, seed=None if seed is None else int(seed) + len(history))
        tuned.eval()
        done += step
        history.append(score())
        if history[-1] > history[best]:
            best, best_state, since = len(history) - 1, copy.deepcopy(tuned.state_dict()), 0
        else:
            since += 1
    tuned.load_state_dict(best_state)
    if best > 0:  # trained further: the job's recalibration no longer describes these heads
        tuned.config.pop(RISK_RANGE_KEY, None)
    tuned.eval()
    return tuned, {"best_epoch": best, "epochs_run": len(history) - 1,
                   "validation": [None if not np.isfinite(v) else v for v in history]}


def finetune_sites(result, sites: Sequence, *, seed: int = 0, **finetune_kw: float) -> dict[str, Any]:
    """Each of ``sites`` fine-tunes ``result``'s federated model on its own training split
    (what each hospital would do at home), stopping early on a validation split carved from
    it (:func:`validation_split`, :func:`finetune_early_stopping`).

    Args:
        result: the federated :class:`~fedmtl.researcher.result.JobResult`.
        sites: the :class:`~fedmtl.researcher.baselines.SiteData` of each hospital.
        seed: the validation split's and the fine-tuning's seed.
        finetune_kw: ``epochs``, ``lr``, ``momentum`` over :data:`FINETUNE`; ``patience`` over
            :data:`PATIENCE`.

    Returns:
        ``{site name: model}``.
    """
    tasks = result.spec.task_specs(result.schema)
    pre = Preprocessor.from_dict(result.preprocessor)
    kw = {**FINETUNE, **finetune_kw}
    out = {}
    for s in sites:
        inner, val = validation_split(s.train, tasks, seed=seed)
        out[s.name], _ = finetune_early_stopping(result.model(), pre, inner, val, tasks,
                                                 sample_rate=result.spec.sample_rate, seed=seed, **kw)
    return out


# -- the local-only baseline ------------------------------------------------------------------


def local_only_spec(spec):
    """``spec`` as one hospital training alone without DP: the non-private recipe
    (:data:`fedmtl.contract.jobspec.RECIPES` ``["no_dp"]``), the job's model, rounds and sampling."""
    return dataclasses.replace(without_dp(spec), local_steps=None, **RECIPES["no_dp"])


class LogisticPerTask:
    """One L2-regularised logistic regression per binary or multiclass task (scikit-learn),
    on the job's features; ``predict`` answers as a
    :class:`~fedmtl.models.MultiTaskNet` does for those tasks."""

    def __init__(self, C: Mapping[str, float], seed: int = 0) -> None:
        self.C = dict(C)
        self.seed = int(seed)
        self.models: dict[str, Any] = {}
        self.tasks: list[TaskSpec] = []

    def fit(self, X: np.ndarray, Y: np.ndarray, M: np.ndarray, tasks: Sequence[TaskSpec]) -> "LogisticPerTask":
        """Fit each task with a strength in :attr:`C` on its labelled rows (tasks with one
        class only predict a constant)."""
        # scikit-learn is in the test extra only (pyproject), as in researcher.baselines
        from sklearn.linear_model import LogisticRegression

        self.tasks = list(tasks)
        for j, t in enumerate(tasks):
            m = M[:, j]
            if t.name not in self.C or t.kind not in ("binary", "multiclass") or len(set(Y[m, j].tolist())) < 2:
                continue
            self.models[t.name] = LogisticRegression(C=self.C[t.name], max_iter=2000, random_state=self.seed).fit(
                X[m], Y[m, j].astype(int))
        return self

    def predict(self, X: Any) -> dict[str, np.ndarray]:
        """Scores per task: P(y=1) (binary), class probabilities (multiclass), zeros otherwise."""
        X = np.asarray(X)  # a tensor of the preprocessor, or an array
        out = {}
        for t in self.tasks:
            lr = self.models.get(t.name)
            k = len(t.classes or ()) if t.kind == "multiclass" else 1
            if lr is None:
                out[t.name] = np.zeros((len(X), k)) if t.kind == "multiclass" else np.zeros(len(X))
                continue
            p = lr.predict_proba(X)
            if t.kind == "binary":
                out[t.name] = p[:, list(lr.classes_).index(1)] if 1 in lr.classes_ else np.zeros(len(X))
            else:
                full = np.zeros((len(X), k))
                full[:, lr.classes_.astype(int)] = p
                out[t.name] = full
        return out


def local_only(spec, schema: Schema, pre: Preprocessor, train: pd.DataFrame, inner: pd.DataFrame,
               validation: pd.DataFrame, tasks: Sequence[TaskSpec], *, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A fair local-only baseline, chosen on the training split alone: the better, on
    ``validation``, of an L2 logistic regression per task (each task's strength chosen on
    ``validation`` from :data:`LOGREG_C`) and the job's recipe without DP
    (:func:`local_only_spec`), both trained on ``inner``; the winner is then refitted with
    its settings on all of ``train`` (``inner`` and ``validation``).

    Args:
        spec: the job's spec.
        schema: the records schema the job used.
        pre: the job's preprocessor.
        train: the whole training split; ``inner`` and ``validation``: its two parts.
        tasks: the job's tasks.
        seed: the models' seed.

    Returns:
        ``(model, info)``: an object with ``predict(X) -> {task: scores}``, and ``{"chosen":
        "logistic regression" | "job recipe, no DP", "validation": {candidate: mean AUROC},
        "C": {task: strength}}`` (``"note"`` when scikit-learn is missing).
    """
    Xi, Xv, Xt = pre.transform(inner), pre.transform(validation), pre.transform(train)
    Yi, Mi = labels_of(inner, tasks)
    Yv, Mv = (a.numpy() for a in labels_of(validation, tasks))
    recipe = local_only_spec(spec)
    net, _ = train_like_job(recipe, schema, Xi, Yi, Mi, seed=seed)
    scores = {"job recipe, no DP": float(aurocs(net.predict(Xv), Yv, Mv, tasks)["mean"][0])}
    info: dict[str, Any] = {}
    try:
        import sklearn  # noqa: F401 - the logistic regression's library, optional (the test extra)
    except ImportError:
        sklearn_ok = False
        info["note"] = "scikit-learn is not installed: the job's recipe is the only local-only candidate"
    else:
        sklearn_ok = True
    if sklearn_ok:
        Xin, Yin, Min = Xi.numpy(), Yi.numpy(), Mi.numpy()
        C: dict[str, float] = {}
        for j, t in enumerate(tasks):
            if t.kind not in ("binary", "multiclass"):
                continue
            best = (-np.inf, LOGREG_C[0])
            for c in LOGREG_C:
                p = LogisticPerTask({t.name: c}, seed).fit(Xin, Yin, Min, [t]).predict(Xv.numpy())
                v = aurocs(p, Yv[:, [j]], Mv[:, [j]], [t])[t.name][0]
                if np.isfinite(v) and v > best[0]:
                    best = (float(v), c)
            C[t.name] = best[1]
        lr = LogisticPerTask(C, seed).fit(Xin, Yin, Min, tasks)
        scores["logistic regression"] = float(aurocs(lr.predict(Xv.numpy()), Yv, Mv, tasks)["mean"][0])
        info["C"] = C
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    chosen = max(finite, key=lambda k: finite[k]) if finite else "job recipe, no DP"
    Yt, Mt = labels_of(train, tasks)
    if chosen == "logistic regression":
        model: Any = LogisticPerTask(info["C"], seed).fit(Xt.numpy(), Yt.numpy(), Mt.numpy(), tasks)
    else:
        model, _ = train_like_job(recipe, schema, Xt, Yt, Mt, seed=seed)
    info.update({"chosen": chosen, "validation": {k: (v if np.isfinite(v) else None) for k, v in scores.items()}})
    return model, info


# -- the comparison ---------------------------------------------------------------------------


def compare_at_site(result, site, *, seed: int = 0, local: bool = True,
                    finetune_kw: Mapping[str, float] | None = None, n_boot: int = N_BOOT,
                    validation_fraction: float = VALIDATION_FRACTION) -> tuple[dict[str, Any], Any]:
    """Measure, on ``site``'s test split, the federated model of ``result``, that model
    fine-tuned on ``site``'s training split (early stopping on a validation split carved
    from it), and (``local``) the better local-only model, with paired-bootstrap intervals
    on every difference.

    Args:
        result: the federated :class:`~fedmtl.researcher.result.JobResult`.
        site: one hospital's :class:`~fedmtl.researcher.baselines.SiteData`.
        seed: the validation split's, the models' and the bootstrap's seed.
        local: also train the local-only baseline (:func:`local_only`).
        finetune_kw: ``epochs`` (the most), ``lr``, ``momentum`` over :data:`FINETUNE`.
        n_boot: bootstrap resamples of the test split.
        validation_fraction: share of the training split held out for validation.

    Returns:
        The comparison, JSON-able: ``{"site", "n_train", "n_validation", "n_test",
        "finetune": {settings, "best_epoch", "epochs_run", "validation"}, "local_only":
        {"chosen", "validation", ...}, "rows": {row: {"auroc": {task: value}, "mean"}},
        "differences": {name: {task or "mean": {"diff", "low", "high"}}}, "bootstrap",
        "gain_finetuned_vs_local", "gain_federated_vs_local"}`` (exact AUROC on the test
        split), and the fine-tuned model.

    Raises:
        ValueError: the test split is empty or the training split too small to split.
    """
    if len(site.test) == 0:
        raise ValueError(f"{site.name}: the test split is empty; the comparison needs held-out records")
    schema = result.schema
    tasks = result.spec.task_specs(schema)
    pre = Preprocessor.from_dict(result.preprocessor)
    kw = {**FINETUNE, **(finetune_kw or {})}
    inner, val = validation_split(site.train, tasks, fraction=validation_fraction, seed=seed)
    federated = result.model()
    tuned, ft_info = finetune_early_stopping(federated, pre, inner, val, tasks, sample_rate=result.spec.sample_rate,
                                             seed=seed, **kw)
    models: dict[str, Any] = {FEDERATED: federated, FINETUNED: tuned}
    local_info = None
    if local:
        models[LOCAL], local_info = local_only(result.spec, schema, pre, site.train, inner, val, tasks, seed=seed)
    Xt = pre.transform(site.test)
    Y, M = (a.numpy() for a in labels_of(site.test, tasks))
    preds = {name: m.predict(Xt) for name, m in models.items()}
    rows = {}
    for name, p in preds.items():
        a = aurocs(p, Y, M, tasks)
        rows[name] = {"auroc": {t.name: _num(a[t.name][0]) for t in tasks}, "mean": _num(a["mean"][0])}
    pairs = [p for p in DIFFERENCES if p[1] in preds and p[2] in preds]
    diffs = paired_bootstrap(preds, Y, M, tasks, pairs, n_boot=n_boot, seed=seed)

    def gain(name: str) -> float | None:
        return diffs[name]["mean"]["diff"] if name in diffs else None

    return {"site": site.name, "n_train": len(site.train), "n_validation": len(val), "n_test": len(site.test),
            "finetune": {**kw, **ft_info}, "local_only": local_info, "rows": rows, "differences": diffs,
            "bootstrap": {"resamples": int(n_boot), "level": LEVEL, "seed": int(seed), "paired": True,
                          "interval": "percentile"},
            "gain_finetuned_vs_local": gain("fine-tuned - local-only"),
            "gain_federated_vs_local": gain("federated - local-only")}, tuned


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def comparison_table(cmp: Mapping[str, Any]) -> str:
    """``compare_at_site``'s result as markdown: AUROC per model on the site's test split,
    then each difference with its 95% interval."""
    rows = cmp["rows"]
    tasks = list(next(iter(rows.values()))["auroc"])
    lines = ["| model | mean over tasks | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for name, r in rows.items():
        cells = [_f(r["auroc"].get(t)) for t in tasks]
        lines.append(f"| {name} | {_f(r['mean'])} | " + " | ".join(cells) + " |")
    diffs = cmp.get("differences") or {}
    if diffs:
        lvl = int(round(100 * cmp.get("bootstrap", {}).get("level", LEVEL)))
        lines += ["", f"| difference (AUROC, {lvl}% paired-bootstrap interval) | mean over tasks | "
                  + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
        for name, d in diffs.items():
            cells = [_ci(d.get(t)) for t in tasks]
            lines.append(f"| {name} | {_ci(d.get('mean'))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ci(d: Mapping[str, float | None] | None) -> str:
    if not d or d.get("diff") is None:
        return "-"
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


__all__ = ["DIFFERENCES", "FINETUNE", "LOGREG_C", "N_BOOT", "PATIENCE", "VALIDATION_FRACTION", "LogisticPerTask",
           "aurocs", "compare_at_site", "comparison_table", "finetune", "finetune_early_stopping", "finetune_sites",
           "local_only", "local_only_spec", "paired_bootstrap", "site_from_export", "validation_split"]
