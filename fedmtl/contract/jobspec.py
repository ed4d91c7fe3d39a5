"""The job spec: everything a federated multi-task DP job asks of the datasites.

A :class:`JobSpec` is plain data (frozen, keyword-only). It is what the reviewer of each
datasite sees, so it holds every parameter that affects privacy or what leaves a site:
the tasks (by label column), the model, rounds, local epochs or steps, the sampling
rate, the learning rate, the noise multiplier *or* a target epsilon per site (for the
whole job) with delta, the clipping norm, the strategy, the secure-aggregation
threshold and clip, the evaluation schedule and whether per-site metrics are asked for.

Files: :meth:`JobSpec.save` / :meth:`JobSpec.load` read and write ``.toml``, ``.yaml`` /
``.yml`` and ``.json``. Top-level keys are the fields; ``tasks`` is a list of tables,
``model``, ``strategy`` and ``secagg`` are tables::

    name = "nafld-5y"
    rounds = 5
    local_epochs = 2.0
    sample_rate = 0.05
    lr = 4.0
    target_epsilon = 4.0
    delta = 1e-5
    max_grad_norm = 1.0

    [[tasks]]
    label = "diabetes_5y"          # kind inferred from the schema

    [[tasks]]
    label = "htn_5y"
    weight = 0.5

    [model]
    widths = [64, 32]

    [strategy]
    name = "fedavg"

    [secagg]
    threshold = 2                  # left out: floor(n/2) + 1 of the job's n sites

:meth:`JobSpec.spec_hash` is the sha256 of the canonical JSON of :meth:`JobSpec.to_dict`
(sorted keys, no whitespace, ``None`` values dropped), so the same spec has the same hash
whichever file format it came from.

Defaults that depend on the privacy mode: ``lr``, ``momentum``, ``local_epochs`` and
``max_grad_norm`` left out take :data:`RECIPES` ``["dp"]`` (lr 4, no momentum, 2 local
epochs: DP-SGD's clipped, noised steps want a large step) or ``["no_dp"]`` (lr 0.2,
momentum 0.9, 2 local epochs), the recipe chosen by experiment (docs/models.md,
"Recipe"); ``sample_rate`` left out is 0.05. Defaults that depend on the sites: a DP job
whose smallest site has fewer than :data:`SMALL_SITE_N_TRAIN` training records takes
:data:`SMALL_SITE_RECIPE` for the fields of :data:`ADAPTIVE_FIELDS` its spec left out
(``left_out``), resolved by :meth:`JobSpec.for_sites` when a job is made for its sites. A
spec written to a file holds the resolved values, so its hash does not depend on these
defaults.

Construction checks everything that needs no schema and raises :class:`JobSpecError`
(a :class:`~fedmtl.errors.ConfigError`) listing every problem; :meth:`JobSpec.validate`
adds the checks against the connected sites' schemas.

Privacy: one site's participation costs ``rounds`` records of :meth:`steps_per_round`
steps at the *effective* Poisson rate Opacus uses for ``sample_rate`` on that site's
``n_train`` records (:func:`fedmtl.privacy.dp.effective_sample_rate`), with the noise
multiplier :meth:`noise_for_site` (fixed, or calibrated so that all rounds together stay
within ``target_epsilon``), plus one Gaussian release per evaluation pass
(:meth:`eval_record`) and, with ``scaling = "standard"``, one for the statistics pass
(:meth:`stats_record`); :meth:`job_records` lists them pass by pass
(:meth:`n_passes`, :meth:`pass_records`). The datasite runtime trains each round with
exactly that noise multiplier and sample rate, so what the spec promises is what is
charged.

This module imports no syft.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedmtl.contract.jobconfig import (  # noqa: F401 - re-exported: the spec's public parts
    _SUFFIXES,
    CLIPPINGS,
    GRAD_SAMPLE_MODES,
    OPTIMIZERS,
    SCALINGS,
    JobSpecError,
    ModelConfig,
    SecAggConfig,
    StrategyConfig,
    TaskConfig,
    _bool,
    _drop_none,
    _float,
    _from_mapping,
    _int,
    _is_num,
    _unknown_keys,
    kind_of_column,
)
from fedmtl.contract.schedule import PassSchedule
from fedmtl.contract.strategies import make_strategy
from fedmtl.errors import ConfigError
from fedmtl.models.tasks import TaskSpec, tasks_from_schema
from fedmtl.privacy.accounting import ACCOUNTANTS, PrivacyRecord, calibrate_noise, epsilon_of
from fedmtl.privacy.secagg_common import majority_threshold
from fedmtl.schema import MERGE_HINT, Schema, describe_differences, schema_differences

__all__ = [
    "ADAPTIVE_FIELDS",
    "CLIPPINGS",
    "OPTIMIZERS",
    "RECIPES",
    "SCALINGS",
    "SMALL_SITE_N_TRAIN",
    "SMALL_SITE_RECIPE",
    "JobSpec",
    "JobSpecError",
    "ModelConfig",
    "SecAggConfig",
    "StrategyConfig",
    "TaskConfig",
    "kind_of_column",
]

# -- the job spec ---------------------------------------------------------------------------
#: The defaults of ``lr``, ``momentum``, ``local_epochs``, ``max_grad_norm`` and ``sample_rate`` by privacy
#: mode (a field left out takes the value of the spec's mode; without DP nothing is
#: clipped); the evidence is in docs/models.md, "Recipe".
RECIPES: dict[str, dict[str, float]] = {
    "dp": {"lr": 4.0, "momentum": 0.0, "local_epochs": 2.0, "max_grad_norm": 1.0, "sample_rate": 0.05},
    "no_dp": {"lr": 0.2, "momentum": 0.9, "local_epochs": 2.0, "max_grad_norm": 1.0, "sample_rate": 0.05},
}
#: A DP job whose smallest site has fewer training records than this takes
#: :data:`SMALL_SITE_RECIPE` for the fields its spec left out (:meth:`JobSpec.for_sites`).
SMALL_SITE_N_TRAIN = 2000
#: The DP recipe for small sites (docs/models.md, "Small hospitals"): with a few hundred
#: records, a site's clipped gradient sum is small against the noise, so each step needs a
#: larger share of the records (sample rate 0.2 instead of 0.05), fewer passes over them
#: (1 local epoch: fewer steps, less noise per step at the same epsilon), a smaller step,
#: and a smaller trunk (16 units: fewer weights for the same noise to swamp).
SMALL_SITE_RECIPE: dict[str, Any] = {"sample_rate": 0.2, "lr": 2.0, "momentum": 0.0, "local_epochs": 1.0,
                                     "widths": (16,)}
#: The fields :data:`SMALL_SITE_RECIPE` may set (``model``: its ``widths``).
ADAPTIVE_FIELDS = ("sample_rate", "lr", "momentum", "local_epochs", "model")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A federated multi-task DP training job (see the module docs).

    ``tasks``, ``model``, ``strategy`` and ``secagg`` accept the config objects or plain
    mappings. Give at most one of ``local_epochs`` and ``local_steps`` (neither means the
    mode's default, :data:`RECIPES`); ``lr``, ``momentum`` and ``max_grad_norm`` left out
    take the mode's default too; with ``dp`` give exactly one of ``noise_multiplier`` and
    ``target_epsilon`` (the latter: per site, for all rounds of the job, at ``delta``).
    Use :func:`dataclasses.replace` to derive a changed spec (it is re-checked).
    """

    name: str
    tasks: tuple[TaskConfig, ...]
    sites: tuple[str, ...] = ()
    #: None: ModelConfig() (widths 64, 32), or the small-site widths (:meth:`for_sites`)
    model: ModelConfig | None = None
    rounds: int = 5
    #: None (and no local_steps): RECIPES[mode]["local_epochs"]
    local_epochs: float | None = None
    local_steps: int | None = None
    #: None: RECIPES[mode]["sample_rate"] (0.05), or the small-site recipe's
    sample_rate: float | None = None
    #: None: RECIPES[mode]["lr"] (4.0 with DP, 0.2 without)
    lr: float | None = None
    #: None: RECIPES[mode]["momentum"] (0.0 with DP, 0.9 without)
    momentum: float | None = None
    optimizer: str = "sgd"
    dp: bool = True
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    #: None: RECIPES[mode]["max_grad_norm"] (1.0)
    max_grad_norm: float | None = None
    clipping: str = "flat"
    #: None: the fastest correct mode for the clipping (ghost for flat, hooks for per_layer)
    grad_sample_mode: str | None = None
    #: "standard": a statistics pass first (pass 1), then features standardised with the
    #: securely aggregated, noised mean/std; "range": by the schema's declared min/max
    scaling: str = "standard"
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    eval_every: int = 0
    eval_noise_multiplier: float = 5.0
    #: Gaussian noise of the statistics pass (scaling = "standard"), in multiples of its
    #: sensitivity (fedmtl.privacy.stats_release)
    stats_noise_multiplier: float = 5.0
    allow_partial: bool = False
    per_site_metrics: bool = False
    seed: int = 0
    #: the fields of ADAPTIVE_FIELDS this spec left out (set by construction and carried by
    #: dataclasses.replace; never written, so not part of the hash)
    left_out: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    # -- construction ------------------------------------------------------------------
    def __post_init__(self) -> None:
        p: list[str] = []
        s = object.__setattr__
        # nested configs from mappings
        raw_tasks = self.tasks
        if isinstance(raw_tasks, (str, bytes)) or not isinstance(raw_tasks, Sequence):
            p.append(f"tasks must be a list of tables with a 'label' each, got {type(raw_tasks).__name__}")
            raw_tasks = ()
        s(self, "tasks", tuple(_from_mapping(TaskConfig, t, f"tasks[{i}]", p) for i, t in enumerate(raw_tasks)))
        left_out = {k for k in ("sample_rate", "lr", "momentum", "model") if getattr(self, k) is None}
        if self.local_epochs is None and self.local_steps is None:
            left_out.add("local_epochs")
        s(self, "model", _from_mapping(ModelConfig, ModelConfig() if self.model is None else self.model, "model", p))
        strat = self.strategy
        if isinstance(strat, str):
            strat = {"name": strat}
        s(self, "strategy", _from_mapping(StrategyConfig, strat, "strategy", p))
        s(self, "secagg", _from_mapping(SecAggConfig, self.secagg, "secagg", p))
        sites = self.sites
        if isinstance(sites, str) or not isinstance(sites, Sequence) or not all(isinstance(x, str) and x for x in sites):
            p.append(f"sites must be a list of site names (empty = every connected site), got {sites!r}")
            sites = ()
        s(self, "sites", tuple(sites))
        if self.sites and isinstance(self.secagg, SecAggConfig) and self.secagg.threshold is None:
            # the default threshold: a majority of the sites the job is made for
            s(self, "secagg", dataclasses.replace(self.secagg, threshold=majority_threshold(len(self.sites))))
        # scalar coercion (int-valued floats in files become ints and vice versa)
        for key in ("rounds", "local_steps", "eval_every", "seed"):
            s(self, key, _int(getattr(self, key), key, p))
        for key in ("local_epochs", "sample_rate", "lr", "momentum", "noise_multiplier",
                    "target_epsilon", "delta", "max_grad_norm", "eval_noise_multiplier",
                    "stats_noise_multiplier"):
            s(self, key, _float(getattr(self, key), key, p))
        for key in ("dp", "allow_partial", "per_site_metrics"):
            _bool(getattr(self, key), key, p)
        recipe = RECIPES["no_dp" if self.dp is False else "dp"]
        if self.local_epochs is None and self.local_steps is None:
            s(self, "local_epochs", recipe["local_epochs"])
        for key in ("lr", "momentum", "max_grad_norm", "sample_rate"):
            if getattr(self, key) is None:
                s(self, key, recipe[key])
        # what dataclasses.replace carried over still counts as left out while it holds the
        # mode's default; a value given since then does not
        standard = {**recipe, "model": ModelConfig()}
        carried = {k for k in self.left_out if k in ADAPTIVE_FIELDS and getattr(self, k) == standard[k]}
        s(self, "left_out", frozenset(left_out | carried))
        p += self._static_problems()
        if p:
            raise JobSpecError(_dedupe(p), source=f"job spec {self.name!r}")

    def _static_problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.name, str) or not self.name.strip():
            p.append(f"name must be a non-empty string, got {self.name!r}")
        if len(set(self.sites)) != len(self.sites):
            p.append(f"sites are named more than once: {sorted({x for x in self.sites if self.sites.count(x) > 1})}")
        if not self.tasks:
            p.append("tasks is empty: give at least one task, e.g. [[tasks]] label = \"<label column>\"")
        for i, t in enumerate(self.tasks):
            p += t._problems(f"tasks[{i}] ({t.label!r})")
        names = [t.task_name for t in self.tasks]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            p.append(f"task names must be unique; repeated: {dups} (give one of them a different 'name')")
        p += self.model._problems()
        p += self.strategy._problems()
        p += self.secagg._problems()
        if self.sites and isinstance(self.secagg.threshold, int):
            p += _threshold_problems(self.secagg.threshold, len(self.sites), f"site(s) named {list(self.sites)}")

        def check(key: str, ok: bool, need: str) -> None:
            v = getattr(self, key)
            if _is_num(v) and not ok:
                p.append(f"{key} must be {need}, got {v}")

        check("rounds", _is_num(self.rounds) and self.rounds >= 1, ">= 1")
        check("eval_every", _is_num(self.eval_every) and self.eval_every >= 0,
              ">= 0 (0: evaluate the final model only; N: also every N rounds)")
        check("eval_noise_multiplier", _is_num(self.eval_noise_multiplier) and self.eval_noise_multiplier > 0,
              "> 0 (evaluation statistics are released with Gaussian noise of this multiplier)")
        check("stats_noise_multiplier", _is_num(self.stats_noise_multiplier) and self.stats_noise_multiplier > 0,
              "> 0 (the statistics pass of standard scaling is released with Gaussian noise of this multiplier)")
        check("sample_rate", _is_num(self.sample_rate) and 0 < self.sample_rate <= 1, "in (0, 1]")
        check("lr", _is_num(self.lr) and self.lr > 0, "> 0")
        check("momentum", _is_num(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)")
        if self.local_epochs is not None and self.local_steps is not None:
            p.append("give local_epochs or local_steps, not both")
        elif self.local_epochs is not None:
            check("local_epochs", _is_num(self.local_epochs) and self.local_epochs > 0, "> 0")
        else:
            check("local_steps", _is_num(self.local_steps) and self.local_steps >= 1, ">= 1")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"optimizer {self.optimizer!r} is not supported; choose one of {list(OPTIMIZERS)}")
        if self.clipping not in CLIPPINGS:
            p.append(f"clipping {self.clipping!r} is not one of {list(CLIPPINGS)}")
        if self.grad_sample_mode is not None:
            if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
                p.append(f"grad_sample_mode {self.grad_sample_mode!r} is not one of {list(GRAD_SAMPLE_MODES)}")
            elif self.grad_sample_mode == "ghost" and self.clipping != "flat":
                p.append("grad_sample_mode 'ghost' needs clipping = 'flat'; use 'hooks' for per_layer clipping")
        if self.scaling not in SCALINGS:
            p.append(f"scaling {self.scaling!r} is not one of {list(SCALINGS)}")
        if self.accountant not in ACCOUNTANTS:
            p.append(f"accountant {self.accountant!r} is not one of {list(ACCOUNTANTS)}")
        check("delta", _is_num(self.delta) and 0 < self.delta < 1, "in (0, 1)")
        check("max_grad_norm", _is_num(self.max_grad_norm) and self.max_grad_norm > 0, "> 0")
        if self.dp is True:
            if self.noise_multiplier is None and self.target_epsilon is None:
                p.append("dp is on: give exactly one of noise_multiplier and target_epsilon (neither was given)")
            elif self.noise_multiplier is not None and self.target_epsilon is not None:
                p.append(
                    "dp is on: give exactly one of noise_multiplier and target_epsilon "
                    f"(both were given: {self.noise_multiplier} and {self.target_epsilon})"
                )
            check("noise_multiplier", self.noise_multiplier is None or (_is_num(self.noise_multiplier) and self.noise_multiplier > 0), "> 0")
            check("target_epsilon", self.target_epsilon is None or (_is_num(self.target_epsilon) and self.target_epsilon > 0), "> 0")
        elif self.dp is False and (self.noise_multiplier is not None or self.target_epsilon is not None):
            p.append("dp is off, so noise_multiplier and target_epsilon do not apply; remove them or set dp = true")
        return p

    # -- schema checks ---------------------------------------------------------------------
    def participating(self, connected: Sequence[str]) -> list[str]:
        """The sites this job runs on: ``sites`` if given, else every connected site."""
        return list(self.sites) if self.sites else list(connected)

    def threshold_for(self, n_sites: int) -> int:
        """The secure-aggregation threshold of this job over ``n_sites`` sites.

        Args:
            n_sites: the number of sites the job runs on (its roster).

        Returns:
            ``secagg.threshold`` if given, else ``floor(n_sites/2) + 1``.

        Raises:
            ValueError: ``n_sites`` is not a positive int (and no threshold is given).
        """
        t = self.secagg.threshold
        return int(t) if t is not None else majority_threshold(n_sites)

    def for_sites(self, sites: Sequence[str], n_train: Mapping[str, int] | None = None) -> "JobSpec":
        """This spec resolved for ``sites`` (what a job sends): its threshold, and with DP
        and a smallest site below :data:`SMALL_SITE_N_TRAIN` training records, the
        :data:`SMALL_SITE_RECIPE` for the fields the spec left out (:meth:`recipe_for`).

        Args:
            sites: the sites the job is made for.
            n_train: each site's training records (its published split size); without
                them the recipe is left as it is.

        Returns:
            ``self`` if nothing needs resolving, else a copy: the threshold
            ``floor(n/2) + 1`` of the ``n`` sites when ``secagg.threshold`` is not set, and
            the small-site values of the left-out fields.

        Raises:
            JobSpecError: the threshold is not valid for ``sites`` (above their number,
                not more than half of it, or fewer than two sites).
        """
        given = self.secagg.threshold
        t = given if given is not None else (majority_threshold(len(sites)) if sites else 0)
        if len(sites) < 2:
            problems = [f"a job needs at least 2 sites for secure aggregation, got {list(sites)}"]
        else:
            problems = _threshold_problems(t, len(sites), f"site(s) {list(sites)}")
        if problems:
            raise JobSpecError(problems, source=f"job spec {self.name!r}")
        changes: dict[str, Any] = self.recipe_for([n_train[x] for x in sites]) if n_train else {}
        if given is None:
            changes["secagg"] = dataclasses.replace(self.secagg, threshold=t)
        return dataclasses.replace(self, **changes) if changes else self

    def recipe_for(self, n_train: Sequence[int]) -> dict[str, Any]:
        """The fields :meth:`for_sites` changes for sites of ``n_train`` training records:
        with DP and ``min(n_train) < SMALL_SITE_N_TRAIN``, :data:`SMALL_SITE_RECIPE`'s value
        of every field this spec left out (``left_out``); otherwise none."""
        if not self.dp or not n_train or min(int(n) for n in n_train) >= SMALL_SITE_N_TRAIN:
            return {}
        small = {**SMALL_SITE_RECIPE, "model": dataclasses.replace(self.model, widths=SMALL_SITE_RECIPE["widths"])}
        return {k: small[k] for k in ADAPTIVE_FIELDS if k in self.left_out}

    def can_run(self, *, approved: int, participating: int) -> bool:
        """Whether the job may run when ``approved`` of the ``participating`` sites approved:
        all of them, or (with ``allow_partial``) at least the threshold (t of the
        ``participating`` sites, :meth:`threshold_for`)."""
        t = self.threshold_for(max(1, participating))
        if approved >= participating:
            return approved >= t
        return bool(self.allow_partial) and approved >= t

    def problems(self, schemas: Mapping[str, Schema]) -> list[str]:
        """Every problem of this spec against the connected sites' schemas (site -> schema);
        an empty list means the spec fits."""
        p = self._static_problems()
        connected = list(schemas)
        if not connected:
            return p + ["no sites are connected: connect to the datasites before validating the job"]
        missing = [x for x in self.sites if x not in schemas]
        if missing:
            p.append(f"site(s) {missing} are named in sites but not connected; connected sites are {connected}")
        sites = [x for x in self.participating(connected) if x in schemas]
        n = len(self.participating(connected))
        if not self.sites and self.secagg.threshold is not None:
            p += _threshold_problems(self.secagg.threshold, n, f"connected site(s) {connected}")
        # tasks against each site's schema
        for task in self.tasks:
            kinds: dict[str, str] = {}
            classes: dict[str, tuple[str, ...] | None] = {}
            for site in sites:
                sch = schemas[site]
                col = next((c for c in sch.columns if c.name == task.label), None)
                labels = [c.name for c in sch.labels]
                if col is None:
                    p.append(
                        f"task {task.task_name!r}: site {site!r} has no column {task.label!r}; "
                        f"its label columns are {labels}"
                    )
                    continue
                if col.role != "label":
                    p.append(
                        f"task {task.task_name!r}: column {task.label!r} of site {site!r} is a {col.role} column, "
                        f"not a label; its label columns are {labels}"
                    )
                    continue
                kinds[site] = kind_of_column(col)
                classes[site] = col.categories
                if task.kind is not None and task.kind != kinds[site]:
                    p.append(
                        f"task {task.task_name!r}: declared kind {task.kind!r}, but label column {task.label!r} "
                        f"of site {site!r} is {col.type}, which makes a {kinds[site]!r} task; "
                        "fix the kind or leave it out to infer it"
                    )
            if len(set(kinds.values())) > 1:
                p.append(f"task {task.task_name!r}: sites disagree on the label's type: {kinds}")
            elif len({c for c in classes.values()}) > 1:
                p.append(f"task {task.task_name!r}: sites declare different categories for {task.label!r}: "
                         f"{ {k: list(v or ()) for k, v in classes.items()} }")
        # one feature layout for the shared model
        feats = {site: [(c.name, c.type, c.categories, c.missing) for c in schemas[site].features] for site in sites}
        if len({tuple(v) for v in feats.values()}) > 1:
            first = sites[0]
            for x in (x for x in sites if feats[x] != feats[first]):
                p.append(
                    f"the sites' feature columns differ: {x}'s from {first}'s: "
                    f"{_feature_differences(schemas[x], schemas[first])}; the shared model needs the same "
                    f"features (names, types, categories, missing) at every site: {MERGE_HINT}"
                )
        for site in sites[:1]:
            noscale = [c.name for c in schemas[site].features if c.type == "numeric" and (c.min is None or c.max is None)]
            if noscale:
                why = ("scales by them" if self.scaling == "range" else
                       "releases feature statistics whose noise is calibrated to them")
                p.append(
                    f"scaling = {self.scaling!r} needs min and max for every numeric feature (it {why}); "
                    f"{noscale} declare none (site {site!r}): declare them in the schema"
                )
        return _dedupe(p)

    def validate(self, schemas: Mapping[str, Schema]) -> "JobSpec":
        """Raise :class:`JobSpecError` listing every problem against the schemas; else
        return the spec."""
        p = self.problems(schemas)
        if p:
            raise JobSpecError(p, source=f"job spec {self.name!r}")
        return self

    def task_specs(self, schema: Schema) -> list[TaskSpec]:
        """The tasks as :class:`~fedmtl.models.TaskSpec` for ``schema`` (kinds inferred,
        multiclass classes from the schema's categories)."""
        p: list[str] = []
        out: list[TaskSpec] = []
        labels = [c.name for c in schema.labels]
        for t in self.tasks:
            col = next((c for c in schema.labels if c.name == t.label), None)
            if col is None:
                p.append(f"task {t.task_name!r}: {t.label!r} is not a label column of schema {schema.name!r}; its label columns are {labels}")
                continue
            kind = kind_of_column(col)
            if t.kind is not None and t.kind != kind:
                p.append(f"task {t.task_name!r}: declared kind {t.kind!r} but {t.label!r} is {col.type} ({kind!r})")
                continue
            # the models package decides classes and regression shift/scale from the column
            base = tasks_from_schema(schema, labels=[t.label])[0]
            out.append(dataclasses.replace(base, name=t.task_name, weight=t.weight))
        if p:
            raise JobSpecError(p, source=f"job spec {self.name!r}")
        return out

    def build_model(self, schema: Schema, *, n_features: int | None = None):
        """The job's initial model, identical at every party: :func:`fedmtl.models.build_model`
        with this spec's trunk and ``seed``. ``n_features`` defaults to the range-scaling
        :class:`~fedmtl.models.Preprocessor` width of ``schema``."""
        from fedmtl.models.nets import build_model
        from fedmtl.models.preprocessing import Preprocessor

        if n_features is None:
            n_features = Preprocessor(schema).n_features
        return build_model(n_features=n_features, tasks=self.task_specs(schema), trunk=self.model.trunk,
                           seed=self.seed, **self.model.trunk_options())

    # -- privacy -------------------------------------------------------------------------------
    def sample_rate_for_site(self, n_train: int) -> float:
        """The Poisson rate Opacus actually uses on ``n_train`` records
        (:func:`fedmtl.privacy.dp.effective_sample_rate`)."""
        from fedmtl.privacy.dp import effective_sample_rate

        _check_n(n_train)
        return effective_sample_rate(self.sample_rate, int(n_train))[0]

    def steps_per_round(self, n_train: int) -> int:
        """DP-SGD steps of one round on ``n_train`` records: ``local_steps``, or
        ``max(1, round(local_epochs / q))`` as :func:`~fedmtl.privacy.dp.train_local` does."""
        if self.local_steps is not None:
            return int(self.local_steps)
        q = self.sample_rate_for_site(n_train)
        return max(1, round(float(self.local_epochs) / q))  # type: ignore[arg-type]

    def noise_for_site(self, n_train: int) -> float:
        """The noise multiplier a site with ``n_train`` records trains with: the fixed
        ``noise_multiplier``, or the smallest one keeping all ``rounds`` rounds, composed
        with the job's evaluation and statistics releases, within ``target_epsilon`` at
        ``delta``; 0.0 without DP."""
        if not self.dp:
            return 0.0
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return _calibrated(float(self.target_epsilon), float(self.delta),  # type: ignore[arg-type]
                           self.sample_rate_for_site(n_train),
                           self.rounds * self.steps_per_round(n_train), self.accountant,
                           prior=tuple(self.stats_records() + self.eval_records()))

    def privacy_records(self, n_train: int, rounds: int | None = None) -> list[PrivacyRecord]:
        """What one site's training costs: one record per round (``rounds`` defaults
        to the whole job). Evaluation releases are :meth:`eval_records`."""
        r = self.rounds if rounds is None else rounds
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rounds must be a whole number >= 0, got {r!r}")
        rec = PrivacyRecord(noise_multiplier=self.noise_for_site(n_train),
                            sample_rate=self.sample_rate_for_site(n_train),
                            steps=self.steps_per_round(n_train))
        return [rec] * r

    def effective_grad_sample_mode(self) -> str:
        """``grad_sample_mode``, or the fastest correct one for the clipping mode: ghost
        clipping for flat clipping (no per-sample gradients stored), hooks otherwise."""
        if self.grad_sample_mode is not None:
            return self.grad_sample_mode
        return "ghost" if self.clipping == "flat" else "hooks"

    # -- passes: [1 statistics pass] + R training rounds + 1 final evaluation ------------
    #
    # With scaling = "standard" pass 1 is the statistics pass (it releases noised feature
    # statistics and trains and evaluates nothing), passes 2..R+1 are the training rounds
    # and pass R+2 evaluates the final model. With scaling = "range" there is no statistics
    # pass: passes 1..R train and pass R+1 evaluates. Every count of passes (the ledger's
    # approved passes, the runtime's last pass, the reviewer's pricing and limits) comes
    # from :attr:`schedule`; the methods below are its shorthands.
    @property
    def schedule(self) -> PassSchedule:
        """The job's :class:`~fedmtl.contract.schedule.PassSchedule` (statistics pass,
        training rounds, evaluation passes)."""
        return PassSchedule.of(self)

    @property
    def stats_pass(self) -> bool:
        """Whether the job starts with a statistics pass (``scaling == "standard"``)."""
        return self.schedule.stats_pass

    def n_passes(self) -> int:
        """Passes of the whole job: :attr:`PassSchedule.n_passes`."""
        return self.schedule.n_passes

    def is_stats_pass(self, pass_no: int) -> bool:
        """:meth:`PassSchedule.is_stats_pass`."""
        return self.schedule.is_stats_pass(pass_no)

    def training_round(self, pass_no: int) -> int | None:
        """The training round (1..rounds) pass ``pass_no`` runs, or ``None``
        (:meth:`PassSchedule.training_round`)."""
        return self.schedule.training_round(pass_no)

    def rounds_before(self, pass_no: int) -> int:
        """Training rounds completed before pass ``pass_no``
        (:meth:`PassSchedule.rounds_before`)."""
        return self.schedule.rounds_before(pass_no)

    def evaluates(self, pass_no: int) -> bool:
        """Whether pass ``pass_no`` releases evaluation statistics
        (:meth:`PassSchedule.evaluates`)."""
        return self.schedule.evaluates(pass_no)

    def eval_passes(self) -> list[int]:
        """The passes that release evaluation statistics (:meth:`PassSchedule.eval_passes`)."""
        return list(self.schedule.eval_passes())

    def eval_record(self) -> PrivacyRecord:
        """One release of the evaluation statistics: the Gaussian mechanism at
        ``eval_noise_multiplier`` times their sensitivity (sample rate 1, one step)."""
        return PrivacyRecord(noise_multiplier=float(self.eval_noise_multiplier), sample_rate=1.0, steps=1)

    def eval_records(self) -> list[PrivacyRecord]:
        return [self.eval_record() for _ in self.eval_passes()]

    def stats_record(self) -> PrivacyRecord:
        """The statistics pass's release: the Gaussian mechanism at
        ``stats_noise_multiplier`` times its sensitivity (fedmtl.privacy.stats_release)."""
        return PrivacyRecord(noise_multiplier=float(self.stats_noise_multiplier), sample_rate=1.0, steps=1)

    def stats_records(self) -> list[PrivacyRecord]:
        return [self.stats_record()] if self.stats_pass else []

    def pass_records(self, n_train: int, pass_no: int) -> list[PrivacyRecord]:
        """What pass ``pass_no`` costs a site, charged before it runs: the statistics
        release (statistics pass), its training round, its evaluation release."""
        schedule = self.schedule
        if schedule.is_stats_pass(pass_no):
            return [self.stats_record()]
        out = self.privacy_records(n_train, rounds=1) if (self.dp and schedule.training_round(pass_no)) else []
        if schedule.evaluates(pass_no):
            out.append(self.eval_record())
        return out

    def job_records(self, n_train: int) -> list[PrivacyRecord]:
        """Everything the job costs a site, pass by pass, in charging order."""
        return [r for p in self.schedule.passes() for r in self.pass_records(n_train, p)]

    def epsilon_for_site(self, n_train: int, rounds: int | None = None) -> float:
        """Epsilon at ``delta`` of the whole job (statistics, training and evaluation) on a site with
        ``n_train`` records; with ``rounds``, of that many training rounds alone
        (``inf`` without DP)."""
        if not self.dp:
            return float("inf")
        recs = self.job_records(n_train) if rounds is None else self.privacy_records(n_train, rounds)
        return epsilon_of(recs, delta=self.delta, accountant=self.accountant)

    def client_config(self) -> dict[str, Any]:
        """What the datasite runtime passes to :func:`fedmtl.privacy.dp.train_local`
        besides the data, the model, the noise multiplier and the steps.

        Returns:
            The spec's DP-SGD settings plus what the strategy's client half asks for
            (:meth:`fedmtl.contract.strategies.Strategy.configure_fit`: ``fedprox_mu``).
        """
        return {
            "sample_rate": self.sample_rate,
            "lr": self.lr,
            "momentum": self.momentum,
            "dp": self.dp,
            "delta": self.delta if self.dp else None,
            "accountant": self.accountant,
            "max_grad_norm": self.max_grad_norm,
            "clipping": self.clipping,
            "grad_sample_mode": self.effective_grad_sample_mode(),
            **make_strategy(self.strategy).configure_fit(),
        }

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML/YAML-ready data; ``None`` values are dropped."""
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "left_out":
                continue
            v = getattr(self, f.name)
            if f.name == "tasks":
                v = [t.to_dict() for t in v]
            elif f.name in ("model", "strategy", "secagg"):
                v = v.to_dict()
            elif f.name == "sites":
                v = list(v)
            d[f.name] = v
        return _drop_none(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "job spec") -> "JobSpec":
        if not isinstance(d, Mapping):
            raise JobSpecError([f"expected a table of job settings, got {type(d).__name__}"], source=source)
        allowed = [f.name for f in fields(cls) if f.name != "left_out"]
        p: list[str] = []
        _unknown_keys(d, allowed, "job", p)
        for req in ("name", "tasks"):
            if req not in d:
                p.append(f"'{req}' is required")
        if "name" not in d or "tasks" not in d:
            raise JobSpecError(p, source=source)
        kw = {k: d[k] for k in allowed if k in d}
        try:
            spec = cls(**kw)
        except JobSpecError as e:
            raise JobSpecError(p + e.problems, source=source) from None
        if p:  # unknown keys, with everything else fine
            raise JobSpecError(p, source=source)
        return spec

    def dumps(self, fmt: str = "toml") -> str:
        """The spec as ``toml``, ``yaml`` or ``json`` text."""
        d = self.to_dict()
        if fmt == "toml":
            import tomli_w

            return tomli_w.dumps(d)
        if fmt in ("yaml", "yml"):
            import yaml

            return yaml.safe_dump(d, sort_keys=False)
        if fmt == "json":
            return json.dumps(d, indent=2) + "\n"
        raise ValueError(f"unknown format {fmt!r}; choose toml, yaml or json")

    @classmethod
    def loads(cls, text: str, fmt: str = "toml", *, source: str = "job spec") -> "JobSpec":
        if fmt not in ("toml", "yaml", "yml", "json"):
            raise ValueError(f"unknown format {fmt!r}; choose toml, yaml or json")
        try:
            if fmt == "toml":
                import tomllib

                data = tomllib.loads(text)
            elif fmt == "json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as e:  # parser errors of each library
            raise ConfigError(f"{source} is not valid {fmt.upper()}: {e}") from e
        return cls.from_dict(data if data is not None else {}, source=source)

    def save(self, path: str | Path) -> Path:
        """Write the spec to ``path`` (.toml, .yaml, .yml or .json), atomically."""
        path = Path(path)
        fmt = _fmt_of(path)
        text = self.dumps(fmt)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "JobSpec":
        path = Path(path)
        fmt = _fmt_of(path)
        if not path.is_file():
            raise ConfigError(f"job spec file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read job spec file {path}: {e}") from e
        return cls.loads(text, fmt, source=f"job spec file {path}")

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def spec_hash(self) -> str:
        """Hex sha256 of :meth:`canonical_json`: the same for the same spec from any format."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


# -- helpers -------------------------------------------------------------------------------
def _threshold_problems(t: Any, n: int, sites: str) -> list[str]:
    """Problems of threshold ``t`` over ``n`` sites (described by ``sites``): above n, or
    not above n/2 (a datasite's review denies it: a server lying about dropouts could
    collect both kinds of share of one site)."""
    if not isinstance(t, int) or isinstance(t, bool):
        return []
    if t > n:
        return [f"secagg.threshold {t} is larger than the {n} {sites}; lower it or add sites"]
    if 2 * t <= n:
        return [
            f"secagg.threshold {t} is not more than half of the {n} {sites}: a server that lies about "
            f"dropouts could unmask one site's update, and the datasites deny it; use at least "
            f"{majority_threshold(n)} (floor(n/2) + 1), or leave the threshold out"
        ]
    return []


def _fmt_of(path: Path) -> str:
    suf = path.suffix.lower()
    if suf not in _SUFFIXES:
        raise ConfigError(f"job spec file {path} must end in one of {list(_SUFFIXES)}")
    return suf.lstrip(".")


def _check_n(n_train: int) -> None:
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be a positive whole number of training records, got {n_train!r}")


def _dedupe(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


_FEATURE_LAYOUT_KEYS = ("present", "role", "type", "categories", "missing")


def _feature_differences(schema: Schema, first: Schema) -> str:
    """How ``schema``'s features differ from ``first``'s, column by column and key by key."""
    feature = {c.name for s in (schema, first) for c in s.features}
    diffs = [d for d in schema_differences([schema, first], columns_only=True)
             if d.column in feature and d.key in _FEATURE_LAYOUT_KEYS]
    if not diffs:  # the same features, in another order
        return f"the feature columns' order ({[c.name for c in schema.features]} vs {[c.name for c in first.features]})"
    return describe_differences(diffs)


@functools.lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, q: float, steps: int, accountant: str,
                prior: Sequence[PrivacyRecord] = ()) -> float:
    return calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps,
                           accountant=accountant, prior=list(prior))
