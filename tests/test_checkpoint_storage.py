"""Where checkpoints live: store URLs and prefixes, the storage adapter, bounded I/O."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from checkpoint_support import FAST, all_paths, checkpointer

from streamstate.checkpoint import (
    CheckpointStorage,
    ObjectStoreCheckpointer,
)
from streamstate.manifest import (
    CheckpointPaths,
)
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
