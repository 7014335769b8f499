"""Rescaling N -> M partitions: NumericAggregateStore.repartitioned() and a Pipeline resumed
with another partition count. Every key ends up held by exactly the partition
partition_batch routes it to, and no statistic changes.

The rescaled store merges each key's partials in ascending partition order, each
partition's unpublished entry into its published one first: exactly what publishing
every partition and reading does, so a store's results after a publish and its rescaled
copy's are compared bit for bit. Against pandas (another summation order) sums, means and
variances are compared to 1e-12 relative.
"""

from __future__ import annotations

import threading
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import MemoryStore

from streamstate import NumericAggregateStore, ObjectStoreCheckpointer, partition_batch
from streamstate.aggregate import KeyType, NanPolicy
from streamstate.pipeline import ArraySource, JobRecord, Pipeline
from streamstate.pipeline.fingerprint import FINGERPRINT_OPERATOR

STATS = ("count", "sum", "min", "max", "mean", "var")


def _owners(keys: list[Any], partitions: int) -> dict[Any, int]:
    """Each key's partition as partition_batch routes it."""
    column: Any = np.asarray(keys, dtype=np.int64) if isinstance(keys[0], int) else list(keys)
    owners: dict[Any, int] = {}
    for p, (mine,) in enumerate(partition_batch(column, partitions)):
        for key in list(mine):
            owners[key.decode() if isinstance(key, bytes) else int(key)] = p
    return owners


def _frame(store: NumericAggregateStore) -> pd.DataFrame:
    frame = store.to_pandas()
    return frame.sort_index()


def _published_copy(store: NumericAggregateStore) -> NumericAggregateStore:
    """A copy of ``store`` with every partition published (what reads then see)."""
    copy = NumericAggregateStore(store.num_partitions, store.key_type,
                                 cast("NanPolicy", store.nan_policy), values=store.values)
    copy.restore(store.snapshot())
    for p in range(copy.num_partitions):
        copy.partition(p).publish()
    return copy


_batch = st.tuples(
    st.integers(0, 5),  # partition (modulo N)
    st.lists(st.tuples(st.integers(0, 30),
                       st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(float("nan"))),
                       st.floats(-1e3, 1e3, allow_nan=False)),
             min_size=1, max_size=30),
    st.booleans(),  # publish the partition afterwards
)


@settings(max_examples=60, deadline=None)
@given(
    before=st.integers(1, 6),
    after=st.integers(1, 6),
    key_type=st.sampled_from(["int64", "str"]),
    columns=st.sampled_from([None, ["a", "b"]]),
    batches=st.lists(_batch, min_size=1, max_size=8),
)
def test_repartitioned_holds_each_key_once_at_its_owner_with_the_same_results(
    before: int, after: int, key_type: str, columns: list[str] | None,
    batches: list[tuple[int, list[tuple[int, float, float]], bool]],
) -> None:
    store = NumericAggregateStore(before, cast("KeyType", key_type), "skip", values=columns)
    seen: list[Any] = []
    for pid, rows, publish in batches:
        keys: list[Any] = [k if key_type == "int64" else f"key{k}" for k, _, _ in rows]
        seen += keys
        first = np.array([a for _, a, _ in rows])
        values: Any = first if columns is None else np.column_stack([first, [b for *_, b in rows]])
        column: Any = np.array(keys, dtype=np.int64) if key_type == "int64" else keys
        store.partition(pid % before).fold(column, values)
        if publish:
            store.partition(pid % before).publish()
    state = store.snapshot()

    rescaled = store.repartitioned(after)

    assert store.snapshot() == state  # the source is unchanged
    assert (rescaled.num_partitions, rescaled.key_type, rescaled.nan_policy, rescaled.values) == (
        after, key_type, "skip", columns)
    expected = _published_copy(store)
    # All-NaN rows create no key: the keys held are those with a counted value.
    held = sorted(set(seen), key=str)
    owners = _owners(held, after)
    for key in held:
        holders = rescaled.partitions_holding(key)
        assert holders == ([owners[key]] if expected.partitions_holding(key) else [])
    assert len(rescaled) == len(expected)
    for p in range(after):
        assert rescaled.partition(p).pending == 0  # everything is published
    pd.testing.assert_frame_equal(_frame(rescaled), _frame(expected), check_exact=True)


def test_repartitioned_is_consistent_while_partitions_publish() -> None:
    # A publish moves partials from a partition's table into its slot without changing any
    # merged total, so a rescale taken mid-publish must see each partial exactly once.
    rng = np.random.default_rng(7)
    store = NumericAggregateStore(4)
    expected = NumericAggregateStore(1)
    for _ in range(6):
        for p in range(4):
            keys = rng.integers(0, 5_000, 20_000)
            values = rng.normal(0, 1, 20_000)
            store.partition(p).fold(keys, values)
            expected.partition(0).fold(keys, values)
    expected.partition(0).publish()
    threads = [threading.Thread(target=store.partition(p).publish) for p in range(4)]
    for thread in threads:
        thread.start()
    rescaled = store.repartitioned(3)
    for thread in threads:
        thread.join()
    got, want = _frame(rescaled), _frame(expected)
    pd.testing.assert_frame_equal(got[["count", "min", "max"]], want[["count", "min", "max"]])
    pd.testing.assert_frame_equal(got, want, rtol=1e-12, check_exact=False)


def test_repartitioned_refuses_bad_arguments_and_leaves_the_store_alone() -> None:
    store = NumericAggregateStore(2, values=["a", "b"])
    store.partition(0).fold(np.array([1, 2]), np.ones((2, 2)))
    state = store.snapshot()
    for bad in (0, 65537):
        with pytest.raises(ValueError, match="num_partitions"):
            store.repartitioned(bad)
    with pytest.raises(TypeError):
        store.repartitioned("2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="other value columns"):
        store._repartition_into(NumericAggregateStore(3))
    with pytest.raises(ValueError, match="key_type"):
        store._repartition_into(NumericAggregateStore(3, "bytes", values=["a", "b"]))
    busy = NumericAggregateStore(3, values=["a", "b"])
    busy.partition(1).fold(np.array([9]), np.ones((1, 2)))
    busy_state = busy.snapshot()
    with pytest.raises(ValueError, match="must be empty"):
        store._repartition_into(busy)
    assert busy.snapshot() == busy_state
    assert store.snapshot() == state
    assert store.partitions_holding(1) == [0]
    assert store.partitions_holding(3) == []
    assert store.partitions_holding(2**70) == []


# -- Pipeline -----------------------------------------------------------------------------


def _source(rows: int, str_keys: bool) -> ArraySource:
    rng = np.random.default_rng(rows + str_keys)
    keys = rng.integers(0, 300, rows)
    v = rng.normal(5, 2, rows)
    v[rng.random(rows) < 0.05] = np.nan  # skipped, each column on its own
    columns: dict[str, Any] = {
        "k": np.array([f"user-{k}" for k in keys]) if str_keys else keys,
        "v": v,
        "w": rng.exponential(3, rows),
    }
    return ArraySource("events", columns)


def _holders(pipe: Pipeline, keys: list[Any]) -> dict[Any, list[int]]:
    store = pipe._aggregates  # the pipeline's store: introspection only
    assert store is not None
    return {key: store.partitions_holding(key) for key in keys}


@pytest.mark.parametrize(("before", "after", "str_keys"),
                         [(3, 2, False), (2, 5, False), (4, 1, False), (1, 3, False),
                          (2, 5, True), (3, 2, True)])
def test_a_pipeline_resumed_with_another_partition_count_rehomes_every_key(
    before: int, after: int, str_keys: bool
) -> None:
    rows = 6_000
    source = _source(rows, str_keys)
    store = MemoryStore()
    common: dict[str, Any] = {"key": "k", "values": ["v", "w"], "store": store,
                              "batch_size": 500, "checkpoint_every": 3}
    # Crashes after 7 batches: checkpoints after batches 3 (full) and 6 (a delta on it).
    Pipeline(source, partitions=before, **common).run(max_batches=7)

    survivor = Pipeline(source, partitions=after, **common)
    stats = survivor.checkpoint()  # recovers (and rescales), then commits
    assert stats.offset == 3_000 and not stats.is_delta  # the rescaled state: a full one
    recovered = ObjectStoreCheckpointer(store).recover()
    assert recovered is not None
    record = JobRecord.decode(recovered.state[FINGERPRINT_OPERATOR][0], "latest")
    assert record.store_partitions == after
    frame = pd.DataFrame(source.read(0, rows).columns)  # type: ignore[union-attr]
    keys = [k if str_keys else int(k) for k in frame["k"].unique()]
    restored = [k for k in keys if k in set(frame["k"][:3_000])]
    owners = _owners(keys, after)
    assert _holders(survivor, restored) == {key: [owners[key]] for key in restored}

    survivor.run()
    assert _holders(survivor, keys) == {key: [owners[key]] for key in keys}
    groups = frame.groupby("k")
    for metric in ("v", "w"):
        got = survivor.to_pandas(metric).sort_index()
        want = groups[metric].agg(["count", "sum", "min", "max", "mean", "var"]).sort_index()
        assert list(got.index) == list(want.index)
        assert (got["count"].to_numpy() == want["count"].to_numpy()).all()
        for stat in ("min", "max"):
            np.testing.assert_array_equal(got[stat].to_numpy(), want[stat].to_numpy())
        for stat in ("sum", "mean", "var"):
            np.testing.assert_allclose(got[stat].to_numpy(), want[stat].to_numpy(), rtol=1e-12)
