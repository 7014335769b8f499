"""The ``_latest`` pointer: the quick answer to "which checkpoint is current".

It only ever moves forward. Where the store supports conditional updates (S3, GCS, Azure,
memory) the move is a compare-and-swap on the pointer's e-tag; ``LocalStore`` cannot update
conditionally, so there moves are serialised within one process only. Recovery never trusts
the pointer over the manifests, so a pointer left behind costs nothing but a hint.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from obstore import exceptions as obs_errors

from .errors import CheckpointError, CorruptDataError
from .ids import CheckpointId
from .storage import PutMode, RetryingStorage, StoredObject

if TYPE_CHECKING:
    from obstore import UpdateVersion

__all__ = ["LatestPointer"]

_OVERWRITE_LOCK = threading.Lock()
_RACE_ERRORS = (
    obs_errors.AlreadyExistsError,
    obs_errors.PreconditionError,
    NotImplementedError,
    obs_errors.NotSupportedError,
)
_MAX_CONTENDED_UPDATES = 64


class LatestPointer:
    """The pointer object at ``path``, read and moved through a :class:`RetryingStorage`."""

    def __init__(self, path: str) -> None:
        self.path = path
        # None: unknown yet; False: the store rejected an e-tag conditional update once.
        self._conditional_update: bool | None = None

    def __repr__(self) -> str:
        return f"LatestPointer({self.path!r})"

    def read(self, io: RetryingStorage) -> CheckpointId | None:
        """The id the pointer names, or None without a pointer; a pointer that does not
        hold a checkpoint id raises :class:`~streamstate.CorruptDataError`."""
        current, stored = self.peek(io)
        if stored is not None and current is None:
            raise CorruptDataError(f"{self.path}: not a checkpoint id")
        return current

    def peek(self, io: RetryingStorage) -> tuple[CheckpointId | None, StoredObject | None]:
        """``(id or None when damaged, the stored object or None when missing)``."""
        try:
            stored = io.get(self.path)
        except FileNotFoundError:
            return None, None
        try:
            return CheckpointId.parse(bytes(stored.data).decode("ascii").strip()), stored
        except (UnicodeDecodeError, ValueError):
            return None, stored

    def advance(self, io: RetryingStorage, checkpoint_id: CheckpointId) -> bool:
        """Move the pointer forward to ``checkpoint_id``; True if it names it afterwards,
        False (untouched) if it already names a newer one. A damaged pointer is replaced."""
        if not isinstance(checkpoint_id, CheckpointId):
            raise TypeError(f"expected a CheckpointId, got {type(checkpoint_id).__name__}")
        payload = str(checkpoint_id).encode("ascii")
        for _ in range(_MAX_CONTENDED_UPDATES):
            # Without conditional updates, serialise this process's read-compare-write so at
            # least writers sharing a process cannot interleave.
            guard: AbstractContextManager[object] = (
                _OVERWRITE_LOCK if self._conditional_update is False else nullcontext()
            )
            with guard:
                current, stored = self.peek(io)
                if current is not None and current >= checkpoint_id:
                    return current == checkpoint_id
                try:
                    io.put(self.path, payload, mode=self._mode(stored), passthrough=_RACE_ERRORS)
                    return True
                except (obs_errors.AlreadyExistsError, obs_errors.PreconditionError):
                    continue  # another writer (or our own landed attempt) moved it: re-compare
                except (NotImplementedError, obs_errors.NotSupportedError):
                    self._conditional_update = False
        raise CheckpointError(
            f"{self.path}: gave up after {_MAX_CONTENDED_UPDATES} contended updates"
        )

    def _mode(self, stored: StoredObject | None) -> PutMode:
        if stored is None:
            return "create"
        if self._conditional_update is False or (stored.e_tag is None and stored.version is None):
            return "overwrite"
        mode: UpdateVersion = {}
        if stored.e_tag is not None:
            mode["e_tag"] = stored.e_tag
        if stored.version is not None:
            mode["version"] = stored.version
        return mode
