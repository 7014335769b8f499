"""Checkpoints on the local filesystem: the checkpointer's commit and recover throughput,
and what a Pipeline's incremental, asynchronous checkpoints cost.

    python benchmarks/bench_checkpoint.py [--quick] [--dir /tmp] [--part all|commit|pipeline]

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

Pipeline rows (``--quick``: a tenth of the events and keys):

* throughput of a Pipeline over 10M events, 1M int64 keys, 64K-row batches, 2 partitions,
  checkpointing every 20 batches, against the same pipeline committing only its final
  checkpoint (target >= 0.8x);
* the ceiling of that ratio: the least a checkpoint of what changed must do (capture the
  delta, SHA-256 it, write it once), measured on the bare core every 20 batches of the same
  events, added to the final-only job's CPU. While the job keeps both cores busy, a
  checkpoint's CPU is taken from the folding, so no scheduling of that work does better
  (only cycles the job leaves idle could absorb some of it);
* a hot set: 1M keys loaded, then 9M events over 10K keys, a checkpoint every 16 batches:
  the median delta checkpoint's bytes against the first (full) checkpoint's (target: a
  delta <= 5% of the full, i.e. >= 20x smaller);
* recovering that job's last checkpoint, the end of a chain of 9 deltas after a full,
  against recovering a full checkpoint of the same final state (target: the chain takes
  <= 2x as long, i.e. >= 0.5x the speed).
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

import streamstate as ss
from streamstate import ObjectStoreCheckpointer
from streamstate.pipeline import ArraySource, Pipeline, PipelineRun


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


def run(quick: bool = False, base_dir: str | None = None, part: str = "all") -> list[Row]:
    rows = []
    if part in ("all", "commit"):
        rows += run_commit(quick, base_dir)
    if part in ("all", "pipeline"):
        rows += run_pipeline(quick, base_dir)
    return rows


def run_commit(quick: bool = False, base_dir: str | None = None) -> list[Row]:
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


# -- a Pipeline's checkpoints ------------------------------------------------------------

PIPELINE_BATCH = 65_536


def _uniform_columns(events: int, keys: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {"k": rng.integers(0, keys, events), "v": rng.normal(0, 1, events)}


def _uniform_source(events: int, keys: int) -> ArraySource:
    return ArraySource("events", _uniform_columns(events, keys))


def _hot_source(loaded: int, events: int, hot: int) -> ArraySource:
    """``loaded`` keys once each (shuffled), then ``events`` events over ``hot`` of them."""
    rng = np.random.default_rng(13)
    keys = np.concatenate([rng.permutation(loaded), rng.integers(0, hot, events)])
    return ArraySource("events", {"k": keys, "v": rng.normal(0, 1, len(keys))})


def _pipeline_run(
    source: ArraySource,
    store: Path,
    batch_size: int,
    checkpoint_every: int,
    full_every: int = 10,
    defer: bool = False,
) -> PipelineRun:
    pipe = Pipeline(source, key="k", values="v", partitions=2, store=store,
                    batch_size=batch_size, checkpoint_every=checkpoint_every,
                    full_checkpoint_every=full_every, defer_busy_checkpoints=defer)  # fmt: skip
    try:
        return pipe.run()
    finally:
        pipe.close()


def least_checkpoint_cost(
    events: int, keys: int, batch: int, every: int, where: Path
) -> tuple[float, float, list[int]]:
    """The least the every-``every``-batches job's checkpoints before the final one must
    cost, measured on the bare core, one thread, nothing overlapped: (seconds folding all
    ``events``, seconds of those checkpoints, each one's bytes). A checkpoint here is what
    any design that stores what changed must do: capture the changed keys (the store's
    zero-copy delta), SHA-256 them once and write them once (no fsync)."""
    columns = _uniform_columns(events, keys)
    all_keys, all_values = columns["k"], columns["v"]
    store = ss.NumericAggregateStore(2)
    parts = [store.partition(p) for p in range(2)]
    fold_seconds = checkpoint_seconds = 0.0
    sizes: list[int] = []
    target = where / "delta.bin"
    batches = range(0, events, batch)
    for i, lo in enumerate(batches):
        k, v = all_keys[lo : lo + batch], all_values[lo : lo + batch]
        owner = k % 2  # routing is not what is measured here
        split = [(k[owner == p], v[owner == p]) for p in range(2)]
        start = time.perf_counter()
        for part, (pk, pv) in zip(parts, split, strict=True):
            part.fold(pk, pv)
        fold_seconds += time.perf_counter() - start
        if (i + 1) % every == 0 and i + 1 < len(batches):
            start = time.perf_counter()
            captured = memoryview(store.capture(delta=True))
            hashlib.sha256(captured).digest()
            with open(target, "wb") as f:
                f.write(captured)
            checkpoint_seconds += time.perf_counter() - start
            sizes.append(captured.nbytes)
            captured.release()
    target.unlink(missing_ok=True)
    return fold_seconds, checkpoint_seconds, sizes


def run_pipeline(quick: bool = False, base_dir: str | None = None) -> list[Row]:
    scale = 10 if quick else 1
    # --quick keeps the shape: a tenth of the events, keys and rows per batch.
    events, keys, batch = 10_000_000 // scale, 1_000_000 // scale, PIPELINE_BATCH // scale
    repeats = 3
    root = Path(tempfile.mkdtemp(prefix="streamstate-bench-pipe-", dir=base_dir))
    try:
        # Throughput: a checkpoint every 20 batches vs only the final one.
        uniform = _uniform_source(events, keys)
        reports: dict[str, list[PipelineRun]] = {"every": [], "deferred": [], "final": []}
        cpu: dict[str, list[float]] = {name: [] for name in reports}

        def timed_run(name: str, every: int, defer: bool = False) -> Callable[[], object]:
            def fn() -> None:
                start = time.process_time()  # every thread of the process
                reports[name].append(
                    _pipeline_run(uniform, root / name, batch, every, defer=defer)
                )
                cpu[name].append(time.process_time() - start)
            return fn

        def fresh(name: str) -> Callable[[], object]:
            return lambda: shutil.rmtree(root / name, ignore_errors=True)

        t_every, t_deferred, t_final = _interleaved_medians(
            [
                (timed_run("every", 20), fresh("every")),
                (timed_run("deferred", 20, defer=True), fresh("deferred")),
                (timed_run("final", 10**9), fresh("final")),
            ],
            repeats,
        )

        def label_of(name: str, seconds: float) -> str:
            last = reports[name][-1]
            # What each checkpoint beyond the final one costs in CPU (every thread): on two
            # shared cores this, not the wall time, is what the folding threads lose.
            extra = len(last.checkpoints) - 1
            added = statistics.median(cpu[name]) - statistics.median(cpu["final"])
            per_checkpoint = f", +{added / extra * 1000:.0f} ms CPU/ckpt" if extra > 0 else ""
            return (
                f"{events / seconds / 1e6:.2f} M ev/s, CPU {statistics.median(cpu[name]):.2f} s"
                f"{per_checkpoint} "
                f"({len(last.checkpoints)} ckpts, {last.delta_checkpoints} delta, stall "
                f"{last.stall_seconds:.2f} s, upload {last.upload_seconds:.2f} s, waited "
                f"{last.commit_wait_seconds:.2f} s)"
            )

        final_label = label_of("final", t_final)

        # Hot set: one job, a full then deltas; and the same job checkpointing in full.
        loaded, hot = keys, 10_000 // scale
        hot_source = _hot_source(loaded, events - loaded, hot)
        chain_run = _pipeline_run(hot_source, root / "chain", batch, 16, full_every=10)
        _pipeline_run(hot_source, root / "full", batch, 16, full_every=1)
        first_full = chain_run.checkpoints[0].bytes
        delta_sizes = [c.bytes for c in chain_run.checkpoints if c.is_delta]

        def recover(store: Path) -> Callable[[], object]:
            def fn() -> None:
                pipe = Pipeline(hot_source, key="k", values="v", partitions=2, store=store)
                assert pipe.recover() == len(hot_source)
            return fn

        least = [least_checkpoint_cost(events, keys, batch, 20, root) for _ in range(repeats)]
        least_fold = statistics.median(fold for fold, _, _ in least)
        least_ckpt = statistics.median(ckpt for _, ckpt, _ in least)
        least_sizes = least[0][2]  # the same events every repeat: the same deltas

        chain_length = sum(1 for c in reversed(chain_run.checkpoints) if c.is_delta)
        t_chain, t_full = _interleaved_medians(
            [(recover(root / "chain"), lambda: None), (recover(root / "full"), lambda: None)],
            5 if not quick else 3,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    label = f"{events / 1e6:g}M events, {keys / 1e6:g}M keys, {batch:,}-row batches, 2 partitions"
    rows = [
        row(f"pipeline {label}: checkpoint every 20 batches vs final only",
            label_of("every", t_every), final_label, t_final / t_every, ">= 0.8x"),
        row(f"pipeline {label}: every 20 batches, deferred while one is in flight, vs final",
            label_of("deferred", t_deferred), final_label, t_final / t_deferred, "report"),
    ]  # fmt: skip
    cpu_final = statistics.median(cpu["final"])
    rows.append(row(
        "  bound: the final-only job's CPU vs it plus the least work of the checkpoints "
        "before the final (capture, SHA-256, write each delta)",
        f"{cpu_final:.2f} s + {least_ckpt:.2f} s ({least_ckpt / len(least_sizes) * 1000:.0f} ms, "
        f"{statistics.median(least_sizes) / 2**20:.1f} MiB each; bare fold {least_fold:.2f} s)",
        f"{cpu_final:.2f} s", cpu_final / (cpu_final + least_ckpt),
        "ceiling of the 0.8x row when CPU-bound"))  # fmt: skip
    if not delta_sizes:
        raise SystemExit("the hot-set job wrote no delta checkpoints")
    median_delta = statistics.median(delta_sizes)
    rows.append(row(
        f"hot set ({loaded / 1e6:g}M keys, then {hot:,} hot): median delta vs first full",
        f"{median_delta:,.0f} B ({median_delta / loaded:.1f} B/key loaded)",
        f"{first_full:,} B ({first_full / loaded:.1f} B/key)", first_full / median_delta,
        ">= 20x (delta <= 5%)"))  # fmt: skip
    rows.append(row(
        f"recover a chain of {chain_length} deltas after a full vs a full of the same state",
        f"{t_chain * 1000:.0f} ms", f"{t_full * 1000:.0f} ms", t_full / t_chain,
        ">= 0.5x (<= 2x the time)"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--dir", default=None, help="where to put the temporary store")
    parser.add_argument("--part", choices=["all", "commit", "pipeline"], default="all",
                        help="the checkpointer's rows, the Pipeline's, or both")  # fmt: skip
    args = parser.parse_args()
    print_table(run(args.quick, args.dir, args.part),
                title="checkpoints: the checkpointer and a Pipeline's (LocalStore)")  # fmt: skip


if __name__ == "__main__":
    main()
