"""Type aliases shared by the public modules."""

from __future__ import annotations

from typing import TypeAlias

# Anything exposing a C-contiguous buffer: bytes, bytearray, memoryview, numpy arrays.
BytesLike: TypeAlias = bytes | bytearray | memoryview

__all__ = ["BytesLike"]
