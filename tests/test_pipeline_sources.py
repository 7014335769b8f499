"""The source contract as the pipeline enforces it: offsets that match the rows and move
forward, and unbounded sources that are idle without spinning or checkpointing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import MemoryStore

from streamstate import IncompatibleCheckpointError, SourceError
from streamstate.pipeline import ArraySource, ArrowSource, Batch, ParquetSource, Pipeline


class ScriptedSource:
    """Answers each read with ``script(offset, max_rows)``; counts the reads."""

    def __init__(self, script: Callable[[int, int], Batch | None]) -> None:
        self.script = script
        self.reads = 0

    @property
    def name(self) -> str:
        return "scripted"

    def read(self, offset: int, max_rows: int) -> Batch | None:
        self.reads += 1
        return self.script(offset, max_rows)


def _columns(rows: int, start: int = 0) -> Mapping[str, Any]:
    return {"k": np.arange(start, start + rows) % 4, "v": np.ones(rows)}


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (Batch(_columns(50), 0, 10), r"10 rows by its offsets \(0 to 10\) but column 'k' has 50"),
        (Batch(_columns(10), 5, 15), "starts at offset 5"),
        (Batch(_columns(0), 0, -3), "ends before it starts"),
        (Batch({"k": np.arange(10), "v": np.ones(9)}, 0, 10), "'v' has 9 rows"),
        (Batch(_columns(10), 0.0, 10), "int"),  # type: ignore[arg-type]
    ],
)
def test_a_batch_that_breaks_the_contract_is_refused(batch: Batch, message: str) -> None:
    source = ScriptedSource(lambda offset, _n: batch if offset == 0 else None)
    pipe = Pipeline(source, key="k", values=["v"], store=MemoryStore())
    with pytest.raises(SourceError, match=message):
        pipe.run()
    assert pipe.offset == 0 and not pipe.checkpointer.list_checkpoints()


def test_offsets_must_continue_where_the_previous_batch_ended() -> None:
    inner = ArraySource("inner", _columns(30))

    def script(offset: int, n: int) -> Batch | None:
        if offset == 20:  # replays the first batch instead of the third
            return inner.read(0, n)
        return inner.read(offset, n)

    pipe = Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                    batch_size=10, checkpoint_every=1)
    with pytest.raises(SourceError, match="asked for offset 20"):
        pipe.run(max_batches=50)  # bounded: a pipeline trusting the source loops forever
    recovered = pipe.checkpointer.recover(rebuild=False)  # store deltas: see Pipeline
    assert recovered is not None and recovered.source_offsets == {"scripted": 20}


def test_numpy_integer_offsets_are_accepted() -> None:
    inner = ArraySource("inner", _columns(30))

    def script(offset: int, n: int) -> Batch | None:
        batch = inner.read(offset, n)
        if batch is None:
            return None
        start, end = np.int64(batch.offset), np.int64(batch.next_offset)
        return Batch(batch.columns, start, end)  # type: ignore[arg-type]

    with Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                  batch_size=7) as pipe:
        report = pipe.run()
        assert report.finished and report.events == 30 and pipe.offset == 30
        assert type(pipe.offset) is int
        assert int(pipe.results("v")["count"].sum()) == 30


def test_an_idle_unbounded_source_backs_off_and_writes_no_checkpoints() -> None:
    source = ScriptedSource(lambda offset, _n: Batch(_columns(0), offset, offset))
    pipe = Pipeline(source, key="k", values=["v"], store=MemoryStore(), checkpoint_every=1,
                    max_idle_sleep=0.004)
    report = pipe.run(max_batches=20)
    assert not report.finished and report.batches == 0 and report.empty_batches == 20
    assert report.checkpoints == [] and pipe.checkpointer.list_checkpoints() == []
    # 1 ms, 2 ms, then the 4 ms cap for the remaining 17 empty batches (sleep never wakes early)
    assert report.idle_seconds >= 0.001 + 0.002 + 17 * 0.004
    assert source.reads == 20


def test_empty_batches_between_data_do_not_count_towards_checkpoints() -> None:
    inner = ArraySource("inner", _columns(40))
    polls: dict[int, int] = {}

    def script(offset: int, n: int) -> Batch | None:
        polls[offset] = polls.get(offset, 0) + 1
        if polls[offset] <= 25:  # 25 empty polls before every batch
            return Batch(_columns(0), offset, offset)
        return inner.read(offset, n)

    with Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                  batch_size=10, checkpoint_every=2, max_idle_sleep=0.0) as pipe:
        report = pipe.run()
        assert report.finished and report.events == 40
        assert report.batches == 4 and report.empty_batches == 125
        assert [c.offset for c in report.checkpoints] == [20, 40]
        assert int(pipe.results("v")["count"].sum()) == 40


def test_a_run_with_nothing_new_commits_nothing() -> None:
    store = MemoryStore()
    source = ArraySource("events", _columns(25))
    Pipeline(source, key="k", values=["v"], store=store, batch_size=10).run()
    again = Pipeline(source, key="k", values=["v"], store=store, batch_size=10)
    report = again.run()
    assert report.finished and report.events == 0 and report.checkpoints == []
    assert again.epoch == 1


# -- offsets beyond row numbers ----------------------------------------------------------


class ShardSource:
    """Rows of an ArraySource addressed as ``{"shard": "s", "pos": [n]}``: an offset that
    is no int, as a per-partition source's would be."""

    start_offset = {"shard": "s", "pos": [0]}  # noqa: RUF012

    def __init__(self, inner: ArraySource, give_rows: bool = True) -> None:
        self.inner = inner
        self.give_rows = give_rows

    @property
    def name(self) -> str:
        return "shards"

    def read(self, offset: Any, max_rows: int) -> Batch | None:
        batch = self.inner.read(offset["pos"][0], max_rows)
        if batch is None:
            return None
        rows = len(batch) if self.give_rows else None
        next_offset = {"shard": "s", "pos": (np.int64(batch.next_offset),)}  # tuple, np int
        return Batch(batch.columns, offset, next_offset, rows)


def test_json_offsets_are_checkpointed_and_resumed_unchanged() -> None:
    store = MemoryStore()
    inner = ArraySource("inner", _columns(50))
    first = Pipeline(ShardSource(inner), key="k", values=["v"], store=store, batch_size=10,
                     checkpoint_every=2)
    crashed = first.run(max_batches=3)  # one checkpoint at 20, no final one
    assert crashed.start_offset == {"shard": "s", "pos": [0]}
    assert first.offset == {"shard": "s", "pos": [30]}
    assert first.committed_offset == {"shard": "s", "pos": [20]}
    recovered = first.checkpointer.recover(rebuild=False)
    assert recovered is not None and recovered.source_offsets == {"shards": first.committed_offset}
    with Pipeline(ShardSource(inner), key="k", values=["v"], store=store, batch_size=10) as again:
        report = again.run()
        assert report.start_offset == {"shard": "s", "pos": [20]} and report.events == 30
        assert report.end_offset == {"shard": "s", "pos": [50]}
        assert int(again.results("v")["count"].sum()) == 50  # exactly once


def test_a_batch_with_json_offsets_must_give_its_rows() -> None:
    pipe = Pipeline(ShardSource(ArraySource("i", _columns(5)), give_rows=False), key="k",
                    values=["v"], store=MemoryStore())
    with pytest.raises(SourceError, match=r"must give its row count \(Batch.rows\)"):
        pipe.run()


def test_a_batch_with_rows_must_move_its_offset() -> None:
    offset = {"at": 0}
    source = ScriptedSource(lambda _o, _n: Batch(_columns(3), offset, offset, 3))
    source.start_offset = offset  # type: ignore[attr-defined]
    pipe = Pipeline(source, key="k", values=["v"], store=MemoryStore())
    with pytest.raises(SourceError, match="does not move its offset"):
        pipe.run()


def test_a_checkpoint_offset_of_another_kind_is_refused() -> None:
    store = MemoryStore()
    Pipeline(ArraySource("shards", _columns(10)), key="k", values=["v"], store=store).run()
    pipe = Pipeline(ShardSource(ArraySource("i", _columns(10))), key="k", values=["v"],
                    store=store)
    with pytest.raises(IncompatibleCheckpointError, match="not a source offset"):
        pipe.run()


# -- transforms ----------------------------------------------------------------------------


def test_a_transform_filters_rows_and_derives_the_key() -> None:
    rng = np.random.default_rng(3)
    user, amount = rng.integers(0, 50, 1000), rng.normal(size=1000)
    source = ArraySource("events", {"user": user, "amount": amount})

    def transform(columns: dict[str, Any]) -> dict[str, Any]:
        keep = columns["amount"] > 0
        return {"group": columns["user"][keep] % 7, "amount": columns["amount"][keep]}

    with Pipeline(source, key="group", values=["amount"], store=MemoryStore(), batch_size=64,
                  transform=transform) as pipe:
        report = pipe.run()
        assert report.events == 1000 and report.folded_events == int((amount > 0).sum())
        got = pipe.to_pandas("amount")
    frame = pd.DataFrame({"group": user % 7, "amount": amount})
    want = frame[frame.amount > 0].groupby("group")["amount"].agg(["count", "sum"])
    assert got["count"].to_dict() == want["count"].to_dict()
    np.testing.assert_allclose(got.loc[want.index, "sum"], want["sum"])


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (lambda c: {"k": c["k"], "v": c["v"][:-1]}, r"column 'v' of 9 rows, but column 'k' has 10"),
        (lambda c: {"k": c["k"]}, "has no column 'v'"),
        (lambda c: [c["k"], c["v"]], "returned a list"),
    ],
)
def test_a_transform_returning_wrong_columns_is_a_source_error(
    transform: Callable[[dict[str, Any]], Any], message: str
) -> None:
    pipe = Pipeline(ArraySource("e", _columns(10)), key="k", values=["v"], store=MemoryStore(),
                    transform=transform, key_type="int64")
    with pytest.raises(SourceError, match=message):
        pipe.run()
    assert pipe.checkpointer.list_checkpoints() == []


# -- stopping ------------------------------------------------------------------------------


def test_stop_from_another_thread_ends_an_unbounded_run_with_a_checkpoint() -> None:
    inner = ArraySource("inner", _columns(30))

    def script(offset: int, n: int) -> Batch:  # 30 rows, then idle for ever
        return inner.read(offset, n) or Batch(_columns(0), offset, offset)

    pipe = Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                    batch_size=10, checkpoint_every=100, max_idle_sleep=0.5)
    timer = threading.Timer(0.3, pipe.stop)
    timer.start()
    try:
        report = pipe.run()
    finally:
        timer.cancel()
    assert report.stopped and not report.finished and report.events == 30
    assert [c.offset for c in report.checkpoints] == [30] and pipe.committed_offset == 30
    assert report.seconds < 5  # the stop cut the idle pause short, not after many polls


def test_a_stop_before_run_ends_it_at_once_and_is_then_forgotten() -> None:
    pipe = Pipeline(ArraySource("e", _columns(30)), key="k", values=["v"], store=MemoryStore(),
                    batch_size=10)
    pipe.stop()
    first = pipe.run()
    assert first.stopped and first.events == 0 and first.checkpoints == []
    second = pipe.run()
    assert second.finished and not second.stopped and second.events == 30


def test_signal_handlers_are_restored_after_a_run() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = []
    pipe = Pipeline(ArraySource("e", _columns(30)), key="k", values=["v"], store=MemoryStore(),
                    batch_size=10)
    pipe.run(on_batch=lambda _b: seen.append(signal.getsignal(signal.SIGTERM)))
    assert seen and all(handler not in before for handler in seen)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_during_a_run_stops_it_with_a_final_checkpoint() -> None:
    inner = ArraySource("inner", _columns(30))
    sent = []

    def script(offset: int, n: int) -> Batch:
        if offset == 30 and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the run: it stops
        return inner.read(offset, n) or Batch(_columns(0), offset, offset)

    pipe = Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                    batch_size=10, checkpoint_every=100)
    report = pipe.run()
    assert report.stopped and report.events == 30 and pipe.committed_offset == 30


# -- Arrow and Parquet sources in a pipeline -----------------------------------------------


def _frame(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user": [f"u{i}" for i in rng.integers(0, 40, rows)],
            "shop": rng.integers(0, 9, rows).astype(np.int64),
            "amount": rng.normal(size=rows),
        }
    )


def _totals(pipe: Pipeline, value: str = "amount") -> dict[Any, tuple[int, float, float, float]]:
    got = pipe.to_pandas(value)
    return {
        (k.decode() if isinstance(k, bytes) else k if isinstance(k, str) else int(k)): (
            int(r["count"]), float(r["sum"]), float(r["min"]), float(r["max"])
        )
        for k, r in got.iterrows()
    }


def _reference(frame: pd.DataFrame, key: str, value: str = "amount") -> dict[Any, Any]:
    grouped = frame.groupby(key)[value].agg(["count", "sum", "min", "max"])
    return {
        (k if isinstance(k, str) else int(k)): (int(r["count"]), r["sum"], r["min"], r["max"])
        for k, r in grouped.iterrows()
    }


def _assert_equal_totals(got: Mapping[Any, Any], want: Mapping[Any, Any]) -> None:
    assert got.keys() == want.keys()
    for key, (count, total, low, high) in want.items():
        assert got[key][0] == count, key
        np.testing.assert_allclose(got[key][1:], (total, low, high), rtol=1e-9, atol=1e-9)


def _write_files(
    frame: pd.DataFrame, where: Any, sizes: list[int], row_group: int, prefix: str = ""
) -> None:
    """``frame`` split into files of ``sizes`` rows (``part-000.parquet``, ...), written to a
    directory (a Path) or an obstore store, each in row groups of ``row_group`` rows."""
    start = 0
    for number, size in enumerate(sizes):
        table = pa.Table.from_pandas(frame.iloc[start : start + size], preserve_index=False)
        start += size
        name = f"part-{number:03d}.parquet"
        if isinstance(where, os.PathLike):
            pq.write_table(table, os.path.join(where, name), row_group_size=row_group)
        else:
            out = io.BytesIO()
            pq.write_table(table, out, row_group_size=row_group)
            obstore.put(where, f"{prefix}{name}", out.getvalue())


@pytest.mark.parametrize("kind", ["table", "reader", "pandas", "polars"])
@pytest.mark.parametrize("key", ["user", "shop"])
def test_arrow_source_gives_the_array_source_results(kind: str, key: str) -> None:

    frame = _frame(3000)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    data: Any = {
        "table": table,
        "reader": pa.RecordBatchReader.from_batches(table.schema, table.to_batches(700)),
        "pandas": frame,
        "polars": pl.from_pandas(frame),
    }[kind]
    arrays = ArraySource("events", {c: frame[c].to_numpy() for c in frame.columns})
    results = []
    for source in (arrays, ArrowSource(data, name="events")):
        with Pipeline(source, key=key, values=["amount"], store=MemoryStore(),
                      batch_size=256) as pipe:
            assert pipe.run().events == 3000
            results.append(_totals(pipe))
    _assert_equal_totals(results[1], {k: v for k, v in results[0].items()})
    _assert_equal_totals(results[1], _reference(frame, key))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_parquet_source_equals_a_pandas_group_by(backend: str, tmp_path: Any,
                                                  request: pytest.FixtureRequest) -> None:
    frame = _frame(5000, seed=1)
    if backend == "local":
        _write_files(frame, tmp_path, [1200, 800, 3000], row_group=500)
        source = ParquetSource(tmp_path, name="events")
    else:
        s3 = request.getfixturevalue("s3_store")
        _write_files(frame, s3, [1200, 800, 3000], row_group=500, prefix="data/in/")
        source = ParquetSource("data/in", name="events", store=s3)
    with Pipeline(source, key="user", values=["amount"], store=MemoryStore(),
                  batch_size=300, partitions=3) as pipe:
        report = pipe.run()
        assert report.finished and report.events == 5000
        assert report.end_offset == {"file": "part-002.parquet", "row": 3000}
        _assert_equal_totals(_totals(pipe), _reference(frame, "user"))


def test_a_parquet_job_resumes_from_a_file_and_row_exactly_once(tmp_path: Any) -> None:
    frame = _frame(4000, seed=2)
    data, store = tmp_path / "in", tmp_path / "ckpt"
    data.mkdir()
    _write_files(frame, data, [1000, 1000, 2000], row_group=400)
    first = Pipeline(ParquetSource(data, name="events"), key="shop", values=["amount"],
                     store=store, batch_size=300, checkpoint_every=4)
    crashed = first.run(max_batches=9)  # checkpoints after batch 4 and 8; batch 9 is lost
    assert len(crashed.checkpoints) == 2 and not crashed.finished
    # a 1000-row file is read as 300, 100, 300, 100, 200 (row groups of 400, batches of 300)
    committed = first.committed_offset
    assert committed == {"file": "part-001.parquet", "row": 700}
    assert first.offset == {"file": "part-001.parquet", "row": 800}
    with Pipeline(ParquetSource(data, name="events"), key="shop", values=["amount"],
                  store=store, batch_size=300) as again:
        report = again.run()
        assert report.start_offset == committed and report.finished
        assert report.events == 4000 - 1700
        _assert_equal_totals(_totals(again), _reference(frame, "shop"))


def test_following_a_directory_until_stop_folds_every_file(tmp_path: Any) -> None:
    frame = _frame(3000, seed=4)
    data, staging = tmp_path / "in", tmp_path / "staging"
    data.mkdir()
    staging.mkdir()
    sizes = [500, 700, 300, 1500]
    _write_files(frame, staging, sizes, row_group=250)
    names = sorted(os.listdir(staging))
    pipe = Pipeline(ParquetSource(data, name="events", follow=True), key="user",
                    values=["amount"], store=tmp_path / "ckpt", batch_size=200,
                    checkpoint_every=3, max_idle_sleep=0.02)
    seen: list[Any] = []

    def producer() -> None:
        for name in names:  # each file appears whole: renamed into the directory
            os.rename(staging / name, data / name)
            deadline = time.monotonic() + 20
            while not any(o["file"] == name for o in seen) and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 20
        while (not seen or seen[-1] != {"file": names[-1], "row": sizes[-1]}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
        pipe.stop()

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        report = pipe.run(on_batch=lambda b: seen.append(b.next_offset))
    finally:
        pipe.stop()
        thread.join()
    assert report.stopped and report.events == 3000 and report.empty_batches > 0
    assert pipe.committed_offset == {"file": names[-1], "row": sizes[-1]}
    _assert_equal_totals(_totals(pipe), _reference(frame, "user"))
    pipe.close()


_SIGINT_CHILD = """
import json, sys
from streamstate.pipeline import ParquetSource, Pipeline
pipe = Pipeline(ParquetSource(sys.argv[1], name="events", follow=True), key="user",
                values=["amount"], store=sys.argv[2], batch_size=100, checkpoint_every=1000,
                max_idle_sleep=0.05)
def ready(batch):
    if batch.next_offset == {"file": "part-001.parquet", "row": 800}:
        print("ready", flush=True)
report = pipe.run(on_batch=ready)
print(json.dumps({"stopped": report.stopped, "events": report.events,
                  "checkpoints": len(report.checkpoints)}), flush=True)
"""


def test_sigint_ends_a_following_run_with_a_committed_checkpoint(tmp_path: Any) -> None:
    frame = _frame(1500, seed=5)
    data = tmp_path / "in"
    data.mkdir()
    _write_files(frame, data, [700, 800], row_group=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGINT_CHILD, str(data), str(tmp_path / "ckpt")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == {"stopped": True, "events": 1500, "checkpoints": 1}
    # the final checkpoint holds everything: a resumed job has nothing left to fold
    with Pipeline(ParquetSource(data, name="events"), key="user", values=["amount"],
                  store=tmp_path / "ckpt", batch_size=100) as again:
        report = again.run()
        assert report.events == 0 and report.start_offset == {"file": "part-001.parquet",
                                                              "row": 800}
        _assert_equal_totals(_totals(again), _reference(frame, "user"))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=5),
    row_group=st.integers(1, 300),
    batch_size=st.integers(1, 500),
    checkpoint_every=st.integers(1, 5),
    crash_after=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_any_split_into_files_row_groups_and_batches_gives_the_pandas_result(
    sizes: list[int], row_group: int, batch_size: int, checkpoint_every: int, crash_after: int,
    seed: int
) -> None:
    frame = _frame(sum(sizes), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        _write_files(frame, data, sizes, row_group=row_group)
        store = MemoryStore()

        def pipeline() -> Pipeline:
            return Pipeline(ParquetSource(data, name="events"), key="user", values=["amount"],
                            store=store, batch_size=batch_size,
                            checkpoint_every=checkpoint_every)

        # a crash after some batches, then a second pipeline resumes from the checkpoint
        pipeline().run(max_batches=crash_after)
        with pipeline() as pipe:
            assert pipe.run().finished
            if len(frame):
                _assert_equal_totals(_totals(pipe), _reference(frame, "user"))
            else:
                assert pipe.results("amount")["count"].size == 0
