"""Where checkpoints live: store URLs and prefixes, the storage adapter, bounded I/O."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import obstore
import pytest
from checkpoint_support import FAST, all_paths, checkpointer
from obstore.store import LocalStore

import streamstate as ss
from streamstate.batcher import CheckpointBatcher
from streamstate.checkpoint import CheckpointStorage, ObjectStoreCheckpointer
from streamstate.manifest import CheckpointId, CheckpointPaths
from streamstate.retry import RetryPolicy
from streamstate.storage import resolve_store


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


# -- bad store URLs -------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["foo://bar", "s3://", "file://elsewhere/x"])
def test_a_bad_store_url_is_a_clear_streamstate_error(url: str) -> None:
    for make in (resolve_store, ObjectStoreCheckpointer, CheckpointBatcher):
        with pytest.raises(ss.StoreConfigurationError) as info:
            make(url)
        assert isinstance(info.value, ss.StreamStateError) and isinstance(info.value, ValueError)
        message = str(info.value)
        assert url in message and "Debug source" not in message and "\n" not in message


# -- local stores never follow links when listing or deleting -------------------------------


def victim(tmp_path: Path) -> Path:
    """Someone else's files, outside the store."""
    other = tmp_path / "victim"
    (other / "deep").mkdir(parents=True)
    (other / "precious.txt").write_bytes(b"keep me")
    (other / "deep" / "manifest.json").write_bytes(b"keep me too")
    return other


def victim_intact(other: Path) -> bool:
    return (other / "precious.txt").read_bytes() == b"keep me" and (
        other / "deep" / "manifest.json"
    ).read_bytes() == b"keep me too"


def test_deleting_a_checkpoint_removes_a_link_not_its_target(tmp_path: Path) -> None:
    other = victim(tmp_path)
    ck = checkpointer(tmp_path / "store")
    ms = [ck.commit(e, [("agg", 0, False, b"%d" % e)]) for e in range(1, 4)]
    for m in ms[:2]:
        inside = tmp_path / "store" / ck.paths.checkpoint_dir(m.checkpoint_id)
        os.symlink(other, inside / "operators" / "link")
        os.symlink(other / "precious.txt", inside / "file-link")
    assert ck.prune(keep_last=1) == [ms[0].checkpoint_id, ms[1].checkpoint_id]
    assert victim_intact(other)
    assert not (tmp_path / "store" / ck.paths.checkpoint_dir(ms[0].checkpoint_id)).exists()
    assert ck.recover().checkpoint_id == ms[2].checkpoint_id  # type: ignore[union-attr]


def test_a_linked_checkpoint_directory_is_not_the_stores(tmp_path: Path) -> None:
    other = victim(tmp_path)
    ck = checkpointer(tmp_path / "store")
    m = ck.commit(1, [("agg", 0, False, b"x")])
    fake = CheckpointId.now()
    os.symlink(other / "deep", tmp_path / "store" / ck.paths.checkpoint_dir(fake).rstrip("/"))
    assert ck.list_checkpoints() == [m.checkpoint_id]  # its manifest.json is not ours
    ck.delete_checkpoint(fake)
    assert victim_intact(other)
    assert ck.prune(keep_last=1) == []
    assert victim_intact(other)


def test_a_link_loop_does_not_make_checkpoints_unrecoverable(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path / "store", retry=RetryPolicy(max_attempts=10, max_elapsed=5.0))
    ms = [ck.commit(e, [("agg", 0, False, b"%d" % e)]) for e in range(1, 4)]
    root = tmp_path / "store" / ck.paths.base_prefix
    os.symlink(root, root / str(ms[0].checkpoint_id) / "loop")
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    start = time.monotonic()
    assert ck.list_checkpoints() == [m.checkpoint_id for m in ms]
    assert ck.recover().checkpoint_id == ms[2].checkpoint_id  # type: ignore[union-attr]
    assert ck.prune(keep_last=1) == [ms[0].checkpoint_id, ms[1].checkpoint_id]
    assert ck.verify_checkpoint(ms[2].checkpoint_id) == ms[2]
    assert time.monotonic() - start < 5.0  # nothing was retried


def test_listing_a_local_store_matches_obstore_for_plain_trees(tmp_path: Path) -> None:
    storage = CheckpointStorage(tmp_path)
    for path in ["a/b/c.bin", "a/d.bin", "e.bin", "a/b/deeper/f.bin"]:
        storage.put(path, b"x")
    (tmp_path / "a" / "upload#12").write_bytes(b"in flight")  # obstore's staging name
    expected = sorted(meta["path"] for meta in obstore.list(LocalStore(str(tmp_path))).collect())
    assert storage.list("") == expected == ["a/b/c.bin", "a/b/deeper/f.bin", "a/d.bin", "e.bin"]
    assert storage.list("a/b/") == ["a/b/c.bin", "a/b/deeper/f.bin"]
    assert storage.list_directory("a") == ["a/d.bin"]
    assert storage.list("absent/") == []
    storage.delete("a/b/deeper/f.bin")
    assert not (tmp_path / "a" / "b" / "deeper").exists()  # emptied directories go too
    storage.delete("a/b/deeper/f.bin")  # missing: not an error


# -- existence checks ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exists_answers_for_objects_only(tmp_path: Path, s3_server: Any, where: str) -> None:
    store = (LocalStore(str(tmp_path), mkdir=True) if where == "local"
             else s3_server.store(s3_server.create_bucket()))  # fmt: skip
    storage = CheckpointStorage(store)
    assert storage.is_local == (where == "local")
    storage.put("a/b.bin", b"x")
    assert storage.exists("a/b.bin")
    assert not storage.exists("a/c.bin")
    assert not storage.exists("a")  # a directory (local) or a mere prefix (s3)
    storage.delete("a/b.bin")
    assert not storage.exists("a/b.bin")


def test_exists_does_not_look_through_a_linked_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.bin").write_bytes(b"x")
    root = tmp_path / "store"
    root.mkdir()
    (root / "linked").symlink_to(outside)
    storage = CheckpointStorage(LocalStore(str(root)))
    assert not storage.exists("linked/f.bin")


def test_a_delta_commit_reads_its_parents_manifest_at_most_once(tmp_path: Path) -> None:
    # The checkpointer committed the parent itself, so neither begin nor the commit point
    # reads that manifest back; the commit point still checks that it exists.
    gets: list[str] = []

    class Recording(CheckpointStorage):
        def get(self, path: str) -> Any:
            gets.append(path)
            return super().get(path)

    ck = ObjectStoreCheckpointer(Recording(resolve_store(tmp_path)), retry=FAST)
    parent = ck.commit(1, [("agg", 0, False, b"full")])
    gets.clear()
    ck.commit(2, [("agg", 0, True, b"d")], parent=parent.checkpoint_id, validate_delta=None)
    assert ck.paths.manifest(parent.checkpoint_id) not in gets
    # A parent deleted meanwhile is still refused at the commit point.
    other = ObjectStoreCheckpointer(str(tmp_path))
    third = ck.commit(3, [("agg", 0, False, b"full")])
    other.delete_checkpoint(third.checkpoint_id)
    with pytest.raises(ss.CheckpointError, match="no manifest"):
        ck.commit(4, [("agg", 0, True, b"d")], parent=third.checkpoint_id, validate_delta=None)
    assert [m.epoch for m in map(ck.load_manifest, ck.list_checkpoints())] == [1, 2]
