"""streamstate: the state layer for partition-parallel stream processing.

Heavy work runs in a C++ core (``streamstate._core``) with the GIL released, over whole
batches, so one Python thread per partition really runs in parallel. See README.md for a tour.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    CorruptDataError,
    IntegrityError,
    NoValidCheckpointError,
    SpillError,
    StreamStateError,
)

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "streamstate's compiled core (streamstate._core) could not be imported: "
        f"{exc}. Build and install it with `pip install .` (needs libtbb-dev, liblz4-dev and "
        "libssl-dev: `apt-get install -y libtbb-dev liblz4-dev libssl-dev`), or for "
        "development `pip install -e .`."
    ) from exc

from . import codec
from .codec import crc32c, lz4_compress, lz4_decompress, sha256_hex

# -- aggregate store (issue 3) --
from .aggregate import AggregateStore, NumericAggregateStore, PartitionAggregator

# -- keyed state (issue 4) --
from . import serde
from .state import (
    AggregatingState,
    InMemoryStateBackend,
    KeyedStateStore,
    ListState,
    MapState,
    StateBackend,
    StatePartitionKey,
)

# -- spilling aggregator (issue 5) --
from .spill import SpillingAggregator

# -- checkpoint batcher (issue 6) --
from .batcher import BatchMetrics, CheckpointBatcher, decode_batch, encode_batch

# -- object-store checkpointer (issue 7) --
from .checkpoint import (
    ObjectStoreCheckpointer,
    RecoveredCheckpoint,
    apply_record_delta,
    encode_delta,
    verify_integrity,
)
from .manifest import (
    CheckpointId,
    CheckpointManifest,
    CheckpointPaths,
    OperatorSnapshotEntry,
    PartitionSnapshotEntry,
)
from .retry import RetryPolicy

# -- pipeline (issue 8) --

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CorruptDataError",
    "IntegrityError",
    "NoValidCheckpointError",
    "SpillError",
    "StreamStateError",
    "__version__",
    "codec",
    "crc32c",
    "lz4_compress",
    "lz4_decompress",
    "sha256_hex",
]
