"""Group-by larger than memory: the spilling hash aggregator.

:class:`SpillingAggregator` folds ``(key, value)`` rows into per-key count / sum / min /
max / mean / var / std within a memory limit, spilling partial aggregates to disk by key
hash (grace hash aggregation) and repartitioning recursively when reading them back, so
any input finishes within the limit. The work runs in C++ with the GIL released.

Spill files live in a directory private to each aggregator, created inside ``spill_dir``
(or a per-user directory under the system temp dir) and marked with the owner's PID; they
are deleted after :meth:`~SpillingAggregator.drain`, on :meth:`~SpillingAggregator.close`
or exit from ``with``, when the aggregator is garbage-collected, and at interpreter exit.
A process killed mid-spill leaves its private directory behind; the next aggregator
created in the same place removes directories whose owner is no longer running.

Nobody else can redirect the spill files: a parent directory that another user owns, or
that group or others can write without the sticky bit, is refused with a
:class:`~streamstate.SpillError`; the private directory is created atomically with mode
0700; spill files are opened without following symlinks, and created exclusively.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat
import tempfile
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from . import _core
from .errors import SpillError
from .stats import columns_to_pandas

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "MIN_MEM_LIMIT_BYTES",
    "RSS_OVERHEAD_BYTES",
    "SpillingAggregator",
    "cleanup_stale_spill_dirs",
]

KeyType = Literal["int64", "bytes"]
NanPolicyName = Literal["skip", "propagate", "raise"]

#: The smallest ``mem_limit_bytes`` accepted (64 KiB).
MIN_MEM_LIMIT_BYTES: int = int(_core.SPILL_MIN_MEM_LIMIT)

#: How far the process's peak RSS may grow beyond ``mem_limit_bytes`` while accumulating
#: and draining: thread stacks and TBB's pool, the allocator's slack, the byte-string key
#: views of one 64 Ki-row chunk, and Python's own objects. The returned result columns are
#: extra (8 bytes per statistic per group plus the keys): they are the caller's data.
RSS_OVERHEAD_BYTES: int = 24 << 20

_MARKER = ".streamstate-spill"
_DIR_PREFIX = "streamstate-spill-"

_DIAGNOSTICS = (
    "spill_count",
    "spilled_batch_count",
    "total_spilled_bytes",
    "in_memory_groups",
    "peak_memory_bytes",
    "memory_bytes",
    "spill_depth",
    "spill_files",
)


def _default_parent() -> Path:
    # Per user: another user's 0700 directory of the same name would be unusable.
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"streamstate-spill-{uid}"


def _check_parent(parent: Path, *, default: bool) -> None:
    """Refuse a parent another user could use to swap or redirect the spill directory.

    Whoever can write to the parent (without the sticky bit) can rename the private
    directory away and put a symlink in its place; its owner can do so even with the
    sticky bit. So the parent must be a directory owned by this user (or root, as the
    system temp dir is), and writable by group or others only with the sticky bit. The
    default per-user parent must be a real directory (not a symlink) owned by this user.
    """
    uid = os.geteuid()
    st = os.lstat(parent) if default else os.stat(parent)
    problem = ""
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != uid and (default or st.st_uid != 0):
        problem = f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        problem = f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}, no sticky bit)"
    if problem:
        hint = "remove it" if default else "pass a spill_dir only this user can write to"
        raise SpillError(
            errno.EPERM,
            f"refusing to spill under '{parent}': it {problem}, so another user could "
            f"redirect the spill files; {hint}",
            str(parent),
        )


def _process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (Linux), which tells a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # Fields after the parenthesised command name; starttime is field 22 overall.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _owner_alive(marker: Path) -> bool:
    """False only when the marker's process is certainly gone (same host, dead or reused)."""
    try:
        info = dict(line.split("=", 1) for line in marker.read_text().splitlines() if "=" in line)
        pid = int(info["pid"])
    except (OSError, KeyError, ValueError):
        return True  # unreadable or foreign: leave it alone
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    start = info.get("start", "")
    current = _process_start_time(pid)
    return not (start.isdigit() and current is not None and current != int(start))


def cleanup_stale_spill_dirs(parent: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove spill directories under ``parent`` left by processes that no longer run.

    Only directories this module created (name prefix and marker file) are touched. Runs
    automatically whenever a :class:`SpillingAggregator` creates its directory; returns the
    directories removed.
    """
    root = Path(parent) if parent is not None else _default_parent()
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    uid = os.geteuid()
    for entry in entries:
        if not entry.name.startswith(_DIR_PREFIX):
            continue
        try:
            # Without following symlinks: only this user's own directories, each with a
            # marker that is a regular file, never something another user placed here.
            st, marker = os.lstat(entry), os.lstat(entry / _MARKER)
        except OSError:
            continue
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_ISREG(marker.st_mode)):
            continue
        if not _owner_alive(entry / _MARKER):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _make_private_dir(parent: Path) -> Path:
    default = parent == _default_parent()
    try:
        if default:
            with contextlib.suppress(FileExistsError):
                parent.mkdir(mode=0o700)
        else:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _check_parent(parent, default=default)
        cleanup_stale_spill_dirs(parent)
        # mkdtemp: a fresh name, created atomically with mode 0700 (never an existing one).
        path = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=parent))
    except SpillError:
        raise
    except OSError as exc:
        raise SpillError(
            exc.errno or 0,
            f"cannot create a spill directory in '{parent}': {exc.strerror}",
            str(parent),
        ) from exc
    try:
        start = _process_start_time(os.getpid())
        marker = os.open(
            path / _MARKER,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        with os.fdopen(marker, "w") as f:
            f.write(
                f"pid={os.getpid()}\nstart={'' if start is None else start}\n"
                f"host={socket.gethostname()}\n"
            )
    except OSError as exc:
        shutil.rmtree(path, ignore_errors=True)
        raise SpillError(
            exc.errno or 0,
            f"cannot write the spill marker in '{path}': {exc.strerror}",
            str(path),
        ) from exc
    return path


def _release(core: _core.SpillingAggregatorCore, path: str, owner_pid: int) -> None:
    # The finalizer of every exit path: free the core's memory (its destructors delete
    # the spill files), then the directory and its marker. A fork()ed child runs this too
    # (at its exit) but must leave the parent's files alone.
    if os.getpid() != owner_pid:
        return
    core.close()
    shutil.rmtree(path, ignore_errors=True)


class SpillingAggregator:
    """Per-key count / sum / min / max / mean / var / std of a stream larger than memory.

    ``mem_limit_bytes`` bounds the working memory (hash tables and I/O buffers, measured
    exactly); ``None`` means no limit (never spill). Any limit from 64 KiB up works: a small
    one only means more spilling. ``spill_dir`` is where the aggregator's private spill
    directory is created (default: a per-user directory under the system temp dir).
    ``key_type`` is ``"int64"`` (integer keys) or ``"bytes"`` (bytes, or str as UTF-8).
    ``nan_policy`` is ``"skip"`` (NaN values are ignored), ``"propagate"`` (they make the
    group's statistics NaN) or ``"raise"`` (a batch holding one is rejected whole).
    ``threads`` caps the worker threads (default: every core TBB may use).

    A context manager: leaving the ``with`` block deletes every spill file. Statistics are
    sample statistics (``ddof=1``), exactly as :class:`streamstate.Stats` defines them.
    """

    def __init__(
        self,
        mem_limit_bytes: int | None = 64 << 20,
        spill_dir: str | os.PathLike[str] | None = None,
        key_type: KeyType = "int64",
        *,
        nan_policy: NanPolicyName = "skip",
        threads: int | None = None,
    ) -> None:
        # key_type, nan_policy, the limit's type and range are checked by the core, in one
        # place for every binding; only the Python-side spellings (None) are mapped here.
        if mem_limit_bytes == 0 and not isinstance(mem_limit_bytes, bool):
            raise ValueError(
                f"mem_limit_bytes must be at least {MIN_MEM_LIMIT_BYTES} (64 KiB) or None, got 0"
            )
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self._mem_limit = mem_limit_bytes
        self._key_type: KeyType = key_type
        self._nan_policy: NanPolicyName = nan_policy
        # Absolute, so a later chdir cannot send spill files elsewhere.
        parent = Path(spill_dir).absolute() if spill_dir is not None else _default_parent()
        self._dir = _make_private_dir(parent)
        try:
            self._core = _core.SpillingAggregatorCore(
                key_type, mem_limit_bytes or 0, str(self._dir), nan_policy, threads or 0
            )
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _release, self._core, str(self._dir), os.getpid())

    # -- folding ---------------------------------------------------------------------

    def accumulate(self, key: int | bytes | str, value: float) -> None:
        """Fold one row. For batches use :meth:`accumulate_batch` (far faster)."""
        self._core.accumulate(key, value)

    def accumulate_batch(self, keys: Any, values: Any) -> None:
        """Fold a batch: ``keys`` an int64 array-like (or a sequence of bytes / str for
        ``key_type="bytes"``), ``values`` a float64 array-like of the same length.

        Runs in C++ with the GIL released, on all worker threads. Mismatched lengths, wrong
        key types and (with ``nan_policy="raise"``) NaN values are rejected before any row
        is folded. An I/O error while spilling raises :class:`~streamstate.SpillError` and
        closes the aggregator (the batch may have been partly folded).
        """
        self._core.accumulate_batch(keys, values)

    # -- results ---------------------------------------------------------------------

    def drain(self) -> dict[str, Any]:
        """Merge everything into one result per key and delete the spill files.

        Returns the same columns as ``NumericAggregateStore.results()``: ``{"key", "count",
        "sum", "min", "max", "mean", "var", "std"}`` (keys an int64 array, or a list of
        bytes). Works within the memory limit however many spill files there are; the
        returned columns themselves are the caller's. Terminal: afterwards the aggregator
        is closed, its diagnostics keep their values. A damaged spill file raises
        :class:`~streamstate.CorruptDataError` naming it, and no partial result is returned.
        """
        try:
            return self._core.drain()
        finally:
            self._finalizer()

    def to_pandas(self) -> Any:
        """:meth:`drain` as a pandas DataFrame indexed by key (needs pandas)."""
        return columns_to_pandas(self.drain())

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Free the memory and delete every spill file (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """True after :meth:`drain`, :meth:`close` or a failed spill."""
        return not self._finalizer.alive or self._core.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- configuration and diagnostics -------------------------------------------------

    @property
    def mem_limit_bytes(self) -> int | None:
        """The working-memory limit (``None``: unlimited)."""
        return self._mem_limit

    @property
    def key_type(self) -> KeyType:
        """``"int64"`` or ``"bytes"``."""
        return self._key_type

    @property
    def nan_policy(self) -> NanPolicyName:
        """What a NaN value does: ``"skip"``, ``"propagate"`` or ``"raise"``."""
        return self._nan_policy

    @property
    def spill_dir(self) -> Path:
        """This aggregator's private spill directory (removed when it is closed)."""
        return self._dir

    @property
    def threads(self) -> int:
        """Worker lanes: each owns a share of the keys and of the memory limit."""
        return int(self._core.lanes)

    @property
    def fanout(self) -> int:
        """Partitions per lane and per repartitioning level."""
        return int(self._core.fanout)

    def diagnostics(self) -> dict[str, int]:
        """All counters at once (see the properties of the same names)."""
        d = self._core.diagnostics()
        return {name: int(d[name]) for name in _DIAGNOSTICS}

    @property
    def spill_count(self) -> int:
        """Times memory was spilled so far: a full partition alone, or every partition
        at once (the first overflow of a level, and the remainder when draining)."""
        return int(self._core.diagnostics()["spill_count"])

    @property
    def spilled_batch_count(self) -> int:
        """Runs written so far: each is one partition's partials appended to its file."""
        return int(self._core.diagnostics()["spilled_batch_count"])

    @property
    def total_spilled_bytes(self) -> int:
        """Bytes written to spill files so far, across every level."""
        return int(self._core.diagnostics()["total_spilled_bytes"])

    @property
    def in_memory_groups(self) -> int:
        """Groups held in memory now (frozen at the value :meth:`drain` started from)."""
        return int(self._core.diagnostics()["in_memory_groups"])

    @property
    def peak_memory_bytes(self) -> int:
        """Highest working memory accounted (tables and buffers, exact bytes)."""
        return int(self._core.diagnostics()["peak_memory_bytes"])

    @property
    def spill_depth(self) -> int:
        """Levels that spilled: 0 never, 1 while accumulating, 2+ repartitioned in drain."""
        return int(self._core.diagnostics()["spill_depth"])

    def __repr__(self) -> str:
        limit = "None" if self._mem_limit is None else f"{self._mem_limit}"
        d = self.diagnostics()
        state = "closed" if self.closed else "open"
        return (
            f"SpillingAggregator(key_type={self._key_type!r}, mem_limit_bytes={limit}, "
            f"{state}, in_memory_groups={d['in_memory_groups']}, "
            f"spill_count={d['spill_count']}, total_spilled_bytes={d['total_spilled_bytes']}, "
            f"spill_dir='{self._dir}')"
        )
