"""Retrying object-store calls: which failures are worth another try, and how long to wait.

obstore reports failures as ``obstore.exceptions.*`` and built-in exceptions. HTTP stores
(S3, GCS, Azure) already retry 5xx responses and dropped connections internally (obstore's
``retry_config``) before an error reaches Python; what arrives here is classified by
:func:`is_transient` and retried by :meth:`RetryPolicy.call` on top of that:

* transient: HTTP 5xx, 408 and 429 (throttling), timeouts, connection errors and resets,
  interrupted or busy system calls, and unclassifiable ``GenericError``\\ s;
* permanent: other HTTP 4xx, permission and authentication failures, invalid paths,
  unsupported operations, configuration errors (including an HTTP client that cannot be
  built, obstore's "builder error"), directory loops, and file-system errors such as
  ``ENOSPC`` or ``ENOTDIR``.

Not-found, already-exists and precondition failures are answers, not faults: callers name
them in ``passthrough`` and handle them.
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from obstore import exceptions as obs_errors

from .errors import CheckpointError

__all__ = ["RetryPolicy", "is_transient", "summary"]

T = TypeVar("T")

_STATUS = re.compile(r"status code: (\d{3})")
_OS_ERROR = re.compile(r"os error (\d+)")
_NETWORK_HINTS = (
    "error sending request",
    "timed out",
    "timeout",
    "connection",
    "broken pipe",
    "reset by peer",
    "slowdown",
    "throttl",
    "temporarily",
)
# A GenericError wrapping an invalid path, an unsupported request, a client that cannot be
# built from its configuration (e.g. plain http:// without allow_http: "builder error") or a
# directory loop will never succeed.
_INVALID_HINTS = (
    "invalidpath",
    "invalid path",
    "not supported",
    "not implemented",
    "builder error",
    "file system loop",
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
    }
)
_PERMANENT_OBSTORE = (
    obs_errors.PermissionDeniedError,
    obs_errors.UnauthenticatedError,
    obs_errors.InvalidPathError,
    obs_errors.NotSupportedError,
    obs_errors.UnknownConfigurationKeyError,
    obs_errors.AlreadyExistsError,
    obs_errors.PreconditionError,
    obs_errors.NotModifiedError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` from an object-store call may succeed if the call is repeated."""
    if isinstance(exc, _PERMANENT_OBSTORE):
        return False
    if isinstance(exc, (obs_errors.GenericError, obs_errors.JoinError)):
        return _transient_message(str(exc), unknown=True)
    if isinstance(exc, (TimeoutError, ConnectionError, InterruptedError, BlockingIOError)):
        return True
    if isinstance(exc, FileNotFoundError):
        return False
    if isinstance(exc, OSError):
        if exc.errno is not None:
            return exc.errno in _TRANSIENT_ERRNOS
        return _transient_message(str(exc), unknown=False)
    return False


def _transient_message(message: str, unknown: bool = True) -> bool:
    status = _STATUS.search(message)
    if status is not None:
        code = int(status.group(1))
        return code >= 500 or code in (408, 429)
    os_error = _OS_ERROR.search(message)
    if os_error is not None:
        return int(os_error.group(1)) in _TRANSIENT_ERRNOS
    lowered = message.lower()
    if any(hint in lowered for hint in _INVALID_HINTS):
        return False
    if any(hint in lowered for hint in _NETWORK_HINTS):
        return True
    # An unrecognised GenericError is retried: the time budget bounds the cost of guessing
    # wrong, while giving up on a transient fault would fail a checkpoint for nothing.
    return unknown


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient object-store failures.

    Attempt ``n`` (from 1) that fails transiently sleeps
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))``, shortened by a random
    fraction of up to ``jitter`` (0 = none, 1 = "full jitter"), and gives up after
    ``max_attempts`` attempts or when the next sleep would end past ``max_elapsed``
    seconds from the first attempt. Each attempt may itself include obstore's own HTTP
    retries, so ``max_elapsed`` bounds when the last attempt starts, not when it ends.
    """

    max_attempts: int = 10
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_elapsed: float = 30.0
    _rng: random.Random = field(
        default_factory=random.Random, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError("max_attempts must be an int")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if not self.max_elapsed >= 0:
            raise ValueError(f"max_elapsed must be >= 0, got {self.max_elapsed}")

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1.0 - self.jitter * self._rng.random())

    def call(
        self,
        path: str,
        operation: Callable[[int], T],
        *,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Run ``operation(attempt)`` until it succeeds, retrying transient failures.

        Exceptions that are instances of ``passthrough`` propagate unchanged (the caller
        handles them); permanent failures, and transient ones once the budget is spent,
        raise :class:`CheckpointError` naming ``path``.
        """
        start = time.monotonic()
        attempt = 1
        while True:
            try:
                return operation(attempt)
            except passthrough:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise CheckpointError(f"{path}: {_describe(exc)}") from exc
                delay = self.backoff(attempt)
                elapsed = time.monotonic() - start
                if attempt >= self.max_attempts or elapsed + delay > self.max_elapsed:
                    raise CheckpointError(
                        f"{path}: still failing after {attempt} attempt(s) in {elapsed:.1f} s: "
                        f"{_describe(exc)}"
                    ) from exc
            time.sleep(delay)
            attempt += 1


def summary(exc: BaseException) -> str:
    """``exc``'s message without the multi-line ``Debug source:`` dump obstore appends."""
    return str(exc).split("\n\nDebug source:", 1)[0].strip()


def _describe(exc: BaseException) -> str:
    first = summary(exc)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
