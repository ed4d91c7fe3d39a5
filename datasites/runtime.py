"""The round runtime: library code that runs *inside* the datasite when the approved round
template executes. It is the only code that touches the private records.

Each call handles one secure-aggregation stage of one pass (see
:mod:`fedmtl.protocol`)::

    advertise    check the pass number and the weights, charge the privacy ledger,
                 train with DP-SGD (and/or evaluate), clip + weight the update,
                 keep the payload in the home; return the signed key advertisement
    share_keys   return this site's encrypted Shamir shares
    masked_input return the masked, quantised payload (never the payload itself)
    unmask       reveal the shares the protocol allows; the pass is complete

Per-job secrets (secure-aggregation keys, the unmasked payload, personalised heads) live
in ``HOME/jobs/<job_id>/`` (0700 folder, 0600 files) and never leave the home. syft 0.9.5
does not enforce execution counts, so this runtime refuses, by itself and persistently:
a pass beyond the approved count, a replayed pass, a stage out of order, and weights that
are not finite or have the wrong shape.

Errors are returned as ``{"ok": False, "error": ..., "kind": ...}``, not raised, so the
researcher sees our message instead of syft's "contact the admin".
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedmtl import protocol
from fedmtl.datasites.home import write_json_atomic
from fedmtl.errors import ConfigError, FedMTLError

log = logging.getLogger("fedmtl.runtime")

#: site name -> home, registered by the server process(es) living in this interpreter
_HOMES: dict[str, Path] = {}
_LOCK = threading.RLock()
TEST_HOOK_ENV = "FEDMTL_TEST_HOOKS"
#: a throw-away home of a researcher's dry run (no ledger); never in a datasite's home
DRY_RUN_MARKER = "DRY_RUN_HOME"


class RoundError(FedMTLError):
    """A round call the runtime refuses (replay, beyond the approved count, bad weights...)."""


class PassAlreadyExecutedError(RoundError):
    """The pass was completed (and charged) at this site; it never runs twice."""


#: preprocessed splits of running jobs: (home, job, split, records id, scaling, tasks) ->
#: (the records object, (X, Y, M)); see JobRuntime._tensors
_TENSORS: dict[tuple, tuple] = {}
_TENSOR_SLOTS = 8


def _scaling_key(pre) -> str:
    return json.dumps(pre.to_dict(), sort_keys=True, default=str)


def drop_tensors(home: Path, job_id: str) -> None:
    """Forget the preprocessed records of ``job_id`` (its last pass completed)."""
    with _LOCK:
        for k in [k for k in _TENSORS if k[0] == str(home) and k[1] == job_id]:
            _TENSORS.pop(k, None)


def register_home(site: str, home: Path) -> None:
    _HOMES[site] = Path(home)


def unregister_home(site: str) -> None:
    _HOMES.pop(site, None)


def home_for(site: str) -> Path:
    if site in _HOMES:
        return _HOMES[site]
    env = os.environ.get("FEDMTL_HOME")
    if env and len(_HOMES) == 0:
        return Path(env)
    raise RoundError(f"this datasite is not {site!r}; the job spec names another site")


def handle(*, data: Any, spec: Mapping[str, Any], message: Mapping[str, Any]) -> dict[str, Any]:
    """Entry point of the round template. Never raises."""
    try:
        home = home_for(str(spec.get("site")))
        with _LOCK:
            job = JobRuntime(home, spec)
            return {"ok": True, **job.dispatch(data, dict(message))}
    except FedMTLError as e:
        log.warning("round call refused: %s", e)
        return {"ok": False, "error": str(e), "kind": type(e).__name__}
    except Exception as e:  # noqa: BLE001 - report without leaking data
        log.exception("round runtime failed")
        return {
            "ok": False,
            "error": f"internal error in the datasite runtime ({type(e).__name__}); "
            "the datasite's log (HOME/logs/server.log) has the details",
            "kind": "InternalError",
        }


class JobRuntime:
    STAGES = ("advertise", "share_keys", "masked_input", "unmask")
    QUERIES = ("spend",)

    def __init__(self, home: Path, spec: Mapping[str, Any]):
        self.home = Path(home)
        self.spec = dict(spec)
        job_id = str(spec.get("job_id", ""))
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ConfigError(f"invalid job id {job_id!r}")
        self.job_id = job_id
        own_schema = self.home / "schema.toml"
        if own_schema.is_file():
            # the datasite's own schema is authoritative, never the researcher's copy
            from fedmtl.schema import Schema

            self.spec["schema"] = Schema.load(own_schema).to_dict()
        self.job = protocol.job_of(self.spec)
        self.dir = self.home / "jobs" / job_id
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.state_path = self.dir / "state.json"
        self.state = (
            json.loads(self.state_path.read_text())
            if self.state_path.exists()
            else {"completed": [], "current": None, "attempt": 0, "charged": []}
        )

    # -- persistence ---------------------------------------------------------
    def _save(self) -> None:
        write_json_atomic(self.state_path, self.state, mode=0o600)

    def _secret_path(self, name: str) -> Path:
        return self.dir / name

    def _write_secret(self, name: str, blob: bytes) -> None:
        from fedmtl.privacy.keys import save_private_key

        save_private_key(self._secret_path(name), blob)

    def _read_secret(self, name: str) -> bytes:
        from fedmtl.privacy.keys import load_private_key

        return load_private_key(self._secret_path(name))

    # -- dispatch ------------------------------------------------------------
    def dispatch(self, data: Any, msg: dict[str, Any]) -> dict[str, Any]:
        stage = msg.get("stage")
        if stage == "spend":
            from fedmtl.datasites import site_ledger

            return {"view": site_ledger.researcher_view_of_job(self.home, self.job_id)}
        if stage not in self.STAGES:
            raise RoundError(f"unknown stage {stage!r}; expected one of {list(self.STAGES + self.QUERIES)}")
        p = msg.get("pass")
        if isinstance(p, bool) or not isinstance(p, int):
            raise RoundError(f"'pass' must be an int, got {p!r}")
        last = protocol.last_pass(self.job)
        if p in self.state["completed"]:
            raise PassAlreadyExecutedError(f"pass {p} of job {self.job_id} was already executed; a replay is refused")
        if p > last:
            raise RoundError(
                f"pass {p} is beyond the approved {self.job.rounds} round(s) (+1 final evaluation"
                f"{', +1 statistics pass' if self.job.stats_pass else ''}) of job {self.job_id}; refused"
            )
        if p < 1 or (self.state["completed"] and p <= max(self.state["completed"])):
            raise RoundError(f"pass {p} is not after the last executed pass; refused")
        if stage == "advertise":
            return self._advertise(data, p, msg)
        cur = self.state.get("current")
        if not cur or cur["pass"] != p:
            raise RoundError(f"stage {stage!r} of pass {p} before its 'advertise' stage; refused")
        from fedmtl.privacy.secagg import SiteSession

        ident = self._identity()
        params = protocol.secagg_params(self.spec, p, cur["attempt"], self._plan(p))
        session = SiteSession.from_bytes(self._read_secret("secagg.session"), identity=ident.signing_key)
        if session.params.digest() != params.digest():
            raise RoundError("secure-aggregation parameters changed within a pass; refused")
        if stage == "share_keys":
            out = session.share_keys(msg["keys"])
        elif stage == "masked_input":
            payload = np.load(self._secret_path("payload.npz"))
            arrays = [payload[n] for n in self._plan(p).names]
            out = session.masked_input(msg["delivery"], arrays)
        else:
            out = session.unmask(msg["request"])
        self._write_secret("secagg.session", session.to_bytes())
        if stage == "unmask":
            self._complete(p)
        return {"message": out}

    def _plan(self, p: int) -> protocol.PassPlan:
        if not hasattr(self, "_model"):
            self._model, self._pre = protocol.build_model(self.spec)
        return protocol.plan(self.spec, p, model=self._model)

    def _identity(self):
        from fedmtl.datasites import identity

        return identity.load(self.home)

    def _complete(self, p: int) -> None:
        self.state["completed"].append(p)
        self.state["current"] = None
        self._save()
        for name in ("payload.npz",):
            self._secret_path(name).unlink(missing_ok=True)
        if p == protocol.last_pass(self.job):
            from fedmtl.datasites import site_ledger

            drop_tensors(self.home, self.job_id)
            site_ledger.finish_job(self.home, self.spec)

    # -- stage 1: train / evaluate ---------------------------------------------
    def _advertise(self, data: Any, p: int, msg: Mapping[str, Any]) -> dict[str, Any]:
        from fedmtl.models import model_to_vector
        from fedmtl.privacy.secagg import SiteSession

        plan = self._plan(p)
        model = self._model
        size = model_to_vector(model).size
        weights = msg.get("weights")
        if not isinstance(weights, np.ndarray) or weights.shape != (size,):
            raise RoundError(
                f"weights must be a float array of shape ({size},) for this job's model; got "
                f"{type(weights).__name__} {getattr(weights, 'shape', '')}"
            )
        weights = weights.astype(np.float32)
        if not np.all(np.isfinite(weights)):
            raise RoundError("weights contain NaN or inf; refused")
        # the scaling of this pass: none for the statistics pass; the schema's ranges, or
        # the researcher's mean/std (checked, and pinned to the first pass that used them)
        if plan.stats:
            if msg.get("scaling") is not None:
                raise RoundError(f"pass {p} is the statistics pass; it takes no 'scaling'")
            self._pass_pre = None
        else:
            try:
                self._pass_pre = protocol.scaling_preprocessor(self.spec, msg.get("scaling"))
            except ConfigError as e:
                raise RoundError(f"pass {p}: {e}") from None
            if self.job.scaling == "standard":
                used = {"mean": dict(self._pass_pre.mean), "std": dict(self._pass_pre.std)}
                if self.state.get("scaling") is None:
                    self.state["scaling"] = used
                elif self.state["scaling"] != used:
                    raise RoundError(f"pass {p}: the scaling differs from the one earlier passes of job "
                                     f"{self.job_id} used; a job scales with one mean/std throughout; refused")

        cur = self.state.get("current")
        resumed = cur is not None and cur["pass"] == p and self._secret_path("payload.npz").exists()
        if cur is not None and cur["pass"] != p:
            # an unfinished earlier pass was abandoned by the researcher: it stays charged
            self.state["current"] = None
        attempt = msg.get("attempt", 0)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise RoundError(f"'attempt' must be an int >= 0, got {attempt!r}")
        if resumed:
            # the researcher restarted this pass (e.g. after a crash): reuse the payload,
            # do not train or charge again; fresh secure-aggregation keys
            if attempt <= cur["attempt"]:
                raise RoundError(
                    f"pass {p} was already started as attempt {cur['attempt']}; a restart must "
                    "use a higher attempt number"
                )
        else:
            payload, report = self._compute_payload(data, p, plan, weights)
            np.savez(self._secret_path("payload.tmp.npz"), **payload)
            os.chmod(self._secret_path("payload.tmp.npz"), 0o600)
            os.replace(self._secret_path("payload.tmp.npz"), self._secret_path("payload.npz"))
            self.state["last_report"] = report
            if os.environ.get(TEST_HOOK_ENV):
                hook = self.dir / "test-hook"
                hook.mkdir(exist_ok=True)
                np.savez(hook / f"pass-{p}.npz", **payload)
        self.state["current"] = {"pass": p, "attempt": attempt}
        ident = self._identity()
        params = protocol.secagg_params(self.spec, p, attempt, plan)
        session = SiteSession(params, site_id=self.spec["site"], identity=ident.signing_key)
        advert = session.advertise_keys()
        self._write_secret("secagg.session", session.to_bytes())
        self._save()
        out: dict[str, Any] = {"message": advert, "report": self.state.get("last_report", {})}
        return out

    def _compute_payload(self, data, p: int, plan: protocol.PassPlan, weights: np.ndarray):
        import pandas as pd

        from fedmtl.models import model_to_vector, vector_to_model
        from fedmtl.privacy.dp import train_local
        from fedmtl.privacy.quantization import weight_by_group

        if not isinstance(data, pd.DataFrame):
            raise RoundError(f"the records asset is a {type(data).__name__}, not a table")
        schema = protocol.schema_of(self.spec)
        tasks = self.job.task_specs(schema)
        model = self._model
        pre = getattr(self, "_pass_pre", None) or self._pre  # checked in _advertise
        groups = protocol.groups_of(model)
        split = schema.split_column
        df = data
        train_df = df[df[split] == "train"] if split else df
        test_df = df[df[split] == "test"] if split else df
        personal = self.job.strategy.name == "fedper"
        heads_file = self._secret_path("heads.npy")
        start = weights.copy()
        if personal and heads_file.exists():
            local = np.load(heads_file)
            shared = self._shared_mask(model)
            start[~shared] = local[~shared]
        payload: dict[str, np.ndarray] = {}
        # no per-site figure (loss, counts, split sizes, exact metrics) leaves the site:
        # the report holds only what the approved spec already determines
        report: dict[str, Any] = {"pass": p}
        n = int(len(train_df))
        self._charge(p, n, plan)  # before anything is computed from the records
        if plan.stats:
            from fedmtl.privacy.stats_release import noise_statistics, site_statistics

            payload["stats"] = noise_statistics(
                site_statistics(schema, train_df), schema, noise_multiplier=float(self.job.stats_noise_multiplier),
            )
            return payload, report
        if plan.evaluate:
            from fedmtl.privacy.eval_release import noise_statistics

            vector_to_model(model, start)
            tm = protocol.task_metrics(tasks)
            if len(test_df):
                import torch

                Xt, Y, M = self._tensors(data, "test", test_df, pre, tasks)
                with torch.no_grad():
                    pred = model.predict(Xt)
                protocol.update_metrics(tm, pred, Y, M, tasks)
            payload["metrics"] = noise_statistics(
                protocol.metric_vector(tm), tasks, n_bins=protocol.N_BINS,
                noise_multiplier=float(self.job.eval_noise_multiplier),
            )
            if self.job.per_site_metrics and self._policy_allows_site_metrics():
                # the same noised, charged statistics, for this site alone
                report["site_metrics"] = protocol.compute_metrics(payload["metrics"], tasks)
        if plan.train:
            X, Y, M = self._tensors(data, "train", train_df, pre, tasks)
            vector_to_model(model, start)
            res = train_local(
                model=model,
                X=X,
                Y=Y,
                mask=M,
                tasks=tasks,
                **self._train_kwargs(n, weights),
            )
            new = model_to_vector(model)
            delta = (new - start).astype(np.float64)
            if personal:
                np.save(heads_file, new)
                os.chmod(heads_file, 0o600)
                delta[~self._shared_mask(model)] = 0.0
            counts = {}
            Mn = M.numpy().astype(bool)
            for g in groups:
                if g == "trunk":
                    counts[g] = int(Mn.any(axis=1).sum())
                else:
                    j = [t.name for t in tasks].index(g)
                    counts[g] = int(Mn[:, j].sum())
            clip = float(self.job.secagg.clip)
            weighted, count_vec = weight_by_group(delta, groups=groups, counts=counts, clip=clip)
            payload["update"] = weighted
            payload["counts"] = count_vec
            report.update({"epsilon_round": res.epsilon, "noise_multiplier": res.noise_multiplier,
                           "steps": res.steps})
        return payload, report

    def _tensors(self, data, part: str, df, pre, tasks):
        """(X, Y, M) of one split, preprocessed once per job: kept in this process's memory
        while the same records object (the data plane holds it for the server's lifetime)
        and the same scaling come back, dropped when the job's last pass completes."""
        key = (str(self.home), self.job_id, part, id(data), _scaling_key(pre), tuple(t.name for t in tasks))
        with _LOCK:
            hit = _TENSORS.get(key)
            if hit is not None and hit[0] is data:
                return hit[1]
        X = pre.transform(df)
        Y, M = pre.labels(df, tasks)
        with _LOCK:
            _TENSORS[key] = (data, (X, Y, M))
            while len(_TENSORS) > _TENSOR_SLOTS:
                _TENSORS.pop(next(iter(_TENSORS)))
        return X, Y, M

    def _charge(self, p: int, n_train: int, plan: protocol.PassPlan) -> None:
        """Charge the pass's privacy records to the ledger before it runs (raises, and
        nothing is computed, when the ledger refuses)."""
        from fedmtl.datasites import site_ledger

        if not (plan.train or plan.evaluate or plan.stats):
            return
        records = self.job.pass_records(n_train, p)
        if plan.train and not self.job.dp:
            records = []  # the ledger refuses non-private training on a datasite
        site_ledger.charge_round(self.home, self.spec, p, records)
        self.state["charged"].append(p)
        self._save()

    def _train_kwargs(self, n: int, weights: np.ndarray) -> dict[str, Any]:
        job = self.job
        kw: dict[str, Any] = dict(job.client_config())
        kw["seed"] = None  # fresh randomness for the noise, never a fixed seed
        kw["steps"] = int(job.steps_per_round(n))
        if job.dp:
            kw["noise_multiplier"] = float(job.noise_for_site(n))
        if kw.get("fedprox_mu", 0.0) > 0:
            kw["global_vector"] = weights
        return kw

    def _shared_mask(self, model) -> np.ndarray:
        from fedmtl.models import slice_mask

        return slice_mask(model, ["trunk"])

    def _policy_allows_site_metrics(self) -> bool:
        from fedmtl.datasites import site_ledger

        return site_ledger.site_metrics_allowed(self.home)


class LocalTransport:
    """Runs the round runtime in this process on mock data (the dry run)."""

    def __init__(self, data: Mapping[str, Any], site_specs: Mapping[str, dict]):
        self.data = dict(data)
        self.site_specs = dict(site_specs)

    def call(self, site: str, message: dict[str, Any]) -> dict[str, Any]:
        return handle(data=self.data[site], spec=self.site_specs[site], message=message)
