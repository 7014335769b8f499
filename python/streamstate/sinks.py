"""Sinks: where a pipeline's emitted rows go, staged with each checkpoint and published
after it commits.

A pipeline drives every sink through one protocol (:class:`Sink`), tied to its checkpoints:

1. ``bind(store, prefix)`` once, before anything else, with the pipeline's checkpoint store
   and a prefix in it that belongs to this sink;
2. ``recover(epoch, staged)`` once, when the pipeline starts: the epoch and the staged value
   of the checkpoint it recovered, or ``(None, None)`` when it starts fresh;
3. for every checkpoint: ``stage(epoch, batches)`` on the commit thread *before* the
   epoch's manifest is written (the returned JSON value goes into the manifest, under
   ``metadata["sinks"][name]``), then ``publish(epoch, staged)`` on the coordinator thread
   *after* the manifest committed.

A crash anywhere in that sequence leaves staged rows that either belong to a committed
checkpoint (recovery publishes them) or to none (recovery deletes them, and the replay of
the source emits those rows again). :class:`ParquetSink` makes the published output
exactly-once; :class:`CallableSink` hands rows to a Python function, at least once.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from obstore import exceptions as obs_errors

from .batcher import _check_epoch
from .codec import sha256_hex
from .errors import CorruptDataError, IntegrityError, SinkError, StreamStateError
from .retry import RetryPolicy
from .stats import require_modules
from .storage import CheckpointStorage, RetryingStorage, StoreLike

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["CallableSink", "ParquetSink", "Sink"]

#: Failures of a storage call, as :class:`RetryingStorage` lets them through.
_STORAGE_ERRORS = (StreamStateError, OSError, obs_errors.BaseError)


@runtime_checkable
class Sink(Protocol):
    """What a pipeline needs of a sink: stage an epoch's rows with its checkpoint, publish
    them once the checkpoint committed, and put the output back in step with a recovered
    checkpoint.

    ``exactly_once`` says what survives a crash: True when, after any crash and recovery,
    the published output holds every row of every committed epoch exactly once; False
    when rows of the recovered epoch may be delivered again (at-least-once).
    """

    exactly_once: bool

    def bind(self, store: StoreLike | CheckpointStorage, prefix: str) -> None:
        """Called once, before :meth:`recover`, with the pipeline's checkpoint store and a
        prefix in it that belongs to this sink alone, for a sink that stages there."""
        ...

    def stage(self, epoch: int, batches: Sequence[pa.RecordBatch]) -> Any:
        """Make ``epoch``'s rows durable but invisible; return a JSON value describing what
        was staged (the checkpoint's manifest records it).

        Called on the commit thread before the epoch's manifest is written. Staging the
        same epoch again (after a crash, the replay does) must not disturb what an
        earlier attempt staged: only the attempt the manifest names is ever published.
        """
        ...

    def publish(self, epoch: int, staged: Any) -> None:
        """Make the rows ``stage`` returned ``staged`` for visible (or deliver them).

        Called on the coordinator thread after the epoch's manifest committed.
        Idempotent: publishing what is already published does nothing.
        """
        ...

    def recover(self, epoch: int | None, staged: Any | None) -> None:
        """Put the output in step with the recovered checkpoint: publish its ``staged``
        rows (idempotent), delete every other staged row (of epochs that never committed),
        and delete published rows of epochs after ``epoch`` (the replay emits them again).
        ``(None, None)``: the job starts fresh; nothing it published before stays.
        Idempotent."""
        ...


# -- shared checks --------------------------------------------------------------------------


def _pyarrow() -> Any:
    require_modules("streamstate sinks", "pyarrow")
    import pyarrow

    return pyarrow


def _check_recovered(epoch: int | None, staged: object) -> int | None:
    if epoch is None:
        if staged is not None:
            raise ValueError("recover(None, staged): staged rows need the epoch they belong to")
        return None
    return _check_epoch(epoch)


def _directory(prefix: object) -> str:
    """``prefix`` as a directory path without slashes at either end (``""``: the root)."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return prefix.strip("/")


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def _table(batches: Sequence[pa.RecordBatch], epoch: int) -> pa.Table | None:
    """The epoch's rows as one table (no copy), or None when there are none."""
    pa = _pyarrow()
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence):
        raise TypeError(
            f"batches must be a sequence of pyarrow.RecordBatch, got {type(batches).__name__}"
        )
    chunks: list[Any] = []
    for batch in batches:
        if isinstance(batch, pa.Table):
            chunks.extend(batch.to_batches())
        elif isinstance(batch, pa.RecordBatch):
            chunks.append(batch)
        else:
            raise TypeError(
                f"batches must hold pyarrow.RecordBatch (or Table), got {type(batch).__name__}"
            )
    chunks = [chunk for chunk in chunks if chunk.num_rows]
    if not chunks:
        return None
    try:
        return pa.Table.from_batches(chunks)
    except pa.ArrowInvalid as exc:
        raise SinkError(f"epoch {epoch}: batches with different schemas ({exc})") from exc


def _entry_list(staged: object, sink: str) -> list[dict[str, Any]]:
    if not isinstance(staged, list) or not all(isinstance(e, dict) for e in staged):
        raise CorruptDataError(
            f"{sink}: the staged record must be a list of objects, got {staged!r:.200}"
        )
    return staged


def _field(entry: dict[str, Any], name: str, kind: type, sink: str) -> Any:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CorruptDataError(
            f"{sink}: staged entry {entry!r:.200} has no {kind.__name__} {name!r}"
        )
    return value


# -- Parquet ---------------------------------------------------------------------------------

_STAGING = "_staging"  # pyarrow.dataset skips names starting with "_"
_FINAL_NAME = re.compile(r"epoch-(\d{12,})-(\d{4,})\.parquet")
_STAGED_NAME = re.compile(r"epoch-(\d{12,})-(\d{4,})-([0-9a-f]{32})\.parquet")
#: Files are split so that none holds more than this many bytes of Arrow data.
DEFAULT_MAX_FILE_BYTES = 128 << 20


@dataclasses.dataclass(frozen=True)
class _StagedFile:
    """One file staged by :meth:`ParquetSink.stage`, as the manifest records it."""

    staged: str
    final: str
    rows: int
    bytes: int
    sha256: str


class ParquetSink:
    """Exactly-once Parquet output: ``<prefix>/epoch-<epoch:012d>-<n:04d>.parquet`` files in
    a store, each epoch's visible only once the checkpoint holding it committed.

    Args:
        store_or_url: where the files go: anything :func:`streamstate.storage.resolve_store`
            takes (a local directory, ``file://``, ``memory://``, ``s3://bucket/path`` URL,
            an obstore store) or a :class:`~streamstate.storage.CheckpointStorage`.
        prefix: the directory in that store holding the published files (``""``: its root).
        compression: the Parquet codec (as for ``pyarrow.parquet.write_table``).
        max_file_bytes: an epoch's rows are split into files of at most this many bytes
            of Arrow data (one file per epoch below it).
        retry: how storage calls are retried (default :class:`~streamstate.RetryPolicy`).

    :meth:`stage` writes the epoch's files under ``<prefix>/_staging/`` with a fresh token
    in every name, so a replayed epoch never overwrites what an earlier attempt staged;
    :meth:`publish` renames them to their final names (atomic on a local store; a copy then
    delete elsewhere, repeated by recovery if interrupted). After every publish and every
    recover, ``pyarrow.dataset.dataset(<prefix directory>)`` holds each row of every
    committed epoch exactly once (it skips ``_staging``). :meth:`recover` with ``(None,
    None)``, a job starting without checkpoints, deletes every published epoch file: a
    fresh start must not leave the output of a run whose checkpoints are gone.

    One job writes to one prefix: recovery deletes the epoch files it cannot account for,
    so two jobs sharing a prefix delete each other's output. Only names this sink writes
    are ever deleted; other files in the directory stay. The sink keeps no state between
    calls, so its methods may run on different threads.
    """

    exactly_once = True

    def __init__(
        self,
        store_or_url: StoreLike | CheckpointStorage,
        prefix: str = "",
        *,
        compression: str = "zstd",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        retry: RetryPolicy | None = None,
    ) -> None:
        _pyarrow()
        if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int):
            raise TypeError(f"max_file_bytes must be an int, got {type(max_file_bytes).__name__}")
        if max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be >= 1, got {max_file_bytes}")
        if not isinstance(compression, str):
            raise TypeError(f"compression must be a str, got {type(compression).__name__}")
        self._storage = (
            store_or_url
            if isinstance(store_or_url, CheckpointStorage)
            else CheckpointStorage(store_or_url)
        )
        self._io = RetryingStorage(self._storage, retry if retry is not None else RetryPolicy())
        self._prefix = _directory(prefix)
        self._staging = _join(self._prefix, _STAGING)
        self.compression = compression
        self.max_file_bytes = max_file_bytes

    @property
    def prefix(self) -> str:
        """The directory holding the published files (no slashes at either end)."""
        return self._prefix

    def __repr__(self) -> str:
        return f"ParquetSink({self._storage!r}, prefix={self._prefix!r})"

    def bind(self, store: StoreLike | CheckpointStorage, prefix: str) -> None:
        """Nothing to do: a ParquetSink stages in its own store, next to its output."""

    def stage(self, epoch: int, batches: Sequence[pa.RecordBatch]) -> list[dict[str, Any]]:
        """Write ``epoch``'s rows as Parquet files under ``<prefix>/_staging/``; return one
        ``{"staged", "final", "rows", "bytes", "sha256"}`` object per file (``[]`` for no
        rows, writing nothing). A failure deletes what this call wrote and raises
        :class:`~streamstate.SinkError`."""
        epoch = _check_epoch(epoch)
        table = _table(batches, epoch)
        if table is None:
            return []
        pa = _pyarrow()
        import pyarrow.parquet as pq

        files = max(1, math.ceil(table.nbytes / self.max_file_bytes))
        rows_per_file = math.ceil(table.num_rows / files)
        token = uuid.uuid4().hex
        staged: list[_StagedFile] = []
        try:
            for n, start in enumerate(range(0, table.num_rows, rows_per_file)):
                chunk = table.slice(start, rows_per_file)
                out = pa.BufferOutputStream()
                pq.write_table(chunk, out, compression=self.compression)
                data = memoryview(out.getvalue()).cast("B")  # obstore takes unsigned bytes
                name = f"epoch-{epoch:012d}-{n:04d}"
                entry = _StagedFile(
                    staged=_join(self._staging, f"{name}-{token}.parquet"),
                    final=_join(self._prefix, f"{name}.parquet"),
                    rows=chunk.num_rows,
                    bytes=data.nbytes,
                    sha256=sha256_hex(data),
                )
                self._io.put(entry.staged, data)
                staged.append(entry)
        except _STORAGE_ERRORS as exc:
            self._io.delete_quietly([entry.staged for entry in staged])
            raise SinkError(f"{self!r}: staging epoch {epoch} failed: {exc}") from exc
        return [dataclasses.asdict(entry) for entry in staged]

    def publish(self, epoch: int, staged: Any) -> None:
        """Rename the files :meth:`stage` staged for ``epoch`` to their final names.

        Idempotent: a staged file already gone whose final file exists was published
        before. Both gone raises :class:`~streamstate.CorruptDataError` naming the file;
        a storage failure raises :class:`~streamstate.SinkError` (the epoch stays
        committed and staged: a recovery publishes it).
        """
        epoch = _check_epoch(epoch)
        entries = self._entries(epoch, staged)
        published: set[str] | None = None
        try:
            for entry in entries:
                try:
                    self._io.rename(entry.staged, entry.final)
                except FileNotFoundError:
                    if published is None:
                        published = set(self._io.list_directory(self._prefix))
                    if entry.final not in published:
                        raise CorruptDataError(
                            f"{entry.staged}: staged file of committed epoch {epoch} is "
                            f"missing and {entry.final} was never published"
                        ) from None
        except CorruptDataError:
            raise
        except _STORAGE_ERRORS as exc:
            raise SinkError(
                f"{self!r}: publishing epoch {epoch} failed (it stays committed and "
                f"staged; a recovery publishes it): {exc}"
            ) from exc

    def recover(self, epoch: int | None, staged: Any | None) -> None:
        """Publish the recovered epoch's ``staged`` files, delete every other staged file,
        and delete published files of epochs after ``epoch`` (and files of ``epoch`` that
        ``staged`` does not name). ``(None, None)`` deletes every staged and every
        published epoch file. Idempotent; errors as for :meth:`publish`."""
        epoch = _check_recovered(epoch, staged)
        keep: set[str] = set()
        if epoch is not None and staged is not None:
            self.publish(epoch, staged)
            keep = {entry.final for entry in self._entries(epoch, staged)}
        try:
            for path in self._io.list(self._staging):
                if _STAGED_NAME.fullmatch(posixpath.basename(path)):
                    self._io.delete(path)
            for path in self._io.list_directory(self._prefix):
                match = _FINAL_NAME.fullmatch(posixpath.basename(path))
                if match is None or path in keep:
                    continue
                if epoch is None or int(match[1]) >= epoch:
                    self._io.delete(path)
        except _STORAGE_ERRORS as exc:
            raise SinkError(f"{self!r}: recovering to epoch {epoch} failed: {exc}") from exc

    def published_files(self) -> list[str]:
        """The store paths of the published files, in epoch and file order."""
        found = []
        for path in self._io.list_directory(self._prefix):
            match = _FINAL_NAME.fullmatch(posixpath.basename(path))
            if match is not None:
                found.append((int(match[1]), int(match[2]), path))
        return [path for _, _, path in sorted(found)]

    def read_published(self) -> pa.Table:
        """Every published row as one ``pyarrow.Table`` (for stores pyarrow cannot open
        itself, such as a ``MemoryStore``); a table with no columns when nothing is
        published."""
        pa = _pyarrow()
        import pyarrow.parquet as pq

        tables = [
            pq.read_table(pa.py_buffer(self._io.get(path).data)) for path in self.published_files()
        ]
        return pa.concat_tables(tables) if tables else pa.table({})

    def _entries(self, epoch: int, staged: Any) -> list[_StagedFile]:
        """``staged`` read back, checked to name files this sink staged for ``epoch``."""
        entries = []
        for record in _entry_list(staged, repr(self)):
            entry = _StagedFile(
                staged=_field(record, "staged", str, repr(self)),
                final=_field(record, "final", str, repr(self)),
                rows=_field(record, "rows", int, repr(self)),
                bytes=_field(record, "bytes", int, repr(self)),
                sha256=_field(record, "sha256", str, repr(self)),
            )
            staged_dir, staged_name = posixpath.split(entry.staged)
            final_dir, final_name = posixpath.split(entry.final)
            staged_match = _STAGED_NAME.fullmatch(staged_name)
            final_match = _FINAL_NAME.fullmatch(final_name)
            if (
                staged_dir != self._staging
                or final_dir != self._prefix
                or staged_match is None
                or final_match is None
                or int(staged_match[1]) != epoch
                or staged_match.group(1, 2) != final_match.group(1, 2)
            ):
                raise CorruptDataError(
                    f"{self!r}: staged entry {entry.staged!r} -> {entry.final!r} is not a "
                    f"file this sink stages for epoch {epoch} (was its prefix changed?)"
                )
            entries.append(entry)
        return entries


# -- a Python function ---------------------------------------------------------------------

_STREAM_NAME = re.compile(r"epoch-(\d{12,})-([0-9a-f]{32})\.arrows")


class CallableSink:
    """Hands every emitted ``pyarrow.RecordBatch`` to ``fn``, at least once.

    :meth:`stage` writes the epoch's rows as one Arrow IPC stream object in the store and
    prefix :meth:`bind` gave (the pipeline's checkpoint store); :meth:`publish` reads it
    back, calls ``fn(batch)`` for each batch on the calling thread (the pipeline's
    coordinator), then deletes it. After a crash, :meth:`recover` delivers the recovered
    epoch's staged rows again if they were not delivered completely: ``fn`` may see the
    rows of that one epoch twice (at-least-once), and never rows of an epoch that did not
    commit. Without a crash every row is delivered exactly once.

    ``fn`` raising makes :meth:`publish` raise :class:`~streamstate.SinkError` (chaining
    the exception); the object stays, so a recovery delivers the whole epoch again.
    """

    exactly_once = False

    def __init__(self, fn: Callable[[pa.RecordBatch], object]) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be a callable taking a pyarrow.RecordBatch, got {fn!r}")
        self.fn = fn
        self._io: RetryingStorage | None = None
        self._prefix = ""

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        where = f", {self._io.storage!r}, prefix={self._prefix!r}" if self._io is not None else ""
        return f"CallableSink({name}{where})"

    def bind(
        self,
        store: StoreLike | CheckpointStorage,
        prefix: str,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Stage in ``store`` under ``prefix`` (non-empty: :meth:`recover` deletes the
        staged objects there)."""
        directory = _directory(prefix)
        if not directory:
            raise ValueError("a CallableSink needs a non-empty prefix of its own to stage under")
        storage = store if isinstance(store, CheckpointStorage) else CheckpointStorage(store)
        self._io = RetryingStorage(storage, retry if retry is not None else RetryPolicy())
        self._prefix = directory

    @property
    def _bound(self) -> RetryingStorage:
        if self._io is None:
            raise SinkError(
                f"{self!r} is not bound: a pipeline binds it to its checkpoint store; "
                "call bind(store, prefix) to use it on its own"
            )
        return self._io

    def stage(self, epoch: int, batches: Sequence[pa.RecordBatch]) -> list[dict[str, Any]]:
        """Write ``epoch``'s rows as one Arrow IPC stream object; return ``[{"path",
        "rows", "bytes", "sha256"}]`` (``[]`` for no rows, writing nothing)."""
        epoch = _check_epoch(epoch)
        io = self._bound
        table = _table(batches, epoch)
        if table is None:
            return []
        pa = _pyarrow()
        out = pa.BufferOutputStream()
        with pa.ipc.new_stream(out, table.schema) as writer:
            writer.write_table(table)
        data = memoryview(out.getvalue()).cast("B")  # obstore takes unsigned bytes
        path = _join(self._prefix, f"epoch-{epoch:012d}-{uuid.uuid4().hex}.arrows")
        try:
            io.put(path, data)
        except _STORAGE_ERRORS as exc:
            io.delete_quietly([path])
            raise SinkError(f"{self!r}: staging epoch {epoch} failed: {exc}") from exc
        return [
            {"path": path, "rows": table.num_rows, "bytes": data.nbytes, "sha256": sha256_hex(data)}
        ]

    def publish(self, epoch: int, staged: Any) -> None:
        """Call ``fn`` on every batch staged for ``epoch``, then delete the staged object.

        An object already gone was delivered before: nothing is called. ``fn`` raising
        raises :class:`~streamstate.SinkError` with the rows still staged; an object that
        does not match its recorded digest raises :class:`~streamstate.IntegrityError`.
        """
        epoch = _check_epoch(epoch)
        io = self._bound
        for path, rows, sha in self._entries(epoch, staged):
            try:
                data = io.get(path).data
            except FileNotFoundError:
                continue
            except _STORAGE_ERRORS as exc:
                raise SinkError(f"{self!r}: reading {path} failed: {exc}") from exc
            actual = sha256_hex(data)
            if actual != sha:
                raise IntegrityError(path, sha, actual)
            for batch in self._batches(path, data, rows):
                try:
                    self.fn(batch)
                except Exception as exc:
                    raise SinkError(
                        f"{self!r}: the sink function raised delivering epoch {epoch} "
                        f"({type(exc).__name__}: {exc}); its rows stay staged and a "
                        "recovery delivers them again"
                    ) from exc
            try:
                io.delete(path)
            except _STORAGE_ERRORS as exc:
                raise SinkError(f"{self!r}: deleting delivered {path} failed: {exc}") from exc

    def recover(self, epoch: int | None, staged: Any | None) -> None:
        """Deliver the recovered epoch's ``staged`` rows that are still staged (again, if
        a crash interrupted their delivery), then delete every other staged object."""
        epoch = _check_recovered(epoch, staged)
        io = self._bound
        if epoch is not None and staged is not None:
            self.publish(epoch, staged)
        try:
            for path in io.list(self._prefix):
                if _STREAM_NAME.fullmatch(posixpath.basename(path)):
                    io.delete(path)
        except _STORAGE_ERRORS as exc:
            raise SinkError(f"{self!r}: recovering to epoch {epoch} failed: {exc}") from exc

    def _entries(self, epoch: int, staged: Any) -> Iterable[tuple[str, int, str]]:
        sink = repr(self)
        for record in _entry_list(staged, sink):
            path = _field(record, "path", str, sink)
            directory, name = posixpath.split(path)
            match = _STREAM_NAME.fullmatch(name)
            if directory != self._prefix or match is None or int(match[1]) != epoch:
                raise CorruptDataError(
                    f"{sink}: staged entry {path!r} is not an object this sink stages for "
                    f"epoch {epoch} (was its prefix changed?)"
                )
            yield path, _field(record, "rows", int, sink), _field(record, "sha256", str, sink)

    def _batches(self, path: str, data: memoryview, rows: int) -> list[pa.RecordBatch]:
        pa = _pyarrow()
        try:
            batches = list(pa.ipc.open_stream(pa.py_buffer(data)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorruptDataError(f"{path}: not an Arrow IPC stream ({exc})") from exc
        found = sum(batch.num_rows for batch in batches)
        if found != rows:
            raise CorruptDataError(f"{path}: holds {found} rows, the manifest records {rows}")
        return batches
