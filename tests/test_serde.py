"""Serdes: hypothesis round trips for every serde, order preservation where promised, and
clean errors (SerdeError out, CorruptDataError in) for everything else."""

from __future__ import annotations

import inspect
import math
import pickle
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamstate
from streamstate import serde
from streamstate.serde import (
    Bytes,
    Float64,
    Int64,
    Json,
    Msgpack,
    Pickle,
    Serde,
    SerdeError,
    Utf8,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=20,
)
MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | TEXT
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            TEXT | st.integers(min_value=-(2**63), max_value=2**63 - 1), inner, max_size=5
        )
    ),
    max_leaves=20,
)
PICKLE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers(), max_size=5)
        | st.dictionaries(TEXT, inner, max_size=5)
    ),
    max_leaves=20,
)


def float_bits(x: float) -> int:
    return int(struct.unpack(">Q", struct.pack(">d", x))[0])


# ---- round trips ------------------------------------------------------------------------


@given(INT64)
def test_int64_round_trip(x: int) -> None:
    encoded = Int64().encode(x)
    assert len(encoded) == 8
    assert Int64().decode(encoded) == x


@given(st.floats())
def test_float64_round_trip_keeps_exact_bits(x: float) -> None:
    decoded = Float64().decode(Float64().encode(x))
    assert float_bits(decoded) == float_bits(x)  # NaN payloads and -0.0 included


@given(TEXT)
def test_utf8_round_trip(text: str) -> None:
    assert Utf8().decode(Utf8().encode(text)) == text


@given(st.binary())
def test_bytes_round_trip(data: bytes) -> None:
    assert Bytes().decode(Bytes().encode(data)) == data
    assert Bytes().encode(bytearray(data)) == data
    assert Bytes().encode(memoryview(data)) == data


@given(JSON_VALUES)
def test_json_round_trip(value: Any) -> None:
    assert Json().decode(Json().encode(value)) == value


@given(MSGPACK_VALUES)
def test_msgpack_round_trip(value: Any) -> None:
    assert Msgpack().decode(Msgpack().encode(value)) == value


@given(PICKLE_VALUES)
def test_pickle_round_trip(value: Any) -> None:
    assert Pickle().decode(Pickle().encode(value)) == value


@given(st.dictionaries(TEXT, st.integers(), max_size=8))
def test_json_equal_values_encode_to_equal_bytes(mapping: dict[str, int]) -> None:
    reordered = dict(reversed(list(mapping.items())))
    assert Json().encode(mapping) == Json().encode(reordered)


# ---- order preservation -----------------------------------------------------------------


@given(INT64, INT64)
def test_int64_encoding_sorts_like_the_numbers(a: int, b: int) -> None:
    ea, eb = Int64().encode(a), Int64().encode(b)
    assert (ea < eb) == (a < b)
    assert (ea == eb) == (a == b)


@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_float64_encoding_sorts_like_the_numbers(a: float, b: float) -> None:
    ea, eb = Float64().encode(a), Float64().encode(b)
    if a < b:
        assert ea < eb
    if ea < eb:
        assert a <= b  # -0.0 sorts just below 0.0


@given(TEXT, TEXT)
def test_utf8_encoding_sorts_by_code_point(a: str, b: str) -> None:
    assert (Utf8().encode(a) < Utf8().encode(b)) == (a < b)


def test_float64_orders_infinities_and_nan() -> None:
    f = Float64()
    ordered = [-math.inf, -1e300, -1.0, -0.0, 0.0, 5e-324, 1.0, math.inf]
    encoded = [f.encode(x) for x in ordered]
    assert encoded == sorted(encoded)
    assert f.encode(math.nan) > f.encode(math.inf)
    assert f.encode(3) == f.encode(3.0)  # ints are accepted as floats


# ---- decoding garbage never escapes as anything but CorruptDataError ----------------------


@pytest.mark.parametrize("serde_instance", [Int64(), Float64(), Utf8(), Bytes(), Json(), Msgpack()])
@given(data=st.binary(max_size=64))
def test_decoding_arbitrary_bytes_returns_or_raises_corrupt(
    serde_instance: Serde[Any], data: bytes
) -> None:
    try:
        serde_instance.decode(data)
    except streamstate.CorruptDataError:
        pass


@pytest.mark.parametrize(
    ("serde_instance", "data"),
    [
        (Int64(), b"\x00" * 7),
        (Int64(), b"\x00" * 9),
        (Float64(), b""),
        (Utf8(), b"\xff\xfe"),
        (Utf8(), b"\xed\xa0\x80"),  # an encoded surrogate is not UTF-8
        (Json(), b"{"),
        (Json(), b"NaN"),
        (Json(), b"[1] trailing"),
        (Json(), b"\xff"),
        (Msgpack(), b"\x93\x01"),  # array of 3 with one element
        (Msgpack(), b"\x01\x02"),  # trailing bytes after a complete object
        (Msgpack(), b"\xc1"),  # never-used byte
        (Pickle(), b""),
        (Pickle(), pickle.dumps([1, 2, 3])[:-3]),
        (Pickle(), b"not a pickle"),
    ],
)
def test_corrupt_inputs_raise_corrupt_data_error(serde_instance: Serde[Any], data: bytes) -> None:
    with pytest.raises(streamstate.CorruptDataError) as info:
        serde_instance.decode(data)
    assert type(serde_instance).__name__ in str(info.value)
    assert isinstance(info.value, ValueError)


# ---- encoding refuses what it cannot represent ---------------------------------------------


@pytest.mark.parametrize(
    ("serde_instance", "value"),
    [
        (Int64(), 2**63),
        (Int64(), -(2**63) - 1),
        (Int64(), "1"),
        (Int64(), 1.5),
        (Int64(), True),
        (Float64(), "1.0"),
        (Float64(), 10**400),
        (Utf8(), b"bytes"),
        (Utf8(), "\ud800"),
        (Bytes(), "text"),
        (Bytes(), 5),  # bytes(5) would silently make five zero bytes
        (Json(), math.nan),
        (Json(), {1: 2, "a": 3}),  # keys cannot be sorted
        (Json(), object()),
        (Msgpack(), object()),
        (Msgpack(), 2**64),
        (Pickle(), lambda: None),
    ],
)
def test_unencodable_values_raise_serde_error(serde_instance: Serde[Any], value: Any) -> None:
    with pytest.raises(SerdeError):
        serde_instance.encode(value)


def test_serde_error_is_a_streamstate_value_error() -> None:
    assert issubclass(SerdeError, streamstate.StreamStateError)
    assert issubclass(SerdeError, ValueError)


def test_int64_accepts_index_types() -> None:
    assert Int64().decode(Int64().encode(np.int64(-7))) == -7


# ---- names, defaults, equality ---------------------------------------------------------------


def test_by_name_returns_each_serde_and_pickle_only_when_spelled_out() -> None:
    assert serde.by_name("int64") == Int64()
    assert serde.by_name("FLOAT64") == Float64()
    assert serde.by_name("utf8") == Utf8()
    assert serde.by_name("bytes") == Bytes()
    assert serde.by_name("json") == Json()
    assert serde.by_name("msgpack") == Msgpack()
    assert serde.by_name("pickle") == Pickle()
    with pytest.raises(ValueError, match="unknown serde"):
        serde.by_name("pickl")


def test_no_typed_state_defaults_to_any_serde() -> None:
    for cls in (
        streamstate.KeyedStateStore,
        streamstate.ListState,
        streamstate.MapState,
        streamstate.AggregatingState,
    ):
        for name, parameter in inspect.signature(cls).parameters.items():
            if "serde" in name:
                assert parameter.default is inspect.Parameter.empty, (cls, name)


def test_equality_hash_and_repr() -> None:
    assert Int64() == Int64() and Int64() != Float64()
    assert hash(Utf8()) == hash(Utf8())
    assert repr(Json()) == "Json()"
    assert Pickle(4) == Pickle(4) and Pickle(4) != Pickle(5)
    assert repr(Pickle(4)) == "Pickle(protocol=4)"
    with pytest.raises(ValueError):
        Pickle(protocol=99)
    for instance in (Int64(), Float64(), Utf8(), Bytes(), Json(), Msgpack(), Pickle()):
        assert isinstance(instance, Serde)
