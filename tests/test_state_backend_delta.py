"""Incremental checkpoints of the state backend (issue 13): checkpoint_delta() / apply_delta().

The law every test leans on: restoring the last full checkpoint and applying the deltas
taken after it, in order, gives a backend whose full checkpoint (at the same ``now``) and
items equal the live backend's.
"""

from __future__ import annotations

import struct
import threading
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

import streamstate as ss
from streamstate.codec import RecordKind, decode_records, encode_records
from streamstate.testing import assert_corruption_detected

REMOVED = b"\x02"  # a removal record's value: the flags byte alone
HEADER_KEY = b"state_backend"
# The delta header: layout, checkpoint id, parent id, parent identity, sequence, now.
HEADER = struct.Struct("<IQQIQd")


def replay(base: bytes | None, deltas: list[bytes]) -> ss.InMemoryStateBackend:
    replica = ss.InMemoryStateBackend()
    if base is not None:
        replica.restore(base)
    for delta in deltas:
        replica.apply_delta(delta)
    return replica


def changes(delta: bytes) -> dict[bytes, bytes | None]:
    """key -> value (None: removed) of a delta, read through the generic record decoder."""
    kind, records = decode_records(delta)
    assert kind == RecordKind.STATE_BACKEND_DELTA
    assert records[0][0] == HEADER_KEY
    out: dict[bytes, bytes | None] = {}
    for key, value in records[1:]:
        if value == REMOVED:
            out[key] = None
        else:
            expiring = value[0] & 1
            out[key] = value[9:] if expiring else value[1:]
    return out


# -- the law, under random operations ------------------------------------------------------

KEYS = st.sampled_from([b"a", b"a1", b"a2", b"ab", b"b", b"b1", b"b22", b"c", b"", b"\xff"])
VALUES = st.binary(max_size=6)
TTLS = st.one_of(st.none(), st.floats(0, 6))


class DeltaMachine(RuleBasedStateMachine):
    """Random writes, TTLs and clock moves interleaved with full and delta checkpoints. A
    follower applies every delta as it is taken; a check replays the chain from the last
    full checkpoint and compares both with the live backend."""

    def __init__(self) -> None:
        super().__init__()
        # A tiny tail limit: compactions (which move slots and drop deleted ones) happen
        # between most captures, so the tracking has to follow them.
        self.live = ss.InMemoryStateBackend(unsorted_tail_limit=2)
        self.follower = ss.InMemoryStateBackend(unsorted_tail_limit=3)
        self.now = 100.0
        self.next_id = 1
        self.base: bytes | None = None
        self.deltas: list[bytes] = []

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else self.now + ttl

    @rule(key=KEYS, value=VALUES, ttl=TTLS)
    def put(self, key: bytes, value: bytes, ttl: float | None) -> None:
        self.live.put(key, value, expires_at=self._expiry(ttl))

    @rule(keys=st.lists(KEYS, max_size=6), value=VALUES, ttl=TTLS)
    def put_many(self, keys: list[bytes], value: bytes, ttl: float | None) -> None:
        self.live.put_many(keys, [value + k for k in keys], expires_at=self._expiry(ttl))

    @rule(key=KEYS)
    def delete(self, key: bytes) -> None:
        self.live.delete(key, now=self.now)

    @rule(keys=st.lists(KEYS, max_size=4))
    def delete_many(self, keys: list[bytes]) -> None:
        self.live.delete_many(keys, now=self.now)

    @rule(prefix=st.sampled_from([b"a", b"b", b"", b"a1", b"zz"]))
    def delete_prefix(self, prefix: bytes) -> None:
        self.live.delete_prefix(prefix, now=self.now)

    @rule(key=KEYS, new=st.one_of(st.none(), VALUES), ttl=TTLS, use_current=st.booleans())
    def compare_and_set(
        self, key: bytes, new: bytes | None, ttl: float | None, use_current: bool
    ) -> None:
        expected = self.live.get(key, now=self.now) if use_current else None
        self.live.compare_and_set(key, expected, new, expires_at=self._expiry(ttl), now=self.now)

    @rule()
    def purge_expired(self) -> None:
        self.live.purge_expired(now=self.now)

    @rule(step=st.floats(-1, 4))
    def move_clock(self, step: float) -> None:
        self.now += step  # mostly forward; a step back makes expired entries visible again

    @rule()
    def full_checkpoint(self) -> None:
        self.base = self.live.checkpoint(self._id(), now=self.now)
        self.deltas = []
        self.follower.restore(self.base)

    @rule()
    def delta_checkpoint(self) -> None:
        checkpoint_id = self._id()
        delta = self.live.checkpoint_delta(checkpoint_id, now=self.now)
        self.deltas.append(delta)
        assert self.follower.apply_delta(delta) == checkpoint_id

    @precondition(lambda self: self.base is not None)
    @rule()
    def live_restores_its_last_full(self) -> None:
        assert self.base is not None
        self.live.restore(self.base)
        self.deltas = []
        self.follower.restore(self.base)

    @rule()
    def check(self) -> None:
        self.delta_checkpoint()
        replica = replay(self.base, self.deltas)
        items = self.live.range_scan(b"", now=self.now)
        assert replica.range_scan(b"", now=self.now) == items
        assert self.follower.range_scan(b"", now=self.now) == items
        # Taking the live full checkpoint resets the chain: carry on from it.
        expected = self.live.checkpoint(self._id(), now=self.now)
        assert replica.checkpoint(self.next_id, now=self.now) == expected
        assert self.follower.checkpoint(self.next_id, now=self.now) == expected
        # Expiry is a removal too: the replicas store nothing a full checkpoint leaves out
        # (not merely hide it at this `now`).
        assert len(replica) == len(self.follower) == len(replay(expected, []))
        self.base, self.deltas = expected, []
        self.follower.restore(expected)

    def teardown(self) -> None:
        self.check()


TestDeltaMachine = DeltaMachine.TestCase
TestDeltaMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# -- what a delta holds ----------------------------------------------------------------


def loaded(n: int = 10_000) -> ss.InMemoryStateBackend:
    backend = ss.InMemoryStateBackend()
    backend.put_many([b"key%06d" % i for i in range(n)], [b"value%06d" % i for i in range(n)])
    return backend


def test_a_delta_holds_exactly_the_changes() -> None:
    backend = loaded(100)
    backend.checkpoint(1, now=0)
    backend.put(b"key000003", b"new")  # changed
    backend.put(b"fresh", b"x")  # created
    backend.delete(b"key000005", now=0)  # removed
    backend.put(b"brief", b"y")
    backend.delete(b"brief", now=0)  # created and removed again: nothing to say
    assert backend.compare_and_set(b"key000007", b"value000007", None, now=0)
    assert backend.delete_prefix(b"key00009", now=0) == 10
    delta = backend.checkpoint_delta(2, now=0)
    expected: dict[bytes, bytes | None] = {b"key000003": b"new", b"fresh": b"x"}
    expected.update({k: None for k in [b"key000005", b"key000007"]})
    expected.update({b"key%06d" % i: None for i in range(90, 100)})
    assert changes(delta) == expected
    assert changes(backend.checkpoint_delta(3, now=0)) == {}


def test_expiry_since_the_last_capture_is_a_removal() -> None:
    backend = ss.InMemoryStateBackend()
    backend.put(b"short", b"s", expires_at=10)
    backend.put(b"long", b"l", expires_at=100)
    backend.put(b"forever", b"f")
    base = backend.checkpoint(1, now=5)
    assert changes(backend.checkpoint_delta(2, now=9)) == {}
    delta = backend.checkpoint_delta(3, now=10)  # expires_at <= now: gone, as checkpoint says
    assert changes(delta) == {b"short": None}
    assert changes(backend.checkpoint_delta(4, now=50)) == {}  # said once, not again
    replica = replay(base, [])
    with pytest.raises(ss.CorruptDataError):
        replica.apply_delta(delta)  # it follows checkpoint 2, not the full one


def test_expiry_after_a_restore_is_a_removal() -> None:
    backend = ss.InMemoryStateBackend()
    backend.put(b"short", b"s", expires_at=10)
    backend.put(b"long", b"l", expires_at=100)
    base = backend.checkpoint(1, now=5)
    restored = ss.InMemoryStateBackend()
    restored.restore(base)  # the capture's `now` is not in a checkpoint: assume anything
    delta = restored.checkpoint_delta(2, now=20)
    assert changes(delta) == {b"short": None}
    follower = replay(base, [delta])
    assert follower.checkpoint(3, now=20) == restored.checkpoint(3, now=20)


def test_deltas_are_small() -> None:
    backend = loaded()
    full = backend.checkpoint(1, now=0)
    empty = backend.checkpoint_delta(2, now=0)
    assert len(empty) < 100  # header, one record, trailer
    touched = [b"key%06d" % i for i in range(0, 10_000, 100)]  # 1%
    backend.put_many(touched, [b"changed!!!!" for _ in touched])
    delta = backend.checkpoint_delta(3, now=0)
    assert len(changes(delta)) == len(touched)
    assert len(delta) < len(full) // 50
    assert replay(full, [empty, delta]).checkpoint(4, now=0) == backend.checkpoint(4, now=0)


def test_a_fresh_backend_chains_from_empty() -> None:
    backend = ss.InMemoryStateBackend()
    backend.put(b"k", b"v")
    delta = backend.checkpoint_delta(1, now=0)
    assert replay(None, [delta]).range_scan(b"", now=0) == [(b"k", b"v")]


def test_deltas_survive_compactions_and_bulk_loads() -> None:
    backend = ss.InMemoryStateBackend(unsorted_tail_limit=4)
    keys = [b"k%05d" % i for i in range(5000)]
    backend.put_many(keys, keys)
    base = backend.checkpoint(1, now=0)
    backend.delete_many(keys[::2], now=0)  # enough dead slots to compact
    backend.put_many(keys[::4], [b"back" for _ in keys[::4]])  # some come back
    backend.put_many([b"n%05d" % i for i in range(3000)], [b"new" for _ in range(3000)])
    backend.range_scan(b"k0", now=0)  # an ordered read merges the bulk-loaded tail
    delta = backend.checkpoint_delta(2, now=0)
    assert replay(base, [delta]).checkpoint(3, now=0) == backend.checkpoint(3, now=0)


def test_expiry_fields_round_trip_byte_for_byte() -> None:
    # An entry that once had an expiry keeps the field (+inf) when overwritten in place;
    # the delta carries entries verbatim, so the replica's checkpoint bytes match.
    backend = ss.InMemoryStateBackend()
    backend.put(b"k", b"aaaa", expires_at=50)
    base = backend.checkpoint(1, now=0)
    backend.put(b"k", b"bbbb")
    delta = backend.checkpoint_delta(2, now=0)
    assert replay(base, [delta]).checkpoint(3, now=60) == backend.checkpoint(3, now=60)
    assert backend.get(b"k", now=1e12) == b"bbbb"


# -- wrong bases and damage --------------------------------------------------------------


def chain() -> tuple[bytes, bytes, bytes]:
    backend = loaded(50)
    base = backend.checkpoint(7, now=0)
    backend.put_many([b"key000001", b"key000003", b"new"], [b"one", b"three", b"n"])
    backend.delete(b"key000004", now=0)
    d1 = backend.checkpoint_delta(8, now=0)
    backend.delete(b"key000002", now=0)
    backend.put(b"zzz", b"z", expires_at=5)
    d2 = backend.checkpoint_delta(9, now=1)
    return base, d1, d2


def unchanged_after(backend: ss.InMemoryStateBackend, delta: bytes, at: int = 7) -> None:
    """apply_delta(delta) fails and changes nothing. The backend is at checkpoint `at`:
    checkpointing an unchanged state under its own id writes the bytes it was restored
    from, so its identity (and what a delta may follow) stays the same."""
    before = backend.checkpoint(at, now=0)
    items = backend.range_scan(b"", now=0)
    with pytest.raises(ss.CorruptDataError):
        backend.apply_delta(delta)
    assert backend.range_scan(b"", now=0) == items
    assert backend.checkpoint(at, now=0) == before


def test_a_delta_applies_only_to_its_parent() -> None:
    base, d1, d2 = chain()
    unchanged_after(ss.InMemoryStateBackend(), d1)  # fresh: not the full checkpoint
    on_base = replay(base, [])
    with pytest.raises(ss.CorruptDataError, match="follows checkpoint 8"):
        on_base.apply_delta(d2)  # skips d1
    assert on_base.apply_delta(d1) == 8
    with pytest.raises(ss.CorruptDataError):
        on_base.apply_delta(d1)  # twice
    assert on_base.apply_delta(d2) == 9
    written = replay(base, [])
    written.put(b"local", b"write")  # no longer the state d1 follows
    with pytest.raises(ss.CorruptDataError, match="written to"):
        written.apply_delta(d1)
    assert written.get(b"local") == b"write"
    with pytest.raises(ss.CorruptDataError):
        replay(base, []).apply_delta(base)  # a full checkpoint is not a delta
    with pytest.raises(ss.CorruptDataError):
        ss.InMemoryStateBackend().restore(d1)  # nor a delta a checkpoint


def test_a_failed_apply_leaves_the_backend_as_it_was() -> None:
    base, d1, d2 = chain()
    receiver = replay(base, [])
    assert receiver.checkpoint(7, now=0) == base
    unchanged_after(receiver, d2)
    unchanged_after(receiver, d1[:-1])
    # It is still d1's parent: the failures changed nothing, not even the identity.
    assert receiver.apply_delta(d1) == 8


def test_every_damage_to_a_delta_is_detected() -> None:
    base, d1, d2 = chain()

    def apply(data: bytes) -> object:
        return replay(base, [d1]).apply_delta(data)

    assert_corruption_detected(apply, d2)


def reencoded(delta: bytes, edit: object) -> bytes:
    """The delta's records edited and sealed again (a valid container, bad contents)."""
    _, records = decode_records(delta)
    assert callable(edit)
    return encode_records(int(RecordKind.STATE_BACKEND_DELTA), edit(records))


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r[:1] + r[1:][::-1],  # keys out of order
        lambda r: r[:2] + r[1:2] + r[2:],  # a key repeated
        lambda r: r[1:],  # no header
        lambda r: [(r[0][0], r[0][1][:-1])] + r[1:],  # short header
        lambda r: [(r[0][0], r[0][1] + b"\0")] + r[1:],  # long header
        lambda r: [(b"other", r[0][1])] + r[1:],  # foreign header key
        lambda r: [(r[0][0], struct.pack("<I", 2) + r[0][1][4:])] + r[1:],  # layout 2
        lambda r: [(r[0][0], r[0][1][:-8] + struct.pack("<d", float("nan")))] + r[1:],
        lambda r: r + [(b"\xff\xff", b"\x02\x00")],  # a removal with a value
        lambda r: r + [(b"\xff\xff", b"\x04abc")],  # unknown flags
        lambda r: r + [(b"\xff\xff", b"")],  # no flags byte
        lambda r: r + [(b"\xff\xff", b"\x01abc")],  # expiry flag, no expiry
        lambda r: r + [(b"\xff\xff", b"\x01" + struct.pack("<d", float("nan")))],
    ],
)
def test_malformed_contents_are_refused(edit: object) -> None:
    base, d1, _ = chain()
    receiver = replay(base, [])
    unchanged_after(receiver, reencoded(d1, edit))
    assert receiver.apply_delta(d1) == 8


def test_header_names_the_parent() -> None:
    _, d1, d2 = chain()
    (header_key, header), *_ = decode_records(d1)[1]
    assert header_key == HEADER_KEY
    layout, checkpoint_id, parent_id, _identity, sequence, now = HEADER.unpack(header)
    assert (layout, checkpoint_id, parent_id, sequence, now) == (1, 8, 7, 1, 0.0)
    _, checkpoint_id, parent_id, _, sequence, now = HEADER.unpack(decode_records(d2)[1][0][1])
    assert (checkpoint_id, parent_id, sequence, now) == (9, 8, 2, 1.0)


def test_arguments_are_checked() -> None:
    backend = ss.InMemoryStateBackend()
    with pytest.raises(TypeError, match="checkpoint_id"):
        backend.checkpoint_delta("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="delta"):
        backend.apply_delta(12)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        backend.checkpoint_delta(1, now=float("nan"))
    assert isinstance(backend, ss.IncrementalStateBackend)
    assert isinstance(backend, ss.StateBackend)


def test_apply_accepts_any_bytes_like() -> None:
    base, d1, _ = chain()
    assert replay(base, []).apply_delta(bytearray(d1)) == 8
    assert replay(base, []).apply_delta(memoryview(d1)) == 8


# -- threads ---------------------------------------------------------------------------


def test_concurrent_writers_lose_and_repeat_nothing() -> None:
    writers, per_writer = 4, 3000
    live = ss.InMemoryStateBackend(unsorted_tail_limit=64)
    live.put(b"seed", b"0")
    base = live.checkpoint(0, now=0)
    deltas: list[bytes] = []
    done = threading.Event()

    def write(t: int) -> None:
        for i in range(per_writer):
            live.put(b"w%d-%05d" % (t, i), b"%d" % i)  # each key written once
            live.put(b"counter%d" % t, b"%d" % i)  # one key written over and over
            if i % 7 == 0:
                live.put_many([b"batch%d-%05d" % (t, i), b"batch%d-%05dx" % (t, i)], [b"a", b"b"])
            if i % 11 == 0:
                live.delete(b"w%d-%05d" % (t, i - 11), now=0)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(writers)]

    def capture() -> None:
        while not done.is_set():
            deltas.append(live.checkpoint_delta(len(deltas) + 1, now=0))

    capturer = threading.Thread(target=capture)
    capturer.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    capturer.join()
    deltas.append(live.checkpoint_delta(len(deltas) + 1, now=0))
    assert len(deltas) > 2

    replica = replay(base, deltas)
    assert replica.range_scan(b"", now=0) == live.range_scan(b"", now=0)
    assert replica.checkpoint(1, now=0) == live.checkpoint(1, now=0)
    # A key written once is in exactly one delta, as that write: nothing lost or doubled.
    seen: Counter[bytes] = Counter()
    for delta in deltas:
        for key, value in changes(delta).items():
            if key.startswith(b"batch"):
                assert value in (b"a", b"b")
                seen[key] += 1
    assert len(seen) == writers * len(range(0, per_writer, 7)) * 2
    assert set(seen.values()) == {1}
    for t in range(writers):
        assert replica.get(b"counter%d" % t, now=0) == b"%d" % (per_writer - 1)


def test_captures_from_several_threads_chain() -> None:
    # Two threads taking deltas at once are serialised: every delta follows exactly one
    # other, so the deltas sorted by sequence replay to the live state.
    live = loaded(2000)
    base = live.checkpoint(0, now=0)
    deltas: list[bytes] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(200):
            live.put(b"key%06d" % (t * 200 + i), b"t%d" % t)
            delta = live.checkpoint_delta(t * 1000 + i, now=0)
            with lock:
                deltas.append(delta)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deltas.sort(key=lambda d: HEADER.unpack(decode_records(d)[1][0][1])[4])
    assert replay(base, deltas).checkpoint(1, now=0) == live.checkpoint(1, now=0)
