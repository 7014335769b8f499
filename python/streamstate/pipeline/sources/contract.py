"""The source protocol: replayable micro-batches of columns, addressed by JSON offsets."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import numpy as np

from ...errors import IncompatibleCheckpointError, SourceError

__all__ = [
    "Batch",
    "Offset",
    "ShardableSource",
    "Source",
    "can_shard",
    "check_batch",
    "check_columns",
    "check_shard_count",
    "describe_keys",
    "key_column",
    "plain_offset",
    "read_from_shards",
    "shard_offset",
    "shard_positions",
    "start_offset_of",
]

#: A source offset: a JSON value built of ints, strs, None, lists and str-keyed dicts (an
#: int row number for arrays, ``{"file": name, "row": n}`` for a directory of files). It
#: is recorded in every checkpoint manifest and must come back from it unchanged, which is
#: why floats (inexact) and bools (JSON's, not positions) are refused.
Offset = Any


@dataclass(frozen=True)
class Batch:
    """One micro-batch read from a source: columns of ``rows`` rows and the offsets around it.

    ``rows`` may be left out when the offsets are row numbers (ints): it is then
    ``next_offset - offset``. A source whose offsets are anything else gives it.
    """

    columns: Mapping[str, Any]
    offset: Offset
    next_offset: Offset
    rows: int | None = None

    def __len__(self) -> int:
        if self.rows is not None:
            return self.rows
        if _is_int(self.offset) and _is_int(self.next_offset):
            return operator.index(self.next_offset) - operator.index(self.offset)
        raise TypeError("a Batch whose offsets are not ints must give its row count (rows=)")


class Source(Protocol):
    """A replayable source: reading at an offset always returns the same events.

    A batch read at ``offset`` starts there (``batch.offset == offset``), holds ``len(batch)``
    rows in every column, and the next read asks for ``batch.next_offset``. Offsets are JSON
    values (see :data:`Offset`): the checkpoint records them in its manifest and a resumed
    pipeline reads from the recorded one. An unbounded source with nothing new returns an
    empty batch (no rows, ``next_offset == offset``) and the pipeline polls again after a
    short back-off; None means the source has ended.

    Optional attributes: ``start_offset`` (where a job with no checkpoint starts; 0 when
    absent) and ``column_names`` (a sequence of str, which lets a pipeline check its
    columns when it is built rather than at the first batch).
    """

    @property
    def name(self) -> str:
        """Stable name; the checkpoint records this source's offset under it."""
        ...

    def read(self, offset: Any, max_rows: int) -> Batch | None:
        """Up to ``max_rows`` events starting at ``offset``, or None at the end."""
        ...


class ShardableSource(Source, Protocol):
    """A source that splits into shards read independently (by the workers of a
    :class:`~streamstate.ray.RayPipeline`), every row in exactly one shard.

    Each shard is a :class:`Source` with offsets of its own, starting at its
    ``start_offset``. The offset of the whole source while its ``count`` shards are read is
    :func:`shard_offset` of theirs: ``{"shards": [o0, o1, ...]}``, and for one shard that
    shard's offset, which is the source's own (one shard reads what the source reads).
    """

    def shards(self, count: int) -> Sequence[Source]:
        """The source split into ``count`` shards; the same split for the same ``count`` and
        the same data, in every process."""
        ...

    def shard_offsets(self, offset: Offset, count: int) -> list[Offset]:
        """Where each of ``count`` shards is when the source is at ``offset``: one of this
        source's own offsets, or :func:`shard_offset` of any number of its shards'. Raises
        :class:`~streamstate.IncompatibleCheckpointError` when the rows read so far are not,
        in every shard, a prefix of its rows (the shards cannot continue without reading a
        row twice or skipping one)."""
        ...


def can_shard(source: Source) -> TypeGuard[ShardableSource]:
    """Whether ``source`` splits into shards (see :class:`ShardableSource`)."""
    return callable(getattr(source, "shards", None)) and callable(
        getattr(source, "shard_offsets", None)
    )


def check_shard_count(count: object) -> int:
    """``count`` as a number of shards: an int >= 1, else TypeError / ValueError."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"a shard count must be an int, got {type(count).__name__}")
    if count < 1:
        raise ValueError(f"a shard count must be >= 1, got {count}")
    return count


#: The key of the offset of a source read in several shards: ``{"shards": [o0, o1, ...]}``.
SHARDS = "shards"


def shard_offset(offsets: Sequence[Offset]) -> Offset:
    """The offset of a whole source whose shards are at ``offsets``: ``{"shards": offsets}``,
    or the one shard's offset (one shard is the whole source)."""
    if len(offsets) == 1:
        return offsets[0]
    return {SHARDS: list(offsets)}


def shard_positions(offset: Offset) -> list[Offset] | None:
    """The shards' offsets a :func:`shard_offset` of several shards holds, or None for an
    offset of the source as one (a plain offset)."""
    if isinstance(offset, dict) and set(offset) == {SHARDS}:
        positions = offset[SHARDS]
        if not isinstance(positions, list) or len(positions) < 2:
            raise IncompatibleCheckpointError(
                f"offset {offset!r}: {SHARDS!r} must list the offsets of two or more shards"
            )
        return list(positions)
    return None


def read_from_shards(source: ShardableSource, offset: Offset, max_rows: int) -> Batch | None:
    """A whole source's read at the offset of its shards (``{"shards": [...]}``), when the
    rows they read are a prefix of the source: the batch starts at that offset and ends at
    a plain one. Otherwise :class:`~streamstate.IncompatibleCheckpointError` (from
    ``shard_offsets``)."""
    [plain] = source.shard_offsets(offset, 1)
    batch = source.read(plain, max_rows)
    if batch is None:
        return None
    rows = len(batch)
    return Batch(batch.columns, offset, batch.next_offset if rows else offset, rows)


def start_offset_of(source: Source) -> Offset:
    """Where a job over ``source`` starts without a checkpoint: its ``start_offset``, or 0."""
    return plain_offset(getattr(source, "start_offset", 0), "start_offset", source.name)


def check_columns(required: Iterable[str], available: Iterable[str], where: str) -> None:
    """Raise :class:`~streamstate.SourceError` naming the first required column missing
    from ``available`` and listing those there are."""
    have = set(available)
    for name in required:
        if name not in have:
            raise SourceError(f"{where} has no column {name!r}; it has {sorted(have)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


_OFFSET_KINDS = "a JSON value of ints, strs, None, lists and str-keyed dicts"


def plain_offset(value: object, what: str, source: str) -> Offset:
    """``value`` as the plain JSON it round-trips through a manifest as: numpy integers
    become ints and tuples lists. Anything else that is not an offset (floats, bools,
    non-str dict keys, other objects) raises :class:`~streamstate.SourceError`."""
    if _is_int(value):
        return operator.index(value)  # type: ignore[arg-type]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return [plain_offset(item, what, source) for item in value]
    if isinstance(value, dict):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SourceError(
                    f"source {source!r}: {what} must be {_OFFSET_KINDS}; it has a "
                    f"{type(key).__name__} key {key!r}"
                )
            plain[key] = plain_offset(item, what, source)
        return plain
    raise SourceError(
        f"source {source!r}: {what} must be {_OFFSET_KINDS} (an int for row numbers), "
        f"got {type(value).__name__}"
    )


def check_batch(batch: Batch, source: str, offset: Offset, required: Sequence[str]) -> Offset:
    """Check one batch against the source contract; return its ``next_offset`` as plain JSON.

    The batch must start at ``offset`` (where the previous one ended); its offsets must be
    JSON values (see :func:`plain_offset`); unless it is empty, it must hold every
    ``required`` column, each of exactly ``len(batch)`` rows; int offsets must move forward by that many rows, and any
    other offset must move exactly when the batch holds rows. Anything else raises
    :class:`~streamstate.SourceError`: trusting it would record an offset that disagrees
    with what was folded.
    """
    start = plain_offset(batch.offset, "Batch.offset", source)
    end = plain_offset(batch.next_offset, "Batch.next_offset", source)
    where = f"source {source!r}: the batch at offset {start!r}"
    if start != offset:
        raise SourceError(
            f"{where}: asked for offset {offset!r}, but the batch starts at offset {start!r}"
        )
    rows = batch.rows
    if rows is not None and (not _is_int(rows) or rows < 0):
        raise SourceError(f"{where}: Batch.rows must be an int >= 0, got {rows!r}")
    counted = ""
    if isinstance(start, int) and isinstance(end, int):
        if end < start:
            raise SourceError(f"{where} ends before it starts (next_offset {end})")
        if rows is not None and rows != end - start:
            raise SourceError(
                f"{where} says it holds {rows} rows, but its offsets ({start} to {end}) span "
                f"{end - start}"
            )
        rows = end - start
        counted = f" by its offsets ({start} to {end})"
    elif rows is None:
        raise SourceError(
            f"{where}: a batch whose offsets are not ints must give its row count (Batch.rows)"
        )
    elif (rows == 0) != (start == end):
        moved = "moves its offset" if rows == 0 else "does not move its offset"
        raise SourceError(f"{where} holds {rows} rows but {moved} (next_offset {end!r})")
    if rows == 0:  # an idle poll: an unbounded source may not know its columns yet
        return end
    check_columns(required, batch.columns, where)
    for name in required:
        length = len(batch.columns[name])
        if length != rows:
            raise SourceError(
                f"{where} holds {rows} rows{counted} but column {name!r} has {length} rows"
            )
    return end


def key_column(column: Any) -> Any:
    """A key column as the core reads it: an Arrow string or binary array as it is (the
    core's key reader takes it in place, through ``__arrow_c_array__``), anything else as a
    numpy array (an Arrow array of other types through its buffer)."""
    if isinstance(column, np.ndarray):
        return column
    if hasattr(column, "__arrow_c_array__"):
        import pyarrow as pa

        array = column if isinstance(column, pa.Array) else pa.array(column)
        kind = array.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return array
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return array
        return array.to_numpy(zero_copy_only=False)
    return np.asarray(column)


def describe_keys(keys: Any) -> str:
    """The type of a key column (numpy dtype or Arrow type), for messages."""
    return str(getattr(keys, "dtype", None) or getattr(keys, "type", type(keys).__name__))
