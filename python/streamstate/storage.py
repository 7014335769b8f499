"""Where checkpoints live, and the one path every persisted byte takes to get there.

:func:`resolve_store` turns a URL or path into an obstore store: the local filesystem is the
embedded default; ``memory://`` is handy in tests; ``s3://``, ``gs://`` and ``az://`` URLs go
to obstore's cloud stores (credentials from the environment, as obstore reads them).

:class:`CheckpointStorage` is the storage adapter: plain obstore calls on one store, no
retries (subclass it to instrument I/O or inject faults). :class:`RetryingStorage` puts a
:class:`~streamstate.retry.RetryPolicy` in front of it and adds the conditional create;
both the checkpointer and the checkpoint batcher write through it.

On a :class:`~obstore.store.LocalStore`, listing and deletion never follow symbolic links:
a link inside the store is listed as one object and deleting it removes the link, never
what it points to (obstore itself would walk into linked directories, delete their files,
and fail every listing on a link loop).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, Union
from urllib.parse import unquote, urlparse

import obstore
from obstore import exceptions as obs_errors
from obstore.store import LocalStore, MemoryStore, ObjectStore, from_url

from ._core import sha256_hex
from ._typing import BytesLike, byte_view
from .errors import StoreConfigurationError, StreamStateError
from .retry import RetryPolicy, summary

if TYPE_CHECKING:
    from obstore import PutResult, UpdateVersion

__all__ = [
    "CheckpointStorage",
    "PutMode",
    "RetryingStorage",
    "StoreLike",
    "StoredObject",
    "default_store_path",
    "describe_store",
    "parallel_map",
    "resolve_store",
]

T = TypeVar("T")
U = TypeVar("U")

#: An obstore store instance, a URL (``file:///``, ``memory://``, ``s3://bucket/prefix``), or
#: a local directory path.
StoreLike = Union[ObjectStore, str, "os.PathLike[str]"]
#: ``mode`` of :meth:`CheckpointStorage.put`, as for :func:`obstore.put`.
PutMode = Union[Literal["create", "overwrite"], "UpdateVersion"]


def default_store_path() -> Path:
    """The local directory used when no store is given: ``$STREAMSTATE_HOME`` or
    ``~/.local/share/streamstate``."""
    home = os.environ.get("STREAMSTATE_HOME")
    if home:
        return Path(home)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "streamstate"


def resolve_store(store: StoreLike, **options: Any) -> ObjectStore:
    """Return an obstore store for ``store``.

    Store instances pass through unchanged. A ``file://`` URL or a plain path becomes a
    :class:`~obstore.store.LocalStore` rooted there (the directory is created); ``memory://``
    a fresh :class:`~obstore.store.MemoryStore`; anything else goes to
    :func:`obstore.store.from_url` with ``options`` (e.g. ``endpoint``, ``region``). A URL or
    option obstore cannot use raises :class:`~streamstate.StoreConfigurationError`.
    """
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if not isinstance(store, str):
        return store
    parsed = urlparse(store)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else store).expanduser()
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StoreConfigurationError(
                f"file URLs must be local (file:///path), got {store!r}"
            )
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(str(path.resolve()), automatic_cleanup=True)
    if parsed.scheme == "memory":
        return MemoryStore()
    try:
        return from_url(store, **options)
    except (obs_errors.BaseError, ValueError, TypeError) as exc:
        raise StoreConfigurationError(f"cannot open store {store!r}: {summary(exc)}") from None


def describe_store(store: ObjectStore) -> str:
    """A short human-readable description of a store, for ``__repr__`` and logs."""
    prefix = getattr(store, "prefix", None)
    return f"{type(store).__name__}({str(prefix)!r})" if prefix is not None else type(store).__name__


# -- the storage adapter -----------------------------------------------------------------


class StoredObject(NamedTuple):
    """An object read back: its bytes and the version tags a conditional update needs."""

    data: memoryview
    e_tag: str | None
    version: str | None


class CheckpointStorage:
    """Plain obstore calls on one store, no retries: the only place persisted bytes move.

    Errors are obstore's (``FileNotFoundError`` for a missing object,
    ``obstore.exceptions.*`` otherwise); :class:`RetryingStorage` classifies and retries
    them. Subclass it to instrument I/O or inject faults, and pass the instance as ``store``
    to the checkpointer or the batcher.
    """

    def __init__(self, store: StoreLike) -> None:
        self.store: ObjectStore = _with_directory_cleanup(resolve_store(store))
        self._root = _local_root(self.store)

    def put(self, path: str, data: BytesLike, *, mode: PutMode = "overwrite") -> PutResult:
        """Write one object atomically (``mode`` as for :func:`obstore.put`)."""
        return obstore.put(self.store, path, data, mode=mode)

    def get(self, path: str) -> StoredObject:
        """Read one whole object."""
        result = obstore.get(self.store, path)
        meta = result.meta
        # The view keeps obstore's buffer alive without copying it.
        return StoredObject(memoryview(result.bytes()), meta.get("e_tag"), meta.get("version"))

    @property
    def is_local(self) -> bool:
        """Whether the store is the local filesystem (its calls wait on no network)."""
        return self._root is not None

    def exists(self, path: str) -> bool:
        """Whether an object is stored at ``path`` (one metadata request; on a local store a
        ``stat``, and a path through a linked directory is not an object of the store)."""
        if self._root is not None:
            if _through_link(self._root, path):
                return False
            try:
                return not stat.S_ISDIR(os.lstat(self._root / path).st_mode)
            except FileNotFoundError:
                return False
        try:
            obstore.head(self.store, path)
        except FileNotFoundError:
            return False
        return True

    def list_directory(self, prefix: str) -> list[str]:
        """Paths of the objects directly under the directory ``prefix`` (not below it)."""
        if self._root is not None:
            return _list_local(self._root, prefix, recursive=False)
        listing: Any = obstore.list_with_delimiter(self.store, prefix=prefix or None)
        return [str(meta["path"]) for meta in listing["objects"]]

    def list(self, prefix: str) -> list[str]:
        """Paths of every object under ``prefix`` (a directory prefix, ``""`` for all)."""
        if self._root is not None:
            return _list_local(self._root, prefix)
        stream = obstore.list(self.store, prefix or None)
        return [meta["path"] for meta in stream.collect()]

    def delete(self, path: str) -> None:
        """Delete one object; a missing object is not an error. On a local store a link is
        removed itself, and a path through a linked directory is left alone."""
        if self._root is not None:
            _delete_local(self._root, path)
            return
        try:
            obstore.delete(self.store, path)
        except FileNotFoundError:
            pass

    def rename(self, src: str, dst: str) -> None:
        """Move one object to ``dst``, replacing any object there; ``FileNotFoundError``
        when ``src`` is missing. One atomic rename on a local store (the directories it
        leaves empty are removed); other stores copy then delete, so a failure between the
        two leaves both objects, and repeating the call completes the move."""
        obstore.rename(self.store, src, dst, overwrite=True)
        if self._root is not None:
            _remove_empty_parents(self._root, self._root / src)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({describe_store(self.store)})"


def _with_directory_cleanup(store: ObjectStore) -> ObjectStore:
    """The same LocalStore with ``automatic_cleanup`` on, so deleting a checkpoint also
    removes its now-empty directories (otherwise every pruned checkpoint leaves a tree of
    empty directories behind). Other stores have no directories and pass through."""
    if not isinstance(store, LocalStore):
        return store
    state: Any = getattr(store, "__getnewargs_ex__", None)  # obstore's own pickling state
    try:
        args, kwargs = state()
    except (TypeError, ValueError):
        return store
    if kwargs.get("automatic_cleanup", True):
        return store
    return LocalStore(*args, **{**kwargs, "automatic_cleanup": True, "mkdir": False})


def _local_root(store: ObjectStore) -> Path | None:
    if not isinstance(store, LocalStore):
        return None
    prefix = store.prefix
    return Path(prefix) if prefix is not None else Path("/")


# obstore's own in-progress upload files ("name#123"), which its listing hides too.
_STAGING = re.compile(r".*#[0-9]+")


def _list_local(root: Path, prefix: str, *, recursive: bool = True) -> list[str]:
    """Every non-directory entry under ``root/prefix`` (only directly under it unless
    ``recursive``), without following links."""
    base = prefix.rstrip("/")
    start = root / base if base else root
    if base and (_through_link(root, base) or os.path.islink(start)):
        return []  # the prefix itself leads out of the store
    if not os.path.isdir(start):
        return []
    found: list[str] = []

    def walk(directory: Path, rel: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return  # deleted while we walked: nothing to list there
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    walk(Path(entry.path), path)
            elif not _STAGING.fullmatch(entry.name):
                found.append(path)

    walk(start, base)
    return sorted(found)


def _through_link(root: Path, path: str) -> bool:
    """Whether some directory between ``root`` and ``path``'s last segment is a link."""
    current = root
    for part in [p for p in path.split("/") if p][:-1]:
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return True
        except FileNotFoundError:
            return False
    return False


def _delete_local(root: Path, path: str) -> None:
    if _through_link(root, path):
        return  # not an object of this store: its bytes live somewhere else
    target = root / path
    try:
        if stat.S_ISDIR(os.lstat(target).st_mode):
            raise IsADirectoryError(f"{path}: is a directory, not an object")
        os.unlink(target)  # removes a link itself, never what it points to
    except FileNotFoundError:
        return
    _remove_empty_parents(root, target)


def _remove_empty_parents(root: Path, target: Path) -> None:
    """What obstore's automatic_cleanup does: remove the directories between ``root`` and
    the removed ``target`` that its removal left empty."""
    parent = target.parent
    while parent != root and root in parent.parents:
        try:
            os.rmdir(parent)
        except OSError:
            break
        parent = parent.parent


# -- retried I/O -------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryingStorage:
    """A :class:`CheckpointStorage` behind a :class:`~streamstate.retry.RetryPolicy`.

    Transient failures are retried; permanent ones, and transient ones past the budget,
    raise :class:`~streamstate.CheckpointError` naming the path. A missing object stays a
    ``FileNotFoundError`` for :meth:`get`, and is not an error for :meth:`delete`.
    """

    storage: CheckpointStorage
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def get(self, path: str) -> StoredObject:
        """Read one whole object."""
        return self.retry.call(
            path, lambda _attempt: self.storage.get(path), passthrough=(FileNotFoundError,)
        )

    def put(
        self,
        path: str,
        data: BytesLike,
        *,
        mode: PutMode = "overwrite",
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> None:
        """Write one object (``mode`` as for :func:`obstore.put`); exceptions in
        ``passthrough`` (e.g. a lost conditional update) propagate unchanged."""
        self.retry.call(
            path, lambda _attempt: self.storage.put(path, data, mode=mode), passthrough=passthrough
        )

    def create(
        self, path: str, data: BytesLike, *, on_attempt: Callable[[], None] | None = None
    ) -> bool:
        """Create ``path`` holding ``data`` without ever overwriting; return False (writing
        nothing) when ``path`` already holds other bytes.

        Identical bytes already there count as created: they mean an earlier attempt of
        ours landed although its response was lost (possibly inside obstore's own HTTP
        retries). ``on_attempt`` is called before every PUT request.
        """

        def attempt(_attempt: int) -> None:
            if on_attempt is not None:
                on_attempt()
            try:
                self.storage.put(path, data, mode="create")
            except obs_errors.AlreadyExistsError:
                if not self.holds(path, data):
                    raise

        try:
            self.retry.call(path, attempt, passthrough=(obs_errors.AlreadyExistsError,))
        except obs_errors.AlreadyExistsError:
            return False
        return True

    def holds(self, path: str, data: BytesLike) -> bool:
        """Whether ``path`` exists and holds exactly ``data`` (one unretried read)."""
        try:
            existing = self.storage.get(path).data
        except FileNotFoundError:
            return False
        mine = byte_view(data)
        return existing.nbytes == mine.nbytes and sha256_hex(existing) == sha256_hex(mine)

    def exists(self, path: str) -> bool:
        """Whether an object is stored at ``path``."""
        return self.retry.call(path, lambda _attempt: self.storage.exists(path))

    def list_directory(self, prefix: str) -> list[str]:
        """Paths of the objects directly under the directory ``prefix``."""
        return self.retry.call(prefix or "/", lambda _attempt: self.storage.list_directory(prefix))

    def list(self, prefix: str) -> list[str]:
        """Paths of every object under ``prefix``."""
        return self.retry.call(prefix or "/", lambda _attempt: self.storage.list(prefix))

    def delete(self, path: str) -> None:
        """Delete one object; a missing object is not an error."""
        self.retry.call(path, lambda _attempt: self.storage.delete(path))

    def rename(self, src: str, dst: str) -> None:
        """Move one object to ``dst``, replacing any object there; a missing ``src`` stays a
        ``FileNotFoundError`` (an earlier attempt may have moved it already)."""
        self.retry.call(
            src,
            lambda _attempt: self.storage.rename(src, dst),
            passthrough=(FileNotFoundError,),
        )

    def delete_quietly(self, paths: Sequence[str]) -> None:
        """Best-effort :meth:`delete` of each path, ignoring failures (used to clean up
        after a failed write; whatever is left is unreferenced and pruned later)."""
        for path in paths:
            try:
                self.storage.delete(path)
            except (StreamStateError, OSError, obs_errors.BaseError):
                continue


def parallel_map(fn: Callable[[T], U], items: Sequence[T], max_workers: int) -> list[U]:
    """``[fn(x) for x in items]`` on up to ``max_workers`` threads (object-store calls wait
    on the network, not the GIL), results in input order.

    The first failure cancels what has not started, waits for what has, and is raised.
    """
    workers = min(max_workers, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="streamstate-io") as pool:
        futures = [pool.submit(fn, item) for item in items]
        done, _ = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            for future in futures:
                future.cancel()
            cf.wait(futures)
            exc = failed.exception()
            assert exc is not None
            raise exc
        return [future.result() for future in futures]
