"""Sources: replayable micro-batches of columns, addressed by JSON offsets.

:mod:`.contract` holds the protocol every source follows and the checks the pipeline makes
of each batch; :class:`ArraySource` reads in-memory numpy columns, :class:`ArrowSource`
Arrow data (tables, readers, pandas and polars frames) and :class:`ParquetSource` a
directory of Parquet files, locally or in an object store, optionally following it for new
files.
"""

from __future__ import annotations

from .arrays import ArraySource
from .arrow_source import ArrowSource
from .contract import (
    Batch,
    Offset,
    Source,
    check_batch,
    check_columns,
    describe_keys,
    key_column,
    plain_offset,
    start_offset_of,
)
from .parquet_source import ParquetSource

__all__ = [
    "ArraySource",
    "ArrowSource",
    "Batch",
    "Offset",
    "ParquetSource",
    "Source",
    "check_batch",
    "check_columns",
    "describe_keys",
    "key_column",
    "plain_offset",
    "start_offset_of",
]
