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
the ``parent_id`` chain (or, with ``rebuild=False``, hands back each verified chain, a full
snapshot and its deltas in order, for a caller whose state applies deltas in place), and
falls back to older checkpoints on any failure.

Deltas. A partition artifact saved with ``is_delta=True`` holds the changes since the same
partition in the parent checkpoint. Recovery rebuilds the partition as
``apply_delta(parent_state, delta)``, applied from the nearest full snapshot upwards. The
default :func:`~streamstate.delta.apply_record_delta` expects both sides in the project's
record container (:mod:`streamstate.codec`): the parent state is any ``(key, value)``
container, and the delta is one written by :func:`~streamstate.delta.encode_delta`; commits
check that (``validate_delta``). Pass your own pair for other formats.

The delta format lives in :mod:`streamstate.delta` and the storage adapter in
:mod:`streamstate.storage`; their names are re-exported here, where they used to live.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._core import sha256_hex
from ._typing import BytesLike
from .batcher import DEFAULT_MAX_DECODED_SIZE
from .delta import (
    DELTA_KIND,
    DeltaFunction,
    DeltaValidator,
    apply_record_delta,
    encode_delta,
    require_delta,
    validate_record_delta,
)
from .errors import (
    CheckpointError,
    CorruptDataError,
    NoValidCheckpointError,
    StreamStateError,
)
from .layout import SnapshotItem, place_snapshots, shape_snapshots
from .manifest import (
    CheckpointId,
    CheckpointManifest,
    CheckpointPaths,
    PartitionSnapshotEntry,
    plain_json,
    validate_name,
)
from .pointer import LatestPointer
from .recovery import (
    RecoveredCheckpoint,
    check_artifact,
    delta_chains,
    rebuild_state,
    split_chains,
    verify_integrity,
)
from .retry import RetryPolicy
from .storage import (
    CheckpointStorage,
    RetryingStorage,
    StoredObject,
    StoreLike,
    parallel_map,
)

if TYPE_CHECKING:
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

# The newest committed checkpoint is not known yet (see ObjectStoreCheckpointer._newest).
_UNKNOWN = object()


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
        self._pointer = LatestPointer(self.paths.latest_pointer())
        # (id, epoch) of the newest committed checkpoint, the floor for the next epoch: None
        # for an empty store, _UNKNOWN until the first commit or recovery looks it up.
        self._newest: object = _UNKNOWN
        self._newest_lock = threading.Lock()

    @property
    def _io(self) -> RetryingStorage:
        # Built per use, so assigning ``self.retry`` takes effect at once.
        return RetryingStorage(self._storage, self.retry)

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
        items = place_snapshots(self.paths, checkpoint_id, snapshots)
        written: list[str] = []

        def upload(
            item: tuple[str, int, bool, memoryview, str],
        ) -> tuple[str, PartitionSnapshotEntry]:
            operator, partition, is_delta, view, path = item
            digest = sha256_hex(view)
            if fresh:
                self._io.put(path, view)
            else:
                self._create(path, view)
            written.append(path)  # list.append is atomic; read only after the pool drains
            return operator, PartitionSnapshotEntry(partition, is_delta, path, view.nbytes, digest)

        try:
            return self._parallel(upload, items)
        except BaseException:
            self._io.delete_quietly(written)
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
        return bytes(self._io.get(path).data)

    # -- manifests and the latest pointer ------------------------------------------------

    def save_manifest(self, manifest: CheckpointManifest) -> None:
        """Commit ``manifest`` with a conditional create.

        An existing manifest is never overwritten: a different one at the same path raises
        :class:`~streamstate.CheckpointError`. Re-saving byte-identical content succeeds,
        which makes a retried request whose first attempt landed harmless.
        """
        manifest.check_paths(self.paths)
        data = manifest.to_json().encode("ascii")
        self._create(self.paths.manifest(manifest.checkpoint_id), data)

    def load_manifest(self, checkpoint_id: CheckpointId) -> CheckpointManifest:
        """Read and validate one manifest.

        Raises :class:`~streamstate.CheckpointError` if it does not exist and
        :class:`~streamstate.CorruptDataError` if it is damaged or names another checkpoint.
        """
        path = self.paths.manifest(checkpoint_id)
        try:
            raw = self._io.get(path).data
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no manifest (checkpoint not committed)") from None
        try:
            manifest = CheckpointManifest.from_json(memoryview(raw))
        except CorruptDataError as exc:
            raise CorruptDataError(f"{path}: {exc}") from None
        if manifest.checkpoint_id != checkpoint_id:
            raise CorruptDataError(f"{path}: manifest names checkpoint {manifest.checkpoint_id}")
        try:
            manifest.check_paths(self.paths)
        except ValueError as exc:
            raise CorruptDataError(f"{path}: {exc}") from None
        return manifest

    def read_latest(self) -> CheckpointId | None:
        """The id ``_latest`` names, or None if there is no pointer.

        A pointer that does not hold a checkpoint id raises
        :class:`~streamstate.CorruptDataError`.
        """
        return self._pointer.read(self._io)

    def update_latest(self, checkpoint_id: CheckpointId) -> bool:
        """Move ``_latest`` forward to ``checkpoint_id``.

        Returns True if the pointer names ``checkpoint_id`` afterwards, False (leaving it
        alone) if it already names a newer checkpoint. The write is a compare-and-swap on
        the pointer's e-tag where the store supports it (create-if-absent otherwise), so a
        concurrent writer can never move it backwards; see the class notes for LocalStore.
        A damaged pointer is replaced.
        """
        return self._pointer.advance(self._io, checkpoint_id)

    def _latest_or_none(self) -> CheckpointId | None:
        current, _ = self._pointer.peek(self._io)
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
        io = self._io
        with self._newest_lock:
            if isinstance(self._newest, tuple) and self._newest[0] <= checkpoint_id:
                self._newest = _UNKNOWN  # the floor for epochs may have gone with it
        io.delete(self.paths.manifest(checkpoint_id))
        self._parallel(io.delete, io.list(self.paths.checkpoint_dir(checkpoint_id)))

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
        listing = self._io.list(prefix)
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
        parent: CheckpointId | str | None = None,
        watermark: int | None = None,
        validate_delta: DeltaValidator | None = validate_record_delta,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointManifest:
        """Commit one checkpoint: upload every artifact, then the manifest, then ``_latest``.

        ``snapshots`` holds ``(operator, partition, is_delta, data)``: a checkpoint holds
        exactly the partitions listed (list an unchanged one as an empty delta,
        ``encode_delta([])``). Delta items need ``parent``, a committed checkpoint holding
        the same partitions (a :class:`CheckpointId` or its string form), and must pass
        ``validate_delta`` (default: they are :func:`encode_delta` deltas, which the default
        ``apply_delta`` of :meth:`recover` can apply; ``None`` accepts any bytes, for a
        custom format). ``epoch`` must be greater than the newest committed checkpoint's
        (or the recovered one's, after :meth:`recover`): a stale writer cannot commit state
        that recovery would then prefer. ``source_offsets`` maps source names to JSON
        values (numpy scalars are converted) and is stored in the manifest, as is
        ``metadata``, a JSON object describing the job (``checkpoints list`` shows its
        ``"partitions"`` as the partition count). Returns the
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
        offsets = {source: plain_json(value) for source, value in (source_offsets or {}).items()}
        for source in offsets:
            validate_name("source", source)
        if isinstance(parent, str):
            parent = CheckpointId.parse(parent)
        if parent is not None and not isinstance(parent, CheckpointId):
            raise TypeError(
                f"parent must be a CheckpointId or its str form, got {type(parent).__name__}"
            )
        deltas = [(op, p, data) for op, p, is_delta, data in shape_snapshots(items) if is_delta]
        if deltas:
            if parent is None:
                raise ValueError("delta snapshots need a parent checkpoint")
            parent_manifest = self.load_manifest(parent)
            for op, p, data in deltas:
                entry = parent_manifest.operators.get(op)
                if entry is None or entry.partition(p) is None:
                    raise ValueError(
                        f"parent {parent} has no {op}/partition-{p} to apply a delta to"
                    )
                if validate_delta is not None:
                    require_delta(f"{op}/partition-{p}", data, validate_delta)
        newest = self._newest_committed()
        if newest is not None and epoch <= newest[1]:
            raise CheckpointError(
                f"epoch {epoch} does not advance: checkpoint {newest[0]} already holds epoch "
                f"{newest[1]}, and epochs must increase"
            )
        floor = max((c for c in (self._latest_or_none(), parent) if c is not None), default=None)
        checkpoint_id = CheckpointId.now(after=floor)
        # Check the manifest can be written before uploading anything.
        CheckpointManifest.build(
            checkpoint_id,
            epoch,
            [],
            source_offsets=offsets,
            parent_id=parent,
            watermark=watermark,
            metadata=metadata,
        )
        entries = self._upload(checkpoint_id, items, fresh=True)
        manifest = CheckpointManifest.build(
            checkpoint_id,
            epoch,
            entries,
            source_offsets=offsets,
            parent_id=parent,
            watermark=watermark,
            metadata=metadata,
        )
        try:
            self.save_manifest(manifest)
        except BaseException:
            self._io.delete_quietly([entry.path for _, entry in entries])
            raise
        self._note_committed(checkpoint_id, epoch)
        try:
            self.update_latest(checkpoint_id)
        except CheckpointError as exc:
            raise CheckpointError(
                f"checkpoint {checkpoint_id} is committed but _latest was not moved: {exc}"
            ) from exc
        return manifest

    def _newest_committed(self) -> tuple[CheckpointId, int] | None:
        """``(id, epoch)`` of the newest checkpoint whose manifest reads, cached."""
        with self._newest_lock:
            known = self._newest
        if isinstance(known, tuple) or known is None:
            return known
        committed, _ = self._scan()
        found: tuple[CheckpointId, int] | None = None
        for cid in reversed(committed):
            try:
                found = (cid, self.load_manifest(cid).epoch)
                break
            except (CheckpointError, CorruptDataError):
                continue  # unreadable: recovery would skip it too
        with self._newest_lock:
            if self._newest is _UNKNOWN:
                self._newest = found
        return found

    def _note_committed(self, checkpoint_id: CheckpointId, epoch: int) -> None:
        with self._newest_lock:
            known = self._newest
            if not isinstance(known, tuple) or known[0] < checkpoint_id:
                self._newest = (checkpoint_id, epoch)

    # -- recovery and verification -------------------------------------------------------

    def recover(
        self,
        max_fallback: int = 3,
        apply_delta: DeltaFunction = apply_record_delta,
        max_size: int | None = DEFAULT_MAX_DECODED_SIZE,
        *,
        rebuild: bool = True,
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

        ``max_size`` bounds the bytes one candidate may need: the artifacts of its delta
        chains (checked against the manifests before anything is read) and every state
        rebuilt from them (default 1 GiB, as for :func:`~streamstate.decode_batch`; ``None``
        for no bound). A candidate over it counts as a failure, with the reason recorded.

        ``rebuild=False`` verifies the same bytes but applies no delta: each partition comes
        back as the full snapshot its chain starts from plus its deltas in order
        (:attr:`RecoveredCheckpoint.deltas`), for a caller that applies them itself, e.g.
        ``store.restore(full)`` then ``store.apply_delta(d)`` for each delta, without a full
        blob rebuilt per delta. ``apply_delta`` is not used then, and a delta that does not
        apply is the caller's to report.
        """
        if isinstance(max_fallback, bool) or not isinstance(max_fallback, int) or max_fallback < 0:
            raise ValueError(f"max_fallback must be an int >= 0, got {max_fallback!r}")
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0
        ):
            raise ValueError(f"max_size must be an int >= 0 or None, got {max_size!r}")
        candidates, _ = self._scan()
        if not candidates:
            with self._newest_lock:
                self._newest = None
            return None
        failures: list[tuple[str, str]] = []
        manifests: dict[CheckpointId, CheckpointManifest] = {}
        for cid in reversed(candidates[-(max_fallback + 1) :]):
            try:
                manifest, chains, blobs = self._fetch_chains(cid, manifests, max_size)
                deltas: dict[str, dict[int, tuple[bytes, ...]]] = {}
                if rebuild:
                    state = rebuild_state(manifest, chains, blobs, apply_delta, max_size)
                else:
                    state, deltas = split_chains(manifest, chains, blobs)
            except (StreamStateError, ValueError) as exc:
                failures.append((str(cid), str(exc)))
                continue
            with self._newest_lock:
                # Writers resume from here: newer checkpoints did not verify.
                self._newest = (manifest.checkpoint_id, manifest.epoch)
            return RecoveredCheckpoint(
                manifest, state, dict(manifest.source_offsets), tuple(failures), deltas
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

    def _fetch_chains(
        self,
        checkpoint_id: CheckpointId,
        manifests: dict[CheckpointId, CheckpointManifest],
        max_size: int | None = None,
    ) -> tuple[
        CheckpointManifest,
        dict[tuple[str, int], list[PartitionSnapshotEntry]],
        dict[str, bytes],
    ]:
        """The manifest, every partition's delta chain and every artifact those need, each
        read and verified once."""
        manifest = self._manifest_cached(checkpoint_id, manifests)
        chains = self._chains(manifest, manifests)
        needed = list({entry.path: entry for chain in chains.values() for entry in chain}.values())
        total = sum(entry.size_bytes for entry in needed)
        if max_size is not None and total > max_size:
            raise CheckpointError(
                f"checkpoint {checkpoint_id} needs {total} bytes, more than max_size "
                f"{max_size}; pass a larger max_size to recover it"
            )
        blobs = dict(
            zip((e.path for e in needed), self._parallel(self._fetch_verified, needed), strict=True)
        )
        return manifest, chains, blobs

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

    def _chains(
        self, manifest: CheckpointManifest, manifests: dict[CheckpointId, CheckpointManifest]
    ) -> dict[tuple[str, int], list[PartitionSnapshotEntry]]:
        return delta_chains(manifest, lambda cid: self._manifest_cached(cid, manifests))

    def _fetch_verified(self, entry: PartitionSnapshotEntry) -> bytes:
        try:
            data = self._io.get(entry.path).data
        except FileNotFoundError:
            raise CheckpointError(f"{entry.path}: artifact is missing") from None
        check_artifact(entry, data)
        return bytes(data)

    # -- helpers -------------------------------------------------------------------------

    def _create(self, path: str, data: BytesLike) -> None:
        """Create ``path`` holding ``data``; never overwrite different content."""
        if not self._io.create(path, data):
            raise CheckpointError(
                f"{path}: already exists with different content; committed objects are "
                "never overwritten"
            )

    def _parallel(self, fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
        return parallel_map(fn, items, self.max_concurrent_uploads)
