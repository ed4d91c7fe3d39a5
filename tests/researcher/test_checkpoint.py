"""CheckpointStore: atomic per-round checkpoints and the resume checks."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from fedmtl.contract.strategies import FedAdam
from fedmtl.errors import ConfigError
from fedmtl.researcher.checkpoint import CheckpointStore

HASH = "ab" * 32
OTHER = "cd" * 32
GROUPS = {"trunk": [slice(0, 4)], "a": [slice(4, 6)]}


def _state(round: int, **kw):
    st = {
        "global_vector": np.arange(6, dtype=np.float32) + round,
        "spec_hash": HASH,
        "metrics": [{"round": r, "pooled": {"a": {"auroc": 0.5 + r / 10}}} for r in range(1, round + 1)],
        "epsilon": {"st-mary": 0.4 * round, "general": 0.5 * round},
        "site_status": {"st-mary": "ok", "general": "ok"},
    }
    st.update(kw)
    return st


def test_empty_store_has_no_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    assert store.latest() is None
    assert store.rounds() == [] and store.progress() is None


def test_save_and_latest_round_trip(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)
    adam = FedAdam()
    adam.aggregate_fit(np.zeros(6, dtype=np.float32), np.ones(6), {"trunk": 1, "a": 1}, groups=GROUPS)
    # Execute
    store.save(1, _state(1))
    store.save(2, _state(2, strategy_state=adam.state_dict(), rounds_total=3, note="hello"))
    ck = store.latest(spec_hash=HASH)
    # Assert
    assert ck is not None and ck.round == 2 and ck.spec_hash == HASH
    np.testing.assert_array_equal(ck.global_vector, np.arange(6, dtype=np.float32) + 2)
    assert ck.global_vector.dtype == np.float32
    assert ck.epsilon == {"st-mary": 0.8, "general": 1.0}
    assert ck.site_status == {"st-mary": "ok", "general": "ok"}
    assert [m["round"] for m in ck.metrics] == [1, 2]
    assert ck.extra == {"rounds_total": 3, "note": "hello"}
    restored = FedAdam()
    restored.load_state_dict(ck.strategy_state)
    np.testing.assert_array_equal(restored.m, adam.m)
    np.testing.assert_array_equal(restored.v, adam.v)
    assert restored.rounds_applied == 1


def test_progress_json_for_humans(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(2, _state(2, rounds_total=5))
    prog = json.loads((tmp_path / "progress.json").read_text())
    assert prog["round"] == 2 and prog["rounds_total"] == 5
    assert prog["epsilon"] == {"st-mary": 0.8, "general": 1.0}
    assert prog["last_metrics"]["round"] == 2
    assert prog["checkpoint"] == "round-000002.npz"
    assert store.progress() == prog


def test_resume_with_another_spec_is_refused(tmp_path):
    # Prepare
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1))
    # Execute / Assert
    with pytest.raises(ConfigError, match="spec changed since it was saved"):
        store.latest(spec_hash=OTHER)
    with pytest.raises(ConfigError, match="spec hash"):
        store.save(2, _state(2, spec_hash=OTHER))
    assert store.rounds() == [1]


def test_a_round_is_never_saved_twice(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(3, _state(3))
    with pytest.raises(ValueError, match="not after the last saved round 3.*continue with round 4"):
        store.save(3, _state(3))
    with pytest.raises(ValueError, match="not after"):
        store.save(2, _state(2))


def test_bad_state_writes_nothing(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(ValueError, match="lacks"):
        store.save(1, {"global_vector": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="finite"):
        store.save(1, _state(1, global_vector=np.array([0.0, np.nan], dtype=np.float32)))
    with pytest.raises(TypeError, match="not JSON-able"):
        store.save(1, _state(1, handle=object()))
    assert not (tmp_path / "ck").exists() or list((tmp_path / "ck").iterdir()) == []


def test_crash_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # Prepare
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        store.save(2, _state(2))
    monkeypatch.undo()
    # Assert: round 1 intact, no half-written or temporary files
    assert store.latest().round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json", "round-000001.npz"]


def test_damaged_latest_is_refused_not_skipped(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1))
    store.save(2, _state(2))
    (tmp_path / "round-000002.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="damaged.*already run round 2"):
        store.latest()


def test_keep_prunes_old_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for r in range(1, 5):
        store.save(r, _state(r))
    assert store.rounds() == [3, 4]
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


def test_infinite_epsilon_and_nan_metrics_survive(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _state(1, epsilon={"a": math.inf}, metrics=[{"round": 1, "pooled": {"a": {"auroc": math.nan}}}]))
    ck = store.latest()
    assert math.isinf(ck.epsilon["a"])
    assert math.isnan(ck.metrics[0]["pooled"]["a"]["auroc"])
