"""Timing and reporting shared by every benchmark script.

Every figure is the median of several repeats, measured side by side with its baseline in
the same process and run, because this machine is shared and absolute times drift.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one ``fn()`` call. A collection runs first and whatever ``fn`` returns
    is freed after the clock stops, so neither side of a comparison pays for garbage."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median of :func:`timed` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def interleaved_medians(
    fns: Sequence[Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> list[float]:
    """Median times of several functions, run in alternation so drift hits them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def gb_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def mb_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.0f} MB/s"


def rows_per_s(rows: int, seconds: float) -> str:
    return f"{rows / seconds / 1e6:.1f} M rows/s"


def row(operation: str, ours: str, baseline: str, ratio: float, target: str) -> Row:
    """One table row: the ratio is streamstate's speed over the baseline's (higher is better)."""
    return {
        "operation": operation,
        "streamstate": ours,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
    }


def print_table(rows: Sequence[Row], title: str | None = None) -> None:
    headers = ["operation", "streamstate", "baseline", "ratio", "target"]
    cells = [
        [
            str(r["operation"]),
            str(r["streamstate"]),
            str(r["baseline"]),
            f"{r['ratio']:.2f}x" if isinstance(r["ratio"], float) else str(r["ratio"]),
            str(r["target"]),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n## {title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
