"""RayPipeline with the workers reading the source, one shard each: runs over arrays and
Parquet files equal a pandas group-by, the driver reads nothing, a killed worker and a
resume continue every shard exactly, and offsets of another layout translate or are refused.

One local Ray (``ray.init(num_cpus=2)``) serves the module. Skipped without Ray and under
AddressSanitizer, as tests/test_ray.py is.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

if "libasan" in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("Ray's worker processes cannot preload ASan", allow_module_level=True)
ray = pytest.importorskip("ray")

from streamstate import IncompatibleCheckpointError
from streamstate.pipeline import ArraySource, Batch
from streamstate.pipeline.sources import ParquetSource
from streamstate.ray import RayPipeline
from streamstate.storage import resolve_store

EVENTS = 600_000
KEYS = 40_000
BATCH = 16_384
STATS = ["count", "sum", "min", "max", "mean", "var"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    """A local Ray of its own for the module (never one already running here): 2 CPUs,
    as CI has."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def events() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(61)
    return {
        "user": rng.integers(0, KEYS, EVENTS, dtype=np.int64),
        "amount": rng.normal(100.0, 25.0, EVENTS),
    }


def _expected(columns: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(columns).groupby("user")["amount"].agg(STATS)


def _assert_equal(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    got = frame.sort_index()[STATS]
    assert got.index.is_unique and len(got) == len(expected)
    np.testing.assert_array_equal(got.index.to_numpy(), expected.index.to_numpy())
    np.testing.assert_array_equal(got["count"].to_numpy(), expected["count"].to_numpy())
    for stat in ("sum", "min", "max", "mean", "var"):
        np.testing.assert_allclose(got[stat].to_numpy(), expected[stat].to_numpy(), rtol=1e-9)


def _pipe(source: Any, store: Any, **kwargs: Any) -> RayPipeline:
    options: dict[str, Any] = {
        "key": "user",
        "values": "amount",
        "partitions": 4,
        "num_workers": 2,
        "store": store,
        "checkpoint_every": 6,
        "full_checkpoint_every": 3,
        "batch_size": BATCH,
        "key_type": "int64",
    }
    options.update(kwargs)
    return RayPipeline(source, **options)


@pytest.fixture
def driver_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The offsets ArraySource.read is called at in this (the driver's) process; the
    workers' processes import the class afresh, unpatched."""
    calls: list[object] = []
    read = ArraySource.read

    def counted(self: ArraySource, offset: Any, max_rows: int) -> Batch | None:
        calls.append(offset)
        return read(self, offset, max_rows)

    monkeypatch.setattr(ArraySource, "read", counted)
    return calls


def test_workers_read_array_shards_and_the_driver_reads_nothing(
    events: dict[str, np.ndarray], driver_reads: list[object], tmp_path: Path
) -> None:
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(ArraySource("events", events), store, key_type=None) as pipe:
        assert pipe.reads_shards
        report = pipe.run()
        assert report.finished and report.events == EVENTS and report.restarts == 0
        half = EVENTS // 2
        assert pipe.offset == pipe.committed_offset == {"shards": [half, EVENTS]}
        assert report.batches == -(-half // BATCH)  # a step reads a batch of each shard
        assert all(set(c.offset) == {"shards"} for c in report.checkpoints)
        assert len(report.checkpoints) >= 2 and report.delta_checkpoints >= 1
        _assert_equal(pipe.to_pandas("amount"), _expected(events))
        assert pipe.key_type == "int64"  # inferred by a Ray task, not here
        # The manifest records both shards' offsets.
        latest = pipe.checkpointer.read_latest()
        assert latest is not None
        manifest = pipe.checkpointer.load_manifest(latest)
        assert manifest.source_offsets == {"events": {"shards": [half, EVENTS]}}
    assert driver_reads == []
    # The control: the driver-routing path reads here.
    rows = 4 * BATCH
    with _pipe(ArraySource("events", {k: v[:rows] for k, v in events.items()}),
               resolve_store(tmp_path / "driver"), read_on_workers=False) as driven:
        assert not driven.reads_shards and driven.run().finished
    assert len(driver_reads) == 5  # four batches and the end


def test_workers_read_parquet_shards_and_follow_new_files(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    files = tmp_path / "in"
    files.mkdir()
    rows = 200_000
    bounds = np.linspace(0, rows, 9, dtype=int)
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        part = pa.table({k: v[start:end] for k, v in events.items()})
        pq.write_table(part, files / f"part-{number:03d}.parquet", row_group_size=20_000)
    source = ParquetSource(files, "files", follow=True)
    seen: list[int] = []
    with _pipe(source, resolve_store(tmp_path / "ckpt"), checkpoint_every=3) as pipe:

        def stop_once_all_read(batch: Batch) -> None:
            seen.append(len(batch))
            assert batch.columns == {}  # the driver gets the offsets and counts alone
            if sum(seen) == rows:
                pipe.stop()

        report = pipe.run(on_batch=stop_once_all_read)
        assert report.stopped and report.events == rows and sum(seen) == rows
        offsets = pipe.committed_offset["shards"]
        assert len(offsets) == 2 and all(set(o) == {"file", "row"} for o in offsets)
        _assert_equal(pipe.to_pandas("amount"), _expected({k: v[:rows] for k, v in
                                                           events.items()}))
        # An idle followed source backs off (empty steps) until stopped.
        idle = pipe.run(max_batches=3)
        assert idle.events == 0 and idle.empty_batches == 3 and idle.idle_seconds > 0


def test_a_worker_killed_mid_run_rewinds_every_shard(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    killed: list[int] = []
    with _pipe(ArraySource("events", events), resolve_store(tmp_path / "ckpt")) as pipe:

        def kill_once(batch: Batch) -> None:
            if not killed and pipe.epoch >= 1:  # after a checkpoint landed
                killed.append(pipe.epoch)
                ray.kill(pipe.workers[1])

        report = pipe.run(on_batch=kill_once)
        assert killed and report.restarts == 1 and report.finished
        assert report.events > EVENTS  # the steps since the checkpoint, read again
        _assert_equal(pipe.to_pandas("amount"), _expected(events))


def test_a_resume_continues_every_shard_and_other_layouts_translate_or_are_refused(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    store = resolve_store(tmp_path / "ckpt")
    source = ArraySource("events", events)
    with _pipe(source, store) as first:
        cut = first.run(max_batches=9)  # a crash: no final checkpoint after step 9
        committed = first.committed_offset
        assert len(cut.checkpoints) == 1 and committed == {"shards": [6 * BATCH,
                                                                     EVENTS // 2 + 6 * BATCH]}
    # Three shards cannot continue from two shards' rows (neither is a prefix of the other):
    with _pipe(source, store, num_workers=3) as three, pytest.raises(
        IncompatibleCheckpointError, match="cannot continue"
    ):
        three.run()
    # ...nor can one reader (the driver-routing path, or a Pipeline).
    with _pipe(source, store, read_on_workers=False) as driven, pytest.raises(
        IncompatibleCheckpointError, match="cannot continue"
    ):
        driven.run()
    with _pipe(source, store) as second:
        rest = second.run()
        assert rest.recovered_epoch == 1 and rest.start_offset == committed
        assert rest.events == EVENTS - 12 * BATCH and rest.finished
        _assert_equal(second.to_pandas("amount"), _expected(events))
    # Every shard at its end is a prefix of the source: one reader resumes it, reading none.
    with _pipe(source, store, read_on_workers=False) as driven_again:
        assert driven_again.run().events == 0
        _assert_equal(driven_again.to_pandas("amount"), _expected(events))


def test_a_driver_routed_checkpoint_resumes_with_the_workers_reading_shards(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 20 * BATCH
    columns = {k: v[:rows] for k, v in events.items()}
    source = ArraySource("events", columns)
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(source, store, read_on_workers=False) as driven:
        driven.run(max_batches=13)
        assert driven.committed_offset == 12 * BATCH  # a plain row: rows [0, 12 * BATCH)
    with _pipe(source, store) as sharded:
        report = sharded.run()
        assert report.start_offset == 12 * BATCH and report.events == rows - 12 * BATCH
        assert sharded.offset == {"shards": [rows // 2, rows]}
        _assert_equal(sharded.to_pandas("amount"), _expected(columns))


def test_read_on_workers_is_checked(events: dict[str, np.ndarray], tmp_path: Path) -> None:
    class Unsharded:
        name = "plain"

        def read(self, offset: int, max_rows: int) -> Batch | None:
            return None

    with pytest.raises(ValueError, match="does not split into shards"):
        RayPipeline(Unsharded(), key="user", values="amount", store=tmp_path,
                    read_on_workers=True)
    with pytest.raises(TypeError, match="read_on_workers"):
        RayPipeline(ArraySource("e", events), key="user", values="amount", store=tmp_path,
                    read_on_workers="yes")  # type: ignore[arg-type]
    assert not RayPipeline(Unsharded(), key="user", values="amount", store=tmp_path).reads_shards


def test_a_rescale_between_partition_counts_continues_every_shard(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 24 * BATCH
    columns = {k: v[:rows] for k, v in events.items()}
    source = ArraySource("events", columns)
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(source, store, partitions=4, checkpoint_every=4) as first:
        cut = first.run(max_batches=7)
        assert cut.checkpoints and first.committed_offset == {"shards": [4 * BATCH,
                                                                        rows // 2 + 4 * BATCH]}
    with _pipe(source, store, partitions=2) as second:  # the same two shards, fewer partitions
        report = second.run()
        assert report.start_offset == cut.checkpoints[-1].offset and report.finished
        assert report.events == rows - 8 * BATCH
        _assert_equal(second.to_pandas("amount"), _expected(columns))
