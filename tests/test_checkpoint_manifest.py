"""Checkpoint ids (UUID v7), the path layout, and the manifest: shape, validation, damage."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamstate as ss
from streamstate.manifest import (
    CheckpointId,
    CheckpointManifest,
    CheckpointPaths,
    PartitionSnapshotEntry,
)

# -- CheckpointId ------------------------------------------------------------------------


def test_ids_are_uuid7_and_strictly_increasing_within_a_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = [CheckpointId.now() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len({str(i) for i in ids}) == len(ids)
    assert all(i.uuid.version == 7 and i.uuid.variant == uuid.RFC_4122 for i in ids)
    assert before <= ids[0].timestamp_ms <= ids[-1].timestamp_ms <= after + 1
    # More ids than milliseconds elapsed: some share a timestamp and still order.
    assert len({i.timestamp_ms for i in ids}) < len(ids)
    assert sorted(ids, key=str) == ids  # string order is creation order too


def test_id_after_a_future_id_is_newer() -> None:
    # As after a clock step backwards, or with another machine's clock ahead of ours.
    ahead_ms = time.time_ns() // 1_000_000 + 20
    future = CheckpointId(uuid.UUID(int=(ahead_ms << 80) | (7 << 76) | (2 << 62)))
    a = CheckpointId.now(after=future)
    assert a > future and a.timestamp_ms == ahead_ms
    assert CheckpointId.now() > a  # the process-wide floor moved too
    time.sleep(0.03)
    assert CheckpointId.now().timestamp_ms > ahead_ms  # and real time takes over again


def test_ids_minted_by_threads_are_unique_and_ordered_per_thread() -> None:
    results: list[list[CheckpointId]] = [[] for _ in range(4)]

    def mint(out: list[CheckpointId]) -> None:
        out.extend(CheckpointId.now() for _ in range(2000))

    threads = [threading.Thread(target=mint, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({i for out in results for i in out}) == 8000
    for out in results:
        assert out == sorted(out)


def test_id_parse_round_trip_and_rejections() -> None:
    cid = CheckpointId.now()
    assert CheckpointId.parse(str(cid)) == cid
    assert CheckpointId.from_uuid(cid.uuid) == cid
    assert hash(CheckpointId.parse(str(cid))) == hash(cid)
    assert pickle.loads(pickle.dumps(cid)) == cid
    assert repr(cid) == f"CheckpointId('{cid}')"
    for bad in ["", "nope", str(cid).upper(), str(cid).replace("-", ""), str(uuid.uuid4())]:
        with pytest.raises(ValueError):
            CheckpointId.parse(bad)
    with pytest.raises(ValueError):
        CheckpointId.from_uuid(uuid.uuid4())
    with pytest.raises(TypeError):
        CheckpointId(str(cid))  # type: ignore[arg-type]


@given(st.integers(0, (1 << 48) - 1), st.integers(0, (1 << 74) - 1))
def test_id_order_follows_timestamp_then_sequence(ms: int, seq: int) -> None:
    def make(ms: int, seq: int) -> CheckpointId:
        value = (ms << 80) | (7 << 76) | ((seq >> 62) << 64) | (2 << 62) | (seq & ((1 << 62) - 1))
        return CheckpointId(uuid.UUID(int=value))

    a = make(ms, seq)
    assert CheckpointId.parse(str(a)) == a and a.timestamp_ms == ms
    if seq < (1 << 74) - 1:
        assert make(ms, seq + 1) > a
    if ms < (1 << 48) - 1:
        assert make(ms + 1, 0) > a


# -- CheckpointPaths ---------------------------------------------------------------------


def test_paths_layout_has_a_slash_after_the_id() -> None:
    cid = CheckpointId.now()
    paths = CheckpointPaths()
    assert paths.latest_pointer() == "checkpoints/_latest"
    assert paths.checkpoint_dir(cid) == f"checkpoints/{cid}/"
    assert paths.manifest(cid) == f"checkpoints/{cid}/manifest.json"
    assert paths.snapshot(cid, "agg", 3) == f"checkpoints/{cid}/operators/agg/partition-3.snap"
    assert paths.delta(cid, "agg", 3) == f"checkpoints/{cid}/operators/agg/partition-3.delta"
    assert paths.offsets(cid, "kafka") == f"checkpoints/{cid}/offsets/kafka.json"
    for path in (paths.manifest(cid), paths.snapshot(cid, "agg", 0), paths.offsets(cid, "s")):
        assert path.startswith(paths.checkpoint_dir(cid))
        assert paths.id_of(path) == cid
    assert paths.is_manifest(paths.manifest(cid))
    assert not paths.is_manifest(paths.snapshot(cid, "agg", 0))
    assert paths.id_of(paths.latest_pointer()) is None
    assert CheckpointPaths("jobs/a").latest_pointer() == "jobs/a/_latest"
    assert CheckpointPaths("").manifest(cid) == f"{cid}/manifest.json"


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "../x", "a\\b", "a\x00b", "tab\there", "del\x7f", "x" * 256]
)
def test_names_that_could_escape_are_rejected(name: str) -> None:
    cid = CheckpointId.now()
    paths = CheckpointPaths()
    with pytest.raises(ValueError):
        paths.snapshot(cid, name, 0)
    with pytest.raises(ValueError):
        paths.offsets(cid, name)


def test_bad_partitions_and_prefixes_are_rejected() -> None:
    cid = CheckpointId.now()
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            CheckpointPaths().snapshot(cid, "agg", bad)
    with pytest.raises(TypeError):
        CheckpointPaths().snapshot(cid, "agg", True)
    for prefix in ("../x/", "a//b/", "/abs/"):
        with pytest.raises(ValueError):
            CheckpointPaths(prefix)


# -- the manifest ------------------------------------------------------------------------


def sample_manifest(parent: CheckpointId | None = None) -> CheckpointManifest:
    cid = CheckpointId.now()
    paths = CheckpointPaths()
    entries = [
        ("agg", PartitionSnapshotEntry(p, p == 1, paths.artifact(cid, "agg", p, p == 1), 10 + p,
                                       hashlib.sha256(bytes([p])).hexdigest()))
        for p in range(3)
    ]  # fmt: skip
    return CheckpointManifest.build(
        cid, 7, entries, source_offsets={"kafka": {"0": 42}}, parent_id=parent, watermark=99
    )


def test_manifest_json_round_trip_and_shape() -> None:
    m = sample_manifest(parent=CheckpointId.now())
    text = m.to_json()
    back = CheckpointManifest.from_json(text)
    assert back == m
    assert CheckpointManifest.from_json(text.encode()) == m
    obj = json.loads(text)
    assert obj["version"] == 2
    assert set(obj) >= {
        "checkpoint_id", "epoch", "timestamp_ms", "operators", "source_offsets", "parent_id",
        "watermark", "total_size_bytes", "manifest_sha256",
    }  # fmt: skip
    assert obj["operators"]["agg"]["total_bytes"] == 10 + 11 + 12 == obj["total_size_bytes"]
    assert [p["partition_id"] for p in obj["operators"]["agg"]["partitions"]] == [0, 1, 2]


offsets_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_categories=("Cc", "Cs"),
                  exclude_characters="/\\"),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))  # fmt: skip


@given(
    epoch=st.integers(0, 2**63 - 1),
    operators=st.dictionaries(names, st.sets(st.integers(0, 2**32 - 1), max_size=4), max_size=3),
    offsets=st.dictionaries(names, offsets_values, max_size=3),
    watermark=st.none() | st.integers(-(2**62), 2**62),
    with_parent=st.booleans(),
)
def test_manifest_round_trip_property(
    epoch: int, operators: dict[str, set[int]], offsets: dict[str, Any], watermark: int | None,
    with_parent: bool,
) -> None:  # fmt: skip
    parent = CheckpointId.now() if with_parent else None
    cid = CheckpointId.now()
    paths = CheckpointPaths()
    entries = [
        (op, PartitionSnapshotEntry(p, False, paths.snapshot(cid, op, p), p % 1000, "0" * 64))
        for op, parts in operators.items()
        for p in parts
    ]
    m = CheckpointManifest.build(
        cid, epoch, entries, source_offsets=offsets, parent_id=parent, watermark=watermark
    )
    back = CheckpointManifest.from_json(m.to_json())
    assert back == m
    assert back.to_json() == m.to_json()


def rehash(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    obj["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(obj, indent=2)  # whitespace is not part of what the digest covers


def test_manifest_tolerates_unknown_fields_and_keeps_them() -> None:
    m = sample_manifest()
    obj = json.loads(m.to_json())
    obj["added_by_a_newer_version"] = {"x": 1}
    obj["operators"]["agg"]["partitions"][0]["compression"] = "lz4"
    back = CheckpointManifest.from_json(rehash(obj))
    assert back == m
    assert back.extra == {"added_by_a_newer_version": {"x": 1}}
    assert json.loads(back.to_json())["added_by_a_newer_version"] == {"x": 1}


@pytest.mark.parametrize(
    "field",
    ["version", "checkpoint_id", "epoch", "timestamp_ms", "operators", "source_offsets",
     "total_size_bytes", "manifest_sha256"],
)  # fmt: skip
def test_manifest_missing_required_field_is_corrupt(field: str) -> None:
    obj = json.loads(sample_manifest().to_json())
    del obj[field]
    text = rehash(obj) if field != "manifest_sha256" else json.dumps(obj)
    with pytest.raises(ss.CorruptDataError, match=field if field != "version" else "version"):
        CheckpointManifest.from_json(text)


@pytest.mark.parametrize("field", ["partition_id", "is_delta", "path", "size_bytes", "sha256"])
def test_manifest_missing_partition_field_is_corrupt(field: str) -> None:
    obj = json.loads(sample_manifest().to_json())
    del obj["operators"]["agg"]["partitions"][1][field]
    with pytest.raises(ss.CorruptDataError, match=field):
        CheckpointManifest.from_json(rehash(obj))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda o: o.update(version=3), "version 3"),
        (lambda o: o.update(epoch=-1), "out of range"),
        (lambda o: o.update(epoch=True), "epoch must be int"),
        (lambda o: o.update(total_size_bytes=1), "total_size_bytes"),
        (lambda o: o["operators"]["agg"].update(total_bytes=1), "total_bytes"),
        (lambda o: o["operators"]["agg"]["partitions"][0].update(sha256="ab"), "sha256"),
        (lambda o: o["operators"]["agg"]["partitions"][1].update(partition_id=0), "twice"),
        (lambda o: o.update(parent_id=o["checkpoint_id"]), "parent_id"),
        (lambda o: o.update(checkpoint_id=str(uuid.uuid4())), "UUID v7"),
        (lambda o: o["operators"].update({"../x": o["operators"]["agg"]}), "operator name"),
    ],
)
def test_manifest_inconsistencies_are_corrupt(
    mutate: Callable[[dict[str, Any]], Any], reason: str
) -> None:
    obj = json.loads(sample_manifest().to_json())
    mutate(obj)
    with pytest.raises(ss.CorruptDataError, match=reason):
        CheckpointManifest.from_json(rehash(obj))


def test_every_byte_flip_of_a_manifest_is_detected() -> None:
    text = sample_manifest(parent=CheckpointId.now()).to_json().encode()
    for i in range(len(text)):
        for mask in (0x01, 0x20, 0x80):
            damaged = bytearray(text)
            damaged[i] ^= mask
            with pytest.raises(ss.CorruptDataError):
                CheckpointManifest.from_json(bytes(damaged))
    for cut in range(len(text)):
        with pytest.raises(ss.CorruptDataError):
            CheckpointManifest.from_json(text[:cut])


def test_non_json_manifest_is_corrupt() -> None:
    for junk in (b"", b"\xff\xfe", b"[1,2]", b"NaN", b'{"version": 2}', b"{" * 100_000):
        with pytest.raises(ss.CorruptDataError):
            CheckpointManifest.from_json(junk)


# -- every defect is CorruptDataError ------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b'{"version":2,"manifest_sha256":"0","x":1e999}',
        b'{"version":2,"manifest_sha256":"0","x":-1e999}',
        b'{"version":2,"manifest_sha256":"0","x":[1e400]}',
        b'{"version":2,"manifest_sha256":"0","x":' + b"9" * 5000 + b"}",
        b'{"version":2,"manifest_sha256":"0","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_manifest_defects_that_json_accepts_are_corrupt(text: bytes) -> None:
    with pytest.raises(ss.CorruptDataError):
        CheckpointManifest.from_json(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=10,
)  # fmt: skip


@given(
    valid=st.booleans(),
    key=st.sampled_from([*json.loads(sample_manifest().to_json()), "x"]),
    value=json_values.map(json.dumps) | st.sampled_from(["1e999", "-1e999", "1" * 5000]),
)
def test_from_json_returns_a_manifest_or_raises_corrupt_data_error(
    valid: bool, key: str, value: str
) -> None:
    """Any field replaced by any JSON value (also ones Python's json reads but canonical JSON
    cannot hold) parses or fails as CorruptDataError, never with another exception."""
    obj = json.loads(sample_manifest().to_json()) if valid else {}
    obj[key] = "@@"
    text = json.dumps(obj).replace('"@@"', value)
    try:
        parsed = CheckpointManifest.from_json(text)
    except ss.CorruptDataError:
        return
    assert isinstance(parsed, CheckpointManifest)


def test_numpy_scalars_in_offsets_and_metadata_become_json() -> None:
    cid = CheckpointId.now()
    m = CheckpointManifest.build(
        cid, 1, [], source_offsets={"s": {"p": np.int64(3)}, "t": (np.float32(0.25),)},
        metadata={"partitions": np.uint16(4)},
    )  # fmt: skip
    assert m.source_offsets == {"s": {"p": 3}, "t": (0.25,)}
    assert m.metadata == {"partitions": 4}
    back = CheckpointManifest.from_json(m.to_json())
    assert back.metadata == {"partitions": 4} and back.source_offsets["s"] == {"p": 3}
    assert back.partition_ids == frozenset()
