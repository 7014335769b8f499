"""Benchmark of the windowed aggregate store against pandas doing the same per micro-batch.

Run as a script (``python benchmarks/bench_window_store.py [--quick]``) to print one row:
1-minute tumbling windows over one hour of event time, 100K int64 keys, events arriving in
micro-batches of 65536 with some disorder; after each batch every window the watermark
(max time seen - 2 minutes) passed is emitted. streamstate: one partition's fold plus
emit. Baseline: pandas per micro-batch: groupby (key, window) into count / sum / sum of
squares / min / max partials, merged into the running partials with another groupby,
closed windows split off and finished into mean / var / std. Medians of interleaved runs;
``run(quick)`` returns the row for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import interleaved_medians, print_table, row, rows_per_s

try:
    import streamstate as ss
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import streamstate as ss

MINUTE = 60_000
HOUR = 60 * MINUTE
KEYS = 100_000
BATCH = 65536
LATENESS = 2 * MINUTE


def events(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n events over one hour, roughly in time order (each up to a minute out of place)."""
    rng = np.random.default_rng(12)
    keys = rng.integers(0, KEYS, n, dtype=np.int64)
    times = np.linspace(0, HOUR, n, dtype=np.int64) + rng.integers(-MINUTE, MINUTE, n)
    values = rng.normal(10.0, 3.0, n)
    return keys, times, values


def with_store(
    keys: np.ndarray, times: np.ndarray, values: np.ndarray, by_partition: bool = False
) -> int:
    """The job on the store; ``by_partition`` emits as a pipeline does (per partition,
    unsorted) instead of sorted by (window_end, window_start, key)."""
    store = ss.WindowedAggregateStore(1, kind="tumbling", size=MINUTE, key_type="int64")
    part = store.partition(0)
    rows = 0
    seen = np.iinfo(np.int64).min
    for start in range(0, len(keys), BATCH):
        stop = start + BATCH
        seen = max(seen, int(times[start:stop].max()))
        watermark = seen - LATENESS
        part.fold(keys[start:stop], times[start:stop], values[start:stop], watermark=watermark)
        rows += emitted(store, watermark, by_partition)
    return rows + emitted(store, None, by_partition)


def emitted(store: ss.WindowedAggregateStore, watermark: int | None, by_partition: bool) -> int:
    """Rows emitted under ``watermark`` (every open window when None)."""
    if by_partition:
        parts = store.emit_all_partitions() if watermark is None else store.emit_partitions(watermark)
        return sum(len(p["key"]) for p in parts)
    return len((store.emit_all() if watermark is None else store.emit(watermark))["key"])


def with_pandas(keys: np.ndarray, times: np.ndarray, values: np.ndarray) -> int:
    import pandas as pd

    def finish(partials: pd.DataFrame) -> pd.DataFrame:
        out = partials.copy()
        out["mean"] = out["sum"] / out["count"]
        out["var"] = (out["sq"] - out["sum"] ** 2 / out["count"]) / (out["count"] - 1)
        out["std"] = np.sqrt(out["var"])
        return out

    state: pd.DataFrame | None = None
    rows = 0
    seen = np.iinfo(np.int64).min
    for start in range(0, len(keys), BATCH):
        stop = start + BATCH
        seen = max(seen, int(times[start:stop].max()))
        watermark = seen - LATENESS
        batch = pd.DataFrame({"key": keys[start:stop], "window": times[start:stop] // MINUTE * MINUTE,
                              "x": values[start:stop]})  # fmt: skip
        batch = batch[batch["window"] + MINUTE > watermark]  # late events dropped
        batch["sq"] = batch["x"] ** 2
        partial = batch.groupby(["key", "window"]).agg(
            count=("x", "count"), sum=("x", "sum"), sq=("sq", "sum"), min=("x", "min"), max=("x", "max")
        )
        if state is not None:
            partial = pd.concat([state, partial]).groupby(level=[0, 1]).agg(
                {"count": "sum", "sum": "sum", "sq": "sum", "min": "min", "max": "max"}
            )
        closed = partial.index.get_level_values("window") + MINUTE <= watermark
        rows += len(finish(partial[closed]))
        state = partial[~closed]
    return rows + (0 if state is None else len(finish(state)))


def run(quick: bool) -> list[dict[str, Any]]:
    n = 1_000_000 if quick else 10_000_000
    keys, times, values = events(n)
    ours_rows = with_store(keys, times, values)
    theirs_rows = with_pandas(keys, times, values)
    # The peer drops late events by its own rule; the window counts must still agree.
    if ours_rows != theirs_rows:
        raise AssertionError(f"emitted {ours_rows} windows, pandas {theirs_rows}")
    if with_store(keys, times, values, by_partition=True) != ours_rows:
        raise AssertionError("emitting per partition gave another number of windows")
    ours, theirs, by_partition = interleaved_medians(
        [
            lambda: with_store(keys, times, values),
            lambda: with_pandas(keys, times, values),
            lambda: with_store(keys, times, values, by_partition=True),
        ],
        repeats=3 if quick else 5,
    )
    return [
        row(
            f"1-min tumbling windows, {n // 1_000_000}M events, 100K keys, fold + emit",
            rows_per_s(n, ours),
            f"pandas per micro-batch: {rows_per_s(n, theirs)}",
            theirs / ours,
            ">= 5x",
        ),
        row(
            "  the same, emitted per partition unsorted (as the pipeline emits)",
            rows_per_s(n, by_partition),
            f"pandas per micro-batch: {rows_per_s(n, theirs)}",
            theirs / by_partition,
            "(report)",
        ),
        row(
            "  emit per partition vs sorted emit (fold included)",
            rows_per_s(n, by_partition),
            f"sorted: {rows_per_s(n, ours)}",
            ours / by_partition,
            "(report)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M events instead of 10M")
    print_table(run(parser.parse_args().quick), title="window store")


if __name__ == "__main__":
    main()
