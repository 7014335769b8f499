"""Event-time windows: what a windowed :class:`~streamstate.Pipeline` groups events into.

Three kinds, all aligned to the Unix epoch and kept per key:

* :class:`Tumbling` ``(size)``: back-to-back windows ``[k*size, (k+1)*size)``; each event is
  in exactly one.
* :class:`Hopping` ``(size, step)``: windows ``[k*step, k*step + size)`` every ``step``; an
  event is in ``size // step`` of them (``step`` divides ``size``).
* :class:`Session` ``(gap)``: an event opens ``[t, t + gap)``; a key's overlapping windows
  merge, so a session lasts from its first event to its last plus ``gap``. A session that
  has ended under the watermark is final: an on-time event overlapping it opens a session
  of its own (as Flink does once a session window fired).

Durations are int milliseconds, :class:`datetime.timedelta`, numpy ``timedelta64`` or
strings such as ``"2d"``, ``"1h"``, ``"10min"``, ``"30s"``, ``"250ms"`` (see
:func:`parse_duration`). Event times are int64 epoch milliseconds (:func:`event_times`
converts a time column to them); both are kept within ``±2**53`` ms (about 285,000 years),
so sums such as ``t + size`` never overflow and a time is exact as a float64.

Each kind knows its *late rule* (:meth:`Tumbling.late_mask` and the others): under a
watermark ``wm``, an event is late when every window it belongs to has ended by ``wm``
(``end <= wm``). The pipeline splits late events off before folding.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from .errors import SourceError

__all__ = [
    "MAX_HOPS",
    "MAX_TIME_MS",
    "Hopping",
    "Session",
    "Tumbling",
    "Window",
    "event_times",
    "format_duration",
    "parse_duration",
    "window_from_dict",
]

#: Event times and durations are kept below this magnitude (ms): exact as float64, and no
#: sum of a time and a duration overflows int64.
MAX_TIME_MS = 2**53
#: A hopping window's ``size // step`` (the windows each event is in) is at most this.
MAX_HOPS = 4096

_UNITS_MS = {
    "d": 86_400_000,
    "h": 3_600_000,
    "min": 60_000,
    "m": 60_000,
    "s": 1_000,
    "ms": 1,
}
_DURATION = re.compile(r"\s*(\d+)\s*(d|h|min|m|s|ms)\s*", re.IGNORECASE)
_ACCEPTED = (
    "int milliseconds, datetime.timedelta, numpy.timedelta64, or a string of a whole number "
    "and a unit: d, h, min (or m), s, ms (e.g. '2d', '1h', '10min', '30s', '250ms')"
)


def parse_duration(value: object, name: str = "duration") -> int:
    """``value`` as whole milliseconds (>= 0).

    Accepts an int (milliseconds), a :class:`datetime.timedelta`, a numpy ``timedelta64``
    (of a fixed unit) or a string such as ``"1h"`` (units ``d``, ``h``, ``min``/``m``,
    ``s``, ``ms``). A duration that is not a whole number of milliseconds, is negative, or
    is not one of those raises ValueError (TypeError for other types) naming ``name`` and
    the accepted forms.
    """
    ms: int
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {_ACCEPTED}; got a bool")
    if isinstance(value, np.timedelta64):  # before np.integer, which it subclasses
        ms = _timedelta64_ms(value, name)
    elif isinstance(value, int | np.integer):
        ms = int(value)
    elif isinstance(value, datetime.timedelta):
        micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
        if micros % 1000:
            raise ValueError(f"{name} must be a whole number of milliseconds, got {value!r}")
        ms = micros // 1000
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(f"{name} must be {_ACCEPTED}; got {value!r}")
        ms = int(match.group(1)) * _UNITS_MS[match.group(2).lower()]
    else:
        raise TypeError(f"{name} must be {_ACCEPTED}; got {type(value).__name__}")
    if ms < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    if ms >= MAX_TIME_MS:
        raise ValueError(f"{name} must be below 2**53 ms, got {value!r}")
    return ms


def _timedelta64_ms(value: np.timedelta64, name: str) -> int:
    if np.isnat(value):
        raise ValueError(f"{name} must be {_ACCEPTED}; got NaT")
    unit, _ = np.datetime_data(value.dtype)
    if unit in ("Y", "M", "generic"):
        raise ValueError(f"{name}: a timedelta64 in {unit!r} units has no fixed length")
    as_ms = value.astype("timedelta64[ms]")
    if as_ms.astype(value.dtype) != value:
        raise ValueError(f"{name} must be a whole number of milliseconds, got {value!r}")
    return int(as_ms.astype(np.int64))


def format_duration(ms: int) -> str:
    """``ms`` in the largest unit that divides it (``3_600_000`` -> ``"1h"``), the inverse of
    :func:`parse_duration` on its strings."""
    for unit in ("d", "h", "min", "s"):
        if ms and ms % _UNITS_MS[unit] == 0:
            return f"{ms // _UNITS_MS[unit]}{unit}"
    return f"{ms}ms"


def _positive(value: object, name: str) -> int:
    ms = parse_duration(value, name)
    if ms == 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return ms


Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, repr=False)
class Tumbling:
    """Back-to-back windows of ``size``: ``[k*size, (k+1)*size)``, aligned to the epoch.

    ``size`` is any duration :func:`parse_duration` takes; it is kept as int milliseconds.
    """

    size: int
    kind: ClassVar[Literal["tumbling"]] = "tumbling"

    def __init__(self, size: object) -> None:
        object.__setattr__(self, "size", _positive(size, "Tumbling size"))

    def late_mask(self, times: Int64Array, watermark: int) -> BoolArray:
        """Which events (int64 ms) are late under ``watermark``: their window
        ``[floor(t/size)*size, ... + size)`` has ended (``end <= watermark``)."""
        end = times // self.size * self.size + self.size
        return end <= watermark

    def store_arguments(self) -> dict[str, Any]:
        """The ``WindowedAggregateStore`` keyword arguments of this window."""
        return {"kind": self.kind, "size": self.size}

    def as_dict(self) -> dict[str, Any]:
        """The definition as JSON (recorded in the job fingerprint)."""
        return {"kind": self.kind, "size": self.size}

    def __repr__(self) -> str:
        return f"Tumbling({format_duration(self.size)!r})"


@dataclass(frozen=True, repr=False)
class Hopping:
    """Windows of ``size`` starting every ``step``: ``[k*step, k*step + size)``.

    ``step`` must divide ``size`` (so every event is in exactly ``size // step`` windows);
    both are durations (see :func:`parse_duration`), kept as int milliseconds.
    """

    size: int
    step: int
    kind: ClassVar[Literal["hopping"]] = "hopping"

    def __init__(self, size: object, step: object) -> None:
        size_ms = _positive(size, "Hopping size")
        step_ms = _positive(step, "Hopping step")
        if step_ms > size_ms:
            raise ValueError(
                f"Hopping step ({format_duration(step_ms)}) must not exceed its size "
                f"({format_duration(size_ms)})"
            )
        if size_ms % step_ms:
            raise ValueError(
                f"Hopping step ({format_duration(step_ms)}) must divide its size "
                f"({format_duration(size_ms)})"
            )
        if size_ms // step_ms > MAX_HOPS:
            raise ValueError(
                f"Hopping size / step must be at most {MAX_HOPS} (the windows each event is "
                f"in), got {format_duration(size_ms)} / {format_duration(step_ms)}"
            )
        object.__setattr__(self, "size", size_ms)
        object.__setattr__(self, "step", step_ms)

    def late_mask(self, times: Int64Array, watermark: int) -> BoolArray:
        """Which events are late under ``watermark``: even the last window holding each
        (the one starting at ``floor(t/step)*step``) has ended."""
        end = times // self.step * self.step + self.size
        return end <= watermark

    def store_arguments(self) -> dict[str, Any]:
        """The ``WindowedAggregateStore`` keyword arguments of this window."""
        return {"kind": self.kind, "size": self.size, "step": self.step}

    def as_dict(self) -> dict[str, Any]:
        """The definition as JSON (recorded in the job fingerprint)."""
        return {"kind": self.kind, "size": self.size, "step": self.step}

    def __repr__(self) -> str:
        return f"Hopping({format_duration(self.size)!r}, {format_duration(self.step)!r})"


@dataclass(frozen=True, repr=False)
class Session:
    """Per-key sessions: each event opens ``[t, t + gap)`` and a key's overlapping windows
    merge, so a session runs from its first event to its last plus ``gap``."""

    gap: int
    kind: ClassVar[Literal["session"]] = "session"

    def __init__(self, gap: object) -> None:
        object.__setattr__(self, "gap", _positive(gap, "Session gap"))

    def late_mask(self, times: Int64Array, watermark: int) -> BoolArray:
        """Which events are late under ``watermark``: their own window ``[t, t + gap)`` has
        ended."""
        return times + self.gap <= watermark

    def store_arguments(self) -> dict[str, Any]:
        """The ``WindowedAggregateStore`` keyword arguments of this window."""
        return {"kind": self.kind, "gap": self.gap}

    def as_dict(self) -> dict[str, Any]:
        """The definition as JSON (recorded in the job fingerprint)."""
        return {"kind": self.kind, "gap": self.gap}

    def __repr__(self) -> str:
        return f"Session({format_duration(self.gap)!r})"


#: Any window definition.
Window = Tumbling | Hopping | Session


def window_from_dict(document: dict[str, Any]) -> Window:
    """The window :meth:`Tumbling.as_dict` (or another kind's) describes."""
    kind = document.get("kind")
    if kind == "tumbling":
        return Tumbling(document["size"])
    if kind == "hopping":
        return Hopping(document["size"], document["step"])
    if kind == "session":
        return Session(document["gap"])
    raise ValueError(f"not a window definition: {document!r}")


def event_times(column: Any, name: str, where: str) -> tuple[Int64Array, bool]:
    """A time column as int64 epoch milliseconds, and whether it held datetimes.

    ``column`` holds integers (epoch ms), whole-number floats (epoch ms), or ``datetime64``
    of any unit (sub-millisecond times round down to their millisecond; a timezone-aware
    column is in UTC already). NaT, NaN, non-numeric values or times beyond ``±2**53`` ms
    raise :class:`~streamstate.SourceError` naming column ``name`` and ``where`` it is.
    """
    array = column
    if not isinstance(array, np.ndarray):
        if hasattr(array, "to_numpy") and hasattr(array, "type"):  # an Arrow array
            array = array.to_numpy(zero_copy_only=False)
        else:
            array = np.asarray(array)
    kind = array.dtype.kind
    is_datetime = kind == "M"
    if is_datetime:
        if np.isnat(array).any():
            raise SourceError(f"{where}: time column {name!r} holds NaT (a missing time)")
        times = array.astype("datetime64[ms]").view(np.int64)
    elif kind in "iu":
        if kind == "u" and array.size and int(array.max()) >= MAX_TIME_MS:
            raise SourceError(f"{where}: time column {name!r} holds times beyond 2**53 ms")
        times = array.astype(np.int64, copy=False)
    elif kind == "f":
        if not np.isfinite(array).all():
            raise SourceError(
                f"{where}: time column {name!r} holds NaN or infinite times; times must be "
                "epoch milliseconds or datetime64"
            )
        times = array.astype(np.int64)
        if not np.array_equal(times, array):
            raise SourceError(
                f"{where}: time column {name!r} holds fractional milliseconds; times must be "
                "whole epoch milliseconds or datetime64"
            )
    else:
        raise SourceError(
            f"{where}: time column {name!r} holds {array.dtype} values; times must be int64 "
            "epoch milliseconds or datetime64"
        )
    if times.size and (int(times.max()) >= MAX_TIME_MS or int(times.min()) <= -MAX_TIME_MS):
        raise SourceError(f"{where}: time column {name!r} holds times beyond ±2**53 ms")
    return times, is_datetime
