"""The pipeline helper: routing, partition threads, checkpoint cadence, crash and recovery."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import LocalStore, MemoryStore

from streamstate import CheckpointId, ObjectStoreCheckpointer, SourceError, StreamStateError
from streamstate.pipeline import ArraySource, Batch, Pipeline, Source


def _expected(keys: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({"k": keys, "v": values})
    return frame.groupby("k")["v"].agg(["count", "sum", "min", "max", "mean", "var"])


def _assert_matches(results: dict[str, np.ndarray], expected: pd.DataFrame) -> None:
    keys = [k.decode() if isinstance(k, bytes) else k for k in list(results["key"])]
    ours = pd.DataFrame(
        {c: results[c] for c in ("count", "sum", "min", "max", "mean", "var")}, index=keys
    ).sort_index()
    ours = ours[ours["count"] > 0]
    want = expected[expected["count"] > 0].sort_index()
    assert list(ours.index) == list(want.index)
    np.testing.assert_array_equal(ours["count"].to_numpy(), want["count"].to_numpy())
    np.testing.assert_array_equal(ours["min"].to_numpy(), want["min"].to_numpy())
    np.testing.assert_array_equal(ours["max"].to_numpy(), want["max"].to_numpy())
    for col in ("sum", "mean", "var"):
        np.testing.assert_allclose(ours[col].to_numpy(), want[col].to_numpy(), rtol=1e-9, atol=1e-9)


def _data(rows: int, groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, groups, rows, dtype=np.int64)
    values = np.round(rng.normal(50, 20, rows), 2)
    return keys, values


def _needed_by_newest(checkpointer: ObjectStoreCheckpointer, keep: int) -> set[CheckpointId]:
    """The newest ``keep`` checkpoints and every ancestor their delta chains start from."""
    newest = checkpointer.list_checkpoints()[-keep:]
    needed = set(newest)
    for cid in newest:
        manifest = checkpointer.load_manifest(cid)
        while any(p.is_delta for op in manifest.operators.values() for p in op.partitions):
            assert manifest.parent_id is not None
            needed.add(manifest.parent_id)
            manifest = checkpointer.load_manifest(manifest.parent_id)
    return needed


def test_run_matches_a_pandas_group_by(tmp_path: Path) -> None:
    keys, values = _data(50_000, 300)
    source = ArraySource("events", {"k": keys, "v": values})
    with Pipeline(
        source, key="k", values=["v"], partitions=3, store=LocalStore(str(tmp_path)),
        checkpoint_every=4, batch_size=2_000,
    ) as pipe:
        report = pipe.run()
        assert report.finished and report.events == 50_000 and report.batches == 25
        # 25 batches, every 4th checkpointed, plus the final one at the end.
        assert [c.epoch for c in report.checkpoints] == [1, 2, 3, 4, 5, 6, 7]
        assert report.checkpoints[-1].offset == 50_000
        _assert_matches(pipe.results("v"), _expected(keys, values))
        # Pruned to keep_checkpoints, and whatever their delta chains need, no more.
        kept = pipe.checkpointer.list_checkpoints()
        assert set(kept) == _needed_by_newest(pipe.checkpointer, 3)
        assert 3 <= len(kept) < 3 + pipe.full_checkpoint_every


@pytest.mark.parametrize("crash_after", [1, 5, 8, 13])
def test_crash_then_recover_counts_every_event_exactly_once(crash_after: int) -> None:
    keys, values = _data(30_000, 100, seed=crash_after)
    source = ArraySource("events", {"k": keys, "v": values})
    store = MemoryStore()

    first = Pipeline(source, key="k", values=["v"], partitions=2, store=store,
                     checkpoint_every=4, batch_size=1_000)
    crashed = first.run(max_batches=crash_after)
    assert not crashed.finished
    committed = crashed.checkpoints[-1].offset if crashed.checkpoints else 0
    first.close()  # the crash: in-memory state is gone

    second = Pipeline(source, key="k", values=["v"], partitions=2, store=store,
                      checkpoint_every=4, batch_size=1_000)
    report = second.run()
    assert report.start_offset == committed
    assert report.recovered_epoch == (len(crashed.checkpoints) or None)
    assert report.finished
    assert report.events == 30_000 - committed  # the uncommitted tail is replayed
    _assert_matches(second.results("v"), _expected(keys, values))


def test_string_keys_and_two_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    names = np.array([f"user-{i}".encode() for i in rng.integers(0, 500, 20_000)])
    a = rng.normal(0, 1, 20_000)
    b = rng.normal(1e6, 5, 20_000)
    source = ArraySource("clicks", {"user": names, "a": a, "b": b})
    with Pipeline(source, key="user", values=["a", "b"], partitions=2,
                  store=f"file://{tmp_path}", checkpoint_every=3, batch_size=3_000) as pipe:
        pipe.run(max_batches=4)
    with Pipeline(source, key="user", values=["a", "b"], partitions=2,
                  store=f"file://{tmp_path}", checkpoint_every=3, batch_size=3_000) as pipe:
        pipe.run()
        decoded = np.array([n.decode() for n in names])
        _assert_matches(pipe.results("a"), _expected(decoded, a))
        _assert_matches(pipe.results("b"), _expected(decoded, b))
        with pytest.raises(KeyError):
            pipe.results("c")


def test_nan_values_are_skipped_like_pandas(tmp_path: Path) -> None:
    keys, values = _data(5_000, 20, seed=9)
    values[::7] = np.nan
    source = ArraySource("events", {"k": keys, "v": values})
    with Pipeline(source, key="k", values=["v"], store=LocalStore(str(tmp_path)),
                  batch_size=512) as pipe:
        pipe.run()
        _assert_matches(pipe.results("v"), _expected(keys, values))


@settings(max_examples=8, deadline=None)
@given(
    partitions=st.integers(1, 4),
    batch_size=st.integers(100, 3_000),
    checkpoint_every=st.integers(1, 6),
    crash_fraction=st.floats(0.05, 0.95),
)
def test_exactly_once_for_any_shape(
    partitions: int, batch_size: int, checkpoint_every: int, crash_fraction: float
) -> None:
    keys, values = _data(12_000, 64, seed=partitions * 1000 + batch_size)
    source = ArraySource("events", {"k": keys, "v": values})
    store = MemoryStore()
    total_batches = -(-12_000 // batch_size)
    crash_after = max(1, int(total_batches * crash_fraction))
    kwargs = {"key": "k", "values": ["v"], "partitions": partitions, "store": store,
              "checkpoint_every": checkpoint_every, "batch_size": batch_size}
    Pipeline(source, **kwargs).run(max_batches=crash_after)  # type: ignore[arg-type]
    survivor = Pipeline(source, **kwargs)  # type: ignore[arg-type]
    survivor.run()
    _assert_matches(survivor.results("v"), _expected(keys, values))


def test_bad_arguments() -> None:
    source = ArraySource("s", {"k": np.arange(3), "v": np.ones(3)})
    with pytest.raises(ValueError):
        Pipeline(source, key="k", values=["v"], partitions=0, store=MemoryStore())
    with pytest.raises(ValueError):
        Pipeline(source, key="k", values=[], store=MemoryStore())
    with pytest.raises(ValueError):
        ArraySource("s", {"k": np.arange(3), "v": np.ones(4)})
    assert "ArraySource('s', rows=3" in repr(source)


# -- defects found by attacking the pipeline (issue 14) ----------------------------------


class PoisonOnce:
    """Wraps a source; the first read at ``offset`` returns ``poison(batch)`` instead."""

    def __init__(self, inner: Source, offset: int, poison: Callable[[Batch], Batch]) -> None:
        self.inner = inner
        self.offset = offset
        self.poison = poison
        self.poisoned = False

    @property
    def name(self) -> str:
        return self.inner.name

    def read(self, offset: int, max_rows: int) -> Batch | None:
        batch = self.inner.read(offset, max_rows)
        if batch is not None and offset == self.offset and not self.poisoned:
            self.poisoned = True
            return self.poison(batch)
        return batch


def _with_column(batch: Batch, name: str, column: np.ndarray) -> Batch:
    return Batch({**batch.columns, name: column}, batch.offset, batch.next_offset)


def _counts(results: dict[str, np.ndarray]) -> dict[Any, int]:
    return {k: int(c) for k, c in zip(results["key"].tolist(), results["count"], strict=True)}


def test_nan_policy_reaches_the_stores_and_is_validated() -> None:
    source = ArraySource("events", {"k": np.array([1, 1, 2, 2]),
                                    "v": np.array([1.0, np.nan, 2.0, 3.0])})
    with Pipeline(source, key="k", values=["v"], store=MemoryStore(),
                  nan_policy="propagate") as pipe:
        pipe.run()
        results = pipe.results("v")
        means = dict(zip(results["key"].tolist(), results["mean"].tolist(), strict=True))
        assert np.isnan(means[1]) and means[2] == 2.5
    with Pipeline(source, key="k", values=["v"], store=MemoryStore(),
                  nan_policy="raise") as pipe, pytest.raises(StreamStateError, match="NaN"):
        pipe.run()
    with Pipeline(source, key="k", values=["v"], store=MemoryStore()) as pipe:
        pipe.run()  # "skip", the default
        assert _counts(pipe.results("v")) == {1: 1, 2: 2}
    with pytest.raises(ValueError, match="nan_policy"):
        Pipeline(source, key="k", values=["v"], store=MemoryStore(),
                 nan_policy="bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize("failure", ["worker", "source", "callback"])
def test_a_failed_run_discards_its_state_and_the_next_run_resumes_from_the_checkpoint(
    failure: str,
) -> None:
    keys = np.arange(100, dtype=np.int64) % 7
    inner = ArraySource("events", {"k": keys, "v": np.ones(100)})

    def nan_value(batch: Batch) -> Batch:  # a partition thread raises while folding
        bad = np.array(batch.columns["v"], dtype=np.float64)
        bad[0] = np.nan
        return _with_column(batch, "v", bad)

    def float_keys(batch: Batch) -> Batch:  # keys that cannot be int64 keys
        return _with_column(batch, "k", np.asarray(batch.columns["k"], dtype=np.float64))

    calls = []

    def callback(batch: Batch) -> None:  # the caller's own code raises mid-run
        calls.append(batch.offset)
        if len(calls) == 5:
            raise RuntimeError("on_batch failed")

    poison = {"worker": nan_value, "source": float_keys}.get(failure, lambda b: b)
    source = PoisonOnce(inner, 40, poison)
    pipe = Pipeline(source, key="k", values=["v"], partitions=2, store=MemoryStore(),
                    checkpoint_every=3, batch_size=10,
                    nan_policy="raise" if failure == "worker" else "skip")
    with pytest.raises((StreamStateError, RuntimeError)):
        pipe.run(on_batch=callback if failure == "callback" else None)
    report = pipe.run()
    assert report.recovered_epoch == 1 and report.start_offset == 30
    assert report.finished and report.events == 70
    assert _counts(pipe.results("v")) == {k: int((keys == k).sum()) for k in range(7)}


def test_a_second_concurrent_run_raises_instead_of_double_counting() -> None:
    source = ArraySource("events", {"k": np.arange(100) % 5, "v": np.ones(100)})
    pipe = Pipeline(source, key="k", values=["v"], store=MemoryStore(), batch_size=10)
    started, release = threading.Event(), threading.Event()
    runner: list[threading.Thread] = []

    def hold(_batch: Batch) -> None:
        if threading.current_thread() is runner[0]:
            started.set()
            release.wait(10)

    runner.append(threading.Thread(target=pipe.run, kwargs={"on_batch": hold}))
    runner[0].start()
    try:
        assert started.wait(10)
        with pytest.raises(StreamStateError, match="already running"):
            pipe.run()
        with pytest.raises(StreamStateError, match="already running"):
            pipe.checkpoint()
    finally:
        release.set()
        runner[0].join(10)
    assert int(pipe.results("v")["count"].sum()) == 100
    assert pipe.run().events == 0  # a later run in turn is fine


def test_a_closed_pipeline_refuses_to_hand_out_empty_results() -> None:
    source = ArraySource("events", {"k": np.arange(10), "v": np.ones(10)})
    with Pipeline(source, key="k", values=["v"], store=MemoryStore()) as pipe:
        pipe.run()
        assert int(pipe.results("v")["count"].sum()) == 10
    for call in (lambda: pipe.results("v"), lambda: pipe.to_pandas("v"), pipe.run,
                 pipe.checkpoint):
        with pytest.raises(StreamStateError, match="closed"):
            call()
    assert "closed" in repr(pipe)


def test_values_may_be_one_column_name_and_missing_columns_are_named() -> None:
    source = ArraySource("payments", {"user": np.arange(6) % 2, "amount": np.arange(6.0)})
    with Pipeline(source, key="user", values="amount", store=MemoryStore()) as pipe:
        pipe.run()
        assert _counts(pipe.results("amount")) == {0: 3, 1: 3}
        assert pipe.values == ["amount"]
    with pytest.raises(SourceError, match=r"'amnt'.*\['amount', 'user'\]"):
        Pipeline(source, key="user", values=["amnt"], store=MemoryStore())
    with pytest.raises(SourceError, match=r"'usr'.*\['amount', 'user'\]"):
        Pipeline(source, key="usr", values=["amount"], store=MemoryStore())
    # A source that cannot list its columns up front is checked on its first batch.
    opaque = PoisonOnce(source, -1, lambda b: b)
    pipe = Pipeline(opaque, key="user", values=["amnt"], store=MemoryStore())
    with pytest.raises(SourceError, match=r"no column 'amnt'.*\['amount', 'user'\]"):
        pipe.run()
    with pytest.raises(TypeError, match="str"):
        Pipeline(source, key="user", values=[1], store=MemoryStore())  # type: ignore[list-item]
    with pytest.raises(ValueError, match="twice"):
        Pipeline(source, key="user", values=["amount", "amount"], store=MemoryStore())


@settings(max_examples=8, deadline=None)
@given(
    before=st.integers(1, 4),
    after=st.integers(1, 4),
    batch_size=st.integers(200, 2_000),
    checkpoint_every=st.integers(1, 4),
    fail_fraction=st.floats(0.05, 0.95),
)
def test_exactly_once_across_failures_and_rescaling(
    before: int, after: int, batch_size: int, checkpoint_every: int, fail_fraction: float
) -> None:
    keys, values = _data(8_000, 40, seed=before * 100 + after)
    inner = ArraySource("events", {"k": keys, "v": values})
    fail_at = int(8_000 * fail_fraction) // batch_size * batch_size

    def nan_once(batch: Batch) -> Batch:
        bad = np.array(batch.columns["v"], dtype=np.float64)
        bad[-1] = np.nan
        return _with_column(batch, "v", bad)

    store = MemoryStore()
    common: dict[str, Any] = {"key": "k", "values": "v", "store": store,
                              "checkpoint_every": checkpoint_every, "batch_size": batch_size,
                              "nan_policy": "raise"}
    first = Pipeline(PoisonOnce(inner, fail_at, nan_once), partitions=before, **common)
    with pytest.raises(StreamStateError, match="NaN"):
        first.run()
    first.run()  # the same object again, after its failure
    _assert_matches(first.results("v"), _expected(keys, values))
    rescaled = Pipeline(inner, partitions=after, **common)  # a new process, other partitions
    assert rescaled.run().events == 0
    _assert_matches(rescaled.results("v"), _expected(keys, values))


def test_pruning_runs_every_keep_checkpoints_commits_and_after_the_run(tmp_path: Path) -> None:
    keys, values = _data(24_000, 50)
    source = ArraySource("events", {"k": keys, "v": values})
    seen: list[int] = []
    with Pipeline(
        source, key="k", values=["v"], partitions=2, store=LocalStore(str(tmp_path)),
        checkpoint_every=1, full_checkpoint_every=1, batch_size=1_000, keep_checkpoints=3,
    ) as pipe:
        report = pipe.run(on_batch=lambda _batch: seen.append(len(pipe.checkpointer.list_checkpoints())))
        assert len(report.checkpoints) == 24
        # Between prunes (every 3 commits) at most 2 more than kept, plus the one landing.
        assert max(seen) <= 3 + 2 + 1
        assert max(seen) > 3  # pruning is amortized, not run after every commit
        assert len(pipe.checkpointer.list_checkpoints()) == 3  # exact once the run ended
        _assert_matches(pipe.results("v"), _expected(keys, values))
