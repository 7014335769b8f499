"""Helpers shared by the checkpoint test modules (``test_checkpoint*.py``).

Store-facing tests take conftest's ``store`` fixture, which runs them against obstore's
LocalStore, MemoryStore and an S3Store talking to a moto S3 server on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any

import obstore

from streamstate.checkpoint import ObjectStoreCheckpointer
from streamstate.codec import encode_records
from streamstate.retry import RetryPolicy

FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01, max_elapsed=10.0)


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
