"""Rules every binding of ``streamstate._core`` keeps (issue 14, issue 17).

Decoders never read a caller's buffer that another thread can change; an instance made by
``__new__`` alone refuses every method; wrong arguments raise errors that name what was
expected (never pybind's "incompatible function arguments"); every public name is documented.
"""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

import streamstate as ss
from streamstate import CorruptDataError, _core
from streamstate.codec import RecordKind, encode_records


def _pybind_classes() -> list[type]:
    return [
        value
        for value in vars(_core).values()
        if isinstance(value, type) and not issubclass(value, (BaseException, enum.Enum))
    ]


# ----------------------------------------------------------------------------------------
# Decoders and buffers another thread changes


def _aggregate_snapshot() -> bytes:
    store = _core.AggregateStore(4)
    for i in range(2000):
        store.publish(b"group-%d" % i, i % 4, b"partial" * (i % 7 + 1))
    return store.snapshot()


def _numeric_snapshot(key_type: str) -> bytes:
    store = _core.NumericAggregateStore(2, key_type)
    n = 2000
    keys: Any = np.arange(n) if key_type == "int64" else [b"k%d" % i for i in range(n)]
    store.partition(0).fold(keys, np.arange(float(n)))
    store.partition(0).publish()
    store.partition(1).fold(keys, np.ones(n))
    return store.snapshot()


def _backend_snapshot() -> bytes:
    backend = _core.InMemoryStateBackend()
    n = 3000
    backend.put_many([b"key-%d" % i for i in range(n)], [b"v" * (i % 50) for i in range(n)])
    return backend.checkpoint(3)


DECODERS: dict[str, tuple[Callable[[], bytes], Callable[[bytearray], object]]] = {
    "AggregateStore.restore": (_aggregate_snapshot, lambda b: _core.AggregateStore(4).restore(b)),
    "NumericAggregateStore.restore[int64]": (
        lambda: _numeric_snapshot("int64"),
        lambda b: _core.NumericAggregateStore(2).restore(b),
    ),
    "NumericAggregateStore.restore[bytes]": (
        lambda: _numeric_snapshot("bytes"),
        lambda b: _core.NumericAggregateStore(2, "bytes").restore(b),
    ),
    "InMemoryStateBackend.restore": (
        _backend_snapshot,
        lambda b: _core.InMemoryStateBackend().restore(b),
    ),
    "decode_records": (
        lambda: encode_records(
            RecordKind.USER, [(b"k%d" % i, b"v" * (i % 90)) for i in range(3000)]
        ),
        _core.decode_records,
    ),
    "lz4_decompress": (lambda: _core.lz4_compress(bytes(range(256)) * 1024), _core.lz4_decompress),
    "decode_batch": (
        lambda: _core.encode_batch([(f"key/{i}", b"data" * (i % 90)) for i in range(3000)]),
        _core.decode_batch,
    ),
}


@contextmanager
def _flipping(buffer: bytearray) -> Iterator[None]:
    """From another thread, keeps inverting bytes of ``buffer`` and putting them back, so it
    is valid most of the time and a length field read twice can differ between the reads.
    The inputs are larger than the 8 KiB below which a call keeps the GIL, so the flips land
    while the decoder runs."""
    stop = threading.Event()
    positions = list(range(min(len(buffer), 256))) + random.Random(14).sample(
        range(len(buffer)), min(len(buffer), 256)
    )

    def flip() -> None:
        while not stop.is_set():
            for p in positions:
                buffer[p] ^= 0xFF
                buffer[p] ^= 0xFF

    thread = threading.Thread(target=flip)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoding_a_buffer_another_thread_changes_never_crashes(name: str) -> None:
    make, decode = DECODERS[name]
    original = make()
    buffer = bytearray(original)
    outcomes: set[str] = set()
    deadline = time.monotonic() + 1.0
    with _flipping(buffer):
        while time.monotonic() < deadline:
            try:
                decode(buffer)
                outcomes.add("ok")
            except CorruptDataError:
                outcomes.add("corrupt")
    assert outcomes <= {"ok", "corrupt"} and outcomes
    # The caller's buffer was only read: the original still decodes.
    decode(bytearray(original))


def test_a_writable_buffer_is_decoded_as_it_was_when_the_call_began() -> None:
    snapshot = _aggregate_snapshot()
    buffer = bytearray(snapshot)
    store = _core.AggregateStore(4)
    store.restore(buffer)
    buffer[:] = bytes(len(buffer))  # changing it afterwards changes nothing
    restored = _core.AggregateStore(4)
    restored.restore(snapshot)
    assert store.snapshot() == restored.snapshot()


# ----------------------------------------------------------------------------------------
# Instances made by __new__ without __init__


def _uninitialized_calls(cls: type) -> Iterator[tuple[str, Callable[[], object]]]:
    obj = cls.__new__(cls)
    for name, attribute in vars(cls).items():
        if isinstance(attribute, property):
            yield name, lambda name=name: getattr(obj, name)
        elif (
            callable(attribute)
            and name not in {"__init__", "__new__"}
            and (
                not name.startswith("__")
                or name in {"__len__", "__repr__", "__enter__", "__exit__"}
            )
        ):
            method = getattr(obj, name)
            # Any arity: self is checked first, before the other arguments.
            for arity in range(7):
                yield f"{name}/{arity}", lambda method=method, arity=arity: method(*[None] * arity)


@pytest.mark.parametrize("cls", _pybind_classes(), ids=lambda cls: cls.__name__)
def test_every_method_of_an_uninitialized_instance_raises_type_error(cls: type) -> None:
    refused = 0
    for name, call in _uninitialized_calls(cls):
        with pytest.raises(TypeError) as info:
            call()
        refused += "never initialised" in str(info.value)
        assert "incompatible function arguments" not in str(info.value) or "/" in name
    assert refused > 0


@pytest.mark.parametrize(
    "cls", [ss.AggregateStore, ss.NumericAggregateStore], ids=lambda cls: cls.__name__
)
def test_python_subclasses_refuse_uninitialized_use_too(cls: type) -> None:
    obj = cls.__new__(cls)
    with pytest.raises(TypeError, match="never initialised"):
        len(obj)
    with pytest.raises(TypeError, match="never initialised"):
        obj.snapshot()


def test_every_class_is_covered() -> None:
    names = {cls.__name__ for cls in _pybind_classes()}
    assert {
        "AggregateStore",
        "NumericAggregateStore",
        "PartitionAggregator",
        "InMemoryStateBackend",
        "SpillingAggregatorCore",
    } <= names


# ----------------------------------------------------------------------------------------
# Wrong arguments say what was expected


def _spill_core(tmp_path: Any, **overrides: Any) -> object:
    arguments: dict[str, Any] = {
        "key_type": "int64",
        "mem_limit_bytes": 0,
        "spill_dir": str(tmp_path),
    }
    arguments.update(overrides)
    return _core.SpillingAggregatorCore(**arguments)


BAD_CALLS: list[tuple[str, Callable[[Any], object], type[Exception], str]] = [
    (
        "publish str key",
        lambda _: _core.AggregateStore(1).publish("k", 0, b"x"),
        TypeError,
        "group_key must be bytes",
    ),
    (
        "publish float pid",
        lambda _: _core.AggregateStore(1).publish(b"k", 0.5, b"x"),
        TypeError,
        "partition_id must be an int",
    ),
    (
        "publish str partial",
        lambda _: _core.AggregateStore(1).publish(b"k", 0, "x"),
        TypeError,
        "partial must be a bytes-like object",
    ),
    (
        "crc32c negative",
        lambda _: _core.crc32c(b"a", -1),
        TypeError,
        r"value must be in \[0, 4294967295\]",
    ),
    ("crc32c str value", lambda _: _core.crc32c(b"a", "0"), TypeError, "value must be an int"),
    ("crc32c str data", lambda _: _core.crc32c("a"), TypeError, "data must be a bytes-like"),
    ("sha256 int", lambda _: _core.sha256_hex(3), TypeError, "data must be a bytes-like"),
    (
        "store float partitions",
        lambda _: _core.NumericAggregateStore(2.0),
        TypeError,
        "num_partitions must be an int",
    ),
    (
        "store key_type int",
        lambda _: _core.NumericAggregateStore(2, 64),
        TypeError,
        "key_type must be a str",
    ),
    (
        "lz4 negative max",
        lambda _: _core.lz4_decompress(_core.lz4_compress(b"x"), max_size=-1),
        ValueError,
        "max_size must be in",
    ),
    ("lz4 str", lambda _: _core.lz4_compress("x"), TypeError, "data must be a bytes-like"),
    (
        "backend now str",
        lambda _: _core.InMemoryStateBackend().get(b"k", now="soon"),
        TypeError,
        "now must be a number",
    ),
    (
        "backend expires_at str",
        lambda _: _core.InMemoryStateBackend().put(b"k", b"v", expires_at="x"),
        TypeError,
        "expires_at must be a number",
    ),
    (
        "backend str key",
        lambda _: _core.InMemoryStateBackend().put("k", b"v"),
        TypeError,
        "key must be a bytes-like",
    ),
    (
        "backend delta_limit",
        lambda _: _core.InMemoryStateBackend(delta_limit=-1),
        ValueError,
        "delta_limit must be in",
    ),
    ("spill threads", lambda tmp: _spill_core(tmp, threads=-1), ValueError, "threads must be in"),
    ("spill dir", lambda tmp: _spill_core(tmp, spill_dir=3), TypeError, "spill_dir must be a str"),
    (
        "spill value",
        lambda tmp: _spill_core(tmp).accumulate(1, "x"),
        TypeError,
        "value must be a number",
    ),
    ("moments", lambda _: _core._moments_merge("a", b""), TypeError, "a must be a bytes-like"),
]


@pytest.mark.parametrize(
    ("label", "call", "error", "match"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS]
)
def test_wrong_arguments_name_what_was_expected(
    tmp_path: Any, label: str, call: Callable[[Any], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        call(tmp_path)
    assert "incompatible function arguments" not in str(info.value), label


# ----------------------------------------------------------------------------------------
# Documentation


def _public_callables() -> Iterator[tuple[str, Any]]:
    for name, value in vars(_core).items():
        if name.startswith("__") or isinstance(value, (int, str)):
            continue
        if isinstance(value, type) and issubclass(value, BaseException):
            continue
        yield name, value
        if isinstance(value, type):
            for attribute, member in vars(value).items():
                if attribute.startswith("_") and attribute not in {
                    "__init__",
                    "__len__",
                    "__enter__",
                    "__exit__",
                }:
                    continue
                yield f"{name}.{attribute}", member


def _doc_text(name: str, member: Any) -> str:
    """The docstring without the signature lines pybind11 puts first."""
    signature = name.rsplit(".", 1)[-1] + "("
    lines = (member.__doc__ or "").splitlines()
    return " ".join(line for line in lines if not line.startswith(signature)).strip()


@pytest.mark.parametrize("name", [name for name, _ in _public_callables()])
def test_every_public_binding_has_a_docstring(name: str) -> None:
    member = dict(_public_callables())[name]
    assert len(_doc_text(name, member)) > 10, f"{name}: {member.__doc__!r}"
