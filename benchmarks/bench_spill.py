"""Benchmark of the spilling hash aggregator (issue 5).

Workload: 20M rows, 4M distinct int64 keys (uniform), float64 values; every statistic
(count, sum, min, max, mean, var, std) per key, result materialised as numpy columns.

Rows (ratio = baseline time / streamstate time, higher is better):

* in memory (no limit) vs DuckDB ``threads=2`` on the same numpy arrays   (target >= 1.0)
* ``mem_limit_bytes=64 MiB`` vs DuckDB ``SET memory_limit='64MB'``          (target >= 1.0)
* the peak RSS growth of both runs above (reported, ratio = DuckDB / streamstate)
* in memory vs pandas ``groupby().agg``                                      (target >= 3.0)

Every run is its own subprocess (so peak RSS is that run's alone: the kernel's high-water
mark is reset once the input arrays are loaded, and the figure is the growth beyond them,
result included). Rounds run every configuration in turn, so load on a shared machine hits
all of them alike; figures are medians over the rounds.

Run: ``PYTHONPATH=python python benchmarks/bench_spill.py [--rows N] [--repeats R]
[--quick]``. The full 20M-row run takes a few minutes on 2 cores; ``--quick`` uses 2M rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import row

MiB = 1 << 20
FULL_ROWS = 20_000_000
QUICK_ROWS = 2_000_000
KEY_FRACTION = 5  # distinct keys = rows / 5 (4M at 20M rows)
LIMIT_BYTES = 64 * MiB


def make_data(rows: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, rows // KEY_FRACTION, rows, dtype=np.int64)
    values = rng.standard_normal(rows)
    return keys, values


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark; returns the RSS it now counts from."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _run_streamstate(keys: np.ndarray, values: np.ndarray, limit: int | None) -> int:
    from streamstate import SpillingAggregator

    with (
        tempfile.TemporaryDirectory() as spill_dir,
        SpillingAggregator(limit, spill_dir=spill_dir) as agg,
    ):
        step = 1 << 21  # a stream of 2M-row batches
        for i in range(0, len(keys), step):
            agg.accumulate_batch(keys[i : i + step], values[i : i + step])
        cols = agg.drain()
    return len(cols["key"])


DUCK_QUERY = (
    "SELECT k, count(v), sum(v), min(v), max(v), avg(v), var_samp(v), stddev_samp(v) "
    "FROM data GROUP BY k"
)


def _run_duckdb(keys: np.ndarray, values: np.ndarray, limit: int | None) -> int:
    import duckdb

    with tempfile.TemporaryDirectory() as temp_dir:
        con = duckdb.connect()
        con.execute("SET threads=2")
        con.execute(f"SET temp_directory='{temp_dir}'")
        if limit is not None:
            con.execute(f"SET memory_limit='{limit // MiB}MB'")
        con.register("data", {"k": keys, "v": values})
        out = con.execute(DUCK_QUERY).fetchnumpy()
        con.close()
    return len(out["k"])


def _run_pandas(keys: np.ndarray, values: np.ndarray, limit: int | None) -> int:
    import pandas as pd

    frame = pd.DataFrame({"k": keys, "v": values})
    out = frame.groupby("k")["v"].agg(["count", "sum", "min", "max", "mean", "var", "std"])
    return len(out)


ENGINES = {"streamstate": _run_streamstate, "duckdb": _run_duckdb, "pandas": _run_pandas}


def worker(engine: str, data_dir: str, limit: int | None) -> None:
    """Subprocess body: load the input, time one run, print JSON."""
    __import__({"streamstate": "streamstate", "duckdb": "duckdb", "pandas": "pandas"}[engine])
    keys = np.load(os.path.join(data_dir, "keys.npy"))
    values = np.load(os.path.join(data_dir, "values.npy"))
    base = _reset_peak()
    start = time.perf_counter()
    groups = ENGINES[engine](keys, values, limit)
    elapsed = time.perf_counter() - start
    peak = _status("VmHWM") - base
    print(json.dumps({"seconds": elapsed, "peak_growth": peak, "groups": groups}))


def measure_once(engine: str, data_dir: str, limit: int | None) -> dict[str, float]:
    env = {**os.environ}
    here = os.path.dirname(os.path.abspath(__file__))
    python_dir = os.path.join(os.path.dirname(here), "python")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_dir, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            engine,
            "--data",
            data_dir,
            "--limit",
            str(limit or 0),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


CONFIGS = (
    ("streamstate", None),
    ("duckdb", None),
    ("streamstate", LIMIT_BYTES),
    ("duckdb", LIMIT_BYTES),
    ("pandas", None),
)


def measure_all(rows: int, repeats: int) -> dict[tuple[str, int | None], dict[str, float]]:
    """Rounds of every configuration in turn (so load on a shared machine hits all alike);
    medians per configuration."""
    runs: dict[tuple[str, int | None], list[dict[str, float]]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as data_dir:
        keys, values = make_data(rows)
        np.save(os.path.join(data_dir, "keys.npy"), keys)
        np.save(os.path.join(data_dir, "values.npy"), values)
        del keys, values
        for _ in range(repeats):
            for engine, limit in CONFIGS:
                runs[(engine, limit)].append(measure_once(engine, data_dir, limit))
    groups = {r["groups"] for rs in runs.values() for r in rs}
    assert len(groups) == 1, f"engines disagree on the number of groups: {groups}"
    return {
        c: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_growth": statistics.median(r["peak_growth"] for r in rs),
        }
        for c, rs in runs.items()
    }


def run(quick: bool = False, rows: int | None = None, repeats: int | None = None) -> list[dict]:
    """Measure every figure of the issue; returns table rows (see module docstring)."""
    rows = rows or (QUICK_ROWS if quick else FULL_ROWS)
    repeats = repeats or (1 if quick else 3)
    label = f"{rows / 1e6:g}M rows, {rows // KEY_FRACTION / 1e6:g}M keys"
    m = measure_all(rows, repeats)
    ss_mem, duck_mem = m[("streamstate", None)], m[("duckdb", None)]
    ss_lim, duck_lim = m[("streamstate", LIMIT_BYTES)], m[("duckdb", LIMIT_BYTES)]
    pandas = m[("pandas", None)]

    def secs(m: dict[str, float]) -> str:
        return f"{m['seconds']:.2f} s"

    def rss(m: dict[str, float]) -> str:
        return f"{m['peak_growth'] / MiB:.0f} MiB"

    return [
        row(
            f"group-by in memory vs DuckDB threads=2 ({label})",
            secs(ss_mem),
            secs(duck_mem),
            duck_mem["seconds"] / ss_mem["seconds"],
            ">= 1.0x",
        ),
        row(
            "group-by mem_limit 64 MiB vs DuckDB memory_limit=64MB",
            secs(ss_lim),
            secs(duck_lim),
            duck_lim["seconds"] / ss_lim["seconds"],
            ">= 1.0x",
        ),
        row(
            "  peak RSS growth of those runs (incl. result)",
            rss(ss_lim),
            rss(duck_lim),
            duck_lim["peak_growth"] / ss_lim["peak_growth"],
            "report",
        ),
        row(
            "  peak RSS growth, in memory (incl. result)",
            rss(ss_mem),
            rss(duck_mem),
            duck_mem["peak_growth"] / ss_mem["peak_growth"],
            "report",
        ),
        row(
            "group-by in memory vs pandas groupby().agg",
            secs(ss_mem),
            secs(pandas),
            pandas["seconds"] / ss_mem["seconds"],
            ">= 3.0x",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows, 1 repeat")
    parser.add_argument("--rows", type=int, help=f"rows (default {FULL_ROWS:,})")
    parser.add_argument("--repeats", type=int, help="runs per engine (median; default 3)")
    parser.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.limit or None)
        return
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = run(quick=args.quick, rows=args.rows, repeats=args.repeats)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    widths = (54, 12, 12, 7, 8)
    header = ("operation", "streamstate", "baseline", "ratio", "target")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        cells = (r["operation"], r["streamstate"], r["baseline"], f"{r['ratio']:.2f}x", r["target"])
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))


if __name__ == "__main__":
    main()
