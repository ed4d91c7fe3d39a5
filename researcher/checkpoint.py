"""Checkpoints of a running job, one per completed round, written atomically.

A checkpoint is one ``.npz`` file, ``round-000003.npz``, holding the global vector, the
strategy's arrays (``strategy/<key>``) and a JSON document (``meta``) with everything
else: the round, the spec hash, the strategy's other state, the metrics history, the
epsilon spent per site, the per-site status and any extra JSON-able entries. It is
written to a temporary file in the same folder, flushed and fsync'ed, then moved into
place with :func:`os.replace` (and the folder fsync'ed), so a crash leaves either the
previous checkpoints or the new one, never half a file. :meth:`CheckpointStore.latest`
reads the highest round (and refuses a damaged one rather than silently falling back).

A store belongs to one job: saving or resuming with another spec hash raises
:class:`~fedmtl.errors.ConfigError` (start a new folder for a changed spec).

``progress.json`` (also atomic) says where the job stands, for humans and dashboards.

This module imports neither syft nor torch.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedmtl.errors import ConfigError
from fedmtl.fsutil import atomic_write_bytes

__all__ = ["Checkpoint", "CheckpointStore", "atomic_write_bytes"]

_NAME = re.compile(r"^round-(\d{6,})\.npz$")
_KNOWN = ("global_vector", "spec_hash", "strategy_state", "metrics", "epsilon", "site_status")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-able: {o!r}")


def _dumps(obj: Any) -> str:
    # NaN / inf are allowed (an epsilon without DP is inf; a metric of an empty split is NaN)
    return json.dumps(obj, default=_json_default, sort_keys=True)


@dataclass
class Checkpoint:
    """One completed round's state."""

    round: int
    spec_hash: str
    global_vector: np.ndarray
    strategy_state: dict[str, Any] = field(default_factory=dict)
    metrics: list[Any] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    site_status: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    saved_at: float = 0.0
    path: Path | None = None

    def check_spec(self, spec_hash: str) -> "Checkpoint":
        """Raise :class:`ConfigError` unless this checkpoint belongs to ``spec_hash``."""
        if spec_hash != self.spec_hash:
            raise ConfigError(
                f"checkpoint {self.path or ''} (round {self.round}) belongs to a job with spec hash "
                f"{self.spec_hash[:12]}..., not {spec_hash[:12]}...: the spec changed since it was saved. "
                "Resume with the original spec, or start the changed job in a new output folder."
            )
        return self


class CheckpointStore:
    """Checkpoints of one job in folder ``directory`` (created if needed).

    ``keep``: how many of the newest checkpoints to keep (``None`` keeps all).
    """

    def __init__(self, directory: str | Path, *, keep: int | None = 3) -> None:
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep

    # -- listing --------------------------------------------------------------------------
    def rounds(self) -> list[int]:
        """Rounds with a checkpoint file, ascending."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def path_of(self, round: int) -> Path:
        return self.directory / f"round-{round:06d}.npz"

    # -- writing --------------------------------------------------------------------------
    def save(self, round: int, state: Mapping[str, Any]) -> Path:
        """Save the state after completed round ``round`` (rounds only move forward).

        ``state`` needs ``global_vector`` (1-d finite array) and ``spec_hash``; it may hold
        ``strategy_state`` (dict of JSON-able values and numpy arrays), ``metrics``
        (history, JSON-able), ``epsilon`` ({site: float}), ``site_status`` ({site: ...}) and
        any other JSON-able entries (kept in ``Checkpoint.extra``). Everything is checked
        and serialised before anything is written.
        """
        if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
            raise ValueError(f"round must be a whole number >= 0, got {round!r}")
        round = int(round)
        missing = [k for k in ("global_vector", "spec_hash") if k not in state]
        if missing:
            raise ValueError(f"checkpoint state lacks {missing}")
        spec_hash = state["spec_hash"]
        if not isinstance(spec_hash, str) or not spec_hash:
            raise ValueError(f"spec_hash must be a non-empty string, got {spec_hash!r}")
        vec = np.asarray(state["global_vector"])
        if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.floating) or not np.all(np.isfinite(vec)):
            raise ValueError("global_vector must be a 1-d float array of finite values")
        prev = self.latest()
        if prev is not None:
            prev.check_spec(spec_hash)
            if round <= prev.round:
                raise ValueError(
                    f"round {round} is not after the last saved round {prev.round}; a completed round is "
                    f"never saved twice (continue with round {prev.round + 1})"
                )
        strat = dict(state.get("strategy_state") or {})
        arrays = {f"strategy/{k}": np.asarray(v) for k, v in strat.items() if isinstance(v, np.ndarray)}
        meta = {
            "format": 1,
            "round": round,
            "spec_hash": spec_hash,
            "saved_at": time.time(),
            "strategy_state": {k: v for k, v in strat.items() if not isinstance(v, np.ndarray)},
            "strategy_arrays": sorted(k.split("/", 1)[1] for k in arrays),
            "metrics": list(state.get("metrics") or []),
            "epsilon": dict(state.get("epsilon") or {}),
            "site_status": dict(state.get("site_status") or {}),
            "extra": {k: v for k, v in state.items() if k not in _KNOWN},
        }
        meta_text = _dumps(meta)  # raises TypeError before writing if something is not JSON-able
        buf = io.BytesIO()
        np.savez(buf, global_vector=vec, meta=np.frombuffer(meta_text.encode("utf-8"), dtype=np.uint8), **arrays)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_of(round)
        atomic_write_bytes(path, buf.getvalue())
        self._write_progress(meta, vec.size)
        self._prune()
        return path

    def _write_progress(self, meta: Mapping[str, Any], size: int) -> None:
        last_metrics = meta["metrics"][-1] if meta["metrics"] else None
        progress = {
            "round": meta["round"],
            "rounds_total": meta["extra"].get("rounds_total"),
            "spec_hash": meta["spec_hash"],
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(meta["saved_at"])),
            "epsilon": meta["epsilon"],
            "site_status": meta["site_status"],
            "last_metrics": last_metrics,
            "n_parameters": size,
            "checkpoint": self.path_of(meta["round"]).name,
        }
        atomic_write_bytes(self.directory / "progress.json",
                           (json.dumps(progress, default=_json_default, indent=2) + "\n").encode("utf-8"))

    def _prune(self) -> None:
        if self.keep is None:
            return
        for r in self.rounds()[: -self.keep]:
            try:
                self.path_of(r).unlink()
            except FileNotFoundError:
                pass

    # -- reading --------------------------------------------------------------------------
    def load(self, round: int) -> Checkpoint:
        """The checkpoint of ``round``; ``FileNotFoundError`` if none, ``ConfigError`` if
        the file is damaged."""
        path = self.path_of(round)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                vec = np.array(z["global_vector"])
                arrays = {k: np.array(z[f"strategy/{k}"]) for k in meta.get("strategy_arrays", [])}
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ConfigError(f"checkpoint {path} is damaged and cannot be read: {e}") from e
        if meta.get("round") != round:
            raise ConfigError(f"checkpoint {path} says it is round {meta.get('round')}, not {round}")
        return Checkpoint(
            round=int(meta["round"]),
            spec_hash=meta["spec_hash"],
            global_vector=vec,
            strategy_state={**meta.get("strategy_state", {}), **arrays},
            metrics=meta.get("metrics", []),
            epsilon={k: float(v) for k, v in meta.get("epsilon", {}).items()},
            site_status=meta.get("site_status", {}),
            extra=meta.get("extra", {}),
            saved_at=float(meta.get("saved_at", 0.0)),
            path=path,
        )

    def latest(self, *, spec_hash: str | None = None) -> Checkpoint | None:
        """The newest readable checkpoint, or ``None``. With ``spec_hash`` it must belong to
        that spec (:class:`ConfigError` otherwise): that is the resume check."""
        rounds = self.rounds()
        if not rounds:
            return None
        try:
            ck = self.load(rounds[-1])
        except ConfigError as e:
            # never fall back silently: the sites have already run (and charged) that round
            raise ConfigError(
                f"{e}. Writes are atomic, so something else changed the file. The datasites have "
                f"already run round {rounds[-1]} and will refuse to run it again; restore the file "
                "or start the job afresh in a new folder."
            ) from e
        if spec_hash is not None:
            ck.check_spec(spec_hash)
        return ck

    def progress(self) -> dict[str, Any] | None:
        """The contents of ``progress.json``, or ``None`` before the first save."""
        p = self.directory / "progress.json"
        if not p.is_file():
            return None
        return json.loads(p.read_text(encoding="utf-8"))
