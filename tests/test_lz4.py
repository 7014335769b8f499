"""Size-prepended LZ4 blocks: round trips, python-lz4 interop, bounded decompression."""

from __future__ import annotations

import struct

import lz4.block
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamstate
from streamstate import CorruptDataError


@given(st.binary(max_size=50_000))
def test_round_trip(data: bytes) -> None:
    assert streamstate.lz4_decompress(streamstate.lz4_compress(data)) == data


@given(st.binary(max_size=50_000))
def test_python_lz4_reads_ours_and_we_read_theirs(data: bytes) -> None:
    ours = streamstate.lz4_compress(data)
    assert lz4.block.decompress(ours) == data
    theirs = lz4.block.compress(data, store_size=True)
    assert streamstate.lz4_decompress(theirs) == data


def test_layout_is_size_prefix_then_raw_block() -> None:
    data = b"abc" * 1000
    blob = streamstate.lz4_compress(data)
    (size,) = struct.unpack_from("<I", blob)
    assert size == len(data)
    assert lz4.block.decompress(blob[4:], uncompressed_size=len(data)) == data


def test_compresses_redundant_data() -> None:
    zeros = bytes(1 << 20)
    assert len(streamstate.lz4_compress(zeros)) < 5000


def test_empty_input_round_trips_both_ways() -> None:
    assert streamstate.lz4_decompress(streamstate.lz4_compress(b"")) == b""
    assert streamstate.lz4_decompress(lz4.block.compress(b"", store_size=True)) == b""


def test_accepts_numpy_and_memoryview() -> None:
    arr = np.arange(10_000, dtype=np.int64)
    blob = streamstate.lz4_compress(arr)
    assert np.frombuffer(streamstate.lz4_decompress(memoryview(blob)), dtype=np.int64).tolist() == (
        arr.tolist()
    )


def test_claimed_size_above_max_size_refused_before_allocating() -> None:
    blob = struct.pack("<I", 0xFFFFFFFF) + b"\x00" * 16
    with pytest.raises(CorruptDataError, match="exceeds max_size"):
        streamstate.lz4_decompress(blob, max_size=1 << 20)


def test_claimed_size_impossible_for_block_length() -> None:
    # 1 GiB claimed from a 10-byte block: no LZ4 block expands that much.
    blob = struct.pack("<I", 1 << 30) + b"\x00" * 10
    with pytest.raises(CorruptDataError, match="impossible"):
        streamstate.lz4_decompress(blob)


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01\x02\x03"])
def test_too_short_for_prefix(blob: bytes) -> None:
    with pytest.raises(CorruptDataError, match="too short"):
        streamstate.lz4_decompress(blob)


def test_truncated_block() -> None:
    blob = streamstate.lz4_compress(bytes(range(256)) * 64)
    with pytest.raises(CorruptDataError):
        streamstate.lz4_decompress(blob[:-5])


def test_size_prefix_that_lies_is_detected() -> None:
    data = bytes(range(256)) * 8
    blob = bytearray(streamstate.lz4_compress(data))
    struct.pack_into("<I", blob, 0, len(data) - 1)
    with pytest.raises(CorruptDataError):
        streamstate.lz4_decompress(bytes(blob))


@given(st.binary(min_size=4, max_size=2000))
def test_garbage_never_crashes(blob: bytes) -> None:
    try:
        out = streamstate.lz4_decompress(blob, max_size=1 << 20)
    except CorruptDataError:
        return
    assert len(out) == struct.unpack_from("<I", blob)[0]
