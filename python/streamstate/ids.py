"""Checkpoint ids: UUID v7, so sorting ids sorts checkpoints by creation time."""

from __future__ import annotations

import os
import secrets
import threading
import time
import uuid
from functools import total_ordering
from uuid import UUID

__all__ = ["CheckpointId"]

# UUID v7 layout (RFC 9562): 48-bit Unix ms | 4-bit version | 12 bits | 2-bit variant | 62 bits.
# The 74 bits after the timestamp hold a per-process monotonic sequence seeded at random on
# every new millisecond, so ids minted in one millisecond still order by creation.
_SEQ_BITS = 74
_SEQ_MAX = (1 << _SEQ_BITS) - 1
_id_lock = threading.Lock()
_id_last = 0  # the last id minted by this process, as a 128-bit int


def _split(value: int) -> tuple[int, int]:
    ms = value >> 80
    seq = (((value >> 64) & 0xFFF) << 62) | (value & ((1 << 62) - 1))
    return ms, seq


def _compose(ms: int, seq: int) -> int:
    return (ms << 80) | (0x7 << 76) | ((seq >> 62) << 64) | (0b10 << 62) | (seq & ((1 << 62) - 1))


def _fresh_seq() -> int:
    # Top bit clear: leaves 2**73 increments before the millisecond has to be borrowed.
    return secrets.randbits(_SEQ_BITS - 1)


@total_ordering
class CheckpointId:
    """A checkpoint's identity: a UUID v7, ordered by creation time.

    ``str(id)`` is the hyphenated lowercase form used in object paths; comparison and
    hashing follow the 128-bit value (millisecond timestamp first).
    """

    __slots__ = ("_uuid",)

    def __init__(self, value: UUID) -> None:
        if not isinstance(value, UUID):
            raise TypeError(f"CheckpointId needs a uuid.UUID, got {type(value).__name__}")
        if value.version != 7 or value.variant != uuid.RFC_4122:
            raise ValueError(f"checkpoint ids are RFC 9562 UUID v7, got {value}")
        self._uuid = value

    @classmethod
    def now(cls, after: CheckpointId | None = None) -> CheckpointId:
        """Mint a new id, greater than every id this process minted before and than
        ``after`` (so a clock that stepped backwards cannot produce an older id)."""
        global _id_last
        now_ms = time.time_ns() // 1_000_000
        with _id_lock:
            floor = max(_id_last, after._uuid.int if after is not None else 0)
            floor_ms, floor_seq = _split(floor)
            if now_ms > floor_ms:
                ms, seq = now_ms, _fresh_seq()
            elif floor_seq < _SEQ_MAX:
                ms, seq = floor_ms, floor_seq + 1
            else:
                ms, seq = floor_ms + 1, _fresh_seq()
            _id_last = _compose(ms, seq)
            return cls(uuid.UUID(int=_id_last))

    @classmethod
    def from_uuid(cls, value: UUID) -> CheckpointId:
        """Wrap an existing UUID v7."""
        return cls(value)

    @classmethod
    def parse(cls, text: str) -> CheckpointId:
        """Parse the hyphenated form; anything else raises ``ValueError``."""
        if not isinstance(text, str) or len(text) != 36:
            raise ValueError(f"not a checkpoint id: {text!r}")
        try:
            value = uuid.UUID(text)
        except ValueError:
            raise ValueError(f"not a checkpoint id: {text!r}") from None
        if str(value) != text:  # only the canonical lowercase spelling names an object
            raise ValueError(f"not a canonical checkpoint id: {text!r}")
        return cls(value)

    @property
    def uuid(self) -> UUID:
        """The underlying UUID."""
        return self._uuid

    @property
    def timestamp_ms(self) -> int:
        """Creation time in Unix milliseconds."""
        return self._uuid.int >> 80

    def __str__(self) -> str:
        return str(self._uuid)

    def __repr__(self) -> str:
        return f"CheckpointId('{self._uuid}')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CheckpointId):
            return NotImplemented
        return self._uuid == other._uuid

    def __lt__(self, other: CheckpointId) -> bool:
        if not isinstance(other, CheckpointId):
            return NotImplemented
        return self._uuid.int < other._uuid.int

    def __hash__(self) -> int:
        return hash(self._uuid)

    def __reduce__(self) -> tuple[type[CheckpointId], tuple[UUID]]:
        return (type(self), (self._uuid,))


# Fork safety: a child process must not continue the parent's sequence verbatim.
if hasattr(os, "register_at_fork"):

    def _reset_after_fork() -> None:
        global _id_last, _id_lock
        _id_last = 0
        _id_lock = threading.Lock()  # another thread may have held it at fork time

    os.register_at_fork(after_in_child=_reset_after_fork)
