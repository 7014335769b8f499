"""What a pipeline resumes from: its own default location, its job fingerprint, and
checkpoints written by anything else (refused clearly, never half-read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pytest
from obstore.store import MemoryStore

from streamstate import (
    IncompatibleCheckpointError,
    NumericAggregateStore,
    ObjectStoreCheckpointer,
    decode_batch,
    encode_batch,
)
from streamstate._core import RecordBuffer
from streamstate.pipeline import ArraySource, Batch, JobFingerprint, JobRecord, Pipeline
from streamstate.pipeline.contents import STORE_ENTRY


class CountingSource:
    """An ArraySource that counts how often it is read."""

    def __init__(self, inner: ArraySource) -> None:
        self.inner = inner
        self.reads = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def read(self, offset: int, max_rows: int) -> Batch | None:
        self.reads += 1
        return self.inner.read(offset, max_rows)


def _events(rows: int = 100, name: str = "events") -> ArraySource:
    rng = np.random.default_rng(rows)
    return ArraySource(name, {"k": rng.integers(0, 9, rows), "j": rng.integers(0, 3, rows),
                              "v": rng.normal(0, 1, rows), "w": rng.normal(0, 1, rows)})


def _objects(store: Any) -> dict[str, bytes]:
    paths = [meta["path"] for meta in obstore.list(store).collect()]
    return {p: bytes(obstore.get(store, p).bytes()) for p in paths}


def _counts(pipe: Pipeline, metric: str = "v") -> dict[int, int]:
    results = pipe.results(metric)
    return {int(k): int(c) for k, c in zip(results["key"], results["count"], strict=True)}


def test_jobs_without_a_store_each_get_their_own_default_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMSTATE_HOME", str(tmp_path))
    source = _events()
    with Pipeline(source, key="k", values=["v"]) as first:
        assert first.run().events == 100
    # Same source, another key: a different job, which must not resume the first one.
    with Pipeline(source, key="j", values=["v"]) as other:
        report = other.run()
        assert report.recovered_epoch is None and report.events == 100
        assert sum(_counts(other).values()) == 100 and len(_counts(other)) <= 3
    # The first job's definition again finds its own checkpoints (partitions do not matter).
    with Pipeline(source, key="k", values=["v"], partitions=3) as again:
        report = again.run()
        assert report.recovered_epoch == 1 and report.events == 0
        assert sum(_counts(again).values()) == 100
    locations = sorted(p.name for p in (tmp_path / "pipelines").iterdir())
    assert len(locations) == 2 and all(name.startswith("events-") for name in locations)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"key": "j"}, "key"),
        ({"values": ["w"]}, "values"),
        ({"values": ["v", "w"]}, "values"),
        ({"key_type": "bytes"}, "key_type"),
        ({"nan_policy": "propagate"}, "nan_policy"),
        ({"source": "renamed"}, "source"),
    ],
)
def test_resuming_with_another_definition_is_refused_before_anything_is_touched(
    change: dict[str, Any], field: str
) -> None:
    store = MemoryStore()
    definition: dict[str, Any] = {"key": "k", "values": ["v"], "store": store, "batch_size": 30}
    Pipeline(_events(), **definition).run()
    before = _objects(store)
    inner = _events(name=change.pop("source", "events"))
    source = CountingSource(inner)
    pipe = Pipeline(source, **{**definition, **change})
    with pytest.raises(IncompatibleCheckpointError, match=field) as info:
        pipe.run()
    assert any(line.startswith(field) for line in info.value.differences)
    assert source.reads == 0  # refused before the source was read
    assert _objects(store) == before  # and before anything was written
    assert pipe.offset == 0 and pipe.epoch == 0


def test_an_inferred_key_type_that_differs_from_the_checkpoint_is_refused() -> None:
    store = MemoryStore()
    Pipeline(_events(), key="k", values=["v"], store=store).run()
    before = _objects(store)
    keys = np.array([b"a", b"b"] * 100)  # read at the resume offset, 100
    as_bytes = ArraySource("events", {"k": keys, "v": np.ones(200)})
    with pytest.raises(IncompatibleCheckpointError, match="key_type"):
        Pipeline(as_bytes, key="k", values=["v"], store=store).run()
    assert _objects(store) == before


@pytest.mark.parametrize(("before", "after"), [(3, 2), (2, 4), (4, 1)])
def test_changing_the_partition_count_resumes_exactly(before: int, after: int) -> None:
    source = _events(5_000)
    store = MemoryStore()
    common: dict[str, Any] = {"key": "k", "values": ["v"], "store": store, "batch_size": 500,
                              "checkpoint_every": 3}
    Pipeline(source, partitions=before, **common).run(max_batches=7)
    survivor = Pipeline(source, partitions=after, **common)
    report = survivor.run()
    assert report.recovered_epoch == 2 and report.start_offset == 3_000
    keys = np.asarray(source.read(0, 5_000).columns["k"])  # type: ignore[union-attr]
    assert _counts(survivor) == {int(k): int((keys == k).sum()) for k in np.unique(keys)}


def _foreign_commit(store: Any, snapshots: list[tuple[str, int, bool, bytes]],
                    offsets: dict[str, Any]) -> None:
    ObjectStoreCheckpointer(store).commit(1, snapshots, source_offsets=offsets)


def _packed(keys: np.ndarray, values: np.ndarray) -> bytes:
    state = NumericAggregateStore(1)
    aggregator = state.partition(0)
    aggregator.fold(keys, values)
    aggregator.publish()
    return encode_batch([("v", state.snapshot())])


@pytest.mark.parametrize(
    ("snapshots", "offsets", "message"),
    [
        ([("agg", 0, False, b"opaque")], {"events": 10}, "operators"),
        ([("aggregates", 0, False, b"not an LCB1 batch")], {"events": 10}, "aggregates"),
        ([("aggregates", 0, False, _packed(np.arange(3), np.ones(3))),
          ("aggregates", 1, False, _packed(np.arange(3, 6), np.ones(3)))],
         {"events": 10}, "2 partitions"),
        ([("aggregates", 0, False, _packed(np.arange(3), np.ones(3)))], {"other": 10},
         "'other'"),
        ([("aggregates", 0, False, _packed(np.arange(3), np.ones(3)))], {"events": "ten"},
         "offset"),
        ([("aggregates", 0, False, encode_batch([("v", b"x"), ("w", b"y")]))],
         {"events": 10}, "'w'"),
        ([("aggregates", 0, False, _packed(np.arange(3), np.ones(3))),
          ("job", 0, False, b"{not json")], {"events": 10}, "job"),
        ([("aggregates", 0, False, _packed(np.arange(3), np.ones(3))),
          ("job", 0, False, JobRecord.encode(
              JobFingerprint.of("events", "k", ["v"], "float64", "skip"), 2))],
         {"events": 10}, "key type 'float64'"),
    ],
)
def test_checkpoints_written_by_something_else_are_refused_clearly(
    snapshots: list[tuple[str, int, bool, bytes]], offsets: dict[str, Any], message: str
) -> None:
    store = MemoryStore()
    _foreign_commit(store, snapshots, offsets)
    before = _objects(store)
    pipe = Pipeline(_events(), key="k", values=["v"], store=store)
    with pytest.raises(IncompatibleCheckpointError, match=message):
        pipe.run()
    assert _objects(store) == before
    assert pipe.offset == 0


def test_a_checkpoint_without_a_fingerprint_in_the_pipeline_layout_is_resumed() -> None:
    # What pipelines wrote before checkpoints carried a job fingerprint.
    source = _events(100)
    keys = np.asarray(source.read(0, 100).columns["k"])  # type: ignore[union-attr]
    values = np.asarray(source.read(0, 100).columns["v"])  # type: ignore[union-attr]
    store = MemoryStore()
    _foreign_commit(store, [("aggregates", 0, False, _packed(keys[:40], values[:40]))],
                    {"events": 40})
    with Pipeline(source, key="k", values=["v"], store=store) as pipe:
        report = pipe.run()
        assert report.recovered_epoch == 1 and report.start_offset == 40
        assert _counts(pipe) == {int(k): int((keys == k).sum()) for k in np.unique(keys)}
    # ... and its next checkpoint records the fingerprint (a delta: its job record is full).
    recovered = ObjectStoreCheckpointer(store).recover(rebuild=False)
    assert recovered is not None
    job = json.loads(recovered.state["job"][0])["job"]
    assert job["source"] == "events" and job["key"] == "k" and job["values"] == ["v"]
    assert job["key_type"] == "int64" and job["nan_policy"] == "skip"


def test_a_foreign_job_is_refused_from_its_job_record_before_its_state_is_downloaded() -> None:
    store = MemoryStore()
    Pipeline(_events(), key="k", values=["v"], store=store).run()
    # Without its state artifact, the checkpoint could not even be recovered ...
    for path in _objects(store):
        if "/aggregates/" in path:
            obstore.delete(store, path)
    # ... yet another job is told what differs, not that the checkpoint is damaged.
    with pytest.raises(IncompatibleCheckpointError) as info:
        Pipeline(_events(), key="j", values=["v"], nan_policy="raise", store=store).run()
    assert [line.split(":")[0] for line in info.value.differences] == ["key", "nan_policy"]
    assert "key: checkpoint has 'k', this job has 'j'" in str(info.value)


def _stats_frame(pipe: Pipeline, metric: str) -> dict[int, tuple[float, ...]]:
    results = pipe.results(metric)
    columns = ("count", "sum", "min", "max", "mean", "var")
    return {
        int(k): tuple(float(results[c][i]) for c in columns)  # type: ignore[literal-required]
        for i, k in enumerate(results["key"])
    }


def test_a_checkpoint_of_one_store_per_value_column_resumes_into_the_one_store() -> None:
    # What pipelines wrote before one store held every value column: under "aggregates"
    # one one-column store's snapshot per column, then deltas of each, packed per column
    # (partials both published and still local, NaN in one column only).
    rows = 120
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 9, rows)
    v = rng.normal(0, 1, rows)
    w = np.where(rng.random(rows) < 0.3, np.nan, rng.normal(5, 2, rows))
    source = ArraySource("events", {"k": keys, "v": v, "w": w})
    store = MemoryStore()
    checkpointer = ObjectStoreCheckpointer(store)
    old = {metric: NumericAggregateStore(2) for metric in ("v", "w")}
    columns = {"v": v, "w": w}
    record = JobRecord.encode(JobFingerprint.of("events", "k", ["v", "w"], "int64", "skip"), 2)

    def fold(begin: int, end: int, publish: bool) -> None:
        for metric, state in old.items():
            for p in range(2):
                mine = keys[begin:end] % 2 == p
                state.partition(p).fold(keys[begin:end][mine], columns[metric][begin:end][mine])
                if publish:
                    state.partition(p).publish()

    fold(0, 50, publish=True)
    fold(50, 60, publish=False)
    full = encode_batch([(m, s.snapshot()) for m, s in old.items()])
    first = checkpointer.commit(
        1, [("aggregates", 0, False, full), ("job", 0, False, record)],
        source_offsets={"events": 60}, metadata={"partitions": 2},
    )
    fold(60, 80, publish=False)
    delta = encode_batch([(m, s.snapshot_delta()) for m, s in old.items()])
    checkpointer.commit(
        2, [("aggregates", 0, True, delta), ("job", 0, False, record)],
        source_offsets={"events": 80}, parent=first.checkpoint_id, validate_delta=None,
        metadata={"partitions": 2},
    )
    with Pipeline(source, key="k", values=["v", "w"], partitions=2, store=store) as pipe:
        report = pipe.run()
        assert report.recovered_epoch == 2 and report.start_offset == 80
        resumed = {m: _stats_frame(pipe, m) for m in ("v", "w")}
    with Pipeline(source, key="k", values=["v", "w"], partitions=2,
                  store=MemoryStore()) as fresh:
        fresh.run()
        expected = {m: _stats_frame(fresh, m) for m in ("v", "w")}
    for metric in ("v", "w"):
        assert resumed[metric].keys() == expected[metric].keys()
        for key, stats in expected[metric].items():
            np.testing.assert_allclose(resumed[metric][key], stats, rtol=1e-12, equal_nan=True)
    # The checkpoint written after the migration is a full one in the one-store layout,
    # and it resumes as such.
    recovered = ObjectStoreCheckpointer(store).recover(rebuild=False)
    assert recovered is not None and recovered.deltas["aggregates"][0] == ()
    assert [name for name, _ in decode_batch(recovered.state["aggregates"][0])] == [STORE_ENTRY]
    with Pipeline(source, key="k", values=["v", "w"], partitions=2, store=store) as again:
        assert again.run().start_offset == rows
        assert _stats_frame(again, "w") == resumed["w"]


def _by_key(pipe: Pipeline) -> dict[int, tuple[int, float]]:
    results = pipe.results("v")
    return {int(k): (int(c), float(m))
            for k, c, m in zip(results["key"], results["count"], results["mean"], strict=True)}


def _wide_events(keys: int, rows: int, hot: int | None = None) -> ArraySource:
    """Every key twice (so no partial is degenerate: min != max), then ``rows`` events over
    the first ``hot`` keys (all by default)."""
    rng = np.random.default_rng(keys)
    first = np.concatenate([np.arange(keys), rng.permutation(keys)])
    later = rng.integers(0, hot or keys, rows)
    return ArraySource("events", {"k": np.concatenate([first, later]),
                                  "v": rng.normal(0, 1, 2 * keys + rows)})  # fmt: skip


def test_large_float_state_is_stored_as_the_stores_own_snapshot_and_resumes(tmp_path: Path) -> None:
    # Float partials do not halve under LZ4, so a state of more than 1 MiB is committed as
    # the store's own record container, uncopied; a chain of such deltas resumes exactly.
    source = _wide_events(100_000, 800_000, hot=25_000)
    with Pipeline(source, key="k", values="v", partitions=2, store=tmp_path,
                  batch_size=200_000, checkpoint_every=1, full_checkpoint_every=10) as pipe:
        first = pipe.run(max_batches=4)
        expected_partial = _by_key(pipe)
    assert first.delta_checkpoints == 3
    recovered = ObjectStoreCheckpointer(str(tmp_path)).recover(rebuild=False)
    assert recovered is not None
    chain = [recovered.state["aggregates"][0], *recovered.deltas["aggregates"][0]]
    assert len(chain) == 4 and all(blob[:4] == b"SSRC" for blob in chain)
    assert len(chain[0]) > 1 << 20
    with Pipeline(source, key="k", values="v", partitions=2, store=tmp_path,
                  batch_size=200_000, checkpoint_every=1) as again:
        assert again.recover() == 800_000
        assert _by_key(again) == expected_partial
        again.run()
        resumed = _by_key(again)
    with Pipeline(source, key="k", values="v", partitions=2, store=MemoryStore(),
                  batch_size=200_000) as fresh:
        fresh.run()
        once = _by_key(fresh)
    assert resumed.keys() == once.keys()
    for key, (count, mean) in once.items():
        assert resumed[key][0] == count and resumed[key][1] == pytest.approx(mean, rel=1e-12)


def test_small_state_stays_an_lz4_batch() -> None:
    store = MemoryStore()
    with Pipeline(_events(), key="k", values="v", store=store) as pipe:
        pipe.run()
    recovered = ObjectStoreCheckpointer(store).recover(rebuild=False)
    assert recovered is not None
    packed = recovered.state["aggregates"][0]
    assert packed[:4] == b"LCB1"
    assert [name for name, _ in decode_batch(packed)] == [STORE_ENTRY]


def test_a_damaged_bare_snapshot_is_refused_and_an_older_checkpoint_resumed(
    tmp_path: Path,
) -> None:
    source = _wide_events(40_000, 20_000)
    with Pipeline(source, key="k", values="v", partitions=2, store=tmp_path,
                  batch_size=10_000, checkpoint_every=3, full_checkpoint_every=1) as pipe:
        pipe.run()
        expected = _by_key(pipe)
    ck = ObjectStoreCheckpointer(str(tmp_path))
    newest = ck.load_manifest(ck.list_checkpoints()[-1])
    path = tmp_path / newest.operators["aggregates"].partitions[0].path
    data = bytearray(path.read_bytes())
    assert data[:4] == b"SSRC"
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with Pipeline(source, key="k", values="v", partitions=2, store=tmp_path,
                  batch_size=10_000) as again:
        assert again.recover() < len(source)  # the older checkpoint, then replayed
        again.run()
        assert {k: c for k, (c, _) in _by_key(again).items()} == {
            k: c for k, (c, _) in expected.items()
        }


def test_a_capture_buffer_someone_still_views_is_replaced_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failed commit's traceback can keep a view of the buffer a bare snapshot was
    # uploaded from; the next capture must not fail on it.
    # (A store's capture is a RecordBuffer whose memory the next capture reuses once it is
    # dropped: a view of it must keep it alive, and the next capture take fresh memory.)
    source = _wide_events(1_000, 1_000)
    with Pipeline(source, key="k", values="v", store=MemoryStore(), batch_size=500,
                  checkpoint_every=2) as pipe:
        pipe.run(max_batches=2)
        views: list[memoryview] = []
        capture = NumericAggregateStore.capture

        def viewed_capture(self: NumericAggregateStore, *, delta: bool = False) -> RecordBuffer:
            captured = capture(self, delta=delta)
            views.append(memoryview(captured))
            return captured

        monkeypatch.setattr(NumericAggregateStore, "capture", viewed_capture)
        stats = pipe.checkpoint()
        held = views[0]
        assert stats.bytes > 0 and held.nbytes > 0 and bytes(held[:4]) == b"SSRC"
        first = bytes(held)
        pipe.run()
        assert sum(count for count, _ in _by_key(pipe).values()) == len(source)
        assert len(views) >= 2 and bytes(held) == first  # the held capture was not reused
