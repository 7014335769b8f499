"""A windowed RayPipeline: the Pipeline's watermark, late split and sinks, with the window
stores in Ray workers. Its published output must equal the in-process Pipeline's (epoch
by epoch, row for row), the plain-Python reference of test_pipeline_windows and, for
tumbling windows, a pandas group-by; and stay exactly-once when a worker is killed or the
driver stops part-way and a new RayPipeline resumes.

One local Ray (``ray.init(num_cpus=2)``) serves the module. Skipped without Ray and under
AddressSanitizer, as tests/test_ray.py is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if "libasan" in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("Ray's worker processes cannot preload ASan", allow_module_level=True)
ray = pytest.importorskip("ray")

from streamstate import IncompatibleCheckpointError, StreamStateError
from streamstate.demo import published_table
from streamstate.pipeline import ArraySource, Batch, Pipeline
from streamstate.ray import RayPipeline
from streamstate.sinks import ParquetSink
from streamstate.storage import CheckpointStorage, resolve_store
from streamstate.windows import Hopping, Session, Tumbling, Window

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline_windows import (
    assert_matches,
    make_events,
    published_windows,
    reference,
)

ROWS = 12_000
BATCH = 500


pytestmark = pytest.mark.usefixtures("ray_cluster")  # one local Ray (conftest.py)


def _events(seed: int = 16, rows: int = ROWS) -> dict[str, Any]:
    # 40 keys, time moving 2 ms a row, up to 300 ms early: many late rows at lateness 40.
    return make_events(rows, keys=40, spread=2, disorder=300, seed=seed)


def _options(window: Window, **extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "key": "k",
        "values": ["v"],
        "time": "t",
        "window": window,
        "allowed_lateness": 40,
        "partitions": 3,
        "batch_size": BATCH,
        "checkpoint_every": 3,
        "full_checkpoint_every": 3,
    }
    options.update(extra)
    return options


def _ray_job(columns: dict[str, Any], store: Any, out: Any, late: Any, window: Window,
             **extra: Any) -> RayPipeline:
    extra.setdefault("num_workers", 2)
    return RayPipeline(
        ArraySource("events", columns), store=store, sink=ParquetSink(out),
        late_sink=ParquetSink(late), **_options(window, **extra),
    )


def _local_job(columns: dict[str, Any], store: Any, out: Any, late: Any, window: Window,
               **extra: Any) -> Pipeline:
    return Pipeline(
        ArraySource("events", columns), store=store, sink=ParquetSink(out),
        late_sink=ParquetSink(late), **_options(window, **extra),
    )


def _expected(columns: dict[str, Any], window: Window, lateness: int = 40,
              batch_size: int = BATCH, partitions: int = 3) -> tuple[dict[Any, Any], list[int]]:
    return reference(
        columns["k"].tolist(), columns["t"].tolist(), columns["v"].tolist(), window=window,
        lateness=lateness, batch_size=batch_size, partitions=partitions,
    )


def _epoch_files(directory: Path) -> dict[str, pa.Table]:
    return {path.name: pq.read_table(path) for path in sorted(directory.glob("*.parquet"))}


def _late_times(store: Any, prefix: str = "") -> list[int]:
    table = published_table(store, prefix)
    return [] if table is None else sorted(table.column("t").to_pylist())


def _assert_published(out: Any, late: Any, columns: dict[str, Any], window: Window,
                      prefix: str = "") -> None:
    """Every window exactly once with the reference's statistics; every late row once."""
    expected, late_rows = _expected(columns, window)
    assert_matches(published_windows(published_table(out, prefix)), expected)
    assert _late_times(late, prefix) == sorted(columns["t"][late_rows].tolist())


WINDOWS = [Tumbling(50), Hopping(80, 20), Session(30)]


@pytest.mark.parametrize("window", WINDOWS, ids=repr)
def test_windowed_output_equals_the_pipeline_and_the_reference(
    window: Window, tmp_path: Path
) -> None:
    columns = _events()
    with _ray_job(columns, tmp_path / "rc", tmp_path / "ro", tmp_path / "rl", window) as pipe:
        assert repr(window) in repr(pipe) and pipe.window == window
        report = pipe.run()
        with pytest.raises(StreamStateError, match="sink"):
            pipe.results("v")
    local = _local_job(columns, tmp_path / "lc", tmp_path / "lo", tmp_path / "ll", window).run()
    expected, late_rows = _expected(columns, window)
    assert len(late_rows) > 100  # the disorder makes many late
    assert report.finished and report.restarts == 0
    assert report.late_events == local.late_events == len(late_rows)
    assert report.emitted_windows == local.emitted_windows == len(expected)
    assert [c.epoch for c in report.checkpoints] == [c.epoch for c in local.checkpoints]
    # The same epochs, each file the same rows in the same order (the driver merges the
    # workers' windows as one store emits them).
    ray_files, local_files = _epoch_files(tmp_path / "ro"), _epoch_files(tmp_path / "lo")
    assert list(ray_files) == list(local_files) and len(ray_files) > 2
    for name, table in ray_files.items():
        assert table.schema == local_files[name].schema
        # DataFrame.equals: NaN variances (one-event windows) compare equal where they sit.
        assert table.to_pandas().equals(local_files[name].to_pandas()), name
    assert _epoch_files(tmp_path / "rl").keys() == _epoch_files(tmp_path / "ll").keys()
    _assert_published(tmp_path / "ro", tmp_path / "rl", columns, window)


def test_tumbling_windows_equal_a_pandas_group_by(tmp_path: Path) -> None:
    columns = _events(seed=4)
    size = 50
    with _ray_job(columns, tmp_path / "c", tmp_path / "o", tmp_path / "l", Tumbling(size)) as pipe:
        pipe.run()
    _, late_rows = _expected(columns, Tumbling(size))
    frame = pd.DataFrame(columns).drop(index=late_rows)
    frame["window_start"] = frame["t"] // size * size
    grouped = frame.groupby(["k", "window_start"])["v"].agg(
        ["count", "sum", "min", "max", "mean", "var"]
    )
    got = published_table(tmp_path / "o", "").to_pandas().set_index(["key", "window_start"])
    got = got.sort_index()
    assert got.index.is_unique and len(got) == len(grouped)
    np.testing.assert_array_equal(got.index.to_numpy(), grouped.index.to_numpy())
    assert (got["window_end"].to_numpy() == got.index.get_level_values(1) + size).all()
    np.testing.assert_array_equal(got["v_count"].to_numpy(), grouped["count"].to_numpy())
    for stat in ("sum", "min", "max", "mean", "var"):
        np.testing.assert_allclose(got[f"v_{stat}"].to_numpy(), grouped[stat].to_numpy(),
                                   rtol=1e-9, equal_nan=True)


def _killer(pipe: RayPipeline, at: int) -> Any:
    seen = 0

    def on_batch(batch: Batch) -> None:
        nonlocal seen
        seen += 1
        if seen == at:
            ray.kill(pipe.workers[seen % len(pipe.workers)], no_restart=True)

    return on_batch


@pytest.mark.parametrize(
    ("backend", "window", "at"),
    [("local", Tumbling(50), 5), ("local", Hopping(80, 20), 10), ("s3", Session(30), 7)],
    ids=["local-tumbling", "local-hopping", "s3-session"],
)
def test_a_worker_killed_mid_run_still_publishes_every_window_once(
    backend: str, window: Window, at: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    columns = _events(seed=at)
    if backend == "local":
        store, out, late = (resolve_store(tmp_path / name) for name in ("c", "o", "l"))
        prefix = ""
    else:
        store = out = late = request.getfixturevalue("s3_store")
        prefix = "out/"
    sinks = {"sink": ParquetSink(out, prefix), "late_sink": ParquetSink(late, "late/")}
    with RayPipeline(ArraySource("events", columns), store=store, num_workers=2, **sinks,
                     **_options(window)) as pipe:
        report = pipe.run(on_batch=_killer(pipe, at))
    assert report.finished and report.restarts == 1
    expected, late_rows = _expected(columns, window)
    assert_matches(published_windows(published_table(out, prefix)), expected)
    assert _late_times(late, "late/") == sorted(columns["t"][late_rows].tolist())
    # The replay after the restart counts its late rows again; the late sink holds each once.
    assert report.late_events >= len(late_rows)
    if backend == "s3":
        staged = CheckpointStorage(out).list_directory(f"{prefix}_staging/")
        assert not [p for p in staged if p.endswith(".parquet")]


@pytest.mark.parametrize("window", WINDOWS, ids=repr)
def test_a_driver_stopped_part_way_and_a_new_one_resuming_is_exactly_once(
    window: Window, tmp_path: Path
) -> None:
    columns = _events(seed=9)
    paths = [tmp_path / name for name in ("c", "o", "l")]
    first = _ray_job(columns, *paths, window)
    cut = first.run(max_batches=11)  # checkpoints after 3, 6, 9; 10 and 11 are lost
    assert not cut.finished and first.committed_offset == 9 * BATCH
    first.close()
    with _ray_job(columns, *paths, window) as second:
        assert second.recover() == 9 * BATCH
        report = second.run()
    assert report.finished and report.recovered_epoch == 3
    _assert_published(paths[1], paths[2], columns, window)


def test_a_pipeline_and_a_one_worker_ray_pipeline_resume_each_other(tmp_path: Path) -> None:
    columns = _events(seed=2)
    window = Hopping(80, 20)
    paths = [tmp_path / name for name in ("c", "o", "l")]
    _local_job(columns, *paths, window).run(max_batches=7)  # checkpoints after 3 and 6
    with _ray_job(columns, *paths, window, num_workers=1) as pipe:
        assert pipe.recover() == 6 * BATCH
        pipe.run(max_batches=8)  # checkpoints after 9 and 12
        assert pipe.committed_offset == 12 * BATCH
    local = _local_job(columns, *paths, window)
    assert local.recover() == 12 * BATCH
    assert local.run().finished
    _assert_published(paths[1], paths[2], columns, window)


def test_a_windowed_checkpoint_resumes_only_with_its_workers_and_partitions(
    tmp_path: Path,
) -> None:
    columns = _events(rows=3_000)
    window = Tumbling(50)
    paths = [tmp_path / name for name in ("c", "o", "l")]
    with _ray_job(columns, *paths, window) as pipe:
        pipe.run(max_batches=3)
    with _ray_job(columns, *paths, window, num_workers=3) as other:  # noqa: SIM117
        with pytest.raises(IncompatibleCheckpointError, match="num_workers=2"):
            other.recover()
    with _ray_job(columns, *paths, window, partitions=4) as other:  # noqa: SIM117
        with pytest.raises(IncompatibleCheckpointError, match="partitions"):
            other.recover()
    with pytest.raises(IncompatibleCheckpointError):  # two workers' artifacts
        _local_job(columns, *paths, window).recover()


def test_a_windowed_job_reads_on_the_driver_even_from_a_shardable_source(
    tmp_path: Path,
) -> None:
    # The watermark and the late split must see every row, so the driver reads.
    columns = _events(rows=3_000)
    paths = [tmp_path / name for name in ("c", "o", "l")]
    with _ray_job(columns, *paths, Tumbling(50)) as pipe:
        assert not pipe.reads_shards
    with pytest.raises(ValueError, match="read_on_workers=True: a windowed job"):
        _ray_job(columns, *paths, Tumbling(50), read_on_workers=True)
    with RayPipeline(ArraySource("events", columns), key="k", values="v", partitions=2,
                     store=tmp_path / "plain") as plain:
        assert plain.reads_shards  # the same source shards without a window


def test_a_callable_sink_gets_every_window_with_timestamp_bounds(tmp_path: Path) -> None:
    columns = _events(rows=4_000, seed=5)
    ms = columns["t"]
    columns["t"] = (ms + 1_700_000_000_000).astype("datetime64[ms]").astype("datetime64[ns]")
    got: list[pa.RecordBatch] = []
    late: list[pa.RecordBatch] = []
    options = _options(Tumbling("1s"), allowed_lateness="100ms")
    with RayPipeline(ArraySource("events", columns), store=tmp_path, num_workers=2,
                     sink=got.append, late_sink=late.append, **options) as pipe:
        report = pipe.run()
    table = pa.Table.from_batches(got)
    assert table.schema.field("window_start").type == pa.timestamp("ms")
    assert table.num_rows == report.emitted_windows
    late_rows = sum(b.num_rows for b in late)
    assert late_rows == report.late_events
    assert sum(table.column("v_count").to_pylist()) + late_rows == len(ms)
    expected, late_ref = reference(
        columns["k"].tolist(), ms.tolist(), columns["v"].tolist(), window=Tumbling(1000),
        lateness=100, batch_size=BATCH, partitions=3,
    )
    assert late_rows == len(late_ref) and table.num_rows == len(expected)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    window=st.sampled_from(WINDOWS),
    lateness=st.sampled_from([0, 40]),
    partitions=st.integers(1, 3),
    workers=st.integers(1, 3),
    batch_size=st.sampled_from([170, 400]),
    checkpoint_every=st.integers(1, 3),
    cut=st.floats(0.0, 1.0),
    kill_at=st.one_of(st.none(), st.integers(1, 6)),
    seed=st.integers(0, 2**16),
)
def test_any_layout_stop_point_and_worker_loss_publishes_the_reference_exactly_once(
    window: Window, lateness: int, partitions: int, workers: int, batch_size: int,
    checkpoint_every: int, cut: float, kill_at: int | None, seed: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    columns = make_events(2_000, keys=9, spread=3, disorder=200, seed=seed)
    tmp = tmp_path_factory.mktemp("prop")
    options = _options(window, allowed_lateness=lateness, partitions=partitions,
                       batch_size=batch_size, checkpoint_every=checkpoint_every)
    options["num_workers"] = min(workers, partitions)

    def job() -> RayPipeline:
        return RayPipeline(ArraySource("events", columns), store=tmp / "c",
                           sink=ParquetSink(tmp / "o"), late_sink=ParquetSink(tmp / "l"),
                           **options)

    batches = -(-2_000 // batch_size)
    if int(cut * batches):
        with job() as first:
            first.run(max_batches=int(cut * batches))
    with job() as survivor:
        on_batch = None if kill_at is None else _killer(survivor, kill_at)
        report = survivor.run(on_batch=on_batch)
        assert report.finished
        assert report.restarts == (kill_at is not None and kill_at <= report.batches)
    expected, late_rows = reference(
        columns["k"].tolist(), columns["t"].tolist(), columns["v"].tolist(), window=window,
        lateness=lateness, batch_size=batch_size, partitions=partitions,
    )
    assert_matches(published_windows(published_table(tmp / "o", "")), expected)
    assert _late_times(tmp / "l") == sorted(columns["t"][late_rows].tolist())
