"""Shared fixtures for the streamstate test suite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# --import-mode=importlib puts no test directory on sys.path; the checkpoint tests share
# helpers in checkpoint_support.py, so make this directory importable.
sys.path.insert(0, str(Path(__file__).parent))

# CI machines are small and shared: no deadlines, a moderate number of examples.
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("STREAMSTATE_HYPOTHESIS_PROFILE", "ci"))


# -- a real S3 server on 127.0.0.1 (moto's server mode) ----------------------------------

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server running in a child process; makes buckets and stores for tests."""

    endpoint: str

    def create_bucket(self) -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        import boto3

        name = f"test-{uuid.uuid4().hex[:16]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=S3_REGION,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
        )
        client.create_bucket(Bucket=name)
        return name

    def store_options(self) -> dict[str, Any]:
        """Keyword arguments for ``S3Store`` / ``obstore.store.from_url``."""
        return {
            "endpoint": self.endpoint,
            "region": S3_REGION,
            "access_key_id": S3_ACCESS_KEY,
            "secret_access_key": S3_SECRET_KEY,
            "client_options": {"allow_http": True},
        }

    def store(self, bucket: str, prefix: str | None = None) -> Any:
        """An obstore ``S3Store`` on ``bucket`` talking to this server."""
        from obstore.store import S3Store

        return S3Store(bucket, prefix=prefix, **self.store_options())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto server did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the whole session, in its own process (so its threads and
    log output stay out of the test process)."""
    with tempfile.TemporaryDirectory(prefix="streamstate-moto-") as tmp:
        log = Path(tmp) / "moto.log"
        for _ in range(3):  # the port could be taken between probing and binding it
            port = _free_port()
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                _wait_for_port(port, proc, log, timeout=30.0)
                break
            except RuntimeError:
                proc.kill()
                proc.wait()
        else:
            raise RuntimeError(f"could not start moto:\n{log.read_text(errors='replace')}")
        try:
            yield S3Server(endpoint=f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def s3_store(s3_server: S3Server) -> Any:
    """An obstore ``S3Store`` on a fresh bucket of the session's moto server."""
    return s3_server.store(s3_server.create_bucket())


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray for a test module, 2 CPUs as CI has (a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("ray_cluster")``, after skipping without Ray)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """An obstore store of each backend in turn: a store-facing test runs once per backend
    (a LocalStore under tmp_path, a MemoryStore, an S3Store on the moto server)."""
    from obstore.store import MemoryStore

    from streamstate.storage import resolve_store

    if request.param == "local":
        return resolve_store(tmp_path / "store")
    if request.param == "memory":
        return MemoryStore()
    return request.getfixturevalue("s3_store")
