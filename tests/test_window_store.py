"""WindowedAggregateStore against a pure-Python reference model of event-time windows."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streamstate
from streamstate import CorruptDataError, WindowedAggregateStore
from streamstate.codec import RecordKind, decode_records, encode_records
from streamstate.testing import assert_corruption_detected

STATS = ("count", "sum", "min", "max", "mean", "var", "std")
NAN = float("nan")


# ---------------------------------------------------------------------------------------
# The reference: windows as the docs define them, one event at a time, in plain Python.


@dataclass
class Spec:
    kind: str
    size: int = 0
    step: int = 0
    gap: int = 0

    def store_args(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "step": self.step, "gap": self.gap}


@dataclass
class Reference:
    """(key, window) -> values per column, per partition; the store's rules spelled out."""

    spec: Spec
    width: int
    closed_through: int = -(2**63)
    late: int = 0
    # tumbling / hopping: (partition, key, start) -> list of rows
    windows: dict[tuple[int, Any, int], list[list[float]]] = field(default_factory=dict)
    # session: (partition, key) -> [[start, end, rows], ...]
    sessions: dict[tuple[int, Any], list[list[Any]]] = field(default_factory=dict)

    def fold(self, pid: int, key: Any, t: int, row: list[float], watermark: int) -> None:
        closed = max(watermark, self.closed_through)
        spec = self.spec
        if spec.kind == "session":
            end = t + spec.gap
            if end <= closed:
                self.late += 1
                return
            if all(math.isnan(x) for x in row):
                return
            spans = self.sessions.setdefault((pid, key), [])
            joined = [s for s in spans if s[1] > closed and s[0] < end and t < s[1]]
            merged = [min([t] + [s[0] for s in joined]), max([end] + [s[1] for s in joined]), []]
            for s in joined:
                merged[2].extend(s[2])
                spans.remove(s)
            merged[2].append(row)
            spans.append(merged)
            return
        step = spec.step or spec.size
        last = (t // step) * step
        if last + spec.size <= closed:
            self.late += 1
            return
        if all(math.isnan(x) for x in row):
            return
        for k in range(spec.size // step):
            start = last - k * step
            if start + spec.size <= closed:
                break
            self.windows.setdefault((pid, key, start), []).append(row)

    def open_windows(self) -> int:
        if self.spec.kind == "session":
            return sum(len(spans) for spans in self.sessions.values())
        return len(self.windows)

    def emit(self, watermark: int | None) -> list[tuple[Any, ...]]:
        """Rows (end, start, key, stats per column) of the windows ending <= watermark
        (every window when None), removed; partitions of one (key, window) merged."""
        merged: dict[tuple[int, int, Any], list[list[float]]] = {}
        if self.spec.kind == "session":
            for (_, key), spans in self.sessions.items():
                for s in list(spans):
                    if watermark is None or s[1] <= watermark:
                        merged.setdefault((s[1], s[0], key), []).extend(s[2])
                        spans.remove(s)
        else:
            for pid, key, start in list(self.windows):
                end = start + self.spec.size
                if watermark is None or end <= watermark:
                    merged.setdefault((end, start, key), []).extend(self.windows.pop((pid, key, start)))
        if watermark is not None:
            self.closed_through = max(self.closed_through, watermark)
        return [(*where, *(stats([r[c] for r in rows]) for c in range(self.width)))
                for where, rows in sorted(merged.items())]  # fmt: skip


def stats(values: list[float]) -> tuple[float, ...]:
    """count, sum, min, max, mean, var (ddof=1), std of the non-NaN values (nan_policy skip)."""
    xs = [x for x in values if not math.isnan(x)]
    n = len(xs)
    if n == 0:
        return (0, 0.0, NAN, NAN, NAN, NAN, NAN)
    mean = math.fsum(xs) / n
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else NAN
    return (n, math.fsum(xs), min(xs), max(xs), mean, var, math.sqrt(var))


def rows_of(columns: dict[str, Any], names: list[str]) -> list[tuple[Any, ...]]:
    """The store's emitted columns as reference rows."""
    out = []
    for i in range(len(columns["window_end"])):
        key = columns["key"][i]
        per_column = tuple(
            tuple(columns[f"{v}_{s}"][i] for s in STATS) for v in names
        )
        out.append((int(columns["window_end"][i]), int(columns["window_start"][i]),
                    key.item() if isinstance(key, np.generic) else key, *per_column))  # fmt: skip
    return out


def close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def assert_rows_equal(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    assert [r[:3] for r in got] == [r[:3] for r in want]
    for g, w in zip(got, want, strict=True):
        for got_stats, want_stats in zip(g[3:], w[3:], strict=True):
            assert got_stats[0] == want_stats[0], (g, w)
            assert all(close(x, y) for x, y in zip(got_stats[1:], want_stats[1:], strict=True)), (g, w)


def assert_same_emission(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name, column in a.items():
        if isinstance(column, list):
            assert column == b[name], name
        else:
            np.testing.assert_array_equal(column, b[name], err_msg=name)


# ---------------------------------------------------------------------------------------
# Strategies.


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["tumbling", "hopping", "session"]))
    if kind == "tumbling":
        return Spec(kind, size=draw(st.integers(1, 25)))
    if kind == "hopping":
        step = draw(st.integers(1, 10))
        return Spec(kind, size=step * draw(st.integers(1, 4)), step=step)
    return Spec(kind, gap=draw(st.integers(1, 25)))


@dataclass
class Scenario:
    spec: Spec
    partitions: int
    width: int
    key_type: str
    # batches of (partition, keys, times, values rows, fold watermark, emit watermark or None)
    batches: list[tuple[int, list[Any], list[int], list[list[float]], int, int | None]]


def key_of(key_type: str, k: int) -> Any:
    return k if key_type == "int64" else (f"k{k}".encode() if key_type == "bytes" else f"k{k}")


@st.composite
def scenarios(draw: st.DrawFn, *, max_batches: int = 6) -> Scenario:
    spec = draw(specs())
    partitions = draw(st.integers(1, 3))
    width = draw(st.integers(1, 2))
    key_type = draw(st.sampled_from(["int64", "bytes", "str"]))
    value = st.one_of(st.floats(-1e6, 1e6), st.just(NAN)) if draw(st.booleans()) else st.floats(-1e3, 1e3)
    clock = draw(st.integers(-60, 60))
    batches = []
    for _ in range(draw(st.integers(1, max_batches))):
        n = draw(st.integers(0, 12))
        ks = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
        # Disorder: times scattered around a clock that moves forward.
        ts = draw(st.lists(st.integers(clock - 30, clock + 30), min_size=n, max_size=n))
        rows = draw(st.lists(st.lists(value, min_size=width, max_size=width), min_size=n, max_size=n))
        fold_watermark = clock - draw(st.integers(0, 40))
        emit_watermark = draw(st.one_of(st.none(), st.integers(clock - 40, clock + 10)))
        # Sessions merge within a partition only: a key is routed to one partition then.
        pid = draw(st.integers(0, partitions - 1))
        batches.append((pid, [key_of(key_type, k) for k in ks], ts, rows, fold_watermark, emit_watermark))
        clock += draw(st.integers(0, 25))
    return Scenario(spec, partitions, width, key_type, batches)


def build(s: Scenario) -> WindowedAggregateStore:
    values = None if s.width == 1 else [f"v{c}" for c in range(s.width)]
    return WindowedAggregateStore(s.partitions, key_type=s.key_type, values=values, **s.spec.store_args())  # type: ignore[arg-type]


def names_of(s: Scenario) -> list[str]:
    return ["value"] if s.width == 1 else [f"v{c}" for c in range(s.width)]


def route(s: Scenario, pid: int, key: Any) -> int:
    """Sessions: each key in one partition (the reference merges within one)."""
    if s.spec.kind != "session":
        return pid
    if isinstance(key, int):
        return key % s.partitions
    return sum(key.encode() if isinstance(key, str) else key) % s.partitions


def fold_batch(store: WindowedAggregateStore, s: Scenario, ref: Reference,
               batch: tuple[int, list[Any], list[int], list[list[float]], int, int | None]) -> int:  # fmt: skip
    pid, keys, times, rows, watermark, _ = batch
    late = 0
    for p in range(s.partitions):
        idx = [i for i in range(len(keys)) if route(s, pid, keys[i]) == p]
        if not idx and p != pid:
            continue
        ks = [keys[i] for i in idx]
        key_arg: Any = np.array(ks, dtype=np.int64) if s.key_type == "int64" else ks
        block = np.array([rows[i] for i in idx], dtype=np.float64).reshape(len(idx), s.width)
        values: Any = block[:, 0] if s.width == 1 else block
        late += store.partition(p).fold(key_arg, np.array([times[i] for i in idx], dtype=np.int64),
                                        values, watermark=watermark)  # fmt: skip
        for i in idx:
            ref.fold(p, keys[i], times[i], rows[i], watermark)
    return late


# ---------------------------------------------------------------------------------------
# Properties.


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_emitted_rows_equal_the_reference(s: Scenario) -> None:
    store = build(s)
    ref = Reference(s.spec, s.width)
    late = 0
    for batch in s.batches:
        late += fold_batch(store, s, ref, batch)
        assert store.open_windows == len(store) == ref.open_windows()
        if batch[5] is not None:
            got = store.emit(batch[5])
            want = ref.emit(batch[5])
            assert_rows_equal(rows_of(got, names_of(s)), want)
            # Emission frees: what was emitted is no longer held.
            assert store.open_windows == ref.open_windows()
            assert store.closed_through == ref.closed_through
    assert late == ref.late
    assert_rows_equal(rows_of(store.emit_all(), names_of(s)), ref.emit(None))
    assert store.open_windows == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_snapshot_restore_round_trip(s: Scenario, data: st.DataObject) -> None:
    store = build(s)
    ref = Reference(s.spec, s.width)
    for batch in s.batches:
        fold_batch(store, s, ref, batch)
        if batch[5] is not None:
            store.emit(batch[5])
    snap = store.snapshot()
    restored = build(Scenario(s.spec, s.partitions + data.draw(st.integers(0, 1)), s.width, s.key_type, []))
    restored.restore(snap)
    assert restored.open_windows == store.open_windows
    assert restored.closed_through == store.closed_through
    if restored.num_partitions == store.num_partitions:
        assert restored.snapshot() == snap  # equal contents, equal bytes
    buffer = bytearray(b"old")
    store.snapshot_into(buffer)
    assert bytes(buffer) == snap
    assert_same_emission(restored.emit_all(), store.emit_all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(max_batches=8))
def test_restore_plus_deltas_equals_the_live_store(s: Scenario) -> None:
    store = build(s)
    replica = build(s)
    ref = Reference(s.spec, s.width)
    replica.restore(store.snapshot())
    buffer = bytearray()
    for i, batch in enumerate(s.batches):
        fold_batch(store, s, ref, batch)
        if batch[5] is not None:
            store.emit(batch[5])
        if i % 2 == 0:
            delta = store.snapshot_delta()
        else:
            store.snapshot_into(buffer, delta=True)
            delta = bytes(buffer)
        replica.apply_delta(delta)
        # Both full snapshots are equal bytes (so both stores also share the identity the
        # next delta names as its parent).
        assert replica.snapshot() == store.snapshot()
        assert replica.open_windows == store.open_windows
    assert_same_emission(replica.emit_all(), store.emit_all())


def test_deltas_carry_only_what_changed() -> None:
    store = WindowedAggregateStore(1, kind="tumbling", size=10, key_type="int64")
    part = store.partition(0)
    part.fold(np.arange(1000), np.repeat(np.arange(0, 100, 10), 100), np.ones(1000), watermark=-100)
    full = store.snapshot()
    part.fold(np.array([5]), np.array([95]), np.array([2.0]), watermark=-100)
    one_window = store.snapshot_delta()
    assert len(one_window) < len(full) / 5
    store.emit(30)  # three windows the capture held
    removed = store.snapshot_delta()
    assert len(removed) < 200
    replica = WindowedAggregateStore(1, kind="tumbling", size=10, key_type="int64")
    replica.restore(full)
    replica.apply_delta(one_window)
    replica.apply_delta(removed)
    assert replica.snapshot() == store.snapshot()
    with pytest.raises(CorruptDataError, match="does not follow"):
        replica.apply_delta(removed)  # applied already: its parent is gone


def test_session_deltas_after_compaction() -> None:
    store = WindowedAggregateStore(2, kind="session", gap=5, key_type="int64")
    replica = WindowedAggregateStore(2, kind="session", gap=5, key_type="int64")
    replica.restore(store.snapshot())
    for step in range(6):
        keys = np.arange(step * 100, step * 100 + 300)
        store.partition(step % 2).fold(keys, np.full(300, step * 10), np.ones(300), watermark=step * 10 - 5)
        store.emit(step * 10)
        replica.apply_delta(store.snapshot_delta())
        assert replica.snapshot() == store.snapshot()
    assert replica.open_windows == store.open_windows == 300  # the last step's sessions


# ---------------------------------------------------------------------------------------
# Semantics spelled out.


def test_windows_align_to_the_epoch_and_hop() -> None:
    store = WindowedAggregateStore(1, kind="hopping", size=10, step=5, key_type="int64")
    assert store.partition(0).fold(np.array([1, 1]), np.array([-3, 12]), np.array([1.0, 2.0]), watermark=-100) == 0
    out = store.emit_all()
    assert list(zip(out["window_start"], out["window_end"], out["value_sum"], strict=True)) == [
        (-10, 0, 1.0), (-5, 5, 1.0), (5, 15, 2.0), (10, 20, 2.0),
    ]  # fmt: skip


def test_late_events_and_closed_windows() -> None:
    store = WindowedAggregateStore(1, kind="tumbling", size=10, key_type="str")
    part = store.partition(0)
    # Window [0, 10) is closed at watermark 10: the event at 5 is late, the one at 15 not.
    assert part.fold(["a", "a"], np.array([5, 15]), np.array([1.0, 2.0]), watermark=10) == 1
    assert store.emit(20)["key"] == ["a"]
    # emit raised closed_through to 20: a fold with an older watermark cannot reopen [10, 20).
    assert part.fold(["a"], np.array([12]), np.array([1.0]), watermark=0) == 1
    assert store.closed_through == 20 and len(store) == 0


def test_sessions_merge_and_bridge() -> None:
    store = WindowedAggregateStore(1, kind="session", gap=10, key_type="bytes")
    part = store.partition(0)
    part.fold([b"k", b"k", b"k"], np.array([0, 20, 3]), np.array([1.0, 2.0, 3.0]), watermark=-100)
    assert len(store) == 2  # [0, 13) and [20, 30)
    part.fold([b"k"], np.array([12]), np.array([4.0]), watermark=-100)  # [12, 22) bridges both
    assert len(store) == 1
    out = store.emit(30)
    assert (out["key"], list(out["window_start"]), list(out["window_end"])) == ([b"k"], [0], [30])
    assert out["value_count"][0] == 4 and out["value_sum"][0] == 10.0
    # An event exactly a gap after the last one starts a new session.
    part.fold([b"k", b"k"], np.array([100, 110]), np.array([1.0, 1.0]), watermark=30)
    assert len(store) == 2


def test_emission_is_sorted_and_merges_partitions() -> None:
    store = WindowedAggregateStore(3, kind="tumbling", size=10, key_type="int64", values=["a", "b"])
    for p in range(3):
        store.partition(p).fold(np.array([3, 1, 2]), np.array([25, 5, 5]),
                                {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([NAN, 1.0, 1.0])},
                                watermark=-100)  # fmt: skip
    out = store.emit_all()
    assert list(out) == ["key", "window_start", "window_end"] + [f"{v}_{s}" for v in "ab" for s in STATS]
    assert list(out["key"]) == [1, 2, 3]
    assert list(out["a_count"]) == [3, 3, 3] and list(out["b_count"]) == [3, 3, 0]
    assert math.isnan(out["b_min"][2]) and out["b_sum"][2] == 0.0


def test_nan_policies() -> None:
    def run(policy: str) -> dict[str, Any]:
        store = WindowedAggregateStore(1, kind="tumbling", size=10, key_type="int64", nan_policy=policy)  # type: ignore[arg-type]
        store.partition(0).fold(np.array([1, 1, 2]), np.array([1, 2, 3]), np.array([1.0, NAN, NAN]), watermark=-100)
        return store.emit_all()

    skip = run("skip")
    assert list(skip["key"]) == [1] and skip["value_count"][0] == 1  # key 2 had only NaN
    propagate = run("propagate")
    assert list(propagate["key"]) == [1, 2] and math.isnan(propagate["value_sum"][0])
    store = WindowedAggregateStore(1, kind="tumbling", size=10, key_type="int64", nan_policy="raise")
    with pytest.raises(ValueError, match="NaN value at row 1"):
        store.partition(0).fold(np.array([1, 1]), np.array([1, 2]), np.array([1.0, NAN]), watermark=0)
    assert len(store) == 0


@pytest.mark.parametrize(
    ("args", "time"),
    [
        ({"kind": "tumbling", "size": 7}, -(2**63)),
        ({"kind": "tumbling", "size": 10}, 2**63 - 5),
        ({"kind": "hopping", "size": 10, "step": 5}, -(2**63) + 3),
        ({"kind": "session", "gap": 10}, 2**63 - 5),
    ],
)
def test_windows_beyond_int64_are_refused(args: dict[str, Any], time: int) -> None:
    store = WindowedAggregateStore(1, key_type="int64", **args)
    with pytest.raises(ValueError, match=r"times\[1\] .* does not fit in int64"):
        store.partition(0).fold(np.array([1, 1]), np.array([0, time]), np.array([1.0, 2.0]), watermark=0)
    assert len(store) == 0  # nothing of the batch was folded


def test_the_last_window_before_int64_max_works() -> None:
    store = WindowedAggregateStore(1, kind="tumbling", size=7, key_type="int64")
    top = 2**63 - 1  # a multiple of 7
    store.partition(0).fold(np.array([1]), np.array([top - 3]), np.array([1.0]), watermark=0)
    out = store.emit(top)
    assert list(out["window_end"]) == [top] and len(store) == 0


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="multiple of step"):
        WindowedAggregateStore(1, kind="hopping", size=10, step=3)
    with pytest.raises(ValueError, match="step <= size"):
        WindowedAggregateStore(1, kind="hopping", size=10, step=20)
    with pytest.raises(ValueError, match="size > 0"):
        WindowedAggregateStore(1, kind="tumbling", size=0)
    with pytest.raises(ValueError, match="gap > 0"):
        WindowedAggregateStore(1, kind="session", gap=-1)
    with pytest.raises(ValueError, match="kind must be one of"):
        WindowedAggregateStore(1, kind="sliding", size=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_partitions"):
        WindowedAggregateStore(0, kind="session", gap=1)


def test_wrong_types_raise_type_errors_naming_the_type() -> None:
    store = WindowedAggregateStore(1, kind="tumbling", size=10, key_type="int64")
    part = store.partition(0)
    cases: list[tuple[Any, str]] = [
        (lambda: WindowedAggregateStore(1, kind="tumbling", size=1.5), "size must be an int"),  # type: ignore[arg-type]
        (lambda: WindowedAggregateStore(1, kind=3, size=1), "kind must be a str"),  # type: ignore[arg-type]
        (lambda: part.fold(np.array([1]), np.array([1.5]), np.array([1.0]), watermark=0), "times must be an int64"),
        (lambda: part.fold(np.array([1]), "x", np.array([1.0]), watermark=0), "times must be an int64"),
        (lambda: part.fold(np.array([1]), np.array([1]), np.array([1.0]), watermark=1.0), "watermark must be an int"),  # type: ignore[arg-type]
        (lambda: part.fold(np.array([1.0]), np.array([1]), np.array([1.0]), watermark=0), "keys must be integers"),
        (lambda: part.fold(np.array([1]), np.array([1]), "x", watermark=0), "values must be a float64"),
        (lambda: store.emit("now"), "watermark must be an int"),  # type: ignore[arg-type]
        (lambda: store.restore("x"), "data must be a bytes-like"),  # type: ignore[arg-type]
        (lambda: store.snapshot_into(b"x"), "out must be a bytearray"),  # type: ignore[arg-type]
        (lambda: store.snapshot_into(bytearray(), delta=1), "delta must be a bool"),  # type: ignore[arg-type]
        (lambda: store.partition("0"), "partition_id must be an int"),  # type: ignore[arg-type]
    ]
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()
    with pytest.raises(ValueError, match="times and values differ"):
        part.fold(np.array([1]), np.array([1, 2]), np.array([1.0]), watermark=0)
    assert len(store) == 0


def test_datetime64_times() -> None:
    store = WindowedAggregateStore(1, kind="tumbling", size=3_600_000, key_type="str")
    times = np.array(["2024-01-01T00:10", "2024-01-01T01:10"], dtype="datetime64[ms]")
    store.partition(0).fold(["a", "a"], times, np.array([1.0, 2.0]), watermark=0)
    out = store.emit_all()
    assert list(out["window_start"]) == [int(np.datetime64("2024-01-01T00:00", "ms").astype(np.int64)),
                                         int(np.datetime64("2024-01-01T01:00", "ms").astype(np.int64))]  # fmt: skip
    with pytest.raises(TypeError, match="datetime64\\[ms\\]"):
        store.partition(0).fold(["a"], times.astype("datetime64[s]"), np.array([1.0]), watermark=0)


# ---------------------------------------------------------------------------------------
# Corrupt input.


def loaded_store(kind: str = "tumbling") -> WindowedAggregateStore:
    args: dict[str, Any] = {"kind": kind, "gap": 5} if kind == "session" else {"kind": kind, "size": 10}
    store = WindowedAggregateStore(2, key_type="bytes", values=["x"], **args)
    for p in range(2):
        store.partition(p).fold([b"a", b"bb", b"a"], np.array([1, 12, 25]), np.array([1.0, 2.0, 3.0]), watermark=-5)
    return store


@pytest.mark.parametrize("kind", ["tumbling", "session"])
def test_corrupt_or_truncated_bytes_raise_and_leave_the_store_as_it_was(kind: str) -> None:
    target = loaded_store(kind)
    before = target.snapshot()
    source = loaded_store(kind)
    source.partition(0).fold([b"c"], np.array([3]), np.array([9.0]), watermark=-5)
    assert_corruption_detected(target.restore, source.snapshot(), masks=(0x01,))
    target.restore(before)
    delta_source = loaded_store(kind)
    delta_source.restore(before)
    delta_source.partition(1).fold([b"z"], np.array([40]), np.array([1.0]), watermark=-5)
    delta = delta_source.snapshot_delta()

    def restore_then_apply(data: bytes) -> None:
        target.restore(before)
        target.apply_delta(data)

    assert_corruption_detected(restore_then_apply, delta, masks=(0x80,))
    target.restore(before)
    assert target.snapshot() == before


def forged(data: bytes, edit: Any) -> bytes:
    """The container with its records edited and its CRC made right again."""
    kind, records = decode_records(data)
    return encode_records(kind, edit(list(records)))


def test_well_formed_containers_with_bad_contents_are_refused() -> None:
    store = loaded_store()
    good = store.snapshot()
    header_key, header = decode_records(good)[1][0]
    bad: list[bytes] = [
        forged(good, lambda r: r[1:]),  # no header
        forged(good, lambda r: [r[0], (r[1][0], r[1][1][:-3])]),  # a truncated window chunk
        forged(good, lambda r: [r[0], (r[1][0], b"\xff\xff\xff\x7f" + r[1][1][4:])]),  # a giant count
        forged(good, lambda r: [(header_key, header[:4] + b"\x09" + header[5:])] + r[1:]),  # partitions
        forged(good, lambda r: [(header_key, header[:10] + b"\x0b" + header[11:])] + r[1:]),  # size 11
        forged(good, lambda r: [*r, (b"mystery", b"")]),  # an unknown record
        forged(good, lambda r: [*r, r[1]]),  # a window's keys listed twice
        encode_records(RecordKind.NUMERIC_AGGREGATE_STORE, decode_records(good)[1]),  # another kind
        WindowedAggregateStore(2, kind="tumbling", size=10, key_type="int64", values=["x"]).snapshot(),
        WindowedAggregateStore(2, kind="tumbling", size=10, key_type="bytes").snapshot(),  # columns
        WindowedAggregateStore(2, kind="session", gap=10, key_type="bytes", values=["x"]).snapshot(),
        WindowedAggregateStore(3, kind="tumbling", size=10, key_type="bytes", values=["x"]).snapshot(),
    ]
    target = loaded_store()
    before = target.snapshot()
    for data in bad:
        with pytest.raises(CorruptDataError):
            target.restore(data)
        assert target.snapshot() == before


def test_a_delta_of_another_parent_is_refused() -> None:
    store = loaded_store()
    other = loaded_store()
    other.snapshot()
    other.partition(0).fold([b"q"], np.array([50]), np.array([1.0]), watermark=0)
    delta = other.snapshot_delta()
    before = store.snapshot()
    store.partition(0).fold([b"q"], np.array([50]), np.array([1.0]), watermark=0)
    store.snapshot()  # the store's identity moves on: other's delta no longer follows it
    store.restore(before)
    store.partition(0).fold([b"r"], np.array([50]), np.array([1.0]), watermark=0)
    changed = store.snapshot()
    with pytest.raises(CorruptDataError, match="does not follow"):
        store.apply_delta(delta)
    assert store.snapshot() == changed


# ---------------------------------------------------------------------------------------
# Threads and Python niceties.


def test_partitions_fold_concurrently() -> None:
    store = WindowedAggregateStore(4, kind="tumbling", size=100, key_type="int64")
    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 500, 20000), rng.integers(0, 1000, 20000)) for _ in range(4)]

    def work(p: int) -> None:
        keys, times = batches[p]
        for chunk in range(0, 20000, 2000):
            store.partition(p).fold(keys[chunk:chunk + 2000], times[chunk:chunk + 2000],
                                    np.ones(2000), watermark=-1)  # fmt: skip

    threads = [threading.Thread(target=work, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = store.emit_all()
    assert int(out["value_count"].sum()) == 80000
    keys = np.concatenate([k for k, _ in batches])
    times = np.concatenate([t for _, t in batches])
    assert len(out["key"]) == len({(int(k), int(t) // 100) for k, t in zip(keys, times, strict=True)})


def test_repr_properties_and_exports() -> None:
    store = WindowedAggregateStore(2, kind="hopping", size=60_000, step=30_000, key_type="str", values=["x", "y"])
    assert repr(store) == (
        "WindowedAggregateStore(num_partitions=2, kind='hopping', size=60000, step=30000, "
        "key_type='str', values=['x', 'y'], nan_policy='skip', open_windows=0)"
    )
    assert (store.kind, store.size, store.step, store.gap, store.columns) == ("hopping", 60000, 30000, 0, ["x", "y"])
    assert repr(store.partition(1)) == "WindowPartition(partition_id=1, open_windows=0)"
    assert streamstate.WindowedAggregateStore is WindowedAggregateStore
    assert "WindowedAggregateStore" in streamstate.__all__
    session = WindowedAggregateStore(1, kind="session", gap=5)
    assert "gap=5" in repr(session) and session.key_type == "bytes" and session.columns == []
    assert store.memory_bytes() > 0


@pytest.mark.parametrize("key_type", ["int64", "bytes", "str"])
def test_emit_arrow_matches_emit(key_type: str) -> None:
    pa = pytest.importorskip("pyarrow")

    def loaded() -> WindowedAggregateStore:
        store = WindowedAggregateStore(2, kind="tumbling", size=10, key_type=key_type, values=["x"])  # type: ignore[arg-type]
        keys: Any = np.array([3, 1, 2]) if key_type == "int64" else ["c", "a", "b"]
        store.partition(1).fold(keys, np.array([25, 5, 5]), np.array([[1.0], [2.0], [3.0]]), watermark=-5)
        return store

    plain, arrow = loaded(), loaded()
    expected = plain.emit(10)
    batch = arrow.emit_arrow(10)
    assert isinstance(batch, pa.RecordBatch) and batch.schema.names == list(expected)
    assert batch.schema.field("key").type == {"int64": pa.int64(), "bytes": pa.binary(), "str": pa.string()}[key_type]
    for name, column in expected.items():
        got = batch.column(name)
        if isinstance(column, list):
            assert got.to_pylist() == column
        else:
            np.testing.assert_array_equal(got.to_numpy(), column, err_msg=name)
    assert arrow.emit_all_arrow().column("window_start").to_pylist() == [20]
    assert len(arrow) == 0


# ---------------------------------------------------------------------------------------
# Emission per partition (the pipeline's: each key routed to one partition).


def fold_routed(stores: list[WindowedAggregateStore], s: Scenario, ref: Reference,
                batch: tuple[int, list[Any], list[int], list[list[float]], int, int | None]) -> None:  # fmt: skip
    """Folds a batch into each store with every key routed to one partition, whatever the kind."""
    _, keys, times, rows, watermark, _ = batch
    for p in range(s.partitions):
        idx = [i for i in range(len(keys)) if route_by_key(s, keys[i]) == p]
        ks = [keys[i] for i in idx]
        block = np.array([rows[i] for i in idx], dtype=np.float64).reshape(len(idx), s.width)
        for store in stores:
            key_arg: Any = np.array(ks, dtype=np.int64) if s.key_type == "int64" else list(ks)
            store.partition(p).fold(key_arg, np.array([times[i] for i in idx], dtype=np.int64),
                                    block[:, 0] if s.width == 1 else block, watermark=watermark)  # fmt: skip
        for i in idx:
            ref.fold(p, keys[i], times[i], rows[i], watermark)


def route_by_key(s: Scenario, key: Any) -> int:
    if isinstance(key, int):
        return key % s.partitions
    return sum(key.encode() if isinstance(key, str) else key) % s.partitions


def partition_rows(parts: list[dict[str, Any]], s: Scenario) -> list[tuple[Any, ...]]:
    """Every partition's rows, checked to be in the partition they were routed to and in
    the promised order, then sorted as emit() sorts them."""
    assert len(parts) == s.partitions
    out = []
    for p, columns in enumerate(parts):
        rows = rows_of(columns, names_of(s))
        assert all(route_by_key(s, r[2]) == p for r in rows)
        if s.spec.kind == "session":
            assert [r[:3] for r in rows] == sorted(r[:3] for r in rows)
        else:
            starts = [r[1] for r in rows]
            assert starts == sorted(starts)  # window by window
        out.extend(rows)
    return sorted(out, key=lambda r: r[:3])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_partition_emission_equals_the_sorted_emission(s: Scenario) -> None:
    by_partition, merged = build(s), build(s)
    ref = Reference(s.spec, s.width)
    for batch in s.batches:
        fold_routed([by_partition, merged], s, ref, batch)
        if batch[5] is not None:
            got = partition_rows(by_partition.emit_partitions(batch[5]), s)
            assert_rows_equal(got, rows_of(merged.emit(batch[5]), names_of(s)))
            assert_rows_equal(got, ref.emit(batch[5]))
            # The state left behind is emit()'s, byte for byte.
            assert by_partition.closed_through == merged.closed_through
            assert by_partition.snapshot() == merged.snapshot()
    got = partition_rows(by_partition.emit_all_partitions(), s)
    assert_rows_equal(got, rows_of(merged.emit_all(), names_of(s)))
    assert by_partition.open_windows == 0
    assert by_partition.snapshot() == merged.snapshot()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(max_batches=8), st.integers(0, 7))
def test_partition_emission_is_the_same_after_a_restore(s: Scenario, cut: int) -> None:
    """A store restored from a capture (and its deltas) emits the same rows in the same
    order as the live one: what a pipeline replaying after a crash relies on."""
    live = build(s)
    replica = build(s)
    ref = Reference(s.spec, s.width)
    replica.restore(live.snapshot())
    for i, batch in enumerate(s.batches):
        fold_routed([live], s, ref, batch)
        if i == cut:
            replica.restore(live.snapshot())
        else:
            replica.apply_delta(live.snapshot_delta())
    for mine, theirs in zip(replica.emit_all_partitions(), live.emit_all_partitions(), strict=True):
        assert_same_emission(mine, theirs)


def test_partition_emission_recycles_window_memory() -> None:
    """Emitted windows' tables are kept for the next windows: memory stays flat, and the
    recycled windows start empty."""
    store = WindowedAggregateStore(2, kind="tumbling", size=10, key_type="int64")
    keys = np.arange(20_000)
    sizes = []
    for window in range(6):
        for p in range(2):
            part = keys[keys % 2 == p]
            store.partition(p).fold(part, np.full(len(part), window * 10 + 1), np.ones(len(part)),
                                    watermark=window * 10)  # fmt: skip
        parts = store.emit_partitions_arrow(window * 10 + 10)
        assert [b.num_rows for b in parts] == [10_000, 10_000]
        assert all(b.column("value_count").to_pylist() == [1] * 10_000 for b in parts)
        assert all(set(b.column("window_start").to_pylist()) == {window * 10} for b in parts)
        sizes.append(store.memory_bytes())
        assert store.open_windows == 0
    assert max(sizes[1:]) <= sizes[1] * 1.01
    single = store.emit_all_partitions_arrow()
    assert [b.num_rows for b in single] == [0, 0]
    assert single[0].schema.names == ["key", "window_start", "window_end"] + [f"value_{s}" for s in STATS]
