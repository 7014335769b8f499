"""Object-store checkpointer on the local filesystem: commit and recover throughput.

    python benchmarks/bench_checkpoint.py [--quick] [--dir /tmp]

A checkpoint of 16 partitions x 16 MiB (``--quick``: 4 x 2 MiB) is committed to an obstore
``LocalStore`` and compared with

* a plain-Python loop of ``hashlib.sha256`` + ``obstore.put`` per partition (target: the
  checkpointer is >= 1.5x faster, by hashing in C++ without the GIL and uploading on a
  bounded thread pool);
* the disk's raw sequential write speed: the same bytes written with ``open().write()`` in
  16 MiB chunks, **without fsync** (obstore's LocalStore does not fsync either, so both
  measure writing into the page cache plus the filesystem's metadata work).

Recovery of that checkpoint (list, manifest, read and SHA-256-verify every artifact) is
compared with reading the same files back with ``open().read()``. All data is warm in the
page cache in both cases, so these are CPU/memory-bound figures; recovery's SHA-256 pass
over every byte is what the raw read does not pay. Each timed call starts after an untimed
cleanup of the previous round's files and an ``os.sync()``, so no call is throttled by
writeback of another's dirty pages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import obstore
from obstore.store import LocalStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, print_table, row

from streamstate import ObjectStoreCheckpointer


def _mib_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 2**20:,.0f} MiB/s"


def _interleaved_medians(
    steps: list[tuple[Callable[[], object], Callable[[], object]]], repeats: int
) -> list[float]:
    """Like ``_harness.interleaved_medians``, but each timed call is preceded by an untimed
    cleanup (deleting the previous round's files), and the first round is a warm-up."""
    times: list[list[float]] = [[] for _ in steps]
    for round_no in range(repeats + 1):
        for i, (fn, cleanup) in enumerate(steps):
            cleanup()
            os.sync()
            start = time.perf_counter()
            fn()
            if round_no:
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(quick: bool = False, base_dir: str | None = None) -> list[Row]:
    partitions, size = (4, 2 << 20) if quick else (16, 16 << 20)
    repeats = 3 if quick else 5
    total = partitions * size
    rng = np.random.default_rng(7)
    blobs = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(partitions)]
    snapshots = [("agg", p, False, blobs[p]) for p in range(partitions)]

    parent = Path(base_dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < 4 * total:
        raise SystemExit(f"need {4 * total >> 20} MiB free under {parent}, have {free >> 20}")
    root = Path(tempfile.mkdtemp(prefix="streamstate-bench-ckpt-", dir=parent))
    try:
        store = LocalStore(str(root / "store"), mkdir=True)
        ck = ObjectStoreCheckpointer(store)
        raw_dir = root / "raw"
        raw_dir.mkdir()
        counter = [0]

        def commit() -> None:
            counter[0] += 1
            ck.commit(counter[0], snapshots)

        def drop_checkpoints() -> None:
            for cid in ck.list_checkpoints():
                ck.delete_checkpoint(cid)

        def plain_loop() -> None:
            # What a user would write without streamstate: hash, put, then a manifest.
            entries = []
            for p, data in enumerate(blobs):
                digest = hashlib.sha256(data).hexdigest()
                path = f"plain/partition-{p}.snap"
                obstore.put(store, path, data)
                entries.append({"path": path, "sha256": digest, "size": len(data)})
            obstore.put(store, "plain/manifest.json", json.dumps(entries).encode())

        def raw_write() -> None:
            for p, data in enumerate(blobs):
                with open(raw_dir / f"partition-{p}.bin", "wb") as f:
                    f.write(data)

        t_commit, t_plain, t_raw = _interleaved_medians(
            [
                (commit, drop_checkpoints),
                (plain_loop, lambda: shutil.rmtree(root / "store" / "plain", ignore_errors=True)),
                (raw_write, lambda: [f.unlink() for f in raw_dir.iterdir()]),
            ],
            repeats,
        )

        recovered_bytes = [0]

        def recover() -> None:
            result = ck.recover()
            assert result is not None
            recovered_bytes[0] = sum(len(b) for b in result.state["agg"].values())

        def raw_read() -> None:
            for p in range(partitions):
                with open(raw_dir / f"partition-{p}.bin", "rb") as f:
                    f.read()

        t_recover, t_read = _interleaved_medians(
            [(recover, lambda: None), (raw_read, lambda: None)], repeats
        )
        assert recovered_bytes[0] == total
    finally:
        shutil.rmtree(root, ignore_errors=True)

    label = f"{partitions} x {size >> 20} MiB"
    return [
        row(f"commit {label} vs hashlib+obstore.put loop", _mib_per_s(total, t_commit),
            _mib_per_s(total, t_plain), t_plain / t_commit, ">= 1.5x"),
        row(f"commit {label} vs raw write (no fsync)", _mib_per_s(total, t_commit),
            _mib_per_s(total, t_raw), t_raw / t_commit, "report"),
        row(f"recover {label} (verified) vs raw read", _mib_per_s(total, t_recover),
            _mib_per_s(total, t_read), t_read / t_recover, "report"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--dir", default=None, help="where to put the temporary store")
    args = parser.parse_args()
    print_table(run(args.quick, args.dir), title="object-store checkpointer (LocalStore)")


if __name__ == "__main__":
    main()
