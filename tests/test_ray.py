"""RayPipeline: the Pipeline's job folded by Ray actors, checkpointing, losing a worker,
rescaling and resuming Pipeline checkpoints, all against a one-shot pandas group-by.

One local Ray (``ray.init(num_cpus=2)``) serves the module. Skipped without Ray, and
under AddressSanitizer (.ci/asan.sh preloads libasan into the test process; Ray's worker
processes are started without it and could not load the instrumented core).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

if "libasan" in os.environ.get("LD_PRELOAD", ""):
    pytest.skip("Ray's worker processes cannot preload ASan", allow_module_level=True)
ray = pytest.importorskip("ray")

from streamstate import IncompatibleCheckpointError, StoreConfigurationError
from streamstate.pipeline import ArraySource, Batch, Pipeline
from streamstate.ray import (
    RayPipeline,
    WorkerRestoreError,
    WorkersLostError,
    WorkerTimeoutError,
    owned_partitions,
)
from streamstate.storage import resolve_store

EVENTS = 2_000_000
KEYS = 100_000
BATCH = 65_536
STATS = ["count", "sum", "min", "max", "mean", "var"]


pytestmark = pytest.mark.usefixtures("ray_cluster")  # one local Ray (conftest.py)


@pytest.fixture(scope="module")
def events() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(16)
    return {
        "user": rng.integers(0, KEYS, EVENTS, dtype=np.int64),
        "amount": rng.normal(100.0, 25.0, EVENTS),
        "fee": rng.exponential(2.0, EVENTS),
    }


@pytest.fixture(scope="module")
def expected(events: dict[str, np.ndarray]) -> dict[str, pd.DataFrame]:
    """The one-shot pandas group-by every run must equal."""
    frame = pd.DataFrame(events)
    grouped = frame.groupby("user")
    return {
        value: grouped[value].agg(["count", "sum", "min", "max", "mean", "var"])
        for value in ("amount", "fee")
    }


def _source(events: dict[str, np.ndarray], rows: int | None = None) -> ArraySource:
    columns = events if rows is None else {k: v[:rows] for k, v in events.items()}
    return ArraySource("events", columns)


def _assert_equal(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    got = frame.sort_index()[STATS]
    assert got.index.is_unique
    assert len(got) == len(expected)
    np.testing.assert_array_equal(got.index.to_numpy(), expected.index.to_numpy())
    np.testing.assert_array_equal(got["count"].to_numpy(), expected["count"].to_numpy())
    for stat in ("sum", "min", "max", "mean", "var"):
        np.testing.assert_allclose(got[stat].to_numpy(), expected[stat].to_numpy(), rtol=1e-9)


def _pipe(source: ArraySource, store: Any, **kwargs: Any) -> RayPipeline:
    options: dict[str, Any] = {
        "key": "user",
        "values": ["amount", "fee"],
        "partitions": 4,
        "num_workers": 2,
        "store": store,
        "checkpoint_every": 8,
        "full_checkpoint_every": 3,
        "batch_size": BATCH,
        # These tests pin the driver-routing path (plain row offsets, a batch per call);
        # tests/test_ray_shards.py runs the same jobs with the workers reading shards.
        "read_on_workers": False,
    }
    options.update(kwargs)
    return RayPipeline(source, **options)


def _expected_prefix(events: dict[str, np.ndarray], rows: int) -> dict[str, pd.DataFrame]:
    grouped = pd.DataFrame({k: v[:rows] for k, v in events.items()}).groupby("user")
    return {v: grouped[v].agg(["count", "sum", "min", "max", "mean", "var"]) for v in ("amount",)}


# -- a whole run, and its checkpoints -------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_run_equals_pandas_and_resumes_from_its_checkpoints(
    backend: str,
    events: dict[str, np.ndarray],
    expected: dict[str, pd.DataFrame],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    store = resolve_store(tmp_path / "ckpt") if backend == "local" else request.getfixturevalue(
        "s3_store"
    )
    with _pipe(_source(events), store) as pipe:
        report = pipe.run()
        assert report.finished and report.restarts == 0
        assert report.events == EVENTS and report.batches == -(-EVENTS // BATCH)
        assert [c.epoch for c in report.checkpoints] == list(range(1, len(report.checkpoints) + 1))
        assert report.delta_checkpoints >= 1  # full_checkpoint_every=3: deltas between fulls
        assert pipe.committed_offset == pipe.offset == EVENTS
        for value in ("amount", "fee"):
            _assert_equal(pipe.to_pandas(value), expected[value])
        table = pipe.to_arrow("amount")
        assert table.num_rows == KEYS and set(table.column("key").to_pylist()) == set(range(KEYS))
        results = pipe.results("fee")
        assert len(results["key"]) == KEYS and int(results["count"].sum()) == EVENTS
        assert len(pipe.workers) == 2
        epoch = pipe.epoch
    assert "closed" in repr(pipe)

    # A new pipeline on the store restores every worker's own chain (deltas included).
    with _pipe(_source(events), store) as again:
        resumed = again.run()
        assert resumed.recovered_epoch == epoch and resumed.events == 0
        _assert_equal(again.to_pandas("amount"), expected["amount"])


def test_checkpoints_during_a_run_and_a_resume_that_replays(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Cut short (a crash: no final checkpoint), the next run replays from the last
    checkpoint and counts every event once."""
    rows = 40 * 16_384
    store = resolve_store(tmp_path / "ckpt")
    source = _source(events, rows)
    expected = _expected_prefix(events, rows)["amount"]
    with _pipe(source, store, batch_size=16_384, checkpoint_every=6) as first:
        cut = first.run(max_batches=15)
        assert not cut.finished and cut.batches == 15
        assert [c.offset for c in cut.checkpoints] == [6 * 16_384, 12 * 16_384]
        assert first.committed_offset == 12 * 16_384 and first.epoch == 2
    with _pipe(source, store, batch_size=16_384, checkpoint_every=6) as second:
        rest = second.run()
        assert rest.recovered_epoch == 2 and rest.start_offset == 12 * 16_384
        assert rest.events == rows - 12 * 16_384 and rest.finished
        _assert_equal(second.to_pandas("amount"), expected)
        assert "RayPipeline(source='events'" in repr(second) and "num_workers=2" in repr(second)


# -- losing workers -------------------------------------------------------------------------


def test_a_worker_killed_mid_run_is_replaced_and_the_results_still_equal(
    events: dict[str, np.ndarray], expected: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    killed: list[int] = []

    with _pipe(_source(events), resolve_store(tmp_path / "ckpt")) as pipe:

        def kill_once(batch: Batch) -> None:
            # After the first checkpoint's barrier, once: the replacement restores epoch 1.
            if not killed and batch.offset >= 12 * BATCH:
                killed.append(batch.offset)
                ray.kill(pipe.workers[1])

        report = pipe.run(on_batch=kill_once)
        assert killed and report.restarts == 1 and report.finished
        assert report.events > EVENTS  # the batches since the last checkpoint, again
        for value in ("amount", "fee"):
            _assert_equal(pipe.to_pandas(value), expected[value])


def test_a_worker_killed_from_a_thread_and_too_many_restarts(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 30 * 8192
    source = _source(events, rows)
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(source, store, batch_size=8192, checkpoint_every=4) as pipe:
        killer: list[threading.Thread] = []

        def kill_from_a_thread(batch: Batch) -> None:
            if batch.offset == 10 * 8192 and not killer:  # once: the replay passes here again
                thread = threading.Thread(target=ray.kill, args=(pipe.workers[0],))
                thread.start()
                killer.append(thread)

        report = pipe.run(on_batch=kill_from_a_thread)
        killer[0].join()
        assert report.restarts == 1
        _assert_equal(pipe.to_pandas("amount"), _expected_prefix(events, rows)["amount"])

    # A worker dying at every batch: the run gives up after max_restarts replacements.
    with _pipe(source, resolve_store(tmp_path / "other"), batch_size=8192,
               max_restarts=1) as doomed:

        def kill_always(batch: Batch) -> None:
            ray.kill(doomed.workers[0])

        with pytest.raises(WorkersLostError, match="max_restarts=1"):
            doomed.run(on_batch=kill_always)


def test_a_worker_that_cannot_restore_fails_the_run_clearly(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 8 * 8192
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(_source(events, rows), store, batch_size=8192, checkpoint_every=100) as pipe:
        assert len(pipe.run().checkpoints) == 1  # the final one only
    # Damage worker 1's artifact: its SHA-256 no longer matches, and there is no older one.
    [artifact] = (tmp_path / "ckpt").glob("checkpoints/*/operators/aggregates/partition-1.*")
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with _pipe(_source(events, rows), store, batch_size=8192) as broken:
        with pytest.raises(WorkerRestoreError, match="could not restore"):
            broken.run()
        assert broken.workers == []  # the run failed: no worker is left behind


def test_stop_ends_with_a_checkpoint_and_a_failing_worker_fails_the_run(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 12 * 8192
    columns = {k: v[:rows].copy() for k, v in events.items()}
    columns["amount"][10 * 8192 + 5] = np.nan
    source = ArraySource("events", columns)
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(source, store, batch_size=8192, checkpoint_every=100, nan_policy="raise") as pipe:

        def stop_at_three(batch: Batch) -> None:
            if batch.offset == 2 * 8192:
                pipe.stop()

        stopped = pipe.run(on_batch=stop_at_three)
        assert stopped.stopped and not stopped.finished and stopped.batches == 3
        assert [c.offset for c in stopped.checkpoints] == [3 * 8192]  # the final checkpoint
        # The NaN in batch 10 raises inside a worker: the run fails with the worker's error
        # and ends the workers, discarding the state (as a Pipeline does).
        with pytest.raises(ValueError, match="NaN"):
            pipe.run()
        assert pipe.workers == [] and pipe.epoch == 0
        report = pipe.run(max_batches=2)  # resumes from the committed checkpoint
        assert report.recovered_epoch == 1 and report.start_offset == 3 * 8192


def test_workers_the_cluster_cannot_place_time_out_instead_of_hanging(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    source = _source(events, 4 * 8192)
    with _pipe(source, resolve_store(tmp_path / "ckpt"), batch_size=8192, worker_timeout=3,
               actor_options={"num_cpus": 64}) as pipe:
        with pytest.raises(WorkerTimeoutError, match="worker_timeout=3.0 s"):
            pipe.run()
        assert pipe.workers == []  # the pending actors were ended


# -- rescaling, and Pipeline checkpoints ----------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "full_every"),
    [(3, 2, 3), (2, 5, 1)],  # restored from a full and a delta / from fulls alone
)
def test_resuming_with_another_partition_count_is_exact(
    before: int, after: int, full_every: int, events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 24 * 16_384
    source = _source(events, rows)
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(source, store, partitions=before, num_workers=before, batch_size=16_384,
               checkpoint_every=5, full_checkpoint_every=full_every) as first:
        cut = first.run(max_batches=12)
        assert [c.is_delta for c in cut.checkpoints] == [False, full_every > 1]
        assert cut.checkpoints[-1].offset == 10 * 16_384
    with _pipe(source, store, partitions=after, num_workers=after, batch_size=16_384,
               actor_options={"num_cpus": 0}) as second:
        report = second.run()
        assert report.recovered_epoch == 2 and report.start_offset == 10 * 16_384
        assert report.checkpoints[0].is_delta is False  # a rescaled store starts a new chain
        _assert_equal(second.to_pandas("amount"), _expected_prefix(events, rows)["amount"])
    # And back to the first layout, from the rescaled job's checkpoints.
    with _pipe(source, store, partitions=before, num_workers=before) as third:
        again = third.run()
        assert again.events == 0 and again.recovered_epoch == report.checkpoints[-1].epoch
        _assert_equal(third.to_pandas("amount"), _expected_prefix(events, rows)["amount"])


def test_a_pipeline_and_a_one_worker_ray_pipeline_resume_each_other(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 30 * 8192
    # Many keys in the first checkpoint, few after: the deltas stay smaller than the full,
    # so a chain continues (DeltaChain ends one whose deltas outgrow its full).
    columns = {k: v[:rows].copy() for k, v in events.items()}
    columns["user"][4 * 8192 :] %= 100
    source = ArraySource("events", columns)
    expected = pd.DataFrame(columns).groupby("user")["amount"].agg(STATS)
    store = resolve_store(tmp_path / "ckpt")
    common: dict[str, Any] = {
        "key": "user", "values": ["amount", "fee"], "partitions": 2, "store": store,
        "batch_size": 8192, "checkpoint_every": 4,
    }
    with Pipeline(source, **common) as local:
        local.run(max_batches=10)
        assert local.epoch == 2
    with RayPipeline(source, num_workers=1, **common) as on_ray:
        report = on_ray.run(max_batches=10)
        assert report.recovered_epoch == 2 and report.start_offset == 8 * 8192
        assert report.checkpoints[0].is_delta  # the Pipeline's chain continues
        assert on_ray.epoch == 4
    with Pipeline(source, **common) as local_again:
        rest = local_again.run()
        assert rest.recovered_epoch == 4 and rest.start_offset == 16 * 8192
        assert rest.checkpoints[0].is_delta  # and the Pipeline continues the Ray chain
        _assert_equal(local_again.to_pandas("amount"), expected)


def test_several_workers_resume_a_pipeline_checkpoint_of_another_partition_count(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    rows = 20 * 8192
    source = _source(events, rows)
    store = resolve_store(tmp_path / "ckpt")
    common: dict[str, Any] = {"key": "user", "values": ["amount", "fee"], "store": store,
                              "batch_size": 8192, "checkpoint_every": 4}
    with Pipeline(source, partitions=3, **common) as local:
        local.run(max_batches=9)
        assert local.epoch == 2
    with RayPipeline(source, partitions=4, num_workers=2, **common) as on_ray:
        report = on_ray.run()
        assert report.recovered_epoch == 2 and report.start_offset == 8 * 8192
        _assert_equal(on_ray.to_pandas("fee"), pd.DataFrame(
            {k: v[:rows] for k, v in events.items()}).groupby("user")["fee"].agg(STATS))


def test_a_pipeline_refuses_a_checkpoint_of_several_workers(
    events: dict[str, np.ndarray], tmp_path: Path
) -> None:
    source = _source(events, 4 * 8192)
    store = resolve_store(tmp_path / "ckpt")
    with _pipe(source, store, batch_size=8192) as pipe:
        pipe.run()
    local = Pipeline(source, key="user", values=["amount", "fee"], store=store)
    with local, pytest.raises(IncompatibleCheckpointError, match="partitions"):
        local.run()


# -- arguments, and Ray being optional ------------------------------------------------------


def test_arguments_are_checked(events: dict[str, np.ndarray], tmp_path: Path) -> None:
    from obstore.store import MemoryStore

    source = _source(events, 10)
    with pytest.raises(StoreConfigurationError, match="MemoryStore"):
        RayPipeline(source, key="user", values="amount", store=MemoryStore())
    with pytest.raises(ValueError, match="num_workers"):
        RayPipeline(source, key="user", values="amount", partitions=2, num_workers=3,
                    store=tmp_path)
    with pytest.raises(TypeError, match="num_workers"):
        RayPipeline(source, key="user", values="amount", num_workers="2",  # type: ignore[arg-type]
                    store=tmp_path)
    with pytest.raises(TypeError, match="values"):
        RayPipeline(source, key="user", values=[1], store=tmp_path)  # type: ignore[list-item]
    assert [list(owned_partitions(w, 3, 8)) for w in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    pipe = RayPipeline(source, key="user", values="amount", store=tmp_path)
    assert pipe.num_workers == 2 and pipe.workers == []
    assert pipe.to_pandas("amount").empty  # nothing folded, no worker started
    pipe.close()
    with pytest.raises(Exception, match="closed"):
        pipe.run()


def test_the_package_imports_without_ray() -> None:
    code = (
        "import sys; sys.modules['ray'] = None  # any import of ray raises ImportError\n"
        "import numpy as np, streamstate, streamstate.ray\n"
        "from streamstate.pipeline import ArraySource\n"
        "pipe = streamstate.ray.RayPipeline(ArraySource('s', {'k': np.arange(3), 'v': "
        "np.ones(3)}), key='k', values='v', store=sys.argv[1])\n"
        "try:\n    pipe.run()\nexcept streamstate.ray.RayPipelineError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(os.environ.get("TMPDIR", "/tmp")) / "noray")],
        capture_output=True, text=True, check=True, env=os.environ.copy(),
    )
    assert "pip install 'streamstate[ray]'" in out.stdout


@pytest.mark.slow
def test_two_nodes_on_this_machine() -> None:
    """Two Ray nodes (head + one joined to it), a worker on each, one killed mid-run."""
    child = Path(__file__).with_name("ray_two_node_child.py")
    env = os.environ.copy()
    env.pop("RAY_ADDRESS", None)  # the child connects to its own cluster
    out = subprocess.run(
        [sys.executable, str(child)],
        check=False, capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"nodes": 2, "restarts": 1, "finished": True, "equal": True}
