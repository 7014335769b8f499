"""A windowed pipeline's machinery: the watermark, the late split, emission to sinks.

What makes a windowed job's output exactly-once and the same under every replay:

* **The watermark** is tracked by the coordinator from the time slices it routes: for each
  partition that has seen events, the greatest event time routed to it, less
  ``allowed_lateness``; the watermark is the least of those, and never moves back (a
  partition seeing its first events later cannot reopen windows already emitted). It is a
  pure function of the batches in order and the partition count, which is why a windowed
  job resumes only with the partition count it was checkpointed with.
* **The late split**: a batch is judged under the watermark as it stood *before* it. Rows
  whose every window has ended by then (:meth:`~streamstate.windows.Tumbling.late_mask`)
  are split off before routing: counted, and handed to ``late_sink`` as record batches of
  the batch's columns (through the ``transform``, if there is one); the rest are routed
  and folded under that same watermark, so the store never finds a late one.
* **Emission** happens at each checkpoint barrier, while the partitions are quiesced:
  every window that is final under the current watermark is emitted and freed, *then* the
  store is captured, so a checkpoint's state and its emitted rows are disjoint and
  complementary. A window ended under the watermark takes no event any more (a session
  included: an on-time event overlapping it opens one of its own), so what is emitted
  does not depend on when checkpoints happen. At the end of a bounded source every open
  window is emitted before the final checkpoint. The rows come as one batch per partition
  (written in parallel), each partition's windows by start and a window's keys in the
  order first folded: not sorted, since a sink replaces an epoch's rows whole on recovery,
  but the same on every replay (a restored store keeps its windows' key order).
* **Staging and publishing**: the commit thread stages the epoch's rows in each sink
  (``Sink.stage``) before the manifest is written and records what staging returned in
  the manifest's metadata (``metadata["sinks"]``), next to the watermark state
  (``metadata["windows"]``); once the manifest landed, the coordinator publishes them.
  Recovery restores the window store and the watermark state from the checkpoint, then
  lets every sink settle (``Sink.recover``): re-publish the recovered epoch, drop staged
  rows of epochs that never committed and published rows of epochs rolled back.

Event times travel with the keys through routing as one more column, int64 as they are
(the router moves each column in its own dtype): no conversion on the coordinator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import IncompatibleCheckpointError, SourceError, StreamStateError
from ..windows import Window, event_times, parse_duration
from .routing import partition_batch

if TYPE_CHECKING:
    import pyarrow as pa

    from ..sinks import Sink
    from ..window_store import WindowedAggregateStore
    from .workers import PartitionWorker

__all__ = [
    "NO_WATERMARK",
    "EpochOutput",
    "Watermark",
    "WindowSlice",
    "WindowSpec",
    "Windowing",
    "as_sink",
    "check_resumable",
    "emit_final",
    "no_running_totals",
]

#: The watermark before any event was seen: no window has ended.
NO_WATERMARK = -(2**63)

#: The manifest metadata keys a windowed job writes.
SINKS_METADATA = "sinks"
WINDOWS_METADATA = "windows"

#: One partition's share of a routed batch: its keys, its rows of each value column, and
#: their event times (exact float64 milliseconds).
WindowSlice = tuple[Any, list[npt.NDArray[np.float64]], npt.NDArray[np.int64]]


def check_resumable(where: str, recorded_partitions: int, partitions: int) -> None:
    """Refuse to resume windowed checkpoint ``where`` at another partition count."""
    if recorded_partitions != partitions:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} was written by this windowed job with "
            f"{recorded_partitions} partitions; it resumes only with that many, not "
            f"{partitions} (the watermark, and so which events are late, depends on the "
            "partitioning)"
        )


def no_running_totals(call: str) -> StreamStateError:
    """The error of a results reader called on a windowed job."""
    return StreamStateError(
        f"{call}: a windowed pipeline keeps no running totals; its windows go to its sink "
        "as they close (read them there, e.g. the ParquetSink's dataset)"
    )


def emit_final(
    store: WindowedAggregateStore, watermark: int, *, flush: bool
) -> list[pa.RecordBatch]:
    """Emit (and free) every window of ``store`` final under ``watermark``, or with
    ``flush`` (the source ended) every open one: what a barrier emits, one batch per
    partition that had any.

    Each key is routed to one partition, so the partitions' rows need no merge, and they
    come in no sorted order (written in parallel): a sink's rows of an epoch are replaced
    whole on recovery, so exactly-once needs no order, and the rows of an epoch depend
    only on the batches folded, so a replay gives the same ones."""
    emitted = store.emit_all_partitions_arrow() if flush else store.emit_partitions_arrow(watermark)
    return [batch for batch in emitted if batch.num_rows]


@dataclass(frozen=True)
class WindowSpec:
    """A windowed job's definition: the time column, the window, the allowed lateness (ms)."""

    time: str
    window: Window
    allowed_lateness: int

    @classmethod
    def of(cls, time: object, window: object, allowed_lateness: object) -> WindowSpec:
        """Check and normalise ``Pipeline``'s ``time``, ``window`` and ``allowed_lateness``."""
        from ..windows import Hopping, Session, Tumbling

        if not isinstance(window, Tumbling | Hopping | Session):
            raise TypeError(
                "window must be a streamstate.windows.Tumbling, Hopping or Session, got "
                f"{type(window).__name__}"
            )
        if not isinstance(time, str) or not time:
            raise TypeError(
                f"a windowed Pipeline needs time= naming its event-time column, got {time!r}"
            )
        return cls(time, window, parse_duration(allowed_lateness, "allowed_lateness"))

    def fingerprint_fields(self) -> dict[str, Any]:
        """What the job fingerprint records of the windowing."""
        return {
            "time": self.time,
            "window": self.window.as_dict(),
            "allowed_lateness": self.allowed_lateness,
        }

    def new_store(
        self, key_type: str, partitions: int, nan_policy: str, values: Sequence[str]
    ) -> WindowedAggregateStore:
        """An empty window store for this job (the spec pickles: Ray workers build theirs
        with it)."""
        from ..window_store import WindowedAggregateStore

        return WindowedAggregateStore(
            partitions,
            key_type=key_type,  # type: ignore[arg-type]
            values=list(values),
            nan_policy=nan_policy,  # type: ignore[arg-type]
            **self.window.store_arguments(),
        )


class Watermark:
    """The coordinator's watermark: per partition, the greatest event time routed to it.

    ``value`` is the least of those, less the allowed lateness, over the partitions that
    have seen events, and never decreases; :data:`NO_WATERMARK` until one has.
    """

    def __init__(self, partitions: int, allowed_lateness: int) -> None:
        self.allowed_lateness = allowed_lateness
        self.partition_max: list[int | None] = [None] * partitions
        self.value = NO_WATERMARK

    def observe(self, partition: int, max_time: int) -> None:
        """``max_time`` is the greatest time of a slice just routed to ``partition``."""
        current = self.partition_max[partition]
        if current is None or max_time > current:
            self.partition_max[partition] = max_time

    def advance(self) -> None:
        """Recompute the watermark after a batch was routed."""
        seen = [t for t in self.partition_max if t is not None]
        if seen:
            self.value = max(self.value, min(seen) - self.allowed_lateness)

    def state(self) -> dict[str, Any]:
        """The watermark as JSON, for the checkpoint's metadata."""
        return {"watermark": self.value, "partition_max": list(self.partition_max)}

    def restore(self, state: Mapping[str, Any], where: str) -> None:
        """Adopt a checkpoint's :meth:`state`; refuse one of another partition count."""
        value, maxima = state.get("watermark"), state.get("partition_max")
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not isinstance(maxima, list)
            or not all(m is None or _is_int(m) for m in maxima)
        ):
            raise IncompatibleCheckpointError(
                f"checkpoint {where}: its window watermark state {dict(state)!r} is not one a "
                "pipeline writes"
            )
        if len(maxima) != len(self.partition_max):  # the store's count was checked first
            raise IncompatibleCheckpointError(
                f"checkpoint {where}: its window watermark covers {len(maxima)} partitions, "
                f"its store {len(self.partition_max)}"
            )
        self.value = value
        self.partition_max = [None if m is None else int(m) for m in maxima]

    def __repr__(self) -> str:
        shown = "none" if self.value == NO_WATERMARK else str(self.value)
        return f"Watermark(value={shown}, partition_max={self.partition_max})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_sink(sink: object, name: str) -> Sink:
    """``sink`` as a :class:`~streamstate.sinks.Sink`: a sink as it is, a plain callable
    wrapped in :class:`~streamstate.sinks.CallableSink` (at-least-once)."""
    from ..sinks import CallableSink, Sink

    if isinstance(sink, Sink):
        return sink
    if callable(sink):
        return CallableSink(sink)
    raise TypeError(
        f"{name} must be a streamstate.sinks.Sink (e.g. ParquetSink) or a callable taking a "
        f"pyarrow.RecordBatch, got {type(sink).__name__}"
    )


def _take(column: Any, rows: npt.NDArray[np.bool_]) -> Any:
    """The ``rows`` of one column (numpy, Arrow or a sequence) as an Arrow array."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.Array):
        return column.filter(pa.array(rows))
    return pa.array(np.asarray(column)[rows])


def _record_batch(columns: Mapping[str, Any], rows: npt.NDArray[np.bool_]) -> pa.RecordBatch:
    import pyarrow as pa

    return pa.record_batch({name: _take(column, rows) for name, column in columns.items()})


class EpochOutput:
    """The rows one checkpoint emits (windows, late events) on their way to the sinks.

    Staged on the commit thread (:meth:`stage`, before the manifest), published by the
    coordinator once it landed (:meth:`publish`).
    """

    def __init__(
        self,
        sinks: Mapping[str, Sink],
        batches: Mapping[str, list[pa.RecordBatch]],
        windows_state: dict[str, Any],
    ) -> None:
        self._sinks = dict(sinks)
        self._batches = dict(batches)
        self._windows_state = windows_state
        self._staged: dict[str, Any] | None = None
        self._epoch: int | None = None

    def add_rows(self, name: str, batch: pa.RecordBatch) -> None:
        """Add ``batch`` to the rows for sink ``name`` (before :meth:`stage`)."""
        if batch.num_rows:
            self._batches.setdefault(name, []).append(batch)

    @property
    def rows(self) -> dict[str, int]:
        """Rows per sink name."""
        return {name: sum(b.num_rows for b in batches) for name, batches in self._batches.items()}

    def stage(self, epoch: int) -> dict[str, Any]:
        """Stage every sink's rows of ``epoch``; the manifest metadata to record."""
        staged = {
            name: sink.stage(epoch, self._batches.get(name, []))
            for name, sink in self._sinks.items()
        }
        self._staged, self._epoch = staged, epoch
        return {SINKS_METADATA: staged, WINDOWS_METADATA: self._windows_state}

    def publish(self) -> None:
        """Make the staged rows visible (after the manifest landed)."""
        if self._staged is None or self._epoch is None:
            return  # the commit failed before staging; nothing to publish
        for name, sink in self._sinks.items():
            sink.publish(self._epoch, self._staged[name])

    def __repr__(self) -> str:
        return f"EpochOutput(epoch={self._epoch}, rows={self.rows})"


class Windowing:
    """One windowed pipeline's window machinery (see the module docstring).

    Owned by the :class:`~streamstate.Pipeline`, which calls it at a few points: when it
    creates or restores the store, per batch (:meth:`fold_batch`), at each capture
    (:meth:`output`), when a commit landed (:meth:`landed`) and when it recovers
    (:meth:`restore`, :meth:`recover_sinks`). A :class:`~streamstate.ray.RayPipeline`
    drives the same object with its stores in other processes: :meth:`route` per batch,
    and at each barrier :meth:`barrier`, then :meth:`add_windows` with what the workers
    emitted (:func:`emit_final`).
    """

    @classmethod
    def of(
        cls,
        window: Window | None,
        time: object,
        allowed_lateness: object,
        sink: object,
        late_sink: object,
    ) -> Windowing | None:
        """A windowed job's machinery from ``Pipeline``'s arguments, or None for a job of
        running totals (which takes none of them)."""
        if window is None:
            given = [
                name
                for name, value in (("time", time), ("sink", sink), ("late_sink", late_sink))
                if value is not None
            ]
            if allowed_lateness not in (0, None):
                given.append("allowed_lateness")
            if given:
                names = ", ".join(f"{name}=" for name in given)
                raise ValueError(f"{names} only apply to a windowed Pipeline: give window= too")
            return None
        if sink is None:
            raise ValueError(
                "a windowed Pipeline needs sink= (e.g. streamstate.sinks.ParquetSink, or a "
                "callable taking a pyarrow.RecordBatch): its windows go there as they close"
            )
        return cls(WindowSpec.of(time, window, allowed_lateness), sink, late_sink)

    def __init__(self, spec: WindowSpec, sink: object, late_sink: object) -> None:
        self.spec = spec
        self.sinks: dict[str, Sink] = {}
        if sink is not None:
            self.sinks["sink"] = as_sink(sink, "sink")
        if late_sink is not None:
            self.sinks["late_sink"] = as_sink(late_sink, "late_sink")
        self._bound = False
        self.late_events = 0  # since the pipeline was built (runs diff it)
        self.emitted_windows = 0
        self.reset(1)

    def reset(self, partitions: int) -> None:
        """Forget the runtime state (the pipeline discards its state or restores it)."""
        self.watermark = Watermark(partitions, self.spec.allowed_lateness)
        self.is_datetime: bool | None = None  # learned from the first batch (or checkpoint)
        self._late: list[pa.RecordBatch] = []
        self._in_flight: EpochOutput | None = None

    def new_store(
        self, key_type: str, partitions: int, nan_policy: str, values: Sequence[str]
    ) -> WindowedAggregateStore:
        """An empty window store for this job."""
        return self.spec.new_store(key_type, partitions, nan_policy, values)

    def restorable_store(
        self,
        where: str,
        key_type: str,
        recorded_partitions: int,
        partitions: int,
        nan_policy: str,
        values: Sequence[str],
        one_store: bool,
    ) -> WindowedAggregateStore:
        """An empty store to restore checkpoint ``where`` into, once it is clear that it
        can be: taken with this job's partition count, as one store."""
        check_resumable(where, recorded_partitions, partitions)
        if not one_store:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} holds per-column state; a windowed job writes one store"
            )
        return self.new_store(key_type, partitions, nan_policy, values)

    # -- per batch -----------------------------------------------------------------------

    def route(
        self,
        keys: Any,
        values: list[npt.NDArray[np.float64]],
        columns: Mapping[str, Any],
        where: str,
        partitions: int,
        key_groups: int,
    ) -> tuple[int, list[WindowSlice]]:
        """Split the batch's late rows off under the watermark before it and route the rest
        with their times; then move the watermark on. Returns the watermark the slices
        fold under and every partition's ``(keys, value columns, times)`` (no slices at
        all when every row was late)."""
        if self.spec.time not in columns:
            raise SourceError(
                f"{where} has no time column {self.spec.time!r}; it has {sorted(columns)}"
            )
        times, is_datetime = event_times(columns[self.spec.time], self.spec.time, where)
        if len(times) != len(keys):
            raise SourceError(
                f"{where}: time column {self.spec.time!r} has {len(times)} rows, the key "
                f"column {len(keys)}"
            )
        if self.is_datetime is None:
            self.is_datetime = is_datetime
        elif self.is_datetime != is_datetime:
            kinds = {True: "datetime64", False: "epoch milliseconds"}
            raise SourceError(
                f"{where}: time column {self.spec.time!r} holds {kinds[is_datetime]}, earlier "
                f"batches of this job {kinds[self.is_datetime]}"
            )
        watermark = self.watermark.value
        # Lateness grows as times fall (every window rule is monotone in t), so a batch
        # whose earliest event is on time has no late one: one test, not a pass of masks.
        if len(times) and self.spec.window.late_mask(times.min(keepdims=True), watermark)[0]:
            late = self.spec.window.late_mask(times, watermark)
            if "late_sink" in self.sinks:
                self._late.append(_record_batch(columns, late))
            self.late_events += int(np.count_nonzero(late))
            on_time = ~late
            keys = _filter_keys(keys, on_time)
            values = [v[on_time] for v in values]
            times = times[on_time]
        if len(times) == 0:
            return watermark, []
        routed = partition_batch(keys, partitions, *values, times, key_groups=key_groups)
        slices: list[WindowSlice] = []
        for p, (part_keys, *part_values, part_times) in enumerate(routed):
            if len(part_keys):
                self.watermark.observe(p, int(part_times.max()))
            slices.append((part_keys, part_values, part_times))
        self.watermark.advance()
        return watermark, slices

    def fold_batch(
        self,
        workers: Sequence[PartitionWorker],
        keys: Any,
        values: list[npt.NDArray[np.float64]],
        columns: Mapping[str, Any],
        where: str,
        key_groups: int,
    ) -> None:
        """:meth:`route` the batch and queue each partition's slice to its worker thread,
        to fold under the watermark before the batch."""
        watermark, slices = self.route(keys, values, columns, where, len(workers), key_groups)
        for p, (part_keys, part_values, part_times) in enumerate(slices):
            if len(part_keys):
                workers[p].fold(part_keys, part_values, part_times, watermark)

    # -- at a barrier --------------------------------------------------------------------

    def output(self, store: WindowedAggregateStore, *, flush: bool) -> EpochOutput:
        """Emit every final window (every open one with ``flush``: the source ended) and
        take the late rows gathered since the last capture: the checkpoint's output. Call
        with the partitions quiesced, before the store is captured."""
        output = self.barrier()
        self.add_windows(output, emit_final(store, self.watermark.value, flush=flush))
        return output

    def barrier(self) -> EpochOutput:
        """The output of the checkpoint whose barrier this is, its windows aside: the late
        rows gathered since the last barrier and the watermark state now. The windows
        follow with :meth:`add_windows` before it is staged (from stores elsewhere, such
        as Ray workers', each emitting with :func:`emit_final` at this barrier)."""
        output = EpochOutput(self.sinks, {"sink": [], "late_sink": self._late}, self.state())
        self._late = []
        self._in_flight = output
        return output

    def add_windows(self, output: EpochOutput, emitted: Sequence[pa.RecordBatch]) -> None:
        """Add to ``output`` the windows its barrier emitted (:func:`emit_final`'s batches,
        of stores or partitions holding disjoint keys, in partition order)."""
        for batch in emitted:
            output.add_rows("sink", self.emitted_batch(batch))

    def state(self) -> dict[str, Any]:
        """The window state the manifest records: the watermark and the time kind."""
        return {**self.watermark.state(), "datetime": self.is_datetime}

    def emitted_batch(self, emitted: pa.RecordBatch) -> pa.RecordBatch:
        """The store's emitted batch (``key``, ``window_start``, ``window_end`` in int64
        ms, then the statistics of each value column) with its bounds as
        ``timestamp[ms]`` when the time column held datetimes (a cast of the same
        buffers)."""
        if not self.is_datetime:
            return emitted
        import pyarrow as pa

        columns = list(emitted.columns)
        for bound in ("window_start", "window_end"):
            i = emitted.schema.get_field_index(bound)
            columns[i] = columns[i].cast(pa.timestamp("ms"))
        return pa.RecordBatch.from_arrays(columns, names=emitted.schema.names)

    def landed(self) -> None:
        """The commit of the output in flight landed: publish it."""
        output, self._in_flight = self._in_flight, None
        if output is not None:
            output.publish()
            self.emitted_windows += output.rows.get("sink", 0)

    # -- recovery ------------------------------------------------------------------------

    def restore(self, metadata: Mapping[str, Any], where: str) -> None:
        """Adopt the watermark state of a recovered checkpoint's ``metadata``."""
        state = metadata.get(WINDOWS_METADATA)
        if not isinstance(state, Mapping):
            raise IncompatibleCheckpointError(
                f"checkpoint {where} records no window watermark state; it was not written "
                "by a windowed pipeline"
            )
        self.watermark.restore(state, where)
        is_datetime = state.get("datetime")
        self.is_datetime = is_datetime if isinstance(is_datetime, bool) else None

    def bind_sinks(self, store: Any, prefix: str) -> None:
        """Give each sink that asks (``bind``) the checkpoint store and a prefix of its own;
        once per pipeline."""
        if self._bound:
            return
        for name, sink in self.sinks.items():
            bind: Callable[[Any, str], None] | None = getattr(sink, "bind", None)
            if bind is not None:
                bind(store, f"{prefix}{name}/")
        self._bound = True

    def recover_sinks(self, epoch: int | None, metadata: Mapping[str, Any] | None) -> None:
        """Let every sink settle on the recovered checkpoint (``epoch`` and the staging it
        recorded), or on none (``None``: starting fresh)."""
        recorded = {} if metadata is None else metadata.get(SINKS_METADATA) or {}
        for name, sink in self.sinks.items():
            if epoch is None:
                sink.recover(None, None)
            else:
                sink.recover(epoch, recorded.get(name))

    def __repr__(self) -> str:
        return (
            f"Windowing(time={self.spec.time!r}, window={self.spec.window!r}, "
            f"allowed_lateness={self.spec.allowed_lateness} ms, sinks={sorted(self.sinks)}, "
            f"{self.watermark!r})"
        )


def _filter_keys(keys: Any, rows: npt.NDArray[np.bool_]) -> Any:
    if isinstance(keys, np.ndarray):
        return keys[rows]
    import pyarrow as pa

    return keys.filter(pa.array(rows))

