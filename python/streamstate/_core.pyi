"""Type stubs for streamstate's compiled core. Use the public names in ``streamstate``."""

from collections.abc import Iterable

from ._typing import BytesLike

CorruptDataError: type[Exception]
SpillError: type[Exception]

# -- checksum --
def crc32c(data: BytesLike, value: int = 0) -> int: ...
def crc32c_portable(data: BytesLike, value: int = 0) -> int: ...
def crc32c_is_hardware() -> bool: ...
def sha256_hex(data: BytesLike) -> str: ...
def _noop() -> None: ...

# -- lz4 block --
def lz4_compress(data: BytesLike) -> bytes: ...
def lz4_decompress(data: BytesLike, max_size: int = 1073741824) -> bytes: ...

# -- record codec --
def encode_records(kind: int, records: Iterable[tuple[BytesLike, BytesLike]]) -> bytes: ...
def decode_records(data: BytesLike) -> tuple[int, list[tuple[bytes, bytes]]]: ...

# -- aggregate store (issue 3) --

# -- keyed state (issue 4) --

# -- spilling aggregator (issue 5) --

# -- checkpoint batcher (issue 6) --
