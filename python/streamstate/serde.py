"""Serializers between Python values and the bytes a state backend stores.

Each serde is an instance with ``encode(value) -> bytes`` and ``decode(data) -> value``.
Encoding a value the serde cannot represent raises :class:`SerdeError`; decoding bytes that
are not a valid encoding raises :class:`~streamstate.CorruptDataError`, never a stray
``struct.error`` or ``UnicodeDecodeError``.

``Int64``, ``Float64`` and ``Utf8`` encodings sort like their values (unsigned bytewise), so
map state keyed by them iterates in numeric or code-point order. ``Pickle`` exists for values
nothing else can carry, but is never a default: unpickling a checkpoint runs whatever code
the checkpoint names, so use it only for state you wrote yourself.
"""

from __future__ import annotations

import json
import operator
import pickle
import struct
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from ._typing import BytesLike, byte_view
from .errors import CorruptDataError, StreamStateError

__all__ = [
    "Bytes",
    "Float64",
    "Int64",
    "Json",
    "Msgpack",
    "Pickle",
    "Serde",
    "SerdeError",
    "Utf8",
    "by_name",
]

T = TypeVar("T")

_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_SIGN = 1 << 63
_MASK = (1 << 64) - 1


class SerdeError(StreamStateError, ValueError):
    """A value that this serde cannot encode (wrong type, out of range, not serializable)."""


@runtime_checkable
class Serde(Protocol[T]):
    """Anything with ``encode(value) -> bytes`` and ``decode(data) -> value``."""

    def encode(self, value: T) -> bytes:
        """The bytes for ``value``; raises SerdeError if it cannot be encoded."""
        ...

    def decode(self, data: BytesLike) -> T:
        """The value ``data`` encodes; raises CorruptDataError if it is not an encoding."""
        ...


class _Stateless:
    """Equality, hashing and repr for serdes without parameters."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


def _corrupt(serde: object, reason: str) -> CorruptDataError:
    return CorruptDataError(f"{type(serde).__name__}: {reason}")


class Int64(_Stateless):
    """Signed 64-bit integers as 8 big-endian bytes with the sign bit flipped (order-preserving)."""

    __slots__ = ()

    def encode(self, value: int) -> bytes:
        """Encode an int in [-2**63, 2**63)."""
        if isinstance(value, bool):
            raise SerdeError("Int64 encodes int, not bool")
        try:
            number = operator.index(value)
        except TypeError:
            raise SerdeError(f"Int64 encodes int, not {type(value).__name__}") from None
        if not -_SIGN <= number < _SIGN:
            raise SerdeError(f"Int64 cannot encode {number}: outside [-2**63, 2**63)")
        return _U64.pack(number + _SIGN)

    def decode(self, data: BytesLike) -> int:
        """Decode exactly 8 bytes (any buffer: bytes, memoryview, a numpy array, ...)."""
        view = byte_view(data)
        if view.nbytes != 8:
            raise _corrupt(self, f"expected 8 bytes, got {view.nbytes}")
        return int(_U64.unpack(view.cast("B"))[0]) - _SIGN


class Float64(_Stateless):
    """IEEE-754 doubles as 8 bytes that sort like the numbers (NaN payloads kept exactly)."""

    __slots__ = ()

    def encode(self, value: float) -> bytes:
        """Encode a float (ints are converted)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SerdeError(f"Float64 encodes float, not {type(value).__name__}")
        try:
            bits = int(_U64.unpack(_F64.pack(float(value)))[0])
        except OverflowError:
            raise SerdeError(f"Float64 cannot encode {value}: too large for a double") from None
        # Negative numbers: invert every bit so larger magnitudes sort first; positive: set
        # the sign bit so they sort after all negatives.
        return _U64.pack((~bits & _MASK) if bits & _SIGN else bits | _SIGN)

    def decode(self, data: BytesLike) -> float:
        """Decode exactly 8 bytes (any buffer: bytes, memoryview, a numpy array, ...)."""
        view = byte_view(data)
        if view.nbytes != 8:
            raise _corrupt(self, f"expected 8 bytes, got {view.nbytes}")
        bits = int(_U64.unpack(view.cast("B"))[0])
        bits = bits & ~_SIGN if bits & _SIGN else ~bits & _MASK
        return float(_F64.unpack(_U64.pack(bits))[0])


class Utf8(_Stateless):
    """Text as UTF-8 (sorts by code point)."""

    __slots__ = ()

    def encode(self, value: str) -> bytes:
        """Encode a str; lone surrogates cannot be encoded."""
        if not isinstance(value, str):
            raise SerdeError(f"Utf8 encodes str, not {type(value).__name__}")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerdeError(f"Utf8 cannot encode {value!r}: {exc.reason}") from None

    def decode(self, data: BytesLike) -> str:
        """Decode strict UTF-8."""
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _corrupt(self, f"invalid UTF-8 at byte {exc.start}") from None


class Bytes(_Stateless):
    """Raw bytes, unchanged."""

    __slots__ = ()

    def encode(self, value: BytesLike) -> bytes:
        """Accepts any buffer: bytes, bytearray, memoryview, a numpy array, ..."""
        try:
            return bytes(byte_view(value))
        except TypeError:
            raise SerdeError(
                f"Bytes encodes bytes-like objects, not {type(value).__name__}"
            ) from None

    def decode(self, data: BytesLike) -> bytes:
        """Returns the bytes as they are."""
        return bytes(data)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class Json(_Stateless):
    """JSON text in UTF-8: compact, keys sorted (equal values encode to equal bytes), and
    strict: NaN and infinities are refused both ways. Tuples come back as lists."""

    __slots__ = ()

    def encode(self, value: Any) -> bytes:
        """Encode any JSON-serializable value."""
        try:
            text = json.dumps(
                value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True
            )
            return text.encode("utf-8")
        except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
            raise SerdeError(f"Json cannot encode {type(value).__name__}: {exc}") from None

    def decode(self, data: BytesLike) -> Any:
        """Decode one JSON document."""
        try:
            return json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise _corrupt(self, str(exc)) from None


def _msgpack() -> Any:
    try:
        import msgpack  # type: ignore[import-untyped]
    except ImportError:
        raise ImportError(
            "streamstate.serde.Msgpack needs the msgpack package: pip install msgpack"
        ) from None
    return msgpack


class Msgpack(_Stateless):
    """MessagePack (needs the ``msgpack`` package): compact and binary-safe; bytes stay bytes,
    tuples come back as lists, maps may have any hashable keys."""

    __slots__ = ()

    def __init__(self) -> None:
        _msgpack()  # fail at construction, not at the first value

    def encode(self, value: Any) -> bytes:
        """Encode any value msgpack can represent."""
        msgpack = _msgpack()
        try:
            return bytes(msgpack.packb(value, use_bin_type=True))
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerdeError(f"Msgpack cannot encode {type(value).__name__}: {exc}") from None

    def decode(self, data: BytesLike) -> Any:
        """Decode exactly one msgpack object (trailing bytes are corruption)."""
        msgpack = _msgpack()
        try:
            return msgpack.unpackb(bytes(data), raw=False, strict_map_key=False, use_list=True)
        except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
            raise _corrupt(self, f"{type(exc).__name__}: {exc}") from None


class Pickle:
    """Any picklable value. Never a default, and only for trusted state: unpickling runs
    whatever code the bytes name, so a tampered checkpoint becomes code execution."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ValueError(f"pickle protocol must be in [0, {pickle.HIGHEST_PROTOCOL}]")
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"Pickle(protocol={self.protocol})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pickle) and other.protocol == self.protocol

    def __hash__(self) -> int:
        return hash((Pickle, self.protocol))

    def encode(self, value: Any) -> bytes:
        """Pickle ``value``."""
        try:
            return pickle.dumps(value, protocol=self.protocol)
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as exc:
            raise SerdeError(f"Pickle cannot encode {type(value).__name__}: {exc}") from None

    def decode(self, data: BytesLike) -> Any:
        """Unpickle ``data`` (trusted input only)."""
        try:
            return pickle.loads(byte_view(data))
        except Exception as exc:  # noqa: BLE001 - unpickling garbage can raise nearly anything
            raise _corrupt(self, f"{type(exc).__name__}: {exc}") from None


_BY_NAME: dict[str, Callable[[], Serde[Any]]] = {
    "int64": Int64,
    "float64": Float64,
    "utf8": Utf8,
    "bytes": Bytes,
    "json": Json,
    "msgpack": Msgpack,
    "pickle": Pickle,
}


def by_name(name: str) -> Serde[Any]:
    """A serde from its name (``"int64"``, ``"float64"``, ``"utf8"``, ``"bytes"``, ``"json"``,
    ``"msgpack"``, ``"pickle"``), for configuration files. ``"pickle"`` must be spelled out:
    nothing falls back to it."""
    try:
        factory = _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown serde {name!r}; choose from {sorted(_BY_NAME)}") from None
    return factory()
