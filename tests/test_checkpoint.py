"""Object-store checkpointer: layout, manifest, commit protocol, recovery, retries, CLI.

Store-facing tests run against obstore's LocalStore, MemoryStore and an S3Store talking to
a moto S3 server on 127.0.0.1 (see conftest.py).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import pickle
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pytest
from hypothesis import given
from hypothesis import strategies as st
from obstore import exceptions as obs_errors
from obstore.store import LocalStore, MemoryStore, S3Store

import streamstate as ss
from streamstate.checkpoint import (
    DELTA_KIND,
    CheckpointStorage,
    ObjectStoreCheckpointer,
    apply_record_delta,
    encode_delta,
    verify_integrity,
)
from streamstate.codec import decode_records, encode_records
from streamstate.manifest import (
    CheckpointId,
    CheckpointManifest,
    CheckpointPaths,
    PartitionSnapshotEntry,
)
from streamstate.retry import RetryPolicy, is_transient
from streamstate.storage import resolve_store

FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, max_elapsed=10.0)


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Each store-facing test runs once per backend."""
    if request.param == "local":
        return resolve_store(tmp_path / "store")
    if request.param == "memory":
        return MemoryStore()
    return request.getfixturevalue("s3_store")


def checkpointer(store: Any, **kwargs: Any) -> ObjectStoreCheckpointer:
    kwargs.setdefault("retry", FAST)
    return ObjectStoreCheckpointer(store, **kwargs)


def all_paths(store: Any) -> list[str]:
    return sorted(meta["path"] for meta in obstore.list(store).collect())


def read(store: Any, path: str) -> bytes:
    return bytes(obstore.get(store, path).bytes())


def overwrite(store: Any, path: str, data: bytes) -> None:
    obstore.put(store, path, data)


def snapshot(partition: int, epoch: int, n: int = 4) -> bytes:
    return encode_records(
        0, [(f"k{i}".encode(), f"{partition}:{epoch}:{i}".encode()) for i in range(n)]
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


def test_verify_integrity() -> None:
    data = b"partition state"
    verify_integrity("p", data, hashlib.sha256(data).hexdigest())
    verify_integrity("p", memoryview(data), hashlib.sha256(data).hexdigest().upper())
    with pytest.raises(ss.IntegrityError) as info:
        verify_integrity("ops/p.snap", data, "0" * 64)
    assert info.value.path == "ops/p.snap" and info.value.actual == hashlib.sha256(data).hexdigest()
    assert isinstance(info.value, ss.CorruptDataError)


# -- artifacts, manifests and the latest pointer against real stores ---------------------


def test_concurrent_partition_uploads_hash_and_place_every_artifact(store: Any) -> None:
    ck = checkpointer(store, max_concurrent_uploads=4)
    cid = CheckpointId.now()
    datas: list[Any] = [os.urandom(1000 + 97 * i) for i in range(10)]
    datas[1] = bytearray(datas[1])
    datas[2] = memoryview(datas[2])
    datas[3] = np.frombuffer(datas[3], dtype=np.uint8)
    items = [("op-a" if i % 2 else "op b", i, i % 3 == 0, d) for i, d in enumerate(datas)]
    result = ck.save_partitions_concurrent(cid, items)
    assert [op for op, _ in result] == [op for op, *_ in items]
    for (op, entry), (_, p, is_delta, data) in zip(result, items, strict=True):
        raw = bytes(data)
        assert entry.partition_id == p and entry.is_delta == is_delta
        assert entry.path == ck.paths.artifact(cid, op, p, is_delta)
        assert entry.size_bytes == len(raw)
        assert entry.sha256 == hashlib.sha256(raw).hexdigest()
        assert ck.load_artifact(entry.path) == raw
    assert ck.list_checkpoints() == []  # artifacts alone commit nothing


def test_save_snapshot_and_delta_return_digests(store: Any) -> None:
    ck = checkpointer(store)
    cid = CheckpointId.now()
    assert ck.save_snapshot(cid, "agg", 0, b"full") == hashlib.sha256(b"full").hexdigest()
    assert ck.save_delta(cid, "agg", 0, b"change") == hashlib.sha256(b"change").hexdigest()
    assert ck.load_artifact(ck.paths.snapshot(cid, "agg", 0)) == b"full"
    assert ck.load_artifact(ck.paths.delta(cid, "agg", 0)) == b"change"
    with pytest.raises(ss.CheckpointError, match="different content"):
        ck.save_snapshot(cid, "agg", 0, b"other")  # artifacts are never overwritten either
    assert ck.load_artifact(ck.paths.snapshot(cid, "agg", 0)) == b"full"


def test_bad_snapshot_items_are_rejected_before_any_upload(store: Any) -> None:
    ck = checkpointer(store)
    cid = CheckpointId.now()
    bad_items: list[list[Any]] = [
        [("agg", 0, False, b"x"), ("agg", 0, True, b"y")],  # same partition twice
        [("agg", 0, False, b"x"), ("a/b", 1, False, b"y")],
        [("agg", 0, False, b"x"), ("agg", -1, False, b"y")],
        [("agg", 0, False, b"x"), ("agg", 1, "yes", b"y")],
        [("agg", 0, False, b"x"), ("agg", 1, False, "text")],
        [("agg", 0, False, b"x"), ("agg", 1, False)],
    ]
    for items in bad_items:
        with pytest.raises((ValueError, TypeError)):
            ck.save_partitions_concurrent(cid, items)
    assert all_paths(store) == []


def test_save_manifest_is_a_conditional_create(store: Any) -> None:
    ck = checkpointer(store)
    m = ck.commit(1, [("agg", 0, False, b"state")])
    original = read(store, ck.paths.manifest(m.checkpoint_id))
    rival = CheckpointManifest.build(m.checkpoint_id, 2, [
        ("agg", PartitionSnapshotEntry(0, False, ck.paths.snapshot(m.checkpoint_id, "agg", 0),
                                       5, hashlib.sha256(b"state").hexdigest()))
    ])  # fmt: skip
    with pytest.raises(ss.CheckpointError, match="never overwritten"):
        ck.save_manifest(rival)
    assert read(store, ck.paths.manifest(m.checkpoint_id)) == original
    ck.save_manifest(m)  # byte-identical: a retried request that had landed is fine
    assert ck.load_manifest(m.checkpoint_id) == m


def test_load_manifest_errors(store: Any) -> None:
    ck = checkpointer(store)
    with pytest.raises(ss.CheckpointError, match="no manifest"):
        ck.load_manifest(CheckpointId.now())
    m = ck.commit(1, [("agg", 0, False, b"state")])
    other = CheckpointId.now()
    overwrite(store, ck.paths.manifest(other), read(store, ck.paths.manifest(m.checkpoint_id)))
    with pytest.raises(ss.CorruptDataError, match="names checkpoint"):
        ck.load_manifest(other)  # a manifest copied into another checkpoint's directory


def test_latest_pointer_never_moves_backwards(store: Any) -> None:
    ck = checkpointer(store)
    a, b, c = (CheckpointId.now() for _ in range(3))
    assert ck.read_latest() is None
    assert ck.update_latest(b) is True
    assert ck.update_latest(a) is False
    assert ck.read_latest() == b
    assert ck.update_latest(b) is True  # idempotent
    assert ck.update_latest(c) is True
    assert ck.read_latest() == c
    assert read(store, ck.paths.latest_pointer()) == str(c).encode()


def test_damaged_latest_pointer_is_reported_and_replaced(store: Any) -> None:
    ck = checkpointer(store)
    overwrite(store, ck.paths.latest_pointer(), b"\xffgarbage")
    with pytest.raises(ss.CorruptDataError):
        ck.read_latest()
    cid = CheckpointId.now()
    assert ck.update_latest(cid) is True
    assert ck.read_latest() == cid


def test_concurrent_pointer_updates_end_at_the_newest(store: Any) -> None:
    ids = [CheckpointId.now() for _ in range(24)]
    order = ids[:]
    random.Random(7).shuffle(order)
    # Separate checkpointers (as separate writers would be), sharing one store.
    writers = [checkpointer(store) for _ in range(6)]

    def run(k: int) -> None:
        for cid in order[k::6]:
            writers[k].update_latest(cid)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writers[0].read_latest() == max(ids)


# -- listing, deletion, pruning ----------------------------------------------------------


def test_list_and_delete_cover_exactly_one_checkpoints_objects(store: Any) -> None:
    ck = checkpointer(store)
    overwrite(store, "checkpoints/README", b"not a checkpoint")
    overwrite(store, "elsewhere/file", b"x")
    m1 = ck.commit(1, [("agg", 0, False, b"a"), ("agg", 1, False, b"b")], {"src": 1})
    m2 = ck.commit(2, [("agg", 0, False, b"c")])
    orphan = CheckpointId.now()
    ck.save_snapshot(orphan, "agg", 0, b"uncommitted")
    assert ck.list_checkpoints() == [m1.checkpoint_id, m2.checkpoint_id]
    ck.delete_checkpoint(m1.checkpoint_id)
    assert ck.list_checkpoints() == [m2.checkpoint_id]
    remaining = all_paths(store)
    assert not [p for p in remaining if p.startswith(ck.paths.checkpoint_dir(m1.checkpoint_id))]
    assert ck.paths.manifest(m2.checkpoint_id) in remaining
    assert {"checkpoints/README", "elsewhere/file"} <= set(remaining)
    ck.delete_checkpoint(m1.checkpoint_id)  # deleting twice is harmless


def test_prune_keeps_the_newest_and_the_deltas_they_need(store: Any) -> None:
    ck = checkpointer(store)
    full = [("agg", 0, False, snapshot(0, 0)), ("agg", 1, False, snapshot(1, 0))]
    m1 = ck.commit(1, full)
    m2 = ck.commit(2, full)
    garbage = CheckpointId.now()
    ck.save_snapshot(garbage, "agg", 0, b"crashed before its manifest")
    m3 = ck.commit(3, [("agg", 0, True, encode_delta([(b"k0", b"x")])), full[1]],
                   parent=m2.checkpoint_id)  # fmt: skip
    m4 = ck.commit(4, [("agg", 0, True, encode_delta([(b"k1", b"y")]))], parent=m3.checkpoint_id)
    m5 = ck.commit(5, full)
    deleted = ck.prune(keep_last=2)
    # m5 and m4 are the newest two; m4's delta chain reaches back through m3 to m2.
    assert deleted == [m1.checkpoint_id, garbage]
    assert ck.list_checkpoints() == [m.checkpoint_id for m in (m2, m3, m4, m5)]
    assert not [p for p in all_paths(store) if ck.paths.id_of(p) == garbage]
    assert ck.prune(keep_last=1) == [m2.checkpoint_id, m3.checkpoint_id, m4.checkpoint_id]
    assert ck.recover().epoch == 5  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        ck.prune(keep_last=0)


def test_prune_does_not_count_damaged_checkpoints(store: Any) -> None:
    ck = checkpointer(store)
    ms = [ck.commit(e, [("agg", 0, False, snapshot(0, e))]) for e in range(1, 5)]
    overwrite(store, ck.paths.manifest(ms[-1].checkpoint_id), b"{}")
    assert ck.prune(keep_last=2) == [ms[0].checkpoint_id]
    assert ck.recover().epoch == 3  # type: ignore[union-attr]


# -- commit and recover ------------------------------------------------------------------


def test_recover_on_an_empty_store_is_none(store: Any) -> None:
    assert checkpointer(store).recover() is None


def test_commit_then_recover_round_trip_with_a_delta_chain(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(
        10,
        [("agg", p, False, snapshot(p, 10)) for p in range(3)] + [("join", 0, False, b"raw")],
        source_offsets={"kafka": {"0": 100, "1": 7}},
        watermark=1_000,
    )
    d2 = encode_delta([(b"k0", b"changed"), (b"k1", None), (b"new", b"n")])
    m2 = ck.commit(11, [("agg", 0, True, d2), ("agg", 1, False, snapshot(1, 11))],
                   source_offsets={"kafka": {"0": 150}}, parent=m1.checkpoint_id, watermark=2_000)  # fmt: skip
    d3 = encode_delta([(b"k2", b"again"), (b"new", None)])
    m3 = ck.commit(12, [("agg", 0, True, d3)], parent=m2.checkpoint_id)
    assert m3.parent_id == m2.checkpoint_id and m3.operators["agg"].partitions[0].is_delta
    assert ck.read_latest() == m3.checkpoint_id

    r = ck.recover()
    assert r is not None and r.manifest == m3 and r.fallbacks == ()
    assert r.checkpoint_id == m3.checkpoint_id and r.epoch == 12
    assert set(r.state) == {"agg"} and set(r.state["agg"]) == {0}
    kind, records = decode_records(r.state["agg"][0])
    assert kind == 0
    assert records == [(b"k0", b"changed"), (b"k2", b"again"), (b"k3", b"0:10:3")]
    assert "RecoveredCheckpoint(" in repr(r) and "epoch=12" in repr(r)

    ck.delete_checkpoint(m3.checkpoint_id)
    r2 = ck.recover()
    assert r2 is not None and r2.epoch == 11
    assert r2.source_offsets == {"kafka": {"0": 150}} and r2.manifest.watermark == 2_000
    assert r2.state["agg"][1] == snapshot(1, 11)
    assert dict(decode_records(r2.state["agg"][0])[1])[b"new"] == b"n"
    assert r2.fallbacks == ()  # the pointer still names m3, which is gone: ignored


def test_large_artifacts_round_trip(store: Any) -> None:
    # Above obstore's 5 MiB chunk size a plain put is a multipart upload (S3 included).
    big = np.random.default_rng(3).integers(0, 256, 11 << 20, dtype=np.uint8)
    ck = checkpointer(store, max_concurrent_uploads=2)
    m = ck.commit(1, [("agg", 0, False, big), ("agg", 1, False, big[: 6 << 20])])
    assert m.total_size_bytes == (11 << 20) + (6 << 20)
    r = ck.recover()
    assert r is not None
    assert r.state["agg"][0] == big.tobytes() and r.state["agg"][1] == big[: 6 << 20].tobytes()


def test_recover_with_a_custom_delta_function(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(1, [("log", 0, False, b"abc")])
    m2 = ck.commit(2, [("log", 0, True, b"def")], parent=m1.checkpoint_id)
    ck.commit(3, [("log", 0, True, b"ghi")], parent=m2.checkpoint_id)
    calls: list[tuple[bytes, bytes]] = []

    def append(base: bytes, delta: bytes) -> bytes:
        calls.append((base, delta))
        return base + delta

    r = ck.recover(apply_delta=append)
    assert r is not None and r.state == {"log": {0: b"abcdefghi"}}
    assert calls == [(b"abc", b"def"), (b"abcdef", b"ghi")]
    # The default overlay cannot read these deltas: recovery falls back to the full snapshot.
    r_default = ck.recover()
    assert r_default is not None and r_default.epoch == 1 and len(r_default.fallbacks) == 2


def test_a_store_whose_checkpoints_were_all_deleted_starts_fresh(store: Any) -> None:
    ck = checkpointer(store)
    for epoch in range(3):
        ck.commit(epoch, [("agg", 0, False, b"%d" % epoch)])
    for cid in ck.list_checkpoints():
        ck.delete_checkpoint(cid)
    assert ck.read_latest() is not None  # the pointer is left naming a deleted checkpoint
    assert ck.recover() is None
    m = ck.commit(0, [("agg", 0, False, b"fresh")])
    assert ck.read_latest() == m.checkpoint_id
    assert ck.recover().state == {"agg": {0: b"fresh"}}  # type: ignore[union-attr]


def test_commit_validates_before_writing(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(1, [("agg", 0, False, b"x")])
    before = all_paths(store)
    with pytest.raises(ValueError, match="parent"):
        ck.commit(2, [("agg", 0, True, b"d")])
    with pytest.raises(ValueError, match="no agg/partition-5"):
        ck.commit(2, [("agg", 5, True, b"d")], parent=m1.checkpoint_id)
    with pytest.raises(ss.CheckpointError, match="no manifest"):
        ck.commit(2, [("agg", 0, True, b"d")], parent=CheckpointId.now())
    with pytest.raises(ValueError):
        ck.commit(-1, [("agg", 0, False, b"x")])
    with pytest.raises(ValueError):
        ck.commit(2, [("agg", 0, False, b"x")], source_offsets={"../x": 1})
    with pytest.raises(ValueError, match="JSON"):
        ck.commit(2, [("agg", 0, False, b"x")], source_offsets={"s": object()})
    assert all_paths(store) == before


def test_recover_prefers_a_committed_manifest_over_a_lagging_pointer(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(1, [("agg", 0, False, b"one")])
    # A crash between writing the manifest and moving _latest:
    cid = CheckpointId.now()
    entries = ck.save_partitions_concurrent(cid, [("agg", 0, False, b"two")])
    ck.save_manifest(CheckpointManifest.build(cid, 2, entries))
    assert ck.read_latest() == m1.checkpoint_id
    r = ck.recover()
    assert r is not None and r.epoch == 2 and r.state == {"agg": {0: b"two"}}


@pytest.mark.parametrize("pointer", [None, b"", b"not-an-id", b"\x00" * 36])
def test_missing_or_damaged_pointer_falls_back_to_newest_listed(
    store: Any, pointer: bytes | None
) -> None:
    ck = checkpointer(store)
    ck.commit(1, [("agg", 0, False, b"one")])
    ck.commit(2, [("agg", 0, False, b"two")])
    if pointer is None:
        obstore.delete(store, ck.paths.latest_pointer())
    else:
        overwrite(store, ck.paths.latest_pointer(), pointer)
    r = ck.recover()
    assert r is not None and r.epoch == 2 and r.fallbacks == ()


def two_checkpoints(
    store: Any,
) -> tuple[ObjectStoreCheckpointer, CheckpointManifest, CheckpointManifest]:
    ck = checkpointer(store)
    m1 = ck.commit(1, [("agg", 0, False, snapshot(0, 1, n=2))], {"src": 1})
    m2 = ck.commit(2, [("agg", 0, True, encode_delta([(b"k0", b"v")]))], {"src": 2},
                   parent=m1.checkpoint_id)  # fmt: skip
    return ck, m1, m2


def test_every_byte_corruption_of_an_artifact_falls_back(store: Any) -> None:
    ck, _, m2 = two_checkpoints(store)
    path = m2.operators["agg"].partitions[0].path
    original = read(store, path)
    for i in range(len(original)):
        damaged = bytearray(original)
        damaged[i] ^= 0x01 << (i % 8)
        overwrite(store, path, bytes(damaged))
        r = ck.recover()
        assert r is not None and r.epoch == 1 and r.source_offsets == {"src": 1}
        assert (
            r.fallbacks[0][0] == str(m2.checkpoint_id) and "SHA-256 mismatch" in r.fallbacks[0][1]
        )
    overwrite(store, path, original[:-1])
    r = ck.recover()
    assert r is not None and r.epoch == 1 and "bytes, manifest says" in r.fallbacks[0][1]
    overwrite(store, path, original)
    assert ck.recover().epoch == 2  # type: ignore[union-attr]


def test_every_byte_corruption_of_a_manifest_falls_back(store: Any) -> None:
    ck, _, m2 = two_checkpoints(store)
    path = ck.paths.manifest(m2.checkpoint_id)
    original = read(store, path)
    for i in range(len(original)):
        damaged = bytearray(original)
        damaged[i] ^= 0x01 << (i % 7)
        overwrite(store, path, bytes(damaged))
        r = ck.recover()
        assert r is not None and r.epoch == 1, f"flip at byte {i} went undetected"
        assert r.fallbacks[0][0] == str(m2.checkpoint_id)
    overwrite(store, path, original)
    assert ck.recover().epoch == 2  # type: ignore[union-attr]


def test_damage_to_a_delta_parent_fails_the_child_too(store: Any) -> None:
    ck, m1, m2 = two_checkpoints(store)
    m3 = ck.commit(3, [("agg", 0, False, snapshot(0, 3))])
    parent_path = m1.operators["agg"].partitions[0].path
    tampered = bytearray(read(store, parent_path))
    tampered[-1] ^= 0xFF
    overwrite(store, parent_path, bytes(tampered))
    r = ck.recover()
    assert r is not None and r.epoch == 3  # independent of the damaged chain
    ck.delete_checkpoint(m3.checkpoint_id)
    with pytest.raises(ss.NoValidCheckpointError) as info:
        ck.recover()
    reasons = dict(info.value.failures)
    assert list(reasons) == [str(m2.checkpoint_id), str(m1.checkpoint_id)]
    assert "partition-0.snap" in reasons[str(m2.checkpoint_id)]  # the parent's artifact
    assert "SHA-256 mismatch" in reasons[str(m1.checkpoint_id)]
    assert str(m1.checkpoint_id) in str(info.value)


def test_max_fallback_bounds_the_candidates_tried(store: Any) -> None:
    ck = checkpointer(store)
    ms = [ck.commit(e, [("agg", 0, False, b"s%d" % e)]) for e in range(5)]
    for m in ms[2:]:
        obstore.delete(store, m.operators["agg"].partitions[0].path)
    with pytest.raises(ss.NoValidCheckpointError) as info:
        ck.recover(max_fallback=1)
    assert [cid for cid, _ in info.value.failures] == [
        str(ms[4].checkpoint_id),
        str(ms[3].checkpoint_id),
    ]
    assert all("missing" in why for _, why in info.value.failures)
    r = ck.recover(max_fallback=3)
    assert r is not None and r.epoch == 1 and len(r.fallbacks) == 3


def test_verify_checkpoint(store: Any) -> None:
    ck, m1, m2 = two_checkpoints(store)
    assert ck.verify_checkpoint(m2.checkpoint_id) == m2
    overwrite(store, m1.operators["agg"].partitions[0].path, b"tampered")
    with pytest.raises(ss.CorruptDataError):
        ck.verify_checkpoint(m2.checkpoint_id)  # through the delta's parent


def test_store_urls_and_prefixes(tmp_path: Path) -> None:
    ck = ObjectStoreCheckpointer(f"file://{tmp_path}/a", CheckpointPaths("jobs/one"))
    m = ck.commit(1, [("agg", 0, False, b"x")])
    assert (tmp_path / "a" / "jobs" / "one" / str(m.checkpoint_id) / "manifest.json").is_file()
    assert (
        ObjectStoreCheckpointer(tmp_path / "a", CheckpointPaths("jobs/one")).recover() is not None
    )
    assert ObjectStoreCheckpointer(tmp_path / "a").recover() is None  # another prefix
    assert "LocalStore" in repr(ck) and "jobs/one/" in repr(ck)
    with pytest.raises(ValueError):
        ObjectStoreCheckpointer(tmp_path, max_concurrent_uploads=0)


def test_s3_store_with_a_key_prefix(s3_server: Any) -> None:
    bucket = s3_server.create_bucket()
    ck = checkpointer(s3_server.store(bucket, prefix="tenant/7"))
    m = ck.commit(1, [("agg", 0, False, b"x")])
    raw = s3_server.store(bucket)
    assert f"tenant/7/checkpoints/{m.checkpoint_id}/manifest.json" in all_paths(raw)
    assert ck.recover().state == {"agg": {0: b"x"}}  # type: ignore[union-attr]


# -- bounded concurrency -----------------------------------------------------------------


class CountingStorage(CheckpointStorage):
    """Counts puts in flight (the real puts, slowed down a little)."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def put(self, path: str, data: Any, *, mode: Any = "overwrite") -> Any:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(0.01)
            return super().put(path, data, mode=mode)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.mark.parametrize("limit", [1, 3])
def test_uploads_respect_max_concurrent_uploads(tmp_path: Path, limit: int) -> None:
    storage = CountingStorage(resolve_store(tmp_path))
    ck = ObjectStoreCheckpointer(storage, max_concurrent_uploads=limit, retry=FAST)
    ck.commit(1, [("agg", p, False, os.urandom(100)) for p in range(12)])
    assert storage.peak == limit


# -- retries and fault injection ---------------------------------------------------------

TRANSIENT_FAULTS: list[Callable[[], BaseException]] = [
    lambda: obs_errors.GenericError(
        "Generic S3 error: Error performing PUT http://s3/x - Server returned non-2xx status "
        "code: 503 Service Unavailable: <Error><Code>SlowDown</Code></Error>"
    ),
    lambda: obs_errors.GenericError("Generic S3 error: Server returned non-2xx status code: 429"),
    lambda: obs_errors.GenericError("Generic S3 error: HTTP error: error sending request"),
    lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    lambda: TimeoutError("operation timed out"),
]


class FaultyStorage(CheckpointStorage):
    """Forwards every call to a real store through obstore, but fails some of them.

    A failure strikes either before the request (nothing happened) or after it (the
    request took effect but its response was "lost"), as with real networks. Paths
    containing one of ``permanent`` fail with a permission error every time.
    """

    def __init__(
        self, store: Any, rate: float, seed: int = 0, permanent: tuple[str, ...] = ()
    ) -> None:
        super().__init__(store)
        self.rate = rate
        self.permanent = permanent
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def _maybe_fail(self, op: str, path: str, when: str) -> None:
        with self.lock:
            self.calls[path] += when == "before"
            if any(p in path for p in self.permanent):
                raise obs_errors.PermissionDeniedError(
                    f"The operation lacked privileges for path {path}"
                )
            if self.rng.random() >= self.rate:
                return
            fault = self.rng.choice(TRANSIENT_FAULTS)()
            self.faults[f"{op}-{when}"] += 1
        raise fault

    def _around(self, op: str, path: str, call: Callable[[], Any]) -> Any:
        self._maybe_fail(op, path, "before")
        result = call()
        self._maybe_fail(op, path, "after")
        return result

    def put(self, path: str, data: Any, *, mode: Any = "overwrite") -> Any:
        return self._around(
            "put", path, lambda: super(FaultyStorage, self).put(path, data, mode=mode)
        )

    def get(self, path: str) -> Any:
        return self._around("get", path, lambda: super(FaultyStorage, self).get(path))

    def list(self, prefix: str) -> Any:
        return self._around("list", prefix, lambda: super(FaultyStorage, self).list(prefix))

    def delete(self, path: str) -> None:
        self._around("delete", path, lambda: super(FaultyStorage, self).delete(path))


def test_commits_and_recovery_survive_transient_faults(store: Any) -> None:
    storage = FaultyStorage(store, rate=0.15, seed=1)
    ck = ObjectStoreCheckpointer(
        storage, retry=RetryPolicy(max_attempts=20, initial_backoff=0.0005, max_backoff=0.005)
    )
    clean = checkpointer(store)
    parent = None
    for epoch in range(12):
        if epoch % 4 == 0:
            items = [("agg", p, False, snapshot(p, epoch)) for p in range(4)]
        else:
            items = [("agg", p, True, encode_delta([(b"k0", b"%d" % epoch)])) for p in range(4)]
        m = ck.commit(epoch, items, {"src": epoch}, parent=parent)
        parent = m.checkpoint_id
        assert clean.list_checkpoints()[-1] == m.checkpoint_id
        if epoch % 5 == 4:
            ck.prune(keep_last=2)
    r = ck.recover()
    assert r is not None and r.epoch == 11 and r.fallbacks == ()
    assert r.state == clean.recover().state  # type: ignore[union-attr]
    assert dict(decode_records(r.state["agg"][2])[1])[b"k0"] == b"11"
    assert clean.read_latest() == r.checkpoint_id
    # The faults really happened, including "landed but the response was lost" ones.
    assert storage.faults["put-before"] > 0 and storage.faults["put-after"] > 0
    assert storage.faults["get-before"] + storage.faults["get-after"] > 0


def test_permanent_failure_surfaces_at_once_and_commits_nothing(store: Any) -> None:
    clean = checkpointer(store)
    m1 = clean.commit(1, [("agg", p, False, b"x") for p in range(4)])
    before = all_paths(store)
    storage = FaultyStorage(store, rate=0.0, permanent=("partition-2.snap",))
    ck = ObjectStoreCheckpointer(
        storage, max_concurrent_uploads=1, retry=RetryPolicy(max_elapsed=30)
    )
    start = time.monotonic()
    with pytest.raises(ss.CheckpointError, match=r"partition-2\.snap.*PermissionDeniedError"):
        ck.commit(2, [("agg", p, False, b"y") for p in range(4)])
    assert time.monotonic() - start < 2.0
    [failed] = [p for p in storage.calls if "partition-2" in p]
    assert storage.calls[failed] == 1  # not retried
    assert all_paths(store) == before  # partial uploads were cleaned up
    assert clean.recover().checkpoint_id == m1.checkpoint_id  # type: ignore[union-attr]


def test_retries_give_up_within_the_budget(tmp_path: Path) -> None:
    storage = FaultyStorage(resolve_store(tmp_path), rate=1.0)
    ck = ObjectStoreCheckpointer(
        storage, retry=RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.002)
    )
    with pytest.raises(ss.CheckpointError, match=r"4 attempt\(s\)"):
        ck.save_snapshot(CheckpointId.now(), "agg", 0, b"x")
    ck2 = ObjectStoreCheckpointer(
        storage,
        retry=RetryPolicy(initial_backoff=0.05, max_backoff=0.05, jitter=0, max_elapsed=0.2),
    )
    start = time.monotonic()
    with pytest.raises(ss.CheckpointError, match="still failing"):
        ck2.list_checkpoints()
    assert time.monotonic() - start < 1.0


@given(
    attempt=st.integers(1, 40),
    initial=st.floats(0, 1),
    extra=st.floats(0, 10),
    multiplier=st.floats(1, 4),
    jitter=st.floats(0, 1),
)
def test_backoff_is_bounded_and_jittered_downwards(
    attempt: int, initial: float, extra: float, multiplier: float, jitter: float
) -> None:
    policy = RetryPolicy(initial_backoff=initial, max_backoff=initial + extra,
                         multiplier=multiplier, jitter=jitter)  # fmt: skip
    base = min(initial + extra, initial * multiplier ** (attempt - 1))
    delay = policy.backoff(attempt)
    assert base * (1 - jitter) - 1e-12 <= delay <= base + 1e-12


def test_retry_policy_validation() -> None:
    for kwargs in ({"max_attempts": 0}, {"initial_backoff": 3, "max_backoff": 1},
                   {"multiplier": 0.5}, {"jitter": 2}, {"max_elapsed": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            RetryPolicy(**kwargs)


class StatusHandler(BaseHTTPRequestHandler):
    status = 503

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<Error><Code>Whatever</Code></Error>"
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = _reply


@pytest.fixture
def status_server() -> Iterator[tuple[str, type[StatusHandler]]]:
    handler = type("Handler", (StatusHandler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "status, transient", [(500, True), (503, True), (429, True), (400, False), (403, False)]
)
def test_real_obstore_http_errors_are_classified(
    status_server: tuple[str, type[StatusHandler]], status: int, transient: bool
) -> None:
    endpoint, handler = status_server
    handler.status = status
    s3 = S3Store("bucket", endpoint=endpoint, region="us-east-1", access_key_id="k",
                 secret_access_key="s", client_options={"allow_http": True},
                 retry_config={"max_retries": 0})  # fmt: skip
    with pytest.raises(Exception) as info:
        obstore.put(s3, "x", b"1")
    assert is_transient(info.value) is transient
    ck = ObjectStoreCheckpointer(s3, retry=RetryPolicy(max_attempts=2, initial_backoff=0.001))
    with pytest.raises(ss.CheckpointError, match="2 attempt" if transient else "checkpoints/x"):
        ck.load_artifact("checkpoints/x")


def test_real_connection_refused_is_transient() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s3 = S3Store("bucket", endpoint=f"http://127.0.0.1:{port}", region="us-east-1",
                 access_key_id="k", secret_access_key="s", client_options={"allow_http": True},
                 retry_config={"max_retries": 0})  # fmt: skip
    with pytest.raises(Exception) as info:
        obstore.get(s3, "x")
    assert is_transient(info.value)


def test_local_filesystem_errors_are_classified(tmp_path: Path) -> None:
    local = LocalStore(str(tmp_path))
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(Exception) as info:
        obstore.put(local, "file/below/a-file", b"x")  # ENOTDIR: permanent
    assert not is_transient(info.value)
    with pytest.raises(obs_errors.GenericError) as invalid:
        obstore.get(local, "staging-name#1")  # LocalStore's reserved names: permanent
    assert not is_transient(invalid.value)
    with pytest.raises(FileNotFoundError) as missing:
        obstore.get(local, "absent")
    assert not is_transient(missing.value)
    assert is_transient(ConnectionResetError(errno.ECONNRESET, "reset"))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(obs_errors.AlreadyExistsError("exists"))
    assert not is_transient(ValueError("bad"))


# -- the command line --------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamstate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_cli_list_show_validate(tmp_path: Path) -> None:
    ck = ObjectStoreCheckpointer(tmp_path)
    m1 = ck.commit(1, [("agg", p, False, snapshot(p, 1)) for p in range(3)], {"kafka": 5})
    m2 = ck.commit(2, [("agg", 0, True, encode_delta([(b"k0", b"x")]))], parent=m1.checkpoint_id)

    listing = run_cli("checkpoints", "list", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:2] == ["ID", "EPOCH"]
    assert lines[1].startswith(str(m1.checkpoint_id)) and lines[1].split()[1] == "1"
    assert lines[2].startswith(str(m2.checkpoint_id)) and lines[2].rstrip().endswith("latest")
    assert "1 delta" in lines[2] and "2 checkpoint(s)" in lines[3]

    show = run_cli("checkpoints", "show", f"file://{tmp_path}")
    assert show.returncode == 0 and json.loads(show.stdout)["checkpoint_id"] == str(
        m2.checkpoint_id
    )
    show1 = run_cli("checkpoints", "show", str(tmp_path), str(m1.checkpoint_id))
    assert json.loads(show1.stdout)["source_offsets"] == {"kafka": 5}

    ok = run_cli("checkpoints", "validate", str(tmp_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 problem(s)" in ok.stdout

    target = tmp_path / m1.operators["agg"].partitions[0].path
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    bad = run_cli("checkpoints", "validate", str(tmp_path))
    assert bad.returncode == 1
    damaged = [line for line in bad.stdout.splitlines() if line.startswith("DAMAGED")]
    # m1's artifact is damaged; m2's delta applies to it, so m2 is damaged too.
    assert len(damaged) == 2 and all("partition-0.snap" in line for line in damaged)


def test_cli_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli().returncode == 2
    assert run_cli("checkpoints", "frobnicate", str(tmp_path)).returncode == 2
    missing = run_cli("checkpoints", "list", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    assert not (tmp_path / "absent").exists()
    bad_id = run_cli("checkpoints", "show", str(tmp_path), "nope")
    assert bad_id.returncode == 2 and "not a checkpoint id" in bad_id.stderr
    assert run_cli("checkpoints", "show", str(tmp_path)).returncode == 2  # nothing to show


def test_cli_against_s3(s3_server: Any) -> None:
    bucket = s3_server.create_bucket()
    ck = checkpointer(s3_server.store(bucket))
    m = ck.commit(3, [("agg", 0, False, b"x")])
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}  # fmt: skip
    out = run_cli("checkpoints", "validate", f"s3://{bucket}", "-o", f"endpoint={s3_server.endpoint}",
                  "--allow-http", env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert str(m.checkpoint_id) in out.stdout
