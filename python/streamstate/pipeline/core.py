"""The Pipeline: the coordinator that reads, routes, checkpoints and recovers."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from .._typing import BytesLike
from ..aggregate import KeyType, NanPolicy, NumericAggregateStore
from ..checkpoint import ObjectStoreCheckpointer, RecoveredCheckpoint
from ..errors import CorruptDataError, IncompatibleCheckpointError, SourceError, StreamStateError
from ..manifest import CheckpointPaths
from ..stats import StatResults
from ..storage import StoreLike, describe_store
from .checkpoints import (
    Capture,
    CheckpointStats,
    CommitInFlight,
    CommitResult,
    DeltaChain,
    commit_capture,
    summarize_checkpoints,
)
from .contents import STORE_ENTRY, check_newest, state_chain_bytes, unpack_state
from .fingerprint import JobFingerprint, JobRecord, key_types_compatible
from .routing import DEFAULT_KEY_GROUPS, partition_batch
from .sources import (
    Batch,
    Offset,
    Source,
    check_batch,
    check_columns,
    describe_keys,
    key_column,
    start_offset_of,
)
from .windowing import Windowing, no_running_totals
from .workers import PartitionWorker, quiesce

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa
    from typing_extensions import Self

    from ..window_store import WindowedAggregateStore
    from ..windows import Window

    #: The store a pipeline folds into: running totals, or (windowed) per-window partials.
    _Store = NumericAggregateStore | WindowedAggregateStore

__all__ = ["CheckpointStats", "Pipeline", "PipelineRun", "Transform"]

#: A per-batch transform: a batch's columns (name -> array) to the columns to fold.
Transform = Callable[[dict[str, Any]], Mapping[str, Any]]

_KEY_TYPES = ("int64", "bytes", "str")
_NAN_POLICIES = ("skip", "propagate", "raise")
_MAX_PARTITIONS = 65536  # NumericAggregateStore's limit
# An idle source is polled again after 1 ms, then 2, 4, ... up to ``max_idle_sleep``.
_FIRST_IDLE_SLEEP = 0.001


@dataclass

class PipelineRun:
    """What one call of :meth:`Pipeline.run` did.

    ``batches`` counts the batches that held events; ``empty_batches`` the polls of an
    idle source that returned none, and ``idle_seconds`` the time spent backing off after
    them. ``finished`` is True when the source reported its end; ``stopped`` when
    :meth:`Pipeline.stop` (or SIGINT/SIGTERM) ended the run. ``events`` counts the rows read
    from the source, ``folded_events`` those a ``transform`` passed on to be folded (the
    same without one). The offsets are the source's (JSON values: row numbers for arrays).
    ``checkpoints`` lists the checkpoints that landed, in order; ``commit_wait_seconds`` is
    the time the run stood waiting for a background commit (at a barrier, the previous one;
    at the end, the last one). ``deferred_checkpoints`` counts the
    checkpoints that came due while the one before was still in flight and were taken once
    it landed (``defer_busy_checkpoints``). In a windowed job ``late_events`` counts the
    rows split off as late (replays included), and ``emitted_windows`` the windows emitted
    to the sink by the run's checkpoints (those of a run that failed never publish).
    """

    events: int = 0
    batches: int = 0
    start_offset: Offset = 0
    end_offset: Offset = 0
    seconds: float = 0.0
    finished: bool = False
    recovered_epoch: int | None = None
    recovery_seconds: float = 0.0
    checkpoints: list[CheckpointStats] = field(default_factory=list)
    empty_batches: int = 0
    idle_seconds: float = 0.0
    commit_wait_seconds: float = 0.0
    stopped: bool = False
    folded_events: int = 0
    deferred_checkpoints: int = 0
    late_events: int = 0
    emitted_windows: int = 0

    @property
    def events_per_second(self) -> float:
        """Events folded per second of the run (0 for an instant run)."""
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes uploaded by all of the run's checkpoints."""
        return sum(c.bytes for c in self.checkpoints)

    @property
    def delta_checkpoints(self) -> int:
        """How many of the run's checkpoints were deltas."""
        return sum(c.is_delta for c in self.checkpoints)

    @property
    def stall_seconds(self) -> float:
        """Seconds the partitions stood still for checkpoints (barriers and captures)."""
        return sum(c.stall_seconds for c in self.checkpoints)

    @property
    def upload_seconds(self) -> float:
        """Seconds of background commit work (packing, hashing, uploading) of the run."""
        return sum(c.upload_seconds for c in self.checkpoints)

    def checkpoint_summary(self) -> str:
        """One line about the run's checkpoints: count, deltas, bytes, stall vs upload."""
        return summarize_checkpoints(self.checkpoints)


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _value_columns(values: str | Sequence[str]) -> list[str]:
    columns = [values] if isinstance(values, str) else list(values)
    for column in columns:
        if not isinstance(column, str):
            raise TypeError(f"values must be column names (str), got {type(column).__name__}")
    if not columns:
        raise ValueError("values must name at least one column to aggregate")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ValueError(f"values names {repeated} twice")
    return columns


def _key_type_of(keys: Any) -> KeyType | None:
    """The store key type for keys of this dtype, or None if they cannot be keys.

    Text (numpy ``U``/``T``, an Arrow string array, or an object array such as a list
    converts to, whose first key is a ``str``) is ``"str"``, so results hand back ``str``;
    numpy ``S``, Arrow binary and other object arrays are ``"bytes"``. Only the first key of
    an object array is looked at (a per-row Python check would cost what the fold saves):
    the store checks every key's type as it folds.
    """
    if not isinstance(keys, np.ndarray):  # an Arrow string/binary array (see key_column)
        import pyarrow as pa  # present: the array is one

        text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
        return "str" if any(is_text(keys.type) for is_text in text) else "bytes"
    kind = keys.dtype.kind
    if kind in "iu":
        return "int64"
    if kind in "UT":
        return "str"
    if kind == "S":
        return "bytes"
    if kind == "O":
        return "str" if keys.size and isinstance(keys.flat[0], str) else "bytes"
    return None


def transformed(
    transform: Transform | None,
    source: str,
    batch: Batch,
    offset: Offset,
    required: Sequence[str],
) -> Mapping[str, Any]:
    """The columns of ``batch`` (read at ``offset`` from source ``source``) through
    ``transform``, checked: every ``required`` column is there, all of one length."""
    if transform is None:
        return batch.columns
    columns = transform(dict(batch.columns))
    where = f"source {source!r}: the transform of the batch at offset {offset!r}"
    if not isinstance(columns, Mapping):
        raise SourceError(
            f"{where} returned a {type(columns).__name__}; it must return a mapping of "
            "column names to arrays"
        )
    check_columns(required, columns, where)
    rows = len(columns[required[0]])
    for name in required[1:]:
        if len(columns[name]) != rows:
            raise SourceError(
                f"{where} returned column {name!r} of {len(columns[name])} rows, but "
                f"column {required[0]!r} has {rows}"
            )
    return columns


def check_keys(keys: Any, key_type: KeyType | None, source: str, offset: Offset, key: str) -> None:
    """Refuse a batch whose keys (column ``key`` of ``source`` at ``offset``) are not of the
    job's ``key_type`` with a SourceError naming it."""
    found = _key_type_of(keys)
    # A bytes job folds str keys as their UTF-8 bytes; a str job refuses bytes keys here
    # rather than when results() finds one that is not UTF-8 text.
    if found != key_type and not (found == "str" and key_type == "bytes"):
        raise SourceError(
            f"source {source!r}: the batch at offset {offset!r} has {found or 'no valid'} keys "
            f"({describe_keys(keys)}) in column {key!r}, but this job's keys are {key_type}"
        )


def value_columns(
    columns: Mapping[str, Any], values: Sequence[str], source: str, offset: Offset
) -> list[npt.NDArray[np.float64]]:
    """The batch's ``values`` columns as float64 arrays, or a SourceError naming the column
    of ``source`` at ``offset`` that is not numeric."""
    arrays = []
    for metric in values:
        try:
            arrays.append(np.asarray(columns[metric], dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise SourceError(
                f"source {source!r}: column {metric!r} of the batch at offset {offset!r} is "
                f"not numeric: {exc}"
            ) from exc
    return arrays


class Pipeline:
    """Folds a keyed source into per-key statistics across ``partitions`` threads, with
    periodic exactly-once checkpoints to an object store.

    Args:
        source: where events come from (replayable: see :class:`Source`).
        key: the column to group by (integers, str or bytes).
        values: the float column(s) to aggregate (one name or several); each gets
            count/sum/min/max/mean/var/std.
        partitions: number of partition threads. It may change between runs of a job.
        store: an obstore store, URL or directory for checkpoints. Default: a directory of
            this job's own under ``streamstate.storage.default_store_path()``, named after
            its fingerprint, so jobs given no store never share one.
        checkpoint_every: commit a checkpoint after this many batches holding events.
        full_checkpoint_every: every this many checkpoints one is a full snapshot; the
            others hold only what changed since the one before (1: every one is full). A
            full one also comes sooner when the deltas since the last outgrow it.
        batch_size: rows per micro-batch.
        keep_checkpoints: older checkpoints are pruned beyond this many (0 keeps all),
            along with what their delta chains need. Pruning runs every
            ``keep_checkpoints`` commits, not after each (it reads a dozen manifests, more
            than a small commit costs), and after the last commit of a run that ends or is
            stopped; so while a job runs, or after a crash, up to ``keep_checkpoints - 1``
            more may be there until the next prune.
        key_type: ``"int64"``, ``"str"`` or ``"bytes"``; default: inferred from the keys
            (text keys, numpy ``U``, lists of str or Arrow strings, are ``"str"`` and come
            back as ``str``; numpy ``S`` and lists of bytes are ``"bytes"``).
        nan_policy: what folding does with NaN values: ``"skip"`` them, ``"propagate"``
            them into the key's statistics, or ``"raise"`` (the run fails).
        checkpoint_prefix: where in the store the checkpoints live.
        max_idle_sleep: the longest pause, in seconds, between polls of a source that has
            nothing new (the pause doubles from 1 ms up to this).
        transform: a function from a batch's columns (a dict of name -> array) to the
            columns to fold (a mapping holding the key and value columns, all of one
            length): filter rows, derive a key or a value. It runs on the coordinator
            before routing, on every batch the source gives. A resumed job replays the
            batches since its last checkpoint through it again, so it must be
            deterministic (the same columns for the same batch, no clock, no randomness,
            no state carried between batches); changing it changes what the job's state
            means, as changing ``key`` would, though the fingerprint cannot tell.
        defer_busy_checkpoints: when a checkpoint comes due while the previous one is still
            in flight, keep folding and take it as soon as that one lands, instead of
            stopping the partitions at the barrier until it has. Checkpoints then come at
            least ``checkpoint_every`` batches apart, as far apart as their commits take
            (a replay after a crash may be longer); the default waits, so every checkpoint
            lands exactly ``checkpoint_every`` batches after the one before.
        window: group events into event-time windows per key
            (:class:`~streamstate.windows.Tumbling`, ``Hopping`` or ``Session``) instead of
            running totals; the windows' statistics flow out to ``sink`` while the job
            runs. Needs ``time`` and ``sink``.
        time: the event-time column of a windowed job: int64 epoch milliseconds or
            ``datetime64`` of any unit (then the emitted bounds are ``timestamp[ms]``).
        allowed_lateness: how far behind the newest event time an event may be and still
            count (a duration: int ms, ``timedelta``, ``timedelta64`` or ``"10min"``).
        sink: where a windowed job's windows go: a :class:`~streamstate.sinks.Sink` such
            as :class:`~streamstate.sinks.ParquetSink` (exactly-once), or a plain callable
            taking a ``pyarrow.RecordBatch`` (wrapped in
            :class:`~streamstate.sinks.CallableSink`: called after each checkpoint landed,
            at-least-once after a crash).
        late_sink: where a windowed job's late events go (a sink, or a callable), as
            record batches of the batch's columns (after ``transform``).

    Windows (the rules: :mod:`streamstate.pipeline.windowing`): each batch is judged under
    the watermark before it, late events are split off (:attr:`PipelineRun.late_events`,
    ``late_sink``), final windows are emitted at each checkpoint (every open one at the end
    of a bounded source) and published once it landed: a
    :class:`~streamstate.sinks.ParquetSink` holds every window exactly once after any crash.
    A windowed job has no running totals (:meth:`results` and the other readers raise: read
    the sink), resumes only with the partition count it was checkpointed with, and records
    ``time``, ``window`` and ``allowed_lateness`` in its fingerprint.

    The offset is the source's (see :class:`Source`): a JSON value, an int row number for
    :class:`ArraySource`. A source that follows new data (``ParquetSource(follow=True)``)
    never ends: :meth:`run` polls it, backing off while it is idle, until :meth:`stop` is
    called or the process gets SIGINT or SIGTERM, and then ends with a final checkpoint.

    Checkpoints are asynchronous: at the barrier the partitions stop only while the stores
    capture their state (their changes since the last checkpoint, or a full snapshot);
    compressing, hashing and uploading it runs in the background while they fold on. One
    commit is in flight at a time, the committed offset (:attr:`committed_offset`) moves
    when its manifest lands, a failed background commit fails the run, and :meth:`run`
    returns only after its last commit landed.

    Every checkpoint records the job's fingerprint (source name, key, values, key type,
    NaN policy); resuming from a checkpoint of another definition, or from one a pipeline
    did not write, raises :class:`~streamstate.IncompatibleCheckpointError` before any
    state is restored. After a failed :meth:`run` the in-memory state is discarded, and the
    next run resumes from the last committed checkpoint. One call runs at a time: a
    concurrent :meth:`run`, :meth:`checkpoint` or :meth:`recover` raises.
    """

    def __init__(
        self,
        source: Source,
        *,
        key: str,
        values: str | Sequence[str],
        partitions: int = 2,
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
        defer_busy_checkpoints: bool = False,
        window: Window | None = None,
        time: str | None = None,
        allowed_lateness: object = 0,
        sink: object = None,
        late_sink: object = None,
    ) -> None:
        self._partitions = _positive_int("partitions", partitions)
        if self._partitions > _MAX_PARTITIONS:
            raise ValueError(f"partitions must be <= {_MAX_PARTITIONS}, got {partitions}")
        self.checkpoint_every = _positive_int("checkpoint_every", checkpoint_every)
        self._chain = DeltaChain(_positive_int("full_checkpoint_every", full_checkpoint_every))
        self.batch_size = _positive_int("batch_size", batch_size)
        self.keep_checkpoints = _positive_int("keep_checkpoints", keep_checkpoints, minimum=0)
        if not isinstance(key, str) or not key:
            raise TypeError(f"key must be a column name (a non-empty str), got {key!r}")
        self._values = _value_columns(values)
        if key_type is not None:
            _choice("key_type", key_type, _KEY_TYPES)
        self._given_key_type = key_type
        self._nan_policy = cast("NanPolicy", _choice("nan_policy", nan_policy, _NAN_POLICIES))
        if isinstance(max_idle_sleep, bool) or not isinstance(max_idle_sleep, (int, float)):
            raise TypeError(f"max_idle_sleep must be a number, got {type(max_idle_sleep)}")
        if not max_idle_sleep >= 0:
            raise ValueError(f"max_idle_sleep must be >= 0, got {max_idle_sleep}")
        self.max_idle_sleep = float(max_idle_sleep)
        if not isinstance(defer_busy_checkpoints, bool):
            raise TypeError(
                f"defer_busy_checkpoints must be a bool, got {type(defer_busy_checkpoints)}"
            )
        self.defer_busy_checkpoints = defer_busy_checkpoints
        name = source.name
        if not isinstance(name, str) or not name:
            raise TypeError(f"the source's name must be a non-empty str, got {name!r}")
        self._source = source
        self._key = key
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a callable, got {type(transform).__name__}")
        self._transform = transform
        self._start_offset = start_offset_of(source)
        self._windowing = Windowing.of(window, time, allowed_lateness, sink, late_sink)
        columns = getattr(source, "column_names", None)
        if columns is not None and transform is None:  # a transform may derive columns
            check_columns(self._required_columns(), columns, f"source {name!r}")
        self._fingerprint = self._fingerprint_of(self._given_key_type)
        self.checkpointer = ObjectStoreCheckpointer(
            store if store is not None else self._fingerprint.default_location(),
            CheckpointPaths(checkpoint_prefix),
        )
        # Sinks that keep things in the checkpoint store (CallableSink) do it under here,
        # beside the checkpoints (which pruning never looks past).
        self._sink_prefix = f"{self.checkpointer.paths.base_prefix}_sinks/"
        # The buffer each checkpoint captures the store into, and the one its commit packs
        # the capture into (both reused across checkpoints).
        self._capture_buffers: dict[str, bytearray] = {}
        self._packed_buffer = bytearray()
        # Held by run(), checkpoint() and recover(): one of them at a time, never nested.
        self._busy = threading.Lock()
        # Set by stop() (any thread, or a signal handler) and cleared when the run it ended
        # returns: the run ends at its next batch with a final checkpoint.
        self._stop_requested = threading.Event()
        self._closed = False
        self._discard_state()

    # -- definition ----------------------------------------------------------------------

    @property
    def source(self) -> Source:
        """Where the events come from."""
        return self._source

    @property
    def key(self) -> str:
        """The column events are grouped by."""
        return self._key

    @property
    def values(self) -> list[str]:
        """The columns aggregated per key."""
        return list(self._values)

    @property
    def partitions(self) -> int:
        """The number of partition threads."""
        return self._partitions

    @property
    def full_checkpoint_every(self) -> int:
        """Every this many checkpoints one is a full snapshot (the rest are deltas)."""
        return self._chain.full_every

    @property
    def nan_policy(self) -> NanPolicy:
        """What folding does with NaN values."""
        return self._nan_policy

    @property
    def key_type(self) -> KeyType | None:
        """The store key type: given, recovered, or inferred from the first keys (None
        until then)."""
        return self._key_type

    @property
    def window(self) -> Window | None:
        """The event-time window of a windowed job (None: running totals)."""
        return None if self._windowing is None else self._windowing.spec.window

    @property
    def fingerprint(self) -> JobFingerprint:
        """The job's definition as recorded in its checkpoints."""
        return self._fingerprint_of(self._key_type)

    def _fingerprint_of(self, key_type: KeyType | None) -> JobFingerprint:
        windowing = None if self._windowing is None else self._windowing.spec.fingerprint_fields()
        return JobFingerprint.of(
            self._source.name, self._key, self._values, key_type, self._nan_policy, windowing
        )

    def _required_columns(self) -> list[str]:
        """The columns every batch (through the transform) must hold."""
        time_column = [] if self._windowing is None else [self._windowing.spec.time]
        return [self._key, *self._values, *time_column]

    # -- state ---------------------------------------------------------------------------

    def _discard_state(self) -> None:
        """Forget everything in memory; the next run recovers from the store."""
        # One store holds every value column (one fold per partition per batch); a windowed
        # job's holds the partials of every open window.
        self._aggregates: _Store | None = None
        self._store_partitions = self._partitions
        self._key_groups = max(DEFAULT_KEY_GROUPS, self._partitions)  # a checkpoint's wins
        self._key_type: KeyType | None = self._given_key_type
        self._offset: Offset = self._start_offset
        self._committed_offset: Offset = self._start_offset
        self._epoch = 0
        self._unpruned_commits = 0  # commits since the last one that pruned
        self._chain.reset()  # a chain continues only from state in memory (or restored)
        self._recovered = False
        # Folded or restored partials sit in the partitions' local state until published;
        # results() publishes them first (see workers.py for why runs do not).
        self._unpublished = False
        self._recovered_epoch: int | None = None
        self._recovery_seconds = 0.0
        if self._windowing is not None:
            self._windowing.reset(self._partitions)

    @contextmanager
    def _exclusive(self, call: str) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise StreamStateError(
                f"{call}: this Pipeline is already running (run() in another thread, or a "
                "call from inside on_batch); a Pipeline runs one call at a time"
            )
        try:
            self._check_open(call)
            yield
        finally:
            self._busy.release()

    def _check_open(self, call: str) -> None:
        if self._closed:
            raise StreamStateError(
                f"{call}: this Pipeline is closed and its in-memory state is gone; create a "
                "new Pipeline on the same store to resume from its checkpoints"
            )

    def _new_store(self, key_type: KeyType, partitions: int) -> _Store:
        if self._windowing is not None:
            return self._windowing.new_store(key_type, partitions, self._nan_policy, self._values)
        return self._new_totals_store(key_type, partitions)

    def _new_totals_store(self, key_type: KeyType, partitions: int) -> NumericAggregateStore:
        return NumericAggregateStore(
            partitions, key_type, self._nan_policy, values=self._values, key_groups=self._key_groups
        )

    def _store_for(self, keys: npt.NDArray[Any] | None) -> _Store:
        """The store, created on first use with the key type the keys call for."""
        if self._aggregates is None:
            key_type = self._key_type
            if key_type is None and keys is None:
                keys = self._peek_keys(self._offset)
            if key_type is None:
                key_type = "int64" if keys is None else self._inferred_key_type(keys)
            self._key_type = key_type
            self._aggregates = self._new_store(key_type, self._store_partitions)
        return self._aggregates

    def _inferred_key_type(self, keys: npt.NDArray[Any]) -> KeyType:
        key_type = _key_type_of(keys)
        if key_type is None:
            raise SourceError(
                f"source {self._source.name!r}: key column {self._key!r} holds "
                f"{describe_keys(keys)} "
                "values; keys must be integers, str or bytes"
            )
        return key_type

    def _peek_keys(self, offset: Offset) -> Any:
        """The key column of one row at ``offset`` (through the transform), or None if the
        source has none there."""
        batch = self._source.read(offset, 1)
        if batch is None or len(batch) == 0:
            return None
        columns = self._transformed(batch, offset, [self._key])
        if len(columns[self._key]) == 0:
            return None
        return key_column(columns[self._key])

    def _transformed(
        self, batch: Batch, offset: Offset, required: Sequence[str]
    ) -> Mapping[str, Any]:
        """The batch's columns through the transform, checked (see :func:`transformed`)."""
        return transformed(self._transform, self._source.name, batch, offset, required)

    def recover(self) -> Offset:
        """Restore the newest valid checkpoint (once); return the offset to resume from.

        Raises :class:`~streamstate.IncompatibleCheckpointError`, before any state is
        restored, when that checkpoint was written by a job of another definition or by
        something other than a pipeline.
        """
        with self._exclusive("recover()"):
            return self._recover()

    def _recover(self) -> Offset:
        if self._recovered:
            return self._offset
        start = time.perf_counter()
        check_newest(self.checkpointer, self._fingerprint, self._start_offset)
        recovered = self.checkpointer.recover(rebuild=False)
        if recovered is not None:
            self._restore(recovered)
        if self._windowing is not None:  # the sinks settle on what was restored, or on none
            self._windowing.bind_sinks(self.checkpointer.store, self._sink_prefix)
            metadata = None if recovered is None else recovered.manifest.metadata
            self._windowing.recover_sinks(self._recovered_epoch, metadata)
        self._recovered = True
        self._recovery_seconds = time.perf_counter() - start
        return self._offset

    def _restore(self, recovered: RecoveredCheckpoint) -> None:
        """Check that ``recovered`` is this job's, then adopt its state (all or nothing)."""
        where = str(recovered.checkpoint_id)
        record, offset, snapshots, deltas = unpack_state(recovered, self._fingerprint, self._start_offset)
        recorded_type = None if record is None else record.fingerprint.get("key_type")
        if recorded_type is not None and recorded_type not in _KEY_TYPES:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} records key type {recorded_type!r}; this version of "
                f"streamstate knows {', '.join(map(repr, _KEY_TYPES))}"
            )
        key_type = self._given_key_type
        if key_type is None:
            keys = self._peek_keys(offset)
            inferred = None if keys is None else self._inferred_key_type(keys)
            if (
                inferred is not None
                and recorded_type is not None
                and not key_types_compatible(recorded_type, inferred)
            ):
                difference = (
                    f"key_type: checkpoint has {recorded_type!r}, this job has {inferred!r}"
                )
                raise IncompatibleCheckpointError(
                    f"checkpoint {where} was written by a different job ({difference}, "
                    f"inferred from the keys at offset {offset})",
                    (difference,),
                )
            key_type = inferred or cast("KeyType | None", recorded_type) or "int64"
        # The state restores into a store of the partition count it was taken with (a delta
        # applies to no other); another count now is a rescale: every key's partials move
        # into one slot of the partition it routes to now.
        chain_partitions = self._partitions if record is None else record.store_partitions
        recorded_groups = None if record is None else record.key_groups
        self._key_groups = recorded_groups or max(self._key_groups, chain_partitions)
        # Routing before key groups differs for a partition count that does not divide
        # them (a key in 256 moves for 3): such a state is rehomed as a rescale is.
        rescaled = chain_partitions != self._partitions or (
            recorded_groups is None and self._key_groups % chain_partitions != 0
        )
        store: _Store
        if self._windowing is not None:
            store = self._restored_window_store(
                recovered, key_type, chain_partitions, snapshots, deltas
            )
            migrated = False
            sectioned = False
        else:
            # A snapshot sectioned by key group (recorded key groups) with no delta after it
            # is read straight into the new partitions; anything else is rescaled once
            # restored.
            sectioned = rescaled and recorded_groups is not None and not deltas
            store, migrated = self._restored_store(
                where, key_type, self._partitions if sectioned else chain_partitions,
                snapshots, deltas, sectioned,
            )
        if rescaled and not sectioned:
            assert isinstance(store, NumericAggregateStore)  # a windowed one refused above
            store = store.repartitioned(self._partitions)
        self._aggregates = store
        self._unpublished = True
        self._key_type = key_type
        self._store_partitions = self._partitions
        self._offset = self._committed_offset = offset
        self._epoch = recovered.epoch
        self._recovered_epoch = recovered.epoch
        # The store's identity is the recovered checkpoint's, so the next checkpoint may be a
        # delta on it, unless the state moved into another store (or another layout).
        if not rescaled and not migrated:
            full_bytes, delta_bytes = state_chain_bytes(recovered)
            self._chain.resume(
                recovered.checkpoint_id, full_bytes, sum(delta_bytes), len(delta_bytes)
            )

    def _restored_window_store(
        self,
        recovered: RecoveredCheckpoint,
        key_type: KeyType,
        partitions: int,
        snapshots: dict[str, bytes],
        deltas: list[dict[str, bytes]],
    ) -> WindowedAggregateStore:
        """A windowed job's store (and watermark) restored from ``recovered``."""
        assert self._windowing is not None
        where = str(recovered.checkpoint_id)
        store = self._windowing.restorable_store(
            where, key_type, partitions, self._partitions, self._nan_policy, self._values,
            STORE_ENTRY in snapshots,
        )
        self._restore_chain(
            where, store, "the window store", snapshots[STORE_ENTRY],
            [delta[STORE_ENTRY] for delta in deltas],
        )
        self._windowing.restore(recovered.manifest.metadata, where)
        return store

    def _restored_store(
        self,
        where: str,
        key_type: KeyType,
        partitions: int,
        snapshots: dict[str, bytes],
        deltas: list[dict[str, bytes]],
        sectioned: bool = False,
    ) -> tuple[NumericAggregateStore, bool]:
        """A new store of ``partitions`` holding the checkpoint's full snapshot with its
        deltas applied in order, in place, by the store (no full state is rebuilt per
        delta), or (``sectioned``) the snapshot's keys at their owners among
        ``partitions`` (``restore_from``); and whether the checkpoint was of the older
        layout, one store per value column, whose state is then joined into the one
        store."""
        store = self._new_totals_store(key_type, partitions)
        if sectioned:
            try:
                store.restore_from([snapshots[STORE_ENTRY]])
            except CorruptDataError as exc:
                raise IncompatibleCheckpointError(
                    f"checkpoint {where}: the store's state does not restore into {partitions} "
                    f"partition(s): {exc}"
                ) from exc
            return store, False
        if STORE_ENTRY in snapshots:
            self._restore_chain(where, store, "the store", snapshots[STORE_ENTRY],
                                [delta[STORE_ENTRY] for delta in deltas])
            return store, False
        parts = []
        for metric in self._values:
            single = NumericAggregateStore(
                partitions, key_type, self._nan_policy, key_groups=self._key_groups
            )
            self._restore_chain(where, single, repr(metric), snapshots[metric],
                                [delta[metric] for delta in deltas])
            parts.append(single.snapshot())
        try:
            store.restore_columns(parts)
        except CorruptDataError as exc:
            raise IncompatibleCheckpointError(
                f"checkpoint {where}: the per-column states do not join into one store: {exc}"
            ) from exc
        return store, True

    @staticmethod
    def _restore_chain(
        where: str, store: _Store, what: str, full: bytes, deltas: list[bytes]
    ) -> None:
        try:
            store.restore(full)
        except CorruptDataError as exc:
            raise IncompatibleCheckpointError(
                f"checkpoint {where}: the state of {what} does not restore into a "
                f"{store.key_type} store of {store.num_partitions} partition(s): {exc}"
            ) from exc
        for number, delta in enumerate(deltas, 1):
            try:
                store.apply_delta(delta)
            except CorruptDataError as exc:
                raise CorruptDataError(
                    f"checkpoint {where}: delta {number} of {len(deltas)} of {what} "
                    f"does not apply to the state before it: {exc}"
                ) from exc

    def checkpoint(self) -> CheckpointStats:
        """Commit the current state and source offset now (recovering first if needed).

        Like a failed run, a failed commit discards the in-memory state: the next run
        resumes from the last committed checkpoint.
        """
        with self._exclusive("checkpoint()"):
            try:
                self._recover()
                return self._checkpoint()
            except BaseException:
                self._discard_state()
                raise

    def _checkpoint(self) -> CheckpointStats:
        return self._land(self._commit_in_background(time.perf_counter(), final=True))

    def _commit_in_background(
        self, started: float, *, final: bool = False, flush: bool = False
    ) -> CommitInFlight[CommitResult]:
        """Capture every store's state (the partitions are quiesced, and stay stopped only
        for this), then commit it on a background thread. The caller holds no commit in
        flight: the epoch and a delta's parent are those of the last commit that landed.
        A windowed job first emits its final windows (every open one with ``flush``), so
        the capture holds only what was not emitted."""
        store = self._store_for(None)
        output = None
        if self._windowing is not None:
            output = self._windowing.output(cast("WindowedAggregateStore", store), flush=flush)
        is_delta = self._chain.next_is_delta()
        captured: BytesLike
        if isinstance(store, NumericAggregateStore):
            # The capture's own buffer, uncopied; its memory (mapped already) goes to the
            # next capture once this commit has landed and dropped it.
            captured = store.capture(delta=is_delta)
        else:
            # Captured into a buffer reused from the last checkpoint (whose commit has
            # landed, so nothing reads it any more): its pages are mapped already, where a
            # new object of tens of MB would fault in every page during the stall.
            buffer = self._capture_buffers.setdefault(STORE_ENTRY, bytearray())
            try:
                store.snapshot_into(buffer, delta=is_delta)
            except BufferError:  # a failed commit's traceback may still hold a view of it
                buffer = self._capture_buffers[STORE_ENTRY] = bytearray()
                store.snapshot_into(buffer, delta=is_delta)
            captured = buffer
        snapshots: list[tuple[str, BytesLike]] = [(STORE_ENTRY, captured)]
        self._unpruned_commits += 1
        prune = final or self._unpruned_commits >= self.keep_checkpoints
        if prune:
            self._unpruned_commits = 0
        capture = Capture(
            epoch=self._epoch + 1,
            offset=self._offset,
            source=self._source.name,
            partitions=self._partitions,
            is_delta=is_delta,
            parent=self._chain.parent,
            snapshots=snapshots,
            record=JobRecord.encode(self.fingerprint, self._store_partitions, self._key_groups),
            started=started,
            stall_seconds=time.perf_counter() - started,
            packed=self._packed_buffer,
            prune=prune,
            output=output,
        )
        checkpointer, keep = self.checkpointer, self.keep_checkpoints
        return CommitInFlight(lambda: commit_capture(checkpointer, capture, keep))

    def _land(self, commit: CommitInFlight[CommitResult]) -> CheckpointStats:
        """Wait for ``commit``; once it landed, its epoch and offset are the committed ones.
        A failed commit raises here, and the caller discards the state: its capture reset
        the stores' change tracking, so no later delta could describe what it held."""
        stats, checkpoint_id = commit.result()
        # The epoch advances only once the commit has landed, so a failed commit can be
        # retried under the same epoch.
        self._epoch = stats.epoch
        self._committed_offset = stats.offset
        self._chain.committed(checkpoint_id, stats.is_delta, stats.bytes)
        if self._windowing is not None:  # the manifest is there: the rows may be seen
            self._windowing.landed()
        return stats

    # -- running -------------------------------------------------------------------------

    def run(
        self,
        max_batches: int | None = None,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> PipelineRun:
        """Process the source from the recovered offset to its end (or ``max_batches``, or
        :meth:`stop`).

        ``max_batches`` bounds the reads that returned a batch, empty ones included, so a
        run over an idle unbounded source ends too. ``on_batch`` is called with every batch
        that held events, after it was handed to the partitions.

        A run that reaches the end, or is stopped (:meth:`stop`, or SIGINT/SIGTERM while it
        runs in the main thread), commits a final checkpoint if anything changed since the
        last one. A run cut short by ``max_batches`` does not, which is how the demo
        simulates a crash: whatever was folded after the last checkpoint is lost with the
        process and replayed by the next. A run that fails (a partition, the source, or a
        background commit) discards the in-memory state, so the next run resumes from the
        last committed checkpoint. Every run returns, or raises, only once no commit of it
        is in flight.
        """
        if max_batches is not None:
            _positive_int("max_batches", max_batches, minimum=0)
        with self._exclusive("run()"), self._stopping_on_signals():
            try:
                return self._run(max_batches, on_batch)
            except BaseException:
                self._discard_state()
                raise
            finally:
                self._stop_requested.clear()

    def stop(self) -> None:
        """Ask the run in progress to end: it stops reading at its next batch (or idle poll),
        commits a final checkpoint if anything changed, and returns with ``stopped`` set.
        Safe from any thread and from signal handlers. A stop asked while no run is in
        progress ends the next run before its first read."""
        self._stop_requested.set()

    @contextmanager
    def _stopping_on_signals(self) -> Iterator[None]:
        """While a run goes on in the main thread, SIGINT and SIGTERM stop it (see
        :meth:`stop`); a second signal before it ended raises KeyboardInterrupt (the run
        fails, and the next resumes from the last checkpoint). The previous handlers come
        back when the run ends. Other threads cannot take signals: there, only stop()."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, _frame: object) -> None:
            if self._stop_requested.is_set():
                raise KeyboardInterrupt(f"signal {signum} again while stopping")
            self.stop()

        previous = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, handle)
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run(
        self, max_batches: int | None, on_batch: Callable[[Batch], None] | None
    ) -> PipelineRun:
        self._recover()
        report = PipelineRun(
            start_offset=self._offset,
            recovered_epoch=self._recovered_epoch,
            recovery_seconds=self._recovery_seconds,
        )
        started = time.perf_counter()
        required = self._required_columns()
        windowing = self._windowing
        late_before = 0 if windowing is None else windowing.late_events
        emitted_before = 0 if windowing is None else windowing.emitted_windows
        workers: list[PartitionWorker] | None = None
        since_checkpoint = 0
        idle_sleep = 0.0
        in_flight: CommitInFlight[CommitResult] | None = None

        def land() -> None:
            nonlocal in_flight
            if in_flight is not None:
                waited = time.perf_counter()
                commit, in_flight = in_flight, None
                report.checkpoints.append(self._land(commit))
                report.commit_wait_seconds += time.perf_counter() - waited

        try:
            while max_batches is None or report.batches + report.empty_batches < max_batches:
                if self._stop_requested.is_set():
                    report.stopped = True
                    break
                batch = self._source.read(self._offset, self.batch_size)
                if batch is None:
                    report.finished = True
                    break
                # With a transform the source's batch need not hold the key and values
                # (they may be derived), but every column it has must be of its length.
                checked = required if self._transform is None else list(batch.columns)
                next_offset = check_batch(batch, self._source.name, self._offset, checked)
                if next_offset == self._offset:
                    report.empty_batches += 1
                    idle_sleep = min(self.max_idle_sleep, 2 * idle_sleep or _FIRST_IDLE_SLEEP)
                    slept = time.perf_counter()
                    self._stop_requested.wait(idle_sleep)  # stop() cuts the pause short
                    report.idle_seconds += time.perf_counter() - slept
                    continue
                idle_sleep = 0.0
                columns = self._transformed(batch, self._offset, required)
                keys = key_column(columns[self._key])
                store = self._store_for(keys)
                self._check_keys(keys)
                if workers is None:
                    workers = [
                        PartitionWorker(p, store.partition(p)) for p in range(self._partitions)
                    ]
                self._dispatch(workers, keys, columns)
                self._unpublished = True
                report.events += len(batch)
                report.folded_events += len(keys)
                report.batches += 1
                self._offset = next_offset
                since_checkpoint += 1
                if on_batch is not None:
                    on_batch(batch)
                if in_flight is not None and in_flight.done():
                    land()  # a failed commit fails the run now, not at the next barrier
                if since_checkpoint >= self.checkpoint_every:
                    if in_flight is not None and self.defer_busy_checkpoints:
                        # Taken after the batch in which the commit in flight lands.
                        if since_checkpoint == self.checkpoint_every:
                            report.deferred_checkpoints += 1
                    else:
                        land()  # at most one in flight; a delta's parent must have landed
                        barrier = time.perf_counter()
                        quiesce(workers)
                        in_flight = self._commit_in_background(barrier)
                        since_checkpoint = 0
            barrier = time.perf_counter()
            if workers is not None:
                land()
                quiesce(workers)
            ended = report.finished or report.stopped
            # At the end of a bounded source every open window is emitted, even when no
            # batch came since the last checkpoint.
            flush = report.finished and windowing is not None and self._open_windows() > 0
            if ended and (since_checkpoint or flush):
                in_flight = self._commit_in_background(barrier, final=True, flush=flush)
            land()
            if ended and self._unpruned_commits and self.keep_checkpoints:
                self._unpruned_commits = 0
                self.checkpointer.prune(keep_last=self.keep_checkpoints)
        finally:
            if in_flight is not None:  # failing: a commit must not land behind the next run
                with suppress(BaseException):  # the run's own failure is what is raised
                    in_flight.result()
            if workers is not None:
                for worker in workers:
                    worker.stop()
        report.end_offset = self._offset
        report.seconds = time.perf_counter() - started
        if windowing is not None:
            report.late_events = windowing.late_events - late_before
            report.emitted_windows = windowing.emitted_windows - emitted_before
        return report

    def _open_windows(self) -> int:
        return 0 if self._aggregates is None else len(self._aggregates)

    def _check_keys(self, keys: Any) -> None:
        check_keys(keys, self._key_type, self._source.name, self._offset, self._key)

    def _dispatch(
        self, workers: Sequence[PartitionWorker], keys: Any, columns: Mapping[str, Any]
    ) -> None:
        values = value_columns(columns, self._values, self._source.name, self._offset)
        if self._windowing is not None:
            where = f"source {self._source.name!r}: the batch at offset {self._offset!r}"
            self._windowing.fold_batch(workers, keys, values, columns, where, self._key_groups)
            return
        # One C++ pass routes the keys and every value column, hashing each key once; each
        # partition's slice (keys, hashes, one value block) then goes to its worker in one
        # queue hand-off and is folded there in one call that reuses the hashes.
        routed = partition_batch(
            keys, self._partitions, *values, key_groups=self._key_groups, as_slices=True
        )
        for worker, part in zip(workers, routed, strict=True):
            if len(part):
                worker.fold_slice(part)

    # -- results -------------------------------------------------------------------------

    @property
    def offset(self) -> Offset:
        """The source offset everything before which is folded (a JSON value: the row
        number for :class:`ArraySource`)."""
        return self._offset

    @property
    def committed_offset(self) -> Offset:
        """The source offset of the last checkpoint committed or recovered: where a restart
        would resume."""
        return self._committed_offset

    @property
    def epoch(self) -> int:
        """The epoch of the last checkpoint committed or recovered."""
        return self._epoch

    def _store(self, metric: str, call: str) -> NumericAggregateStore:
        self._check_open(call)
        if self._windowing is not None:
            raise no_running_totals(call)
        if metric not in self._values:
            raise KeyError(f"{metric!r} is not one of the aggregated values {self._values}")
        if self._aggregates is None:  # nothing folded yet; do not fix the key type by asking
            return self._new_totals_store(self._key_type or "int64", 1)
        if self._unpublished:
            self._publish()
        assert isinstance(self._aggregates, NumericAggregateStore)
        return self._aggregates

    def _publish(self) -> None:
        """Publish every partition of the store, in parallel (the GIL is released), so the
        shared map the results read holds everything."""
        assert isinstance(self._aggregates, NumericAggregateStore)
        store = self._aggregates
        aggregators = [store.partition(p) for p in range(self._store_partitions)]
        if len(aggregators) == 1:
            aggregators[0].publish()
        else:
            with ThreadPoolExecutor(min(len(aggregators), self._partitions)) as pool:
                list(pool.map(lambda aggregator: aggregator.publish(), aggregators))
        self._unpublished = False

    def results(self, metric: str) -> StatResults:
        """Per-key statistics of ``metric`` merged across partitions (columnar).

        Raises :class:`~streamstate.StreamStateError` after :meth:`close`.
        """
        return self._store(metric, "results()").results(metric)

    def to_pandas(self, metric: str) -> pd.DataFrame:
        """``results(metric)`` as a pandas DataFrame indexed by key."""
        return self._store(metric, "to_pandas()").to_pandas(metric)

    def to_arrow(self, value: str | None = None) -> pa.Table:
        """``results(value)`` as a ``pyarrow.Table`` built from the core's buffers (see
        :meth:`NumericAggregateStore.to_arrow`). ``value`` may be left out when the job
        aggregates a single column. Needs pyarrow."""
        metric = self._value_or_only(value, "to_arrow()")
        return self._store(metric, "to_arrow()").to_arrow(metric)

    def to_polars(self, value: str | None = None) -> pl.DataFrame:
        """:meth:`to_arrow` as a Polars DataFrame (needs polars and pyarrow)."""
        metric = self._value_or_only(value, "to_polars()")
        return self._store(metric, "to_polars()").to_polars(metric)

    def _value_or_only(self, value: str | None, call: str) -> str:
        if value is not None:
            return value
        if len(self._values) != 1:
            raise ValueError(f"{call}: name one of the aggregated values {self._values}")
        return self._values[0]

    def close(self) -> None:
        """Drop the in-memory state (checkpoints stay in the store). Later calls raise."""
        if not self._busy.acquire(blocking=False):
            raise StreamStateError("close(): run() is in progress; close after it returns")
        try:
            self._closed = True
            self._aggregates = None
            self._capture_buffers = {}
            self._packed_buffer = bytearray()
        finally:
            self._busy.release()

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
            f"Pipeline(source={self._source.name!r}, key={self._key!r}, values={self._values}, "
            f"partitions={self._partitions}, offset={self._offset}, epoch={self._epoch}, "
            f"store={describe_store(self.checkpointer.store)}{state})"
        )
