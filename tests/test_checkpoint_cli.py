"""The ``streamstate checkpoints`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from checkpoint_support import checkpointer, snapshot

from streamstate.checkpoint import ObjectStoreCheckpointer, encode_delta
from streamstate.manifest import CheckpointId

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


def test_cli_bad_store_url_is_a_usage_error(tmp_path: Path) -> None:
    for url in ("foo://bar", "s3://"):
        out = run_cli("checkpoints", "list", url)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("streamstate: error: ") and url in out.stderr
        assert "Traceback" not in out.stderr and "Debug source" not in out.stderr


def test_cli_validate_reports_an_unparseable_manifest_as_damage(tmp_path: Path) -> None:
    ck = ObjectStoreCheckpointer(tmp_path)
    ck.commit(1, [("agg", 0, False, b"x")])
    junk = CheckpointId.now()
    target = tmp_path / ck.paths.manifest(junk)
    target.parent.mkdir(parents=True)
    target.write_bytes(b'{"version":2,"manifest_sha256":"0","x":1e999}')
    out = run_cli("checkpoints", "validate", str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"DAMAGED {junk}" in out.stdout and "1 problem(s)" in out.stdout
    listing = run_cli("checkpoints", "list", str(tmp_path))
    assert listing.returncode == 0 and "DAMAGED" in listing.stdout


def test_cli_list_shows_the_partition_count(tmp_path: Path) -> None:
    ck = ObjectStoreCheckpointer(tmp_path)
    # Two operators over the same three partitions: three partitions, six artifacts.
    ck.commit(1, [(op, p, False, b"x") for op in ("sum", "max") for p in range(3)])
    # A pipeline packs all of its partitions into one artifact and records how many it has.
    ck.commit(2, [("aggregates", 0, False, b"x")], metadata={"partitions": 8})
    rows = run_cli("checkpoints", "list", str(tmp_path)).stdout.splitlines()
    column = rows[0].index("PARTITIONS")  # the table's columns are aligned
    assert rows[1][column:].split()[0] == "3"
    assert rows[2][column:].split()[0] == "8"
