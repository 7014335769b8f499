"""Partition-local aggregates per (key, event-time window), emitted once the watermark passes.

:class:`WindowedAggregateStore` keeps, for every partition, the numeric partials (count,
sum, min, max, mean, sample variance; those of :class:`~streamstate.NumericAggregateStore`)
of every ``(key, window)`` the partition folded. ``emit(watermark)`` hands out every
window whose end is at or before the watermark, across partitions, as columns sorted by
``(window_end, window_start, key)``, and frees them; ``emit_all()`` hands out every open
window (the end of a bounded stream). ``emit_arrow`` / ``emit_all_arrow`` give the same
rows as a ``pyarrow.RecordBatch`` over the core's buffers. ``emit_partitions`` (and its
``_arrow`` and ``_all`` forms) skip the sort and the cross-partition merge: one batch per
partition, written in parallel, for callers that route each key to one partition.

Windows, in int64 epoch milliseconds, aligned to the epoch:

- ``kind="tumbling", size=S``: ``[floor(t / S) * S, + S)``, one window an event.
- ``kind="hopping", size=S, step=P``: every ``[k * P, k * P + S)`` holding ``t``; ``S``
  must be a multiple of ``P`` (so each event is in exactly ``S / P`` windows, at most
  4096), and ``P <= S``.
- ``kind="session", gap=G``: an event opens ``[t, t + G)``; a key's overlapping open
  sessions merge into ``[first, last + G)``. An event exactly ``G`` after the last one
  starts a new session. Sessions merge within a partition only, so route each key to
  one partition.

A window whose end is ``<= watermark`` is closed: events are no longer folded into it,
whether or not it was emitted yet. An event all of whose windows are closed is late:
``fold`` counts it and folds it nowhere. The store also remembers the highest watermark
``emit`` was given (:attr:`~WindowedAggregateStore.closed_through`) and folds never reopen
the windows it closed, so no window is emitted twice. The watermark is therefore part of
the state: snapshots carry it.

Captures follow :class:`~streamstate.NumericAggregateStore`: ``snapshot()`` /
``restore(data)``; ``snapshot_delta()`` / ``apply_delta(data)`` carry only the windows
changed or emitted since the previous capture and name their parent; corrupt or foreign
bytes raise :class:`~streamstate.CorruptDataError` and leave the store as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from . import _core
from .stats import ResultKeyType, _arrow_keys, _arrow_numeric, list_key_format, require_modules

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["NanPolicy", "WindowColumns", "WindowKind", "WindowPartition", "WindowedAggregateStore"]

#: The three window shapes.
WindowKind = Literal["tumbling", "hopping", "session"]
#: What a fold does with NaN values (see :class:`~streamstate.NumericAggregateStore`).
NanPolicy = Literal["skip", "propagate", "raise"]
#: Emitted rows as columns: ``"key"`` (an int64 array, or a list of ``bytes`` / ``str`` by
#: ``key_type``), ``"window_start"`` and ``"window_end"`` (int64 arrays, milliseconds), then
#: for each value column ``v`` (its name, or ``"value"`` for the one unnamed column)
#: ``v_count`` (int64) and ``v_sum``, ``v_min``, ``v_max``, ``v_mean``, ``v_var`` (ddof=1,
#: NaN below two values) and ``v_std`` (float64 arrays).
WindowColumns = dict[str, Any]

#: A partition's single-writer fold; get one from :meth:`WindowedAggregateStore.partition`.
#: ``fold(keys, times, values, *, watermark)`` folds a batch with the GIL released and
#: returns how many events were late; ``open_windows`` counts the partition's
#: ``(key, window)`` pairs.
WindowPartition = _core.WindowPartition


class WindowedAggregateStore(_core.WindowedAggregateStore):
    """Numeric partials per ``(key, window)``, folded per partition, emitted by watermark.

    Args:
        num_partitions: how many partitions fold into the store (1 to 65536), one writer
            thread each; emit, snapshot and restore take every partition's lock.
        kind: ``"tumbling"``, ``"hopping"`` or ``"session"``.
        size: window length in milliseconds (tumbling and hopping; > 0).
        step: milliseconds between window starts (hopping: ``0 < step <= size`` and
            ``size % step == 0``; tumbling: 0 or ``size``).
        gap: session inactivity gap in milliseconds (session; > 0).
        key_type: ``"bytes"`` (default; keys as NumericAggregateStore takes them, handed
            back as ``bytes``), ``"str"`` (the same keys handed back as ``str``) or
            ``"int64"``.
        values: the value columns' names, or ``None`` (default) for one unnamed column
            (emitted as ``value_count``, ``value_sum``, ...).
        nan_policy: ``"skip"`` (default; each value column skips its own NaN; a row whose
            values are all NaN folds nothing), ``"propagate"`` or ``"raise"``.

    Bad arguments raise ``TypeError`` (wrong type) or ``ValueError`` (a rule above).
    """

    __slots__ = ("_text_keys",)

    def __init__(
        self,
        num_partitions: int,
        *,
        kind: WindowKind,
        size: int = 0,
        step: int = 0,
        gap: int = 0,
        key_type: ResultKeyType = "bytes",
        values: Sequence[str] | None = None,
        nan_policy: NanPolicy = "skip",
    ) -> None:
        # Lists and tuples of names; anything else reaches the core, which names the type.
        names = list(values) if isinstance(values, (list, tuple)) else cast("list[str] | None", values)
        super().__init__(
            num_partitions,
            kind=kind,
            size=size,
            step=step,
            gap=gap,
            key_type="bytes" if key_type == "str" else key_type,
            values=names,
            nan_policy=nan_policy,
        )
        self._text_keys = key_type == "str"

    @property
    def key_type(self) -> ResultKeyType:
        """``"int64"``, ``"bytes"`` or ``"str"``."""
        core = super().key_type  # first: refuses an uninitialised instance
        return "str" if self._text_keys else cast(ResultKeyType, core)

    @property
    def columns(self) -> list[str]:
        """The value columns' names (``[]`` for the one unnamed column)."""
        return self.values or []

    def emit(self, watermark: int) -> WindowColumns:
        """Every window whose end is ``<= watermark``, across partitions, removed from the
        state, as :data:`WindowColumns` sorted by ``(window_end, window_start, key)``.

        A key folded for the same window by several partitions gives one row, its partials
        merged. ``watermark`` becomes :attr:`closed_through` if it is higher.
        """
        return self._emit(watermark, list_key_format(self.key_type))

    def emit_all(self) -> WindowColumns:
        """Every open window, as :meth:`emit` gives them (the end of a bounded stream);
        :attr:`closed_through` is unchanged."""
        return self._emit_all(list_key_format(self.key_type))

    def emit_arrow(self, watermark: int) -> pa.RecordBatch:
        """:meth:`emit` as a ``pyarrow.RecordBatch`` over the core's buffers, without
        copying them (needs pyarrow): ``key`` int64, ``binary`` or ``string`` by
        ``key_type`` (``large_*`` past 2 GiB of keys), ``window_start`` and ``window_end``
        int64 milliseconds, the counts int64 and the other statistics float64."""
        require_modules("emit_arrow()", "pyarrow")
        return self._batch(self._emit(watermark, "arrow"))

    def emit_all_arrow(self) -> pa.RecordBatch:
        """:meth:`emit_all` as :meth:`emit_arrow` gives it."""
        require_modules("emit_all_arrow()", "pyarrow")
        return self._batch(self._emit_all("arrow"))

    def emit_partitions(self, watermark: int) -> list[WindowColumns]:
        """:meth:`emit`'s windows without the sort and the merge: one :data:`WindowColumns`
        per partition, the partitions written in parallel.

        A partition's rows come window by window (by start), a window's keys in the order
        the partition first folded (or restored) them (session windows: by ``(window_end,
        window_start, key)``), so they depend only on what was folded, in what order,
        through snapshots and restores too. A key folded for one window in several partitions gives a
        row in each partition's columns: emit this way when each key is routed to one
        partition (a pipeline routes them so). The store is left as :meth:`emit` leaves it.
        """
        return self._emit_partitions(watermark, list_key_format(self.key_type))

    def emit_all_partitions(self) -> list[WindowColumns]:
        """:meth:`emit_all` as :meth:`emit_partitions` gives it."""
        return self._emit_all_partitions(list_key_format(self.key_type))

    def emit_partitions_arrow(self, watermark: int) -> list[pa.RecordBatch]:
        """:meth:`emit_partitions` as one ``pyarrow.RecordBatch`` per partition, as
        :meth:`emit_arrow` gives them (over the core's buffers)."""
        require_modules("emit_partitions_arrow()", "pyarrow")
        return [self._batch(part) for part in self._emit_partitions(watermark, "arrow")]

    def emit_all_partitions_arrow(self) -> list[pa.RecordBatch]:
        """:meth:`emit_all_partitions` as :meth:`emit_partitions_arrow` gives it."""
        require_modules("emit_all_partitions_arrow()", "pyarrow")
        return [self._batch(part) for part in self._emit_all_partitions("arrow")]

    def _batch(self, columns: WindowColumns) -> pa.RecordBatch:
        import pyarrow as pa

        arrays = [_arrow_keys(pa, columns["key"], self.key_type)]
        arrays += [_arrow_numeric(pa, column) for name, column in columns.items() if name != "key"]
        return pa.RecordBatch.from_arrays(arrays, names=list(columns))

    def __repr__(self) -> str:
        shape = {
            "tumbling": f"size={self.size}",
            "hopping": f"size={self.size}, step={self.step}",
            "session": f"gap={self.gap}",
        }[self.kind]
        values = f", values={self.columns!r}" if self.values is not None else ""
        return (
            f"WindowedAggregateStore(num_partitions={self.num_partitions}, kind={self.kind!r}, "
            f"{shape}, key_type={self.key_type!r}{values}, nan_policy={self.nan_policy!r}, "
            f"open_windows={self.open_windows})"
        )
