"""Bounds on a job spec before anything is computed from it: the reviewer's first gate.

A researcher controls every byte of the site spec a request carries (the syft
``Constant``). :func:`spec_problems` checks it against this datasite's own facts (name,
identity key, schema, train size) and the policy's ``[limits]``, in this order:

1. shape: exactly the keys the library sends, strings of sane length, lists and nesting
   of bounded size;
2. every number anywhere in the spec is finite and of bounded magnitude (so no later
   step can loop ``10**30`` times or overflow);
3. the spec's schema is this datasite's schema (the spec chooses labels from it and never
   re-types a column), its ``site`` is this datasite and its roster holds this
   datasite's own key, no key twice;
4. the caps: rounds, local steps, sample rate and batch size, model width, depth,
   parameter count and estimated memory of a round, clipping mode, secure-aggregation
   clip, evaluation passes and their noise, the statistics pass of standard scaling and
   its noise.

Every problem is returned (one message each, naming the key and the allowed range), so a
researcher can fix the spec from one denial. Nothing here imports syft or builds a model.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from fedmtl.contract.jobconfig import SCALINGS
from fedmtl.contract.schedule import PassSchedule
from fedmtl.contract.site_spec import OPTIONAL_SITE_SPEC_KEYS, SITE_SPEC_KEYS
from fedmtl.datasites.rules.policy import Policy
from fedmtl.schema import Schema

MAX_ABS_NUMBER = 1e9
MAX_STRING = 200
MAX_LIST = 64
MAX_DEPTH = 6
MAX_SITES = 64
MAX_RECORDS = 10_000_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")


def spec_problems(
    spec: Any,
    *,
    policy: Policy,
    schema: Schema,
    site: str,
    own_key: str,
    n_train: int,
) -> tuple[list[str], tuple[tuple[str, str], ...]]:
    """(problems, roster) of a site spec; ``roster`` is ``((site, ed25519 hex), ...)``
    sorted by site when the roster is well formed, else ``()``."""
    if not isinstance(spec, Mapping):
        return [f"the job spec must be a table, got {type(spec).__name__}"], ()
    problems: list[str] = []
    unknown = sorted(str(k) for k in spec if k not in SITE_SPEC_KEYS)
    if unknown:
        problems.append(f"the site spec has unknown key(s) {unknown}; allowed: {list(SITE_SPEC_KEYS)}")
    missing = [k for k in SITE_SPEC_KEYS if k not in OPTIONAL_SITE_SPEC_KEYS and k not in spec]
    if missing:
        problems.append(f"the site spec lacks {missing}")
    problems += _walk(spec, "spec", 0)
    if problems:
        return problems, ()

    job_id = spec["job_id"]
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        problems.append(f"job_id {job_id!r} must be lowercase letters, digits and '-' (at most 80)")
    if spec["site"] != site:
        problems.append(f"the job spec is for site {spec['site']!r}, not {site!r}")
    key = spec.get("dataplane_key")
    if key is not None and (not isinstance(key, str) or not _HEX64.match(key)):
        problems.append("dataplane_key must be the researcher's per-job Ed25519 public key: 64 lowercase hex characters")
    roster = _roster(spec["roster"], site=site, own_key=own_key, problems=problems, policy=policy)
    problems += schema_problems(spec["schema"], schema)
    max_count = spec["max_count"]
    if not _is_int(max_count) or not n_train <= max_count <= MAX_RECORDS:
        problems.append(
            f"max_count {max_count!r} must be an integer between this site's {n_train} training "
            f"records and {MAX_RECORDS}"
        )
    job = spec["job"]
    if not isinstance(job, Mapping):
        problems.append(f"spec.job must be a table, got {type(job).__name__}")
    else:
        problems += job_problems(job, policy=policy, schema=schema, n_train=n_train)
    return problems, roster


def schema_problems(spec_schema: Any, schema: Schema) -> list[str]:
    """The spec's copy of the schema must be this datasite's: same columns, roles, types,
    ranges and categories, in the same order."""
    own = schema.to_dict()["columns"]
    cols = spec_schema.get("columns") if isinstance(spec_schema, Mapping) else None
    if not isinstance(cols, list):
        return ["spec.schema must be this datasite's schema (a table with 'columns')"]
    if cols == own:
        return []
    own_by = {c["name"]: c for c in own}
    diffs = []
    for c in cols:
        name = c.get("name") if isinstance(c, Mapping) else None
        if name not in own_by:
            diffs.append(f"{name!r} is not a column here")
        elif c != own_by[name]:
            keys = sorted(k for k in {*c, *own_by[name]} if c.get(k) != own_by[name].get(k))
            diffs.append(f"{name!r} differs in {keys}")
    named = {c.get("name") for c in cols if isinstance(c, Mapping)}
    diffs += [f"{n!r} is missing" for n in own_by if n not in named]
    return [
        "spec.schema is not this datasite's schema (the datasite's schema is authoritative; "
        "a job may not re-declare columns): " + ("; ".join(diffs[:8]) or "column order differs")
    ]


def job_problems(job: Mapping[str, Any], *, policy: Policy, schema: Schema, n_train: int) -> list[str]:
    """The caps of ``policy`` on the job's numbers (all already finite and bounded)."""
    p: list[str] = []
    label_roles = {c.name: c.role for c in schema.columns}
    for i, t in enumerate(job.get("tasks") or []):
        label = t.get("label") if isinstance(t, Mapping) else None
        role = label_roles.get(label)
        if role is not None and role != "label":
            p.append(f"tasks[{i}]: column {label!r} is the {role} column here; only label columns can be tasks")
    if job.get("dp", True) is not True:
        p.append("dp: non-private training never runs on a datasite; set dp = true")

    rounds = job.get("rounds", 3)
    if not _is_int(rounds) or not 1 <= rounds <= policy.max_rounds:
        p.append(f"rounds {rounds!r} is outside 1..{policy.max_rounds} (training.max_rounds)")
    sample_rate = job.get("sample_rate", 0.05)
    if not _is_num(sample_rate) or not 0 < sample_rate <= policy.max_sample_rate:
        p.append(f"sample_rate {sample_rate!r} is outside (0, {policy.max_sample_rate:g}] (limits.max_sample_rate)")
        sample_rate = None
    steps = job.get("local_steps")
    epochs = job.get("local_epochs")
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= policy.max_local_steps):
        p.append(f"local_steps {steps!r} is outside 1..{policy.max_local_steps} (limits.max_local_steps)")
    if epochs is not None:
        if not _is_num(epochs) or not 0 < epochs <= policy.max_local_epochs:
            p.append(f"local_epochs {epochs!r} is outside (0, {policy.max_local_epochs}] (training.max_local_epochs)")
        elif sample_rate:
            implied = epochs / sample_rate
            if implied > policy.max_local_steps:
                p.append(
                    f"local_epochs {epochs:g} at sample_rate {sample_rate:g} is {implied:.0f} steps per round, "
                    f"above limits.max_local_steps {policy.max_local_steps}"
                )
    batch = None
    if sample_rate:
        batch = sample_rate * n_train
        if batch > policy.max_batch_size:
            p.append(
                f"sample_rate {sample_rate:g} gives an expected batch of {batch:.0f} records here, above "
                f"limits.max_batch_size {policy.max_batch_size}"
            )
    for key, lo, hi in (("noise_multiplier", 1e-3, 1e4), ("target_epsilon", 1e-3, 1e3),
                        ("lr", 1e-9, 1e3), ("max_grad_norm", 1e-6, 1e4)):
        v = job.get(key)
        if v is not None and (not _is_num(v) or not lo <= v <= hi):
            p.append(f"{key} {v!r} is outside [{lo:g}, {hi:g}]")
    clipping = job.get("clipping", "flat")
    if clipping not in policy.allowed_clipping:
        p.append(f"clipping {clipping!r} is not allowed here; allowed: {list(policy.allowed_clipping)} (limits.allowed_clipping)")

    sa = job.get("secagg") or {}
    clip = sa.get("clip", 1.0) if isinstance(sa, Mapping) else None
    if not _is_num(clip) or not policy.min_secagg_clip <= clip <= policy.max_secagg_clip:
        p.append(
            f"secagg.clip {clip!r} is outside [{policy.min_secagg_clip:g}, {policy.max_secagg_clip:g}] "
            "(limits.min_secagg_clip, limits.max_secagg_clip)"
        )
    bits = sa.get("frac_bits", 16) if isinstance(sa, Mapping) else None
    if not _is_int(bits) or not 4 <= bits <= 24:
        p.append(f"secagg.frac_bits {bits!r} is outside 4..24")

    p += _model_problems(job, policy=policy, schema=schema, batch=batch)
    p += _eval_problems(job, policy=policy, rounds=rounds if _is_int(rounds) and rounds >= 0 else None)
    return p


def _eval_problems(job: Mapping[str, Any], *, policy: Policy, rounds: int | None) -> list[str]:
    p: list[str] = []
    every = job.get("eval_every", 0)
    scaling = job.get("scaling", "standard")
    if not _is_int(every) or every < 0:
        p.append(f"eval_every {every!r} must be an integer >= 0 (0: evaluate the final model only)")
    elif rounds is not None:
        # the schedule the runtime charges by (fedmtl.contract.schedule)
        n = PassSchedule(rounds=rounds, eval_every=every, stats_pass=scaling == "standard").n_eval_passes
        if n > policy.max_eval_passes:
            p.append(
                f"eval_every {every} releases evaluation statistics in {n} passes; this datasite allows "
                f"{policy.max_eval_passes} (limits.max_eval_passes); set eval_every = 0 to evaluate the "
                "final model only"
            )
    noise = job.get("eval_noise_multiplier")
    if noise is not None and (not _is_num(noise) or not policy.min_eval_noise_multiplier <= noise <= 1e4):
        p.append(
            f"eval_noise_multiplier {noise!r} is below this datasite's minimum "
            f"{policy.min_eval_noise_multiplier:g} (limits.min_eval_noise_multiplier) or above 1e4"
        )
    # standard scaling releases feature statistics once (the statistics pass): the same
    # floor on its noise as on every other released statistic
    if scaling not in SCALINGS:
        p.append(f"scaling {scaling!r} is not one of {list(SCALINGS)}")
    stats_noise = job.get("stats_noise_multiplier")
    if scaling == "standard" and stats_noise is not None and (
            not _is_num(stats_noise) or not policy.min_eval_noise_multiplier <= stats_noise <= 1e4):
        p.append(
            f"stats_noise_multiplier {stats_noise!r} is below this datasite's minimum "
            f"{policy.min_eval_noise_multiplier:g} for released statistics (limits.min_eval_noise_multiplier) "
            "or above 1e4"
        )
    return p


def _model_problems(job: Mapping[str, Any], *, policy: Policy, schema: Schema, batch: float | None) -> list[str]:
    p: list[str] = []
    model = job.get("model") or {}
    if not isinstance(model, Mapping):
        return [f"model must be a table, got {type(model).__name__}"]
    widths = model.get("widths", [64, 32])
    if not isinstance(widths, list) or not all(_is_int(w) for w in widths):
        return [f"model.widths {widths!r} must be a list of integers"]
    if len(widths) > policy.max_layers:
        p.append(f"model.widths has {len(widths)} layers, above limits.max_layers {policy.max_layers}")
    bad = [w for w in widths if not 1 <= w <= policy.max_width]
    if bad:
        p.append(f"model.widths {bad} outside 1..{policy.max_width} (limits.max_width)")
    if p:
        return p
    params = estimate_params(schema, widths, n_tasks_outputs=_head_outputs(job, schema))
    if params > policy.max_model_params:
        p.append(
            f"the model has about {params:,} parameters, above limits.max_model_params "
            f"{policy.max_model_params:,}; use narrower or fewer layers"
        )
    if batch is not None:
        mode = job.get("grad_sample_mode") or ("ghost" if job.get("clipping", "flat") == "flat" else "hooks")
        mb = estimate_memory_mb(params, widths, batch, per_sample_grads=mode != "ghost")
        if mb > policy.max_memory_mb:
            p.append(
                f"one round needs about {mb:,.0f} MB (model {params:,} parameters, per-sample gradients "
                f"of a batch of about {batch:.0f}), above limits.max_memory_mb {policy.max_memory_mb}; "
                "lower sample_rate or the model size"
            )
    return p


def _head_outputs(job: Mapping[str, Any], schema: Schema) -> int:
    """Output units over all task heads (a categorical label has one per category)."""
    by_name = {c.name: c for c in schema.columns}
    out = 0
    for t in job.get("tasks") or []:
        col = by_name.get(t.get("label")) if isinstance(t, Mapping) else None
        cats = getattr(col, "categories", None) if col is not None else None
        out += len(cats) if (col is not None and col.type == "categorical" and cats) else 1
    return max(out, 1)


def estimate_params(schema: Schema, widths: list[int], *, n_tasks_outputs: int) -> int:
    """Parameters of the MLP trunk (weights, biases, LayerNorm) and the task heads."""
    from fedmtl.models.preprocessing import Preprocessor

    sizes = [Preprocessor(schema).n_features, *widths]
    trunk = sum(a * b + b + 2 * b for a, b in zip(sizes, sizes[1:]))
    return int(trunk + sizes[-1] * n_tasks_outputs + n_tasks_outputs)


def estimate_memory_mb(params: int, widths: list[int], batch: float, *, per_sample_grads: bool = True) -> float:
    """Peak bytes of one DP-SGD step, generously: weights, gradient, optimiser state,
    activations, and (Opacus' hooks and functorch modes, not ghost clipping) one
    per-sample gradient per record of a large Poisson batch."""
    b = batch + 6 * math.sqrt(batch) + 16
    floats = 4 * params + (b * params if per_sample_grads else 0) + 4 * b * sum(widths)
    return floats * 4 / 2**20


def _roster(raw: Any, *, site: str, own_key: str, problems: list[str],
            policy: Policy | None = None) -> tuple[tuple[str, str], ...]:
    """The roster as ``((site, key hex), ...)``; appends a problem naming each entry that is
    malformed, duplicated, this site's under a wrong key, or not a pinned peer."""
    if not isinstance(raw, Mapping) or not raw:
        problems.append("spec.roster must be a table of site name -> Ed25519 public key (hex)")
        return ()
    if len(raw) > MAX_SITES:
        problems.append(f"spec.roster has {len(raw)} sites, more than {MAX_SITES}")
        return ()
    bad = [n for n, k in raw.items() if not isinstance(k, str) or not _HEX64.match(k)]
    if bad:
        problems.append(f"spec.roster: the keys of {sorted(map(str, bad))} are not 64 lowercase hex characters")
        return ()
    keys = list(raw.values())
    dup = sorted({n for n, k in raw.items() if keys.count(k) > 1})
    if dup:
        problems.append(f"spec.roster: sites {dup} share one key; each site has its own identity key")
    own_fp = _fingerprint(own_key)
    if site not in raw:
        problems.append(
            f"spec.roster has no entry for this datasite {site!r} (key fingerprint {own_fp}); it names "
            + ", ".join(f"{n!r} ({_fingerprint(k)})" for n, k in sorted(raw.items()))
        )
    elif raw[site] != own_key:
        problems.append(
            f"spec.roster: the entry for this datasite {site!r} holds key fingerprint {_fingerprint(raw[site])}, "
            f"not this datasite's identity key ({own_fp})"
        )
    roster = tuple(sorted((str(n), str(k)) for n, k in raw.items()))
    if policy is not None:
        from fedmtl.datasites.rules.review import roster_pins

        others = tuple((n, k) for n, k in roster if not (n == site and k == own_key))
        problems += roster_pins(policy, others, own_site="")[1]
    return roster


def _fingerprint(key_hex: str) -> str:
    import hashlib

    return hashlib.sha256(bytes.fromhex(key_hex)).hexdigest()


def _walk(obj: Any, where: str, depth: int) -> list[str]:
    if depth > MAX_DEPTH:
        return [f"{where}: nested too deeply"]
    if obj is None or isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        if isinstance(obj, float) and not math.isfinite(obj):
            return [f"{where} = {obj!r}: numbers must be finite"]
        if abs(obj) > MAX_ABS_NUMBER:
            return [f"{where} = {obj!r}: numbers must be at most {MAX_ABS_NUMBER:g} in magnitude"]
        return []
    if isinstance(obj, str):
        return [f"{where}: a string of {len(obj)} characters (at most {MAX_STRING * 20})"] if len(obj) > MAX_STRING * 20 else []
    if isinstance(obj, Mapping):
        if len(obj) > MAX_LIST * 4:
            return [f"{where}: a table of {len(obj)} keys"]
        out: list[str] = []
        for k, v in obj.items():
            if not isinstance(k, str) or len(k) > MAX_STRING:
                out.append(f"{where}: key {str(k)[:40]!r} must be a short string")
                continue
            out += _walk(v, f"{where}.{k}", depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        if len(obj) > MAX_LIST * 8:
            return [f"{where}: a list of {len(obj)} items"]
        out = []
        for i, v in enumerate(obj):
            out += _walk(v, f"{where}[{i}]", depth + 1)
        return out
    return [f"{where}: a {type(obj).__name__} is not allowed in a job spec"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


__all__ = ["OPTIONAL_SITE_SPEC_KEYS", "SITE_SPEC_KEYS", "estimate_memory_mb", "estimate_params", "job_problems",
           "schema_problems", "spec_problems"]
