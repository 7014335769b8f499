"""A checkpoint whose artifacts other processes upload: begin, upload, commit_entries.

Workers are real spawned processes writing to a LocalStore and to the moto S3 server
(conftest.py); the coordinator commits their entries in one manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import pickle
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
from checkpoint_support import FAST, all_paths, checkpointer, overwrite, read, snapshot
from distributed_workers import doomed_coordinator, restore, upload
from hypothesis import example, given, settings
from hypothesis import strategies as st
from obstore.store import MemoryStore

import streamstate as ss
from streamstate.checkpoint import ObjectStoreCheckpointer
from streamstate.delta import apply_record_delta, encode_delta
from streamstate.manifest import CheckpointPaths, PartitionSnapshotEntry
from streamstate.storage import resolve_store

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def workers() -> Iterator[cf.ProcessPoolExecutor]:
    """Two spawned worker processes, shared by the module (spawning costs a second each)."""
    with cf.ProcessPoolExecutor(2, mp_context=SPAWN) as pool:
        yield pool


@pytest.fixture(params=["local", "s3"])
def portable_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A store other processes can reach: a LocalStore directory, or a bucket on moto."""
    if request.param == "local":
        return resolve_store(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def _upload_all(
    pool: cf.Executor,
    pending: ss.PendingCheckpoint,
    items: list[tuple[str, int, bytes, bool]],
) -> list[PartitionSnapshotEntry]:
    futures = [
        pool.submit(upload, pending, op, p, data, is_delta) for op, p, data, is_delta in items
    ]
    return [f.result() for f in futures]


def test_workers_upload_and_the_coordinator_commits(
    portable_store: Any, workers: cf.ProcessPoolExecutor
) -> None:
    store = portable_store
    ck = checkpointer(store)
    full = {("agg", p): snapshot(p, 1) for p in range(4)} | {("count", 0): snapshot(9, 1)}
    pending = ck.begin(1)
    entries = _upload_all(workers, pending, [(op, p, d, False) for (op, p), d in full.items()])
    assert all_paths(store) and ck.list_checkpoints() == []  # uploaded, not yet visible
    assert ck.recover() is None
    m1 = ck.commit_entries(pending, entries, source_offsets={"kafka": {"0": 10}})
    assert m1.checkpoint_id == pending.checkpoint_id and m1.epoch == 1
    assert ck.read_latest() == m1.checkpoint_id
    r = ck.recover()
    assert r is not None and r.checkpoint_id == m1.checkpoint_id
    assert {(op, p): data for op, parts in r.state.items() for p, data in parts.items()} == full
    assert r.source_offsets == {"kafka": {"0": 10}}

    # Epoch 2: every partition a delta against epoch 1, uploaded by the workers.
    changes = {key: encode_delta([(b"k1", f"new{key[1]}".encode())]) for key in full}
    pending2 = ck.begin(2, parent=m1.checkpoint_id)
    entries2 = _upload_all(workers, pending2, [(op, p, d, True) for (op, p), d in changes.items()])
    m2 = ck.commit_entries(pending2, entries2, source_offsets={"kafka": {"0": 20}})
    expected = {key: apply_record_delta(full[key], changes[key]) for key in full}
    r2 = ObjectStoreCheckpointer(store, retry=FAST).recover()  # a fresh reader
    assert r2 is not None and r2.checkpoint_id == m2.checkpoint_id
    assert {
        (op, p): data for op, parts in r2.state.items() for p, data in parts.items()
    } == expected

    # Each worker restores only its own partitions from the coordinator's plan.
    plan = ck.recover_entries()
    assert plan is not None and plan.checkpoint_id == m2.checkpoint_id and plan.epoch == 2
    assert plan.source_offsets == {"kafka": {"0": 20}}
    assert [e.is_delta for e in plan.chain("agg", 3)] == [False, True]
    restored = {key: workers.submit(restore, ck, plan.chain(*key)) for key in expected}
    assert {key: f.result() for key, f in restored.items()} == expected


def test_commit_is_begin_upload_commit_entries_in_one_process(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path / "a")
    twin = checkpointer(tmp_path / "b")
    items = [("agg", p, False, snapshot(p, 1)) for p in range(3)]
    m = ck.commit(1, items, source_offsets={"s": 3})
    pending = twin.begin(1)
    m_twin = twin.commit_entries(
        pending, [pending.upload(op, p, d) for op, p, _, d in items], source_offsets={"s": 3}
    )

    # The same artifacts, entries and fields: only ids and timestamps differ.
    def shape(manifest: ss.CheckpointManifest) -> list[tuple[str, str, int, str]]:
        cid = str(manifest.checkpoint_id)
        return [
            (op, e.path.replace(cid, "ID"), e.size_bytes, e.sha256)
            for op, entry in manifest.operators.items()
            for e in entry.partitions
        ]

    assert shape(m) == shape(m_twin) and len(shape(m)) == 3
    assert m.source_offsets == m_twin.source_offsets and m.epoch == m_twin.epoch


def test_handles_pickle_and_a_memory_store_says_it_cannot(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    pending = ck.begin(3)
    copy = pickle.loads(pickle.dumps(pending))
    assert copy.checkpoint_id == pending.checkpoint_id and copy.epoch == 3
    assert "PendingCheckpoint(" in repr(copy) and str(pending.checkpoint_id) in repr(copy)
    entry = copy.upload("agg", 0, b"x")
    assert ck.commit_entries(pending, [entry]).partition_count == 1
    reader = pickle.loads(pickle.dumps(ck))
    assert reader.load_verified(entry) == b"x"

    mem = checkpointer(MemoryStore())
    mem_pending = mem.begin(1)
    with pytest.raises(ss.StoreConfigurationError, match="MemoryStore"):
        pickle.dumps(mem_pending)
    with pytest.raises(ss.StoreConfigurationError, match="MemoryStore"):
        pickle.dumps(mem)
    # Threads of the same process share it fine.
    with cf.ThreadPoolExecutor(2) as pool:
        entries = list(pool.map(lambda p: mem_pending.upload("agg", p, b"m%d" % p), range(4)))
    mem.commit_entries(mem_pending, entries)
    r = mem.recover()
    assert r is not None and r.state == {"agg": {p: b"m%d" % p for p in range(4)}}


def test_begin_checks_what_commit_checks(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(5, [("agg", 0, False, snapshot(0, 1))])
    before = all_paths(store)
    with pytest.raises(ss.CheckpointError, match="does not advance"):
        ck.begin(5)
    with pytest.raises(ss.CheckpointError, match="no manifest"):
        ck.begin(6, parent=ss.CheckpointId.now())
    with pytest.raises(ValueError, match="epoch"):
        ck.begin(-1)
    with pytest.raises(TypeError, match="CheckpointId or its str form"):
        ck.begin(6, parent=7)  # type: ignore[arg-type]
    pending = ck.begin(6, parent=str(m1.checkpoint_id))
    assert pending.parent_id == m1.checkpoint_id
    with pytest.raises(ValueError, match="no agg/partition-3"):
        pending.upload("agg", 3, encode_delta([]), is_delta=True)
    with pytest.raises(ss.CorruptDataError, match="is_delta data"):
        pending.upload("agg", 0, b"not a delta", is_delta=True)
    with pytest.raises(ValueError, match="need a parent"):
        ck.begin(6).upload("agg", 0, encode_delta([]), is_delta=True)
    assert all_paths(store) == before  # begin and refused uploads write nothing


def test_an_upload_never_overwrites_other_bytes(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    pending = ck.begin(1)
    first = pending.upload("agg", 0, b"one")
    assert pending.upload("agg", 0, b"one") == first  # a retried worker: harmless
    with pytest.raises(ss.CheckpointError, match="different content"):
        pending.upload("agg", 0, b"two")
    ck.commit_entries(pending, [first])
    assert ck.load_verified(first) == b"one"


def _rejects(ck: ObjectStoreCheckpointer, store: Any, pending: Any, entries: Any, err: Any,
             match: str) -> None:  # fmt: skip
    before = all_paths(store)
    with pytest.raises(err, match=match):
        ck.commit_entries(pending, entries)
    assert all_paths(store) == before


def test_commit_entries_rejects_bad_entries_and_leaves_the_store_unchanged(store: Any) -> None:
    ck = checkpointer(store)
    m1 = ck.commit(1, [("agg", 0, False, snapshot(0, 1))])
    committed = ck.list_checkpoints()
    pending = ck.begin(2, parent=m1.checkpoint_id)
    good = pending.upload("agg", 0, encode_delta([(b"k", b"v")]), is_delta=True)
    other = ck.begin(3)
    foreign = other.upload("agg", 1, b"elsewhere")
    _rejects(ck, store, pending, [good, foreign], ValueError, "not an artifact of pending")
    _rejects(ck, store, pending, [good, good], ValueError, "agg/partition-0 appears twice")
    # A delta (written past upload's own checks) for a partition the parent lacks.
    path = pending.paths.delta(pending.checkpoint_id, "agg", 7)
    obstore.put(store, path, encode_delta([]))
    orphan = PartitionSnapshotEntry(7, True, path, len(encode_delta([])),
                                    ss.sha256_hex(encode_delta([])))  # fmt: skip
    _rejects(ck, store, pending, [good, orphan], ValueError, "no agg/partition-7")
    # A delta in a checkpoint begun without a parent.
    lone = ck.begin(2)
    lone_path = lone.paths.delta(lone.checkpoint_id, "agg", 0)
    obstore.put(store, lone_path, encode_delta([]))
    lone_delta = PartitionSnapshotEntry(0, True, lone_path, orphan.size_bytes, orphan.sha256)
    _rejects(ck, store, lone, [lone_delta], ValueError, "need a parent")
    # Entries for artifacts that were never uploaded, or that lie about themselves.
    never = PartitionSnapshotEntry(
        1, False, pending.paths.snapshot(pending.checkpoint_id, "agg", 1), 3, "0" * 64
    )
    _rejects(ck, store, pending, [good, never], ss.CheckpointError, "artifact is missing")
    unhashed = PartitionSnapshotEntry(0, True, good.path, good.size_bytes, "")
    _rejects(ck, store, pending, [unhashed], ValueError, "sha256")
    negative = PartitionSnapshotEntry(0, True, good.path, -1, good.sha256)
    _rejects(ck, store, pending, [negative], ValueError, "negative")
    renamed = PartitionSnapshotEntry(4, True, good.path, good.size_bytes, good.sha256)
    _rejects(ck, store, pending, [renamed], ValueError, "its path does not")
    _rejects(ck, store, pending, [("agg", good)], TypeError, "PartitionSnapshotEntry")
    _rejects(ck, store, object(), [good], TypeError, "PendingCheckpoint")
    elsewhere = ObjectStoreCheckpointer(store, CheckpointPaths("other/"), retry=FAST)
    _rejects(elsewhere, store, pending, [good], ValueError, "base_prefix")
    assert ck.list_checkpoints() == committed
    # Nothing above damaged the pending checkpoint: the right entries still commit.
    m2 = ck.commit_entries(pending, [good])
    assert ck.list_checkpoints() == [*committed, m2.checkpoint_id]
    r = ck.recover()
    assert r is not None and r.checkpoint_id == m2.checkpoint_id
    assert r.state == {"agg": {0: apply_record_delta(snapshot(0, 1), encode_delta([(b"k", b"v")]))}}


def test_commit_entries_rechecks_epoch_order_and_the_parent(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    m1 = ck.commit(1, [("agg", 0, False, b"a")])
    late = ck.begin(10)  # begun first, so its id is older
    early = ck.begin(2)
    ck.commit_entries(early, [early.upload("agg", 0, b"b")])
    stale = ck.begin(3)
    ck.commit(4, [("agg", 0, False, b"c")])
    with pytest.raises(ss.CheckpointError, match="does not advance"):
        ck.commit_entries(stale, [stale.upload("agg", 0, b"d")])
    with pytest.raises(ss.CheckpointError, match="older than committed checkpoint"):
        ck.commit_entries(late, [late.upload("agg", 0, b"e")])
    # The parent deleted between begin and commit: the delta has nothing to apply to.
    base = ck.commit(5, [("agg", 0, False, snapshot(0, 5))])
    child = ck.begin(6, parent=base.checkpoint_id)
    entry = child.upload("agg", 0, encode_delta([]), is_delta=True)
    ck.delete_checkpoint(base.checkpoint_id)
    with pytest.raises(ss.CheckpointError, match="no manifest"):
        ck.commit_entries(child, [entry])
    r = ck.recover()
    assert r is not None and r.epoch == 4 and r.state == {"agg": {0: b"c"}}
    assert m1.checkpoint_id in ck.list_checkpoints()


def _pending_paths(store: Any, pending_id: str) -> list[str]:
    return [p for p in all_paths(store) if f"/{pending_id}/" in f"/{p}"]


def test_a_coordinator_killed_before_committing_leaves_nothing_visible(
    portable_store: Any,
) -> None:
    store = portable_store
    ck = checkpointer(store)
    m1 = ck.commit(1, [("agg", 0, False, snapshot(0, 1))])
    report = SPAWN.Queue()
    child = SPAWN.Process(target=doomed_coordinator, args=(ck, 2, report))
    child.start()
    try:
        pending_id = report.get(timeout=120)
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    assert len(_pending_paths(store, pending_id)) == 2  # uploaded, never committed
    assert ck.list_checkpoints() == [m1.checkpoint_id]
    assert ck.read_latest() == m1.checkpoint_id
    r = ck.recover()
    assert r is not None and r.checkpoint_id == m1.checkpoint_id
    # Newer than the newest committed checkpoint: it might still commit, so prune keeps it.
    assert ck.prune(keep_last=1) == []
    assert len(_pending_paths(store, pending_id)) == 2
    m3 = ck.commit(3, [("agg", 0, False, snapshot(0, 3))])
    deleted = ck.prune(keep_last=1)
    assert [str(cid) for cid in deleted] == sorted([str(m1.checkpoint_id), pending_id])
    assert _pending_paths(store, pending_id) == []
    assert ck.list_checkpoints() == [m3.checkpoint_id]


def test_a_begin_never_committed_is_pruned_once_a_newer_checkpoint_commits(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    abandoned = ck.begin(1)
    abandoned.upload("agg", 0, b"lost")
    m = ck.commit(2, [("agg", 0, False, b"kept")])
    assert ck.prune(keep_last=3) == [abandoned.checkpoint_id]
    assert all_paths(ck.store) == sorted(
        [ck.paths.latest_pointer(), ck.paths.manifest(m.checkpoint_id),
         ck.paths.snapshot(m.checkpoint_id, "agg", 0)]
    )  # fmt: skip


def test_load_verified_detects_a_flipped_byte_and_workers_fall_back_together(
    tmp_path: Path, workers: cf.ProcessPoolExecutor
) -> None:
    store = resolve_store(tmp_path)
    ck = checkpointer(store)
    old = ck.commit(1, [("agg", p, False, snapshot(p, 1)) for p in range(2)])
    new = ck.commit(2, [("agg", p, False, snapshot(p, 2)) for p in range(2)])
    victim = new.operators["agg"].partition(1)
    assert victim is not None
    data = bytearray(read(store, victim.path))
    data[len(data) // 2] ^= 0x01
    overwrite(store, victim.path, bytes(data))
    assert ck.load_verified(new.operators["agg"].partitions[0]) == snapshot(0, 2)
    with pytest.raises(ss.IntegrityError, match=victim.path):
        ck.load_verified(victim)
    with pytest.raises(ss.IntegrityError, match=victim.path):
        workers.submit(restore, ck, (victim,)).result()
    with pytest.raises(ValueError, match="not a checkpoint artifact"):
        ck.load_verified(PartitionSnapshotEntry(0, False, "elsewhere/x", 1, "0" * 64))

    # The coordinator's verifying plan skips the damaged checkpoint for everyone.
    plan = ck.recover_entries()
    assert plan is not None and plan.checkpoint_id == old.checkpoint_id
    assert [cid for cid, _ in plan.fallbacks] == [str(new.checkpoint_id)]
    # A plan that leaves verification to the workers: one fails, so all fall back together.
    lazy = ck.recover_entries(verify=False)
    assert lazy is not None and lazy.checkpoint_id == new.checkpoint_id
    results = [workers.submit(restore, ck, lazy.chain("agg", p)) for p in range(2)]
    assert results[0].result() == snapshot(0, 2)
    with pytest.raises(ss.IntegrityError):
        results[1].result()
    older = ck.recover_entries(before=lazy.checkpoint_id, verify=False)
    assert older is not None and older.checkpoint_id == old.checkpoint_id
    again = [workers.submit(restore, ck, older.chain("agg", p)) for p in range(2)]
    assert [f.result() for f in again] == [snapshot(0, 1), snapshot(1, 1)]
    assert ck.recover_entries(before=old.checkpoint_id) is None
    with pytest.raises(KeyError, match="no agg/partition-9"):
        older.chain("agg", 9)
    assert "RecoveryPlan(" in repr(older) and pickle.loads(pickle.dumps(older)) == older


# -- any interleaving: recovery returns the newest fully committed checkpoint ------------

_ACTIONS = ["begin", "begin", "upload", "upload", "commit", "crash", "prune", "prune"]
_STEPS = st.lists(st.tuples(st.sampled_from(_ACTIONS), st.integers(0, 7)), min_size=4, max_size=24)


@settings(max_examples=100)
@given(steps=_STEPS)
# A coordinator begins while another checkpoint is committed, then a prune runs: its
# artifacts must survive, since it may still commit.
@example(steps=[("begin", 0), ("commit", 0), ("begin", 0), ("upload", 1), ("prune", 0),
                ("commit", 0)])  # fmt: skip
def test_any_interleaving_recovers_the_newest_committed_checkpoint(
    steps: list[tuple[str, int]],
) -> None:
    store = MemoryStore()
    ck = checkpointer(store)
    epoch = 0
    open_: list[tuple[Any, dict[int, tuple[PartitionSnapshotEntry, bytes]]]] = []
    committed: list[tuple[int, dict[int, bytes]]] = []  # (epoch, state) the model expects
    newest_epoch = 0
    for step, (action, pick) in enumerate(steps):
        if action == "begin":
            epoch += 1
            open_.append((ck.begin(epoch), {}))
        elif action == "upload" and open_:
            pending, uploaded = open_[pick % len(open_)]
            payload = f"{step}:{pick}".encode() * (pick % 3)
            if pick not in uploaded:
                uploaded[pick] = (pending.upload("agg", pick, payload), payload)
        elif action == "commit" and open_:
            pending, uploaded = open_.pop(pick % len(open_))
            entries = [entry for entry, _ in uploaded.values()]
            if pending.epoch > newest_epoch:  # begun after every committed one: ids agree
                ck.commit_entries(pending, entries)
                newest_epoch = pending.epoch
                committed.append((pending.epoch, {p: d for p, (_, d) in uploaded.items()}))
            else:
                with pytest.raises(ss.CheckpointError):
                    ck.commit_entries(pending, entries)
        elif action == "crash" and open_:
            open_.pop(pick % len(open_))  # the coordinator died: never committed
        elif action == "prune":
            ck.prune(keep_last=1 + pick % 3)
        # prune never touches a pending checkpoint that may still commit.
        for pending, uploaded in open_:
            if pending.epoch > newest_epoch:
                assert all(ck.load_verified(e) == d for e, d in uploaded.values())
        for reader in (ck, ObjectStoreCheckpointer(store, retry=FAST)):
            r = reader.recover()
            if not committed:
                assert r is None
            else:
                assert r is not None and r.epoch == committed[-1][0]
                assert r.state.get("agg", {}) == committed[-1][1]
    if committed:
        ck.prune(keep_last=1)
        newest = ck.list_checkpoints()[-1]
        leftovers = {ck.paths.id_of(p) for p in all_paths(store)} - {None}
        assert all(cid >= newest for cid in leftovers if cid is not None)


def test_commit_entries_then_prune_when_asked(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    m1 = ck.commit(1, [("agg", 0, False, b"a")])
    m2 = ck.commit(2, [("agg", 0, False, b"b")], keep_last=2)
    assert ck.list_checkpoints() == [m1.checkpoint_id, m2.checkpoint_id]
    pending = ck.begin(3)
    entry = pending.upload("agg", 0, b"c")
    before = all_paths(ck.store)
    with pytest.raises(ValueError, match="keep_last"):
        ck.commit_entries(pending, [entry], keep_last=0)
    assert all_paths(ck.store) == before  # refused before the commit point
    m3 = ck.commit_entries(pending, [entry], keep_last=1)
    assert ck.list_checkpoints() == [m3.checkpoint_id]
    with pytest.raises(ValueError, match="keep_last"):
        ck.commit(4, [("agg", 0, False, b"d")], keep_last=True)
    assert ck.list_checkpoints() == [m3.checkpoint_id]
