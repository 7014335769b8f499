"""The delta format of incremental checkpoints (streamstate.delta)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamstate as ss
from streamstate.codec import decode_records, encode_records
from streamstate.delta import (
    DELTA_KIND,
    apply_record_delta,
    encode_delta,
    validate_record_delta,
)

# -- the delta format --------------------------------------------------------------------

keys = st.binary(min_size=0, max_size=6)


@given(
    base=st.dictionaries(keys, st.binary(max_size=8), max_size=20),
    changes=st.lists(st.tuples(keys, st.none() | st.binary(max_size=8)), max_size=30),
    kind=st.integers(0, 0xFFFF).filter(lambda k: k != DELTA_KIND),
)
def test_record_delta_matches_a_dict_overlay(
    base: dict[bytes, bytes], changes: list[tuple[bytes, bytes | None]], kind: int
) -> None:
    model = dict(base)
    for key, value in changes:
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    out = apply_record_delta(encode_records(kind, base.items()), encode_delta(changes))
    out_kind, records = decode_records(out)
    assert out_kind == kind
    # Updated keys keep their place; new (or deleted and re-added) keys go last, in order.
    assert records == list(model.items())


@given(
    a=st.lists(st.tuples(keys, st.none() | st.binary(max_size=4)), max_size=10),
    b=st.lists(st.tuples(keys, st.none() | st.binary(max_size=4)), max_size=10),
)
def test_record_deltas_compose_like_their_concatenation(
    a: list[tuple[bytes, bytes | None]], b: list[tuple[bytes, bytes | None]]
) -> None:
    base = encode_records(3, [(b"k", b"v"), (b"z", b"")])
    twice = apply_record_delta(apply_record_delta(base, encode_delta(a)), encode_delta(b))
    assert twice == apply_record_delta(base, encode_delta(a + b))


def test_record_delta_rejects_malformed_input() -> None:
    base = encode_records(0, [(b"a", b"1")])
    delta = encode_delta([(b"a", b"2")])
    with pytest.raises(ss.CorruptDataError, match="itself a delta"):
        apply_record_delta(delta, delta)
    with pytest.raises(ss.CorruptDataError, match="kind"):
        apply_record_delta(base, base)
    with pytest.raises(ss.CorruptDataError, match="tag"):
        apply_record_delta(base, encode_records(DELTA_KIND, [(b"a", b"\x07x")]))
    with pytest.raises(ss.CorruptDataError):
        apply_record_delta(base, delta[:-1])


def test_validate_record_delta_accepts_exactly_what_apply_can_apply() -> None:
    good = encode_delta([(b"a", b"1"), (b"b", None)])
    validate_record_delta(good)
    validate_record_delta(encode_delta([]))
    bad = {
        b"opaque": "record codec",
        encode_records(0, [(b"a", b"\x011")]): "kind",
        encode_records(DELTA_KIND, [(b"a", b"\x07x")]): "tag",
        encode_records(DELTA_KIND, [(b"a", b"")]): "tag",
        encode_records(DELTA_KIND, [(b"a", b"\x00extra")]): "tag",
        good[:-1]: "truncated|CRC|checksum",
    }
    base = encode_records(0, [(b"a", b"0")])
    for data, reason in bad.items():
        with pytest.raises(ss.CorruptDataError, match=reason):
            validate_record_delta(data)
        with pytest.raises(ss.CorruptDataError):
            apply_record_delta(base, data)


def test_the_delta_names_live_in_streamstate_delta_and_stay_importable_from_checkpoint() -> None:
    from streamstate import checkpoint, delta

    for name in ("DELTA_KIND", "DeltaFunction", "apply_record_delta", "encode_delta"):
        assert getattr(checkpoint, name) is getattr(delta, name)
    assert ss.encode_delta is delta.encode_delta and DELTA_KIND == 0xDE17
