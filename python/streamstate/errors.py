"""The exception hierarchy: every error streamstate raises derives from StreamStateError."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CorruptDataError",
    "IncompatibleCheckpointError",
    "IntegrityError",
    "NoValidCheckpointError",
    "SinkError",
    "SourceError",
    "SpillError",
    "StoreConfigurationError",
    "StreamStateError",
]


class StreamStateError(Exception):
    """Base class of all streamstate errors."""


class CorruptDataError(StreamStateError, ValueError):
    """Bytes that cannot be what they claim to be: truncated, bit-flipped or foreign."""


class IntegrityError(CorruptDataError):
    """An artifact whose SHA-256 digest differs from the one recorded for it."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(f"{path}: SHA-256 mismatch (expected {expected}, got {actual})")
        self.path = path
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[IntegrityError], tuple[str, str, str]]:
        return (type(self), (self.path, self.expected, self.actual))


class SpillError(StreamStateError, OSError):
    """A file-system failure while spilling to disk or reading spill files back.

    Constructed like OSError, ``SpillError(errno, message, path)``, so ``.errno`` and
    ``.filename`` name what failed.
    """


class StoreConfigurationError(StreamStateError, ValueError):
    """A store URL or store option that cannot name a usable object store."""


class CheckpointError(StreamStateError):
    """A checkpoint operation that failed permanently (after any retries)."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint a pipeline must not resume from: written by a job with another
    definition, or by something other than a pipeline. Raised before any state is restored.

    ``differences`` lists one line per differing field of the job fingerprint (empty when
    the checkpoint's shape, not its definition, is what does not fit).
    """

    def __init__(self, message: str, differences: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.differences = differences

    def __reduce__(self) -> tuple[type[IncompatibleCheckpointError], tuple[str, tuple[str, ...]]]:
        return (type(self), (str(self), self.differences))


class SourceError(StreamStateError, ValueError):
    """A source that broke its contract: a batch whose offsets disagree with its rows, that
    does not start where the previous one ended, or that lacks a column the job needs."""


class SinkError(StreamStateError):
    """A sink that could not stage, publish or recover an epoch's rows, or whose delivery
    function raised (chained as ``__cause__``). The rows stay staged: the epoch's commit is
    not undone, and a recovery publishes (or re-delivers) them."""


class NoValidCheckpointError(CheckpointError):
    """Recovery found checkpoints but none of them verified.

    ``failures`` lists ``(checkpoint_id, reason)`` for every candidate tried, newest first.
    """

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        lines = "; ".join(f"{cid}: {why}" for cid, why in failures)
        super().__init__(f"no valid checkpoint among {len(failures)} candidate(s): {lines}")
        self.failures = failures

    def __reduce__(self) -> tuple[type[NoValidCheckpointError], tuple[list[tuple[str, str]]]]:
        return (type(self), (self.failures,))
