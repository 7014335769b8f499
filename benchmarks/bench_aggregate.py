"""Benchmarks for the cross-partition aggregate stores (issue 3).

Run as a script (``python benchmarks/bench_aggregate.py [--quick]``) to print one table row
per figure: streamstate and its baseline measured side by side in the same run (median of
several repeats), their ratio, and the target. ``run(quick)`` returns the same rows for
``benchmarks/run_all.py``.

Figures:
- fold, end to end (fold 10M rows with 1M distinct int64 keys, publish, ``results()``):
  against a pure-Python dict loop, pandas ``groupby().agg``, and DuckDB with 2 threads;
  against DuckDB at the micro-batch sizes a stream pipeline folds (64K rows per ``fold``
  call, the target, and 4K / 1M for the curve) and with one 5M-row call per thread.
  The streamstate run folds 2 partitions on 2 threads; the rows are split in halves, so
  almost every key is folded, published and merged in both partitions (the worst case).
  A second DuckDB row feeds each partition the keys it owns (input partitioned by key, as
  a keyed stream usually is).
- 2 threads against 1 thread for the same end-to-end fold.
- ``publish_many`` from 2 threads against a ``dict`` guarded by a ``threading.Lock``.
- memory per group at 1M groups.
- value columns (issue 12): two value columns folded as one (n, 2) block into one store
  against the same two columns folded into two one-column stores (fold + publish +
  results, 64K-row batches, 2 threads), at 1M and at 10K keys.
- Ctrl-C during one long fold (issue 12): how soon the KeyboardInterrupt lands, at 1M and
  10M keys, against the time of the whole call.

``--one-column`` prints only the one-column fold + publish + results time (64K-row
batches, 2 threads, 10M rows / 1M keys), with ``--repeats`` runs each: run it alternately
against two builds (``PYTHONPATH=<tree>/python``) to compare them, medians of the runs.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import interleaved_medians, median_seconds, row, timed

try:
    import streamstate as ss
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import streamstate as ss


def _run_threads(targets: list[Callable[[], object]]) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def streamstate_fold(
    parts: list[tuple[np.ndarray, np.ndarray]], batch: int | None = None
) -> tuple[ss.NumericAggregateStore, dict[str, Any]]:
    """Fold each (keys, values) part in its own partition on its own thread, in calls of
    ``batch`` rows (default: the whole part in one call), publish, and read the merged
    columns (the store is returned so it is freed after timing)."""
    store = ss.NumericAggregateStore(len(parts))

    def work(pid: int) -> None:
        part = store.partition(pid)
        keys, values = parts[pid]
        step = batch or len(keys) or 1
        for start in range(0, len(keys), step):
            part.fold(keys[start : start + step], values[start : start + step])
        part.publish()

    if len(parts) == 1:
        work(0)
    else:
        _run_threads([lambda pid=pid: work(pid) for pid in range(len(parts))])
    return store, store.results()


def columns_fold(
    parts: list[tuple[np.ndarray, np.ndarray]], batch: int, one_store: bool
) -> tuple[list[ss.NumericAggregateStore], list[dict[str, Any]]]:
    """Fold each (keys, (n, M) block) part in its own partition on its own thread, in calls
    of ``batch`` rows, publish, and read every column's results: into one store of M value
    columns (``one_store``), or into M one-column stores, one column each."""
    width = parts[0][1].shape[1]
    names = [f"v{c}" for c in range(width)]
    if one_store:
        stores = [ss.NumericAggregateStore(len(parts), values=names)]
    else:
        stores = [ss.NumericAggregateStore(len(parts)) for _ in names]
        # One contiguous column each, as a caller holding separate columns has them.
        parts = [(k, np.ascontiguousarray(block.T)) for k, block in parts]

    def work(pid: int) -> None:
        keys, block = parts[pid]
        aggregators = [store.partition(pid) for store in stores]
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            if one_store:
                aggregators[0].fold(chunk, block[start : start + batch])
            else:
                for c, aggregator in enumerate(aggregators):
                    aggregator.fold(chunk, block[c, start : start + batch])
        for aggregator in aggregators:
            aggregator.publish()

    _run_threads([lambda pid=pid: work(pid) for pid in range(len(parts))])
    if one_store:
        return stores, [stores[0].results(name) for name in names]
    return stores, [store.results() for store in stores]


def bench_columns(quick: bool) -> list[dict[str, Any]]:
    rows_n = 1_000_000 if quick else 10_000_000
    repeats = 1 if quick else 5
    rng = np.random.default_rng(1)
    values = rng.standard_normal((rows_n, 2))
    out = []
    for keys_n in ((100_000, 1_000) if quick else (1_000_000, 10_000)):
        keys = rng.integers(0, keys_n, rows_n, dtype=np.int64)
        half = rows_n // 2
        parts = [(keys[:half], values[:half]), (keys[half:], values[half:])]
        # Cross-check once: both forms give the same statistics.
        _, wide = columns_fold(parts, 65536, one_store=True)
        _, split = columns_fold(parts, 65536, one_store=False)
        for a, b in zip(wide, split, strict=True):
            assert np.array_equal(np.sort(a["key"]), np.sort(b["key"]))
            assert np.isclose(a["sum"].sum(), b["sum"].sum())
        t_wide, t_split = interleaved_medians(
            [
                lambda parts=parts: columns_fold(parts, 65536, one_store=True),
                lambda parts=parts: columns_fold(parts, 65536, one_store=False),
            ],
            repeats,
            warmup=0,
        )
        out.append(
            row(
                f"2 value columns, {rows_n // 1_000_000 or rows_n / 1e6}M rows/"
                f"{keys_n // 1000}K keys, 64K-row batches, 2 threads: one store vs two",
                f"{t_wide:.3f} s",
                f"{t_split:.3f} s",
                t_split / t_wide,
                "> 1x",
            )
        )
    return out


def one_column_seconds(repeats: int) -> list[float]:
    """The times of ``repeats`` one-column fold + publish + results runs (64K-row batches,
    2 threads, 10M rows / 1M int64 keys): the figure compared across builds."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 1_000_000, 10_000_000, dtype=np.int64)
    values = rng.standard_normal(10_000_000)
    halves = [(keys[:5_000_000], values[:5_000_000]), (keys[5_000_000:], values[5_000_000:])]
    streamstate_fold(halves, 65536)  # warm-up
    return [timed(lambda: streamstate_fold(halves, 65536)) for _ in range(repeats)]


def python_dict_fold(keys: list[int], values: list[float]) -> dict[int, tuple[float, ...]]:
    """The pure-Python baseline: Welford per key in a dict, then the six statistics."""
    acc: dict[int, list[float]] = {}
    for k, v in zip(keys, values, strict=True):
        s = acc.get(k)
        if s is None:
            acc[k] = [1, v, v, v, v, 0.0]
        else:
            n = s[0] + 1
            s[0] = n
            s[1] += v
            if v < s[2]:  # noqa: PLR1730 - a call to min() would slow the baseline
                s[2] = v
            if v > s[3]:  # noqa: PLR1730
                s[3] = v
            delta = v - s[4]
            s[4] += delta / n
            s[5] += delta * (v - s[4])
    return {
        k: (s[0], s[1], s[2], s[3], s[4], s[5] / (s[0] - 1) if s[0] > 1 else float("nan"))
        for k, s in acc.items()
    }


def bench_fold(quick: bool) -> list[dict[str, Any]]:
    import duckdb
    import pandas as pd

    rows_n, keys_n = (1_000_000, 100_000) if quick else (10_000_000, 1_000_000)
    repeats = 1 if quick else 3
    rng = np.random.default_rng(0)
    keys = rng.integers(0, keys_n, rows_n, dtype=np.int64)
    values = rng.standard_normal(rows_n)
    halves = [
        (keys[: rows_n // 2], values[: rows_n // 2]),
        (keys[rows_n // 2 :], values[rows_n // 2 :]),
    ]
    owned = [(keys[keys % 2 == p], values[keys % 2 == p]) for p in range(2)]
    # Cross-check once: streamstate agrees with pandas before anything is timed.
    frame = pd.DataFrame({"k": keys, "v": values})
    _, check = streamstate_fold(halves)
    expected = frame.groupby("k")["v"].agg(["count", "var"])
    order = np.argsort(check["key"])
    assert np.array_equal(check["key"][order], expected.index.to_numpy())
    assert np.allclose(check["var"][order], expected["var"].to_numpy(), equal_nan=True)

    t_two = median_seconds(lambda: streamstate_fold(halves), repeats, warmup=0)
    # Micro-batches, as a stream pipeline calls fold: 64K rows is the target row, 4K and
    # 1M draw the curve around it.
    batch_sizes = (4096, 65536, 1 << 20)
    t_batched = {
        b: median_seconds(lambda b=b: streamstate_fold(halves, b), repeats, warmup=0)
        for b in batch_sizes
    }
    t_one = median_seconds(lambda: streamstate_fold([(keys, values)]), repeats, warmup=0)
    t_owned = median_seconds(lambda: streamstate_fold(owned), repeats, warmup=0)
    owned_one = [(np.concatenate([o[0] for o in owned]), np.concatenate([o[1] for o in owned]))]
    t_owned_one = median_seconds(lambda: streamstate_fold(owned_one), repeats, warmup=0)

    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute("SET enable_progress_bar = false")
    con.register("t", frame)
    query = "SELECT k, count(*), sum(v), min(v), max(v), avg(v), var_samp(v) FROM t GROUP BY k"
    con.execute(query).fetchnumpy()  # warm-up (plans and scans once)
    t_duck = median_seconds(lambda: con.execute(query).fetchnumpy(), repeats, warmup=0)

    t_pandas = median_seconds(
        lambda: frame.groupby("k")["v"].agg(["count", "sum", "min", "max", "mean", "var"]),
        repeats,
        warmup=0,
    )

    # Pure Python is ~1000x slower: time it on a prefix and compare throughput (rows/s).
    prefix = min(rows_n, 1_000_000 if not quick else 200_000)
    k_list, v_list = keys[:prefix].tolist(), values[:prefix].tolist()
    t_py = median_seconds(lambda: python_dict_fold(k_list, v_list), 1, warmup=0)
    py_rate = prefix / t_py
    two_rate = rows_n / t_two

    # Control: how much parallelism the machine gives right now. A cache-resident fold
    # (1K keys) has no shared state and little memory traffic, so on two idle cores it runs
    # ~2x faster on 2 threads; on a busy machine it shows what to expect of the rows above.
    small = [(k % 1000, v) for k, v in halves]
    small_one = [(keys % 1000, values)]
    t_small_two = median_seconds(lambda: streamstate_fold(small), repeats, warmup=0)
    t_small_one = median_seconds(lambda: streamstate_fold(small_one), repeats, warmup=0)

    label = f"fold {rows_n // 1_000_000 or rows_n / 1e6}M rows/{keys_n // 1000}K keys e2e"
    batched_rows = [
        row(
            f"{label}, {b // 1024}K-row batches, 2 threads vs DuckDB (2 threads)",
            f"{t_batched[b]:.3f} s",
            f"{t_duck:.3f} s",
            t_duck / t_batched[b],
            ">= 1.0x" if b == 65536 else "(curve)",
        )
        for b in batch_sizes
    ]
    return [
        *batched_rows,
        row(
            f"{label}, one {rows_n // 2 // 1000}K-row batch per thread vs DuckDB (2 threads)",
            f"{t_two:.3f} s",
            f"{t_duck:.3f} s",
            t_duck / t_two,
            "(extra)",
        ),
        row(
            f"{label}, 2 threads, key-partitioned input vs DuckDB",
            f"{t_owned:.3f} s",
            f"{t_duck:.3f} s",
            t_duck / t_owned,
            "(extra)",
        ),
        row(
            f"{label}, 2 threads vs pandas groupby.agg",
            f"{t_two:.3f} s",
            f"{t_pandas:.3f} s",
            t_pandas / t_two,
            ">= 3x",
        ),
        row(
            f"{label}, 2 threads vs pure-Python dict ({prefix // 1000}K-row prefix)",
            f"{two_rate / 1e6:.1f} M rows/s",
            f"{py_rate / 1e6:.2f} M rows/s",
            two_rate / py_rate,
            ">= 100x",
        ),
        row(
            f"{label}, 2 threads vs 1 thread",
            f"{t_two:.3f} s",
            f"{t_one:.3f} s",
            t_one / t_two,
            ">= 1.7x",
        ),
        row(
            f"{label}, 2 threads vs 1 thread, key-partitioned input",
            f"{t_owned:.3f} s",
            f"{t_owned_one:.3f} s",
            t_owned_one / t_owned,
            ">= 1.7x",
        ),
        row(
            "control: same rows, 1K keys (cache-resident), 2 threads vs 1 thread",
            f"{t_small_two:.3f} s",
            f"{t_small_one:.3f} s",
            t_small_one / t_small_two,
            "(machine)",
        ),
    ]


def bench_publish_many(quick: bool) -> list[dict[str, Any]]:
    per_thread, batch = (200_000, 10_000) if quick else (1_000_000, 10_000)
    repeats = 1 if quick else 3
    threads = 2
    work = []
    for pid in range(threads):
        keys = [f"group-{pid}-{i}".encode() for i in range(per_thread)]
        partials = [i.to_bytes(8, "little") * 2 for i in range(per_thread)]
        work.append(
            [(keys[s : s + batch], partials[s : s + batch]) for s in range(0, per_thread, batch)]
        )

    def ours() -> ss.AggregateStore:
        store = ss.AggregateStore(threads)
        _run_threads(
            [
                lambda pid=pid: [store.publish_many(pid, k, p) for k, p in work[pid]]
                for pid in range(threads)
            ]
        )
        return store

    def baseline() -> dict[tuple[bytes, int], bytes]:
        table: dict[tuple[bytes, int], bytes] = {}
        lock = threading.Lock()

        def publish(pid: int) -> None:
            for k, p in work[pid]:
                with lock:
                    for key, partial in zip(k, p, strict=True):
                        table[(key, pid)] = partial

        _run_threads([lambda pid=pid: publish(pid) for pid in range(threads)])
        return table

    t_ours = median_seconds(ours, repeats, warmup=0)
    t_base = median_seconds(baseline, repeats, warmup=0)
    total = threads * per_thread
    return [
        row(
            f"publish_many, 2 threads x {per_thread // 1000}K entries (batches of {batch})",
            f"{total / t_ours / 1e6:.2f} M/s",
            f"{total / t_base / 1e6:.2f} M/s (dict+Lock)",
            t_base / t_ours,
            ">= 5x",
        ),
    ]


def _memory_probe(groups: int) -> tuple[float, float]:
    """(accounted, RSS-measured) bytes per group for a 2-partition store of `groups` keys.
    Runs in a fresh interpreter (see bench_memory) so earlier allocations do not blur RSS."""
    import psutil

    proc = psutil.Process()
    rng = np.random.default_rng(1)
    keys = rng.permutation(groups).astype(np.int64)
    values = rng.standard_normal(groups)
    gc.collect()
    rss_before = proc.memory_info().rss
    store = ss.NumericAggregateStore(2)
    for pid in range(2):
        with store.partition(pid) as part:
            part.fold(keys, values)
    rss_after = proc.memory_info().rss
    return store.memory_bytes() / groups, (rss_after - rss_before) / groups


def bench_memory(quick: bool) -> list[dict[str, Any]]:
    import subprocess

    groups = 100_000 if quick else 1_000_000
    code = (
        "import sys; sys.path[:0] = sys.argv[1:3]; import bench_aggregate as b; "
        f"print(*b._memory_probe({groups}))"
    )
    here = str(Path(__file__).resolve().parent)
    src = str(Path(__file__).resolve().parents[1] / "python")
    out = subprocess.run(
        [sys.executable, "-c", code, here, src], check=True, capture_output=True, text=True
    ).stdout.split()
    accounted, measured = float(out[0]), float(out[1])
    return [
        row(
            f"memory per group at {groups // 1000}K groups, 2 partitions (accounted / RSS)",
            f"{accounted:.0f} B",
            f"{measured:.0f} B RSS",
            accounted / measured if measured else 0.0,
            "reported",
        ),
    ]


def _interrupt(sent: list[float]) -> None:
    """Sends this process SIGINT, noting when (a timer thread runs it)."""
    import os
    import signal

    sent.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)


def interrupt_latencies(keys: np.ndarray, values: np.ndarray, delays: list[float]) -> list[float]:
    """Seconds from a SIGINT to the KeyboardInterrupt out of one long ``fold`` of ``keys``
    into a fresh store, the signal sent ``delay`` seconds into the call, once per delay."""
    latencies = []
    for delay in delays:
        part = ss.NumericAggregateStore(1).partition(0)
        sent: list[float] = []
        timer = threading.Timer(delay, _interrupt, args=(sent,))
        timer.start()
        try:
            part.fold(keys, values)
        except KeyboardInterrupt:
            latencies.append(time.perf_counter() - sent[0])
        else:  # the fold ended before the signal: let it land outside the fold
            try:
                timer.join()
                time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        timer.join()
    return latencies


def bench_interrupt(quick: bool) -> list[dict[str, Any]]:
    """Ctrl-C during one long fold (issue 12: it lands within ~0.1 s, not after the whole
    batch): the latency, median and worst over signals sent at several points of the call,
    against the time the whole call takes. At 10M keys the call crosses the points where
    every shard of the table grows at once."""
    rows_n = 6_000_000 if quick else 48_000_000
    values = np.ones(rows_n)
    out = []
    for keys_n in (1_000_000, 10_000_000) if not quick else (1_000_000,):
        keys = np.random.default_rng(2).integers(0, keys_n, rows_n, dtype=np.int64)
        whole = timed(lambda keys=keys: ss.NumericAggregateStore(1).partition(0).fold(keys, values))
        delays = [whole * f for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)]
        latencies = interrupt_latencies(keys, values, delays)
        if not latencies:
            continue
        median = statistics.median(latencies)
        out.append(
            row(
                f"Ctrl-C in one {rows_n // 1_000_000}M-row fold into {keys_n // 1_000_000}M keys: "
                f"latency (median, worst of {len(latencies)}) vs the whole call",
                f"{median:.3f} s, {max(latencies):.3f} s",
                f"{whole:.3f} s",
                whole / median,
                "~0.1 s",
            )
        )
    return out


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All figures as rows: operation, streamstate, baseline, ratio, target."""
    return (
        bench_fold(quick)
        + bench_publish_many(quick)
        + bench_memory(quick)
        + bench_columns(quick)
        + bench_interrupt(quick)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument(
        "--one-column", action="store_true", help="only the one-column time, to compare builds"
    )
    parser.add_argument("--columns", action="store_true", help="only the value-column rows")
    parser.add_argument("--interrupt", action="store_true", help="only the Ctrl-C latency rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs for --one-column")
    args = parser.parse_args()
    if args.one_column:
        print(" ".join(f"{t:.4f}" for t in one_column_seconds(args.repeats)))
        return
    if args.columns:
        rows = bench_columns(args.quick)
    elif args.interrupt:
        rows = bench_interrupt(args.quick)
    else:
        rows = run(args.quick)
    widths = [max(len(str(r[c])) for r in rows) for c in ("operation", "streamstate", "baseline")]
    print(
        f"{'operation':<{widths[0]}}  {'streamstate':>{widths[1]}}  {'baseline':>{widths[2]}}  ratio  target"
    )
    for r in rows:
        print(
            f"{r['operation']:<{widths[0]}}  {r['streamstate']:>{widths[1]}}  "
            f"{r['baseline']:>{widths[2]}}  {r['ratio']:5.2f}  {r['target']}"
        )


if __name__ == "__main__":
    main()
