"""Keyed state: the C++ backend (reference-design behaviours, ordering, checkpoint/restore,
corruption, TTL, threads, model-based state machine) and the typed state on top of it."""

from __future__ import annotations

import gc
import math
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import streamstate
from streamstate import (
    AggregatingState,
    CorruptDataError,
    InMemoryStateBackend,
    KeyedStateStore,
    ListState,
    MapState,
    StateBackend,
    StatePartitionKey,
)
from streamstate.codec import RecordKind, decode_records, encode_records
from streamstate.serde import Bytes, Int64, Json, Utf8

NOW = 1_000.0


class FakeClock:
    """An injectable clock the tests move by hand."""

    def __init__(self, start: float = NOW) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def partition() -> StatePartitionKey:
    return StatePartitionKey("op1", 0, 0)


def entries(backend: InMemoryStateBackend) -> list[tuple[bytes, bytes]]:
    return backend.range_scan(b"", now=NOW)


# ---- the reference design's tested behaviours ----------------------------------------------


def test_backend_put_get_delete() -> None:
    backend = InMemoryStateBackend()
    backend.put(b"hello", b"world")
    assert backend.get(b"hello") == b"world"
    assert backend.delete(b"hello") is True
    assert backend.get(b"hello") is None
    assert backend.delete(b"missing") is False
    backend.put(bytearray(b"k"), memoryview(b"v"))  # any bytes-like object
    assert backend.get(b"k") == b"v"


def test_backend_range_scan_is_sorted_and_bounded() -> None:
    backend = InMemoryStateBackend()
    for key in (b"ns:b", b"other:c", b"ns:a", b"ns", b"nt", b"ns:\xff"):
        backend.put(key, key.upper())
    assert backend.range_scan(b"ns:") == [
        (b"ns:a", b"NS:A"),
        (b"ns:b", b"NS:B"),
        (b"ns:\xff", b"NS:\xff"),
    ]
    assert [k for k, _ in backend.range_scan(b"")] == sorted(
        [b"ns:b", b"other:c", b"ns:a", b"ns", b"nt", b"ns:\xff"]
    )
    assert backend.range_scan(b"zz") == []


def test_backend_checkpoint_restore_after_mutation() -> None:
    backend = InMemoryStateBackend()
    backend.put(b"k1", b"v1")
    backend.put(b"k2", b"v2")
    snapshot = backend.checkpoint(42)
    assert snapshot
    backend.delete(b"k1")
    backend.put(b"k2", b"changed")
    backend.put(b"k3", b"new")
    assert backend.restore(snapshot) == 42
    assert backend.get(b"k1") == b"v1"
    assert backend.get(b"k2") == b"v2"
    assert backend.get(b"k3") is None
    assert len(backend) == 2


def test_backend_size_bytes() -> None:
    backend = InMemoryStateBackend()
    assert backend.size_bytes() == 0
    backend.put(b"abc", b"def")
    assert backend.size_bytes() == 6
    backend.put(b"key", b"value")
    assert backend.size_bytes() == 14
    backend.put(b"abc", b"")
    assert backend.size_bytes() == 11


def test_keyed_state_store_basic() -> None:
    store = KeyedStateStore(partition(), InMemoryStateBackend(), Utf8(), Int64())
    assert store.get("counter") is None
    store.put("counter", 10)
    assert store.get("counter") == 10
    assert store.update("counter", lambda cur: (cur or 0) + 5) == 15
    assert store.get("counter") == 15
    assert store.delete("counter") is True
    assert store.get("counter") is None
    assert store.delete("counter") is False


def test_aggregating_state_sum() -> None:
    agg = AggregatingState(
        partition(), InMemoryStateBackend(), "total", lambda a, x: a + x, 0, Int64()
    )
    assert agg.get() == 0
    agg.add(10)
    agg.add(20)
    assert agg.add(5) == 35
    assert agg.get() == 35
    agg.clear()
    assert agg.get() == 0


def test_partition_namespacing_isolation() -> None:
    backend = InMemoryStateBackend()
    store1 = KeyedStateStore(StatePartitionKey("op", 0, 0), backend, Utf8(), Int64())
    store2 = KeyedStateStore(StatePartitionKey("op", 0, 1), backend, Utf8(), Int64())
    store1.put("x", 1)
    store2.put("x", 2)
    assert store1.get("x") == 1
    assert store2.get("x") == 2
    assert store1.items() == [("x", 1)]


def test_snapshot_round_trip_empty() -> None:
    snapshot = InMemoryStateBackend().checkpoint(0)
    fresh = InMemoryStateBackend()
    assert fresh.restore(snapshot) == 0
    assert fresh.size_bytes() == 0
    assert len(fresh) == 0


def test_too_short_snapshot_is_corrupt() -> None:
    with pytest.raises(CorruptDataError, match="truncated"):
        InMemoryStateBackend().restore(b"short")


def test_version_bumps_on_every_write() -> None:
    backend = InMemoryStateBackend()
    versions = [backend.version]
    backend.put(b"k", b"v")
    versions.append(backend.version)
    backend.put_many([b"a", b"b"], [b"1", b"2"])
    versions.append(backend.version)
    assert backend.compare_and_set(b"k", b"v", b"w")
    versions.append(backend.version)
    backend.delete(b"k")
    versions.append(backend.version)
    backend.delete_prefix(b"a")
    versions.append(backend.version)
    backend.restore(backend.checkpoint(1))
    versions.append(backend.version)
    assert versions == sorted(set(versions))  # strictly increasing
    unchanged = backend.version
    assert backend.delete(b"missing") is False
    assert not backend.compare_and_set(b"b", b"wrong", b"x")
    backend.get(b"b")
    backend.range_scan(b"")
    assert backend.version == unchanged


# ---- namespacing ---------------------------------------------------------------------------


def test_reference_prefix_ambiguity_is_gone() -> None:
    # The reference's "op:partition:subtask:" made ("a", 1, 0)'s prefix a prefix of the keys of
    # operator "a:1"; with length prefixes neither contains the other.
    a = StatePartitionKey("a", 1, 0).to_prefix()
    a1 = StatePartitionKey("a:1", 0, 0).to_prefix()
    assert not a1.startswith(a) and not a.startswith(a1)
    backend = InMemoryStateBackend()
    KeyedStateStore(StatePartitionKey("a:1", 0, 0), backend, Utf8(), Int64()).put(":x", 7)
    assert KeyedStateStore(StatePartitionKey("a", 1, 0), backend, Utf8(), Int64()).items() == []


PARTITIONS = st.builds(
    StatePartitionKey,
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=2**32 - 1),
)


@given(PARTITIONS, PARTITIONS)
def test_partition_prefixes_are_prefix_free(p: StatePartitionKey, q: StatePartitionKey) -> None:
    if p != q:
        assert not p.to_prefix().startswith(q.to_prefix())
        assert not q.to_prefix().startswith(p.to_prefix())
    else:
        assert p.to_prefix() == q.to_prefix()


@given(PARTITIONS, st.binary(max_size=16))
def test_partition_key_round_trips_from_a_backend_key(p: StatePartitionKey, rest: bytes) -> None:
    assert StatePartitionKey.from_key(p.to_prefix() + rest) == (p, rest)


@given(PARTITIONS, PARTITIONS)
def test_partition_prefixes_sort_by_operator_then_partition_then_subtask(
    p: StatePartitionKey, q: StatePartitionKey
) -> None:
    if p.operator_id == q.operator_id and p.partition_id != q.partition_id:
        assert (p.to_prefix() < q.to_prefix()) == (p.partition_id < q.partition_id)
    if p.operator_id == q.operator_id and p.partition_id == q.partition_id:
        assert (p.to_prefix() < q.to_prefix()) == (p.subtask_index < q.subtask_index)


def test_partition_key_validation() -> None:
    with pytest.raises(ValueError):
        StatePartitionKey("op", -1, 0)
    with pytest.raises(ValueError):
        StatePartitionKey("op", 0, 2**32)
    with pytest.raises(TypeError):
        StatePartitionKey("op", True, 0)
    with pytest.raises(TypeError):
        StatePartitionKey(b"op", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StatePartitionKey("\ud800", 0, 0)
    with pytest.raises(CorruptDataError):
        StatePartitionKey.from_key(b"\x00\x00\x00\x09abc")
    key = StatePartitionKey("op", 3, 4)
    assert key == StatePartitionKey("op", 3, 4) and hash(key) == hash(StatePartitionKey("op", 3, 4))
    assert repr(key) == "StatePartitionKey(operator_id='op', partition_id=3, subtask_index=4)"


def test_state_kinds_and_names_do_not_collide() -> None:
    backend = InMemoryStateBackend()
    p = partition()
    store = KeyedStateStore(p, backend, Utf8(), Utf8(), name="x")
    other = KeyedStateStore(p, backend, Utf8(), Utf8(), name="xy")
    m = MapState(p, backend, "x", Utf8(), Utf8())
    lst = ListState(p, backend, "x", Utf8())
    agg = AggregatingState(p, backend, "x", lambda a, s: a + s, "", Utf8())
    store.put("k", "store")
    other.put("k", "other")
    m.put("k", "map")
    lst.add("list")
    agg.add("agg")
    assert store.items() == [("k", "store")]
    assert other.items() == [("k", "other")]
    assert m.items() == [("k", "map")]
    assert lst.get() == ["list"]
    assert agg.get() == "agg"
    m.clear()
    lst.clear()
    assert store.items() == [("k", "store")] and agg.get() == "agg"


# ---- ordering and batches --------------------------------------------------------------------

KEYS = st.binary(max_size=6).map(lambda b: bytes(x % 4 * 85 for x in b))  # bytes 0, 85, 170, 255


@given(
    st.dictionaries(KEYS, st.binary(max_size=4), max_size=60),
    KEYS,
    st.sampled_from([1, 3, 4096]),
    st.booleans(),
)
def test_range_scan_equals_sorted_filter_of_a_model_dict(
    model: dict[bytes, bytes], prefix: bytes, delta_limit: int, batched: bool
) -> None:
    backend = InMemoryStateBackend(delta_limit=delta_limit)
    if batched:
        backend.put_many(list(model), list(model.values()))
    else:
        for key, value in model.items():
            backend.put(key, value)
    expected = sorted((k, v) for k, v in model.items() if k.startswith(prefix))
    assert backend.range_scan(prefix) == expected


def test_put_many_get_many_delete_many() -> None:
    backend = InMemoryStateBackend(delta_limit=2)
    backend.put_many([b"a", b"b", b"a", b"c"], [b"1", b"2", b"3", b"4"])  # the last "a" wins
    assert backend.get_many([b"a", b"zz", b"c", b"b"]) == [b"3", None, b"4", b"2"]
    assert backend.delete_many([b"a", b"a", b"missing"]) == 1
    assert backend.get_many(k for k in [b"a", b"b"]) == [None, b"2"]  # any iterable
    backend.put_many([], [])
    assert backend.get_many([]) == []
    with pytest.raises(ValueError, match="as many values as keys"):
        backend.put_many([b"x"], [])
    with pytest.raises(TypeError):
        backend.put_many(["text"], [b"v"])  # type: ignore[list-item]
    assert sorted(backend.range_scan(b"")) == [(b"b", b"2"), (b"c", b"4")]


def test_batches_take_any_bytes_like_items_and_any_iterable() -> None:
    backend = InMemoryStateBackend()
    backend.put_many((k for k in [bytearray(b"a"), memoryview(b"b")]), [b"1", bytearray(b"2")])
    assert backend.get_many([memoryview(b"a"), bytearray(b"b")]) == [b"1", b"2"]
    with pytest.raises(TypeError):
        backend.get_many([b"a", 3])  # type: ignore[list-item]
    assert backend.delete_many(iter([b"a"])) == 1


def test_range_scan_leaves_the_garbage_collector_as_it_found_it() -> None:
    backend = InMemoryStateBackend()
    backend.put_many([b"k%d" % i for i in range(1000)], [b"v"] * 1000)
    assert gc.isenabled()
    assert len(backend.range_scan(b"k")) == 1000
    assert gc.isenabled()
    gc.disable()
    try:
        backend.range_scan(b"k")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_bulk_put_many_then_every_kind_of_read() -> None:
    backend = InMemoryStateBackend()
    keys = [i.to_bytes(4, "big") for i in range(50_000)]
    values = [k[::-1] for k in keys]
    backend.put_many(keys[::-1], values[::-1])  # reverse order: the merge must sort
    assert len(backend) == 50_000
    assert backend.get_many(keys[:3]) == values[:3]
    assert backend.range_scan(b"\x00\x00\x01") == list(
        zip(keys[256:512], values[256:512], strict=True)
    )
    restored = InMemoryStateBackend()
    restored.restore(backend.checkpoint(9))
    assert restored.get(keys[-1]) == values[-1]
    assert restored.range_scan(b"") == list(zip(keys, values, strict=True))


def test_delete_prefix_is_bounded_to_the_prefix() -> None:
    backend = InMemoryStateBackend()
    backend.put_many([b"p", b"p\x00", b"p\xff", b"q", b"o\xff"], [b""] * 5)
    assert backend.delete_prefix(b"p") == 3
    assert [k for k, _ in entries(backend)] == [b"o\xff", b"q"]


# ---- checkpoint format and corruption ----------------------------------------------------------


def test_checkpoint_uses_the_record_codec_with_its_id() -> None:
    backend = InMemoryStateBackend()
    backend.put(b"k", b"v")
    backend.put(b"t", b"w", expires_at=NOW + 5)
    kind, records = decode_records(backend.checkpoint(2**64 - 1, now=NOW))
    assert kind == RecordKind.STATE_BACKEND
    header_key, header = records[0]
    assert header_key == b"state_backend"
    assert int.from_bytes(header[:8], "little") == 2**64 - 1
    assert [k for k, _ in records[1:]] == [b"k", b"t"]
    assert records[1][1] == b"\x00v"  # flags, then the value
    assert records[2][1][0] == 1 and records[2][1][9:] == b"w"  # flags, f64 expiry, value
    assert InMemoryStateBackend().restore(backend.checkpoint(2**64 - 1)) == 2**64 - 1


@pytest.mark.parametrize("bad_id", [-1, 2**64])
def test_checkpoint_id_out_of_range(bad_id: int) -> None:
    with pytest.raises(ValueError, match="checkpoint_id"):
        InMemoryStateBackend().checkpoint(bad_id)


def test_checkpoint_id_must_be_an_int() -> None:
    with pytest.raises(TypeError):
        InMemoryStateBackend().checkpoint(True)
    with pytest.raises(TypeError):
        InMemoryStateBackend().checkpoint("1")  # type: ignore[arg-type]


@pytest.fixture()
def populated() -> InMemoryStateBackend:
    backend = InMemoryStateBackend()
    backend.put_many([b"keep-%d" % i for i in range(20)], [b"v" * i for i in range(20)])
    return backend


@given(data=st.data())
def test_corrupt_restore_leaves_the_backend_untouched(data: st.DataObject) -> None:
    source = InMemoryStateBackend()
    source.put_many([b"a", b"b", b"c"], [b"1", b"22", b"333"])
    snapshot = bytearray(source.checkpoint(5))
    target = InMemoryStateBackend()
    target.put(b"mine", b"untouched")
    before, version = entries(target), target.version
    if data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(snapshot) - 1))
        snapshot[index] ^= data.draw(st.integers(1, 255))
        damaged = bytes(snapshot)
    else:
        damaged = bytes(snapshot[: data.draw(st.integers(0, len(snapshot) - 1))])
    with pytest.raises(CorruptDataError):
        target.restore(damaged)
    assert entries(target) == before
    assert target.version == version


HEADER = (b"state_backend", bytes(8) + b"\x01\x00\x00\x00")  # checkpoint id 0, layout 1


@pytest.mark.parametrize(
    ("kind", "records", "reason"),
    [
        (RecordKind.AGGREGATE_STORE, [HEADER], "kind"),
        (RecordKind.STATE_BACKEND, [], "header"),
        (RecordKind.STATE_BACKEND, [(b"other", HEADER[1])], "header"),
        (RecordKind.STATE_BACKEND, [(HEADER[0], bytes(8) + b"\x02\x00\x00\x00")], "layout"),
        (RecordKind.STATE_BACKEND, [HEADER, (b"b", b"\x00"), (b"a", b"\x00")], "order"),
        (RecordKind.STATE_BACKEND, [HEADER, (b"a", b"\x00"), (b"a", b"\x00")], "order"),
        (RecordKind.STATE_BACKEND, [HEADER, (b"a", b"\x04")], "value header"),
        (RecordKind.STATE_BACKEND, [HEADER, (b"a", b"\x01\x00")], "value header"),
        (RecordKind.STATE_BACKEND, [HEADER, (b"a", b"")], "value header"),
        (RecordKind.STATE_BACKEND, [HEADER, (b"a", b"\x01" + bytes(6) + b"\xf8\x7f")], "expiry"),
    ],
)
def test_well_formed_containers_with_bad_content_are_corrupt(
    populated: InMemoryStateBackend, kind: int, records: list[tuple[bytes, bytes]], reason: str
) -> None:
    before = entries(populated)
    with pytest.raises(CorruptDataError, match=reason):
        populated.restore(encode_records(kind, records))
    assert entries(populated) == before


def test_restore_accepts_any_bytes_like(populated: InMemoryStateBackend) -> None:
    snapshot = populated.checkpoint(3)
    for form in (bytearray(snapshot), memoryview(snapshot)):
        fresh = InMemoryStateBackend()
        assert fresh.restore(form) == 3
        assert entries(fresh) == entries(populated)


def test_restore_uses_a_bytes_snapshot_in_place_without_changing_it() -> None:
    source = InMemoryStateBackend()
    source.put_many([b"k%d" % i for i in range(100)], [b"v%d" % i for i in range(100)])
    snapshot = source.checkpoint(1)
    pristine = bytes(bytearray(snapshot))  # an independent copy
    before = sys.getrefcount(snapshot)
    backend = InMemoryStateBackend(delta_limit=4)
    backend.restore(snapshot)
    assert sys.getrefcount(snapshot) == before + 1  # held, not copied
    backend.put(b"k1", b"V1")  # same size: written to the backend's own memory
    backend.delete(b"k2")
    assert snapshot == pristine
    for i in range(200):  # enough writes to compact: the backend lets the snapshot go
        backend.put(b"new%d" % i, b"x")
    assert sys.getrefcount(snapshot) == before
    assert backend.get(b"k1") == b"V1" and backend.get(b"k3") == b"v3"
    again = InMemoryStateBackend()
    again.restore(pristine)
    del pristine  # the only reference left is the backend's
    assert again.range_scan(b"k9") == [(b"k9", b"v9")] + [
        (b"k9%d" % i, b"v9%d" % i) for i in range(10)
    ]


# ---- TTL ---------------------------------------------------------------------------------------


def test_backend_expiry_is_invisible_and_left_out_of_checkpoints() -> None:
    backend = InMemoryStateBackend()
    backend.put(b"forever", b"1")
    backend.put(b"soon", b"2", expires_at=NOW + 10)
    assert backend.get(b"soon", now=NOW + 9.99) == b"2"
    assert backend.get(b"soon", now=NOW + 10) is None  # expires_at <= now
    assert backend.get_many([b"soon", b"forever"], now=NOW + 10) == [None, b"1"]
    assert backend.range_scan(b"", now=NOW + 10) == [(b"forever", b"1")]
    restored = InMemoryStateBackend()
    restored.restore(backend.checkpoint(1, now=NOW + 10))
    assert len(restored) == 1
    assert len(backend) == 2  # stored until purged
    assert backend.delete(b"soon", now=NOW + 10) is False  # gone for readers already
    assert len(backend) == 1
    backend.put(b"soon", b"3", expires_at=NOW + 20)
    assert backend.purge_expired(now=NOW + 20) == 1
    assert backend.size_bytes() == len(b"forever1")


def test_expiry_arguments_are_validated() -> None:
    backend = InMemoryStateBackend()
    for bad in (math.nan, -math.inf):
        with pytest.raises(ValueError, match="expires_at"):
            backend.put(b"k", b"v", expires_at=bad)
    with pytest.raises(ValueError, match="now"):
        backend.get(b"k", now=math.nan)
    with pytest.raises(ValueError, match="now"):
        backend.checkpoint(1, now=math.inf)
    backend.put(b"k", b"v", expires_at=math.inf)  # +inf: never
    assert backend.get(b"k", now=1e300) == b"v"


def test_keyed_store_ttl_with_an_injected_clock() -> None:
    clock = FakeClock()
    backend = InMemoryStateBackend()
    store = KeyedStateStore(partition(), backend, Utf8(), Int64(), ttl=10, clock=clock)
    store.put("a", 1)
    clock.now += 5
    store.update("a", lambda v: (v or 0) + 1)  # a write restarts the TTL
    store.put("b", 2)
    clock.now += 9
    assert store.get("a") == 2 and store.get("b") == 2
    clock.now += 1  # 10 s after the last write
    assert store.get("a") is None and store.get("b") is None
    assert store.items() == []
    assert store.update("a", lambda v: 100 if v is None else v + 1) == 100  # expired == absent
    restored = InMemoryStateBackend()
    restored.restore(backend.checkpoint(1, now=clock.now))
    assert KeyedStateStore(partition(), restored, Utf8(), Int64(), clock=clock).items() == [
        ("a", 100)
    ]


def test_list_map_and_aggregating_ttl() -> None:
    clock = FakeClock()
    backend = InMemoryStateBackend()
    lst = ListState(partition(), backend, "l", Int64(), ttl=5, clock=clock)
    mp = MapState(partition(), backend, "m", Utf8(), Int64(), ttl=5, clock=clock)
    agg = AggregatingState(
        partition(), backend, "a", lambda a, x: a + x, 0, Int64(), ttl=5, clock=clock
    )
    lst.add(1)
    mp.put("x", 1)
    agg.add(7)
    clock.now += 3
    lst.add(2)  # per element: the first expires first
    mp.put("y", 2)
    clock.now += 2
    assert lst.get() == [2]
    assert mp.items() == [("y", 2)] and "x" not in mp
    assert agg.get() == 0  # back to the default
    clock.now += 3
    assert lst.get() == [] and mp.items() == []


def test_ttl_must_be_positive() -> None:
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="ttl"):
            KeyedStateStore(partition(), InMemoryStateBackend(), Utf8(), Int64(), ttl=bad)


# ---- typed state -------------------------------------------------------------------------------


def test_list_state() -> None:
    backend = InMemoryStateBackend()
    lst = ListState(partition(), backend, "events", Json())
    assert lst.get() == []
    lst.add({"a": 1})
    lst.add_all([[1, 2], "three"])
    assert lst.get() == [{"a": 1}, [1, 2], "three"]
    lst.update([4, 5])
    assert lst.get() == [4, 5]
    with pytest.raises(streamstate.serde.SerdeError):
        lst.update([6, math.nan])  # encoded before anything is removed
    assert lst.get() == [4, 5]
    lst.clear()
    assert lst.get() == []
    lst.add(6)
    assert lst.get() == [6]
    # 300 elements: index order is insertion order past every byte boundary of the index.
    lst.add_all(range(300))
    assert lst.get() == [6, *range(300)]


def test_map_state_orders_by_encoded_key() -> None:
    mp = MapState(partition(), InMemoryStateBackend(), "scores", Int64(), Utf8())
    for k in (5, -3, 1000, 0, -(2**63)):
        mp.put(k, f"v{k}")
    assert mp.keys() == [-(2**63), -3, 0, 5, 1000]  # Int64 encodings sort numerically
    assert mp.values() == [f"v{k}" for k in [-(2**63), -3, 0, 5, 1000]]
    assert mp.get(5) == "v5" and mp.get(6) is None
    assert mp.contains(0) and 0 in mp and 7 not in mp
    assert mp.remove(0) is True and mp.remove(0) is False
    mp.clear()
    assert mp.items() == []


def test_aggregating_state_with_a_mutating_combine_keeps_its_default() -> None:
    def append(acc: list[int], x: int) -> list[int]:
        acc.append(x)
        return acc

    backend = InMemoryStateBackend()
    a = AggregatingState(partition(), backend, "a", append, [], Json())
    b = AggregatingState(partition(), backend, "b", append, [], Json())
    a.add(1)
    a.add(2)
    b.add(9)
    assert a.get() == [1, 2] and b.get() == [9]
    a.clear()
    assert a.get() == []


def test_reprs_are_helpful() -> None:
    backend = InMemoryStateBackend()
    backend.put(b"k", b"v")
    assert repr(backend).startswith("<InMemoryStateBackend entries=1 size_bytes=2 version=")
    store = KeyedStateStore(partition(), backend, Utf8(), Int64(), name="counts", ttl=60)
    assert repr(store) == (
        "KeyedStateStore(StatePartitionKey(operator_id='op1', partition_id=0, subtask_index=0), "
        "name='counts', ttl=60, key_serde=Utf8(), value_serde=Int64())"
    )
    assert "ListState(" in repr(ListState(partition(), backend, "l", Bytes()))
    assert "MapState(" in repr(MapState(partition(), backend, "m", Bytes(), Bytes()))
    assert "AggregatingState(" in repr(
        AggregatingState(partition(), backend, "a", lambda a, x: a, 0, Int64())
    )


def test_decode_errors_surface_as_corrupt_data() -> None:
    backend = InMemoryStateBackend()
    store = KeyedStateStore(partition(), backend, Utf8(), Int64())
    backend.put(partition().to_prefix() + b"v\x00\x00\x00\x00k", b"not 8 bytes")
    with pytest.raises(CorruptDataError):
        store.get("k")


# ---- threads -----------------------------------------------------------------------------------


def run_threads(count: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture()
def frequent_thread_switches() -> Iterator[None]:
    """Switch threads every few bytecodes so read-modify-write races actually happen."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_atomic_update_from_four_threads() -> None:
    backend = InMemoryStateBackend()
    calls = [0] * 4

    def increment(t: int) -> None:
        # A store per thread: atomicity comes from the backend, not from a shared object.
        store = KeyedStateStore(partition(), backend, Utf8(), Int64())

        def plus_one(v: int | None) -> int:
            calls[t] += 1
            return (v or 0) + 1

        for _ in range(10_000):
            store.update("counter", plus_one)

    run_threads(4, increment)
    assert KeyedStateStore(partition(), backend, Utf8(), Int64()).get("counter") == 40_000
    assert sum(calls) >= 40_000  # more when a compare-and-set lost a race and retried


@pytest.mark.usefixtures("frequent_thread_switches")
def test_concurrent_list_adds_and_aggregates_lose_nothing() -> None:
    backend = InMemoryStateBackend(delta_limit=16)
    lst = ListState(partition(), backend, "l", Int64())
    agg = AggregatingState(partition(), backend, "sum", lambda a, x: a + x, 0, Int64())

    def work(t: int) -> None:
        for i in range(500):
            lst.add(t * 1000 + i)
            agg.add(1)

    run_threads(4, work)
    assert sorted(lst.get()) == sorted(t * 1000 + i for t in range(4) for i in range(500))
    assert agg.get() == 2000


def test_batches_release_the_gil_and_stay_consistent_under_concurrency() -> None:
    backend = InMemoryStateBackend(delta_limit=64)
    stop = threading.Event()
    seen_unsorted: list[int] = []

    def writer(t: int) -> None:
        keys = [b"w%d/%06d" % (t, i) for i in range(20_000)]
        for round_ in range(3):
            backend.put_many(keys, [b"%d" % round_] * len(keys))
            assert backend.get_many(keys[:100]) == [b"%d" % round_] * 100

    def reader() -> None:
        while not stop.is_set():
            scanned = [k for k, _ in backend.range_scan(b"w")]
            if scanned != sorted(scanned):
                seen_unsorted.append(len(scanned))
            InMemoryStateBackend().restore(backend.checkpoint(1))

    reader_thread = threading.Thread(target=reader)
    reader_thread.start()
    try:
        run_threads(3, writer)
    finally:
        stop.set()
        reader_thread.join()
    assert seen_unsorted == []
    assert len(backend) == 60_000
    assert {v for _, v in backend.range_scan(b"w")} == {b"2"}


# ---- a user-defined backend through the protocol -----------------------------------------------


class DictBackend:
    """A minimal pure-Python StateBackend: proof that the typed state needs only the protocol."""

    def __init__(self) -> None:
        self._data: dict[bytes, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._version = 0

    @staticmethod
    def _now(now: float | None) -> float:
        return NOW if now is None else now

    def get(self, key: bytes, *, now: float | None = None) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            return hit[0] if hit and hit[1] > self._now(now) else None

    def put(self, key: bytes, value: bytes, *, expires_at: float | None = None) -> None:
        with self._lock:
            self._data[key] = (value, math.inf if expires_at is None else expires_at)
            self._version += 1

    def delete(self, key: bytes, *, now: float | None = None) -> bool:
        with self._lock:
            hit = self._data.pop(key, None)
            self._version += 1
            return hit is not None and hit[1] > self._now(now)

    def compare_and_set(
        self,
        key: bytes,
        expected: bytes | None,
        new: bytes | None,
        *,
        expires_at: float | None = None,
        now: float | None = None,
    ) -> bool:
        with self._lock:
            hit = self._data.get(key)
            current = hit[0] if hit and hit[1] > self._now(now) else None
            if current != expected:
                return False
            if new is None:
                self._data.pop(key, None)
            else:
                self._data[key] = (new, math.inf if expires_at is None else expires_at)
            self._version += 1
            return True

    def range_scan(self, prefix: bytes, *, now: float | None = None) -> list[tuple[bytes, bytes]]:
        with self._lock:
            t = self._now(now)
            return sorted(
                (k, v) for k, (v, e) in self._data.items() if k.startswith(prefix) and e > t
            )

    def delete_prefix(self, prefix: bytes, *, now: float | None = None) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for k in doomed:
                del self._data[k]
            self._version += 1
            return len(doomed)

    def checkpoint(self, checkpoint_id: int, *, now: float | None = None) -> bytes:
        raise NotImplementedError

    def restore(self, snapshot: bytes) -> int:
        raise NotImplementedError

    def size_bytes(self) -> int:
        return sum(len(k) + len(v) for k, (v, _) in self._data.items())

    def __len__(self) -> int:
        return len(self._data)

    @property
    def version(self) -> int:
        return self._version


def test_typed_state_works_on_a_user_defined_backend() -> None:
    backend = DictBackend()
    assert isinstance(backend, StateBackend)
    assert isinstance(InMemoryStateBackend(), StateBackend)
    clock = FakeClock()
    store = KeyedStateStore(partition(), backend, Utf8(), Int64(), ttl=5, clock=clock)
    store.put("a", 1)
    assert store.update("a", lambda v: (v or 0) + 1) == 2
    lst = ListState(partition(), backend, "l", Utf8(), clock=clock)
    lst.add_all(["x", "y"])
    mp = MapState(partition(), backend, "m", Utf8(), Int64(), clock=clock)
    mp.put("k", 3)
    assert (store.items(), lst.get(), mp.items()) == ([("a", 2)], ["x", "y"], [("k", 3)])
    clock.now += 5
    assert store.get("a") is None and lst.get() == ["x", "y"]


# ---- model-based state machine ----------------------------------------------------------------

MACHINE_KEYS = st.binary(max_size=3).map(lambda b: bytes(x % 3 * 127 for x in b))  # 0, 127, 254
MACHINE_VALUES = st.binary(max_size=3)


class BackendMachine(RuleBasedStateMachine):
    """Any sequence of operations, then checkpoint/restore, yields the same observable state
    as a dict model (with TTL on a fake clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[bytes, tuple[bytes, float]] = {}
        self.now = NOW
        self.delta_limit = 4096
        self.backend = InMemoryStateBackend()

    @initialize(delta_limit=st.sampled_from([1, 2, 5, 4096]))
    def choose_merge_threshold(self, delta_limit: int) -> None:
        self.delta_limit = delta_limit
        self.backend = InMemoryStateBackend(delta_limit=delta_limit)

    def visible(self) -> dict[bytes, bytes]:
        return {k: v for k, (v, e) in self.model.items() if e > self.now}

    @rule(key=MACHINE_KEYS, value=MACHINE_VALUES, ttl=st.none() | st.integers(1, 5))
    def put(self, key: bytes, value: bytes, ttl: int | None) -> None:
        expires_at = None if ttl is None else self.now + ttl
        self.backend.put(key, value, expires_at=expires_at)
        self.model[key] = (value, math.inf if expires_at is None else expires_at)

    @rule(pairs=st.lists(st.tuples(MACHINE_KEYS, MACHINE_VALUES), max_size=12))
    def put_many(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self.backend.put_many([k for k, _ in pairs], [v for _, v in pairs])
        for k, v in pairs:
            self.model[k] = (v, math.inf)

    @rule(key=MACHINE_KEYS)
    def delete(self, key: bytes) -> None:
        assert self.backend.delete(key, now=self.now) == (key in self.visible())
        self.model.pop(key, None)

    @rule(keys=st.lists(MACHINE_KEYS, max_size=6))
    def delete_many(self, keys: list[bytes]) -> None:
        assert self.backend.delete_many(keys, now=self.now) == len(
            set(keys) & self.visible().keys()
        )
        for k in keys:
            self.model.pop(k, None)

    @rule(prefix=MACHINE_KEYS)
    def delete_prefix(self, prefix: bytes) -> None:
        visible = self.visible()
        assert self.backend.delete_prefix(prefix, now=self.now) == sum(
            k.startswith(prefix) for k in visible
        )
        self.model = {k: e for k, e in self.model.items() if not k.startswith(prefix)}

    @rule(
        key=MACHINE_KEYS,
        guess=st.none() | MACHINE_VALUES,
        use_current=st.booleans(),
        new=st.none() | MACHINE_VALUES,
    )
    def compare_and_set(
        self, key: bytes, guess: bytes | None, use_current: bool, new: bytes | None
    ) -> None:
        current = self.visible().get(key)
        expected = current if use_current else guess
        assert self.backend.compare_and_set(key, expected, new, now=self.now) == (
            expected == current
        )
        if expected == current:
            if new is None:
                self.model.pop(key, None)
            else:
                self.model[key] = (new, math.inf)

    @rule(seconds=st.integers(1, 3))
    def advance_clock(self, seconds: int) -> None:
        self.now += seconds

    @rule()
    def purge(self) -> None:
        expired = [k for k, (_, e) in self.model.items() if e <= self.now]
        assert self.backend.purge_expired(now=self.now) == len(expired)
        for k in expired:
            del self.model[k]

    @rule(checkpoint_id=st.integers(0, 2**64 - 1), switch=st.booleans())
    def checkpoint_and_restore(self, checkpoint_id: int, switch: bool) -> None:
        restored = InMemoryStateBackend(delta_limit=self.delta_limit)
        assert (
            restored.restore(self.backend.checkpoint(checkpoint_id, now=self.now)) == checkpoint_id
        )
        assert restored.range_scan(b"", now=self.now) == sorted(self.visible().items())
        assert len(restored) == len(self.visible())  # expired entries were left out
        if switch:
            self.backend = restored
            self.model = {k: e for k, e in self.model.items() if e[1] > self.now}

    @rule(keys=st.lists(MACHINE_KEYS, max_size=5))
    def get_many(self, keys: list[bytes]) -> None:
        visible = self.visible()
        assert self.backend.get_many(keys, now=self.now) == [visible.get(k) for k in keys]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def get_known_key(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.backend.get(key, now=self.now) == self.visible().get(key)

    @invariant()
    def scans_match_the_model(self) -> None:
        visible = self.visible()
        for prefix in (b"", b"\x00", b"\x7f", b"\xfe", b"\x00\xfe"):
            expected = sorted((k, v) for k, v in visible.items() if k.startswith(prefix))
            assert self.backend.range_scan(prefix, now=self.now) == expected
        assert len(self.backend) == len(self.model)
        assert self.backend.size_bytes() == sum(len(k) + len(v) for k, (v, _) in self.model.items())


TestBackendMachine = BackendMachine.TestCase
TestBackendMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# ----------------------------------------------------------------------------------------
# The key/value handles are one interface: the same operations under the same names


@pytest.mark.parametrize("make", ["value", "map"])
def test_value_and_map_state_share_one_interface(make: str) -> None:
    backend = InMemoryStateBackend()
    state: KeyedStateStore[str, int] | MapState[str, int]
    if make == "value":
        state = streamstate.ValueState(partition(), backend, Utf8(), Int64(), "s")
        assert isinstance(state, KeyedStateStore)
    else:
        state = MapState(partition(), backend, "s", Utf8(), Int64())
    state.put("a", 1)
    state.put("b", 2)
    assert state.update("a", lambda n: (n or 0) + 10) == 11
    assert "a" in state and state.contains("b") and "zz" not in state
    assert state.keys() == ["a", "b"] and state.values() == [11, 2]
    assert state.remove("a") and not state.delete("a")  # delete: the old name of remove
    assert state.items() == [("b", 2)]
    state.clear()
    assert state.items() == [] and state.get("b") is None


def test_value_state_name_may_be_positional_or_keyword() -> None:
    backend = InMemoryStateBackend()
    positional = KeyedStateStore(partition(), backend, Utf8(), Int64(), "n")
    keyword = KeyedStateStore(partition(), backend, Utf8(), Int64(), name="n")
    positional.put("k", 5)
    assert keyword.get("k") == 5 and positional.name == keyword.name == "n"
