"""Key groups (issue 16): routing by group owner, snapshots sectioned by key group,
exports of some partitions (``snapshot(partitions=...)``) and ``restore_from`` at any
partition count.

A key's group is its routing hash's top bits (``route_partitions(keys, G, key_groups=G)``
gives it: with as many partitions as groups each group is its own owner), and partition p
of P owns the contiguous groups ``key_group_range(p, P, G)``, group g going to ``g * P //
G``. ``restore_from`` merges a key's partials artifact by artifact in the order given;
exports of partitions 0, 1, ... in that order therefore merge exactly as publishing every
partition and reading does, and are compared bit for bit with that. Against pandas (another
summation order) sums, means and variances are compared to 1e-9 relative.
"""

from __future__ import annotations

import struct
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import MemoryStore

import streamstate as ss
from streamstate import NumericAggregateStore, key_group_range
from streamstate._core import RecordKind, _moments_of, decode_records, encode_records
from streamstate.aggregate import KeyType, NanPolicy
from streamstate.pipeline import ArraySource, JobRecord, Pipeline, route_partitions
from streamstate.pipeline.fingerprint import FINGERPRINT_OPERATOR

_int_keys = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=80)
_str_keys = st.lists(st.text(max_size=12), min_size=1, max_size=80)
_bytes_keys = st.lists(st.binary(max_size=12), min_size=1, max_size=80)


def _column(keys: list[Any]) -> Any:
    return np.array(keys, dtype=np.int64) if isinstance(keys[0], int) else keys


def _groups(keys: list[Any], key_groups: int) -> np.ndarray[Any, Any]:
    return route_partitions(_column(keys), key_groups, key_groups=key_groups)


# ----------------------------------------------------------------------------------------
# Routing


@settings(max_examples=80, deadline=None)
@given(
    keys=st.one_of(_int_keys, _str_keys, _bytes_keys),
    partitions=st.integers(1, 16),
    key_groups=st.sampled_from([16, 256]),
)
def test_a_key_routes_to_the_owner_of_its_group(
    keys: list[Any], partitions: int, key_groups: int
) -> None:
    groups = _groups(keys, key_groups)
    routed = route_partitions(_column(keys), partitions, key_groups=key_groups)
    assert ((groups >= 0) & (groups < key_groups)).all()
    assert (routed == groups * partitions // key_groups).all()
    for group, p in zip(groups.tolist(), routed.tolist(), strict=True):
        assert group in key_group_range(p, partitions, key_groups)
    # The default is 256 groups; P dividing G routes as before key groups (G = P).
    if key_groups == 256:
        assert (route_partitions(_column(keys), partitions) == routed).all()
    if key_groups % partitions == 0:
        same = route_partitions(_column(keys), partitions, key_groups=partitions)
        assert (same == routed).all()


@pytest.mark.parametrize("key_groups", [1, 5, 16, 256, 1000])
def test_ranges_cover_every_group_contiguously_in_order(key_groups: int) -> None:
    for partitions in sorted({1, 2, 3, 7, min(key_groups, 16), key_groups}):
        if partitions > key_groups:
            continue
        ranges = [key_group_range(p, partitions, key_groups) for p in range(partitions)]
        assert all(isinstance(r, range) and len(r) > 0 and r.step == 1 for r in ranges)
        assert [g for r in ranges for g in r] == list(range(key_groups))
        for p, r in enumerate(ranges):
            assert all(g * partitions // key_groups == p for g in r)
    assert key_group_range(1, 3, 16) == range(6, 11)  # ceil(16 / 3), ceil(32 / 3)
    assert key_group_range(0, 1) == range(256)


def test_partitions_above_key_groups_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="key_groups"):
        NumericAggregateStore(17, key_groups=16)
    with pytest.raises(ValueError, match="key_groups"):
        ss.partition_batch(np.arange(4), 300)
    with pytest.raises(ValueError, match="key_groups"):
        route_partitions(np.arange(4), 9, key_groups=8)
    with pytest.raises(ValueError, match="key_groups"):
        key_group_range(0, 3, 2)
    with pytest.raises(ValueError, match="partition"):
        key_group_range(3, 3)
    with pytest.raises(ValueError, match="key_groups"):
        NumericAggregateStore(1, key_groups=0)
    with pytest.raises(TypeError, match="key_groups"):
        NumericAggregateStore(1, key_groups=cast("int", "256"))
    assert NumericAggregateStore(300, key_groups=300).key_groups == 300
    assert NumericAggregateStore(2).key_groups == 256


# ----------------------------------------------------------------------------------------
# Exports and restore_from

_rows = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 60), st.floats(-1e6, 1e6, allow_nan=False)),
    min_size=1,
    max_size=60,
)


def _key(k: int, key_type: str) -> Any:
    return f"k{k}" if key_type == "str" else k


def _folded(
    partitions: int, key_groups: int, key_type: str, rows: list[tuple[int, int, float]],
    publish_every: int,
) -> NumericAggregateStore:
    """A store of ``partitions`` with every row folded into partition ``p % partitions``
    (not where routing would put it: exports and restore_from go by holder and by group),
    some partitions published after some batches, the rest left local."""
    store = NumericAggregateStore(partitions, cast("KeyType", key_type), key_groups=key_groups)
    for i, (p, k, v) in enumerate(rows):
        part = store.partition(p % partitions)
        keys = np.array([k]) if key_type == "int64" else [_key(k, key_type)]
        part.fold(keys, np.array([v]))
        if publish_every and i % publish_every == 0:
            part.publish()
    return store


def _reference(rows: list[tuple[int, int, float]], key_type: str) -> pd.DataFrame:
    frame = pd.DataFrame({"k": [_key(k, key_type) for _, k, _ in rows],
                          "v": [v for _, _, v in rows]})
    return frame.groupby("k")["v"].agg(["count", "sum", "min", "max", "mean", "var"])


def _published(store: NumericAggregateStore) -> pd.DataFrame:
    copy = NumericAggregateStore(store.num_partitions, store.key_type,
                                 cast("NanPolicy", store.nan_policy), values=store.values,
                                 key_groups=store.key_groups)
    copy.restore(store.snapshot())
    for p in range(copy.num_partitions):
        copy.partition(p).publish()
    return copy.to_pandas().sort_index()


def _assert_matches(got: pd.DataFrame, want: pd.DataFrame) -> None:
    got, want = got.sort_index(), want.sort_index()
    assert list(got.index) == list(want.index)
    assert (got["count"].to_numpy() == want["count"].to_numpy()).all()
    for stat in ("min", "max"):
        np.testing.assert_array_equal(got[stat].to_numpy(), want[stat].to_numpy())
    for stat in ("sum", "mean"):
        np.testing.assert_allclose(got[stat].to_numpy(), want[stat].to_numpy(),
                                   rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(got["var"].to_numpy(), want["var"].to_numpy(),
                               rtol=1e-9, atol=1e-3)


@settings(max_examples=60, deadline=None)
@given(
    before=st.integers(1, 6),
    after=st.integers(1, 6),
    key_groups=st.sampled_from([16, 256]),
    key_type=st.sampled_from(["int64", "str"]),
    rows=_rows,
    publish_every=st.integers(0, 4),
    data=st.data(),
)
def test_exports_restore_into_any_partition_count_exactly(
    before: int, after: int, key_groups: int, key_type: str,
    rows: list[tuple[int, int, float]], publish_every: int, data: st.DataObject,
) -> None:
    store = _folded(before, key_groups, key_type, rows, publish_every)
    whole = _published(store)
    _assert_matches(whole, _reference(rows, key_type))
    exports = [store.snapshot(partitions=[p]) for p in range(before)]
    full = store.snapshot()
    owned = data.draw(st.lists(st.integers(0, after - 1), unique=True), label="owned")

    for artifacts in (exports, [full]):
        target = NumericAggregateStore(after, cast("KeyType", key_type), key_groups=key_groups)
        target.restore_from(artifacts)
        # Several artifacts (one export per partition, in order) merge as a read does.
        pd.testing.assert_frame_equal(target.to_pandas().sort_index(), whole)
        owners = route_partitions(_column(list(whole.index)), after, key_groups=key_groups)
        for key, owner in zip(whole.index, owners.tolist(), strict=True):
            assert target.partitions_holding(key) == [owner]

        some = NumericAggregateStore(after, cast("KeyType", key_type), key_groups=key_groups)
        some.restore_from(artifacts, partitions=owned)
        mine = whole[np.isin(owners, owned)]
        if len(mine) == 0:
            assert len(some) == 0
        else:
            pd.testing.assert_frame_equal(some.to_pandas().sort_index(), mine)

    # Exports of several partitions at once cover what they hold, and merge into the whole.
    cut = data.draw(st.integers(0, before), label="cut")
    halves = [store.snapshot(partitions=range(cut)), store.snapshot(partitions=range(cut, before))]
    target = NumericAggregateStore(after, cast("KeyType", key_type), key_groups=key_groups)
    target.restore_from(halves)
    _assert_matches(target.to_pandas(), whole)


def test_an_export_is_sectioned_and_holds_only_its_partitions_keys() -> None:
    store = NumericAggregateStore(2, key_groups=16)
    store.partition(0).fold(np.arange(0, 50), np.ones(50))
    store.partition(0).publish()
    store.partition(1).fold(np.arange(40, 100), np.full(60, 2.0))  # 40..49 in both
    only_one = NumericAggregateStore(3, key_groups=16)
    only_one.restore_from([store.snapshot(partitions=[1])])
    assert len(only_one) == 60 and only_one.result(45).sum == 2.0  # type: ignore[union-attr]
    assert store.snapshot(partitions=[]) != store.snapshot()
    nothing = NumericAggregateStore(3, key_groups=16)
    nothing.restore_from([store.snapshot(partitions=[])])
    assert len(nothing) == 0
    # restore() of an export works too (as restore_from of it alone).
    again = NumericAggregateStore(2, key_groups=16)
    again.restore(store.snapshot(partitions=[0, 1]))
    assert again.result(45).count == 2  # type: ignore[union-attr]
    _, records = decode_records(store.snapshot())
    names = [name for name, _ in records]
    assert names[:2] == [b"streamstate.numeric_aggregate_store", b"sections"]


def test_exports_leave_the_delta_chain_alone() -> None:
    store = NumericAggregateStore(2, key_groups=16)
    store.partition(0).fold(np.arange(20), np.ones(20))
    base = store.snapshot()
    store.partition(0).publish()
    store.partition(1).fold(np.arange(10, 30), np.ones(20))
    store.snapshot(partitions=[0])  # an export: no capture, tracking stays
    delta = store.snapshot_delta()
    replica = NumericAggregateStore(2, key_groups=16)
    replica.restore(base)
    replica.apply_delta(delta)
    assert replica.snapshot() == store.snapshot()


# ----------------------------------------------------------------------------------------
# Validation: corrupt, truncated and foreign artifacts


def _loaded(key_groups: int = 16) -> NumericAggregateStore:
    store = NumericAggregateStore(3, key_groups=key_groups)
    store.partition(0).fold(np.arange(300), np.ones(300))
    store.partition(0).publish()
    store.partition(2).fold(np.arange(200, 400), np.ones(200))
    return store


def _rewritten(snapshot: bytes, edit: Any) -> bytes:
    """``snapshot`` with its records changed by ``edit(records)`` and sealed again (a
    valid container whose contents are wrong)."""
    kind, records = decode_records(snapshot)
    return encode_records(kind, edit(list(records)))


def _index(records: list[tuple[bytes, bytes]]) -> list[list[int]]:
    body = records[1][1]
    (n,) = struct.unpack_from("<I", body)
    return [list(struct.unpack_from("<IIQ", body, 4 + 16 * i)) for i in range(n)]


def _with_index(records: list[tuple[bytes, bytes]], index: list[list[int]]) -> list[Any]:
    body = struct.pack("<I", len(index)) + b"".join(struct.pack("<IIQ", *s) for s in index)
    return [records[0], (records[1][0], body), *records[2:]]


def _broken_artifacts() -> dict[str, bytes]:
    full = _loaded().snapshot()
    index = _index(decode_records(full)[1])

    def miscounted(records: list[Any]) -> list[Any]:
        edited = [list(s) for s in index]
        edited[0][2] += 1
        return _with_index(records, edited)

    def swapped(records: list[Any]) -> list[Any]:
        # The first two sections trade their first (shared) chunks: keys in the wrong one.
        a, b = 2, 2 + index[0][1]
        out = list(records)
        out[a], out[b] = records[b], records[a]
        return out

    def short_index(records: list[Any]) -> list[Any]:
        return _with_index(records, index[:-1])

    return {
        "flipped byte": full[:40] + bytes([full[40] ^ 1]) + full[41:],
        "truncated": full[: len(full) // 2],
        "miscounted section": _rewritten(full, miscounted),
        "keys in the wrong section": _rewritten(full, swapped),
        "index short of records": _rewritten(full, short_index),
        "no index": _rewritten(full, lambda r: [r[0], *r[2:]]),
    }


@pytest.mark.parametrize("what", list(_broken_artifacts()))
def test_a_broken_artifact_is_refused_and_the_store_unchanged(what: str) -> None:
    broken = _broken_artifacts()[what]
    good = _loaded().snapshot(partitions=[2])
    for store in (NumericAggregateStore(2, key_groups=16), NumericAggregateStore(5, key_groups=16)):
        store.partition(1).fold(np.array([7, 8]), np.array([1.0, 2.0]))
        before = store.snapshot()
        with pytest.raises(ss.CorruptDataError):
            store.restore_from([good, broken])
        with pytest.raises(ss.CorruptDataError):
            store.restore(broken)
        assert store.snapshot() == before


def test_restore_from_decodes_only_the_sections_its_partitions_own() -> None:
    full = _loaded().snapshot()
    index = _index(decode_records(full)[1])
    last = index[-1][0]  # the highest group holding keys: partition 1 of 2 owns it

    def damage_last(records: list[Any]) -> list[Any]:
        out = list(records)
        name, body = out[-1]
        out[-1] = (name, body[:-1])  # a truncated chunk, under a valid checksum
        return out

    damaged = _rewritten(full, damage_last)
    store = NumericAggregateStore(2, key_groups=16)
    assert last in key_group_range(1, 2, 16)
    store.restore_from([damaged], partitions=[0])  # never reads the damaged section
    assert len(store) > 0
    with pytest.raises(ss.CorruptDataError):
        store.restore_from([damaged], partitions=[1])
    with pytest.raises(ss.CorruptDataError):
        store.restore_from([damaged])


def test_other_key_groups_are_refused_clearly() -> None:
    snapshot = _loaded(key_groups=16).snapshot()
    export = _loaded(key_groups=16).snapshot(partitions=[0])
    store = NumericAggregateStore(2)  # 256 groups
    store.partition(0).fold(np.array([1]), np.array([1.0]))
    before = store.snapshot()
    for call in (lambda: store.restore(snapshot), lambda: store.restore_from([snapshot]),
                 lambda: store.restore_from([export])):
        with pytest.raises(ValueError, match="16 key groups, this store has 256"):
            call()
    assert store.snapshot() == before


def test_bad_arguments_raise_typed_errors() -> None:
    store = _loaded()
    with pytest.raises(TypeError, match="artifacts"):
        store.restore_from(cast("Any", b"bytes"))
    with pytest.raises(TypeError, match="bytes-like"):
        store.restore_from(cast("Any", ["text"]))
    with pytest.raises(ValueError, match="partition_id"):
        store.restore_from([store.snapshot()], partitions=[3])
    with pytest.raises(ValueError, match="partition_id"):
        store.snapshot(partitions=[5])
    with pytest.raises(TypeError, match="partitions"):
        store.snapshot(partitions=cast("Any", 1))
    assert store.snapshot(partitions=np.array([0, 2])) == store.snapshot(partitions=(0, 2))


# ----------------------------------------------------------------------------------------
# Older layouts (no key groups, no sections) still restore


def _moments(values: list[float]) -> bytes:
    return _moments_of(np.array(values))


def _old_snapshot(columns: list[str] | None) -> bytes:
    """A layout 2 (one unnamed column) or 3 (named columns) snapshot of a 2-partition
    int64 store: key 5 published by both partitions, key 9 local to partition 1."""
    width = len(columns) if columns else 1
    header = struct.pack("<IIB", 3 if columns else 2, 2, 0)
    if columns:
        header += struct.pack("<I", len(columns))
        header += b"".join(struct.pack("<I", len(c)) + c.encode() for c in columns)
    shared = struct.pack("<I", 1) + struct.pack("<qI", 5, 2)
    shared += struct.pack("<I", 0) + _moments([1.0, 2.0]) * width
    shared += struct.pack("<I", 1) + _moments([3.0]) * width
    local = struct.pack("<I", 1) + struct.pack("<q", 9) + _moments([4.0, 6.0]) * width
    return encode_records(RecordKind.NUMERIC_AGGREGATE_STORE, [
        (b"streamstate.numeric_aggregate_store", header),
        (b"shared", shared),
        (b"local" + struct.pack("<I", 1), local),
    ])


@pytest.mark.parametrize("columns", [None, ["a", "b"]])
def test_layouts_before_key_groups_still_restore(columns: list[str] | None) -> None:
    old = _old_snapshot(columns)
    exact = NumericAggregateStore(2, values=columns)
    exact.restore(old)
    assert exact.partitions_holding(5) == [0, 1] and exact.partitions_holding(9) == [1]
    assert struct.unpack_from("<I", decode_records(exact.snapshot())[1][0][1])[0] == 4
    for after in (1, 3):
        rescaled = NumericAggregateStore(after, values=columns)
        rescaled.restore_from([old])
        five = rescaled.result(5, columns[0] if columns else None)
        nine = rescaled.result(9, columns[-1] if columns else None)
        assert five is not None and five.count == 3 and five.sum == 6.0  # type: ignore[union-attr]
        assert nine is not None and nine.mean == 5.0  # type: ignore[union-attr]
        owners = route_partitions(np.array([5, 9]), after).tolist()
        assert [rescaled.partitions_holding(5), rescaled.partitions_holding(9)] == [
            [owners[0]], [owners[1]]]


# ----------------------------------------------------------------------------------------
# The Pipeline: key groups recorded, and a full checkpoint read straight into M partitions


def _source(rows: int, str_keys: bool) -> ArraySource:
    rng = np.random.default_rng(rows + 7 * str_keys)
    keys = rng.integers(0, 400, rows)
    return ArraySource("events", {
        "k": np.array([f"user-{k}" for k in keys]) if str_keys else keys,
        "v": rng.normal(5, 2, rows),
    })


@pytest.mark.parametrize(("before", "after", "str_keys"),
                         [(3, 2, False), (2, 5, False), (2, 5, True), (3, 2, True)])
def test_a_pipeline_rescales_a_full_checkpoint_through_restore_from(
    before: int, after: int, str_keys: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 4_000
    source = _source(rows, str_keys)
    store = MemoryStore()
    common: dict[str, Any] = {"key": "k", "values": ["v"], "store": store,
                              "batch_size": 500, "checkpoint_every": 2,
                              "full_checkpoint_every": 1}
    Pipeline(source, partitions=before, **common).run(max_batches=5)  # full after batch 4
    recovered = ss.ObjectStoreCheckpointer(store).recover()
    assert recovered is not None
    record = JobRecord.decode(recovered.state[FINGERPRINT_OPERATOR][0], "latest")
    assert (record.store_partitions, record.key_groups) == (before, 256)

    calls: list[int] = []
    real = NumericAggregateStore.restore_from

    def counting(self: NumericAggregateStore, *args: Any, **kwargs: Any) -> None:
        calls.append(self.num_partitions)
        real(self, *args, **kwargs)

    monkeypatch.setattr(NumericAggregateStore, "restore_from", counting)
    survivor = Pipeline(source, partitions=after, **common)
    assert survivor.recover() == 2_000
    assert calls == [after]  # straight into the new partitions, no repartitioned() pass
    survivor.run()
    frame = pd.DataFrame(source.read(0, rows).columns)  # type: ignore[union-attr]
    want = frame.groupby("k")["v"].agg(["count", "sum", "min", "max", "mean", "var"])
    _assert_matches(survivor.to_pandas("v"), want)
    pipe_store = survivor._aggregates  # introspection only
    assert pipe_store is not None and pipe_store.key_groups == 256
    keys = list(want.index)
    owners = route_partitions(keys if str_keys else np.array(keys), after).tolist()
    assert [pipe_store.partitions_holding(k) for k in keys] == [[o] for o in owners]
