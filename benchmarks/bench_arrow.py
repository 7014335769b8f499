"""Benchmark of Arrow output (issue 17): ``to_arrow()`` against what a user writes without it.

Rows (ratio = baseline time / streamstate time, higher is better):

* ``NumericAggregateStore.to_arrow()`` vs ``pyarrow.table(store.results())`` for bytes keys
  (the baseline builds a Python bytes object per key, then Arrow copies them back out),
  str keys, and int64 keys (both sides zero-copy there: the ratio shows the fixed cost);
* ``SpillingAggregator.to_arrow()`` vs ``pyarrow.table(agg.drain())`` for bytes keys (the
  drain itself is in both; each repeat drains a freshly filled aggregator).

Figures are medians over the repeats, both sides run in alternation.

Run: ``PYTHONPATH=python python benchmarks/bench_arrow.py [--quick]`` (needs pyarrow).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import interleaved_medians, print_table, row

from streamstate import NumericAggregateStore, SpillingAggregator


def _keys(key_type: str, rows: int, distinct: int) -> Any:
    ids = np.random.default_rng(7).integers(0, distinct, rows)
    if key_type == "int64":
        return ids.astype(np.int64)
    return [f"user-{i:09d}" if key_type == "str" else f"user-{i:09d}".encode() for i in ids]


def _store(key_type: str, rows: int, distinct: int) -> NumericAggregateStore:
    store = NumericAggregateStore(2, key_type=key_type)  # type: ignore[arg-type]
    keys, values = _keys(key_type, rows, distinct), np.ones(rows)
    for pid in range(2):
        with store.partition(pid) as part:
            part.fold(keys[pid::2], values[pid::2])
    return store


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def bench_store(quick: bool) -> list[dict[str, Any]]:
    distinct = 200_000 if quick else 2_000_000
    out = []
    for key_type in ("bytes", "str", "int64"):
        store = _store(key_type, 2 * distinct, distinct)
        ours, base = interleaved_medians(
            [store.to_arrow, lambda s=store: pa.table(dict(s.results()))],
            repeats=3 if quick else 7,
        )
        out.append(
            row(
                f"store.to_arrow(), {len(store) // 1000}K {key_type} keys",
                _ms(ours),
                f"{_ms(base)} pa.table(results())",
                base / ours,
                "~1.0 (both zero-copy)" if key_type == "int64" else "> 1.0",
            )
        )
    return out


def bench_spill(quick: bool) -> list[dict[str, Any]]:
    distinct = 200_000 if quick else 1_000_000
    keys, values = _keys("bytes", 2 * distinct, distinct), np.ones(2 * distinct)
    times: dict[str, list[float]] = {"ours": [], "base": []}
    with tempfile.TemporaryDirectory() as spill_dir:

        def filled() -> SpillingAggregator:
            agg = SpillingAggregator(None, spill_dir=spill_dir, key_type="bytes")
            agg.accumulate_batch(keys, values)
            return agg

        calls: dict[str, Callable[[SpillingAggregator], object]] = {
            "ours": lambda agg: agg.to_arrow(),
            "base": lambda agg: pa.table(dict(agg.drain())),
        }
        for _ in range(3 if quick else 5):
            for name, call in calls.items():
                agg = filled()
                start = time.perf_counter()
                result = call(agg)
                times[name].append(time.perf_counter() - start)
                del result
    ours, base = statistics.median(times["ours"]), statistics.median(times["base"])
    return [
        row(
            f"spilling to_arrow() (drain included), {distinct // 1000}K bytes keys",
            _ms(ours),
            f"{_ms(base)} pa.table(drain())",
            base / ours,
            "> 1.0",
        )
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All figures as rows: operation, streamstate, baseline, ratio, target."""
    return bench_store(quick) + bench_spill(quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    print_table(run(args.quick), "Arrow output")


if __name__ == "__main__":
    main()
