"""Type aliases shared by the public modules, and the one way to read a bytes-like input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias, cast

if TYPE_CHECKING:
    import numpy.typing as npt
    from typing_extensions import Buffer

    #: Anything exposing a C-contiguous buffer: bytes, bytearray, memoryview, numpy arrays,
    #: mmap, ... (the buffer protocol, which the core's bindings take; see ``_core.pyi``).
    #: numpy arrays are named: numpy's stubs give them ``__buffer__`` only from Python 3.12.
    BytesLike: TypeAlias = Buffer | npt.NDArray[Any]
else:
    # At run time the alias only builds other aliases; typing_extensions is no dependency.
    BytesLike: TypeAlias = bytes | bytearray | memoryview

__all__ = ["BytesLike", "byte_view"]


def byte_view(data: BytesLike) -> memoryview:
    """``data``'s buffer as a memoryview; raises TypeError for what exports none (a str, an
    int, ...). Its ``nbytes``, unlike ``len()`` of a numpy array, counts bytes."""
    return memoryview(cast("Buffer", data))
