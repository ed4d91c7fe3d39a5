"""The round runtime: library code that runs *inside* the datasite when the approved round
template executes. It is the only code that touches the private records.

Each call handles one secure-aggregation stage of one pass (see
:mod:`fedmtl.contract.protocol`)::

    advertise    check the pass number and the weights, charge the privacy ledger,
                 train with DP-SGD (and/or evaluate), clip + weight the update,
                 keep the payload in the home; return the signed key advertisement
    share_keys   return this site's encrypted Shamir shares
    masked_input return the masked, quantised payload (never the payload itself)
    consistency  sign the survivor set the researcher names (one per pass and attempt)
    unmask       reveal the shares the protocol allows, only against t signatures
                 over that same survivor set; the pass is complete

and, outside a pass, the ``spend`` query and the ``close`` request (the researcher
finishes or aborts the job: ``job_finished`` / ``job_aborted`` in the ledger, after which
no stage of any pass runs and the job's unspent passes are no longer reserved).

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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from fedmtl.contract import protocol
from fedmtl.contract.messages import (
    LIFECYCLE,
    PASS_STAGES,
    QUERIES,
    Advertise,
    Close,
    Consistency,
    MaskedInput,
    Reply,
    ShareKeys,
    Spend,
    StageMessage,
    parse_message,
)
from fedmtl.contract.site_spec import SiteSpec
from fedmtl.contract.strategies import make_strategy
from fedmtl.datasites.ledger import site_ledger
from fedmtl.datasites.ledger.site_ledger import DRY_RUN_MARKER
from fedmtl.datasites.rules.policy import Policy
from fedmtl.datasites.site.home import write_json_atomic
from fedmtl.errors import (  # noqa: F401 - RoundError, PassAlreadyExecutedError: re-exported
    ConfigError,
    FedMTLError,
    PassAlreadyExecutedError,
    RoundError,
)
from fedmtl.models.metrics import finite_predictions
from fedmtl.privacy.accounting import PrivacyRecord, epsilon_of
from fedmtl.privacy.dp import DPTrainingConfig, effective_sample_rate, noise_only_update, prepare, train

log = logging.getLogger("fedmtl.runtime")

#: site name -> home, registered by the server process(es) living in this interpreter
_HOMES: dict[str, Path] = {}
TEST_HOOK_ENV = "FEDMTL_TEST_HOOKS"


#: preprocessed splits of running jobs: (home, job, split, records id, scaling, tasks) ->
#: (the records object, (X, Y, M)); see JobRuntime._tensors
_TENSORS: dict[tuple, tuple] = {}
_TENSOR_SLOTS = 8
#: guards _TENSORS only: held to look up, insert or drop an entry, never while computing
_TENSORS_LOCK = threading.Lock()

# -- fair sharing of one datasite between jobs -------------------------------------------
# No lock spans jobs. Each job's round calls run one at a time under the job's own lock
# (its state file is read, changed and written by one call at a time); the stages that read
# the records (training, evaluation, statistics) also take one of HEAVY_SLOTS slots, so
# queries and the light secure-aggregation stages of other jobs never wait behind training.

#: stages that read the records (train, evaluate, compute statistics): the heavy ones
HEAVY_STAGES = frozenset({"advertise"})
#: bytes reserved for a pass's payload beyond 8 per model parameter (metrics, statistics,
#: the npz framing)
PAYLOAD_SLACK = 1 << 20
#: overrides the number of heavy stages that run at once in this process (a positive int)
HEAVY_SLOTS_ENV = "FEDMTL_HEAVY_SLOTS"


class _JobLock:
    """The lock of one job, and how many calls hold it or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users = 0


#: (home, job id) -> its lock, while a call holds or waits for it (then forgotten)
_JOB_LOCKS: dict[tuple[str, str], _JobLock] = {}
#: (home, researcher) -> job ids of theirs inside a heavy stage here (running or queued)
_HEAVY_JOBS: dict[tuple[str, str], set[str]] = {}
#: guards _JOB_LOCKS and _HEAVY_JOBS; held for a dictionary update, never across a call
_REGISTRY_LOCK = threading.Lock()
_HEAVY_POOL: threading.BoundedSemaphore | None = None


def heavy_slots() -> int:
    """How many heavy stages (:data:`HEAVY_STAGES`) this process runs at once.

    ``FEDMTL_HEAVY_SLOTS`` when set; else the cores this process may use divided by
    torch's intra-op threads (one training's; a datasite sets them from
    ``FEDMTL_TORCH_THREADS``, torch's default is every core), at least 1. One training
    with torch's default already keeps every core busy: a second one at once would only
    slow both down.

    Returns:
        The number of slots, >= 1.
    """
    raw = os.environ.get(HEAVY_SLOTS_ENV, "").strip()
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, torch.get_num_threads()))


def _heavy_pool() -> threading.BoundedSemaphore:
    global _HEAVY_POOL
    with _REGISTRY_LOCK:
        if _HEAVY_POOL is None:
            _HEAVY_POOL = threading.BoundedSemaphore(heavy_slots())
        return _HEAVY_POOL


@contextmanager
def job_lock(home: Path, job_id: str) -> Iterator[None]:
    """Hold the lock of one job: its round calls run one at a time, other jobs' do not
    wait. The lock lives in a registry while a call holds or waits for it.

    Args:
        home: the datasite home.
        job_id: the job.
    """
    key = (str(home), job_id)
    with _REGISTRY_LOCK:
        entry = _JOB_LOCKS.get(key)
        if entry is None:
            entry = _JOB_LOCKS[key] = _JobLock()
        entry.users += 1
    try:
        with entry.lock:
            yield
    finally:
        with _REGISTRY_LOCK:
            entry.users -= 1
            if entry.users == 0 and _JOB_LOCKS.get(key) is entry:
                del _JOB_LOCKS[key]


@contextmanager
def _heavy_stage(home: Path, job_id: str) -> Iterator[None]:
    """Run a record-reading stage: refuse it when its researcher already has the policy's
    most jobs in such a stage here (before anything is charged), then wait for a slot."""
    researcher, cap = site_ledger.concurrency_of_job(home, job_id)
    key = (str(home), researcher or "")
    if researcher is not None:
        with _REGISTRY_LOCK:
            jobs = _HEAVY_JOBS.setdefault(key, set())
            if cap is not None and len(jobs - {job_id}) >= cap:
                raise RoundError(
                    f"you already have {len(jobs)} job(s) training or evaluating at this datasite, the most "
                    f"its policy allows at once (limits.max_concurrent_jobs_per_researcher = {cap}); "
                    "nothing was run or charged: retry this pass when one of them has returned"
                )
            jobs.add(job_id)
    try:
        with _heavy_pool():
            yield
    finally:
        if researcher is not None:
            with _REGISTRY_LOCK:
                jobs = _HEAVY_JOBS.get(key, set())
                jobs.discard(job_id)
                if not jobs:
                    _HEAVY_JOBS.pop(key, None)


def _scaling_key(pre) -> str:
    return json.dumps(pre.to_dict(), sort_keys=True, default=str)


def drop_tensors(home: Path, job_id: str) -> None:
    """Forget the preprocessed records of ``job_id`` (its last pass completed)."""
    with _TENSORS_LOCK:
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


def handle(*, data: Any, spec: SiteSpec | Mapping[str, Any], message: Mapping[str, Any]) -> dict[str, Any]:
    """Entry point of the round template. Never raises.

    The edge: the site spec syft binds (or the data plane carries) is parsed here once
    (:meth:`SiteSpec.parse <fedmtl.contract.site_spec.SiteSpec.parse>`), and so is the
    message (:func:`fedmtl.contract.messages.parse_message`). A query
    (:attr:`JobRuntime.QUERIES`: read-only, it reads the ledger) runs at once. A stage, and
    a ``close`` request (:attr:`JobRuntime.LIFECYCLE`), runs under its job's lock
    (:func:`job_lock`); a stage that reads the records (:data:`HEAVY_STAGES`) also under the per-researcher cap and in one of
    :func:`heavy_slots` slots. Nothing is held across jobs.

    Args:
        data: the records asset (``None`` for a stage that reads no records).
        spec: the site spec, as bound or already parsed.
        message: the stage message, as sent.

    Returns:
        The reply's wire dict (:class:`fedmtl.contract.messages.Reply`): a refusal
        ``{"ok": False, "error", "kind"}`` for anything refused or failed.
    """
    try:
        site_spec = SiteSpec.coerce(spec)
        home = home_for(site_spec.site)
        msg = parse_message(message)
        if msg.stage in JobRuntime.QUERIES:
            return JobRuntime(home, site_spec).dispatch(data, msg).to_dict()
        job_id = site_spec.job_id
        with job_lock(home, job_id):
            if msg.stage in HEAVY_STAGES:
                with _heavy_stage(home, job_id):
                    return JobRuntime(home, site_spec).dispatch(data, msg).to_dict()
            return JobRuntime(home, site_spec).dispatch(data, msg).to_dict()
    except FedMTLError as e:
        log.warning("round call refused: %s", e)
        return Reply.refusal(str(e), type(e).__name__).to_dict()
    except Exception as e:  # noqa: BLE001 - report without leaking data
        log.exception("round runtime failed")
        return Reply.refusal(
            f"internal error in the datasite runtime ({type(e).__name__}); "
            "the datasite's log (HOME/logs/server.log) has the details",
            "InternalError",
        ).to_dict()


class JobRuntime:
    STAGES = PASS_STAGES
    QUERIES = QUERIES
    LIFECYCLE = LIFECYCLE

    def __init__(self, home: Path, site_spec: SiteSpec):
        """The runtime of one job at this datasite, for one call.

        Args:
            home: the datasite home.
            site_spec: the job's parsed site spec (its schema is replaced by this
                datasite's own, when the home has one).
        """
        self.home = Path(home)
        job_id = site_spec.job_id
        self.job_id = job_id
        #: the spec exactly as bound or carried (what the ledger's approval hashed)
        self._bound_spec = site_spec.to_dict()
        own_schema = self.home / "schema.toml"
        if own_schema.is_file():
            # the datasite's own schema is authoritative, never the researcher's copy
            from fedmtl.schema import Schema

            site_spec = site_spec.with_schema(Schema.load(own_schema))
        self.site_spec = site_spec
        self.job = site_spec.job
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

    @contextmanager
    def _reserved_payload(self, p: int, n_params: int) -> Iterator[Any]:
        """Reserve the disk space of pass ``p``'s payload before anything is charged, and
        yield ``store(payload)``, which writes it into that space and makes it the pass's
        ``payload.npz`` (the reply a retry of the pass gets).

        Raises:
            RoundError: the site's disk cannot hold the payload; nothing was charged.
        """
        import io

        tmp = self._secret_path("payload.tmp.npz")
        # the update, the counts and their npz framing, with room to spare
        reserve = 8 * int(n_params) + PAYLOAD_SLACK
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, reserve)
            except OSError as e:
                log.error("job %s pass %s: cannot reserve %d bytes for its payload in %s (%s); refused "
                          "before the charge", self.job_id, p, reserve, self.dir, e)
                raise RoundError(
                    f"pass {p}: the datasite's disk is full (it could not reserve {reserve:,} bytes for "
                    "this pass); nothing was charged. Retry the pass once its owner has freed space."
                ) from None

            def store(payload: Mapping[str, np.ndarray]) -> None:
                buf = io.BytesIO()
                np.savez(buf, **payload)
                blob = buf.getbuffer()
                os.lseek(fd, 0, os.SEEK_SET)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.ftruncate(fd, len(blob))
                os.fsync(fd)
                os.replace(tmp, self._secret_path("payload.npz"))

            yield store
        finally:
            os.close(fd)

    # -- dispatch ------------------------------------------------------------
    def dispatch(self, data: Any, msg: StageMessage) -> Reply:
        """Run one parsed message.

        Args:
            data: the records asset (read by ``advertise`` only).
            msg: the message (:func:`fedmtl.contract.messages.parse_message`).

        Returns:
            The reply.

        Raises:
            RoundError: the runtime refuses the message (replay, beyond the approved
                passes, out of order, bad weights...).
        """
        if isinstance(msg, Spend):
            return Reply.query_reply(site_ledger.researcher_view_of_job(self.home, self.job_id))
        if isinstance(msg, Close):
            return self._close(msg)
        stage = msg.stage
        p = msg.pass_no
        last = self.site_spec.schedule.last_pass
        if p in self.state["completed"]:
            raise PassAlreadyExecutedError(f"pass {p} of job {self.job_id} was already executed; a replay is refused")
        if p > last:
            raise RoundError(
                f"pass {p} is beyond the approved {self.job.rounds} round(s) (+1 final evaluation"
                f"{', +1 statistics pass' if self.job.stats_pass else ''}) of job {self.job_id}; refused"
            )
        if p < 1 or (self.state["completed"] and p <= max(self.state["completed"])):
            raise RoundError(f"pass {p} is not after the last executed pass; refused")
        status = site_ledger.job_status(self.home, self.job_id)
        if status in ("finished", "aborted"):
            raise RoundError(f"job {self.job_id} is {status} at this datasite; no pass of it runs any more")
        if isinstance(msg, Advertise):
            return self._advertise(data, p, msg)
        cur = self.state.get("current")
        if not cur or cur["pass"] != p:
            raise RoundError(f"stage {stage!r} of pass {p} before its 'advertise' stage; refused")
        from fedmtl.privacy.secagg import SiteSession

        ident = self._identity()
        params = protocol.secagg_params(self.site_spec, p, cur["attempt"], self._plan(p))
        session = SiteSession.from_bytes(self._read_secret("secagg.session"), identity=ident.signing_key)
        if session.params.digest() != params.digest():
            raise RoundError("secure-aggregation parameters changed within a pass; refused")
        if isinstance(msg, ShareKeys):
            out = session.share_keys(msg.keys)
        elif isinstance(msg, MaskedInput):
            payload = np.load(self._secret_path("payload.npz"))
            arrays = [payload[n] for n in self._plan(p).names]
            out = session.masked_input(msg.delivery, arrays)
        elif isinstance(msg, Consistency):
            # signs the survivor set once per pass and attempt (kept in the session)
            out = session.consistency_check(msg.request)
        else:
            out = session.unmask(msg.request)
        self._write_secret("secagg.session", session.to_bytes())
        if stage == "unmask":
            self._complete(p)
        return Reply.stage_reply(out)

    def _close(self, msg: Close) -> Reply:
        """The researcher finishes or aborts the job here (under the job's lock, so no stage
        of it runs meanwhile): the ledger records the closing once; the pass in progress,
        if any, is dropped with its payload (it stays charged)."""
        view = site_ledger.close_job(self.home, self._bound_spec, aborted=msg.action == "abort",
                                     reason=msg.reason)
        if self.state.get("current") is not None:
            self.state["current"] = None
            self._save()
        self._secret_path("payload.npz").unlink(missing_ok=True)
        drop_tensors(self.home, self.job_id)
        return Reply.query_reply(view)

    def _plan(self, p: int) -> protocol.PassPlan:
        if not hasattr(self, "_model"):
            self._model, self._pre = protocol.build_model(self.site_spec)
        return protocol.plan(self.site_spec, p, model=self._model)

    def _identity(self):
        from fedmtl.datasites.site import identity

        return identity.load(self.home)

    def _complete(self, p: int) -> None:
        self.state["completed"].append(p)
        self.state["current"] = None
        self._save()
        for name in ("payload.npz",):
            self._secret_path(name).unlink(missing_ok=True)
        if p == self.site_spec.schedule.last_pass:
            drop_tensors(self.home, self.job_id)
            site_ledger.finish_job(self.home, self.site_spec.to_dict())

    # -- stage 1: train / evaluate ---------------------------------------------
    def _advertise(self, data: Any, p: int, msg: Advertise) -> Reply:
        from fedmtl.models import model_to_vector
        from fedmtl.privacy.secagg import SiteSession

        plan = self._plan(p)
        model = self._model
        size = model_to_vector(model).size
        weights = msg.weights
        if not isinstance(weights, np.ndarray) or weights.shape != (size,):
            raise RoundError(
                f"weights must be a float array of shape ({size},) for this job's model; got "
                f"{type(weights).__name__} {getattr(weights, 'shape', '')}"
            )
        weights = weights.astype(np.float32)
        if not np.all(np.isfinite(weights)):
            raise RoundError("weights contain NaN or inf; refused")
        # bounded before any record is read: a function of the message and the policy only
        cap = self._max_abs_weight()
        biggest = float(np.max(np.abs(weights))) if weights.size else 0.0
        if biggest > cap:
            raise RoundError(
                f"weights: the largest |weight| is {biggest:.6g}, above this datasite's "
                f"limits.max_abs_weight {cap:g}; refused before any record was read (trained models "
                "stay far below it: send the job's global model)"
            )
        # the scaling of this pass: none for the statistics pass; the schema's ranges, or
        # the researcher's mean/std (checked, and pinned to the first pass that used them)
        if plan.stats:
            if msg.scaling is not None:
                raise RoundError(f"pass {p} is the statistics pass; it takes no 'scaling'")
            self._pass_pre = None
        else:
            try:
                self._pass_pre = protocol.scaling_preprocessor(self.site_spec, msg.scaling)
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
        attempt = msg.attempt  # an int >= 0 (parse_message)
        if resumed:
            # the researcher restarted this pass (e.g. after a crash): reuse the payload,
            # do not train or charge again; fresh secure-aggregation keys
            if attempt <= cur["attempt"]:
                raise RoundError(
                    f"pass {p} was already started as attempt {cur['attempt']}; a restart must "
                    "use a higher attempt number"
                )
        else:
            # the space the pass's payload needs is taken before the charge: a full disk
            # refuses the pass with nothing charged, instead of failing after it
            with self._reserved_payload(p, size) as store:
                payload, report = self._compute_payload(data, p, plan, weights)
                store(payload)
            self.state["last_report"] = report
            if os.environ.get(TEST_HOOK_ENV):
                hook = self.dir / "test-hook"
                hook.mkdir(exist_ok=True)
                np.savez(hook / f"pass-{p}.npz", **payload)
        self.state["current"] = {"pass": p, "attempt": attempt}
        ident = self._identity()
        params = protocol.secagg_params(self.site_spec, p, attempt, plan)
        session = SiteSession(params, site_id=self.site_spec.site, identity=ident.signing_key)
        advert = session.advertise_keys()
        self._write_secret("secagg.session", session.to_bytes())
        self._save()
        return Reply.stage_reply(advert, report=self.state.get("last_report", {}))

    def _compute_payload(self, data, p: int, plan: protocol.PassPlan, weights: np.ndarray):
        import pandas as pd

        if not isinstance(data, pd.DataFrame):
            raise RoundError(f"the records asset is a {type(data).__name__}, not a table")
        schema = self.site_spec.schema
        tasks = self.job.task_specs(schema)
        model = self._model
        pre = getattr(self, "_pass_pre", None) or self._pre  # checked in _advertise
        groups = protocol.groups_of(model)
        split = schema.split_column
        df = data
        train_df = df[df[split] == "train"] if split else df
        test_df = df[df[split] == "test"] if split else df
        # the entries this site keeps to itself (FedPer's heads) start from its own last pass
        personal = self._personal_mask(groups)
        heads_file = self._secret_path("heads.npy")
        start = weights.copy()
        if personal.any() and heads_file.exists():
            local = np.load(heads_file)
            start[personal] = local[personal]
        payload: dict[str, np.ndarray] = {}
        # no per-site figure (loss, counts, split sizes, exact metrics) leaves the site:
        # the report holds only what the approved spec already determines
        report: dict[str, Any] = {"pass": p}
        n = int(len(train_df))
        self._charge(p, n, plan)  # before anything is computed from the records
        # From here on the records are read. Whatever they hold, the reply is the same: each
        # release handles non-finite values inside its mechanism, and a release that fails
        # anyway is replaced by its null release (zero statistics, or noise alone, through
        # the same mechanism) of the same keys, shapes and dtypes; the error stays in this
        # site's log. See docs/compliance.md, "Outcomes that do not depend on the records".
        if plan.stats:
            payload["stats"] = self._guarded(
                "statistics", p, lambda: self._stats_release(schema, train_df), lambda: self._null_stats(schema))
            return self._conform(payload, plan), report
        if plan.evaluate:
            payload["metrics"] = self._guarded(
                "evaluation", p,
                lambda: self._eval_release(data, test_df, train_df, pre, tasks, start),
                lambda: self._null_metrics(tasks))
            if self.job.per_site_metrics and self._policy_allows_site_metrics():
                # the same noised, charged statistics, for this site alone (recalibrated on
                # its own calibration split, with their intervals)
                report["site_metrics"], _ = protocol.read_release(payload["metrics"], self.site_spec, n_sites=1)
        if plan.train:
            # the report's figures follow from the spec and the charged records alone
            report.update(self._train_report(n, weights))
            box: dict[str, Any] = {}
            payload["update"], payload["counts"] = self._guarded(
                "training", p,
                lambda: self._train_release(data, train_df, pre, tasks, start, weights, n, groups, box),
                lambda: self._null_update(tasks, start, weights, n, groups, box))
        return self._conform(payload, plan), report

    # -- the releases of a pass, and their null releases -----------------------------------
    def _guarded(self, what: str, p: int, release, null):
        """``release()``, or ``null()`` (logged here, never in the reply) if it raises."""
        try:
            return release()
        except Exception:  # noqa: BLE001 - whatever failed, the reply must not show it
            log.exception("job %s pass %s: the %s release failed; its null release was sent instead",
                          self.job_id, p, what)
            return null()

    def _stats_release(self, schema, train_df) -> np.ndarray:
        from fedmtl.privacy.stats_release import noise_statistics, site_statistics

        return noise_statistics(site_statistics(schema, train_df), schema,
                                noise_multiplier=float(self.job.stats_noise_multiplier))

    def _null_stats(self, schema) -> np.ndarray:
        from fedmtl.privacy.stats_release import noise_statistics, size

        return noise_statistics(np.zeros(size(schema)), schema, noise_multiplier=float(self.job.stats_noise_multiplier))

    def _eval_release(self, data, test_df, train_df, pre, tasks, start: np.ndarray) -> np.ndarray:
        import torch

        from fedmtl.models import vector_to_model
        from fedmtl.privacy.eval_release import noise_statistics

        model = self._model
        vector_to_model(model, start)
        # the training split's histograms only beside a test split of other records
        cal = protocol.calibrates(self.site_spec)
        tm = protocol.task_metrics(tasks, calibration=cal)
        for part, df in (("test", test_df), ("train", train_df)):
            if not len(df) or (part == "train" and not cal):
                continue
            Xt, Y, M = self._tensors(data, part, df, pre, tasks)
            with torch.no_grad():
                pred = model.predict(Xt)
            # NaN/inf scores (weights that overflow for some records) become valid scores
            # the same way for every record, before the metrics see them
            pred = finite_predictions(pred, tasks)
            if part == "test":
                protocol.update_metrics(tm, pred, Y, M, tasks)
            else:
                tm.update_calibration(pred, Y, M)
        return noise_statistics(protocol.metric_vector(tm), tasks, n_bins=protocol.N_BINS, calibration=cal,
                                noise_multiplier=float(self.job.eval_noise_multiplier))

    def _null_metrics(self, tasks) -> np.ndarray:
        from fedmtl.privacy.eval_release import noise_statistics

        cal = protocol.calibrates(self.site_spec)
        return noise_statistics(np.zeros(protocol.metric_size(tasks, calibration=cal)), tasks,
                                n_bins=protocol.N_BINS, calibration=cal,
                                noise_multiplier=float(self.job.eval_noise_multiplier))

    def _group_counts(self, M, tasks, groups) -> dict[str, int]:
        counts = {}
        Mn = M.numpy().astype(bool)
        for g in groups:
            if g == "trunk":
                counts[g] = int(Mn.any(axis=1).sum())
            else:
                j = [t.name for t in tasks].index(g)
                counts[g] = int(Mn[:, j].sum())
        return counts

    def _train_release(self, data, train_df, pre, tasks, start, weights, n, groups, box):
        from fedmtl.models import model_to_vector, vector_to_model

        model = self._model
        X, Y, M = self._tensors(data, "train", train_df, pre, tasks)
        box["counts"] = self._group_counts(M, tasks, groups)
        vector_to_model(model, start)
        config = DPTrainingConfig(**self._train_kwargs(n, weights))
        train(prepare(model=model, X=X, Y=Y, mask=M, tasks=tasks, config=config))
        delta = (model_to_vector(model) - start).astype(np.float64)
        return self._weighted_update(delta, start, groups, box["counts"])

    def _null_update(self, tasks, start, weights, n, groups, box):
        """The update DP-SGD sends when every sample is clipped to 0: its noise alone."""
        kw = self._train_kwargs(n, weights)
        delta = np.zeros(start.size)
        if self.job.dp and n >= 1:
            delta = noise_only_update(
                n_params=int(start.size), steps=int(kw["steps"]), n_samples=n, sample_rate=float(kw["sample_rate"]),
                lr=float(kw["lr"]), momentum=float(kw.get("momentum") or 0.0),
                noise_multiplier=float(kw["noise_multiplier"]), max_grad_norm=float(kw["max_grad_norm"]),
                fedprox_mu=float(kw.get("fedprox_mu") or 0.0),
                offset=(start.astype(np.float64) - weights.astype(np.float64)),
            )
        counts = box.get("counts") or {g: 0 for g in groups}
        return self._weighted_update(delta, start, groups, counts)

    def _weighted_update(self, delta: np.ndarray, start: np.ndarray, groups, counts):
        from fedmtl.privacy.quantization import weight_by_group

        # the final vector is finite whatever happened in training: a coordinate that is
        # not is 0 (no change), the same way every time
        delta = np.where(np.isfinite(delta), delta, 0.0)
        personal = self._personal_mask(groups)
        if personal.any():  # kept here for the next pass, never sent
            heads_file = self._secret_path("heads.npy")
            np.save(heads_file, (start.astype(np.float64) + delta).astype(np.float32))
            os.chmod(heads_file, 0o600)
            delta[personal] = 0.0
        return weight_by_group(delta, groups=groups, counts=counts, clip=float(self.job.secagg.clip))

    def _train_report(self, n: int, weights: np.ndarray) -> dict[str, Any]:
        """What the reply says about a training pass: the epsilon, noise multiplier and
        steps of the round as the spec and the charged records fix them (the values
        :func:`fedmtl.privacy.dp.train_local` reports), the same whether it ran or failed."""
        kw = self._train_kwargs(n, weights)
        nm = float(kw.get("noise_multiplier", 0.0))
        steps = int(kw["steps"])
        q, _ = effective_sample_rate(float(kw["sample_rate"]), n)
        delta = kw.get("delta")
        eps = epsilon_of([PrivacyRecord(nm, q, steps)], delta=delta, accountant=kw["accountant"]) \
            if delta is not None else None
        return {"epsilon_round": eps, "noise_multiplier": nm, "steps": steps}

    @staticmethod
    def _conform(payload: dict[str, np.ndarray], plan: protocol.PassPlan) -> dict[str, np.ndarray]:
        """The payload checked against the pass plan (exactly its names and shapes) and
        made finite: an entry that is not becomes 0. Raises RuntimeError on a mismatch
        with the plan (a function of the spec alone, never of the records)."""
        if sorted(payload) != sorted(plan.names):
            raise RuntimeError(f"payload {sorted(payload)} does not match the pass plan {sorted(plan.names)}")
        out = {}
        for name, shape in zip(plan.names, plan.shapes):
            arr = np.asarray(payload[name])
            if arr.shape != tuple(shape):
                raise RuntimeError(f"payload {name!r} has shape {arr.shape}; the pass plan says {tuple(shape)}")
            out[name] = np.where(np.isfinite(arr), arr, 0.0).astype(arr.dtype, copy=False)
        return out

    def _max_abs_weight(self) -> float:
        """``limits.max_abs_weight`` of this datasite's current policy (the default in a
        researcher's dry-run home, which has no ledger)."""
        if (self.home / DRY_RUN_MARKER).exists():
            return float(Policy.max_abs_weight)
        return float(site_ledger.current_policy(self.home).max_abs_weight)

    def _tensors(self, data, part: str, df, pre, tasks):
        """(X, Y, M) of one split, preprocessed once per job: kept in this process's memory
        while the same records object (the data plane holds it for the server's lifetime)
        and the same scaling come back, dropped when the job's last pass completes."""
        key = (str(self.home), self.job_id, part, id(data), _scaling_key(pre), tuple(t.name for t in tasks))
        with _TENSORS_LOCK:
            hit = _TENSORS.get(key)
            if hit is not None and hit[0] is data:
                return hit[1]
        X = pre.transform(df)
        Y, M = pre.labels(df, tasks)
        with _TENSORS_LOCK:
            _TENSORS[key] = (data, (X, Y, M))
            while len(_TENSORS) > _TENSOR_SLOTS:
                _TENSORS.pop(next(iter(_TENSORS)))
        return X, Y, M

    def _charge(self, p: int, n_train: int, plan: protocol.PassPlan) -> None:
        """Charge the pass's privacy records to the ledger before it runs (raises, and
        nothing is computed, when the ledger refuses)."""
        if not (plan.train or plan.evaluate or plan.stats):
            return
        records = self.job.pass_records(n_train, p)
        if plan.train and not self.job.dp:
            records = []  # the ledger refuses non-private training on a datasite
        site_ledger.charge_pass(self.home, self.site_spec.to_dict(), p, records)
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

    def _personal_mask(self, groups) -> np.ndarray:
        """The entries the job's strategy keeps at this site (none unless it personalises)."""
        return make_strategy(self.job.strategy).personal_mask(groups)

    def _policy_allows_site_metrics(self) -> bool:
        return site_ledger.site_metrics_allowed(self.home)


class LocalTransport:
    """A :class:`fedmtl.contract.transport.Transport` that runs the round runtime in this
    process (the dry run, the simulator, a hospital's local run).

    Args:
        data: site -> the records it trains on (mock or local).
        site_specs: site -> the site spec syft would bind for it.
    """

    def __init__(self, data: Mapping[str, Any], site_specs: Mapping[str, dict]):
        self.data = dict(data)
        self.site_specs = dict(site_specs)

    def call(self, site: str, message: Mapping[str, Any]) -> dict[str, Any]:
        """Handle one stage's ``message`` as ``site`` would; its reply (``{"ok": False, ...}``
        when the runtime refuses, see :func:`handle`).

        Raises:
            KeyError: ``site`` is not one this transport was made with.
        """
        return handle(data=self.data[site], spec=self.site_specs[site], message=message)
