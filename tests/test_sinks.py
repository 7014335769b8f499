"""Sinks driven the way a pipeline drives them: stage, commit, publish, with crashes between
every step and recovery from the committed manifest, on every store backend."""

from __future__ import annotations

import collections
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from obstore.store import LocalStore, S3Store

import streamstate
from streamstate import (
    CallableSink,
    CorruptDataError,
    IntegrityError,
    ObjectStoreCheckpointer,
    ParquetSink,
    Sink,
    SinkError,
    StreamStateError,
)
from streamstate.layout import CheckpointPaths
from streamstate.retry import RetryPolicy
from streamstate.storage import CheckpointStorage

FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, max_elapsed=5.0)
STEPS = ("before_stage", "after_stage", "after_commit", "after_publish")


def rows(start: int, stop: int) -> pa.RecordBatch:
    """Rows ``[start, stop)`` of the model source: a unique id and a value derived from it."""
    ids = np.arange(start, stop, dtype=np.int64)
    return pa.record_batch({"id": ids, "value": ids * 0.5, "key": [f"k{i % 7}" for i in ids]})


def split(start: int, stop: int, pieces: int) -> list[pa.RecordBatch]:
    """Rows ``[start, stop)`` as ``pieces`` batches (some possibly empty)."""
    bounds = np.linspace(start, stop, pieces + 1).astype(int)
    return [rows(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def paths_under(store: Any, prefix: str) -> list[str]:
    return sorted(meta["path"] for meta in obstore.list(store, prefix).collect())


def dataset_table(store: Any, prefix: str) -> pa.Table | None:
    """The published directory read by ``pyarrow.dataset`` itself, where pyarrow can open
    the store (a local directory, S3); None for a MemoryStore."""
    if isinstance(store, LocalStore):
        return ds.dataset(str(Path(str(store.prefix)) / prefix), format="parquet").to_table()
    if isinstance(store, S3Store):
        config = store.config
        endpoint = str(config["endpoint"])
        fs = pafs.S3FileSystem(
            access_key=config["access_key_id"],
            secret_key=config["secret_access_key"],
            region=config["region"],
            endpoint_override=endpoint.removeprefix("http://"),
            scheme="http",
        )
        return ds.dataset(
            f"{config['bucket']}/{prefix}", filesystem=fs, format="parquet"
        ).to_table()
    return None


def published_ids(sink: ParquetSink, store: Any) -> list[int]:
    """The ids of every published row; the same read through pyarrow.dataset when it can
    open the store."""
    table = sink.read_published()
    ids = sorted(table.column("id").to_pylist()) if table.num_rows else []
    if ids:
        direct = dataset_table(store, sink.prefix)
        if direct is not None:
            assert sorted(direct.column("id").to_pylist()) == ids
    return ids


@dataclass
class Job:
    """A job over the model source, its checkpoints and its sink in one namespace of a store.

    Each run builds a new checkpointer and a new sink (a new process, as far as they can
    tell), recovers, then stages, commits and publishes epochs until the source ends or the
    crash point comes: a crash is the run simply stopping.
    """

    store: Any
    make_sink: Callable[[str], Sink]  # given the prefix of the job's published output
    total: int
    namespace: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:12]}")
    double: bool = False  # publish and recover everything twice (idempotence)

    @property
    def sink_prefix(self) -> str:
        return f"{self.namespace}/out"

    def checkpointer(self) -> ObjectStoreCheckpointer:
        return ObjectStoreCheckpointer(
            self.store, CheckpointPaths(f"{self.namespace}/ckpt"), retry=FAST
        )

    def recover(self) -> tuple[Sink, int, int]:
        """A new sink recovered to the committed manifest: (sink, next epoch, offset)."""
        sink = self.make_sink(self.sink_prefix)
        sink.bind(self.store, f"{self.namespace}/sinks/out")
        recovered = self.checkpointer().recover()
        if recovered is None:
            epoch, staged, offset = None, None, 0
        else:
            epoch = recovered.manifest.epoch
            staged = recovered.manifest.metadata["sinks"]["out"]
            offset = recovered.source_offsets["src"]
        for _ in range(2 if self.double else 1):
            sink.recover(epoch, staged)
        return sink, 0 if epoch is None else epoch + 1, offset

    def run(self, sizes: list[int], pieces: int, crash: tuple[int, str] | None) -> bool:
        """One run; True when it reached the end of the source."""
        sink, epoch, offset = self.recover()
        assert self.staged_leftovers() == []
        ckpt = self.checkpointer()
        k = 0
        while offset < self.total:
            stop = min(self.total, offset + sizes[k % len(sizes)])
            batches = split(offset, stop, pieces)
            if crash == (k, "before_stage"):
                return False
            staged = sink.stage(epoch, batches)
            if crash == (k, "after_stage"):
                return False
            ckpt.commit(
                epoch, [], source_offsets={"src": stop}, metadata={"sinks": {"out": staged}}
            )
            if crash == (k, "after_commit"):
                return False
            for _ in range(2 if self.double else 1):
                sink.publish(epoch, staged)
            if crash == (k, "after_publish"):
                return False
            offset, epoch, k = stop, epoch + 1, k + 1
        return True

    def play(self, plan: Plan) -> Sink:
        """The plan's crashing runs, then one to the end, then one more start (recovery of
        a finished job); return the last sink, checked to have nothing left staged."""
        for sizes, pieces, crash in plan.crashed:
            self.run(sizes, pieces, crash)
        assert self.run(*plan.last, crash=None)
        sink, _, offset = self.recover()
        assert offset == self.total
        assert self.staged_leftovers() == []
        return sink

    def staged_leftovers(self) -> list[str]:
        return paths_under(self.store, f"{self.sink_prefix}/_staging") + paths_under(
            self.store, f"{self.namespace}/sinks"
        )


@dataclass(frozen=True)
class Plan:
    """How a job goes: the source's row count, runs that crash (rows per epoch, cycled;
    batches per epoch; the (epoch, step) where the run stops), and the run that ends it."""

    total: int
    crashed: list[tuple[list[int], int, tuple[int, str]]]
    last: tuple[list[int], int]


epoch_sizes = st.lists(st.integers(0, 30), min_size=1, max_size=5).map(
    lambda sizes: sizes if sum(sizes) else [*sizes, 1]
)
crash_points = st.tuples(st.integers(0, 5), st.sampled_from(STEPS))
plans = st.builds(
    Plan,
    total=st.integers(0, 90),
    crashed=st.lists(st.tuples(epoch_sizes, st.integers(1, 3), crash_points), max_size=3),
    last=st.tuples(epoch_sizes, st.integers(1, 3)),
)


def examples(store: Any, local: int) -> settings:
    """Fewer examples on S3, where every call is an HTTP request."""
    return settings(
        max_examples=max(5, local // 3) if isinstance(store, S3Store) else local,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# -- ParquetSink ---------------------------------------------------------------------------


def test_parquet_sink_publishes_every_committed_row_exactly_once_across_crashes(
    store: Any,
) -> None:
    @examples(store, 30)
    @given(plan=plans, max_file_bytes=st.sampled_from([200, 1 << 20]), double=st.booleans())
    def check(plan: Plan, max_file_bytes: int, double: bool) -> None:
        def make_sink(prefix: str) -> Sink:
            return ParquetSink(store, prefix, max_file_bytes=max_file_bytes, retry=FAST)

        sink = Job(store, make_sink, plan.total, double=double).play(plan)
        assert isinstance(sink, ParquetSink)
        assert published_ids(sink, store) == list(range(plan.total))

    check()


def test_parquet_files_are_named_per_epoch_and_split_when_large(store: Any) -> None:
    sink = ParquetSink(store, "out/", max_file_bytes=1000, retry=FAST)
    assert sink.prefix == "out"
    staged = sink.stage(7, split(0, 300, 4))
    assert len(staged) > 1
    assert sum(entry["rows"] for entry in staged) == 300
    for n, entry in enumerate(staged):
        assert entry["final"] == f"out/epoch-000000000007-{n:04d}.parquet"
        assert entry["staged"].startswith("out/_staging/epoch-000000000007-")
        data = bytes(obstore.get(store, entry["staged"]).bytes())
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == streamstate.sha256_hex(data)
    assert sink.published_files() == []
    sink.publish(7, staged)
    assert sink.published_files() == [entry["final"] for entry in staged]
    assert paths_under(store, "out/_staging") == []
    assert published_ids(sink, store) == list(range(300))


def test_staged_rows_are_invisible_to_pyarrow_dataset_until_published(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    sink.publish(0, sink.stage(0, [rows(0, 5)]))
    later = sink.stage(1, [rows(5, 9)])
    assert paths_under(store, "out/_staging") == [later[0]["staged"]]
    direct = dataset_table(store, "out")
    if direct is not None:
        assert sorted(direct.column("id").to_pylist()) == list(range(5))
    assert published_ids(sink, store) == list(range(5))
    sink.publish(1, later)
    assert published_ids(sink, store) == list(range(9))


def test_replayed_epoch_stages_under_new_names(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    first = sink.stage(3, [rows(0, 4)])
    second = sink.stage(3, [rows(0, 4)])
    assert first[0]["final"] == second[0]["final"]
    assert first[0]["staged"] != second[0]["staged"]
    assert len(paths_under(store, "out/_staging")) == 2
    sink.recover(3, second)  # the replay's attempt committed: the other one goes
    assert paths_under(store, "out/_staging") == []
    assert published_ids(sink, store) == list(range(4))


def test_empty_epochs_stage_nothing(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    assert sink.stage(0, []) == []
    assert sink.stage(1, [rows(3, 3), rows(5, 5)]) == []
    sink.publish(1, [])
    sink.recover(1, [])
    assert paths_under(store, "out") == []


def test_publish_and_recover_are_idempotent(store: Any) -> None:
    sink = ParquetSink(store, "out", max_file_bytes=200, retry=FAST)
    staged = sink.stage(0, [rows(0, 40)])
    sink.publish(0, staged)
    files = sink.published_files()
    sink.publish(0, staged)
    sink.recover(0, staged)
    ParquetSink(store, "out", retry=FAST).recover(0, staged)
    assert sink.published_files() == files
    assert published_ids(sink, store) == list(range(40))


def test_publish_with_staged_and_final_both_gone_names_the_file(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    staged = sink.stage(0, [rows(0, 3)])
    obstore.delete(store, staged[0]["staged"])
    with pytest.raises(CorruptDataError, match=staged[0]["staged"]):
        sink.publish(0, staged)
    with pytest.raises(CorruptDataError, match=staged[0]["final"]):
        sink.recover(0, staged)


def test_recover_rolls_back_published_epochs_after_the_recovered_one(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    record = {}
    for epoch in range(4):
        record[epoch] = sink.stage(epoch, [rows(epoch * 10, epoch * 10 + 10)])
        sink.publish(epoch, record[epoch])
    uncommitted = sink.stage(4, [rows(40, 50)])
    # The checkpoint of epoch 3 fails verification: recovery falls back to epoch 1.
    ParquetSink(store, "out", retry=FAST).recover(1, record[1])
    assert published_ids(sink, store) == list(range(20))
    assert paths_under(store, uncommitted[0]["staged"]) == []
    assert paths_under(store, "out/_staging") == []


def test_fresh_start_removes_all_earlier_output_and_only_it(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    sink.publish(0, sink.stage(0, [rows(0, 10)]))
    sink.stage(1, [rows(10, 20)])
    obstore.put(store, "out/notes.txt", b"the user's own file")
    obstore.put(store, "out/_staging/readme", b"not a staged file")
    obstore.put(store, "elsewhere/epoch-000000000000-0000.parquet", b"another directory")
    sink.recover(None, None)
    assert sink.published_files() == []
    assert paths_under(store, "out") == ["out/_staging/readme", "out/notes.txt"]
    assert paths_under(store, "elsewhere") == ["elsewhere/epoch-000000000000-0000.parquet"]


def test_staged_records_of_another_sink_or_epoch_are_rejected(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    staged = sink.stage(2, [rows(0, 3)])
    with pytest.raises(CorruptDataError, match="epoch 5"):
        sink.publish(5, staged)
    with pytest.raises(CorruptDataError, match="prefix"):
        ParquetSink(store, "moved", retry=FAST).publish(2, staged)
    for bad in ({"not": "a list"}, [1, 2], [{"staged": staged[0]["staged"]}]):
        with pytest.raises(CorruptDataError):
            sink.publish(2, bad)
    assert paths_under(store, "out/_staging") == [staged[0]["staged"]]  # left as it was


def test_parquet_sink_keeps_types_and_order_within_an_epoch(store: Any) -> None:
    sink = ParquetSink(store, "out", retry=FAST)
    table = pa.table(
        {
            "key": pa.array(["a", "b", None]),
            "window_start": pa.array([0, 60_000, 120_000], pa.timestamp("ms")),
            "v_mean": pa.array([1.5, float("nan"), -2.0]),
        }
    )
    sink.publish(0, sink.stage(0, [table]))
    back = sink.read_published()
    assert back.schema.equals(table.schema)
    assert back.drop_columns("v_mean").equals(table.drop_columns("v_mean"))
    np.testing.assert_array_equal(back.column("v_mean").to_numpy(), [1.5, np.nan, -2.0])


def test_parquet_sink_on_an_s3_url(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.create_bucket()
    options = s3_server.store_options()
    for name, value in {
        "AWS_ENDPOINT": options["endpoint"],
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": options["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": options["secret_access_key"],
        "AWS_REGION": options["region"],
    }.items():
        monkeypatch.setenv(name, value)
    store = s3_server.store(bucket)
    url = f"s3://{bucket}"
    job = Job(store, lambda prefix: ParquetSink(url, prefix, retry=FAST), 50, namespace="job")
    assert not job.run([8], 2, crash=(2, "after_commit"))
    assert not job.run([11], 1, crash=(1, "after_stage"))
    assert job.run([6], 3, crash=None)
    sink, _, _ = job.recover()
    assert job.staged_leftovers() == []
    assert "S3Store" in repr(sink)
    assert published_ids(sink, store) == list(range(50))  # type: ignore[arg-type]
    direct = dataset_table(store, "job/out")
    assert direct is not None and direct.num_rows == 50


class InterruptedRenames(CheckpointStorage):
    """Renames that fail on the calls numbered in ``failing``: ``"after_copy"`` copies then
    fails before deleting the source (an S3 rename is a copy and a delete), ``"lost_reply"``
    moves the object and then fails (a response lost on the way back)."""

    def __init__(self, store: Any, failing: set[int], how: str, error: OSError) -> None:
        super().__init__(store)
        self.failing, self.how, self.error, self.calls = failing, how, error, 0

    def rename(self, src: str, dst: str) -> None:
        self.calls += 1
        if self.calls not in self.failing:
            super().rename(src, dst)
            return
        if self.how == "after_copy":
            self.put(dst, bytes(self.get(src).data))
        else:
            super().rename(src, dst)
        raise self.error


@pytest.mark.parametrize("how", ["after_copy", "lost_reply"])
def test_an_interrupted_rename_is_retried_to_the_same_result(store: Any, how: str) -> None:
    storage = InterruptedRenames(store, {2}, how, ConnectionResetError(104, "reset"))
    sink = ParquetSink(storage, "out", max_file_bytes=200, retry=FAST)
    staged = sink.stage(0, [rows(0, 40)])
    sink.publish(0, staged)  # the transient failure is retried inside publish
    assert storage.calls > len(staged)
    assert paths_under(store, "out/_staging") == []
    assert published_ids(sink, store) == list(range(40))


@pytest.mark.parametrize("how", ["after_copy", "lost_reply"])
def test_a_publish_that_fails_part_way_is_completed_by_recovery(store: Any, how: str) -> None:
    storage = InterruptedRenames(store, {2}, how, PermissionError(13, "denied"))
    sink = ParquetSink(storage, "out", max_file_bytes=200, retry=FAST)
    staged = sink.stage(0, [rows(0, 40)])
    assert len(staged) >= 3
    with pytest.raises(SinkError, match="publishing epoch 0") as info:
        sink.publish(0, staged)
    assert info.value.__cause__ is not None
    ParquetSink(store, "out", retry=FAST).recover(0, staged)  # the next start
    assert paths_under(store, "out/_staging") == []
    assert published_ids(sink, store) == list(range(40))


def test_stage_failure_leaves_nothing_staged(tmp_path: Path) -> None:
    class FailingSecondPut(CheckpointStorage):
        puts = 0

        def put(self, path: str, data: Any, *, mode: Any = "overwrite") -> Any:
            FailingSecondPut.puts += 1
            if FailingSecondPut.puts == 2:
                raise PermissionError(13, "denied", path)
            return super().put(path, data, mode=mode)

    storage = FailingSecondPut(tmp_path)
    sink = ParquetSink(storage, "out", max_file_bytes=100, retry=FAST)
    with pytest.raises(SinkError, match="staging epoch 0") as info:
        sink.stage(0, [rows(0, 50)])
    assert isinstance(info.value.__cause__, StreamStateError | OSError)
    assert storage.list("out") == []


def test_parquet_sink_arguments_are_checked(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, retry=FAST)
    with pytest.raises(TypeError, match="RecordBatch"):
        sink.stage(0, [{"id": [1]}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="sequence"):
        sink.stage(0, rows(0, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="epoch"):
        sink.stage("0", [rows(0, 2)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        sink.stage(-1, [rows(0, 2)])
    with pytest.raises(SinkError, match="schemas"):
        sink.stage(0, [rows(0, 2), pa.record_batch({"other": [1]})])
    with pytest.raises(ValueError, match="staged"):
        sink.recover(None, [])
    with pytest.raises(TypeError, match="prefix"):
        ParquetSink(tmp_path, prefix=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_file_bytes"):
        ParquetSink(tmp_path, max_file_bytes=0)
    assert list(tmp_path.iterdir()) == []


# -- CallableSink --------------------------------------------------------------------------


def test_callable_sink_delivers_every_committed_row_exactly_once_across_crashes(
    store: Any,
) -> None:
    @examples(store, 30)
    @given(plan=plans, double=st.booleans())
    def check(plan: Plan, double: bool) -> None:
        delivered: list[pa.RecordBatch] = []
        Job(store, lambda _: CallableSink(delivered.append), plan.total, double=double).play(plan)
        ids = [i for batch in delivered for i in batch.column("id").to_pylist()]
        # Crashes between the steps never interrupt a delivery: exactly once.
        assert sorted(ids) == list(range(plan.total))

    check()


def test_callable_sink_raising_is_a_sink_error_and_recovery_delivers_again(store: Any) -> None:
    delivered: list[int] = []
    failures = {"left": 1}

    def fn(batch: pa.RecordBatch) -> None:
        if delivered and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("downstream is down")
        delivered.extend(batch.column("id").to_pylist())

    job = Job(store, lambda _: CallableSink(fn), 30)
    with pytest.raises(SinkError, match="downstream is down") as info:
        job.run([10], 2, crash=None)  # epoch 0's first batch is delivered, then fn raises
    assert isinstance(info.value.__cause__, RuntimeError)
    assert len(paths_under(job.store, f"{job.namespace}/sinks")) == 1  # still staged
    assert job.run([10], 2, crash=None)  # recovery delivers epoch 0 again, then the rest
    counts = collections.Counter(delivered)
    assert sorted(counts) == list(range(30))
    assert {i for i, n in counts.items() if n > 1} == set(range(5))  # at least once
    assert job.staged_leftovers() == []


def test_callable_sink_stages_in_the_bound_store_and_publish_removes_it(store: Any) -> None:
    got: list[pa.RecordBatch] = []
    sink = CallableSink(got.append)
    sink.bind(store, "sinks/fn/")
    assert "sinks/fn" in repr(sink)
    assert sink.stage(0, [rows(0, 0)]) == []
    staged = sink.stage(1, split(0, 12, 3))
    (entry,) = staged
    assert entry["path"].startswith("sinks/fn/epoch-000000000001-")
    assert entry["rows"] == 12
    assert got == []
    sink.publish(1, staged)
    assert pa.Table.from_batches(got).column("id").to_pylist() == list(range(12))
    sink.publish(1, staged)  # already delivered: nothing again
    assert len(got) == 3
    assert paths_under(store, "sinks") == []


def test_callable_sink_recover_drops_uncommitted_epochs(store: Any) -> None:
    got: list[pa.RecordBatch] = []
    sink = CallableSink(got.append)
    sink.bind(store, "sinks/fn")
    committed = sink.stage(4, [rows(0, 3)])
    sink.stage(5, [rows(3, 6)])
    obstore.put(store, "sinks/fn/unrelated.bin", b"kept")
    again = CallableSink(got.append)
    again.bind(store, "sinks/fn")
    again.recover(4, committed)
    assert [i for b in got for i in b.column("id").to_pylist()] == [0, 1, 2]
    assert paths_under(store, "sinks") == ["sinks/fn/unrelated.bin"]


def test_callable_sink_detects_a_damaged_staged_object(store: Any) -> None:
    sink = CallableSink(lambda batch: None)
    sink.bind(store, "sinks/fn")
    staged = sink.stage(0, [rows(0, 3)])
    obstore.put(store, staged[0]["path"], b"garbage")
    with pytest.raises(IntegrityError):
        sink.publish(0, staged)
    with pytest.raises(CorruptDataError, match="epoch 1"):
        sink.publish(1, staged)


def test_callable_sink_needs_a_bind_and_a_callable(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="callable"):
        CallableSink(3)  # type: ignore[arg-type]
    sink = CallableSink(print)
    with pytest.raises(SinkError, match="not bound"):
        sink.stage(0, [rows(0, 1)])
    with pytest.raises(ValueError, match="prefix"):
        sink.bind(tmp_path, "/")
    assert "print" in repr(sink)


def test_sinks_satisfy_the_protocol(tmp_path: Path) -> None:
    assert isinstance(ParquetSink(tmp_path), Sink)
    assert isinstance(CallableSink(print), Sink)
    assert ParquetSink(tmp_path).exactly_once is True
    assert CallableSink(print).exactly_once is False
    assert not isinstance(object(), Sink)
    assert issubclass(SinkError, StreamStateError)
    for name in ("Sink", "ParquetSink", "CallableSink", "SinkError"):
        assert name in streamstate.__all__


def test_published_files_are_listed_in_epoch_then_file_order(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path, "out")
    names = ["epoch-000000000001-9999", "epoch-000000000001-10000", "epoch-1000000000000-0000"]
    (tmp_path / "out").mkdir()
    for name in reversed(names):
        (tmp_path / "out" / f"{name}.parquet").write_bytes(b"listed, never read")
    assert sink.published_files() == [f"out/{name}.parquet" for name in names]
