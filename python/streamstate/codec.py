"""The snapshot container every streamstate component writes its state in.

Layout (all integers little-endian)::

    "SSRC" | u16 version | u16 kind | u32 count | count x (u32 len, key, u32 len, value) | u32 CRC

The trailing CRC32C (LevelDB-masked) covers every byte before it. :class:`RecordKind` names
the kinds in use (it is the C++ enum itself, read from ``_core``); the delta format written
in this container lives beside it, in :mod:`streamstate.delta`. Decoding validates the
whole container before returning anything and raises :class:`~streamstate.CorruptDataError`
with the reason (bad magic, unsupported version, checksum mismatch, truncated at ...).
"""

from __future__ import annotations

from collections.abc import Iterable

from . import _core

# RecordKind is defined once, in C++ (src/core/record_codec.h), and exported as an IntEnum.
from ._core import RecordKind, crc32c, lz4_compress, lz4_decompress, sha256_hex
from ._typing import BytesLike

__all__ = [
    "RecordKind",
    "crc32c",
    "decode_records",
    "encode_records",
    "lz4_compress",
    "lz4_decompress",
    "sha256_hex",
]


def encode_records(kind: int, records: Iterable[tuple[BytesLike, BytesLike]]) -> bytes:
    """Encode ``(key, value)`` byte pairs into a checksummed container tagged ``kind``.

    ``kind`` is an integer in ``[0, 65535]``; :class:`RecordKind` names the ones in use.
    """
    return _core.encode_records(kind, records)  # the core checks kind's type and range


def decode_records(data: BytesLike) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Validate and decode a container into ``(kind, [(key, value), ...])``."""
    return _core.decode_records(data)
