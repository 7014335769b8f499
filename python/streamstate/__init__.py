"""streamstate: the state layer for partition-parallel stream processing.

Heavy work runs in a C++ core (``streamstate._core``) with the GIL released, over whole
batches, so one Python thread per partition really runs in parallel. See README.md for a tour.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    CorruptDataError,
    IncompatibleCheckpointError,
    IntegrityError,
    NoValidCheckpointError,
    SinkError,
    SourceError,
    SpillError,
    StoreConfigurationError,
    StreamStateError,
)

try:
    from . import _core  # noqa: F401  (imported first to fail early with a helpful message)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "streamstate's compiled core (streamstate._core) could not be imported: "
        f"{exc}. A streamstate built from source loads the system's oneTBB, LZ4 and "
        "OpenSSL at run time: install their runtime packages (Debian/Ubuntu: "
        "`apt-get install -y libtbb12 liblz4-1 libssl3`). A manylinux wheel bundles them "
        "and needs none; rebuilding from source (`pip install .`) also needs libtbb-dev, "
        "liblz4-dev and libssl-dev."
    ) from exc

from . import codec, serde, windows
from .aggregate import AggregateStore, NumericAggregateStore, PartitionAggregator
from .batcher import BatchMetrics, CheckpointBatcher, decode_batch, encode_batch
from .checkpoint import (
    ObjectStoreCheckpointer,
    PendingCheckpoint,
    RecoveredCheckpoint,
    RecoveryPlan,
    apply_record_delta,
    encode_delta,
    verify_integrity,
)
from .codec import crc32c, lz4_compress, lz4_decompress, sha256_hex
from .manifest import (
    CheckpointId,
    CheckpointManifest,
    CheckpointPaths,
    OperatorSnapshotEntry,
    PartitionSnapshotEntry,
)
from .pipeline import (
    ArraySource,
    ArrowSource,
    ParquetSource,
    Pipeline,
    PipelineRun,
    RoutedSlice,
    key_group_range,
    partition_batch,
)
from .retry import RetryPolicy
from .sinks import CallableSink, ParquetSink, Sink
from .spill import SpillingAggregator
from .state import (
    AggregatingState,
    IncrementalStateBackend,
    InMemoryStateBackend,
    KeyedStateStore,
    ListState,
    MapState,
    StateBackend,
    StatePartitionKey,
    ValueState,
)
from .stats import StatResults, Stats
from .window_store import WindowedAggregateStore, WindowPartition
from .windows import Hopping, Session, Tumbling, parse_duration

__version__ = "0.1.0"

__all__ = [
    "AggregateStore",
    "AggregatingState",
    "ArraySource",
    "ArrowSource",
    "BatchMetrics",
    "CallableSink",
    "CheckpointBatcher",
    "CheckpointError",
    "CheckpointId",
    "CheckpointManifest",
    "CheckpointPaths",
    "CorruptDataError",
    "Hopping",
    "InMemoryStateBackend",
    "IncompatibleCheckpointError",
    "IncrementalStateBackend",
    "IntegrityError",
    "KeyedStateStore",
    "ListState",
    "MapState",
    "NoValidCheckpointError",
    "NumericAggregateStore",
    "ObjectStoreCheckpointer",
    "OperatorSnapshotEntry",
    "ParquetSink",
    "ParquetSource",
    "PartitionAggregator",
    "PartitionSnapshotEntry",
    "PendingCheckpoint",
    "Pipeline",
    "PipelineRun",
    "RecoveredCheckpoint",
    "RecoveryPlan",
    "RetryPolicy",
    "RoutedSlice",
    "Session",
    "Sink",
    "SinkError",
    "SourceError",
    "SpillError",
    "SpillingAggregator",
    "StatResults",
    "StateBackend",
    "StatePartitionKey",
    "Stats",
    "StoreConfigurationError",
    "StreamStateError",
    "Tumbling",
    "ValueState",
    "WindowPartition",
    "WindowedAggregateStore",
    "__version__",
    "apply_record_delta",
    "codec",
    "crc32c",
    "decode_batch",
    "encode_batch",
    "encode_delta",
    "key_group_range",
    "lz4_compress",
    "lz4_decompress",
    "parse_duration",
    "partition_batch",
    "serde",
    "sha256_hex",
    "verify_integrity",
    "windows",
]
