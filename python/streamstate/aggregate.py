"""Cross-partition aggregate stores: partition-local folding, publication, merged reads.

Each partition (typically one Python thread) folds its own events into per-key partial
aggregates without contention, then publishes them to a shared oneTBB
``concurrent_hash_map``; readers merge the partials across partitions on demand.

- :class:`AggregateStore` holds opaque partials (bytes) under ``(group_key, partition_id)``;
  the caller serialises and merges them.
- :class:`NumericAggregateStore` holds typed partials (count, sum, min, max, mean, sample
  variance) and merges them in C++; :meth:`NumericAggregateStore.partition` hands out the
  single-writer :class:`PartitionAggregator` that folds numpy batches with the GIL released.

Both snapshot consistently while other threads publish (every ``publish_many`` or
``PartitionAggregator.publish`` call is in a snapshot or delta entirely or not at all),
take incremental captures (``snapshot_delta()`` / ``apply_delta()``) and restore
atomically: bad input raises :class:`~streamstate.CorruptDataError` and leaves the store as
it was.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from . import _core
from ._typing import BytesLike
from .stats import (
    ResultKeyType,
    StatResults,
    Stats,
    columns_to_arrow,
    columns_to_pandas,
    columns_to_polars,
    list_key_format,
    multi_columns_to_arrow,
    multi_columns_to_pandas,
    present_rows,
)

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

__all__ = ["AggregateStore", "KeyType", "NanPolicy", "NumericAggregateStore", "PartitionAggregator"]

#: Key flavours of :class:`NumericAggregateStore`: ``"str"`` keys are held as their UTF-8
#: bytes, like ``"bytes"``, and come back as ``str`` (Arrow ``string``).
KeyType = ResultKeyType
#: What a fold does with NaN values: ignore the row, let it poison the key's statistics,
#: or reject the whole batch before folding any of it.
NanPolicy = Literal["skip", "propagate", "raise"]

#: A partition's single-writer local accumulator; get one from
#: :meth:`NumericAggregateStore.partition`. ``fold(keys, values)`` folds a batch (GIL
#: released; ``values`` a 1-D float64 array for one value column, an ``(n, M)`` array or a
#: mapping ``{name: array}`` for M named ones), ``publish()`` pushes the partials changed since the last publish and returns
#: how many; ``len()`` is the number of keys held locally and ``pending`` how many changed
#: since the last publish. As a context manager it publishes on a clean exit.
PartitionAggregator = _core.PartitionAggregator


class AggregateStore(_core.AggregateStore):
    """Opaque partial aggregates published by partitions under ``(group_key, partition_id)``.

    ``AggregateStore(num_partitions)``. ``publish(group_key, partition_id, partial)``
    overwrites that partition's previous partial; ``publish_many(partition_id, keys,
    partials)`` publishes a whole batch in one call with the GIL released, so several
    threads publish in parallel. ``get_partial``, ``collect_partials`` (ascending partition
    id), ``remove_group``, ``groups()`` (sorted), ``len()`` (entries across partitions),
    ``snapshot()`` / ``restore(data)``; ``snapshot_delta()`` / ``apply_delta(data)`` for
    the entries published or removed since the previous capture (see
    :class:`NumericAggregateStore`).

    A ``partition_id`` outside ``[0, num_partitions)`` raises ``ValueError``.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"AggregateStore(num_partitions={self.num_partitions}, entries={len(self)})"


class NumericAggregateStore(_core.NumericAggregateStore):
    """count / sum / min / max / mean / sample variance per key, merged across partitions.

    Args:
        num_partitions: how many partitions fold into the store (1 to 65536).
        key_type: ``"int64"`` (keys are integer numpy arrays; float keys are refused),
            ``"bytes"`` (keys are sequences of ``bytes`` or ``str``, str encoded as UTF-8;
            results hand back ``bytes``, Arrow ``binary``) or ``"str"`` (the same keys,
            handed back as ``str``, Arrow ``string``; every key must be UTF-8 text, else
            reading results raises :class:`~streamstate.CorruptDataError`).
        nan_policy: ``"skip"`` (default; NaN values are ignored, each value column on its
            own, and a row whose values are all NaN creates no key), ``"propagate"`` (the
            key's sum, mean, min, max and var become NaN) or ``"raise"`` (a batch
            containing NaN raises ``ValueError`` and folds nothing).
        values: the value columns' names (``["dep_delay", "arr_delay"]``): every row then
            carries one value per column, folded in one call with one hash and one table
            probe per key (``fold(keys, block)`` with an ``(n, M)`` float64 block, or a
            mapping ``{name: array}``). ``None`` (default): one unnamed column, folded from
            a 1-D array.
        key_groups: how many key groups keys hash to (default 256; 1 to 65536, at least
            ``num_partitions``). Partition ``p`` owns the contiguous groups
            :func:`streamstate.key_group_range` gives it; fixed for the life of a job
            (snapshots record it, and stores of other key groups refuse them).

    Partitions fold locally and publish (``store.partition(pid).fold(keys, values)``, then
    ``.publish()``); :meth:`result`, :meth:`results`, :meth:`to_pandas`, :meth:`to_arrow`
    and :meth:`to_polars` read what has been published. Variance uses shifted sums and Chan's parallel merge, so ``1e9 + noise``
    data keeps full precision. ``snapshot()`` includes every partition's local state.

    Incremental captures: ``snapshot_delta()`` returns only the published slots and local
    entries created or changed since the previous ``snapshot()`` / ``snapshot_delta()``
    (both reset the change tracking), naming its parent; ``apply_delta(data)`` applies it
    to a store in that parent's state (``restore(full)`` then the earlier deltas in order),
    all or nothing. A publish merges the partition's local partials into the shared map
    and empties its tables, so each key's partial is held once. ``restore_columns(parts)``
    joins one one-column snapshot per value column (how several columns were held before
    one store could) into this store.

    Rescaling: :meth:`repartitioned` gives the state in a store of another partition count,
    each key held by exactly the partition it routes to; ``partitions_holding(key)`` (for
    tests and operations) lists the partitions holding a published partial or a local
    entry of ``key``, ascending. Snapshots are sectioned by key group:
    ``snapshot(partitions=[...])`` exports only those partitions' keys, and
    :meth:`restore_from` rebuilds a store of any partition count from snapshots or exports
    taken at any other, reading only the sections its partitions own.

    Several value columns: :meth:`result`, :meth:`results`, :meth:`to_pandas`,
    :meth:`to_arrow` and :meth:`to_polars` take a ``column`` name, and each then equals
    what a one-column store fed that column alone would give (:meth:`results` requires
    it); :meth:`to_pandas` without one gives every column under a ``(value, stat)`` column
    MultiIndex, :meth:`to_arrow` flat ``{value}_{stat}`` names. Snapshots and deltas carry
    the column names: restoring into a store with other value columns raises
    :class:`~streamstate.CorruptDataError` and leaves it as it was.
    """

    __slots__ = ("_text_keys",)

    def __init__(
        self,
        num_partitions: int,
        key_type: KeyType = "int64",
        nan_policy: NanPolicy = "skip",
        values: Sequence[str] | None = None,
        key_groups: int = 256,
    ) -> None:
        # The core knows two flavours; str keys are its byte-string keys, read back as text.
        # Lists and tuples of names; anything else reaches the core, which names the type.
        names = list(values) if isinstance(values, (list, tuple)) else cast("list[str] | None", values)
        super().__init__(
            num_partitions, "bytes" if key_type == "str" else key_type, nan_policy, names,
            key_groups,
        )
        self._text_keys = key_type == "str"

    @property
    def key_type(self) -> KeyType:
        """``"int64"``, ``"bytes"`` or ``"str"``."""
        core = super().key_type  # first: refuses an uninitialised instance
        return "str" if self._text_keys else cast(KeyType, core)

    @property
    def columns(self) -> list[str]:
        """The value columns' names (``[]`` for the one unnamed column)."""
        return self.values or []

    def repartitioned(self, num_partitions: int) -> NumericAggregateStore:
        """This store's state rescaled to ``num_partitions`` partitions, in a new store.

        The new store has the same key type, ``nan_policy`` and value columns. Every key's
        partials from every partition, published and unpublished alike, are merged into
        one published partial of its owner: the partition :func:`streamstate.partition_batch`
        routes the key to for ``num_partitions``. The merge runs in ascending partition
        order (each partition's unpublished entry into its published one, as ``publish()``
        does, then across partitions, as a read does), so the new store's results equal
        this store's after every partition published, bit for bit. This store is
        unchanged; the call is consistent while other threads publish (it locks as
        ``snapshot()`` does) and releases the GIL. The new store is no capture's state:
        its first capture must be ``snapshot()``, not ``snapshot_delta()``.
        """
        rescaled = self._empty_like(num_partitions)
        self._repartition_into(rescaled)
        return rescaled

    def _empty_like(self, num_partitions: int) -> NumericAggregateStore:
        """An empty store of ``num_partitions`` with this one's key type, ``nan_policy``,
        value columns and key groups."""
        return NumericAggregateStore(
            num_partitions,
            self.key_type,
            cast("NanPolicy", self.nan_policy),
            values=self.values,
            key_groups=self.key_groups,
        )

    def snapshot(self, partitions: Sequence[int] | None = None) -> bytes:
        """The state as checksummed bytes, sectioned by key group.

        Without ``partitions``: the whole state, a capture (it resets the change tracking
        of :meth:`snapshot_delta`; :meth:`restore` rebuilds exactly this state, and the
        deltas taken after it apply to that). With ``partitions`` (ids of this store): an
        export of the keys those partitions hold, each as one partial (its published and
        local partials of those partitions merged), for :meth:`restore_from`; the change
        tracking is left alone.
        """
        return super().snapshot(_partition_ids(partitions))

    def restore_from(
        self, artifacts: Sequence[BytesLike], partitions: Sequence[int] | None = None
    ) -> None:
        """Replace the state with the keys of ``artifacts`` that ``partitions`` own.

        ``artifacts`` are :meth:`snapshot` bytes (whole or ``partitions=``) of stores with
        this key type, value columns and :attr:`key_groups`, at any partition count (older
        snapshots without key groups too). A key is kept when its key group belongs to one
        of the listed partitions of this store (``None``: all of them), and lands as one
        published partial of its owner: the merge of its partials over every artifact, in
        the order given. Only the sections of those key groups are decoded. All or
        nothing: a corrupt artifact raises :class:`~streamstate.CorruptDataError`, one of
        other key groups ``ValueError``, and the store is left as it was. The store is then
        no capture's state: its next capture must be :meth:`snapshot`.
        """
        if not isinstance(artifacts, list | tuple):
            artifacts = list(artifacts)
        super().restore_from(artifacts, _partition_ids(partitions))

    def _column_index(self, column: str | None) -> int | None:
        """The index of ``column``; for None, 0 with one column and None with several."""
        names = self.columns
        if column is None:
            return 0 if len(names) <= 1 else None
        if not isinstance(column, str):
            raise TypeError(f"column must be a str (one of {names}), not {type(column).__name__}")
        if column not in names:
            raise ValueError(f"unknown value column {column!r}; the store's are {names}")
        return names.index(column)

    def result(
        self, key: int | bytes | str, column: str | None = None
    ) -> Stats | dict[str, Stats | None] | None:
        """The key's statistics merged across all published partials, or ``None``.

        With several value columns and no ``column``: ``{name: Stats or None}`` (None for
        a column none of whose values counted), or ``None`` for a key nobody published.
        """
        index = self._column_index(column)
        if index is not None:
            values = self._result_tuple(key, index)
            return None if values is None else Stats.from_tuple(values)
        out: dict[str, Stats | None] = {}
        for i, name in enumerate(self.columns):
            values = self._result_tuple(key, i)
            out[name] = None if values is None else Stats.from_tuple(values)
        # A published key has values of at least one column (an all-NaN row creates none).
        return out if any(stats is not None for stats in out.values()) else None

    def results(self, column: str | None = None) -> StatResults:
        """Every published key's statistics as columns (see :class:`~streamstate.StatResults`):
        keys an int64 array, or a list of ``bytes`` / ``str`` by ``key_type``. With several
        value columns ``column`` (required) names the one, and only the keys with a value
        of it counted are listed."""
        return cast(StatResults, self._column_results(list_key_format(self.key_type), column))

    def _column_results(self, key_format: str, column: str | None) -> dict[str, Any]:
        index = self._column_index(column)
        if index is None:
            raise ValueError(
                f"results() needs column=... with several value columns: one of {self.columns}"
            )
        raw = self._columns(key_format)
        if "values" not in raw:
            return raw
        return present_rows(raw["key"], raw["values"][index])

    def to_pandas(self, column: str | None = None) -> pd.DataFrame:
        """:meth:`results` as a pandas DataFrame indexed by key (needs pandas). With several
        value columns and no ``column``: every key, every column's statistics under a
        ``(value, stat)`` column MultiIndex (count 0 and NaN where a key has no value of a
        column)."""
        if self._column_index(column) is None:
            raw = self._columns(list_key_format(self.key_type))
            return multi_columns_to_pandas(raw["key"], dict(zip(self.columns, raw["values"], strict=True)))
        return columns_to_pandas(self.results(column))

    def to_arrow(self, column: str | None = None) -> pa.Table:
        """:meth:`results` as a ``pyarrow.Table`` (columns ``key, count, sum, min, max, mean,
        var, std``) over the core's buffers, without copying them: ``key`` is int64,
        ``binary`` or ``string`` by ``key_type`` (``large_*`` past 2 GiB of keys), ``count``
        int64, the rest float64. Needs pyarrow. With several value columns and no
        ``column``: ``key`` then ``{value}_{stat}`` for every column (``dep_delay_count``,
        ``dep_delay_sum``, ...)."""
        index = self._column_index(column)
        raw = self._columns("arrow")
        if "values" not in raw:
            return columns_to_arrow(raw, self.key_type)
        if index is None:
            per_column = dict(zip(self.columns, raw["values"], strict=True))
            return multi_columns_to_arrow(raw["key"], per_column, self.key_type)
        stats = raw["values"][index]
        table = columns_to_arrow({"key": raw["key"], **stats}, self.key_type)
        present = stats["count"] > 0
        return table if bool(present.all()) else table.filter(present)

    def to_polars(self, column: str | None = None) -> pl.DataFrame:
        """:meth:`to_arrow` as a Polars DataFrame (needs polars and pyarrow)."""
        return columns_to_polars(self.to_arrow(column), self.key_type)

    def __repr__(self) -> str:
        values = f", values={self.columns!r}" if self.values is not None else ""
        return (
            f"NumericAggregateStore(num_partitions={self.num_partitions}, "
            f"key_type={self.key_type!r}, nan_policy={self.nan_policy!r}{values}, "
            f"key_groups={self.key_groups}, "
            f"keys={len(self)})"
        )


def _partition_ids(partitions: Sequence[int] | None) -> list[int] | None:
    """``partitions`` as the list of ints the core takes (None stays None)."""
    if partitions is None or isinstance(partitions, list):
        return partitions
    if isinstance(partitions, str | bytes) or not isinstance(partitions, Iterable):
        raise TypeError(
            f"partitions must be a sequence of partition ids, not {type(partitions).__name__}"
        )
    return [operator.index(p) for p in partitions]
