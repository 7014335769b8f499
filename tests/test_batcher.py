"""Tests of the LCB1 checkpoint-batch codec and CheckpointBatcher.

Batches "from the other side" are built here the way the Rust reference writes them:
struct for the header, python-lz4 for the size-prepended block, google-crc32c for the
checksum; none of that touches streamstate's encoder.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import random
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import lz4.block
import obstore
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import LocalStore, MemoryStore

import streamstate
from streamstate import (
    BatchMetrics,
    CheckpointBatcher,
    CheckpointError,
    CorruptDataError,
    decode_batch,
    encode_batch,
)
from streamstate.batcher import BatchCompression, auto_compression, encode_batch_into
from streamstate.retry import RetryPolicy
from streamstate.storage import CheckpointStorage

# -- an independent implementation of the format (the reference's encode, in Python) ------


def ref_body(entries: list[tuple[str, bytes]]) -> bytes:
    parts = []
    for key, data in entries:
        k = key.encode("utf-8")
        parts += [struct.pack("<I", len(k)), k, struct.pack("<I", len(data)), data]
    return b"".join(parts)


def ref_batch(
    entries: list[tuple[str, bytes]],
    version: int = 2,
    *,
    mode: str = "default",
    count: int | None = None,
    body: bytes | None = None,
) -> bytes:
    """What the Rust CheckpointBatcher writes: header, then lz4 compress_prepend_size(body);
    version 2 adds the CRC32C of the compressed bytes (size prefix included)."""
    body = ref_body(entries) if body is None else body
    compressed = lz4.block.compress(body, mode=mode, store_size=True)
    n = len(entries) if count is None else count
    header = b"LCB1" + struct.pack("<III", version, n, len(body))
    if version == 2:
        header += struct.pack("<I", google_crc32c.value(compressed))
    return header + compressed


def ref_decode(raw: bytes) -> tuple[int, list[tuple[str, bytes]]]:
    """The reference's decode (strict about what it checks), in Python."""
    assert raw[:4] == b"LCB1"
    version, count, size = struct.unpack_from("<III", raw, 4)
    start = 16 if version == 1 else 20
    if version == 2:
        assert struct.unpack_from("<I", raw, 16)[0] == google_crc32c.value(raw[20:])
    body = lz4.block.decompress(raw[start:])
    assert len(body) == size
    out, pos = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<I", body, pos)
        key = body[pos + 4 : pos + 4 + n].decode("utf-8")
        pos += 4 + n
        (n,) = struct.unpack_from("<I", body, pos)
        out.append((key, body[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert pos == len(body)
    return version, out


def literal_block_batch(body: bytes, count: int, version: int = 2) -> bytes:
    """A batch around a literals-only LZ4 block written byte by byte from the LZ4 spec."""
    n = len(body)
    token = bytes([min(n, 15) << 4])
    extra = b""
    if n >= 15:
        rest = n - 15
        extra = b"\xff" * (rest // 255) + bytes([rest % 255])
    compressed = struct.pack("<I", n) + token + extra + body
    header = b"LCB1" + struct.pack("<III", version, count, n)
    if version == 2:
        header += struct.pack("<I", google_crc32c.value(compressed))
    return header + compressed


ENTRIES = [
    ("partition-0/state", b"\x01" * 500),
    ("partition-1/state", b"\x02" * 300),
    ("partition-2/agg", b"\x03" * 200),
]

keys = st.text(max_size=40)
blobs = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(0, 500)),
)
entry_lists = st.lists(st.tuples(keys, blobs), max_size=25)


# -- format: known answers and interop ----------------------------------------------------


def test_known_answer_vector_from_the_spec() -> None:
    # [("a", b"xyz")]: body 01000000 61 03000000 78797a; block = token 0xc0 + 12 literals.
    expected = bytes.fromhex(
        "4c434231"  # magic "LCB1"
        "02000000"  # version 2
        "01000000"  # entry count
        "0c000000"  # uncompressed size 12
        "718d87d2"  # CRC32C of the 17 bytes below
        "0c000000"  # size prefix of the compressed body
        "c0"  # LZ4 token: 12 literals, no match
        "01000000"
        "61"
        "03000000"
        "78797a"  # the body, as literals
    )
    assert literal_block_batch(ref_body([("a", b"xyz")]), 1) == expected
    assert google_crc32c.value(expected[20:]) == 0xD2878D71
    assert decode_batch(expected) == [("a", b"xyz")]
    # Too small to compress, so our encoder writes exactly these bytes.
    assert encode_batch([("a", b"xyz")]) == expected


def test_version_1_and_2_from_the_reference_encoder_decode() -> None:
    for version in (1, 2):
        for mode in ("default", "fast", "high_compression"):
            raw = ref_batch(ENTRIES, version, mode=mode)
            assert decode_batch(raw) == ENTRIES
    v1 = literal_block_batch(ref_body(ENTRIES), 3, version=1)
    assert len(ref_body(ENTRIES)) == 1073
    assert len(v1) == 16 + 4 + 1 + 5 + 1073  # header, prefix, token, 4x255 + 38, body
    assert decode_batch(v1) == ENTRIES


def test_our_batches_follow_the_reference_layout() -> None:
    raw = encode_batch(ENTRIES)
    magic, version, count, size, crc = struct.unpack_from("<4sIIII", raw)
    assert (magic, version, count) == (b"LCB1", 2, 3)
    assert size == len(ref_body(ENTRIES)) == struct.unpack_from("<I", raw, 20)[0]
    assert crc == google_crc32c.value(raw[20:])  # over the compressed body incl. its prefix
    assert lz4.block.decompress(raw[20:]) == ref_body(ENTRIES)  # python-lz4 reads our block
    assert ref_decode(raw) == (2, ENTRIES)


def test_large_batches_interoperate_with_python_lz4_both_ways() -> None:
    # Several MiB: above the threshold where the body is rendered and copied in parallel slices.
    rng = random.Random(1)
    entries = []
    for i in range(120):
        kind = i % 3
        size = rng.randrange(0, 90_000)
        if kind == 0:
            data = rng.randbytes(size)
        elif kind == 1:
            data = bytes(size)
        else:
            data = b"".join(
                struct.pack("<qd", rng.randrange(100), rng.random()) for _ in range(size // 16)
            )
        entries.append((f"partition-{i % 7}/op-{i}", data))
    raw = encode_batch(entries)
    assert len(ref_body(entries)) > 3 << 20
    assert ref_decode(raw) == (2, entries)
    assert decode_batch(raw) == entries
    assert decode_batch(ref_batch(entries)) == entries
    assert decode_batch(ref_batch(entries, 1, mode="high_compression")) == entries


@given(entry_lists)
def test_round_trip(entries: list[tuple[str, bytes]]) -> None:
    raw = encode_batch(entries)
    assert decode_batch(raw) == entries
    assert ref_decode(raw) == (2, entries)


@given(entry_lists, st.sampled_from(["lz4", "stored", "auto"]))
def test_round_trip_in_every_compression(
    entries: list[tuple[str, bytes]], compression: BatchCompression
) -> None:
    raw = encode_batch(entries, compression=compression)
    assert decode_batch(raw) == entries
    assert ref_decode(raw) == (2, entries)
    if compression == "stored":  # one run of literals, byte for byte the reference layout
        assert raw == literal_block_batch(ref_body(entries), len(entries))


def test_auto_stores_what_does_not_halve_and_compresses_what_does() -> None:
    rng = random.Random(3)
    # Float partials (a key, a count and random doubles per entry) barely compress.
    partials = b"".join(
        struct.pack("<qq5d", rng.randrange(1 << 20), rng.randrange(9), *(rng.random() for _ in range(5)))
        for _ in range(40_000)
    )
    entries = [("v", partials)]
    stored = encode_batch(entries, compression="auto")
    assert stored == encode_batch(entries, compression="stored")
    assert len(encode_batch(entries)) < len(stored)  # LZ4 would save a little
    assert lz4.block.decompress(stored[20:]) == ref_body(entries)
    # Repetitive data halves easily, so auto compresses it.
    repetitive = [("v", b"0123456789abcdef" * (1 << 17))]
    assert encode_batch(repetitive, compression="auto") == encode_batch(repetitive)
    # Below 1 MiB auto compresses whatever the data.
    small = [("v", partials[: 100_000])]
    assert encode_batch(small, compression="auto") == encode_batch(small)
    for compression in ("stored", "auto"):
        assert decode_batch(encode_batch(entries, compression=compression)) == entries


@given(entry_lists, st.sampled_from(["lz4", "stored", "auto"]))
def test_encode_batch_into_writes_what_encode_batch_returns(
    entries: list[tuple[str, bytes]], compression: BatchCompression
) -> None:
    out = bytearray(b"stale" * 1000)
    encode_batch_into(entries, out, compression=compression)
    assert bytes(out) == encode_batch(entries, compression=compression)
    encode_batch_into(entries[:1], out, compression=compression)  # reused: shrinks or grows
    assert bytes(out) == encode_batch(entries[:1], compression=compression)


def test_encode_batch_into_refuses_what_it_cannot_resize() -> None:
    with pytest.raises(TypeError, match="bytearray"):
        encode_batch_into(ENTRIES, b"")  # type: ignore[arg-type]
    out = bytearray(b"kept")
    view = memoryview(out)
    with pytest.raises(BufferError):
        encode_batch_into(ENTRIES, out)
    assert bytes(view) == b"kept"  # refused before anything was written
    view.release()
    with pytest.raises(BufferError):  # out cannot be one of its own entries either
        encode_batch_into([("self", out)], out)
    encode_batch_into(ENTRIES, out)
    assert decode_batch(out) == ENTRIES


def test_compression_is_validated() -> None:
    with pytest.raises(ValueError, match="compression must be"):
        encode_batch(ENTRIES, compression="zstd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="compression must be a str"):
        encode_batch(ENTRIES, compression=1)  # type: ignore[arg-type]


@given(entry_lists, st.sampled_from([1, 2]))
def test_reference_batches_decode(entries: list[tuple[str, bytes]], version: int) -> None:
    assert decode_batch(ref_batch(entries, version)) == entries


def test_bytes_like_data_and_generators() -> None:
    data = bytearray(b"abc" * 100)
    entries = [("a", data), ("b", memoryview(b"xyz")), ("c", b"")]
    expected = [("a", bytes(data)), ("b", b"xyz"), ("c", b"")]
    assert decode_batch(encode_batch(entries)) == expected
    assert decode_batch(encode_batch(iter(entries))) == expected
    assert decode_batch(encode_batch([["a", data]])) == expected[:1]
    assert decode_batch(bytearray(encode_batch(expected))) == expected
    assert decode_batch(memoryview(encode_batch(expected))) == expected
    assert decode_batch(encode_batch([])) == []


def test_threaded_encode_and_decode_match_serial() -> None:
    rng = random.Random(2)
    batches = [
        [(f"k{i}-{j}", rng.randbytes(rng.randrange(50_000)) * 2) for j in range(30)]
        for i in range(8)
    ]
    serial = [encode_batch(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(encode_batch, batches))
        decoded = list(pool.map(decode_batch, threaded))
    assert [decode_batch(r) for r in threaded] == batches
    assert decoded == batches
    assert [ref_decode(r)[1] for r in serial] == batches


# -- format: strict decoding ---------------------------------------------------------------


def test_reference_error_cases() -> None:
    with pytest.raises(CorruptDataError, match="invalid batch magic"):
        decode_batch(b"XXXX\x01" + bytes(15))
    with pytest.raises(CorruptDataError, match="too short"):
        decode_batch(b"LCB")
    with pytest.raises(CorruptDataError, match="^unsupported batch version 99$"):
        decode_batch(b"LCB1" + struct.pack("<IIII", 99, 0, 0, 0))
    bad = bytearray(encode_batch(ENTRIES))
    bad[-1] ^= 0x40
    with pytest.raises(CorruptDataError, match="CRC32C mismatch"):
        decode_batch(bytes(bad))
    assert issubclass(CorruptDataError, ValueError)


def test_entry_count_trailing_bytes_and_utf8() -> None:
    body = ref_body(ENTRIES)
    with pytest.raises(CorruptDataError, match="entry count mismatch.*says 4 entries.*holds 3"):
        decode_batch(ref_batch(ENTRIES, count=4))
    with pytest.raises(CorruptDataError, match="entry count mismatch.*says 2 entries.*holds 3"):
        decode_batch(ref_batch(ENTRIES, count=2))
    with pytest.raises(CorruptDataError, match="5 trailing bytes"):
        decode_batch(ref_batch(ENTRIES, body=body + b"\x00" * 5))
    with pytest.raises(CorruptDataError, match="batch entry 2: .*truncated"):
        decode_batch(ref_batch(ENTRIES, body=body[:-10]))
    bad_key = struct.pack("<I", 2) + b"\xc3\x28" + struct.pack("<I", 1) + b"x"
    for version in (1, 2):
        with pytest.raises(CorruptDataError, match="entry 0: key is not valid UTF-8"):
            decode_batch(literal_block_batch(bad_key, 1, version))
    surrogate = struct.pack("<I", 3) + b"\xed\xa0\x80" + struct.pack("<I", 0)
    with pytest.raises(CorruptDataError, match="not valid UTF-8"):
        decode_batch(literal_block_batch(surrogate, 1))


def test_size_claims_beyond_the_input_are_refused_before_allocating() -> None:
    raw = bytearray(ref_batch(ENTRIES, version=1))
    # Claim 1 GiB from a ~40-byte block: more than LZ4 can expand it.
    struct.pack_into("<I", raw, 12, 1 << 30)
    struct.pack_into("<I", raw, 16, 1 << 30)
    with pytest.raises(CorruptDataError, match="impossible"):
        decode_batch(bytes(raw))
    struct.pack_into("<I", raw, 12, 0xFFFFFFF0)
    struct.pack_into("<I", raw, 16, 0xFFFFFFF0)
    with pytest.raises(CorruptDataError, match="exceeds"):
        decode_batch(bytes(raw))
    # The header's size and the body's size prefix must agree (the reference ignores the
    # header's; both come from the same length when written).
    raw = bytearray(ref_batch(ENTRIES, version=1))
    struct.pack_into("<I", raw, 12, 5)
    with pytest.raises(CorruptDataError, match="header claims 5 uncompressed bytes"):
        decode_batch(bytes(raw))
    # An entry count no body of this size can hold.
    with pytest.raises(CorruptDataError, match="cannot fit"):
        decode_batch(ref_batch(ENTRIES, count=10**9))


def test_every_bit_flip_of_a_v2_batch_is_detected() -> None:
    raw = encode_batch(ENTRIES + [("", b""), ("é", b"state")])
    for i in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            with pytest.raises(CorruptDataError):
                decode_batch(bytes(bad))


def test_every_byte_value_at_every_position_of_a_small_v2_batch_is_detected() -> None:
    raw = encode_batch([("k", b"v" * 40)])
    for i in range(len(raw)):
        for value in range(256):
            if value == raw[i]:
                continue
            bad = bytearray(raw)
            bad[i] = value
            with pytest.raises(CorruptDataError):
                decode_batch(bytes(bad))


def test_every_truncation_and_extension_is_detected() -> None:
    raw = encode_batch(ENTRIES)
    for n in range(len(raw)):
        with pytest.raises(CorruptDataError):
            decode_batch(raw[:n])
    with pytest.raises(CorruptDataError, match="CRC32C"):
        decode_batch(raw + b"\x00")


@settings(max_examples=300)
@given(st.data())
def test_fuzz_only_ever_raises_corrupt_data_error(data: st.DataObject) -> None:
    source = data.draw(st.sampled_from(["random", "header", "mutated", "mutated_v1"]))
    if source == "random":
        raw = data.draw(st.binary(max_size=300))
    elif source == "header":
        version = data.draw(st.sampled_from([1, 2]))
        raw = b"LCB1" + struct.pack("<I", version) + data.draw(st.binary(max_size=300))
    else:
        entries = data.draw(st.lists(st.tuples(keys, st.binary(max_size=200)), max_size=6))
        raw = bytearray(encode_batch(entries) if source == "mutated" else ref_batch(entries, 1))
        for _ in range(data.draw(st.integers(1, 6))):
            position = data.draw(st.integers(0, len(raw) - 1))
            raw[position] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            del raw[data.draw(st.integers(0, len(raw))) :]
        raw = bytes(raw)
    try:
        decoded = decode_batch(raw)
    except CorruptDataError:
        return
    # Whatever decodes is well formed: str keys, bytes data.
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in decoded)


# -- format: encoding refusals -----------------------------------------------------------


def test_encode_rejects_bad_entries() -> None:
    with pytest.raises(TypeError, match="keys must be str"):
        encode_batch([(b"bytes-key", b"x")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"\(key, data\) pair"):
        encode_batch([("k", b"x", b"y")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"\(key, data\) pair"):
        encode_batch(["kv"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        encode_batch([("k", 12)])  # type: ignore[list-item]
    with pytest.raises(UnicodeEncodeError):
        encode_batch([("\ud800", b"x")])


def test_encode_refuses_bodies_over_the_limits() -> None:
    # Anonymous mappings are never touched: the size is refused before any byte is read.
    with mmap.mmap(-1, 0x7E000000) as big:
        with pytest.raises(ValueError, match="LZ4's block limit of 2113929216 bytes"):
            encode_batch([("k", big)])
        with pytest.raises(ValueError, match="4 GiB limit"):
            encode_batch([("a", big), ("b", big), ("c", big)])


# -- CheckpointBatcher: the reference's tested behaviours ---------------------------------


def get(store: obstore.store.ObjectStore, path: str) -> bytes:
    return bytes(obstore.get(store, path).bytes())


def test_add_tracks_size() -> None:
    with CheckpointBatcher(MemoryStore(), flush_threshold=1024) as batcher:
        assert batcher.is_empty() and batcher.buffer_size == 0 and len(batcher) == 0
        batcher.add("key1", bytes(100))
        assert len(batcher) == 1 and not batcher.is_empty()
        assert batcher.buffer_size == 112  # key 4 + data 100 + 8
        batcher.add("ключ", b"")  # sizes count UTF-8 bytes
        assert batcher.buffer_size == 112 + 8 + 8


def test_should_flush_at_threshold() -> None:
    with CheckpointBatcher(MemoryStore(), flush_threshold=200) as batcher:
        assert not batcher.should_flush()
        batcher.add("k", bytes(100))
        assert not batcher.should_flush()
        batcher.add("k", bytes(100))
        assert batcher.should_flush()


def test_flush_empty_is_noop() -> None:
    store = MemoryStore()
    with CheckpointBatcher(store) as batcher:
        assert batcher.flush(1) is None
        assert batcher.flush_async(2).result() is None
        assert batcher.metrics == BatchMetrics()
        assert batcher.metrics.put_count == 0
    assert list(obstore.list(store)) == []


def test_flush_writes_object_at_expected_path() -> None:
    store = MemoryStore()
    with CheckpointBatcher(store, flush_threshold=1 << 20) as batcher:
        batcher.add("partition-0/agg", bytes([42]) * 256)
        batcher.add("partition-1/agg", bytes([99]) * 128)
        assert batcher.flush(7) == "checkpoints/batch-000007.lz4"
        assert batcher.is_empty() and batcher.buffer_size == 0
    raw = get(store, "checkpoints/batch-000007.lz4")
    assert decode_batch(raw) == [
        ("partition-0/agg", bytes([42]) * 256),
        ("partition-1/agg", bytes([99]) * 128),
    ]


def test_lz4_round_trip_of_three_entries() -> None:
    store = MemoryStore()
    with CheckpointBatcher(store) as batcher:
        for key, data in ENTRIES:
            batcher.add(key, data)
        path = batcher.flush(42)
        assert path == "checkpoints/batch-000042.lz4"
        assert decode_batch(get(store, path)) == ENTRIES
        assert ref_decode(get(store, path)) == (2, ENTRIES)
        assert batcher.read_epoch(42) == ENTRIES


def test_metrics_recorded_on_flush() -> None:
    with CheckpointBatcher(MemoryStore()) as batcher:
        batcher.add("k1", bytes(100))
        batcher.add("k2", bytes(200))
        path = batcher.flush(1)
        m = batcher.metrics
        assert (m.batches_flushed, m.entries_flushed, m.put_count) == (1, 2, 1)
        assert m.bytes_before_compression == (2 + 100 + 8) + (2 + 200 + 8)
        assert path is not None
        assert m.bytes_after_compression == len(get(batcher.store, path))
        assert 0 < m.compression_ratio < 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            m.put_count = 5  # type: ignore[misc]


def test_metrics_accumulate_across_flushes() -> None:
    with CheckpointBatcher(MemoryStore()) as batcher:
        batcher.add("k1", bytes(100))
        batcher.flush(1)
        first = batcher.metrics
        batcher.add("k2", bytes(200))
        batcher.add("k3", bytes(50))
        batcher.flush(2)
        m = batcher.metrics
        assert (m.batches_flushed, m.entries_flushed, m.put_count) == (2, 3, 2)
        assert first.batches_flushed == 1  # a snapshot, not a live view


def test_compression_reduces_size_of_zeros() -> None:
    with CheckpointBatcher(MemoryStore()) as batcher:
        batcher.add("big", bytes(10_000))
        batcher.flush(1)
        m = batcher.metrics
        assert m.bytes_after_compression < m.bytes_before_compression / 20


def test_flush_clears_buffer() -> None:
    with CheckpointBatcher(MemoryStore(), flush_threshold=64) as batcher:
        batcher.add("a", bytes(50))
        batcher.add("b", bytes(50))
        assert batcher.should_flush()
        batcher.flush(1)
        assert not batcher.should_flush() and batcher.is_empty() and batcher.buffer_size == 0


# -- CheckpointBatcher: naming, reading back, stores ---------------------------------------


def test_later_flushes_in_an_epoch_never_overwrite() -> None:
    store = MemoryStore()
    with CheckpointBatcher(store, prefix="nodes/abc123/") as batcher:
        paths = []
        for i in range(4):
            batcher.add(f"k{i}", f"v{i}".encode())
            paths.append(batcher.flush(5))
        assert paths == [
            "nodes/abc123/checkpoints/batch-000005.lz4",
            "nodes/abc123/checkpoints/batch-000005-1.lz4",
            "nodes/abc123/checkpoints/batch-000005-2.lz4",
            "nodes/abc123/checkpoints/batch-000005-3.lz4",
        ]
        assert batcher.read_epoch(5) == [(f"k{i}", f"v{i}".encode()) for i in range(4)]
        assert batcher.batch_paths(5) == paths
        assert batcher.read_epoch(6) == []
        # A second batcher on the same prefix (another process, a restart) takes the next name.
        with CheckpointBatcher(store, prefix="nodes/abc123/") as other:
            other.add("late", b"!")
            assert other.flush(5) == "nodes/abc123/checkpoints/batch-000005-4.lz4"
        assert batcher.read_epoch(5)[-1] == ("late", b"!")
        assert batcher.metrics.put_count == 4


def test_read_epoch_orders_by_suffix_number_and_ignores_other_objects() -> None:
    store = MemoryStore()
    batcher = CheckpointBatcher(store)
    for suffix in [0, 1, 2, 10, 11]:
        obstore.put(store, batcher.batch_path(3, suffix), encode_batch([(f"s{suffix}", b"")]))
    obstore.put(store, "checkpoints/batch-000003-x.lz4", b"not a batch")
    obstore.put(store, "checkpoints/batch-0000030.lz4", encode_batch([("epoch 30", b"")]))
    obstore.put(store, "checkpoints/sub/batch-000003.lz4", b"elsewhere")
    assert [k for k, _ in batcher.read_epoch(3)] == ["s0", "s1", "s2", "s10", "s11"]
    batcher.close()


def test_read_epoch_reads_reference_written_batches() -> None:
    store = MemoryStore()
    obstore.put(store, "checkpoints/batch-000009.lz4", ref_batch(ENTRIES[:1], 1))
    obstore.put(store, "checkpoints/batch-000009-1.lz4", ref_batch(ENTRIES[1:], 2))
    with CheckpointBatcher(store) as batcher:
        assert batcher.read_epoch(9) == ENTRIES


def test_read_epoch_names_a_damaged_object() -> None:
    store = MemoryStore()
    with CheckpointBatcher(store) as batcher:
        batcher.add("k", b"v")
        batcher.flush(1)
        obstore.put(store, "checkpoints/batch-000001-1.lz4", b"LCB1garbage")
        with pytest.raises(CorruptDataError, match=r"batch-000001-1\.lz4: .*unsupported"):
            batcher.read_epoch(1)


def test_url_and_path_stores(tmp_path: Path) -> None:
    with CheckpointBatcher(tmp_path.as_uri()) as batcher:
        assert isinstance(batcher.store, LocalStore)
        batcher.add("k", b"v")
        batcher.flush(1)
    assert decode_batch((tmp_path / "checkpoints" / "batch-000001.lz4").read_bytes()) == [
        ("k", b"v")
    ]
    with CheckpointBatcher("memory://") as batcher:
        assert isinstance(batcher.store, MemoryStore)
    with CheckpointBatcher(tmp_path / "sub") as batcher:
        batcher.add("k", b"v")
        batcher.flush(2)
    assert (tmp_path / "sub" / "checkpoints" / "batch-000002.lz4").exists()


def test_argument_validation_and_repr() -> None:
    with pytest.raises(ValueError):
        CheckpointBatcher(MemoryStore(), flush_threshold=0)
    with pytest.raises(TypeError):
        CheckpointBatcher(MemoryStore(), prefix=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="relative"):
        CheckpointBatcher(MemoryStore(), prefix="/abs/")
    with CheckpointBatcher(MemoryStore(), prefix="p/", flush_threshold=10) as batcher:
        with pytest.raises(TypeError):
            batcher.add(b"k", b"v")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            batcher.add("k", 5)  # type: ignore[arg-type]
        with pytest.raises(UnicodeEncodeError):
            batcher.add("\udc80", b"v")
        with pytest.raises(ValueError, match="non-negative"):
            batcher.flush(-1)
        with pytest.raises(TypeError):
            batcher.flush(True)
        assert len(batcher) == 0
        batcher.add("k", b"v")
        text = repr(batcher)
        assert "CheckpointBatcher(MemoryStore" in text and "prefix='p/'" in text
        assert "1 entries / 10 bytes buffered" in text
    assert "closed" in repr(batcher)


def test_add_copies_mutable_buffers() -> None:
    with CheckpointBatcher(MemoryStore()) as batcher:
        data = bytearray(b"before")
        batcher.add("k", data)
        data[:] = b"after!"
        batcher.flush(1)
        assert batcher.read_epoch(1) == [("k", b"before")]


def test_closed_batcher_refuses_work() -> None:
    batcher = CheckpointBatcher(MemoryStore())
    batcher.close()
    batcher.close()  # idempotent
    assert batcher.closed
    with pytest.raises(ValueError, match="closed"):
        batcher.add("k", b"v")
    with pytest.raises(ValueError, match="closed"):
        batcher.flush(1)


def test_add_refuses_to_grow_past_the_lz4_limit() -> None:
    with CheckpointBatcher(MemoryStore()) as batcher, mmap.mmap(-1, 0x7E000000) as big:
        with pytest.raises(ValueError, match="cannot fit in a batch"):
            batcher.add("k", big)  # refused before the copy
        assert batcher.is_empty()


# -- CheckpointBatcher: asynchronous flushes and failures ---------------------------------


def test_flush_async_lets_adds_continue_and_keeps_epochs_apart() -> None:
    store = MemoryStore()
    rng = random.Random(4)
    with CheckpointBatcher(store) as batcher:
        futures: list[Future[str | None]] = []
        expected = {}
        for epoch in range(1, 6):
            added = [(f"e{epoch}/p{i}", rng.randbytes(20_000)) for i in range(20)]
            for key, data in added:
                batcher.add(key, data)
            expected[epoch] = added
            futures.append(batcher.flush_async(epoch))
            assert batcher.is_empty()  # handed to the flush immediately
        assert [f.result(timeout=60) for f in futures] == [
            f"checkpoints/batch-{e:06d}.lz4" for e in range(1, 6)
        ]
        for epoch, added in expected.items():
            assert batcher.read_epoch(epoch) == added
        assert batcher.metrics.batches_flushed == 5


def test_concurrent_adds_during_flushes_lose_nothing() -> None:
    store = MemoryStore()
    n_threads, per_thread = 4, 300
    with CheckpointBatcher(store, flush_threshold=20_000) as batcher:

        def producer(t: int) -> None:
            for i in range(per_thread):
                batcher.add(f"t{t}/{i}", os.urandom(100))

        threads = [threading.Thread(target=producer, args=(t,)) for t in range(n_threads)]
        for thread in threads:
            thread.start()
        epoch = 0
        while any(thread.is_alive() for thread in threads):
            if batcher.should_flush():
                batcher.flush_async(epoch)
                epoch += 1
            time.sleep(0.0005)
        for thread in threads:
            thread.join()
        batcher.flush(epoch)
        seen = [key for e in range(epoch + 1) for key, _ in batcher.read_epoch(e)]
    assert sorted(seen) == sorted(f"t{t}/{i}" for t in range(n_threads) for i in range(per_thread))
    for t in range(n_threads):  # each producer's entries stay in order
        mine = [k for k in seen if k.startswith(f"t{t}/")]
        assert mine == [f"t{t}/{i}" for i in range(per_thread)]


def block_store(root: Path) -> Path:
    """Make every batch PUT under root fail: a file where the checkpoints directory goes."""
    blocker = root / "checkpoints"
    blocker.write_bytes(b"not a directory")
    return blocker


def test_failed_put_leaves_the_buffer_intact_and_a_retry_loses_nothing(tmp_path: Path) -> None:
    blocker = block_store(tmp_path)
    with CheckpointBatcher(LocalStore(str(tmp_path))) as batcher:
        for key, data in ENTRIES:
            batcher.add(key, data)
        size = batcher.buffer_size
        with pytest.raises(CheckpointError, match="PUT checkpoints/batch-000001.lz4 failed"):
            batcher.flush(1)
        assert len(batcher) == 3 and batcher.buffer_size == size
        m = batcher.metrics
        assert (m.batches_flushed, m.entries_flushed, m.put_count) == (0, 0, 1)
        batcher.add("after", b"failure")
        blocker.unlink()
        assert batcher.flush(1) == "checkpoints/batch-000001.lz4"
        assert batcher.read_epoch(1) == ENTRIES + [("after", b"failure")]
        assert batcher.metrics.batches_flushed == 1 and batcher.metrics.put_count == 2


def test_failed_async_flushes_hand_back_everything_in_order(tmp_path: Path) -> None:
    blocker = block_store(tmp_path)
    rng = random.Random(5)
    with CheckpointBatcher(LocalStore(str(tmp_path))) as batcher:
        # A big first batch keeps the worker busy, so the second flush usually queues behind
        # it and is handed back unattempted; either way the outcome is the same.
        first = [(f"a{i}", rng.randbytes(200_000)) for i in range(20)]
        second = [(f"b{i}", rng.randbytes(100)) for i in range(5)]
        for key, data in first:
            batcher.add(key, data)
        f1 = batcher.flush_async(1)
        for key, data in second:
            batcher.add(key, data)
        f2 = batcher.flush_async(2)
        for future in (f1, f2):
            with pytest.raises(CheckpointError):
                future.result(timeout=60)
        third = [("c0", b"later")]
        batcher.add(*third[0])
        assert len(batcher) == len(first) + len(second) + 1
        blocker.unlink()
        batcher.flush(3)
        assert batcher.read_epoch(3) == first + second + third
        assert batcher.read_epoch(1) == [] and batcher.read_epoch(2) == []


def test_permanent_failure_keeps_failing_without_losing_entries(tmp_path: Path) -> None:
    block_store(tmp_path)
    with CheckpointBatcher(LocalStore(str(tmp_path))) as batcher:
        batcher.add("k", b"v")
        for _ in range(3):
            with pytest.raises(CheckpointError):
                batcher.flush(1)
            assert len(batcher) == 1
        assert batcher.metrics.put_count == 3 and batcher.metrics.batches_flushed == 0


def test_close_waits_for_pending_flushes() -> None:
    store = MemoryStore()
    batcher = CheckpointBatcher(store)
    for i in range(30):
        batcher.add(f"k{i}", os.urandom(100_000))
    future = batcher.flush_async(1)
    batcher.close()
    assert future.done() and future.result() == "checkpoints/batch-000001.lz4"
    assert len(decode_batch(get(store, "checkpoints/batch-000001.lz4"))) == 30


def test_public_names() -> None:
    for name in ["CheckpointBatcher", "BatchMetrics", "encode_batch", "decode_batch"]:
        assert getattr(streamstate, name) is getattr(streamstate.batcher, name)


# -- bounds on what decoding may produce ---------------------------------------------------


def zero_bomb(zeros: int, key: str = "z") -> bytes:
    """A valid v2 batch of one entry holding ``zeros`` zero bytes, ~zeros/255 bytes long,
    written from the LZ4 spec: the entry header and one zero as literals, then a single
    offset-1 match repeating the zero, then the five literals LZ4 requires at the end."""
    k = key.encode()
    head = struct.pack("<I", len(k)) + k + struct.pack("<I", zeros)
    literals = head + b"\x00"
    match = zeros - 6  # 1 literal zero + the match + 5 final literal zeros
    rest = match - 4 - 15
    block = (
        bytes([(len(literals) << 4) | 15]) + literals + struct.pack("<H", 1)
        + b"\xff" * (rest // 255) + bytes([rest % 255])
        + bytes([5 << 4]) + b"\x00" * 5
    )  # fmt: skip
    assert len(literals) < 15
    size = len(head) + zeros
    compressed = struct.pack("<I", size) + block
    header = b"LCB1" + struct.pack("<IIII", 2, 1, size, google_crc32c.value(compressed))
    return header + compressed


def test_the_zero_bomb_is_a_real_batch() -> None:
    raw = zero_bomb(100_000)
    assert len(raw) < 1_000
    assert decode_batch(raw) == [("z", bytes(100_000))]
    assert ref_decode(raw) == (2, [("z", bytes(100_000))])


def test_decode_batch_refuses_bodies_over_max_size_before_allocating() -> None:
    raw = zero_bomb(1 << 20)
    body = 4 + 1 + 4 + (1 << 20)
    assert decode_batch(raw, max_size=body) == [("z", bytes(1 << 20))]
    with pytest.raises(CorruptDataError, match=f"exceeds max_size {body - 1}"):
        decode_batch(raw, max_size=body - 1)
    assert len(decode_batch(raw, max_size=None)[0][1]) == 1 << 20
    with pytest.raises(ValueError, match="max_size"):
        decode_batch(raw, max_size=-1)
    with pytest.raises(TypeError, match="int or None"):
        decode_batch(raw, max_size="big")  # type: ignore[arg-type]


def test_a_4_mib_batch_cannot_expand_to_a_gib_by_default() -> None:
    raw = zero_bomb(1 << 30)  # a real batch: 1 GiB of zeros in ~4 MiB
    assert len(raw) < 5 << 20
    start = time.perf_counter()
    with pytest.raises(CorruptDataError, match="exceeds max_size 1073741824"):
        decode_batch(raw)
    assert time.perf_counter() - start < 5.0  # refused up front, nothing decompressed


def test_read_epoch_bounds_the_total_across_batches() -> None:
    store = MemoryStore()
    with CheckpointBatcher(store) as batcher:
        for i in range(3):
            batcher.add(f"k{i}", bytes(1000))
            batcher.flush(1)
        per_batch = 2 + 1000 + 8
        assert len(batcher.read_epoch(1, max_size=3 * per_batch)) == 3
        with pytest.raises(CorruptDataError, match="batch-000001-2.lz4.*exceeds max_size"):
            batcher.read_epoch(1, max_size=3 * per_batch - 1)
        assert len(batcher.read_epoch(1, max_size=None)) == 3
        with pytest.raises(ValueError, match="max_size"):
            batcher.read_epoch(1, max_size=-5)


# -- one persistence path: the checkpointer's storage adapter and retry policy -------------


class FlakyStorage(CheckpointStorage):
    """Fails the first ``failures`` PUTs with a transient error (after they landed, for the
    odd ones: the response was "lost")."""

    def __init__(self, store: object, failures: int) -> None:
        super().__init__(store)  # type: ignore[arg-type]
        self.failures = failures
        self.puts = 0

    def put(self, path: str, data: object, *, mode: object = "overwrite") -> object:
        self.puts += 1
        if self.puts <= self.failures and self.puts % 2 == 0:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        result = super().put(path, data, mode=mode)  # type: ignore[arg-type]
        if self.puts <= self.failures:
            raise TimeoutError("operation timed out")
        return result


def test_batcher_writes_through_the_storage_adapter_with_retries() -> None:
    storage = FlakyStorage(MemoryStore(), failures=2)
    fast = RetryPolicy(initial_backoff=0.001, max_backoff=0.002)
    with CheckpointBatcher(storage, retry=fast) as batcher:
        assert batcher.store is storage.store
        batcher.add("k", b"v")
        # PUT 1 lands but times out, 2 is reset, 3 finds PUT 1's bytes: success, same name.
        assert batcher.flush(1) == "checkpoints/batch-000001.lz4"
        assert batcher.metrics.put_count == 3
        batcher.add("k2", b"v2")
        assert batcher.flush(1) == "checkpoints/batch-000001-1.lz4"
        assert batcher.read_epoch(1) == [("k", b"v"), ("k2", b"v2")]
    # Without retries the first transient fault fails the flush and keeps the entries.
    with CheckpointBatcher(FlakyStorage(MemoryStore(), failures=1),
                           retry=RetryPolicy(max_attempts=1)) as batcher:  # fmt: skip
        batcher.add("k", b"v")
        with pytest.raises(CheckpointError, match="PUT checkpoints/batch-000001.lz4 failed"):
            batcher.flush(1)
        assert len(batcher) == 1
        assert batcher.flush(1) == "checkpoints/batch-000001.lz4"


def test_auto_compression_names_what_auto_encodes() -> None:
    redundant = [("a", bytes(2 << 20))]
    noise = [("a", os.urandom(2 << 20))]
    small = [("a", os.urandom(1000))]
    assert auto_compression(redundant) == "lz4"
    assert auto_compression(noise) == "stored"
    assert auto_compression(small) == "lz4"  # under 1 MiB: always compressed
    for entries in (redundant, noise, small):
        chosen = auto_compression(entries)
        assert encode_batch(entries, compression="auto") == encode_batch(entries, compression=chosen)
    with pytest.raises(TypeError):
        auto_compression([(1, b"x")])  # type: ignore[list-item]
