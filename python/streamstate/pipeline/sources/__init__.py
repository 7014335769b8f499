"""Sources: replayable micro-batches of columns, addressed by JSON offsets.

:mod:`.contract` holds the protocol every source follows and the checks the pipeline makes
of each batch; :class:`ArraySource` reads in-memory numpy columns, :class:`ArrowSource`
Arrow data (tables, readers, pandas and polars frames) and :class:`ParquetSource` a
directory of Parquet files, locally or in an object store, optionally following it for new
files. :class:`ShardableSource` is what a source that splits into shards (each read by a
worker of its own) adds: arrays split into row ranges, Parquet directories into sets of
files.
"""

from __future__ import annotations

from .arrays import ArraySource
from .arrow_source import ArrowSource
from .contract import (
    Batch,
    Offset,
    ShardableSource,
    Source,
    can_shard,
    check_batch,
    check_columns,
    describe_keys,
    key_column,
    plain_offset,
    shard_offset,
    shard_positions,
    start_offset_of,
)
from .parquet_source import ParquetSource

__all__ = [
    "ArraySource",
    "ArrowSource",
    "Batch",
    "Offset",
    "ParquetSource",
    "ShardableSource",
    "Source",
    "can_shard",
    "check_batch",
    "check_columns",
    "describe_keys",
    "key_column",
    "plain_offset",
    "shard_offset",
    "shard_positions",
    "start_offset_of",
]
