"""The pipeline helper: routing, partition threads, checkpoint cadence, crash and recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import LocalStore, MemoryStore

from streamstate.pipeline import ArraySource, Pipeline, route_partitions


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


def test_route_partitions_is_stable_and_in_range() -> None:
    keys = np.arange(10_000, dtype=np.int64)
    parts = route_partitions(keys, 4)
    assert parts.min() == 0 and parts.max() == 3
    # Every partition gets a fair share (a broken mixer would pile keys into one).
    assert np.bincount(parts, minlength=4).min() > 2000
    np.testing.assert_array_equal(parts, route_partitions(keys.copy(), 4))
    # A key routes the same whether it arrives alone or in a batch.
    assert all(route_partitions(keys[i : i + 1], 4)[0] == parts[i] for i in range(0, 10_000, 997))


def test_route_partitions_for_strings_ignores_padding_width() -> None:
    short = np.array([b"a", b"bb"], dtype="S2")
    wide = np.array([b"a", b"bb"], dtype="S9")
    np.testing.assert_array_equal(route_partitions(short, 7), route_partitions(wide, 7))
    as_str = np.array(["a", "bb"], dtype=object)
    np.testing.assert_array_equal(route_partitions(as_str, 7), route_partitions(short, 7))
    with pytest.raises(ValueError):
        route_partitions(short, 0)


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
        assert len(pipe.checkpointer.list_checkpoints()) == 3  # pruned to keep_checkpoints


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
