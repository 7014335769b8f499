"""Asynchronous, incremental pipeline checkpoints: the partitions fold on while a commit
uploads, one commit is in flight at a time, a failed background commit fails the run and
the next run resumes from the last one that landed, and deltas chain to bounded fulls."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore import exceptions as obs_errors
from obstore.store import MemoryStore

from streamstate import (
    CheckpointError,
    ObjectStoreCheckpointer,
    StreamStateError,
)
from streamstate.pipeline import ArraySource, Batch, CheckpointStats, Pipeline
from streamstate.pipeline.checkpoints import DeltaChain, summarize_checkpoints
from streamstate.storage import CheckpointStorage, PutMode


def _events(rows: int, keys: int = 50, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    # Integer-valued floats: every summation order gives the same sums, exactly.
    return ArraySource(
        "events",
        {"k": rng.integers(0, keys, rows), "v": rng.integers(-50, 50, rows).astype(np.float64)},
    )


def _hot_events(loaded: int, rows: int, hot: int = 10) -> ArraySource:
    """``loaded`` keys once each, then ``rows - loaded`` events over ``hot`` of them: a
    first full checkpoint holding every key, and small deltas after it."""
    rng = np.random.default_rng(loaded)
    keys = np.concatenate([np.arange(loaded), rng.integers(0, hot, rows - loaded)])
    return ArraySource("events", {"k": keys, "v": rng.integers(-50, 50, rows).astype(float)})


def _expected(source: ArraySource, end: int | None = None) -> pd.DataFrame:
    batch = source.read(0, len(source) if end is None else end)
    columns = {"k": np.zeros(0, np.int64), "v": np.zeros(0)} if batch is None else batch.columns
    frame = pd.DataFrame({"k": columns["k"], "v": columns["v"]})
    return frame.groupby("k")["v"].agg(["count", "sum", "min", "max"]).sort_index()


def _actual(pipe: Pipeline) -> pd.DataFrame:
    results = pipe.results("v")
    frame = pd.DataFrame({name: results[name] for name in ("count", "sum", "min", "max")})
    frame.index = pd.Index(results["key"], name="k")
    return frame.sort_index()


def _assert_one_shot(pipe: Pipeline, source: ArraySource, end: int | None = None) -> None:
    expected, actual = _expected(source, end), _actual(pipe)
    assert list(actual.index) == list(expected.index)
    for column in ("count", "sum", "min", "max"):
        assert np.array_equal(actual[column].to_numpy(), expected[column].to_numpy()), column


def _is_artifact(path: str) -> bool:
    return "/operators/aggregates/" in path


class GatedStorage(CheckpointStorage):
    """A real store whose state-artifact uploads wait until :attr:`gate` opens, after
    signalling :attr:`uploading`: lets a test watch the pipeline while a commit is stuck."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.uploading = threading.Event()
        self.gate = threading.Event()

    def put(self, path: str, data: Any, *, mode: PutMode = "overwrite") -> Any:
        if _is_artifact(path):
            self.uploading.set()
            assert self.gate.wait(timeout=60), "the test never opened the gate"
        return super().put(path, data, mode=mode)


def test_partitions_fold_on_while_a_commit_uploads(tmp_path: Path) -> None:
    source = _events(40_000)
    storage = GatedStorage(tmp_path / "store")
    pipe = Pipeline(source, key="k", values="v", store=storage, batch_size=1_000,
                    checkpoint_every=10)
    seen: list[tuple[int, int]] = []  # (batch end offset, committed offset) while stuck
    held = 0.2

    def on_batch(batch: Batch) -> None:
        if batch.next_offset > 10_000 and not storage.gate.is_set():
            assert storage.uploading.wait(timeout=30)  # the first commit has begun uploading
            seen.append((batch.next_offset, pipe.committed_offset))
            if len(seen) == 3:  # folded three batches past the barrier, commit still stuck
                time.sleep(held)
                storage.gate.set()

    report = pipe.run(on_batch=on_batch)
    assert report.finished and report.events == 40_000
    # The first checkpoint (offset 10,000) was uploading while batches 11..13 were read,
    # routed and handed on; it was not committed while they were.
    assert [end for end, _ in seen] == [11_000, 12_000, 13_000]
    assert all(committed == 0 for _, committed in seen)
    first = report.checkpoints[0]
    assert first.offset == 10_000 and first.upload_seconds >= held
    assert first.stall_seconds < first.upload_seconds
    assert first.seconds >= first.stall_seconds + held
    assert [c.offset for c in report.checkpoints] == [10_000, 20_000, 30_000, 40_000]
    assert pipe.committed_offset == pipe.offset == 40_000 and pipe.epoch == 4
    _assert_one_shot(pipe, source)
    # run() returned after the final commit landed: a fresh pipeline resumes at the end.
    again = Pipeline(source, key="k", values="v", store=tmp_path / "store")
    assert again.recover() == 40_000
    _assert_one_shot(again, source)


def test_a_checkpoint_due_while_one_is_in_flight_is_deferred_until_it_lands(
    tmp_path: Path,
) -> None:
    source = _events(40_000)
    storage = GatedStorage(tmp_path / "store")
    pipe = Pipeline(source, key="k", values="v", store=storage, batch_size=1_000,
                    checkpoint_every=5, defer_busy_checkpoints=True)
    seen: list[int] = []

    def on_batch(batch: Batch) -> None:
        if batch.next_offset == 17_000:
            # The first checkpoint (5,000) is stuck; the one due at 10,000 did not stop the
            # partitions (waiting would never get here, the gate opens only now).
            seen.append(pipe.committed_offset)
            storage.gate.set()

    report = pipe.run(on_batch=on_batch)
    assert seen == [0]
    offsets = [c.offset for c in report.checkpoints]
    assert offsets[0] == 5_000 and offsets[1] > 17_000 and offsets[-1] == 40_000
    apart = [b - a for a, b in itertools.pairwise(offsets)]
    assert all(gap >= 5_000 for gap in apart[:-1])  # the final checkpoint may come sooner
    assert report.deferred_checkpoints >= 1
    assert [c.epoch for c in report.checkpoints] == list(range(1, len(offsets) + 1))
    assert pipe.committed_offset == 40_000
    _assert_one_shot(pipe, source)
    again = Pipeline(source, key="k", values="v", store=tmp_path / "store")
    assert again.recover() == 40_000
    _assert_one_shot(again, source)
    with pytest.raises(TypeError, match="defer_busy_checkpoints"):
        Pipeline(source, key="k", values="v", store=MemoryStore(),
                 defer_busy_checkpoints=1)  # type: ignore[arg-type]


class InFlightStorage(CheckpointStorage):
    """Records how many checkpoints have artifacts uploaded but no manifest yet, at most;
    uploads are slowed so that a coordinator racing ahead would be caught."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.lock = threading.Lock()
        self.open: set[str] = set()
        self.most_open = 0
        self.manifests = 0

    def put(self, path: str, data: Any, *, mode: PutMode = "overwrite") -> Any:
        checkpoint = path.split("/")[1]
        if _is_artifact(path):
            with self.lock:
                self.open.add(checkpoint)
                self.most_open = max(self.most_open, len(self.open))
            time.sleep(0.02)
        result = super().put(path, data, mode=mode)
        if path.endswith("/manifest.json"):
            with self.lock:
                self.open.discard(checkpoint)
                self.manifests += 1
        return result


def test_at_most_one_commit_is_in_flight(tmp_path: Path) -> None:
    source = _events(30_000)
    storage = InFlightStorage(tmp_path / "store")
    pipe = Pipeline(source, key="k", values="v", store=storage, batch_size=500,
                    checkpoint_every=1, full_checkpoint_every=3)
    report = pipe.run()
    assert len(report.checkpoints) == 60 == storage.manifests
    assert storage.most_open == 1 and not storage.open
    # Each barrier waited for the commit before it: the epochs landed in order.
    assert [c.epoch for c in report.checkpoints] == list(range(1, 61))
    assert report.commit_wait_seconds > 0
    _assert_one_shot(pipe, source)


class FailingStorage(CheckpointStorage):
    """Fails, permanently, the upload of the state artifact of the ``fail_at``-th
    checkpoint (counting from 1) and of every later one while :attr:`broken`."""

    def __init__(self, store: Any, fail_at: int) -> None:
        super().__init__(store)
        self.fail_at = fail_at
        self.uploads = 0
        self.broken = True

    def put(self, path: str, data: Any, *, mode: PutMode = "overwrite") -> Any:
        if _is_artifact(path):
            self.uploads += 1
            if self.broken and self.uploads >= self.fail_at:
                raise obs_errors.PermissionDeniedError(f"injected: no writing {path}")
        return super().put(path, data, mode=mode)


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_a_failed_background_commit_fails_the_run_and_the_next_resumes_exactly(
    tmp_path: Path, fail_at: int
) -> None:
    source = _events(20_000)
    storage = FailingStorage(tmp_path / "store", fail_at)
    pipe = Pipeline(source, key="k", values="v", store=storage, batch_size=1_000,
                    checkpoint_every=3, full_checkpoint_every=2)
    with pytest.raises(CheckpointError, match="injected"):
        pipe.run()
    # Nothing after the last checkpoint that landed counts: the state is gone from memory.
    landed = fail_at - 1
    assert pipe.epoch == 0 and pipe.committed_offset == 0 and pipe.offset == 0
    checkpointer = ObjectStoreCheckpointer(tmp_path / "store")
    assert len(checkpointer.list_checkpoints()) == landed
    storage.broken = False
    report = pipe.run()
    assert report.recovered_epoch == (landed or None)
    assert report.start_offset == 3_000 * landed
    assert report.events == 20_000 - 3_000 * landed
    _assert_one_shot(pipe, source)


def test_a_commit_failing_after_the_source_ended_fails_the_run(tmp_path: Path) -> None:
    source = _events(5_000)
    storage = FailingStorage(tmp_path / "store", fail_at=3)
    pipe = Pipeline(source, key="k", values="v", store=storage, batch_size=1_000,
                    checkpoint_every=2)
    with pytest.raises(CheckpointError, match="injected"):
        pipe.run()  # epochs 1 and 2 land; the final one, over offset 5,000, fails
    storage.broken = False
    report = pipe.run()
    assert report.recovered_epoch == 2 and report.start_offset == 4_000
    assert [c.offset for c in report.checkpoints] == [5_000]
    _assert_one_shot(pipe, source)


def test_a_failing_partition_waits_for_the_commit_in_flight(tmp_path: Path) -> None:
    keys = np.arange(6_000) % 7
    values = np.ones(6_000)
    values[5_500] = np.nan  # the partition holding key 5_500 % 7 raises on it
    source = ArraySource("events", {"k": keys, "v": values})
    storage = GatedStorage(tmp_path / "store")
    pipe = Pipeline(source, key="k", values="v", store=storage, batch_size=500,
                    checkpoint_every=10, nan_policy="raise")
    opener = threading.Timer(0.3, storage.gate.set)
    opener.start()
    try:
        with pytest.raises(StreamStateError, match="partition"):
            pipe.run()
    finally:
        opener.cancel()
    # run() raised only after the checkpoint stuck in flight had landed, so a next run
    # cannot race it, and that next run resumes from it.
    assert storage.gate.is_set()
    assert len(ObjectStoreCheckpointer(tmp_path / "store").list_checkpoints()) == 1
    assert pipe.recover() == 5_000


def test_checkpoint_stats_are_reported_and_summarized(tmp_path: Path) -> None:
    source = _events(12_000)
    pipe = Pipeline(source, key="k", values="v", store=tmp_path, batch_size=1_000,
                    checkpoint_every=2, full_checkpoint_every=3)
    report = pipe.run()
    assert len(report.checkpoints) == 6
    for stats in report.checkpoints:
        assert stats.stall_seconds >= 0 and stats.upload_seconds > 0
        assert stats.seconds >= stats.upload_seconds
    assert report.delta_checkpoints == sum(c.is_delta for c in report.checkpoints)
    assert report.stall_seconds == pytest.approx(sum(c.stall_seconds for c in report.checkpoints))
    assert report.upload_seconds == pytest.approx(
        sum(c.upload_seconds for c in report.checkpoints)
    )
    summary = report.checkpoint_summary()
    assert summary.startswith(f"6 checkpoints ({report.delta_checkpoints} delta, ")
    assert "stalled" in summary and "upload" in summary
    assert summarize_checkpoints([]) == "no checkpoints"
    # The manifests carry the partition count for `checkpoints list`.
    checkpointer = ObjectStoreCheckpointer(tmp_path)
    for cid in checkpointer.list_checkpoints():
        assert checkpointer.load_manifest(cid).metadata == {"partitions": 2}


def test_delta_chain_rule() -> None:
    chain = DeltaChain(full_every=3)
    assert not chain.next_is_delta()  # nothing to build on yet
    kinds = []
    for number in range(7):
        is_delta = chain.next_is_delta()
        kinds.append(is_delta)
        chain.committed(f"id-{number}", is_delta, 100 if not is_delta else 10)  # type: ignore[arg-type]
    assert kinds == [False, True, True, False, True, True, False]
    # Deltas that outgrow their full end the chain early.
    chain = DeltaChain(full_every=100)
    chain.committed("full", False, 100)  # type: ignore[arg-type]
    chain.committed("d1", True, 60)  # type: ignore[arg-type]
    assert chain.next_is_delta()
    chain.committed("d2", True, 60)  # type: ignore[arg-type]
    assert not chain.next_is_delta()
    assert "length=2" in repr(chain)
    chain.reset()
    assert not chain.next_is_delta() and chain.parent is None
    # A restored chain goes on where it ended.
    chain = DeltaChain(full_every=4)
    chain.resume("restored", full_bytes=100, delta_bytes=20, length=2)  # type: ignore[arg-type]
    assert chain.next_is_delta() and chain.parent == "restored"
    chain.committed("d3", True, 10)  # type: ignore[arg-type]
    assert not chain.next_is_delta()  # 1 full + 3 deltas: the next one is full


def test_full_checkpoint_every_is_validated() -> None:
    with pytest.raises(ValueError, match="full_checkpoint_every"):
        Pipeline(_events(10), key="k", values="v", store=MemoryStore(), full_checkpoint_every=0)
    with pytest.raises(TypeError, match="full_checkpoint_every"):
        Pipeline(_events(10), key="k", values="v", store=MemoryStore(),
                 full_checkpoint_every=2.5)  # type: ignore[arg-type]
    pipe = Pipeline(_events(10), key="k", values="v", store=MemoryStore(),
                    full_checkpoint_every=4)
    assert pipe.full_checkpoint_every == 4


def test_checkpoints_are_deltas_between_bounded_fulls(tmp_path: Path) -> None:
    source = _hot_events(1_000, 20_000)
    pipe = Pipeline(source, key="k", values="v", store=tmp_path, batch_size=500,
                    checkpoint_every=2, full_checkpoint_every=4, keep_checkpoints=2)
    report = pipe.run()
    kinds = [c.is_delta for c in report.checkpoints]
    assert kinds[:8] == [False, True, True, True, False, True, True, True]
    checkpointer = ObjectStoreCheckpointer(tmp_path)
    newest = checkpointer.list_checkpoints()[-1]
    recovered = checkpointer.recover(rebuild=False)
    assert recovered is not None and recovered.checkpoint_id == newest
    last_full = len(kinds) - 1 - kinds[::-1].index(False)
    assert recovered.delta_count == len(kinds) - 1 - last_full
    # Pruning kept the two newest and every checkpoint their chains need, no more.
    assert len(checkpointer.list_checkpoints()) == max(2, recovered.delta_count + 1)
    again = Pipeline(source, key="k", values="v", store=tmp_path)
    assert again.recover() == 20_000
    _assert_one_shot(again, source)


def test_a_restarted_pipeline_continues_the_recovered_chain(tmp_path: Path) -> None:
    source = _hot_events(1_000, 12_000)
    common: dict[str, Any] = {"key": "k", "values": "v", "store": tmp_path, "batch_size": 500,
                              "checkpoint_every": 2, "full_checkpoint_every": 5}
    first = Pipeline(source, **common).run(max_batches=7)  # dies after batch 7
    assert [c.is_delta for c in first.checkpoints] == [False, True, True]
    survivor = Pipeline(source, **common)
    report = survivor.run()
    assert report.recovered_epoch == 3 and report.start_offset == 3_000
    # Deltas on the recovered chain (2 so far), a full once it holds 4, and so on.
    kinds = [c.is_delta for c in report.checkpoints]
    assert kinds[:5] == [True, True, False, True, True]
    _assert_one_shot(survivor, source)
    again = Pipeline(source, **common)
    assert again.recover() == 12_000
    _assert_one_shot(again, source)


def test_a_delta_checkpoint_of_one_changed_key_is_small(tmp_path: Path) -> None:
    keys = np.concatenate([np.arange(20_000), np.zeros(1_000, dtype=np.int64)])
    source = ArraySource("events", {"k": keys, "v": np.ones(21_000)})
    pipe = Pipeline(source, key="k", values="v", store=tmp_path, batch_size=1_000,
                    checkpoint_every=20)
    report = pipe.run()
    full, delta = report.checkpoints
    assert not full.is_delta and delta.is_delta
    assert delta.bytes * 20 < full.bytes


@settings(max_examples=25)
@given(
    rows=st.integers(0, 3_000),
    batch_size=st.integers(50, 700),
    checkpoint_every=st.integers(1, 4),
    full_every=st.integers(1, 4),
    crashes=st.lists(
        st.tuples(st.sampled_from(["cut", "fail"]), st.integers(1, 12)), max_size=4
    ),
    partitions=st.integers(1, 3),
)
def test_any_cadence_and_crash_points_give_the_one_shot_group_by(
    rows: int,
    batch_size: int,
    checkpoint_every: int,
    full_every: int,
    crashes: list[tuple[str, int]],
    partitions: int,
) -> None:
    source = _events(rows, keys=40, seed=rows)
    store = MemoryStore()
    common: dict[str, Any] = {"key": "k", "values": "v", "batch_size": batch_size,
                              "checkpoint_every": checkpoint_every,
                              "full_checkpoint_every": full_every, "partitions": partitions}
    for kind, at in crashes:
        if kind == "cut":  # the process dies after `at` batches: memory lost, store kept
            Pipeline(source, store=store, **common).run(max_batches=at)
        else:  # the `at`-th state upload fails: the run raises, the same object retries
            storage = FailingStorage(store, fail_at=at)
            pipe = Pipeline(source, store=storage, **common)
            try:
                pipe.run()
            except CheckpointError as exc:
                assert "injected" in str(exc)
            storage.broken = False
            pipe.run()
            _assert_one_shot(pipe, source)
    survivor = Pipeline(source, store=store, **common)
    report = survivor.run()
    assert report.finished and survivor.committed_offset == rows
    assert all(isinstance(c, CheckpointStats) for c in report.checkpoints)
    _assert_one_shot(survivor, source)
