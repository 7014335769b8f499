"""Checkpoint batching: many state blobs, one compressed object per checkpoint cycle.

Object stores charge per PUT and throttle hot prefixes, so checkpointing many partitions as
many small objects is slow and expensive. :class:`CheckpointBatcher` collects the state blobs
of a cycle and writes them as one LZ4-compressed object in the ``LCB1`` format, which is
byte-compatible with the LaminarDB checkpoint batcher::

    "LCB1" | u32 version | u32 entry_count | u32 uncompressed_size | u32 CRC32C (version 2)
    | u32 uncompressed_size | one LZ4 block of: entry_count x (u32 len, key, u32 len, data)

All integers are little-endian; the CRC32C covers everything after the header.
:func:`encode_batch` writes version 2; :func:`decode_batch` reads versions 1 and 2 and raises
:class:`~streamstate.CorruptDataError` naming the problem for anything else.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from obstore.store import ObjectStore

from . import _core
from ._typing import BytesLike, byte_view
from .errors import CheckpointError, CorruptDataError
from .retry import RetryPolicy
from .storage import CheckpointStorage, RetryingStorage, StoreLike, describe_store

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_MAX_DECODED_SIZE",
    "BatchCompression",
    "BatchMetrics",
    "CheckpointBatcher",
    "auto_compression",
    "decode_batch",
    "encode_batch",
    "encode_batch_into",
]

#: The largest body one batch can hold: LZ4's block limit (the format's own is 4 GiB).
MAX_BATCH_BODY = 0x7E000000
#: The default bound on what decoding may produce (1 GiB, as for ``lz4_decompress``): a small
#: input claiming more is refused before anything is allocated for it.
DEFAULT_MAX_DECODED_SIZE = 1 << 30

# Conditional creates that lose a race are retried under the next free name this many times.
_MAX_NAME_ATTEMPTS = 64


#: How :func:`encode_batch` stores a batch's body.
BatchCompression = Literal["lz4", "stored", "auto"]


def encode_batch(
    entries: Iterable[tuple[str, BytesLike]], *, compression: BatchCompression = "lz4"
) -> bytes:
    """Encode ``(key, data)`` pairs as one ``LCB1`` version-2 batch.

    Keys are ``str`` (stored as UTF-8), data any bytes-like object. ``compression``:
    ``"lz4"`` compresses the body; ``"stored"`` writes it as one run of LZ4 literals, a
    block every LZ4 reader decodes, written at memory speed with no match search; ``"auto"``
    stores a body of 1 MiB or more unless LZ4 halves a 64 KiB sample of it (float partials,
    for one, shrink by 15-22%, and the search costs ~3x a stored encode: more CPU than
    hashing and writing the bytes it saves). The work runs in C++ without the GIL. Raises
    :class:`ValueError` when the body would exceed LZ4's 2 GB block limit (the format's own
    limit is 4 GiB).
    """
    return _core.encode_batch(entries, compression=compression)


def encode_batch_into(
    entries: Iterable[tuple[str, BytesLike]],
    out: bytearray,
    *,
    compression: BatchCompression = "lz4",
) -> None:
    """:func:`encode_batch` written into ``out``, resized to the batch's length, rather than
    into a new bytes object: a caller encoding tens of MB periodically reuses one buffer
    whose pages are mapped already (a new object faults in every page afresh). Raises
    :class:`BufferError` while someone holds a view of ``out``; on any failure ``out`` is
    left empty.
    """
    _core.encode_batch_into(entries, out, compression=compression)


def auto_compression(entries: Iterable[tuple[str, BytesLike]]) -> Literal["lz4", "stored"]:
    """What ``compression="auto"`` chooses for ``entries`` in :func:`encode_batch`: ``"lz4"``,
    or ``"stored"`` for a body of 1 MiB or more that LZ4 would not halve (judged from one
    64 KiB sample, so this costs microseconds, not a pass over the data). Lets a caller that
    would store the body anyway skip the batch altogether."""
    return _core.batch_compression(entries)


def decode_batch(
    raw: BytesLike, max_size: int | None = DEFAULT_MAX_DECODED_SIZE
) -> list[tuple[str, bytes]]:
    """Decode an ``LCB1`` batch (version 1 or 2) into ``[(key, data), ...]``.

    Stricter than the reference reader: a bad magic, an unknown version, a CRC32C mismatch, a
    size or count the input cannot hold, a malformed LZ4 block, an entry count that does not
    match the body, trailing bytes or a key that is not UTF-8 all raise
    :class:`~streamstate.CorruptDataError`, and no input allocates more than LZ4's maximum
    expansion of its own size. A body (keys, data and 8 bytes per entry) over ``max_size``
    bytes is refused the same way before decompressing; ``None`` leaves only the format's
    limit.
    """
    return _core.decode_batch(raw, max_size)


@dataclass(frozen=True)
class BatchMetrics:
    """A snapshot of a batcher's counters (``CheckpointBatcher.metrics``)."""

    #: Batches written.
    batches_flushed: int = 0
    #: Entries written across all batches.
    entries_flushed: int = 0
    #: Uncompressed body bytes of the batches written.
    bytes_before_compression: int = 0
    #: Bytes of the objects written (header included).
    bytes_after_compression: int = 0
    #: PUT requests issued, including failed and retried ones and conditional creates that
    #: found the name taken.
    put_count: int = 0

    @property
    def compression_ratio(self) -> float:
        """Bytes written per body byte (0.0 before the first flush)."""
        if self.bytes_before_compression == 0:
            return 0.0
        return self.bytes_after_compression / self.bytes_before_compression


class _Flush:
    """One flush: its entries travel with it until they are written or handed back."""

    __slots__ = ("entries", "epoch", "size", "superseded")

    def __init__(self, epoch: int, entries: list[tuple[str, bytes]], size: int) -> None:
        self.epoch = epoch
        self.entries = entries
        self.size = size
        self.superseded: BaseException | None = None


class CheckpointBatcher:
    """Collects state blobs and writes each checkpoint cycle as one compressed object.

    ``store`` is an obstore store, a URL (``file:///...``, ``memory://``, ``s3://...``; see
    :func:`streamstate.storage.resolve_store`) or a
    :class:`~streamstate.storage.CheckpointStorage`: the batcher writes through the same
    storage adapter as the checkpointer, and transient failures are retried by ``retry``
    (a :class:`~streamstate.RetryPolicy`). Batches go to
    ``{prefix}checkpoints/batch-{epoch:06}.lz4``; a later flush in the same epoch writes
    ``batch-{epoch:06}-1.lz4``, ``-2`` and so on. Names are claimed with conditional creates,
    so no flush ever overwrites another, not even one from a different batcher.

    Thread-safe: ``add`` may be called from any thread, also while an earlier
    :meth:`flush_async` compresses (in C++, without the GIL) and uploads. Flushes run one at a
    time in the order they were requested. A flush that fails hands its entries back to the
    front of the buffer, together with those of any flush queued behind it, so nothing is lost
    and the order is kept; flush again to retry.

    Use it as a context manager, or call :meth:`close`, to wait for pending flushes.
    """

    def __init__(
        self,
        store: StoreLike | CheckpointStorage,
        prefix: str = "",
        flush_threshold: int = 8 << 20,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if prefix.startswith("/"):
            raise ValueError(f"prefix must be relative to the store, got {prefix!r}")
        if isinstance(flush_threshold, bool) or not isinstance(flush_threshold, int):
            raise TypeError("flush_threshold must be an int")
        if flush_threshold <= 0:
            raise ValueError(f"flush_threshold must be positive, got {flush_threshold}")
        storage = store if isinstance(store, CheckpointStorage) else CheckpointStorage(store)
        self._io = RetryingStorage(storage, retry if retry is not None else RetryPolicy())
        self._prefix = prefix
        self._flush_threshold = flush_threshold
        self._lock = threading.Lock()
        self._buffer: list[tuple[str, bytes]] = []
        self._buffer_size = 0
        self._queued: deque[_Flush] = deque()
        self._pending: set[Future[str | None]] = set()
        self._closed = False
        self._metrics = BatchMetrics()
        # The next suffix to try per epoch, so repeated flushes do not probe taken names.
        self._next_suffix: dict[int, int] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamstate-batcher")

    # -- buffer ---------------------------------------------------------------------------

    def add(self, key: str, data: BytesLike) -> None:
        """Buffer one state blob under ``key`` (e.g. ``"partition-0/agg"``).

        ``bytes`` are kept as they are; other bytes-like objects are copied, so later changes
        to them do not leak into the batch.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        view = byte_view(data)  # also rejects what is not bytes-like
        size = len(key.encode("utf-8")) + view.nbytes + 8
        if size > MAX_BATCH_BODY:  # checked before copying a huge buffer for nothing
            raise ValueError(
                f"an entry of {size} bytes cannot fit in a batch: LZ4's block limit is "
                f"{MAX_BATCH_BODY} bytes"
            )
        blob = data if isinstance(data, bytes) else view.tobytes()
        with self._lock:
            if self._closed:
                raise ValueError("add() on a closed CheckpointBatcher")
            if self._buffer_size + size > MAX_BATCH_BODY:
                raise ValueError(
                    f"adding {size} bytes would grow the batch past LZ4's block limit of "
                    f"{MAX_BATCH_BODY} bytes; flush first"
                )
            self._buffer.append((key, blob))
            self._buffer_size += size

    def should_flush(self) -> bool:
        """True once the buffered bytes reach ``flush_threshold``."""
        with self._lock:
            return self._buffer_size >= self._flush_threshold

    def __len__(self) -> int:
        """Entries buffered (not counting those of flushes in progress)."""
        with self._lock:
            return len(self._buffer)

    def is_empty(self) -> bool:
        """True when nothing is buffered."""
        return len(self) == 0

    @property
    def buffer_size(self) -> int:
        """Uncompressed bytes buffered: key + data + 8 per entry, as in the body."""
        with self._lock:
            return self._buffer_size

    @property
    def metrics(self) -> BatchMetrics:
        """A consistent snapshot of the counters."""
        with self._lock:
            return self._metrics

    @property
    def store(self) -> ObjectStore:
        """The obstore store batches are written to."""
        return self._io.storage.store

    @property
    def prefix(self) -> str:
        """The key prefix of every object this batcher writes."""
        return self._prefix

    @property
    def flush_threshold(self) -> int:
        """The buffer size at which :meth:`should_flush` turns true."""
        return self._flush_threshold

    @property
    def pending_flushes(self) -> int:
        """Flushes requested and not yet finished."""
        with self._lock:
            return len(self._pending)

    # -- flushing -------------------------------------------------------------------------

    def flush(self, epoch: int) -> str | None:
        """Write the buffer as one batch for ``epoch`` and return the object's path.

        Returns ``None`` (and issues no PUT) when nothing is buffered. Waits for earlier
        asynchronous flushes first, since flushes run in order. On failure raises
        :class:`~streamstate.CheckpointError` and the entries stay buffered.
        """
        return self.flush_async(epoch).result()

    def flush_async(self, epoch: int) -> Future[str | None]:
        """Start writing the buffer as one batch for ``epoch``; return a future of its path.

        The buffer is handed to the flush at once, so ``add`` calls for the next cycle go on
        while this batch compresses and uploads. The future's result is ``None`` when
        nothing was buffered; its exception is a :class:`~streamstate.CheckpointError` when
        the upload failed, after which the entries are back at the front of the buffer.
        """
        epoch = _check_epoch(epoch)
        with self._lock:
            if self._closed:
                raise ValueError("flush on a closed CheckpointBatcher")
            if not self._buffer:
                done: Future[str | None] = Future()
                done.set_result(None)
                return done
            job = _Flush(epoch, self._buffer, self._buffer_size)
            self._buffer = []
            self._buffer_size = 0
            try:
                future: Future[str | None] = self._executor.submit(self._run, job)
            except BaseException:  # e.g. at interpreter shutdown: keep the entries
                self._buffer, self._buffer_size = job.entries + self._buffer, job.size
                raise
            self._queued.append(job)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[str | None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _run(self, job: _Flush) -> str | None:
        # Runs on the single worker thread, so flushes happen one at a time, in order.
        with self._lock:
            self._queued.popleft()
            if job.superseded is not None:
                raise CheckpointError(
                    f"flush of epoch {job.epoch} not attempted: an earlier flush failed "
                    f"({job.superseded}); its entries are buffered again"
                ) from job.superseded
        try:
            payload = _core.encode_batch(job.entries)
            path = self._put_new(job.epoch, payload)
        except BaseException as exc:
            self._hand_back(job, exc)
            if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
                raise CheckpointError(f"flush of epoch {job.epoch} failed: {exc}") from exc
            raise
        with self._lock:
            m = self._metrics
            self._metrics = BatchMetrics(
                batches_flushed=m.batches_flushed + 1,
                entries_flushed=m.entries_flushed + len(job.entries),
                bytes_before_compression=m.bytes_before_compression + job.size,
                bytes_after_compression=m.bytes_after_compression + len(payload),
                put_count=m.put_count,
            )
        return path

    def _hand_back(self, job: _Flush, exc: BaseException) -> None:
        """Put a failed flush's entries, and those of every flush queued behind it, back at
        the front of the buffer in their original order."""
        with self._lock:
            returned = list(job.entries)
            size = job.size
            for later in self._queued:
                later.superseded = exc
                returned.extend(later.entries)
                size += later.size
                later.entries = []
                later.size = 0
            self._buffer[:0] = returned
            self._buffer_size += size

    def _count_put(self) -> None:
        with self._lock:
            m = self._metrics
            self._metrics = BatchMetrics(
                m.batches_flushed,
                m.entries_flushed,
                m.bytes_before_compression,
                m.bytes_after_compression,
                m.put_count + 1,
            )

    def _put_new(self, epoch: int, payload: bytes) -> str:
        """Create the next free batch object of ``epoch``; return its path."""
        suffix = self._next_suffix.get(epoch, 0)
        for _ in range(_MAX_NAME_ATTEMPTS):
            path = self.batch_path(epoch, suffix)
            try:
                created = self._io.create(path, payload, on_attempt=self._count_put)
            except CheckpointError as exc:
                raise CheckpointError(f"PUT {path} failed: {exc}") from exc
            if not created:
                # Someone (an earlier run, another batcher) has it: jump past every taken name.
                taken = [n for n, _ in self._list_epoch(epoch)]
                suffix = max(suffix + 1, max(taken, default=-1) + 1)
                continue
            self._next_suffix = {epoch: suffix + 1}  # only the current epoch is worth keeping
            return path
        raise CheckpointError(
            f"could not claim a batch name for epoch {epoch} after {_MAX_NAME_ATTEMPTS} attempts"
        )

    # -- reading back ---------------------------------------------------------------------

    def batch_path(self, epoch: int, suffix: int = 0) -> str:
        """The object path of the ``suffix``-th batch of ``epoch`` (0 is the first)."""
        epoch = _check_epoch(epoch)
        stem = f"{self._prefix}checkpoints/batch-{epoch:06d}"
        return f"{stem}.lz4" if suffix == 0 else f"{stem}-{suffix}.lz4"

    def _list_epoch(self, epoch: int) -> list[tuple[int, str]]:
        stem = self.batch_path(epoch)[: -len(".lz4")]
        pattern = re.compile(re.escape(stem) + r"(?:-([1-9][0-9]*))?\.lz4")
        directory = stem.rpartition("/")[0]
        found = []
        for path in self._io.list_directory(directory):
            match = pattern.fullmatch(path)
            if match is not None:
                found.append((int(match.group(1) or 0), path))
        return sorted(found)

    def batch_paths(self, epoch: int) -> list[str]:
        """Paths of every batch written for ``epoch`` (by any batcher on this prefix), in
        write order."""
        return [path for _, path in self._list_epoch(epoch)]

    def read_epoch(
        self, epoch: int, max_size: int | None = DEFAULT_MAX_DECODED_SIZE
    ) -> list[tuple[str, bytes]]:
        """All entries written for ``epoch``, batch after batch, in the order they were added.

        Waits for this batcher's pending flushes first. Raises
        :class:`~streamstate.CorruptDataError` (naming the object) if a batch is damaged, or
        if the batches together would decode to more than ``max_size`` bytes (counted as
        :func:`decode_batch` counts; ``None`` for no bound), before decoding the one that
        would cross it.
        """
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0
        ):
            raise ValueError(f"max_size must be an int >= 0 or None, got {max_size!r}")
        self.wait()
        entries: list[tuple[str, bytes]] = []
        decoded = 0
        for path in self.batch_paths(epoch):
            raw = self._io.get(path).data  # a view of obstore's buffer, no copy
            budget = None if max_size is None else max_size - decoded
            try:
                batch = _core.decode_batch(raw, budget)
            except CorruptDataError as exc:
                raise CorruptDataError(f"{path}: {exc}") from exc
            decoded += sum(len(key.encode("utf-8")) + len(data) + 8 for key, data in batch)
            entries.extend(batch)
        return entries

    # -- lifetime -------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every flush requested so far has finished (successfully or not)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.exception()  # waits; the outcome belongs to whoever holds the future

    def close(self) -> None:
        """Wait for pending flushes and stop the worker. Entries still buffered are not
        written: flush them first. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._lock:
            if self._closed:
                state = "closed"
            else:
                state = (
                    f"{len(self._buffer)} entries / {self._buffer_size} bytes buffered, "
                    f"{len(self._pending)} flushes pending"
                )
        return (
            f"CheckpointBatcher({describe_store(self.store)}, prefix={self._prefix!r}, "
            f"flush_threshold={self._flush_threshold}: {state})"
        )


def _check_epoch(epoch: int) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    return epoch
