"""Retries: classifying object-store failures, backoff, and commits under injected faults."""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import obstore
import pytest
from checkpoint_support import all_paths, checkpointer, snapshot
from hypothesis import given
from hypothesis import strategies as st
from obstore import exceptions as obs_errors
from obstore.store import LocalStore, S3Store

import streamstate as ss
from streamstate.checkpoint import (
    CheckpointStorage,
    ObjectStoreCheckpointer,
    encode_delta,
)
from streamstate.codec import decode_records
from streamstate.manifest import (
    CheckpointId,
)
from streamstate.retry import RetryPolicy, is_transient
from streamstate.storage import resolve_store

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


def test_configuration_errors_are_permanent() -> None:
    # Plain http:// without allow_http: obstore cannot even build its client.
    http = S3Store("bucket", endpoint="http://127.0.0.1:9", region="us-east-1",
                   access_key_id="k", secret_access_key="s")  # fmt: skip
    with pytest.raises(obs_errors.GenericError) as info:
        obstore.get(http, "x")
    assert "builder error" in str(info.value) and not is_transient(info.value)
    ck = ObjectStoreCheckpointer(http, retry=RetryPolicy(max_attempts=10, max_elapsed=30))
    start = time.monotonic()
    with pytest.raises(ss.CheckpointError) as failed:
        ck.list_checkpoints()
    assert "attempt" not in str(failed.value) and "Debug source" not in str(failed.value)
    assert time.monotonic() - start < 1.0
    loop = obs_errors.GenericError(
        "Generic LocalFileSystem error: Unable to walk dir: File system loop found: /s/a/loop "
        "points to an ancestor /s"
    )
    assert not is_transient(loop)
