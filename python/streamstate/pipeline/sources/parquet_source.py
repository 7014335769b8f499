"""A source over a directory of Parquet files, local or in an object store, optionally
followed for new files.

The files are read in file-name order, each in its row groups, a row group split into
batches of at most the pipeline's ``batch_size``; the offset is ``{"file": name, "row": n}``:
every row of the files before ``name`` and rows ``[0, n)`` of ``name`` are read. A job with
no checkpoint starts at ``{"file": None, "row": 0}``, before every file.

Replay needs the files to stay as they were: a file must not change, or be removed while a
checkpoint's offset names it, once it is visible under the directory; a new file must
sort after every file already read (name files by time or sequence number, and write each
under a temporary name outside the directory, or atomically, as object stores do). A
checkpoint whose offset names a file that is gone raises :class:`~streamstate.SourceError`.

Split into ``count`` shards, a file belongs to shard ``crc32(name) % count``: the split
depends on the name alone, so it holds as new files arrive, and each shard (a
ParquetSource over its files, followed when the source is) has offsets of the same form.
"""

from __future__ import annotations

import bisect
import posixpath
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import IncompatibleCheckpointError, SourceError
from ...storage import CheckpointStorage, StoreLike, describe_store
from .arrow_source import _pyarrow, arrow_columns
from .contract import Batch, Offset, check_shard_count, read_from_shards, shard_positions

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["ParquetSource"]

_SUFFIX = ".parquet"


def _shard_of(name: str, count: int) -> int:
    """The shard of ``count`` that file ``name`` belongs to (the same in every process)."""
    return zlib.crc32(name.encode()) % count


@dataclass
class _OpenFile:
    """One file being read: its reader, where each row group starts, and the last row group
    decoded (a row group is read once, however many batches it is split into)."""

    name: str
    reader: pq.ParquetFile
    starts: list[int]  # the first row of every row group, then the file's row count
    group: int = -1
    table: pa.Table | None = None

    @property
    def rows(self) -> int:
        return self.starts[-1]


class ParquetSource:
    """The Parquet files directly under a directory, in file-name order.

    Args:
        path_or_url: the directory: a local path, a ``file://``, ``s3://`` (etc.) URL, or
            an obstore store; with ``store``, the prefix inside that store.
        name: the source's stable name (the checkpoint records its offset under it).
        follow: keep watching for new files: at the end of the last file a read returns
            an empty batch (the pipeline polls again after a back-off) instead of ending.
        store: an obstore store (or URL) holding the directory at ``path_or_url``.
        columns: read only these columns (default: all).

    Only names ending in ``.parquet`` count, and not those starting with ``.`` or ``_``
    (temporary files, ``_SUCCESS`` markers). See the module docstring for what replay
    needs of the files. Each file is fetched whole when its first row is read, and held
    (one file at a time) with its current row group decoded; a file's row count is
    remembered, so polling a followed directory lists it and reads nothing else.
    """

    #: A job with no checkpoint starts before every file.
    start_offset: Offset = {"file": None, "row": 0}  # noqa: RUF012 - plain JSON, never mutated

    def __init__(
        self,
        path_or_url: StoreLike,
        name: str,
        follow: bool = False,
        store: StoreLike | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if not isinstance(follow, bool):
            raise TypeError(f"follow must be a bool, got {type(follow).__name__}")
        _pyarrow()
        if store is None:
            self._storage = CheckpointStorage(path_or_url)
            self._prefix = ""
        else:
            if not isinstance(path_or_url, str):
                raise TypeError(
                    f"with store=, path_or_url must be the prefix (a str), got "
                    f"{type(path_or_url).__name__}"
                )
            self._storage = CheckpointStorage(store)
            self._prefix = path_or_url.strip("/")
        self._name = name
        self.follow = follow
        self._columns = None if columns is None else list(columns)
        self._rows: dict[str, int] = {}  # row counts of files seen (files never change)
        self._open: _OpenFile | None = None
        self._shard = (0, 1)  # (index, count): this source reads the files of that shard

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    def files(self) -> list[str]:
        """The names of the Parquet files in the directory now that this source (or shard)
        reads, in reading order."""
        index, count = self._shard
        return [name for name in self._all_files() if _shard_of(name, count) == index]

    def _all_files(self) -> list[str]:
        names = []
        for path in self._storage.list_directory(self._prefix):
            base = posixpath.basename(path)
            if base.endswith(_SUFFIX) and not base.startswith((".", "_")):
                names.append(base)
        return sorted(names)

    def shards(self, count: int) -> list[ParquetSource]:
        """The source in ``count`` shards, each reading the files ``crc32(name) % count``
        puts in it (see the module notes), in name order."""
        check_shard_count(count)
        if self._shard != (0, 1):
            raise SourceError(f"{self!r} is a shard already")
        shards = []
        for index in range(count):
            shard = ParquetSource.__new__(ParquetSource)
            shard.__dict__.update(self.__dict__)
            shard._rows, shard._open, shard._shard = dict(self._rows), None, (index, count)
            shards.append(shard)
        return shards

    def shard_offsets(self, offset: Offset, count: int) -> list[Offset]:
        """Each of ``count`` shards' offset when the source is at ``offset``: one of its own
        (every file before ``file`` read, and ``row`` rows of it) or the offsets of each of
        several shards (see :class:`~streamstate.pipeline.sources.ShardableSource`). The
        files' row counts needed are read from the files."""
        check_shard_count(count)
        positions = shard_positions(offset)
        old = [offset] if positions is None else positions
        for index, at in enumerate(old):
            file, _ = self._position(at)
            if file is not None and _shard_of(file, len(old)) != index:
                raise SourceError(
                    f"source {self._name!r}: offset {offset!r} names {file!r} for shard "
                    f"{index} of {len(old)}, which it is not in"
                )
        if len(old) == count:  # the same split: each shard continues where it is
            return old
        names = self._all_files()
        read: dict[str, int | None] = {}  # rows read of each file; None: all of it
        for index, at in enumerate(old):
            file, row = self._position(at)
            for name in names:
                if file is not None and name < file and _shard_of(name, len(old)) == index:
                    read[name] = None
            if file is not None and row:
                read[file] = None if row == self._row_count(file) else row
        result: list[Offset] = []
        for index in range(count):
            position: dict[str, Any] = {"file": None, "row": 0}
            untouched: str | None = None  # the first file of the shard not read in full
            for name in (n for n in names if _shard_of(n, count) == index):
                rows = read.get(name, 0)
                if untouched is not None and rows != 0:
                    raise IncompatibleCheckpointError(
                        f"source {self._name!r}: at offset {offset!r} {name!r} is read but "
                        f"{untouched!r} before it is not (all of it), so shard {index} of "
                        f"{count} cannot continue from one offset; resume with the shard count "
                        "that wrote it"
                    )
                if rows is None:
                    position = {"file": name, "row": -1}  # its row count, once it is the last
                elif rows:
                    position, untouched = {"file": name, "row": rows}, name
                else:
                    untouched = name
            if position["row"] == -1:
                position["row"] = self._row_count(position["file"])
            result.append(position)
        return result

    def _position(self, offset: Offset) -> tuple[str | None, int]:
        """The file and row an offset names, after checking it is one of this source's."""
        if isinstance(offset, dict) and set(offset) == {"file", "row"}:
            file, row = offset["file"], offset["row"]
            valid_file = file is None or (isinstance(file, str) and file != "")
            valid_row = isinstance(row, int) and not isinstance(row, bool) and row >= 0
            if valid_file and valid_row and (file is not None or row == 0):
                return file, row
        raise SourceError(
            f"source {self._name!r}: offset {offset!r} is not a Parquet directory's "
            '{"file": name, "row": n}'
        )

    def _file(self, name: str) -> _OpenFile:
        """The file ``name``, opened (the last one opened is kept open)."""
        if self._open is not None and self._open.name == name:
            return self._open
        pa = _pyarrow()
        import pyarrow.parquet as pq

        path = posixpath.join(self._prefix, name) if self._prefix else name
        try:
            data = self._storage.get(path).data
        except FileNotFoundError:
            raise SourceError(
                f"source {self._name!r}: file {name!r} is gone from "
                f"{describe_store(self._storage.store)} (prefix {self._prefix!r}); the files a "
                "checkpoint's offset names must stay until it is superseded"
            ) from None
        try:
            reader = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data)))
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"source {self._name!r}: {name!r} is not a Parquet file: {exc}") from exc
        starts = [0]
        for group in range(reader.metadata.num_row_groups):
            starts.append(starts[-1] + reader.metadata.row_group(group).num_rows)
        self._open = _OpenFile(name, reader, starts)
        self._rows[name] = starts[-1]
        return self._open

    def _row_count(self, name: str) -> int:
        return self._rows[name] if name in self._rows else self._file(name).rows

    def _next_file(self, after: str | None) -> str | None:
        """The first file after ``after`` that holds rows, or None if there is none yet."""
        for name in self.files():
            if (after is None or name > after) and self._row_count(name) > 0:
                return name
        return None

    def read(self, offset: Offset, max_rows: int) -> Batch | None:
        """Up to ``max_rows`` rows of one row group from ``offset``; at the end of the last
        file None, or, when following, an empty batch."""
        if shard_positions(offset) is not None:
            return read_from_shards(self, offset, max_rows)
        file, row = self._position(offset)
        rows = 0 if file is None else self._row_count(file)
        if row > rows:
            raise SourceError(
                f"source {self._name!r}: offset {offset!r} lies past the end of {file!r} "
                f"({rows} rows); the file changed after it was read"
            )
        if file is None or row == rows:
            following = self._next_file(file)
            if following is None:
                return Batch({}, offset, offset, 0) if self.follow else None
            file, row = following, 0
        opened = self._file(file)
        table, start = self._row_group(opened, row)
        count = min(max_rows, opened.starts[opened.group + 1] - row)
        columns = arrow_columns(table.slice(row - start, count))
        return Batch(columns, offset, {"file": file, "row": row + count}, count)

    def _row_group(self, opened: _OpenFile, row: int) -> tuple[pa.Table, int]:
        """The decoded row group holding ``row``, and its first row."""
        group = bisect.bisect_right(opened.starts, row) - 1
        if group != opened.group or opened.table is None:
            opened.table = opened.reader.read_row_group(group, columns=self._columns)
            opened.group = group
        return opened.table, opened.starts[group]

    def __repr__(self) -> str:
        where = describe_store(self._storage.store)
        follow = ", follow=True" if self.follow else ""
        index, count = self._shard
        shard = f", shard={index} of {count}" if count > 1 else ""
        return (
            f"ParquetSource({where}, prefix={self._prefix!r}, name={self._name!r}{follow}{shard})"
        )
