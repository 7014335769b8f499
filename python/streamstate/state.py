"""Keyed state for stateful stream operators: a pluggable byte-level backend, namespaced per
``(operator, partition, subtask)``, with typed value, list, map and aggregating state on top.

Key layout in the backend (all integers big-endian)::

    partition prefix  u32 len(operator_id) | operator_id (UTF-8) | u32 partition | u32 subtask
    state prefix      partition prefix | kind (b"v" keyed store, b"l" list, b"m" map,
                      b"a" aggregating) | u32 len(name) | name (UTF-8)
    keyed store / map state entry   state prefix | key_serde(key)
    list state        state prefix | 0x00            -> next index (u64)
                      state prefix | 0x01 | u64 index -> element
    aggregating state state prefix                   -> accumulator

Length prefixes make every prefix unambiguous (operator ``"a"`` can never share a prefix with
operator ``"a:1"``) and keep each partition's and each state's keys contiguous, so one
``range_scan`` reads exactly one of them.

Read-modify-write (``KeyedStateStore.update``, ``AggregatingState.add``, ``ListState`` index
allocation) is an optimistic loop over the backend's ``compare_and_set``: atomic against
every other thread and every other handle on the same backend, with user functions never run
under a lock (they may run more than once under contention, so keep them pure).

TTL is per state descriptor: ``ttl`` seconds after each write, on the handle's ``clock``
(``time.time`` unless injected). Expired entries read as absent and are left out of the next
checkpoint; ``backend.purge_expired()`` frees their memory.

Incremental checkpoints (:class:`IncrementalStateBackend`): ``checkpoint_delta(id)`` writes
only what changed since the previous ``checkpoint()`` / ``checkpoint_delta()``, expiries
included, and names its parent; ``restore(full)`` then ``apply_delta(d1)`` ...
``apply_delta(dn)`` rebuilds the state as of ``dn``, and a delta applied to any other state
raises ``CorruptDataError``.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

from . import _core
from ._typing import BytesLike
from .errors import CorruptDataError
from .serde import Serde

__all__ = [
    "AggregatingState",
    "InMemoryStateBackend",
    "IncrementalStateBackend",
    "KeyedStateStore",
    "ListState",
    "MapState",
    "StateBackend",
    "StatePartitionKey",
    "ValueState",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")
IN = TypeVar("IN")
ACC = TypeVar("ACC")

_U32 = struct.Struct(">I")
_U32_PAIR = struct.Struct(">II")
_U64 = struct.Struct(">Q")
_U32_MAX = 0xFFFFFFFF

InMemoryStateBackend = _core.InMemoryStateBackend
"""The C++ backend: an ordered, thread-safe in-memory map (see ``_core.pyi``)."""


@runtime_checkable
class StateBackend(Protocol):
    """What the typed state handles need from a backend. ``InMemoryStateBackend`` is one;
    implement these methods to plug in another (all keys and values are bytes).

    ``now`` and ``expires_at`` are seconds on the caller's clock (``None``: ``time.time()``
    for ``now``, never for ``expires_at``); an entry with ``expires_at <= now`` is absent.
    """

    def get(self, key: bytes, *, now: float | None = None) -> bytes | None:
        """The value under ``key``, or None."""
        ...

    def put(self, key: bytes, value: bytes, *, expires_at: float | None = None) -> None:
        """Store ``value`` under ``key``."""
        ...

    def delete(self, key: bytes, *, now: float | None = None) -> bool:
        """Remove ``key``; True if a visible entry was removed."""
        ...

    def compare_and_set(
        self,
        key: bytes,
        expected: bytes | None,
        new: bytes | None,
        *,
        expires_at: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Atomically set ``key`` to ``new`` (None deletes) if it holds ``expected``."""
        ...

    def range_scan(self, prefix: bytes, *, now: float | None = None) -> list[tuple[bytes, bytes]]:
        """Entries whose key starts with ``prefix``, sorted by key."""
        ...

    def delete_prefix(self, prefix: bytes, *, now: float | None = None) -> int:
        """Atomically remove every key starting with ``prefix``."""
        ...

    def checkpoint(self, checkpoint_id: int, *, now: float | None = None) -> bytes:
        """Snapshot all visible entries, tagged with ``checkpoint_id``."""
        ...

    def restore(self, snapshot: bytes) -> int:
        """Replace all state with a snapshot's; returns its checkpoint id."""
        ...

    def size_bytes(self) -> int:
        """Sum of stored key and value sizes."""
        ...

    def __len__(self) -> int: ...

    @property
    def version(self) -> int:
        """A counter that changes on every write."""
        ...


@runtime_checkable
class IncrementalStateBackend(StateBackend, Protocol):
    """A :class:`StateBackend` that can also checkpoint just what changed.
    ``InMemoryStateBackend`` is one.

    A separate protocol rather than two more ``StateBackend`` methods, so a backend written
    against ``StateBackend`` (the typed handles need nothing more) still is one.
    """

    def checkpoint_delta(self, checkpoint_id: int, *, now: float | None = None) -> bytes:
        """The entries created, changed or removed (expired ones included) since the
        previous ``checkpoint()`` / ``checkpoint_delta()``, as of ``now``, tagged
        ``checkpoint_id``; resets the change tracking."""
        ...

    def apply_delta(self, delta: bytes) -> int:
        """Apply a delta taken from exactly this backend's state (all of it, or nothing and
        CorruptDataError); returns its checkpoint id."""
        ...


def _check_u32(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    return value


def _utf8(what: str, text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {text!r} is not encodable as UTF-8: {exc.reason}") from None


@dataclass(frozen=True)
class StatePartitionKey:
    """The namespace of one operator subtask's state: ``(operator_id, partition_id,
    subtask_index)``. Partition and subtask are in ``[0, 2**32)``."""

    operator_id: str
    partition_id: int
    subtask_index: int
    _prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        op = _utf8("operator_id", self.operator_id)
        if len(op) > _U32_MAX:
            raise ValueError("operator_id is longer than 2**32-1 bytes")
        _check_u32("partition_id", self.partition_id)
        _check_u32("subtask_index", self.subtask_index)
        prefix = _U32.pack(len(op)) + op + _U32_PAIR.pack(self.partition_id, self.subtask_index)
        object.__setattr__(self, "_prefix", prefix)

    def to_prefix(self) -> bytes:
        """The byte prefix of every backend key in this namespace. No partition's prefix is
        a prefix of another's, and prefixes sort by (operator id length, operator id,
        partition, subtask)."""
        return self._prefix

    @classmethod
    def from_key(cls, key: BytesLike) -> tuple[StatePartitionKey, bytes]:
        """Split a backend key into its partition and the rest (for tools that walk a
        checkpoint). Raises CorruptDataError if ``key`` does not start with a partition."""
        data = bytes(key)
        if len(data) < 4:
            raise CorruptDataError("state key too short for a partition prefix")
        (op_len,) = _U32.unpack_from(data)
        end = 4 + op_len
        if len(data) < end + 8:
            raise CorruptDataError("state key too short for its partition prefix")
        try:
            operator_id = data[4:end].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptDataError("state key's operator id is not UTF-8") from None
        partition_id, subtask_index = _U32_PAIR.unpack_from(data, end)
        return cls(operator_id, partition_id, subtask_index), data[end + 8 :]


class _StateHandle:
    """What every typed state shares: its key prefix, backend, TTL and clock."""

    __slots__ = ("_backend", "_clock", "_name", "_partition", "_prefix", "_ttl")

    def __init__(
        self,
        partition: StatePartitionKey,
        backend: StateBackend,
        kind: bytes,
        name: str,
        ttl: float | None,
        clock: Callable[[], float],
    ) -> None:
        if not isinstance(partition, StatePartitionKey):
            raise TypeError(
                f"partition must be a StatePartitionKey, not {type(partition).__name__}"
            )
        encoded_name = _utf8("state name", name)
        if ttl is not None and not (
            isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0
        ):
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        self._partition = partition
        self._backend = backend
        self._name = name
        self._ttl = None if ttl is None else float(ttl)
        self._clock = clock
        self._prefix = partition.to_prefix() + kind + _U32.pack(len(encoded_name)) + encoded_name

    @property
    def partition(self) -> StatePartitionKey:
        """The namespace this state lives in."""
        return self._partition

    @property
    def name(self) -> str:
        """The state's name within its partition."""
        return self._name

    @property
    def ttl(self) -> float | None:
        """Seconds an entry lives after its last write, or None."""
        return self._ttl

    def _now(self) -> float:
        return float(self._clock())

    def _expires_at(self, now: float) -> float | None:
        return None if self._ttl is None else now + self._ttl

    def _describe(self) -> str:
        ttl = "" if self._ttl is None else f", ttl={self._ttl:g}"
        return f"{self._partition!r}, name={self._name!r}{ttl}"


class _KeyValueHandle(_StateHandle, Generic[K, V]):
    """A state whose entries are (serialised key -> serialised value) under its prefix: the
    one implementation of the key/value operations :class:`KeyedStateStore` and :class:`MapState`
    share (they differ only in their namespace tag and constructor)."""

    __slots__ = ("_key_serde", "_value_serde")

    def __init__(
        self,
        partition: StatePartitionKey,
        backend: StateBackend,
        kind: bytes,
        name: str,
        key_serde: Serde[K],
        value_serde: Serde[V],
        ttl: float | None,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(partition, backend, kind, name, ttl, clock)
        self._key_serde = key_serde
        self._value_serde = value_serde

    def _key(self, key: K) -> bytes:
        return self._prefix + self._key_serde.encode(key)

    def get(self, key: K) -> V | None:
        """The value under ``key``, or None if absent or expired."""
        raw = self._backend.get(self._key(key), now=self._now())
        return None if raw is None else self._value_serde.decode(raw)

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key`` (restarting its TTL)."""
        skey = self._key(key)
        encoded = self._value_serde.encode(value)
        self._backend.put(skey, encoded, expires_at=self._expires_at(self._now()))

    def remove(self, key: K) -> bool:
        """Remove ``key``; True if it was present."""
        return self._backend.delete(self._key(key), now=self._now())

    #: Old name of :meth:`remove`, still accepted.
    delete = remove

    def contains(self, key: K) -> bool:
        """Whether ``key`` is present (and unexpired)."""
        return self._backend.get(self._key(key), now=self._now()) is not None

    def __contains__(self, key: object) -> bool:
        return self.contains(key)  # type: ignore[arg-type]

    def update(self, key: K, fn: Callable[[V | None], V | None]) -> V | None:
        """Atomically replace the value under ``key`` with ``fn(current)`` (``current`` is
        None when absent; returning None deletes) and return the new value. ``fn`` runs
        outside any lock and is retried if another writer got in first; the update is atomic
        against every other thread and every other state on the same backend."""
        skey = self._key(key)
        while True:
            now = self._now()
            raw = self._backend.get(skey, now=now)
            new = fn(None if raw is None else self._value_serde.decode(raw))
            encoded = None if new is None else self._value_serde.encode(new)
            if self._backend.compare_and_set(
                skey, raw, encoded, expires_at=self._expires_at(now), now=now
            ):
                return new

    def _scan(self) -> list[tuple[bytes, bytes]]:
        return self._backend.range_scan(self._prefix, now=self._now())

    def items(self) -> list[tuple[K, V]]:
        """Every ``(key, value)``, in the order of the encoded keys."""
        start = len(self._prefix)
        decode_key = self._key_serde.decode
        decode_value = self._value_serde.decode
        return [(decode_key(k[start:]), decode_value(v)) for k, v in self._scan()]

    def keys(self) -> list[K]:
        """Every key, in the order of the encoded keys."""
        start = len(self._prefix)
        decode_key = self._key_serde.decode
        return [decode_key(k[start:]) for k, _ in self._scan()]

    def values(self) -> list[V]:
        """Every value, in the order of the encoded keys."""
        decode_value = self._value_serde.decode
        return [decode_value(v) for _, v in self._scan()]

    def clear(self) -> None:
        """Remove every entry."""
        self._backend.delete_prefix(self._prefix)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._describe()}, key_serde={self._key_serde!r}, "
            f"value_serde={self._value_serde!r})"
        )


class KeyedStateStore(_KeyValueHandle[K, V]):
    """Typed key -> value state in one partition's namespace (one value per key).

    Same operations as :class:`MapState` (``get``, ``put``, ``remove``, ``update``,
    ``items``, ...); ``update(key, fn)`` is an atomic read-modify-write against every other
    thread and every other state on the same backend. ``name`` may be given positionally
    after the serdes or by keyword (``MapState`` takes it first, as it always did). Also
    available as :data:`ValueState`.
    """

    __slots__ = ()

    def __init__(
        self,
        partition: StatePartitionKey,
        backend: StateBackend,
        key_serde: Serde[K],
        value_serde: Serde[V],
        name: str = "",
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(partition, backend, b"v", name, key_serde, value_serde, ttl, clock)


#: :class:`KeyedStateStore` under the name state libraries use for one value per key.
ValueState = KeyedStateStore


class ListState(_StateHandle, Generic[T]):
    """An append-friendly list in one partition's namespace.

    Each element is its own backend entry under a u64 index taken from a counter with
    compare-and-set, so ``add`` costs the same for a list of ten or ten million elements
    (one encoded blob would be rewritten whole on every add) and TTL applies per element.
    ``get`` is one range scan. ``add``/``add_all`` are safe from any number of threads;
    ``update`` and ``clear`` replace the list and are meant for its single owner.
    """

    __slots__ = ("_counter_key", "_elements", "_serde")

    def __init__(
        self,
        partition: StatePartitionKey,
        backend: StateBackend,
        name: str,
        serde: Serde[T],
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(partition, backend, b"l", name, ttl, clock)
        self._serde = serde
        self._counter_key = self._prefix + b"\x00"
        self._elements = self._prefix + b"\x01"

    def _reserve(self, count: int) -> int:
        """Claims ``count`` consecutive indexes; returns the first."""
        while True:
            raw = self._backend.get(self._counter_key)
            first = 0 if raw is None else _U64.unpack(raw)[0]
            if self._backend.compare_and_set(self._counter_key, raw, _U64.pack(first + count)):
                return int(first)

    def _write(self, encoded: list[bytes]) -> None:
        if not encoded:
            return
        first = self._reserve(len(encoded))
        expires_at = self._expires_at(self._now())
        for offset, value in enumerate(encoded):
            self._backend.put(
                self._elements + _U64.pack(first + offset), value, expires_at=expires_at
            )

    def add(self, value: T) -> None:
        """Append one element."""
        self._write([self._serde.encode(value)])

    def add_all(self, values: Iterable[T]) -> None:
        """Append several elements (all are encoded before any is written)."""
        self._write([self._serde.encode(v) for v in values])

    def get(self) -> list[T]:
        """The unexpired elements, in the order they were added."""
        decode = self._serde.decode
        return [decode(v) for _, v in self._backend.range_scan(self._elements, now=self._now())]

    def update(self, values: Iterable[T]) -> None:
        """Replace the whole list (values are encoded before anything is removed)."""
        encoded = [self._serde.encode(v) for v in values]
        self._backend.delete_prefix(self._prefix)
        self._write(encoded)

    def clear(self) -> None:
        """Remove every element."""
        self._backend.delete_prefix(self._prefix)

    def __repr__(self) -> str:
        return f"ListState({self._describe()}, serde={self._serde!r})"


class MapState(_KeyValueHandle[K, V]):
    """A map in one partition's namespace; each entry is its own backend key, so ``get`` and
    ``put`` stay O(1) and ``items`` is one range scan, ordered by encoded key. Same
    operations as :class:`KeyedStateStore`."""

    __slots__ = ()

    def __init__(
        self,
        partition: StatePartitionKey,
        backend: StateBackend,
        name: str,
        key_serde: Serde[K],
        value_serde: Serde[V],
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(partition, backend, b"m", name, key_serde, value_serde, ttl, clock)


class AggregatingState(_StateHandle, Generic[IN, ACC]):
    """A running accumulator: ``add(x)`` atomically folds ``x`` in with
    ``combine(accumulator, x)``, starting from ``default``.

    ``default`` is stored encoded and decoded afresh whenever it is needed, so a ``combine``
    that mutates its accumulator (``acc.append(x); return acc``) cannot corrupt it.
    """

    __slots__ = ("_combine", "_default", "_key", "_serde")

    def __init__(
        self,
        partition: StatePartitionKey,
        backend: StateBackend,
        name: str,
        combine: Callable[[ACC, IN], ACC],
        default: ACC,
        serde: Serde[ACC],
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(partition, backend, b"a", name, ttl, clock)
        self._combine = combine
        self._serde = serde
        self._default = serde.encode(default)
        self._key = self._prefix

    def add(self, value: IN) -> ACC:
        """Fold ``value`` in and return the new accumulator (``combine`` may be retried)."""
        while True:
            now = self._now()
            raw = self._backend.get(self._key, now=now)
            acc = self._combine(self._serde.decode(self._default if raw is None else raw), value)
            if self._backend.compare_and_set(
                self._key, raw, self._serde.encode(acc), expires_at=self._expires_at(now), now=now
            ):
                return acc

    def get(self) -> ACC:
        """The accumulator, or ``default`` if nothing was added (or it expired)."""
        raw = self._backend.get(self._key, now=self._now())
        return self._serde.decode(self._default if raw is None else raw)

    def clear(self) -> None:
        """Reset to ``default``."""
        self._backend.delete(self._key, now=self._now())

    def __repr__(self) -> str:
        return f"AggregatingState({self._describe()}, serde={self._serde!r})"
