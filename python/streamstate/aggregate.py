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

from typing import TYPE_CHECKING, Literal, cast

from . import _core
from .stats import (
    ResultKeyType,
    StatResults,
    Stats,
    columns_to_arrow,
    columns_to_pandas,
    columns_to_polars,
    list_key_format,
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
#: released), ``publish()`` pushes the partials changed since the last publish and returns
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
        nan_policy: ``"skip"`` (default; NaN rows are ignored and create no key),
            ``"propagate"`` (the key's sum, mean, min, max and var become NaN) or
            ``"raise"`` (a batch containing NaN raises ``ValueError`` and folds nothing).

    Partitions fold locally and publish (``store.partition(pid).fold(keys, values)``, then
    ``.publish()``); :meth:`result`, :meth:`results`, :meth:`to_pandas`, :meth:`to_arrow`
    and :meth:`to_polars` read what has been published. Variance uses shifted sums and Chan's parallel merge, so ``1e9 + noise``
    data keeps full precision. ``snapshot()`` includes every partition's local state.

    Incremental captures: ``snapshot_delta()`` returns only the published slots and local
    entries created or changed since the previous ``snapshot()`` / ``snapshot_delta()``
    (both reset the change tracking), naming its parent; ``apply_delta(data)`` applies it
    to a store in that parent's state (``restore(full)`` then the earlier deltas in order),
    all or nothing. A publish merges the partition's local partials into the shared map
    and empties its tables, so each key's partial is held once.
    """

    __slots__ = ("_text_keys",)

    def __init__(
        self, num_partitions: int, key_type: KeyType = "int64", nan_policy: NanPolicy = "skip"
    ) -> None:
        # The core knows two flavours; str keys are its byte-string keys, read back as text.
        super().__init__(num_partitions, "bytes" if key_type == "str" else key_type, nan_policy)
        self._text_keys = key_type == "str"

    @property
    def key_type(self) -> KeyType:
        """``"int64"``, ``"bytes"`` or ``"str"``."""
        core = super().key_type  # first: refuses an uninitialised instance
        return "str" if self._text_keys else cast(KeyType, core)

    def result(self, key: int | bytes | str) -> Stats | None:
        """The key's statistics merged across all published partials, or ``None``."""
        values = self._result_tuple(key)
        return None if values is None else Stats.from_tuple(values)

    def results(self) -> StatResults:
        """Every published key's statistics as columns (see :class:`~streamstate.StatResults`):
        keys an int64 array, or a list of ``bytes`` / ``str`` by ``key_type``."""
        return cast(StatResults, self._columns(list_key_format(self.key_type)))

    def to_pandas(self) -> pd.DataFrame:
        """:meth:`results` as a pandas DataFrame indexed by key (needs pandas)."""
        return columns_to_pandas(self.results())

    def to_arrow(self) -> pa.Table:
        """:meth:`results` as a ``pyarrow.Table`` (columns ``key, count, sum, min, max, mean,
        var, std``) over the core's buffers, without copying them: ``key`` is int64,
        ``binary`` or ``string`` by ``key_type`` (``large_*`` past 2 GiB of keys), ``count``
        int64, the rest float64. Needs pyarrow."""
        return columns_to_arrow(self._columns("arrow"), self.key_type)

    def to_polars(self) -> pl.DataFrame:
        """:meth:`to_arrow` as a Polars DataFrame (needs polars and pyarrow)."""
        return columns_to_polars(self._columns("arrow"), self.key_type)

    def __repr__(self) -> str:
        return (
            f"NumericAggregateStore(num_partitions={self.num_partitions}, "
            f"key_type={self.key_type!r}, nan_policy={self.nan_policy!r}, keys={len(self)})"
        )
