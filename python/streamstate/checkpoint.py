"""Object-store checkpoints: all-or-nothing commits and verified recovery.

The commit protocol (:meth:`ObjectStoreCheckpointer.commit`):

1. upload every partition artifact under a fresh, time-ordered checkpoint id, hashing each
   with SHA-256 in C++ (GIL released) on a bounded pool of threads;
2. create ``{id}/manifest.json`` with a conditional create: **this is the commit point**.
   A manifest is written only after every artifact it lists is durable, and an existing
   manifest is never overwritten;
3. move ``_latest`` forward to the new id (never backwards).

The same protocol spans processes: :meth:`~ObjectStoreCheckpointer.begin` mints the id
and returns a picklable :class:`~streamstate.pending.PendingCheckpoint`; workers upload
their own partitions through it (step 1, anywhere) and return the entries; the coordinator's
:meth:`~ObjectStoreCheckpointer.commit_entries` checks them and makes steps 2 and 3.
:meth:`~ObjectStoreCheckpointer.commit` is the three on one process.

A crash before step 2 leaves unreferenced artifacts that :meth:`~ObjectStoreCheckpointer.prune`
removes later (once a newer checkpoint commits); a crash between 2 and 3 leaves a committed checkpoint the pointer does not
name yet, which recovery still finds because it considers every manifest. ``_latest`` is
the quick answer to "which checkpoint is current" for readers that do not list; recovery
itself never trusts it over the manifests.

Recovery (:meth:`~ObjectStoreCheckpointer.recover`) tries the newest checkpoint first,
verifies every byte against the manifest's SHA-256 digests, rebuilds delta partitions along
the ``parent_id`` chain (or, with ``rebuild=False``, hands back each verified chain, a full
snapshot and its deltas in order, for a caller whose state applies deltas in place), and
falls back to older checkpoints on any failure. Across processes,
:meth:`~ObjectStoreCheckpointer.recover_entries` picks the checkpoint once, for every
worker, and each worker reads its own partitions with
:meth:`~ObjectStoreCheckpointer.load_partition` / :meth:`~ObjectStoreCheckpointer.load_verified`.

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

from ._typing import BytesLike
from .batcher import DEFAULT_MAX_DECODED_SIZE
from .delta import (
    DELTA_KIND,
    DeltaFunction,
    DeltaValidator,
    apply_record_delta,
    encode_delta,
    validate_record_delta,
)
from .errors import (
    CheckpointError,
    CorruptDataError,
    NoValidCheckpointError,
    StreamStateError,
)
from .layout import SnapshotItem, place_snapshots
from .manifest import (
    CheckpointId,
    CheckpointManifest,
    CheckpointPaths,
    PartitionSnapshotEntry,
    plain_json,
    validate_name,
)
from .pending import (
    PendingCheckpoint,
    create_or_fail,
    require_parent,
    require_portable,
    upload_artifacts,
)
from .pointer import LatestPointer
from .recovery import (
    RecoveredCheckpoint,
    RecoveryPlan,
    apply_chain,
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
    "PendingCheckpoint",
    "RecoveredCheckpoint",
    "RecoveryPlan",
    "SnapshotItem",
    "StoredObject",
    "apply_record_delta",
    "encode_delta",
    "verify_integrity",
]

T = TypeVar("T")
U = TypeVar("U")
# What one recovery attempt makes: a checkpoint's state, or the plan to restore it.
R = TypeVar("R", RecoveredCheckpoint, RecoveryPlan)

# The newest committed checkpoint is not known yet (see ObjectStoreCheckpointer._newest).
_UNKNOWN = object()


def _commit_fields(
    source_offsets: Mapping[str, Any] | None,
    watermark: int | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A commit's manifest fields besides the artifacts, checked (watermark, source names),
    offsets as plain JSON values: keyword arguments for :meth:`CheckpointManifest.build`."""
    if watermark is not None and (isinstance(watermark, bool) or not isinstance(watermark, int)):
        raise ValueError(f"watermark must be an int or None, got {watermark!r}")
    offsets = {source: plain_json(value) for source, value in (source_offsets or {}).items()}
    for source in offsets:
        validate_name("source", source)
    return {"source_offsets": offsets, "watermark": watermark, "metadata": metadata}


def _optional_id(name: str, value: CheckpointId | str | None) -> CheckpointId | None:
    """``value`` as a :class:`CheckpointId` (parsed from its string form), or None."""
    if isinstance(value, str):
        return CheckpointId.parse(value)
    if value is not None and not isinstance(value, CheckpointId):
        raise TypeError(
            f"{name} must be a CheckpointId or its str form, got {type(value).__name__}"
        )
    return value


def _check_keep_last(keep_last: object, *, none_ok: bool) -> None:
    if keep_last is None and none_ok:
        return
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")


def _no_manifest(path: str) -> CheckpointError:
    return CheckpointError(f"{path}: no manifest (checkpoint not committed)")


def _partitions_of(manifest: CheckpointManifest) -> frozenset[tuple[str, int]]:
    return frozenset(
        (op, part.partition_id)
        for op, entry in manifest.operators.items()
        for part in entry.partitions
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
        self._pointer = LatestPointer(self.paths.latest_pointer())
        # (id, epoch) of the newest committed checkpoint, the floor for the next epoch: None
        # for an empty store, _UNKNOWN until the first commit or recovery looks it up.
        self._newest: object = _UNKNOWN
        self._newest_lock = threading.Lock()
        # The manifest this checkpointer committed last: the next delta's parent, whose
        # partitions begin() then need not read back (manifests are never overwritten).
        self._last_committed: CheckpointManifest | None = None

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

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the configuration, not the caches: a fresh lock, and the newest
        # committed checkpoint looked up again where it is needed.
        require_portable(self._storage, repr(self))
        local = ("_newest", "_newest_lock", "_last_committed")
        return {k: v for k, v in self.__dict__.items() if k not in local}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._newest = _UNKNOWN
        self._newest_lock = threading.Lock()
        self._last_committed = None

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
        placed = place_snapshots(self.paths, checkpoint_id, snapshots)
        return upload_artifacts(self._io, placed, self.max_concurrent_uploads, fresh=False)

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
        """Read one artifact's bytes (unverified; see :meth:`load_verified`)."""
        return bytes(self._io.get(path).data)

    def load_verified(self, entry: PartitionSnapshotEntry) -> bytes:
        """Read the artifact a manifest ``entry`` names and check its size and SHA-256.

        For a worker restoring only its own partitions (see :meth:`recover_entries`). A
        wrong size raises :class:`~streamstate.CorruptDataError`, a wrong digest
        :class:`~streamstate.IntegrityError` (both naming the path), a missing artifact
        :class:`~streamstate.CheckpointError`; an entry outside this checkpointer's layout
        raises ``ValueError`` before anything is read.
        """
        if not isinstance(entry, PartitionSnapshotEntry):
            raise TypeError(f"entry must be a PartitionSnapshotEntry, got {type(entry).__name__}")
        entry.check()
        if self.paths.parse_artifact(entry.path) is None:
            raise ValueError(
                f"{entry.path}: not a checkpoint artifact under {self.paths.base_prefix!r}"
            )
        return self._fetch_verified(entry)

    def load_partition(
        self,
        chain: Sequence[PartitionSnapshotEntry],
        apply_delta: DeltaFunction = apply_record_delta,
        max_size: int | None = DEFAULT_MAX_DECODED_SIZE,
    ) -> bytes:
        """One partition's state from its chain (:meth:`RecoveryPlan.chain`): every artifact
        read with :meth:`load_verified`, then the deltas applied to the full snapshot in
        order, as :meth:`recover` does (``apply_delta`` and ``max_size`` as there)."""
        entries = list(chain)
        total = sum(entry.size_bytes for entry in entries)
        if max_size is not None and total > max_size:
            raise CheckpointError(
                f"{entries[-1].path}: the chain needs {total} bytes, more than max_size {max_size}"
            )
        blobs = dict(
            zip(
                (entry.path for entry in entries),
                self._parallel(self.load_verified, entries),
                strict=True,
            )
        )
        return apply_chain(entries, blobs, apply_delta, max_size)

    # -- manifests and the latest pointer ------------------------------------------------

    def save_manifest(self, manifest: CheckpointManifest) -> None:
        """Commit ``manifest`` with a conditional create.

        An existing manifest is never overwritten: a different one at the same path raises
        :class:`~streamstate.CheckpointError`. Re-saving byte-identical content succeeds,
        which makes a retried request whose first attempt landed harmless.
        """
        manifest.check_paths(self.paths)
        data = manifest.to_json().encode("ascii")
        create_or_fail(self._io, self.paths.manifest(manifest.checkpoint_id), data)

    def load_manifest(self, checkpoint_id: CheckpointId) -> CheckpointManifest:
        """Read and validate one manifest.

        Raises :class:`~streamstate.CheckpointError` if it does not exist and
        :class:`~streamstate.CorruptDataError` if it is damaged or names another checkpoint.
        """
        path = self.paths.manifest(checkpoint_id)
        try:
            raw = self._io.get(path).data
        except FileNotFoundError:
            raise _no_manifest(path) from None
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
            known = self._last_committed
            if known is not None and known.checkpoint_id == checkpoint_id:
                self._last_committed = None
        io.delete(self.paths.manifest(checkpoint_id))
        self._parallel(io.delete, io.list(self.paths.checkpoint_dir(checkpoint_id)))

    def prune(self, keep_last: int = 3) -> list[CheckpointId]:
        """Delete old checkpoints, keeping the newest ``keep_last`` with intact manifests.

        Also kept: any newer checkpoint (even a damaged one), and every older checkpoint a
        kept one's delta chain needs. Artifacts of uncommitted checkpoints are removed when
        their id is older than the newest committed checkpoint's: :meth:`begin` mints ids
        above every committed one and :meth:`commit_entries` refuses a pending checkpoint
        older than the newest committed, so those can never commit (a crashed commit, a
        coordinator that died after :meth:`begin`, uploads that came too late). A pending
        checkpoint newer than the newest committed one may still commit and is left alone.
        Returns the ids deleted, oldest first.
        """
        _check_keep_last(keep_last, none_ok=False)
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

    def begin(self, epoch: int, *, parent: CheckpointId | str | None = None) -> PendingCheckpoint:
        """Start a checkpoint whose artifacts any process may upload; return its handle.

        Mints the checkpoint id and checks up front what :meth:`commit_entries` checks again
        at the commit: ``epoch`` is greater than the newest committed checkpoint's (or the
        recovered one's, after :meth:`recover`), and ``parent`` (needed for deltas, a
        :class:`CheckpointId` or its string form) is a committed checkpoint. Writes nothing:
        a checkpoint that is begun and never committed leaves only the artifacts uploaded
        for it, which :meth:`prune` removes once a newer checkpoint commits.

        The handle pickles unless the store is a ``MemoryStore``; workers call
        :meth:`PendingCheckpoint.upload` and return the entries to the coordinator::

            pending = ckpt.begin(epoch=7, parent=last.checkpoint_id)
            entries = [pending.upload("agg", p, snapshot_of(p)) for p in parts]  # anywhere
            ckpt.commit_entries(pending, entries, source_offsets={"kafka": {"0": 2077}})
        """
        return self._begin(epoch, parent, check_parent=True)

    def _begin(
        self, epoch: int, parent: CheckpointId | str | None, *, check_parent: bool
    ) -> PendingCheckpoint:
        """:meth:`begin`; without ``check_parent`` a parent this checkpointer committed last
        is not looked up again (:meth:`commit` checks it at the commit point anyway)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        parent = _optional_id("parent", parent)
        parent_partitions: frozenset[tuple[str, int]] = frozenset()
        if parent is not None:
            known = self._last_committed
            if known is None or known.checkpoint_id != parent:
                known = self.load_manifest(parent)
            elif check_parent and not self._io.exists(self.paths.manifest(parent)):
                raise _no_manifest(self.paths.manifest(parent))
            parent_partitions = _partitions_of(known)
        self._check_advances(epoch)
        floor = max((c for c in (self._latest_or_none(), parent) if c is not None), default=None)
        return PendingCheckpoint(
            CheckpointId.now(after=floor),
            epoch,
            parent,
            parent_partitions,
            storage=self._storage,
            paths=self.paths,
            retry=self.retry,
        )

    def commit(
        self,
        epoch: int,
        snapshots: Iterable[SnapshotItem],
        source_offsets: Mapping[str, Any] | None = None,
        parent: CheckpointId | str | None = None,
        watermark: int | None = None,
        validate_delta: DeltaValidator | None = validate_record_delta,
        metadata: Mapping[str, Any] | None = None,
        *,
        keep_last: int | None = None,
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
        committed and will be recovered. With ``keep_last``, :meth:`prune` follows
        (``prune(keep_last)``); a failing prune raises :class:`~streamstate.CheckpointError`
        saying the checkpoint is committed.

        This is :meth:`begin`, the uploads on this process's threads, and
        :meth:`commit_entries`' commit, in one call.
        """
        items = list(snapshots)
        _check_keep_last(keep_last, none_ok=True)
        fields = _commit_fields(source_offsets, watermark, metadata)
        pending = self._begin(epoch, parent, check_parent=False)
        placed = pending.place(items, validate_delta)
        # Check the manifest can be written before uploading anything.
        self._manifest(pending, [], fields)
        entries = upload_artifacts(self._io, placed, self.max_concurrent_uploads, fresh=True)
        try:
            manifest = self._seal(pending, entries, fields)
        except BaseException:
            self._io.delete_quietly([entry.path for _, entry in entries])
            raise
        return self._publish(manifest, keep_last)

    def commit_entries(
        self,
        pending: PendingCheckpoint,
        entries: Iterable[PartitionSnapshotEntry],
        *,
        source_offsets: Mapping[str, Any] | None = None,
        watermark: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        keep_last: int | None = None,
    ) -> CheckpointManifest:
        """Commit a :meth:`begin`-ed checkpoint from the entries its uploads returned.

        The entries are checked before anything is written: each is a
        :class:`PartitionSnapshotEntry` with a size and a SHA-256, at an artifact path of
        this pending checkpoint, whose object exists; no ``(operator, partition)`` appears
        twice; deltas have a parent holding their partition. Then, as for :meth:`commit`,
        ``epoch`` must still advance past the newest committed checkpoint, and the pending
        id must be newer than it (an older pending checkpoint may have been pruned). Any
        failure raises and leaves the store as it was; the uploaded artifacts stay, so a
        corrected call may follow, and :meth:`prune` removes them if none does.

        Then the manifest is created (the commit point), ``_latest`` moved and, with
        ``keep_last``, old checkpoints pruned, as by :meth:`commit` (``source_offsets``,
        ``watermark``, ``metadata`` and ``keep_last`` as there). Returns the committed
        manifest.
        """
        if not isinstance(pending, PendingCheckpoint):
            raise TypeError(f"pending must be a PendingCheckpoint, got {type(pending).__name__}")
        if pending.paths != self.paths:
            raise ValueError(
                f"{pending!r} was begun under base_prefix {pending.paths.base_prefix!r}, not "
                f"this checkpointer's {self.paths.base_prefix!r}"
            )
        _check_keep_last(keep_last, none_ok=True)
        fields = _commit_fields(source_offsets, watermark, metadata)
        checked = self._checked_entries(pending, entries)
        return self._publish(self._seal(pending, checked, fields), keep_last)

    def _checked_entries(
        self, pending: PendingCheckpoint, entries: Iterable[PartitionSnapshotEntry]
    ) -> list[tuple[str, PartitionSnapshotEntry]]:
        """``(operator, entry)`` for each entry, after the checks :meth:`commit_entries`
        lists (all but the parent's, which :meth:`_seal` makes)."""
        checked: list[tuple[str, PartitionSnapshotEntry]] = []
        seen: set[tuple[str, int]] = set()
        for entry in entries:
            if not isinstance(entry, PartitionSnapshotEntry):
                raise TypeError(
                    f"entries must be PartitionSnapshotEntry items, got {type(entry).__name__}"
                )
            entry.check()
            parsed = self.paths.parse_artifact(entry.path)
            if parsed is None or parsed[0] != pending.checkpoint_id:
                raise ValueError(
                    f"{entry.path}: not an artifact of pending checkpoint {pending.checkpoint_id}"
                )
            _, operator, partition, is_delta = parsed
            if (partition, is_delta) != (entry.partition_id, entry.is_delta):
                raise ValueError(
                    f"{entry.path}: entry says partition {entry.partition_id}, "
                    f"is_delta={entry.is_delta}, its path does not"
                )
            if (operator, partition) in seen:
                raise ValueError(f"{operator}/partition-{partition} appears twice")
            seen.add((operator, partition))
            checked.append((operator, entry))
        stored = set(self._io.list(self.paths.checkpoint_dir(pending.checkpoint_id)))
        missing = [entry.path for _, entry in checked if entry.path not in stored]
        if missing:
            raise CheckpointError(
                f"{missing[0]}: artifact is missing (never uploaded, or removed by prune)"
                + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        return checked

    def _seal(
        self,
        pending: PendingCheckpoint,
        entries: list[tuple[str, PartitionSnapshotEntry]],
        fields: dict[str, Any],
    ) -> CheckpointManifest:
        """The commit point: recheck what may have changed since :meth:`begin`, then create
        the manifest."""
        newest = self._check_advances(pending.epoch)
        if newest is not None and pending.checkpoint_id <= newest[0]:
            raise CheckpointError(
                f"pending checkpoint {pending.checkpoint_id} is older than committed checkpoint "
                f"{newest[0]}: prune may have removed its artifacts; begin a new checkpoint"
            )
        deltas = [(op, entry.partition_id) for op, entry in entries if entry.is_delta]
        if deltas:
            # The parent may have been deleted since begin(), which read its partitions: a
            # manifest is never overwritten, so that it still exists is all to check again.
            parent = pending.parent_id
            held = None if parent is None else pending.parent_partitions
            if parent is not None and not self._io.exists(self.paths.manifest(parent)):
                raise _no_manifest(self.paths.manifest(parent))
            for op, partition in deltas:
                require_parent(parent, held, op, partition)
        manifest = self._manifest(pending, entries, fields)
        self.save_manifest(manifest)
        return manifest

    def _publish(self, manifest: CheckpointManifest, keep_last: int | None) -> CheckpointManifest:
        """After the commit point: remember the new floor for epochs, move ``_latest``,
        prune if asked to."""
        self._note_committed(manifest.checkpoint_id, manifest.epoch)
        with self._newest_lock:
            self._last_committed = manifest
        try:
            self.update_latest(manifest.checkpoint_id)
        except CheckpointError as exc:
            raise CheckpointError(
                f"checkpoint {manifest.checkpoint_id} is committed but _latest was not moved: {exc}"
            ) from exc
        if keep_last is not None:
            try:
                self.prune(keep_last)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"checkpoint {manifest.checkpoint_id} is committed but pruning failed: {exc}"
                ) from exc
        return manifest

    @staticmethod
    def _manifest(
        pending: PendingCheckpoint,
        entries: list[tuple[str, PartitionSnapshotEntry]],
        fields: dict[str, Any],
    ) -> CheckpointManifest:
        return CheckpointManifest.build(
            pending.checkpoint_id, pending.epoch, entries, parent_id=pending.parent_id, **fields
        )

    def _check_advances(self, epoch: int) -> tuple[CheckpointId, int] | None:
        """Raise unless ``epoch`` is above the newest committed checkpoint's; return that
        checkpoint's ``(id, epoch)``."""
        newest = self._newest_committed()
        if newest is not None and epoch <= newest[1]:
            raise CheckpointError(
                f"epoch {epoch} does not advance: checkpoint {newest[0]} already holds epoch "
                f"{newest[1]}, and epochs must increase"
            )
        return newest

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
        manifests: dict[CheckpointId, CheckpointManifest] = {}

        def attempt(
            cid: CheckpointId, failures: tuple[tuple[str, str], ...]
        ) -> RecoveredCheckpoint:
            manifest, chains, blobs = self._fetch_chains(cid, manifests, max_size)
            deltas: dict[str, dict[int, tuple[bytes, ...]]] = {}
            if rebuild:
                state = rebuild_state(manifest, chains, blobs, apply_delta, max_size)
            else:
                state, deltas = split_chains(manifest, chains, blobs)
            return RecoveredCheckpoint(
                manifest, state, dict(manifest.source_offsets), failures, deltas
            )

        return self._newest_valid(candidates, max_fallback, attempt)

    def recover_entries(
        self,
        max_fallback: int = 3,
        *,
        before: CheckpointId | str | None = None,
        verify: bool = True,
    ) -> RecoveryPlan | None:
        """Choose the checkpoint every worker restores from, or None on an empty store.

        The distributed form of :meth:`recover`: the same candidates, newest first, and the
        same fallback, but instead of every partition's bytes it returns a
        :class:`RecoveryPlan`, each partition's chain of entries, for the coordinator to
        hand out; each worker then reads only its own partitions with
        :meth:`load_partition` (or :meth:`load_verified`). With ``verify`` (the default)
        every artifact of the chosen checkpoint is read here and checked against its
        SHA-256, so the plan names the newest checkpoint whose every artifact verifies;
        ``verify=False`` checks only the manifests, the delta chains and that every
        artifact exists (no artifact is read), leaving the digests to the workers.

        The recovery protocol: the coordinator calls ``plan = ckpt.recover_entries()`` once
        and sends every worker ``plan`` (or its chains). If any worker's restore fails (an
        artifact damaged since), the coordinator calls
        ``ckpt.recover_entries(before=plan.checkpoint_id)`` and *all* workers restore again
        from that older plan, so no two workers ever resume from different checkpoints;
        every source rewinds to ``plan.source_offsets``. Only checkpoints older than
        ``before`` are candidates. When every candidate fails,
        :class:`~streamstate.NoValidCheckpointError` lists each with its reason.
        """
        if isinstance(max_fallback, bool) or not isinstance(max_fallback, int) or max_fallback < 0:
            raise ValueError(f"max_fallback must be an int >= 0, got {max_fallback!r}")
        before = _optional_id("before", before)
        candidates, dirs = self._scan()
        if before is not None:
            candidates = [cid for cid in candidates if cid < before]
        stored = {path for paths in dirs.values() for path in paths}
        manifests: dict[CheckpointId, CheckpointManifest] = {}

        def attempt(cid: CheckpointId, failures: tuple[tuple[str, str], ...]) -> RecoveryPlan:
            manifest = self._manifest_cached(cid, manifests)
            chains = self._chains(manifest, manifests)
            needed = list({e.path: e for chain in chains.values() for e in chain}.values())
            if verify:
                self._verify_all(needed)
            else:
                missing = next((e.path for e in needed if e.path not in stored), None)
                if missing is not None:
                    raise CheckpointError(f"{missing}: artifact is missing")
            return RecoveryPlan(
                manifest, {key: tuple(chain) for key, chain in chains.items()}, failures
            )

        return self._newest_valid(candidates, max_fallback, attempt)

    def _newest_valid(
        self,
        candidates: Sequence[CheckpointId],
        max_fallback: int,
        attempt: Callable[[CheckpointId, tuple[tuple[str, str], ...]], R],
    ) -> R | None:
        """The fallback of recovery: ``attempt`` each of the newest ``max_fallback + 1``
        candidates, newest first, until one succeeds (``attempt`` gets the failures so
        far); None when there are no candidates."""
        if not candidates:
            with self._newest_lock:
                self._newest = None
            return None
        failures: list[tuple[str, str]] = []
        for cid in reversed(candidates[-(max_fallback + 1) :]):
            try:
                result = attempt(cid, tuple(failures))
            except (StreamStateError, ValueError) as exc:
                failures.append((str(cid), str(exc)))
                continue
            with self._newest_lock:
                # Writers resume from here: newer checkpoints did not verify.
                self._newest = (cid, result.epoch)
            return result
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
        self._verify_all(list(needed.values()))
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
        return bytes(self._read_checked(entry))

    def _verify_all(self, entries: Sequence[PartitionSnapshotEntry]) -> None:
        """Check every artifact, holding no more than one per thread in memory."""
        self._parallel(lambda entry: self._read_checked(entry).nbytes, entries)

    def _read_checked(self, entry: PartitionSnapshotEntry) -> memoryview:
        try:
            data = self._io.get(entry.path).data
        except FileNotFoundError:
            raise CheckpointError(f"{entry.path}: artifact is missing") from None
        check_artifact(entry, data)
        return data

    # -- helpers -------------------------------------------------------------------------

    def _parallel(self, fn: Callable[[T], U], items: Sequence[T]) -> list[U]:
        return parallel_map(fn, items, self.max_concurrent_uploads)
