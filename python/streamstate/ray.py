"""The same pipeline on Ray: workers are Ray actors, each folding a contiguous range of
partitions into a C++ store of its own, checkpointing its own artifacts.

::

    from streamstate.pipeline import ArraySource
    from streamstate.ray import RayPipeline

    with RayPipeline(ArraySource("events", columns), key="user", values="amount",
                     partitions=4, store="s3://bucket/job") as pipe:
        pipe.run()
        totals = pipe.to_pandas("amount")

The driver (this process) reads the source, routes each batch with
:func:`~streamstate.pipeline.partition_batch` and sends every worker its partitions'
slices in one actor call (numpy arrays through Ray's object store), keeping a few batches
in flight per worker rather than waiting for each. Actor calls from one caller run in the
order they were made, which is the whole barrier protocol: a checkpoint call is queued
behind every batch before it, so each worker captures exactly the state of the epoch. The
worker captures its store (a delta or a full snapshot, as the :class:`Pipeline` does),
uploads it on a thread of its own through the :class:`~streamstate.PendingCheckpoint`
handle while it folds on, and hands the artifact's entry back with the reply to a later
batch; once every worker's entry is in, the driver commits one manifest with the source
offset and the job record (``commit_entries``), on a thread of its own. At most one
checkpoint is in flight, and :attr:`RayPipeline.committed_offset` moves when its manifest
lands.

A source that splits into shards (:class:`~streamstate.pipeline.sources.ShardableSource`:
an :class:`ArraySource`'s row ranges, a :class:`ParquetSource`'s files) is read by the
workers instead, one shard each (``read_on_workers``): per step the driver asks every
worker to read its next batch, transform and route it, and each worker's slices for the
others go to them through the object store as arguments of their fold calls, never through
the driver, which sees only each shard's new offset and counts. The offset of such a run is
``{"shards": [o0, o1, ...]}``, every shard's; the barrier is queued behind the folds of a
step, so it records exactly the offsets read up to it.

A checkpoint holds one ``"aggregates"`` artifact per worker (partition id = worker index,
packed as the Pipeline packs its one store) and the Pipeline's ``"job"`` record, so a
one-worker RayPipeline and a Pipeline write the same layout and resume each other's
checkpoints. Resumed with the same partitions and workers, each worker restores its own
chain (the full snapshot and its deltas, each verified with ``load_verified``); with any other
layout (a rescale, or a Pipeline's one-store checkpoint) each worker reads every artifact
and keeps the keys whose key groups its partitions own (``restore_from``).

A windowed job (``window=``, see :mod:`streamstate.pipeline.windowing`) runs the
Pipeline's own window machinery on the driver: :meth:`Windowing.route
<streamstate.pipeline.windowing.Windowing.route>` splits each batch's late rows off under
the watermark before it and routes the rest with their event times, and the watermark moves
on from the routed times, as in the Pipeline. The workers hold window stores
(:class:`~streamstate.window_store.WindowedAggregateStore`) and fold each slice under the
watermark it was routed with. At a barrier each worker first emits the windows that ended
(``emit_windows``, queued just before the capture, so the capture holds only what was not
emitted); once every upload is in, the driver takes the workers' emitted batches (one per
partition, in partition order, as the Pipeline's own store emits them), and its commit thread stages them and the barrier's late rows in the sinks before the
manifest (recording the staging and the watermark in its metadata, as the Pipeline's
does); once the manifest landed the driver publishes them. Recovery restores the watermark
from the manifest and settles the sinks on the recovered checkpoint. A windowed checkpoint
resumes only with the partitions and workers it was written with (its window stores are
restored whole, and the watermark depends on the partitioning).

A worker that dies (``ray.kill``, out of memory, a lost node) is noticed at the next reply
of any call; every worker is then replaced, restored from the last committed checkpoint,
and the source rewound to its offset, up to ``max_restarts`` times per run
(:class:`WorkersLostError` after that). Every wait on a worker is bounded by
``worker_timeout`` (:class:`WorkerTimeoutError`).

Ray is an optional dependency (``pip install streamstate[ray]``): this module imports
without it and imports ``ray`` only when a RayPipeline starts.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from obstore.store import MemoryStore

from ._typing import BytesLike
from .aggregate import KeyType, NanPolicy, NumericAggregateStore
from .checkpoint import ObjectStoreCheckpointer
from .errors import (
    CheckpointError,
    CorruptDataError,
    IncompatibleCheckpointError,
    StoreConfigurationError,
    StreamStateError,
)
from .manifest import PartitionSnapshotEntry
from .pending import PendingCheckpoint
from .pipeline.checkpoints import CheckpointStats, CommitInFlight, DeltaChain
from .pipeline.contents import (
    STATE_OPERATOR,
    STORE_ENTRY,
    check_layout,
    pack_state,
    packed_entries,
)
from .pipeline.core import (
    _FIRST_IDLE_SLEEP,
    Pipeline,
    PipelineRun,
    Transform,
    check_keys,
    transformed,
    value_columns,
)
from .pipeline.fingerprint import FINGERPRINT_OPERATOR, JobFingerprint, JobRecord
from .pipeline.routing import DEFAULT_KEY_GROUPS, partition_batch
from .pipeline.sources import (
    Batch,
    Offset,
    Source,
    can_shard,
    check_batch,
    key_column,
    shard_offset,
)
from .pipeline.windowing import (
    EpochOutput,
    WindowSpec,
    check_resumable,
    emit_final,
    no_running_totals,
)
from .pipeline.workers import fold_rows
from .recovery import RecoveryPlan
from .stats import StatResults
from .storage import StoreLike, describe_store

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from typing_extensions import Self

    from .window_store import WindowedAggregateStore
    from .windows import Window

__all__ = [
    "PartitionsWorker",
    "RayPipeline",
    "RayPipelineError",
    "RayPipelineRun",
    "WorkerRestoreError",
    "WorkerTimeoutError",
    "WorkersLostError",
    "owned_partitions",
]

#: Batches a worker may have queued and not yet answered before the driver waits for the
#: oldest: enough to keep it busy while the driver routes the next, few enough that a
#: fast source cannot queue itself into the object store.
MAX_BATCHES_IN_FLIGHT = 4
#: How often a checkpoint whose newest candidate fails to restore falls back to an older one.
_MAX_FALLBACK = 3


class RayPipelineError(StreamStateError):
    """A RayPipeline's workers failed in a way the run cannot continue from."""


class WorkersLostError(RayPipelineError):
    """Workers died more often than ``max_restarts`` allows within one run."""


class WorkerRestoreError(RayPipelineError):
    """A worker could not restore its share of a checkpoint, nor of any older one."""


class WorkerTimeoutError(RayPipelineError):
    """A worker did not answer within ``worker_timeout`` seconds."""


def owned_partitions(worker: int, workers: int, partitions: int) -> range:
    """The contiguous partitions worker ``worker`` of ``workers`` folds, of ``partitions``:
    ``[worker * partitions // workers, (worker + 1) * partitions // workers)``."""
    return range(worker * partitions // workers, (worker + 1) * partitions // workers)


def _unpack_store(packed: bytes, where: str) -> bytes:
    """The store snapshot (or delta) one packed ``"aggregates"`` artifact holds."""
    try:
        entries = dict(packed_entries(packed))
    except CorruptDataError as exc:
        raise IncompatibleCheckpointError(
            f"{where} is not a pipeline's packed store state ({exc})"
        ) from exc
    if set(entries) != {STORE_ENTRY}:
        raise IncompatibleCheckpointError(
            f"{where} holds per-column states {sorted(entries)} (the layout before one store "
            "held every column); resume it once with a Pipeline, whose next checkpoint a "
            "RayPipeline reads"
        )
    return entries[STORE_ENTRY]


def _store_results(store: NumericAggregateStore, kind: str, value: str | None) -> Any:
    """A store's published results: ``kind`` is ``"results"``, ``"pandas"`` or ``"arrow"``,
    ``value`` the column."""
    if kind == "results":
        return store.results(value)
    if kind == "pandas":
        return store.to_pandas(value)
    return store.to_arrow(value)


def _routed(
    keys: Any,
    columns: Mapping[str, Any],
    *,
    source: str,
    offset: Offset,
    key: str,
    values: Sequence[str],
    key_type: KeyType | None,
    partitions: int,
    key_groups: int,
    workers: int,
) -> list[list[tuple[int, Any, list[Any]]]]:
    """One batch's keys and value columns, checked and routed: for every worker the
    ``(partition, keys, value columns)`` slices of its partitions that hold rows."""
    check_keys(keys, key_type, source, offset, key)
    arrays = value_columns(columns, values, source, offset)
    routed = partition_batch(keys, partitions, *arrays, key_groups=key_groups)
    return [
        [
            (p, routed[p][0], list(routed[p][1:]))
            for p in owned_partitions(worker, workers, partitions)
            if len(routed[p][0])
        ]
        for worker in range(workers)
    ]


@dataclass(frozen=True)
class _ShardJob:
    """What a worker needs to read, transform and route batches of its shard (the job's
    definition, picklable)."""

    source: str
    key: str
    values: list[str]
    transform: Transform | None
    batch_size: int
    partitions: int
    key_groups: int
    workers: int


@dataclass(frozen=True)
class _ShardStep:
    """A worker's read of its shard: the shard's offset after it, the rows read, those the
    transform passed on, and whether the shard has ended."""

    offset: Offset
    events: int
    folded: int
    ended: bool


class _ShardReader:
    """A worker's shard: reads its batches in turn from ``offset``, through the job's
    transform, and routes them."""

    def __init__(self, shard: Source, offset: Offset, job: _ShardJob) -> None:
        self.shard = shard
        self.offset = offset
        self.job = job
        self._required = [job.key, *job.values]

    def _columns(self, batch: Batch) -> Mapping[str, Any]:
        return transformed(self.job.transform, self.job.source, batch, self.offset,
                           self._required)

    def first_keys(self) -> tuple[Any, bool]:
        """The key column of the shard's next row (None if it has none now), and whether
        it has ended."""
        batch = self.shard.read(self.offset, 1)
        if batch is None or len(batch) == 0:
            return None, batch is None
        keys = self._columns(batch)[self.job.key]
        return (key_column(keys) if len(keys) else None), False

    def step(self, key_type: KeyType) -> tuple[list[list[tuple[int, Any, list[Any]]]], _ShardStep]:
        """Read the next batch and route it: every worker's slices, and the step."""
        job = self.job
        batch = self.shard.read(self.offset, job.batch_size)
        if batch is None:
            return [], _ShardStep(self.offset, 0, 0, ended=True)
        checked = self._required if job.transform is None else list(batch.columns)
        next_offset = check_batch(batch, job.source, self.offset, checked)
        if next_offset == self.offset:
            return [], _ShardStep(self.offset, 0, 0, ended=False)
        columns = self._columns(batch)
        keys = key_column(columns[job.key])
        routed = _routed(
            keys, columns, source=job.source, offset=self.offset, key=job.key,
            values=job.values, key_type=key_type, partitions=job.partitions,
            key_groups=job.key_groups, workers=job.workers,
        )
        self.offset = next_offset
        return routed, _ShardStep(next_offset, len(batch), len(keys), ended=False)


def _first_keys_of_shards(
    job: _ShardJob, offsets: Sequence[Offset], *shards: Source
) -> tuple[Any, bool]:
    """The key column of the first row any shard has next (None if none has one now), and
    whether every shard has ended; run as a Ray task, so the driver reads nothing."""
    ended = True
    for shard, offset in zip(shards, offsets, strict=True):
        keys, shard_ended = _ShardReader(shard, offset, job).first_keys()
        if keys is not None:
            return keys, False
        ended = ended and shard_ended
    return None, ended


# -- the worker (a Ray actor) ------------------------------------------------------------------


@dataclass(frozen=True)
class _Uploaded:
    """A worker's finished upload: the epoch, its artifact's entry, and how long it took
    (packing, SHA-256 and the write)."""

    epoch: int
    entry: PartitionSnapshotEntry
    upload_seconds: float


class PartitionsWorker:
    """One worker: the store of its partitions (a store of every partition, only its own
    folded), and at most one checkpoint upload in flight. Run as a Ray actor by
    :class:`RayPipeline`; a plain class so this module imports without Ray.

    Given ``window`` (a windowed job), the store is a
    :class:`~streamstate.window_store.WindowedAggregateStore`: batches come with their
    event times and the watermark they fold under (:meth:`fold_windows`), and at each
    barrier :meth:`emit_windows` hands the driver the windows that closed, just before
    :meth:`checkpoint` captures what is left."""

    def __init__(
        self,
        index: int,
        workers: int,
        partitions: int,
        key_type: KeyType,
        nan_policy: NanPolicy,
        values: list[str],
        checkpointer: ObjectStoreCheckpointer,
        key_groups: int = DEFAULT_KEY_GROUPS,
        window: WindowSpec | None = None,
    ) -> None:
        self.index = index
        self.owned = owned_partitions(index, workers, partitions)
        self._partitions = partitions
        self._values = values
        self._checkpointer = checkpointer
        self._window = window
        self._store: NumericAggregateStore | WindowedAggregateStore = (
            NumericAggregateStore(
                partitions, key_type, nan_policy, values=values, key_groups=key_groups
            )
            if window is None
            else window.new_store(key_type, partitions, nan_policy, values)
        )
        self._aggregators = {p: self._store.partition(p) for p in self.owned}
        self._capture = bytearray()
        self._packed = bytearray()
        self._upload: CommitInFlight[_Uploaded] | None = None
        self._unpublished = False
        self._reader: _ShardReader | None = None
        self._own: deque[list[tuple[int, Any, list[Any]]]] = deque()  # read, not yet folded

    def ready(self) -> tuple[str, int]:
        """The Ray node id and process id of the worker, once it is constructed."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def _totals(self) -> NumericAggregateStore:
        """The store of a job of running totals (not windowed)."""
        if not isinstance(self._store, NumericAggregateStore):
            raise no_running_totals("results()")
        return self._store

    def _new_store(self, partitions: int) -> NumericAggregateStore:
        store = self._totals()
        return NumericAggregateStore(
            partitions,
            store.key_type,
            cast("NanPolicy", store.nan_policy),
            values=self._values,
            key_groups=store.key_groups,
        )

    def _chain_state(
        self,
        store: NumericAggregateStore | WindowedAggregateStore,
        chain: Sequence[PartitionSnapshotEntry],
    ) -> None:
        """Restore ``store`` from one verified chain: the full snapshot, then its deltas."""
        blobs = [self._checkpointer.load_verified(entry) for entry in chain]
        states = [_unpack_store(blob, entry.path) for blob, entry in zip(blobs, chain, strict=True)]
        try:
            store.restore(states[0])
        except CorruptDataError as exc:
            raise IncompatibleCheckpointError(
                f"{chain[0].path} does not restore into a {store.key_type} store of "
                f"{store.num_partitions} partition(s): {exc}"
            ) from exc
        for number, (delta, entry) in enumerate(zip(states[1:], chain[1:], strict=True), 1):
            try:
                store.apply_delta(delta)
            except CorruptDataError as exc:
                raise CorruptDataError(
                    f"{entry.path}: delta {number} of {len(chain) - 1} does not apply to the "
                    f"state before it: {exc}"
                ) from exc

    def restore(
        self, chains: Sequence[Sequence[PartitionSnapshotEntry]], exact: bool, partitions: int
    ) -> int:
        """Restore from a checkpoint. ``exact``: ``chains`` is this worker's own chain alone,
        taken by a worker of this index over the same partitions, restored as it is (the
        next checkpoint may be a delta on it). Otherwise ``chains`` holds every worker's
        chain of a checkpoint over ``partitions`` partitions, and this worker keeps the keys
        its partitions own. Returns the number of keys restored."""
        if exact:
            (chain,) = chains
            self._chain_state(self._store, chain)
        else:
            if self._window is not None:  # the driver refuses first; never half-restore
                raise IncompatibleCheckpointError(
                    "a windowed job's worker restores only its own chain (same workers, same "
                    "partitions)"
                )
            snapshots = []
            for chain in chains:
                if len(chain) == 1:  # a full snapshot: restore_from reads only our sections
                    [entry] = chain
                    snapshots.append(_unpack_store(self._checkpointer.load_verified(entry),
                                                   entry.path))
                    continue
                # restore_from takes no deltas: bring the chain forward in its own store first
                old = self._new_store(partitions)
                self._chain_state(old, chain)
                snapshots.append(old.snapshot())
                del old
            try:
                self._totals().restore_from(snapshots, partitions=self.owned)
            except (CorruptDataError, ValueError) as exc:
                raise IncompatibleCheckpointError(
                    f"the checkpoint's state does not restore into partitions "
                    f"{list(self.owned)} of {self._partitions}: {exc}"
                ) from exc
        self._unpublished = True
        return len(self._store)

    def fold(self, slices: Sequence[tuple[int, Any, list[Any]]]) -> _Uploaded | None:
        """Fold one batch's slices, ``(partition, keys, value columns)`` each; return the
        finished upload of the checkpoint in flight, once (None while it runs or when none
        is). A failed upload raises here."""
        for partition, keys, values in slices:
            fold_rows(self._aggregators[partition], keys, values)
        self._unpublished = True
        return self._finished_upload()

    def fold_windows(
        self, slices: Sequence[tuple[int, Any, list[Any], Any]], watermark: int
    ) -> _Uploaded | None:
        """A windowed job's :meth:`fold`: slices ``(partition, keys, value columns, event
        times)``, each folded under ``watermark`` (the driver's, before the batch)."""
        for partition, keys, values, times in slices:
            fold_rows(self._aggregators[partition], keys, values, times, watermark)
        return self._finished_upload()

    def emit_windows(self, watermark: int, flush: bool) -> list[pa.RecordBatch]:
        """At a barrier, before :meth:`checkpoint`: emit and free the windows final under
        ``watermark`` (every open one with ``flush``: the source ended)."""
        return emit_final(self._windows(), watermark, flush=flush)

    def open_windows(self) -> int:
        """How many (key, window) pairs are open."""
        return self._windows().open_windows

    def _windows(self) -> WindowedAggregateStore:
        from .window_store import WindowedAggregateStore

        if not isinstance(self._store, WindowedAggregateStore):
            raise RayPipelineError(f"worker {self.index} folds running totals, not windows")
        return self._store

    def _finished_upload(self) -> _Uploaded | None:
        """The upload in flight once it finished (once), else None; raises its failure."""
        upload = self._upload
        if upload is not None and upload.done():
            self._upload = None
            return upload.result()
        return None

    def attach(self, shard: Source, offset: Offset, job: _ShardJob) -> None:
        """Read ``shard`` from ``offset`` from now on (:meth:`read_shard`)."""
        self._reader = _ShardReader(shard, offset, job)
        self._own.clear()

    def read_shard(self) -> list[Any]:
        """Read and route the shard's next batch. Returns one item per worker (its slices,
        or None: this worker's own are kept for :meth:`fold_step`, and an empty list is
        sent as None) and then the :class:`_ShardStep`; the driver asks for them as
        separate object refs (``num_returns``), so each goes to its worker alone."""
        if self._reader is None:
            raise RayPipelineError(f"worker {self.index} was given no shard to read")
        routed, step = self._reader.step(self._store.key_type)
        self._own.append(routed[self.index] if routed else [])
        workers = self._reader.job.workers
        slices = [None if w == self.index or not routed else routed[w] or None
                  for w in range(workers)]
        return [*slices, step]

    def fold_step(self, *others: list[tuple[int, Any, list[Any]]] | None) -> _Uploaded | None:
        """Fold the oldest step read but not folded: this worker's own slices and those
        the other workers sent (Ray resolves them, worker to worker); see :meth:`fold`."""
        slices = list(self._own.popleft())
        for part in others:
            if part:
                slices.extend(part)
        return self.fold(slices)

    def checkpoint(self, pending: PendingCheckpoint, is_delta: bool) -> float:
        """Capture the store (everything folded before this call: calls run in order) and
        upload it on a thread while later batches fold; return the capture's seconds."""
        started = time.perf_counter()
        self.collect()  # the driver collects each upload before the next barrier; be sure
        capture: BytesLike
        if isinstance(self._store, NumericAggregateStore):
            capture = self._store.capture(delta=is_delta)  # the capture's own bytes, uncopied
        else:
            self._store.snapshot_into(self._capture, delta=is_delta)
            capture = self._capture
        stalled = time.perf_counter() - started

        def upload() -> _Uploaded:
            begun = time.perf_counter()
            try:
                [(operator, _, _, packed), _] = pack_state(
                    [(STORE_ENTRY, capture)], b"", is_delta, self._packed
                )
            except BufferError:  # a view of the reused buffer is still held: use a new one
                [(operator, _, _, packed), _] = pack_state([(STORE_ENTRY, capture)], b"", is_delta)
            entry = pending.upload(
                operator, self.index, packed, is_delta=is_delta, validate_delta=None
            )
            return _Uploaded(pending.epoch, entry, time.perf_counter() - begun)

        self._upload = CommitInFlight(upload, name=f"streamstate-ray-upload-{self.index}")
        return stalled

    def collect(self) -> _Uploaded | None:
        """Wait for the upload in flight, if any; return it (once) or raise its error."""
        upload, self._upload = self._upload, None
        return None if upload is None else upload.result()

    def results(self, kind: str, value: str | None) -> Any:
        """This worker's keys' results (see :func:`_store_results`), every partition
        published first."""
        store = self._totals()
        if self._unpublished:
            for partition in self.owned:
                store.partition(partition).publish()
            self._unpublished = False
        return _store_results(store, kind, value)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"PartitionsWorker(index={self.index}, partitions={list(self.owned)})"


# -- the driver ----------------------------------------------------------------------------


@dataclass
class RayPipelineRun(PipelineRun):
    """A :class:`~streamstate.pipeline.PipelineRun` of a :class:`RayPipeline`, plus
    ``restarts``: how often the workers were replaced after one died (each restart replays
    from the last checkpoint, so ``events`` and ``late_events`` count the replayed rows
    again)."""

    restarts: int = 0


@dataclass
class _CheckpointInFlight:
    """A checkpoint between its barrier and its commit: the workers' uploads and then the
    driver's commit of their entries."""

    pending: PendingCheckpoint
    offset: Offset
    is_delta: bool
    started: float
    final: bool
    captures: list[Any]  # the workers' checkpoint() refs: their capture seconds
    uploads: dict[int, _Uploaded] = field(default_factory=dict)
    commit: CommitInFlight[float] | None = None
    #: A windowed job's: what the checkpoint stages (the late rows and watermark of its
    #: barrier), and the workers' emit_windows() refs, its windows.
    output: EpochOutput | None = None
    emitted: list[Any] = field(default_factory=list)


class RayPipeline:
    """:class:`~streamstate.pipeline.Pipeline`'s job folded by Ray actors (see the module
    notes for how it works).

    Takes the Pipeline's arguments and gives its results (:meth:`run` returns a
    :class:`RayPipelineRun`, a PipelineRun), plus:

    Args:
        num_workers: Ray actors folding the partitions (default: ``partitions``); each
            folds a contiguous range of them (:func:`owned_partitions`). Between 1 and
            ``partitions``.
        ray_address: the cluster to use (``"ray://head:10001"``, ``"auto"``, ...). None:
            the one this process is connected to, else the one ``ray.init()`` finds
            (``RAY_ADDRESS``, or one started with ``ray start`` on this machine), else a
            new local one.
        actor_options: options for every worker actor (``num_cpus``, ``memory``,
            ``resources``, ``scheduling_strategy``, ...; see ``ray.remote``). Default:
            ``{"scheduling_strategy": "SPREAD"}``, one worker per node where there are
            several.
        max_restarts: how often one run replaces its workers after one died before it
            fails with :class:`WorkersLostError`.
        worker_timeout: the longest wait, in seconds, for any worker's reply (starting,
            restoring, a batch, an upload) before the run fails with
            :class:`WorkerTimeoutError`.
        window, time, allowed_lateness, sink, late_sink: a windowed job, as the
            :class:`~streamstate.pipeline.Pipeline` takes them, with the same semantics and
            the same output: the watermark, the late split and the sinks run on the driver,
            the windows in the workers. :attr:`RayPipelineRun.late_events` counts replays
            after a restart again (the late sink holds each row once); ``emitted_windows``
            counts the windows of the run's committed checkpoints. A windowed job has no
            :meth:`results` (read the sink) and resumes only with the ``partitions`` and
            ``num_workers`` its checkpoint was written with
            (:class:`~streamstate.IncompatibleCheckpointError` otherwise).
        read_on_workers: True: the workers read the source, one shard each (it must be a
            :class:`~streamstate.pipeline.sources.ShardableSource`); False: the driver
            reads and routes every batch. None (default): the workers when the source
            can be sharded and the job is not windowed (a windowed job's watermark and
            late split run on the driver, which reads). Reading on the workers, a step is
            one batch of each shard (``max_batches`` and ``checkpoint_every`` count steps,
            ``on_batch`` gets a Batch of no columns from the offset before the step to the
            one after it), the ``transform`` runs on the workers, and :meth:`stop` ends the
            run after the steps already in flight.

    ``store`` must be reachable from every worker: a directory on one machine (or a
    shared file system), or an ``s3://``, ``gs://``, ``az://`` URL (or obstore store) on
    a cluster; a ``MemoryStore`` is refused. The ``transform`` and the sinks run on the
    driver (a sink's own store need only be reachable from there). The
    state lives in the workers: results are gathered from them, and :meth:`close` (or the
    end of a ``with`` block) ends them.
    """

    def __init__(
        self,
        source: Source,
        *,
        key: str,
        values: str | Sequence[str],
        partitions: int = 2,
        num_workers: int | None = None,
        ray_address: str | None = None,
        actor_options: Mapping[str, Any] | None = None,
        store: StoreLike | None = None,
        checkpoint_every: int = 10,
        full_checkpoint_every: int = 10,
        batch_size: int = 16_384,
        keep_checkpoints: int = 3,
        key_type: KeyType | None = None,
        nan_policy: NanPolicy = "skip",
        checkpoint_prefix: str = "checkpoints/",
        max_idle_sleep: float = 0.1,
        transform: Transform | None = None,
        max_restarts: int = 3,
        worker_timeout: float = 300.0,
        window: Window | None = None,
        time: str | None = None,
        allowed_lateness: object = 0,
        sink: object = None,
        late_sink: object = None,
        read_on_workers: bool | None = None,
    ) -> None:
        # The Pipeline checks the shared arguments and holds the job's definition (its
        # fingerprint, its checkpointer, its transform); it never runs.
        self._job = Pipeline(
            source,
            key=key,
            values=values,
            partitions=partitions,
            store=store,
            checkpoint_every=checkpoint_every,
            full_checkpoint_every=full_checkpoint_every,
            batch_size=batch_size,
            keep_checkpoints=keep_checkpoints,
            key_type=key_type,
            nan_policy=nan_policy,
            checkpoint_prefix=checkpoint_prefix,
            max_idle_sleep=max_idle_sleep,
            transform=transform,
            window=window,
            time=time,
            allowed_lateness=allowed_lateness,
            sink=sink,
            late_sink=late_sink,
        )
        # A windowed job's watermark, late split and sinks: the Pipeline's own machinery,
        # driven from here; the workers hold the window stores.
        self._windowing = self._job._windowing
        self.checkpointer = self._job.checkpointer
        if isinstance(self.checkpointer.store, MemoryStore):
            raise StoreConfigurationError(
                "RayPipeline: a MemoryStore lives in one process and its workers are others; "
                "give a directory (on one machine) or an s3://, gs://, az:// URL"
            )
        workers = partitions if num_workers is None else num_workers
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"num_workers must be an int, got {type(workers).__name__}")
        if not 1 <= workers <= partitions:
            raise ValueError(f"num_workers must be in [1, partitions={partitions}], got {workers}")
        self._num_workers = workers
        if ray_address is not None and not isinstance(ray_address, str):
            raise TypeError(f"ray_address must be a str, got {type(ray_address).__name__}")
        self._ray_address = ray_address
        if actor_options is not None and not isinstance(actor_options, Mapping):
            raise TypeError(f"actor_options must be a mapping, got {type(actor_options).__name__}")
        self._actor_options = (
            {"scheduling_strategy": "SPREAD"} if actor_options is None else dict(actor_options)
        )
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
            raise TypeError(f"max_restarts must be an int, got {type(max_restarts).__name__}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self.max_restarts = max_restarts
        if isinstance(worker_timeout, bool) or not isinstance(worker_timeout, (int, float)):
            raise TypeError(f"worker_timeout must be a number, got {type(worker_timeout)}")
        if not worker_timeout > 0:
            raise ValueError(f"worker_timeout must be > 0, got {worker_timeout}")
        self.worker_timeout = float(worker_timeout)
        if read_on_workers is not None and not isinstance(read_on_workers, bool):
            raise TypeError(
                f"read_on_workers must be a bool or None, got {type(read_on_workers).__name__}"
            )
        if read_on_workers and not can_shard(source):
            raise ValueError(
                f"read_on_workers=True: source {source.name!r} ({type(source).__name__}) does "
                "not split into shards (it has no shards()/shard_offsets())"
            )
        if read_on_workers and self._windowing is not None:
            # The watermark and the late split run on the driver, over every batch it reads.
            raise ValueError(
                "read_on_workers=True: a windowed job's batches are read and routed by the "
                "driver (its watermark and late split see every row); leave read_on_workers "
                "at None or False"
            )
        self._read_on_workers = read_on_workers
        self._shard_refs: list[Any] | None = None  # the shards, put in the object store once
        self._workers: list[Any] = []
        self._closed = False
        self._discard_state()

    # -- definition ----------------------------------------------------------------------

    @property
    def source(self) -> Source:
        """Where the events come from."""
        return self._job.source

    @property
    def key(self) -> str:
        """The column events are grouped by."""
        return self._job.key

    @property
    def values(self) -> list[str]:
        """The columns aggregated per key."""
        return self._job.values

    @property
    def partitions(self) -> int:
        """The number of partitions (spread over :attr:`num_workers` workers)."""
        return self._job.partitions

    @property
    def num_workers(self) -> int:
        """The number of worker actors."""
        return self._num_workers

    @property
    def checkpoint_every(self) -> int:
        """A checkpoint every this many batches holding events."""
        return self._job.checkpoint_every

    @property
    def batch_size(self) -> int:
        """Rows per micro-batch."""
        return self._job.batch_size

    @property
    def keep_checkpoints(self) -> int:
        """Older checkpoints are pruned beyond this many (0 keeps all)."""
        return self._job.keep_checkpoints

    @property
    def key_type(self) -> KeyType | None:
        """The store key type: given, recovered, or inferred from the first keys."""
        return self._key_type

    @property
    def window(self) -> Window | None:
        """The event-time window of a windowed job (None: running totals)."""
        return self._job.window

    @property
    def fingerprint(self) -> JobFingerprint:
        """The job's definition as recorded in its checkpoints."""
        return self._job._fingerprint_of(self._key_type)

    @property
    def workers(self) -> list[Any]:
        """The worker actors' handles, in worker order (empty until the first batch or
        recovery started them)."""
        return list(self._workers)

    # -- state ---------------------------------------------------------------------------

    def _discard_state(self) -> None:
        """End the workers and forget everything; the next run recovers from the store."""
        self._end_workers()
        job = self._job
        self._key_type: KeyType | None = job._given_key_type
        # As the Pipeline's: fixed for the life of the job, a checkpoint's wins.
        self._key_groups = max(DEFAULT_KEY_GROUPS, job.partitions)
        self._offset: Offset = job._start_offset
        self._committed_offset: Offset = job._start_offset
        self._epoch = 0
        self._chain = DeltaChain(job.full_checkpoint_every)
        self._unpruned_commits = 0
        self._recovered = False
        self._recovered_epoch: int | None = None
        self._recovery_seconds = 0.0
        self._in_flight: list[deque[Any]] = []
        self._checkpoint: _CheckpointInFlight | None = None
        if self._windowing is not None:
            self._windowing.reset(job.partitions)
        self._steps: deque[list[Any]] = deque()  # the workers' _ShardStep refs, per step
        self._shards_ended = False
        self._idle_sleep = 0.0

    def _end_workers(self) -> None:
        if self._workers:
            import ray

            for worker in self._workers:
                with suppress(Exception):  # already dead is as good
                    ray.kill(worker, no_restart=True)
        self._workers = []

    def _ray(self) -> Any:
        """The ``ray`` module, connected to the cluster."""
        try:
            import ray
        except ImportError as exc:
            raise RayPipelineError(
                "RayPipeline needs Ray: pip install 'streamstate[ray]'"
            ) from exc
        if not ray.is_initialized():
            ray.init(address=self._ray_address)
        return ray

    def _get(self, refs: Any, what: str) -> Any:
        """``ray.get`` bounded by ``worker_timeout``. A dead worker raises Ray's
        ``RayActorError`` (the run restarts); a failure inside a worker, its own error."""
        ray = self._ray()
        try:
            return ray.get(refs, timeout=self.worker_timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise WorkerTimeoutError(
                f"{what}: no reply from the workers within worker_timeout="
                f"{self.worker_timeout} s (is the cluster short of resources for "
                f"{self._num_workers} actors with options {self._actor_options}?)"
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, BaseException):
                raise cause from exc
            raise

    def _start_workers(self, key_type: KeyType) -> None:
        ray = self._ray()
        actor = ray.remote(PartitionsWorker).options(max_restarts=0, **self._actor_options)
        job = self._job
        self._key_type = key_type
        self._workers = [
            actor.remote(
                index,
                self._num_workers,
                job.partitions,
                key_type,
                job.nan_policy,
                job.values,
                self.checkpointer,
                self._key_groups,
                None if self._windowing is None else self._windowing.spec,
            )
            for index in range(self._num_workers)
        ]
        self._in_flight = [deque() for _ in self._workers]
        self._get([worker.ready.remote() for worker in self._workers], "starting the workers")

    # -- recovery ------------------------------------------------------------------------

    def recover(self) -> Offset:
        """Restore the newest valid checkpoint into new workers (once); return the offset to
        resume from. Raises :class:`~streamstate.IncompatibleCheckpointError` before any
        state is restored when that checkpoint is another job's."""
        self._check_open("recover()")
        try:
            return self._recover()
        except BaseException:
            self._discard_state()
            raise

    def _recover(self) -> Offset:
        if self._recovered:
            return self._offset
        started = time.perf_counter()
        plan = self.checkpointer.recover_entries(verify=False)
        # The recovery protocol of recover_entries: when a worker cannot restore its share,
        # every worker restores again from the same older checkpoint.
        failures: list[tuple[str, Exception]] = []
        while plan is not None:
            try:
                self._restore(plan)
                break
            except IncompatibleCheckpointError:
                raise
            except (CheckpointError, CorruptDataError) as exc:
                self._end_workers()
                failures.append((str(plan.checkpoint_id), exc))
                plan = (
                    None
                    if len(failures) > _MAX_FALLBACK
                    else self.checkpointer.recover_entries(verify=False, before=plan.checkpoint_id)
                )
        if plan is None and failures:
            reasons = "; ".join(f"{cid}: {exc}" for cid, exc in failures)
            raise WorkerRestoreError(
                f"the workers could not restore checkpoint {failures[0][0]} nor an older one "
                f"({reasons})"
            ) from failures[0][1]
        if self._windowing is not None:  # the sinks settle on what was restored, or on none
            self._windowing.bind_sinks(self.checkpointer.store, self._job._sink_prefix)
            metadata = None if plan is None else plan.manifest.metadata
            self._windowing.recover_sinks(self._recovered_epoch, metadata)
        self._recovered = True
        self._recovery_seconds = time.perf_counter() - started
        return self._offset

    def _restore(self, plan: RecoveryPlan) -> None:
        """Check ``plan``'s checkpoint is this job's, start the workers and restore it."""
        where = str(plan.checkpoint_id)
        parts = {op: sorted(p for o, p in plan.chains if o == op) for op, _ in plan.chains}
        state_parts = parts.get(STATE_OPERATOR, [])
        if state_parts != list(range(len(state_parts))) or parts.get(FINGERPRINT_OPERATOR) != [0]:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} holds {parts}; a (Ray) pipeline's checkpoint holds "
                f"{STATE_OPERATOR!r} partitions 0..n-1 (one per worker) and "
                f"{FINGERPRINT_OPERATOR!r} partition 0, so it was written by something else"
            )
        record_bytes = self.checkpointer.load_partition(plan.chain(FINGERPRINT_OPERATOR, 0))
        job = self._job
        # The same checks as the Pipeline's, on the one-partition view it knows: every
        # worker's artifact is one share of the state it keeps in partition 0.
        record, offset = check_layout(
            self.fingerprint,
            where,
            {op: [0] for op in parts},
            plan.source_offsets,
            record_bytes,
            job._start_offset,
        )
        if record is None:  # a Pipeline checkpoint from before job records
            raise IncompatibleCheckpointError(
                f"checkpoint {where} has no job record; resume it once with a Pipeline, whose "
                "next checkpoint a RayPipeline reads"
            )
        key_type = self._resolved_key_type(record, offset, where)
        old_workers, old_partitions = len(state_parts), record.store_partitions
        self._key_groups = record.key_groups or max(self._key_groups, old_partitions)
        exact = old_workers == self._num_workers and old_partitions == job.partitions
        if self._windowing is not None:
            self._check_windowed_resume(plan, old_workers, old_partitions)
        self._start_workers(key_type)
        chains = [plan.chain(STATE_OPERATOR, w) for w in range(old_workers)]
        calls = [
            worker.restore.remote([chains[w]] if exact else chains, exact, old_partitions)
            for w, worker in enumerate(self._workers)
        ]
        self._get(calls, f"restoring checkpoint {where}")
        self._offset = self._committed_offset = offset
        self._epoch = plan.epoch
        self._recovered_epoch = plan.epoch
        self._chain = DeltaChain(job.full_checkpoint_every)
        if exact:  # each worker's store is its chain's: the next capture may be a delta
            lengths = [len(chain) for chain in chains]
            self._chain.resume(
                plan.checkpoint_id,
                sum(chain[0].size_bytes for chain in chains),
                sum(e.size_bytes for chain in chains for e in chain[1:]),
                max(lengths) - 1,
            )

    def _check_windowed_resume(self, plan: RecoveryPlan, workers: int, partitions: int) -> None:
        """A windowed checkpoint resumes only as it was written: the Pipeline's rule on
        partitions, and the same workers (a window store is not split between them); then
        the driver adopts its watermark."""
        assert self._windowing is not None
        where = str(plan.checkpoint_id)
        check_resumable(where, partitions, self._job.partitions)
        if workers != self._num_workers:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} was written by {workers} worker(s) of this windowed job; "
                f"it resumes only with num_workers={workers}, not {self._num_workers} (each "
                "worker's window store is restored whole)"
            )
        self._windowing.restore(plan.manifest.metadata, where)

    def _resolved_key_type(self, record: JobRecord, offset: Offset, where: str) -> KeyType:
        recorded = record.fingerprint.get("key_type")
        if recorded is not None and recorded not in ("int64", "bytes", "str"):
            raise IncompatibleCheckpointError(
                f"checkpoint {where} records key type {recorded!r}, which this version of "
                "streamstate does not know"
            )
        if self._key_type is not None:
            return self._key_type
        keys = self._first_keys(offset)[0] if self.reads_shards else self._job._peek_keys(offset)
        inferred = None if keys is None else self._job._inferred_key_type(keys)
        if inferred is not None and recorded is not None:
            # the fingerprint check above matched an unresolved key type: compare now
            self._job._fingerprint_of(inferred).check_compatible(record.fingerprint, where)
        return inferred or cast("KeyType | None", recorded) or "int64"

    # -- running -------------------------------------------------------------------------

    def run(
        self, max_batches: int | None = None, on_batch: Callable[[Batch], None] | None = None
    ) -> RayPipelineRun:
        """Process the source from the recovered offset to its end (or ``max_batches``, or
        :meth:`stop`), as :meth:`Pipeline.run <streamstate.pipeline.Pipeline.run>` does.

        A worker that dies replaces every worker from the last committed checkpoint and
        rewinds the source (``restarts`` in the result), at most ``max_restarts`` times; a
        run that fails otherwise ends the workers, and the next run resumes from the last
        committed checkpoint. Returns once no checkpoint of the run is in flight.
        """
        if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0
        ):
            raise ValueError(f"max_batches must be an int >= 0, got {max_batches!r}")
        self._check_open("run()")
        ray = self._ray()
        started = time.perf_counter()
        # The Pipeline's own one-call-at-a-time lock, stop flag and SIGINT/SIGTERM handling.
        job = self._job
        with job._exclusive("run()"), job._stopping_on_signals():
            try:
                return self._run_restarting(ray, max_batches, on_batch, started)
            finally:
                job._stop_requested.clear()

    def _run_restarting(
        self,
        ray: Any,
        max_batches: int | None,
        on_batch: Callable[[Batch], None] | None,
        started: float,
    ) -> RayPipelineRun:
        report: RayPipelineRun | None = None
        restarts = 0
        windowing = self._windowing
        late_before = 0 if windowing is None else windowing.late_events
        emitted_before = 0 if windowing is None else windowing.emitted_windows
        try:
            while True:
                try:
                    self._recover()  # a worker may die while restoring too
                    if report is None:
                        report = RayPipelineRun(
                            start_offset=self._offset,
                            recovered_epoch=self._recovered_epoch,
                            recovery_seconds=self._recovery_seconds,
                        )
                    report.restarts = restarts
                    self._run(report, max_batches, on_batch)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                    restarts += 1
                    if restarts > self.max_restarts:
                        raise WorkersLostError(
                            f"a worker died {restarts} times in this run (max_restarts="
                            f"{self.max_restarts}); last: {exc}"
                        ) from exc
                    self._abandon_checkpoint()
                    self._discard_state()
        except BaseException:
            self._abandon_checkpoint()
            self._discard_state()
            raise
        report.end_offset = self._offset
        report.seconds = time.perf_counter() - started
        if windowing is not None:
            report.late_events = windowing.late_events - late_before
            report.emitted_windows = windowing.emitted_windows - emitted_before
        return report

    def stop(self) -> None:
        """Ask the run in progress to end at its next batch, with a final checkpoint; safe
        from any thread (see :meth:`Pipeline.stop <streamstate.pipeline.Pipeline.stop>`)."""
        self._job.stop()

    def _run(
        self,
        report: RayPipelineRun,
        max_batches: int | None,
        on_batch: Callable[[Batch], None] | None,
    ) -> None:
        if self.reads_shards:
            self._run_sharded(report, max_batches, on_batch)
            return
        job = self._job
        name = job.source.name
        required = [job.key, *job.values]
        since_checkpoint = 0
        while max_batches is None or report.batches + report.empty_batches < max_batches:
            if job._stop_requested.is_set():
                report.stopped = True
                break
            batch = job.source.read(self._offset, job.batch_size)
            if batch is None:
                report.finished = True
                break
            checked = required if job._transform is None else list(batch.columns)
            next_offset = check_batch(batch, name, self._offset, checked)
            if next_offset == self._offset:
                self._back_off(report)
                continue
            self._idle_sleep = 0.0
            columns = job._transformed(batch, self._offset, required)
            keys = key_column(columns[job.key])
            if not self._workers:
                self._start_workers(self._key_type or job._inferred_key_type(keys))
            self._dispatch(keys, columns)
            report.events += len(batch)
            report.folded_events += len(keys)
            report.batches += 1
            self._offset = next_offset
            since_checkpoint += 1
            if on_batch is not None:
                on_batch(batch)
            self._poll_checkpoint(report)
            if since_checkpoint >= job.checkpoint_every:
                self._barrier(report, final=False)
                since_checkpoint = 0
        self._end_run(report, since_checkpoint)

    def _back_off(self, report: RayPipelineRun) -> None:
        """An idle poll of a following source: count it and pause, longer each time."""
        job = self._job
        report.empty_batches += 1
        self._idle_sleep = min(job.max_idle_sleep, 2 * self._idle_sleep or _FIRST_IDLE_SLEEP)
        slept = time.perf_counter()
        job._stop_requested.wait(self._idle_sleep)  # stop() cuts the pause short
        report.idle_seconds += time.perf_counter() - slept

    def _end_run(self, report: RayPipelineRun, since_checkpoint: int) -> None:
        """The final checkpoint of a run that ended, and every reply and commit collected."""
        job = self._job
        if self._workers:
            ended = report.finished or report.stopped
            # At the end of a bounded source every open window is emitted, even when no
            # batch came since the last checkpoint (as the Pipeline does).
            flush = report.finished and self._open_windows() > 0
            if ended and (since_checkpoint or flush):
                self._barrier(report, final=True, flush=flush)
            for worker in range(len(self._workers)):
                self._drain(worker, 0, report)
            self._land(report)
            if ended and self._unpruned_commits and job.keep_checkpoints:
                self._unpruned_commits = 0
                self.checkpointer.prune(keep_last=job.keep_checkpoints)

    def _dispatch(self, keys: Any, columns: Mapping[str, Any]) -> None:
        """Route one batch and send every worker its partitions' slices (one call each)."""
        job = self._job
        check_keys(keys, self._key_type, job.source.name, self._offset, job.key)
        values = value_columns(columns, job.values, job.source.name, self._offset)
        if self._windowing is not None:
            where = f"source {job.source.name!r}: the batch at offset {self._offset!r}"
            watermark, windowed = self._windowing.route(
                keys, values, columns, where, job.partitions, self._key_groups
            )
            self._send(windowed, lambda worker, slices: worker.fold_windows.remote(slices, watermark))
            return
        routed = partition_batch(keys, job.partitions, *values, key_groups=self._key_groups)
        self._send(
            [(part[0], list(part[1:])) for part in routed],
            lambda worker, slices: worker.fold.remote(slices),
        )

    def _send(
        self, routed: Sequence[tuple[Any, ...]], fold: Callable[[Any, list[Any]], Any]
    ) -> None:
        """Send every worker the non-empty slices of its partitions, ``(partition,
        *routed[partition])`` each, in one call (``fold(worker, slices)``), keeping at
        most :data:`MAX_BATCHES_IN_FLIGHT` unanswered."""
        if not routed:  # a windowed batch whose every row was late
            return
        for index, worker in enumerate(self._workers):
            slices = [
                (p, *routed[p])
                for p in owned_partitions(index, self._num_workers, self._job.partitions)
                if len(routed[p][0])
            ]
            if slices:
                self._in_flight[index].append(fold(worker, slices))
                self._drain(index, MAX_BATCHES_IN_FLIGHT, None)

    def _open_windows(self) -> int:
        """How many (key, window) pairs the workers hold open (0 for running totals)."""
        if self._windowing is None:
            return 0
        calls = [worker.open_windows.remote() for worker in self._workers]
        return sum(self._get(calls, "counting the open windows"))

    # -- reading on the workers ------------------------------------------------------------

    @property
    def reads_shards(self) -> bool:
        """Whether the workers read the source, one shard each (see ``read_on_workers``)."""
        return (
            self._read_on_workers is not False
            and self._windowing is None
            and can_shard(self._job.source)
        )

    def _shard_job(self) -> _ShardJob:
        job = self._job
        return _ShardJob(job.source.name, job.key, job.values, job._transform, job.batch_size,
                         job.partitions, self._key_groups, self._num_workers)

    def _shards(self, offset: Offset) -> tuple[list[Any], list[Offset]]:
        """The shards' object refs (put in the object store once per pipeline) and their
        offsets at ``offset`` (translated from a plain one or another shard count, exactly,
        or refused with IncompatibleCheckpointError)."""
        source = self._job.source
        assert can_shard(source)
        positions = source.shard_offsets(offset, self._num_workers)
        if self._shard_refs is None:
            ray = self._ray()
            self._shard_refs = [ray.put(shard) for shard in source.shards(self._num_workers)]
        return self._shard_refs, positions

    def _first_keys(self, offset: Offset) -> tuple[Any, bool]:
        """The key column of a row some shard has next at ``offset`` (None if none has one),
        and whether every shard has ended; read by a Ray task, not here."""
        refs, positions = self._shards(offset)
        task = self._ray().remote(_first_keys_of_shards).options(num_cpus=0)
        found = self._get(task.remote(self._shard_job(), positions, *refs),
                          "reading the first keys of the shards")
        return cast("tuple[Any, bool]", found)

    def _run_sharded(
        self,
        report: RayPipelineRun,
        max_batches: int | None,
        on_batch: Callable[[Batch], None] | None,
    ) -> None:
        """:meth:`_run` with the workers reading their shards: per step, every worker reads
        and routes a batch, and the next step's reads are queued before this step's folds,
        so a worker reads on while the others' slices for it are still coming."""
        job = self._job
        self._shards_ended = False
        while not self._workers:
            if job._stop_requested.is_set():
                report.stopped = True
                return
            if max_batches is not None and report.empty_batches >= max_batches:
                return
            keys: Any = None
            if self._key_type is None:
                keys, self._shards_ended = self._first_keys(self._offset)
                if self._shards_ended:
                    report.finished = True
                    return
                if keys is None:
                    self._back_off(report)
                    continue
            self._start_workers(self._key_type or job._inferred_key_type(keys))
        refs, positions = self._shards(self._offset)
        spec = self._shard_job()
        self._get(
            [w.attach.remote(ref, at, spec) for w, ref, at in zip(self._workers, refs, positions,
                                                                 strict=True)],
            "handing the workers their shards",
        )
        since_checkpoint = 0
        steps = 0
        unfolded: list[Any] | None = None  # the last step's reads, not yet folded
        while max_batches is None or steps + report.empty_batches < max_batches:
            if job._stop_requested.is_set():
                report.stopped = True
                break
            if self._shards_ended:
                report.finished = True
                break
            reads = [
                worker.read_shard.options(num_returns=self._num_workers + 1).remote()
                for worker in self._workers
            ]
            steps += 1
            self._steps.append([read[-1] for read in reads])
            if unfolded is not None:
                self._fold_step(unfolded)
            unfolded = reads
            since_checkpoint += self._collect_steps(MAX_BATCHES_IN_FLIGHT, report, on_batch)
            self._poll_checkpoint(report)
            if since_checkpoint + len(self._steps) >= job.checkpoint_every:
                # Due once the steps in flight hold events too. Land the checkpoint before
                # while the workers are still busy with those steps; fold what was read and
                # take every step's report: the barrier's offset is then exactly what its
                # capture holds (and an idle source, whose steps held none, takes none).
                self._land(report)
                self._fold_step(unfolded)
                unfolded = None
                since_checkpoint += self._collect_steps(0, report, on_batch)
                if since_checkpoint:
                    self._barrier(report, final=False)
                since_checkpoint = 0
        if unfolded is not None:
            self._fold_step(unfolded)
        since_checkpoint += self._collect_steps(0, report, on_batch)
        if self._shards_ended and not report.stopped:
            report.finished = True
        self._end_run(report, since_checkpoint)

    def _fold_step(self, reads: Sequence[Sequence[Any]]) -> None:
        """Queue one step's folds: every worker gets the refs of the slices the others read
        for it as arguments, so Ray moves them worker to worker."""
        for index, worker in enumerate(self._workers):
            others = [read[index] for source, read in enumerate(reads) if source != index]
            self._in_flight[index].append(worker.fold_step.remote(*others))
            self._drain(index, MAX_BATCHES_IN_FLIGHT, None)

    def _collect_steps(
        self, keep: int, report: RayPipelineRun, on_batch: Callable[[Batch], None] | None
    ) -> int:
        """Take the oldest steps' reports until ``keep`` are in flight: move the offset,
        count the events, back off after a step that found nothing. Returns the number of
        steps that held events."""
        held = 0
        while len(self._steps) > keep:
            steps = cast("list[_ShardStep]", self._get(self._steps.popleft(),
                                                       "the workers reading their shards"))
            before = self._offset
            self._offset = shard_offset([step.offset for step in steps])
            events = sum(step.events for step in steps)
            self._shards_ended = all(step.ended for step in steps)
            if events:
                held += 1
                self._idle_sleep = 0.0
                report.events += events
                report.folded_events += sum(step.folded for step in steps)
                report.batches += 1
                if on_batch is not None:
                    on_batch(Batch({}, before, self._offset, events))
            elif not self._shards_ended:
                self._back_off(report)
        return held

    def _drain(self, worker: int, keep: int, report: RayPipelineRun | None) -> None:
        """Wait for worker ``worker``'s oldest batches until ``keep`` are in flight, taking
        any finished upload their replies carry."""
        queue = self._in_flight[worker]
        while len(queue) > keep:
            uploaded = self._get(queue.popleft(), f"worker {worker} folding a batch")
            if uploaded is not None:
                self._uploaded(worker, uploaded)

    def _uploaded(self, worker: int, uploaded: _Uploaded) -> None:
        checkpoint = self._checkpoint
        if checkpoint is None or uploaded.epoch != checkpoint.pending.epoch:
            raise RayPipelineError(
                f"worker {worker} finished an upload for epoch {uploaded.epoch}, which is not "
                "the checkpoint in flight"
            )
        checkpoint.uploads[worker] = uploaded
        if len(checkpoint.uploads) == len(self._workers):
            self._start_commit(checkpoint)

    def _poll_checkpoint(self, report: RayPipelineRun) -> None:
        """Between batches: land the checkpoint in flight if its commit has finished."""
        checkpoint = self._checkpoint
        if checkpoint is not None and checkpoint.commit is not None and checkpoint.commit.done():
            self._land(report)

    def _barrier(self, report: RayPipelineRun, *, final: bool, flush: bool = False) -> None:
        """Land the previous checkpoint, then queue the next one's capture behind every
        worker's batches (calls run in order: nothing waits for the capture here). A
        windowed job's workers first emit their final windows (every open one with
        ``flush``), so each capture holds only what was not emitted."""
        self._land(report)
        is_delta = self._chain.next_is_delta()
        pending = self.checkpointer.begin(
            self._epoch + 1, parent=self._chain.parent if is_delta else None
        )
        output, emitted = None, []
        if self._windowing is not None:
            output = self._windowing.barrier()
            watermark = self._windowing.watermark.value
            emitted = [worker.emit_windows.remote(watermark, flush) for worker in self._workers]
        captures = [worker.checkpoint.remote(pending, is_delta) for worker in self._workers]
        self._checkpoint = _CheckpointInFlight(
            pending, self._offset, is_delta, time.perf_counter(), final, captures,
            output=output, emitted=emitted,
        )

    def _start_commit(self, checkpoint: _CheckpointInFlight) -> None:
        """Every worker's artifact is up: commit the manifest on a thread of its own."""
        job = self._job
        self._unpruned_commits += 1
        prune = checkpoint.final or self._unpruned_commits >= job.keep_checkpoints
        if prune:
            self._unpruned_commits = 0
        record = JobRecord.encode(self.fingerprint, job.partitions, self._key_groups)
        entries = [checkpoint.uploads[w].entry for w in range(len(self._workers))]
        checkpointer, pending = self.checkpointer, checkpoint.pending
        offsets = {job.source.name: checkpoint.offset}
        metadata = {
            "partitions": job.partitions,
            "workers": self._num_workers,
            "key_groups": self._key_groups,
        }
        keep = job.keep_checkpoints if prune and job.keep_checkpoints else None
        output = checkpoint.output
        if output is not None and self._windowing is not None:
            # Every worker's checkpoint() ran (its upload is in), so did the emit before it.
            emitted = self._get(checkpoint.emitted, "emitting the closed windows")
            self._windowing.add_windows(output, [b for batches in emitted for b in batches])

        def commit() -> float:
            begun = time.perf_counter()
            job_entry = pending.upload(FINGERPRINT_OPERATOR, 0, record)
            recorded: dict[str, Any] = dict(metadata)
            if output is not None:  # staged before the manifest, which records the staging
                recorded.update(output.stage(pending.epoch))
            checkpointer.commit_entries(
                pending,
                [*entries, job_entry],
                source_offsets=offsets,
                metadata=recorded,
                keep_last=keep,
            )
            return time.perf_counter() - begun

        checkpoint.commit = CommitInFlight(commit, name="streamstate-ray-commit")

    def _land(self, report: RayPipelineRun) -> None:
        """Wait for the checkpoint in flight (collecting uploads the workers have not
        handed back yet), then make its epoch and offset the committed ones."""
        checkpoint = self._checkpoint
        if checkpoint is None:
            return
        waited = time.perf_counter()
        for worker in range(len(self._workers)):
            if worker not in checkpoint.uploads:
                self._drain(worker, 0, report)
            if worker not in checkpoint.uploads:
                uploaded = self._get(
                    self._workers[worker].collect.remote(), f"worker {worker} uploading"
                )
                if uploaded is not None:
                    self._uploaded(worker, uploaded)
        if checkpoint.commit is None:
            raise RayPipelineError(
                f"checkpoint epoch {checkpoint.pending.epoch}: workers "
                f"{sorted(set(range(len(self._workers))) - set(checkpoint.uploads))} "
                "uploaded nothing"
            )
        self._checkpoint = None
        commit_seconds = checkpoint.commit.result()
        if self._windowing is not None:  # the manifest is there: the rows may be seen
            self._windowing.landed()
        stalls = self._get(checkpoint.captures, "capturing the checkpoint")
        report.commit_wait_seconds += time.perf_counter() - waited
        uploads = list(checkpoint.uploads.values())
        size = sum(u.entry.size_bytes for u in uploads)
        stats = CheckpointStats(
            epoch=checkpoint.pending.epoch,
            offset=checkpoint.offset,
            bytes=size,
            seconds=time.perf_counter() - checkpoint.started,
            is_delta=checkpoint.is_delta,
            stall_seconds=max(stalls, default=0.0),
            upload_seconds=max(u.upload_seconds for u in uploads) + commit_seconds,
        )
        self._epoch = stats.epoch
        self._committed_offset = stats.offset
        self._chain.committed(checkpoint.pending.checkpoint_id, stats.is_delta, size)
        report.checkpoints.append(stats)

    def _abandon_checkpoint(self) -> None:
        """A failing run: let a commit already started finish (a manifest must not land
        behind the next run), and forget the checkpoint; prune removes its artifacts."""
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is not None and checkpoint.commit is not None:
            with suppress(BaseException):  # the run's own failure is what is raised
                checkpoint.commit.result()
                if self._windowing is not None:  # it committed: publish (recovery would)
                    self._windowing.landed()

    # -- results -------------------------------------------------------------------------

    @property
    def offset(self) -> Offset:
        """The source offset everything before which has been sent to the workers."""
        return self._offset

    @property
    def committed_offset(self) -> Offset:
        """The source offset of the last checkpoint committed or recovered."""
        return self._committed_offset

    @property
    def epoch(self) -> int:
        """The epoch of the last checkpoint committed or recovered."""
        return self._epoch

    def _gather(self, kind: str, value: str | None, call: str) -> list[Any]:
        self._check_open(call)
        if self._windowing is not None:
            raise no_running_totals(call)
        if value is not None and value not in self.values:
            raise KeyError(f"{value!r} is not one of the aggregated values {self.values}")
        if not self._workers:  # nothing folded yet; do not fix the key type by asking
            store = NumericAggregateStore(1, self._key_type or "int64", values=self.values)
            return [_store_results(store, kind, value)]
        for index in range(len(self._workers)):
            self._drain(index, 0, None)
        calls = [worker.results.remote(kind, value) for worker in self._workers]
        return cast("list[Any]", self._get(calls, call))

    def results(self, metric: str) -> StatResults:
        """Per-key statistics of ``metric``, gathered from every worker (columnar)."""
        parts = cast("list[StatResults]", self._gather("results", metric, "results()"))
        merged: dict[str, Any] = {}
        for name in parts[0]:
            columns = [part[name] for part in parts]  # type: ignore[literal-required]
            if isinstance(columns[0], list):
                merged[name] = [item for column in columns for item in column]
            else:
                merged[name] = np.concatenate(columns)
        return cast(StatResults, merged)

    def to_pandas(self, metric: str) -> pd.DataFrame:
        """``results(metric)`` as a pandas DataFrame indexed by key."""
        import pandas as pd

        frame: pd.DataFrame = pd.concat(self._gather("pandas", metric, "to_pandas()"))
        return frame

    def to_arrow(self, value: str | None = None) -> pa.Table:
        """``results(value)`` as a ``pyarrow.Table`` (``value`` may be left out when the job
        aggregates one column). Needs pyarrow."""
        import pyarrow as pa

        metric = self._job._value_or_only(value, "to_arrow()")
        return pa.concat_tables(self._gather("arrow", metric, "to_arrow()"))

    def _check_open(self, call: str) -> None:
        if self._closed:
            raise StreamStateError(
                f"{call}: this RayPipeline is closed and its workers are gone; create a new "
                "one on the same store to resume from its checkpoints"
            )

    def close(self) -> None:
        """End the workers (checkpoints stay in the store). Later calls raise."""
        self._job.close()  # refuses while run() is in progress; later runs find it closed
        self._closed = True
        self._abandon_checkpoint()
        self._end_workers()
        self._shard_refs = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        if self._windowing is not None:
            spec = self._windowing.spec
            state += (
                f", window={spec.window!r}, time={spec.time!r}, "
                f"allowed_lateness={spec.allowed_lateness} ms"
            )
        return (
            f"RayPipeline(source={self.source.name!r}, key={self.key!r}, values={self.values}, "
            f"partitions={self.partitions}, num_workers={self._num_workers}, "
            f"offset={self._offset}, epoch={self._epoch}, "
            f"store={describe_store(self.checkpointer.store)}{state})"
        )
