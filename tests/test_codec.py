"""The snapshot container: round trips, strict validation, every-byte mutation."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamstate
from streamstate import CorruptDataError
from streamstate.codec import RecordKind, decode_records, encode_records
from streamstate.testing import assert_corruption_detected, record_snapshots

records_strategy = st.lists(st.tuples(st.binary(max_size=64), st.binary(max_size=256)), max_size=40)


@given(st.integers(0, 0xFFFF), records_strategy)
def test_round_trip(kind: int, records: list[tuple[bytes, bytes]]) -> None:
    assert decode_records(encode_records(kind, records)) == (kind, records)


def test_layout() -> None:
    blob = encode_records(RecordKind.STATE_BACKEND, [(b"k", b"vv")])
    assert blob[:4] == b"SSRC"
    version, kind, count = struct.unpack_from("<HHI", blob, 4)
    assert (version, kind, count) == (1, 3, 1)
    assert blob[12:16] == struct.pack("<I", 1) and blob[16:17] == b"k"
    assert len(blob) == 12 + (4 + 1 + 4 + 2) + 4


def test_accepts_bytes_like_records() -> None:
    blob = encode_records(0, [(bytearray(b"a"), memoryview(b"b"))])
    assert decode_records(blob) == (0, [(b"a", b"b")])


def test_every_byte_flip_is_detected() -> None:
    blob = encode_records(2, [(b"alpha", b"1"), (b"beta", b"\x00" * 10), (b"", b"")])
    for i in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            damaged = bytearray(blob)
            damaged[i] ^= flip
            with pytest.raises(CorruptDataError):
                decode_records(bytes(damaged))


def test_every_truncation_is_detected() -> None:
    blob = encode_records(1, [(b"alpha", b"1"), (b"beta", b"22")])
    for n in range(len(blob)):
        with pytest.raises(CorruptDataError):
            decode_records(blob[:n])


def _reseal(body: bytes) -> bytes:
    """Append a valid masked CRC so a test reaches the structural checks behind it."""
    crc = streamstate.crc32c(body)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return body + struct.pack("<I", masked)


def test_messages_say_what_is_wrong() -> None:
    good = encode_records(0, [(b"k", b"v")])
    with pytest.raises(CorruptDataError, match="bad magic"):
        decode_records(b"XXXX" + good[4:])
    with pytest.raises(CorruptDataError, match="unsupported version 9"):
        decode_records(good[:4] + struct.pack("<H", 9) + good[6:])
    with pytest.raises(CorruptDataError, match="checksum mismatch"):
        decode_records(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CorruptDataError, match="truncated"):
        decode_records(good[:10])
    # A correctly checksummed container whose count claims more entries than bytes allow.
    huge_count = good[:8] + struct.pack("<I", 0xFFFFFFFF) + good[12:-4]
    with pytest.raises(CorruptDataError, match="cannot fit"):
        decode_records(_reseal(huge_count))
    # A key length running past the end.
    long_key = good[:12] + struct.pack("<I", 1000) + good[16:-4]
    with pytest.raises(CorruptDataError, match="truncated at byte"):
        decode_records(_reseal(long_key))
    trailing = good[:-4] + b"extra"
    with pytest.raises(CorruptDataError, match="unexpected bytes"):
        decode_records(_reseal(trailing))


@given(st.binary(max_size=300))
def test_garbage_only_ever_raises_corrupt_data(blob: bytes) -> None:
    try:
        kind, records = decode_records(blob)
    except CorruptDataError:
        return
    assert encode_records(kind, records) == blob


def test_errors_are_value_errors_and_streamstate_errors() -> None:
    with pytest.raises(ValueError):
        decode_records(b"nope")
    with pytest.raises(streamstate.StreamStateError):
        decode_records(b"nope")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        encode_records(70_000, [])
    with pytest.raises(TypeError):
        encode_records(0, [(b"only-one",)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        encode_records(0, [("str", b"v")])  # type: ignore[list-item]


def test_record_kind_is_the_one_defined_in_the_core() -> None:
    import enum

    from streamstate import _core

    assert RecordKind is _core.RecordKind and issubclass(RecordKind, enum.IntEnum)
    assert {k.name: int(k) for k in RecordKind} == {
        "USER": 0, "AGGREGATE_STORE": 1, "NUMERIC_AGGREGATE_STORE": 2, "STATE_BACKEND": 3,
        "SPILL_RUN": 4, "NUMERIC_AGGREGATE_STORE_DELTA": 5, "AGGREGATE_STORE_DELTA": 6,
        "STATE_BACKEND_DELTA": 7, "WINDOW_STORE": 8, "WINDOW_STORE_DELTA": 9, "DELTA": 0xDE17,
    }  # fmt: skip
    # What the C++ components write carries these tags.
    assert decode_records(streamstate.NumericAggregateStore(1).snapshot())[0] == (
        RecordKind.NUMERIC_AGGREGATE_STORE
    )
    assert decode_records(streamstate.encode_delta([]))[0] == RecordKind.DELTA
    windows = streamstate.WindowedAggregateStore(1, kind="tumbling", size=10)
    assert decode_records(windows.snapshot())[0] == RecordKind.WINDOW_STORE
    assert decode_records(windows.snapshot_delta())[0] == RecordKind.WINDOW_STORE_DELTA


@settings(max_examples=30)
@given(record_snapshots(max_records=4, max_size=16))
def test_any_container_detects_every_flip_and_truncation(blob: bytes) -> None:
    assert_corruption_detected(decode_records, blob)


def test_wrong_argument_types_say_what_was_expected() -> None:
    with pytest.raises(TypeError, match="kind must be an int"):
        encode_records("x", [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="records must be an iterable"):
        encode_records(0, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="entries must be an iterable"):
        streamstate.encode_batch(5)  # type: ignore[arg-type]
