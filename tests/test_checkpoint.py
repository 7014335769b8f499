"""The object-store checkpointer: artifacts, manifests, the pointer, commit and recovery.

Store-facing tests run against obstore's LocalStore, MemoryStore and an S3Store talking to
a moto S3 server on 127.0.0.1 (see conftest.py and checkpoint_support.py).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from typing import Any

import numpy as np
import obstore
import pytest
from checkpoint_support import all_paths, checkpointer, overwrite, read, snapshot

import streamstate as ss
from streamstate.checkpoint import (
    ObjectStoreCheckpointer,
    encode_delta,
    verify_integrity,
)
from streamstate.codec import decode_records
from streamstate.manifest import (
    CheckpointId,
    CheckpointManifest,
    PartitionSnapshotEntry,
)


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
    # Deltas in a format of its own: the commit's default check (record deltas) is off.
    m2 = ck.commit(2, [("log", 0, True, b"def")], parent=m1.checkpoint_id, validate_delta=None)
    ck.commit(3, [("log", 0, True, b"ghi")], parent=m2.checkpoint_id, validate_delta=None)
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


def test_recover_without_rebuilding_returns_the_verified_chain(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(1, [("log", 0, False, b"abc"), ("log", 1, False, b"xyz")])
    m2 = ck.commit(2, [("log", 0, True, b"def"), ("log", 1, False, b"XYZ")],
                   parent=m1.checkpoint_id, validate_delta=None)  # fmt: skip
    m3 = ck.commit(3, [("log", 0, True, b"ghi"), ("log", 1, False, b"!")],
                   parent=m2.checkpoint_id, validate_delta=None)  # fmt: skip

    def never(base: bytes, delta: bytes) -> bytes:
        raise AssertionError("rebuild=False applies no delta")

    r = ck.recover(apply_delta=never, rebuild=False)
    assert r is not None and r.checkpoint_id == m3.checkpoint_id and r.fallbacks == ()
    # Each partition: the full snapshot its chain starts from, then its deltas in order.
    assert r.state == {"log": {0: b"abc", 1: b"!"}}
    assert r.deltas == {"log": {0: (b"def", b"ghi"), 1: ()}}
    assert r.delta_count == 2 and "deltas=2" in repr(r)
    # Rebuilt (the default), the same chain is applied and no deltas are left over.
    rebuilt = ck.recover(apply_delta=lambda base, delta: base + delta)
    assert rebuilt is not None and rebuilt.state == {"log": {0: b"abcdefghi", 1: b"!"}}
    assert rebuilt.delta_count == 0
    # Every byte of the chain is still verified: a damaged delta is a fallback.
    path = m2.operators["log"].partitions[0].path
    overwrite(store, path, b"DEF")
    damaged = ck.recover(rebuild=False)
    assert damaged is not None and damaged.checkpoint_id == m1.checkpoint_id
    assert [cid for cid, _ in damaged.fallbacks] == [str(m3.checkpoint_id), str(m2.checkpoint_id)]
    assert damaged.deltas == {"log": {0: (), 1: ()}}


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


# -- regressions: epochs, deltas, offsets, parents, bounds ----------------------------------


def test_epochs_must_increase(store: Any) -> None:
    ck = checkpointer(store)
    m5 = ck.commit(5, [("agg", 0, False, b"five")])
    before = all_paths(store)
    for stale in (3, 5):
        with pytest.raises(ss.CheckpointError, match=f"epoch {stale} does not advance"):
            ck.commit(stale, [("agg", 0, False, b"stale")])
    # A restarted writer (a fresh checkpointer on the same store) is held to it as well.
    with pytest.raises(ss.CheckpointError, match="does not advance"):
        checkpointer(store).commit(4, [("agg", 0, False, b"stale")])
    assert all_paths(store) == before
    r = ck.recover()
    assert r is not None and r.epoch == 5 and r.checkpoint_id == m5.checkpoint_id
    assert ck.commit(6, [("agg", 0, False, b"six")]).epoch == 6


def test_after_a_fallback_epochs_resume_from_the_recovered_checkpoint(store: Any) -> None:
    ck = checkpointer(store)
    ck.commit(1, [("agg", 0, False, snapshot(0, 1))])
    m2 = ck.commit(2, [("agg", 0, False, snapshot(0, 2))])
    overwrite(store, m2.operators["agg"].partitions[0].path, b"damaged")
    writer = checkpointer(store)
    r = writer.recover()
    assert r is not None and r.epoch == 1 and len(r.fallbacks) == 1
    m3 = writer.commit(2, [("agg", 0, False, snapshot(0, 3))])  # epoch 2 again: 2 > 1
    assert writer.recover().checkpoint_id == m3.checkpoint_id  # type: ignore[union-attr]


def test_a_delta_over_opaque_bytes_is_refused_at_commit(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(1, [("agg", 0, False, snapshot(0, 1))])
    before = all_paths(store)
    not_deltas = [b"opaque", snapshot(0, 2), encode_delta([(b"k", b"v")])[:-1]]
    for data in not_deltas:
        with pytest.raises(ss.CorruptDataError, match="agg/partition-0: is_delta data"):
            ck.commit(2, [("agg", 0, True, data)], parent=m1.checkpoint_id)
    assert all_paths(store) == before
    r = ck.recover()
    assert r is not None and r.checkpoint_id == m1.checkpoint_id and r.fallbacks == ()


def test_numpy_offsets_and_a_parent_given_as_a_string(store: Any) -> None:
    ck = checkpointer(store)
    offsets = {"src": np.int64(5), "parts": [np.int32(1), np.uint8(2)], "rate": np.float64(0.5)}
    m1 = ck.commit(1, [("agg", 0, False, snapshot(0, 1))], offsets)
    assert m1.source_offsets == {"src": 5, "parts": [1, 2], "rate": 0.5}
    assert type(m1.source_offsets["src"]) is int
    m2 = ck.commit(2, [("agg", 0, True, encode_delta([(b"k0", b"x")]))],
                   parent=str(m1.checkpoint_id))  # fmt: skip
    assert m2.parent_id == m1.checkpoint_id
    r = ck.recover()
    assert r is not None and r.source_offsets == {} and r.epoch == 2
    assert ck.load_manifest(m1.checkpoint_id).source_offsets["src"] == 5
    with pytest.raises(ValueError, match="not a checkpoint id"):
        ck.commit(3, [("agg", 0, True, encode_delta([]))], parent="not-an-id")
    with pytest.raises(TypeError, match="CheckpointId or its str form"):
        ck.commit(3, [("agg", 0, True, encode_delta([]))], parent=42)  # type: ignore[arg-type]


def test_recovery_is_bounded_by_max_size(store: Any) -> None:
    ck = checkpointer(store)
    small = ck.commit(1, [("agg", 0, False, b"s" * 100)])
    big = ck.commit(2, [("agg", 0, False, b"b" * 5000), ("agg", 1, False, b"b" * 5000)])
    r = ck.recover(max_size=1000)
    assert r is not None and r.checkpoint_id == small.checkpoint_id
    [(failed, reason)] = r.fallbacks
    assert failed == str(big.checkpoint_id) and "10000 bytes, more than max_size 1000" in reason
    with pytest.raises(ss.NoValidCheckpointError, match="max_size 50"):
        ck.recover(max_size=50)
    assert ck.recover(max_size=None).checkpoint_id == big.checkpoint_id  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="max_size"):
        ck.recover(max_size=-1)
    # A delta chain whose rebuilt state outgrows the bound fails the same way.
    grow = ck.commit(3, [("agg", 0, True, encode_delta([(b"x", b"y" * 3000)]))],
                     parent=small.checkpoint_id, validate_delta=None)  # fmt: skip
    r3 = ck.recover(max_size=6000, apply_delta=lambda base, delta: base + delta * 2)
    assert r3 is not None and r3.checkpoint_id != grow.checkpoint_id
    assert "exceeds max_size 6000" in r3.fallbacks[0][1]


def test_prune_skips_a_manifest_it_cannot_read(store: Any) -> None:
    ck = checkpointer(store)
    ms = [ck.commit(e, [("agg", 0, False, snapshot(0, e))]) for e in range(1, 4)]
    junk = CheckpointId.now()
    overwrite(store, ck.paths.manifest(junk), b'{"version":2,"manifest_sha256":"0","x":1e999}')
    assert ck.prune(keep_last=1) == [ms[0].checkpoint_id, ms[1].checkpoint_id]
    assert ck.list_checkpoints() == [ms[2].checkpoint_id, junk]
    r = ck.recover()
    assert r is not None and r.checkpoint_id == ms[2].checkpoint_id and len(r.fallbacks) == 1


def test_commit_metadata_is_kept_in_the_manifest(store: Any) -> None:
    ck = checkpointer(store)
    m = ck.commit(1, [("agg", 0, False, b"x")], metadata={"partitions": np.int64(8)})
    assert m.metadata == {"partitions": 8}
    assert ck.load_manifest(m.checkpoint_id).metadata == {"partitions": 8}
    plain = ck.commit(2, [("agg", 0, False, b"x")])
    assert "metadata" not in read(store, ck.paths.manifest(plain.checkpoint_id)).decode()
