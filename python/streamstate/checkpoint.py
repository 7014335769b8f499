"""Object-store checkpoints: all-or-nothing commits and verified recovery.

The commit protocol (:meth:`ObjectStoreCheckpointer.commit`):

1. upload every partition artifact under a fresh, time-ordered checkpoint id, hashing each
   with SHA-256 in C++ (GIL released) on a bounded pool of threads;
2. create ``{id}/manifest.json`` with a conditional create: **this is the commit point**.
   A manifest is written only after every artifact it lists is durable, and an existing
   manifest is never overwritten;
3. move ``_latest`` forward to the new id (never backwards).

A crash before step 2 leaves unreferenced artifacts that :meth:`~ObjectStoreCheckpointer.prune`
removes later; a crash between 2 and 3 leaves a committed checkpoint the pointer does not
name yet, which recovery still finds because it considers every manifest. ``_latest`` is
the quick answer to "which checkpoint is current" for readers that do not list; recovery
itself never trusts it over the manifests.

Recovery (:meth:`~ObjectStoreCheckpointer.recover`) tries the newest checkpoint first,
verifies every byte against the manifest's SHA-256 digests, rebuilds delta partitions along
the ``parent_id`` chain, and falls back to older checkpoints on any failure.

Deltas. A partition artifact saved with ``is_delta=True`` holds the changes since the same
partition in the parent checkpoint. Recovery rebuilds the partition as
``apply_delta(parent_state, delta)``, applied from the nearest full snapshot upwards. The
default :func:`apply_record_delta` expects both sides in the project's record container
(:mod:`streamstate.codec`): the parent state is any ``(key, value)`` container, and the delta
is one written by :func:`encode_delta`. Pass your own ``apply_delta`` for other formats.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, Union

import obstore
from obstore import exceptions as obs_errors
from obstore.store import LocalStore

from ._core import sha256_hex
from ._typing import BytesLike
from .codec import decode_records, encode_records
from .errors import (
    CheckpointError,
    CorruptDataError,
    IntegrityError,
    NoValidCheckpointError,
    StreamStateError,
)
from .manifest import (
    CheckpointId,
    CheckpointManifest,
    CheckpointPaths,
    PartitionSnapshotEntry,
    validate_name,
)
from .retry import RetryPolicy
from .storage import StoreLike, describe_store, resolve_store

if TYPE_CHECKING:
    from obstore import PutResult, UpdateVersion
    from obstore.store import ObjectStore

__all__ = [
    "DELTA_KIND",
    "CheckpointStorage",
    "DeltaFunction",
    "ObjectStoreCheckpointer",
    "RecoveredCheckpoint",
    "SnapshotItem",
    "StoredObject",
    "apply_record_delta",
    "encode_delta",
    "verify_integrity",
]

T = TypeVar("T")
U = TypeVar("U")

#: Record-container ``kind`` of a delta written by :func:`encode_delta`.
DELTA_KIND = 0xDE17
_PUT = b"\x01"
_DELETE = b"\x00"

#: ``(operator, partition, is_delta, data)``: one partition artifact to upload.
SnapshotItem = tuple[str, int, bool, BytesLike]
#: ``apply_delta(parent_state, delta) -> state``.
DeltaFunction = Callable[[bytes, bytes], bytes]
_PutMode = Union[Literal["create", "overwrite"], "UpdateVersion"]


# -- integrity and the delta format ------------------------------------------------------


def verify_integrity(path: str, data: BytesLike, expected_sha256: str) -> None:
    """Raise :class:`~streamstate.IntegrityError` unless ``data`` hashes to ``expected_sha256``."""
    actual = sha256_hex(data)
    if actual != expected_sha256.lower():
        raise IntegrityError(path, expected_sha256, actual)


def encode_delta(changes: Iterable[tuple[BytesLike, BytesLike | None]]) -> bytes:
    """Encode ordered changes ``(key, value)`` (``value=None`` deletes ``key``) as a delta.

    The result is a record container of kind :data:`DELTA_KIND` whose values carry a one-byte
    tag: ``0x01`` + value for a put, a lone ``0x00`` for a delete. Changes apply in order.
    """
    records = [(key, _DELETE if value is None else _PUT + bytes(value)) for key, value in changes]
    return encode_records(DELTA_KIND, records)


def apply_record_delta(base: bytes, delta: bytes) -> bytes:
    """The default ``apply_delta``: overlay an :func:`encode_delta` delta onto a container.

    ``base`` is a record container of any kind except :data:`DELTA_KIND`, read as a key/value
    map. Puts replace a key's value in place or append new keys in delta order; deletes
    remove keys (deleting an absent key is a no-op). The result keeps ``base``'s kind.
    Malformed input raises :class:`~streamstate.CorruptDataError`.
    """
    kind, records = decode_records(base)
    if kind == DELTA_KIND:
        raise CorruptDataError("apply_record_delta: the base state is itself a delta")
    delta_kind, changes = decode_records(delta)
    if delta_kind != DELTA_KIND:
        raise CorruptDataError(f"apply_record_delta: delta has kind {delta_kind}, not {DELTA_KIND}")
    state = dict(records)
    for key, tagged in changes:
        tag = tagged[:1]
        if tag == _PUT:
            state[key] = tagged[1:]
        elif tagged == _DELETE:
            state.pop(key, None)
        else:
            raise CorruptDataError(f"apply_record_delta: bad change tag for key {key!r}")
    return encode_records(kind, state.items())


# -- the storage adapter -----------------------------------------------------------------


class StoredObject(NamedTuple):
    """An object read back: its bytes and the version tags a conditional update needs."""

    data: memoryview
    e_tag: str | None
    version: str | None


class CheckpointStorage:
    """The checkpointer's only I/O path: plain obstore calls on one store, no retries.

    Errors are obstore's (``FileNotFoundError`` for a missing object,
    ``obstore.exceptions.*`` otherwise); the checkpointer classifies and retries them.
    Subclass it to instrument I/O or inject faults, and pass the instance as ``store``.
    """

    def __init__(self, store: StoreLike) -> None:
        self.store: ObjectStore = _with_directory_cleanup(resolve_store(store))

    def put(self, path: str, data: BytesLike, *, mode: _PutMode = "overwrite") -> PutResult:
        """Write one object atomically (``mode`` as for :func:`obstore.put`)."""
        return obstore.put(self.store, path, data, mode=mode)

    def get(self, path: str) -> StoredObject:
        """Read one whole object."""
        result = obstore.get(self.store, path)
        meta = result.meta
        # The view keeps obstore's buffer alive without copying it.
        return StoredObject(memoryview(result.bytes()), meta.get("e_tag"), meta.get("version"))

    def list(self, prefix: str) -> list[str]:
        """Paths of every object under ``prefix`` (a directory prefix, ``""`` for all)."""
        stream = obstore.list(self.store, prefix or None)
        return [meta["path"] for meta in stream.collect()]

    def delete(self, path: str) -> None:
        """Delete one object; a missing object is not an error."""
        try:
            obstore.delete(self.store, path)
        except FileNotFoundError:
            pass

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


# -- recovery result ---------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveredCheckpoint:
    """A verified checkpoint: its manifest, every partition's state, and source offsets.

    ``state[operator][partition]`` is the partition's bytes with any deltas applied.
    ``fallbacks`` lists ``(checkpoint_id, reason)`` for newer checkpoints that failed
    verification before this one was chosen (newest first; empty when the newest was fine).
    """

    manifest: CheckpointManifest
    state: dict[str, dict[int, bytes]]
    source_offsets: dict[str, Any]
    fallbacks: tuple[tuple[str, str], ...] = field(default=())

    @property
    def checkpoint_id(self) -> CheckpointId:
        """The recovered checkpoint's id."""
        return self.manifest.checkpoint_id

    @property
    def epoch(self) -> int:
        """The recovered checkpoint's epoch."""
        return self.manifest.epoch

    def __repr__(self) -> str:
        shape = {op: len(parts) for op, parts in self.state.items()}
        return (
            f"RecoveredCheckpoint(checkpoint_id='{self.checkpoint_id}', epoch={self.epoch}, "
            f"partitions={shape}, bytes={self.manifest.total_size_bytes}, "
            f"fallbacks={len(self.fallbacks)})"
        )


# -- the checkpointer --------------------------------------------------------------------


class ObjectStoreCheckpointer:
    """Writes and recovers checkpoints in an object store (anything obstore reaches).

    ``store`` is an obstore store, a URL or local path (see
    :func:`streamstate.storage.resolve_store`), or a :class:`CheckpointStorage`. Uploads
    and downloads run on up to ``max_concurrent_uploads`` threads; transient failures are
    retried by ``retry``. The public API is synchronous and thread-safe.

    One writer per ``base_prefix`` is the supported model. Several writers stay safe where
    the store supports conditional updates (S3, GCS, Azure, memory): manifests are never
    overwritten and ``_latest`` never moves backwards. ``LocalStore`` cannot update
    conditionally: there, pointer updates are serialised within one process, but two
    processes racing on ``_latest`` may leave it naming the older of their two
    checkpoints. Recovery is unaffected, because it considers every manifest.
    """

    def __init__(
        self,
        store: StoreLike | CheckpointStorage,
        paths: CheckpointPaths | None = None,
        max_concurrent_uploads: int = 8,
        retry: RetryPolicy | None = None,
    ) -> None:
        if isinstance(max_concurrent_uploads, bool) or not isinstance(max_concurrent_uploads, int):
            raise TypeError("max_concurrent_uploads must be an int")
        if max_concurrent_uploads < 1:
            raise ValueError(f"max_concurrent_uploads must be >= 1, got {max_concurrent_uploads}")
        self._storage = store if isinstance(store, CheckpointStorage) else CheckpointStorage(store)
        self.paths = paths if paths is not None else CheckpointPaths()
        self.max_concurrent_uploads = max_concurrent_uploads
        self.retry = retry if retry is not None else RetryPolicy()
        # None: unknown yet; False: the store rejected an e-tag conditional update once.
        self._conditional_update: bool | None = None

    @property
    def store(self) -> ObjectStore:
        """The underlying obstore store."""
        return self._storage.store

    def __repr__(self) -> str:
        return (
            f"ObjectStoreCheckpointer({self._storage!r}, base_prefix="
            f"{self.paths.base_prefix!r}, max_concurrent_uploads={self.max_concurrent_uploads})"
        )

    # -- artifacts ----------------------------------------------------------------------

    def save_partitions_concurrent(
        self, checkpoint_id: CheckpointId, snapshots: Iterable[SnapshotItem]
    ) -> list[tuple[str, PartitionSnapshotEntry]]:
        """Upload partition artifacts concurrently; return ``(operator, entry)`` per item.

        Each artifact is hashed (SHA-256, in C++ without the GIL) and created without
        overwriting anything. Results come back in input order. If any upload fails, the
        artifacts this call already wrote are deleted (best effort) and
        :class:`~streamstate.CheckpointError` is raised.
        """
        return self._upload(checkpoint_id, snapshots, fresh=False)

    def _upload(
        self, checkpoint_id: CheckpointId, snapshots: Iterable[SnapshotItem], *, fresh: bool
    ) -> list[tuple[str, PartitionSnapshotEntry]]:
        # ``fresh``: the id was minted by this very commit, so nothing can exist under it and
        # a plain put is as safe as a conditional create. It is also faster: obstore writes
        # a conditional put in one piece from a private copy, a plain one in parallel chunks.
        items = self._validate_snapshots(checkpoint_id, snapshots)
        written: list[str] = []

        def upload(
            item: tuple[str, int, bool, memoryview, str],
        ) -> tuple[str, PartitionSnapshotEntry]:
            operator, partition, is_delta, view, path = item
            digest = sha256_hex(view)
            if fresh:
                self.retry.call(path, lambda _attempt: self._storage.put(path, view))
            else:
                self._create(path, view)
            written.append(path)  # list.append is atomic; read only after the pool drains
            return operator, PartitionSnapshotEntry(partition, is_delta, path, view.nbytes, digest)

        try:
            return self._parallel(upload, items)
        except BaseException:
            self._delete_quietly(written)
            raise

    def save_snapshot(
        self, checkpoint_id: CheckpointId, operator: str, partition: int, data: BytesLike
    ) -> str:
        """Upload one full partition snapshot; return its SHA-256 hex digest."""
        [(_, entry)] = self.save_partitions_concurrent(
            checkpoint_id, [(operator, partition, False, data)]
        )
        return entry.sha256

    def save_delta(
        self, checkpoint_id: CheckpointId, operator: str, partition: int, data: BytesLike
    ) -> str:
        """Upload one partition delta; return its SHA-256 hex digest."""
        [(_, entry)] = self.save_partitions_concurrent(
            checkpoint_id, [(operator, partition, True, data)]
        )
        return entry.sha256

    def load_artifact(self, path: str) -> bytes:
        """Read one artifact's bytes (unverified; see :func:`verify_integrity`)."""
        return bytes(self._get(path).data)

    # -- manifests and the latest pointer ------------------------------------------------

    def save_manifest(self, manifest: CheckpointManifest) -> None:
        """Commit ``manifest`` with a conditional create.

        An existing manifest is never overwritten: a different one at the same path raises
        :class:`~streamstate.CheckpointError`. Re-saving byte-identical content succeeds,
        which makes a retried request whose first attempt landed harmless.
        """
        self._check_paths(manifest)
        data = manifest.to_json().encode("ascii")
        self._create(self.paths.manifest(manifest.checkpoint_id), data)

    def load_manifest(self, checkpoint_id: CheckpointId) -> CheckpointManifest:
        """Read and validate one manifest.

        Raises :class:`~streamstate.CheckpointError` if it does not exist and
        :class:`~streamstate.CorruptDataError` if it is damaged or names another checkpoint.
        """
        path = self.paths.manifest(checkpoint_id)
        try:
            raw = self._get(path).data
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no manifest (checkpoint not committed)") from None
        try:
            manifest = CheckpointManifest.from_json(memoryview(raw))
        except CorruptDataError as exc:
            raise CorruptDataError(f"{path}: {exc}") from None
        if manifest.checkpoint_id != checkpoint_id:
            raise CorruptDataError(f"{path}: manifest names checkpoint {manifest.checkpoint_id}")
        try:
            self._check_paths(manifest)
        except ValueError as exc:
            raise CorruptDataError(f"{path}: {exc}") from None
        return manifest

    def read_latest(self) -> CheckpointId | None:
        """The id ``_latest`` names, or None if there is no pointer.

        A pointer that does not hold a checkpoint id raises
        :class:`~streamstate.CorruptDataError`.
        """
        current, stored = self._read_pointer()
        if stored is not None and current is None:
            raise CorruptDataError(f"{self.paths.latest_pointer()}: not a checkpoint id")
        return current

    def update_latest(self, checkpoint_id: CheckpointId) -> bool:
        """Move ``_latest`` forward to ``checkpoint_id``.

        Returns True if the pointer names ``checkpoint_id`` afterwards, False (leaving it
        alone) if it already names a newer checkpoint. The write is a compare-and-swap on
        the pointer's e-tag where the store supports it (create-if-absent otherwise), so a
        concurrent writer can never move it backwards; see the class notes for LocalStore.
        A damaged pointer is replaced.
        """
        if not isinstance(checkpoint_id, CheckpointId):
            raise TypeError(f"expected a CheckpointId, got {type(checkpoint_id).__name__}")
        path = self.paths.latest_pointer()
        payload = str(checkpoint_id).encode("ascii")
        for _ in range(64):
            # Without conditional updates, serialise this process's read-compare-write so at
            # least writers sharing a process cannot interleave (see the class notes).
            guard: AbstractContextManager[object] = (
                _OVERWRITE_LOCK if self._conditional_update is False else nullcontext()
            )
            with guard:
                current, stored = self._read_pointer()
                if current is not None and current >= checkpoint_id:
                    return current == checkpoint_id
                mode = self._pointer_mode(stored)
                try:
                    self.retry.call(
                        path,
                        partial(self._put_pointer, path, payload, mode),
                        passthrough=_RACE_ERRORS,
                    )
                    return True
                except (obs_errors.AlreadyExistsError, obs_errors.PreconditionError):
                    continue  # another writer (or our own landed attempt) moved it: re-compare
                except (NotImplementedError, obs_errors.NotSupportedError):
                    self._conditional_update = False
        raise CheckpointError(f"{path}: gave up after 64 contended updates")

    def _put_pointer(self, path: str, payload: bytes, mode: _PutMode, _attempt: int) -> None:
        self._storage.put(path, payload, mode=mode)

    def _pointer_mode(self, stored: StoredObject | None) -> _PutMode:
        if stored is None:
            return "create"
        if self._conditional_update is False or (stored.e_tag is None and stored.version is None):
            return "overwrite"
        mode: UpdateVersion = {}
        if stored.e_tag is not None:
            mode["e_tag"] = stored.e_tag
        if stored.version is not None:
            mode["version"] = stored.version
        return mode

    def _read_pointer(self) -> tuple[CheckpointId | None, StoredObject | None]:
        try:
            stored = self._get(self.paths.latest_pointer())
        except FileNotFoundError:
            return None, None
        try:
            return CheckpointId.parse(bytes(stored.data).decode("ascii").strip()), stored
        except (UnicodeDecodeError, ValueError):
            return None, stored

    def _latest_or_none(self) -> CheckpointId | None:
        current, _ = self._read_pointer()
        return current

    # -- listing and deletion ------------------------------------------------------------

    def list_checkpoints(self) -> list[CheckpointId]:
        """Ids of committed checkpoints (those with a manifest), oldest first."""
        committed, _ = self._scan()
        return committed

    def delete_checkpoint(self, checkpoint_id: CheckpointId) -> None:
        """Delete every object of one checkpoint, the manifest first.

        Removing the manifest first un-commits the checkpoint atomically; if deletion stops
        half-way, what remains is unreferenced and the next :meth:`prune` removes it.
        """
        manifest = self.paths.manifest(checkpoint_id)
        self.retry.call(manifest, lambda _a: self._storage.delete(manifest))
        prefix = self.paths.checkpoint_dir(checkpoint_id)
        paths = self.retry.call(prefix, lambda _a: self._storage.list(prefix))
        self._parallel(lambda p: self.retry.call(p, lambda _a: self._storage.delete(p)), paths)

    def prune(self, keep_last: int = 3) -> list[CheckpointId]:
        """Delete old checkpoints, keeping the newest ``keep_last`` with intact manifests.

        Also kept: any newer checkpoint (even a damaged one), and every older checkpoint a
        kept one's delta chain needs. Leftovers of uncommitted checkpoints older than the
        newest committed one are removed too: a writer mints ids above the newest committed
        checkpoint, so only a failed or crashed commit leaves those behind. Returns the ids
        deleted, oldest first.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        committed, dirs = self._scan()
        keep: set[CheckpointId] = set()
        intact = 0
        manifests: dict[CheckpointId, CheckpointManifest] = {}
        for cid in reversed(committed):
            if intact >= keep_last:
                break
            keep.add(cid)
            try:
                manifest = self._manifest_cached(cid, manifests)
                chains = self._chains(manifest, manifests)
            except (CheckpointError, CorruptDataError):
                continue  # damaged: not recoverable, so it neither counts nor needs parents
            intact += 1
            for chain in chains.values():
                keep.update(self._owner(entry) for entry in chain)
        if not keep:
            return []
        newest = committed[-1]
        doomed = [cid for cid in committed if cid not in keep]
        doomed += [cid for cid in dirs if cid not in committed and cid < newest]
        doomed = sorted(set(doomed))
        for cid in doomed:
            self.delete_checkpoint(cid)
        return doomed

    def _scan(self) -> tuple[list[CheckpointId], dict[CheckpointId, list[str]]]:
        prefix = self.paths.base_prefix
        listing = self.retry.call(prefix or "/", lambda _a: self._storage.list(prefix))
        dirs: dict[CheckpointId, list[str]] = {}
        committed: set[CheckpointId] = set()
        for path in listing:
            cid = self.paths.id_of(path)
            if cid is None:
                continue
            dirs.setdefault(cid, []).append(path)
            if path == self.paths.manifest(cid):
                committed.add(cid)
        return sorted(committed), dirs

    # -- the commit protocol -------------------------------------------------------------

    def commit(
        self,
        epoch: int,
        snapshots: Iterable[SnapshotItem],
        source_offsets: Mapping[str, Any] | None = None,
        parent: CheckpointId | None = None,
        watermark: int | None = None,
    ) -> CheckpointManifest:
        """Commit one checkpoint: upload every artifact, then the manifest, then ``_latest``.

        ``snapshots`` holds ``(operator, partition, is_delta, data)``: a checkpoint holds
        exactly the partitions listed (list an unchanged one as an empty delta,
        ``encode_delta([])``). Delta items need ``parent``, a committed checkpoint holding
        the same partitions. ``source_offsets``
        maps source names to JSON values and is stored in the manifest. Returns the
        committed manifest. On failure before the manifest is written nothing is committed
        (uploaded artifacts are cleaned up best effort); a failure to move ``_latest``
        afterwards raises :class:`~streamstate.CheckpointError` although the checkpoint is
        committed and will be recovered.
        """
        items = list(snapshots)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if watermark is not None and (
            isinstance(watermark, bool) or not isinstance(watermark, int)
        ):
            raise ValueError(f"watermark must be an int or None, got {watermark!r}")
        offsets = dict(source_offsets or {})
        for source in offsets:
            validate_name("source", source)
        if parent is not None and not isinstance(parent, CheckpointId):
            raise TypeError(f"parent must be a CheckpointId, got {type(parent).__name__}")
        deltas = [(op, p) for op, p, is_delta, _ in self._shape(items) if is_delta]
        if deltas:
            if parent is None:
                raise ValueError("delta snapshots need a parent checkpoint")
            parent_manifest = self.load_manifest(parent)
            for op, p in deltas:
                entry = parent_manifest.operators.get(op)
                if entry is None or entry.partition(p) is None:
                    raise ValueError(
                        f"parent {parent} has no {op}/partition-{p} to apply a delta to"
                    )
        floor = max((c for c in (self._latest_or_none(), parent) if c is not None), default=None)
        checkpoint_id = CheckpointId.now(after=floor)
        # Check the manifest can be written before uploading anything.
        CheckpointManifest.build(
            checkpoint_id, epoch, [], source_offsets=offsets, parent_id=parent, watermark=watermark
        )
        entries = self._upload(checkpoint_id, items, fresh=True)
        manifest = CheckpointManifest.build(
            checkpoint_id,
            epoch,
            entries,
            source_offsets=offsets,
            parent_id=parent,
            watermark=watermark,
        )
        try:
            self.save_manifest(manifest)
        except BaseException:
            self._delete_quietly([entry.path for _, entry in entries])
            raise
        try:
            self.update_latest(checkpoint_id)
        except CheckpointError as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint_id} is committed but _latest was not moved: {exc}"
            ) from exc
        return manifest

    # -- recovery and verification -------------------------------------------------------

    def recover(
        self, max_fallback: int = 3, apply_delta: DeltaFunction = apply_record_delta
    ) -> RecoveredCheckpoint | None:
        """Load the newest checkpoint that verifies completely, or None on an empty store.

        Candidates are the committed checkpoints (those with a manifest), newest first.
        That starts at the one ``_latest`` names, unless a crash came between a manifest
        and the pointer (the newer, committed checkpoint wins) or the pointer is missing,
        damaged, or names a deleted checkpoint (it is ignored). For each candidate, every
        artifact along every delta chain is read and checked against its SHA-256, then
        deltas are applied with ``apply_delta``. Any failure moves on to the next older
        candidate, at most ``max_fallback`` times; when all tried candidates fail,
        :class:`~streamstate.NoValidCheckpointError` lists each with its reason.
        """
        if isinstance(max_fallback, bool) or not isinstance(max_fallback, int) or max_fallback < 0:
            raise ValueError(f"max_fallback must be an int >= 0, got {max_fallback!r}")
        candidates, _ = self._scan()
        if not candidates:
            return None
        failures: list[tuple[str, str]] = []
        manifests: dict[CheckpointId, CheckpointManifest] = {}
        for cid in reversed(candidates[-(max_fallback + 1) :]):
            try:
                manifest, state = self._rebuild(cid, manifests, apply_delta)
            except (StreamStateError, ValueError) as exc:
                failures.append((str(cid), str(exc)))
                continue
            return RecoveredCheckpoint(
                manifest, state, dict(manifest.source_offsets), tuple(failures)
            )
        raise NoValidCheckpointError(failures)

    def verify_checkpoint(self, checkpoint_id: CheckpointId) -> CheckpointManifest:
        """Re-verify one checkpoint without rebuilding its state; return its manifest.

        Checks the manifest, then the size and SHA-256 of every artifact it needs, including
        the parents' artifacts its deltas apply to. Raises
        :class:`~streamstate.CorruptDataError` (or :class:`~streamstate.IntegrityError`) on
        damage and :class:`~streamstate.CheckpointError` on missing objects.
        """
        manifests: dict[CheckpointId, CheckpointManifest] = {}
        manifest = self._manifest_cached(checkpoint_id, manifests)
        chains = self._chains(manifest, manifests)
        needed = {entry.path: entry for chain in chains.values() for entry in chain}
        self._parallel(self._fetch_verified, list(needed.values()))
        return manifest

    def _rebuild(
        self,
        checkpoint_id: CheckpointId,
        manifests: dict[CheckpointId, CheckpointManifest],
        apply_delta: DeltaFunction,
    ) -> tuple[CheckpointManifest, dict[str, dict[int, bytes]]]:
        manifest = self._manifest_cached(checkpoint_id, manifests)
        chains = self._chains(manifest, manifests)
        needed = list({entry.path: entry for chain in chains.values() for entry in chain}.values())
        blobs = dict(
            zip((e.path for e in needed), self._parallel(self._fetch_verified, needed), strict=True)
        )
        state: dict[str, dict[int, bytes]] = {op: {} for op in manifest.operators}
        for (op, partition), chain in chains.items():
            data = blobs[chain[0].path]
            for delta in chain[1:]:
                try:
                    data = apply_delta(data, blobs[delta.path])
                except Exception as exc:
                    raise CorruptDataError(
                        f"{delta.path}: applying the delta failed: {exc}"
                    ) from exc
            state[op][partition] = data
        return manifest, state

    def _chains(
        self, manifest: CheckpointManifest, manifests: dict[CheckpointId, CheckpointManifest]
    ) -> dict[tuple[str, int], list[PartitionSnapshotEntry]]:
        """For each partition, its artifacts from the nearest full snapshot to this one."""
        chains: dict[tuple[str, int], list[PartitionSnapshotEntry]] = {}
        for op, op_entry in manifest.operators.items():
            for entry in op_entry.partitions:
                chain = [entry]
                owner = manifest
                while chain[-1].is_delta:
                    if owner.parent_id is None:
                        raise CorruptDataError(f"{chain[-1].path}: delta without a parent_id")
                    owner = self._manifest_cached(owner.parent_id, manifests)
                    parent_op = owner.operators.get(op)
                    base = None if parent_op is None else parent_op.partition(entry.partition_id)
                    if base is None:
                        raise CorruptDataError(
                            f"{chain[-1].path}: parent {owner.checkpoint_id} has no "
                            f"{op}/partition-{entry.partition_id}"
                        )
                    chain.append(base)
                chains[(op, entry.partition_id)] = chain[::-1]
        return chains

    def _manifest_cached(
        self, checkpoint_id: CheckpointId, manifests: dict[CheckpointId, CheckpointManifest]
    ) -> CheckpointManifest:
        manifest = manifests.get(checkpoint_id)
        if manifest is None:
            manifest = manifests[checkpoint_id] = self.load_manifest(checkpoint_id)
        return manifest

    def _owner(self, entry: PartitionSnapshotEntry) -> CheckpointId:
        cid = self.paths.id_of(entry.path)
        assert cid is not None  # load_manifest checked every path is canonical
        return cid

    def _fetch_verified(self, entry: PartitionSnapshotEntry) -> bytes:
        try:
            data = self._get(entry.path).data
        except FileNotFoundError:
            raise CheckpointError(f"{entry.path}: artifact is missing") from None
        size = data.nbytes
        if size != entry.size_bytes:
            raise CorruptDataError(f"{entry.path}: {size} bytes, manifest says {entry.size_bytes}")
        verify_integrity(entry.path, data, entry.sha256)
        return bytes(data)

    # -- helpers -------------------------------------------------------------------------

    def _get(self, path: str) -> StoredObject:
        return self.retry.call(
            path, lambda _attempt: self._storage.get(path), passthrough=(FileNotFoundError,)
        )

    def _create(self, path: str, data: BytesLike) -> None:
        """Create ``path`` holding ``data``; never overwrite different content."""

        def attempt(_attempt: int) -> None:
            try:
                self._storage.put(path, data, mode="create")
            except obs_errors.AlreadyExistsError:
                # Identical bytes mean an earlier attempt of ours landed (its response was
                # lost, possibly inside obstore's own HTTP retries): that is success.
                if not self._holds(path, data):
                    raise

        try:
            self.retry.call(path, attempt, passthrough=(obs_errors.AlreadyExistsError,))
        except obs_errors.AlreadyExistsError:
            raise CheckpointError(
                f"{path}: already exists with different content; committed objects are "
                "never overwritten"
            ) from None

    def _holds(self, path: str, data: BytesLike) -> bool:
        try:
            existing = self._storage.get(path).data
        except FileNotFoundError:
            return False
        mine = memoryview(data)
        return existing.nbytes == mine.nbytes and sha256_hex(existing) == sha256_hex(mine)

    def _parallel(self, fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
        """``[fn(x) for x in items]`` on up to ``max_concurrent_uploads`` threads.

        The first failure cancels what has not started, waits for what has, and is raised.
        """
        workers = min(self.max_concurrent_uploads, len(items))
        if workers <= 1:
            return [fn(item) for item in items]
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="streamstate-ckpt") as pool:
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

    def _delete_quietly(self, paths: Sequence[str]) -> None:
        for path in paths:
            try:
                self._storage.delete(path)
            except (StreamStateError, OSError, obs_errors.BaseError):
                continue  # best effort: prune() collects whatever is left

    def _check_paths(self, manifest: CheckpointManifest) -> None:
        for op, entry in manifest.operators.items():
            for part in entry.partitions:
                expected = self.paths.artifact(
                    manifest.checkpoint_id, op, part.partition_id, part.is_delta
                )
                if part.path != expected:
                    raise ValueError(f"artifact path {part.path!r} should be {expected!r}")

    @staticmethod
    def _shape(items: Sequence[SnapshotItem]) -> list[tuple[str, int, bool, BytesLike]]:
        shaped = []
        for item in items:
            if not isinstance(item, tuple) or len(item) != 4:
                raise ValueError("each snapshot must be (operator, partition, is_delta, data)")
            operator, partition, is_delta, data = item
            if not isinstance(is_delta, bool):
                raise TypeError(f"is_delta must be a bool, got {type(is_delta).__name__}")
            shaped.append((operator, partition, is_delta, data))
        return shaped

    def _validate_snapshots(
        self, checkpoint_id: CheckpointId, snapshots: Iterable[SnapshotItem]
    ) -> list[tuple[str, int, bool, memoryview, str]]:
        if not isinstance(checkpoint_id, CheckpointId):
            raise TypeError(f"expected a CheckpointId, got {type(checkpoint_id).__name__}")
        items = []
        seen: set[tuple[str, int]] = set()
        for operator, partition, is_delta, data in self._shape(list(snapshots)):
            path = self.paths.artifact(checkpoint_id, operator, partition, is_delta)
            if (operator, partition) in seen:
                raise ValueError(f"{operator}/partition-{partition} appears twice")
            seen.add((operator, partition))
            try:
                view = memoryview(data).cast("B")
            except TypeError:
                raise TypeError(
                    f"{operator}/partition-{partition}: data must be bytes-like, "
                    f"got {type(data).__name__}"
                ) from None
            items.append((operator, partition, is_delta, view, path))
        return items


_OVERWRITE_LOCK = threading.Lock()
_RACE_ERRORS = (
    obs_errors.AlreadyExistsError,
    obs_errors.PreconditionError,
    NotImplementedError,
    obs_errors.NotSupportedError,
)
