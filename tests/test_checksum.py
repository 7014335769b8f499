"""CRC32C and SHA-256: known answers, agreement with independent implementations, threads."""

from __future__ import annotations

import hashlib
import threading

import google_crc32c
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamstate
from streamstate import _core

# RFC 3720 (iSCSI) appendix B.4 test vectors and the classic check value.
CRC32C_VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"a", 0xC1D04330),
]


@pytest.mark.parametrize(("data", "expected"), CRC32C_VECTORS)
def test_crc32c_known_answers(data: bytes, expected: int) -> None:
    assert streamstate.crc32c(data) == expected
    assert _core.crc32c_portable(data) == expected


# Sizes around every loop boundary of the hardware path (8-byte words, 3 x 256, 3 x 8192).
BOUNDARY_SIZES = [0, 1, 7, 8, 9, 767, 768, 769, 1000, 24575, 24576, 24577, 49153, 100_000]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_crc32c_matches_google_crc32c_at_loop_boundaries(size: int, offset: int) -> None:
    rng = np.random.default_rng(size * 7 + offset)
    buffer = rng.integers(0, 256, size + offset, dtype=np.uint8).tobytes()
    view = memoryview(buffer)[offset:]  # unaligned starts exercise the alignment prologue
    expected = google_crc32c.value(bytes(view))
    assert streamstate.crc32c(view) == expected
    assert _core.crc32c_portable(view) == expected
    assert _core._crc32c_single_stream(view) == expected


@given(st.binary(max_size=5000), st.binary(max_size=5000))
def test_crc32c_continues_a_running_value(a: bytes, b: bytes) -> None:
    assert streamstate.crc32c(b, streamstate.crc32c(a)) == streamstate.crc32c(a + b)
    assert streamstate.crc32c(a + b) == google_crc32c.value(a + b)


def test_crc32c_accepts_every_contiguous_buffer() -> None:
    data = b"streamstate" * 100
    expected = streamstate.crc32c(data)
    assert streamstate.crc32c(bytearray(data)) == expected
    assert streamstate.crc32c(memoryview(data)) == expected
    assert streamstate.crc32c(np.frombuffer(data, dtype=np.uint8)) == expected


def test_crc32c_rejects_non_buffers_and_non_contiguous() -> None:
    with pytest.raises(TypeError):
        streamstate.crc32c("text is not bytes")  # type: ignore[arg-type]
    strided = np.arange(100, dtype=np.uint8)[::2]
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        streamstate.crc32c(strided)  # type: ignore[arg-type]


def test_crc32c_value_out_of_range() -> None:
    with pytest.raises(TypeError):
        streamstate.crc32c(b"x", -1)
    with pytest.raises(TypeError):
        streamstate.crc32c(b"x", 1 << 32)


def test_sha256_known_answers() -> None:
    assert (
        streamstate.sha256_hex(b"abc")
        == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert (
        streamstate.sha256_hex(b"")
        == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@given(st.binary(max_size=20_000))
def test_sha256_matches_hashlib(data: bytes) -> None:
    assert streamstate.sha256_hex(data) == hashlib.sha256(data).hexdigest()


def test_primitives_from_four_threads_at_once() -> None:
    rng = np.random.default_rng(1)
    buffers = [rng.integers(0, 256, 300_000 + i, dtype=np.uint8).tobytes() for i in range(8)]
    expected = [
        (google_crc32c.value(b), hashlib.sha256(b).hexdigest(), b) for b in buffers
    ]
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def worker(seed: int) -> None:
        barrier.wait()
        for round_ in range(20):
            i = (seed + round_) % len(buffers)
            crc, digest, data = expected[i]
            if streamstate.crc32c(buffers[i]) != crc:
                errors.append(f"crc mismatch on buffer {i}")
            if streamstate.sha256_hex(buffers[i]) != digest:
                errors.append(f"sha mismatch on buffer {i}")
            if streamstate.lz4_decompress(streamstate.lz4_compress(buffers[i])) != data:
                errors.append(f"lz4 mismatch on buffer {i}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
