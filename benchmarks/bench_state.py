"""Keyed state backend against the Python baselines named in issue 4, side by side.

    PYTHONPATH=python python benchmarks/bench_state.py            # 1M entries
    PYTHONPATH=python python benchmarks/bench_state.py --quick    # 100k entries, smoke run

Entries have 16-byte keys (the first byte is one of 100 buckets, so a one-byte prefix
selects 1% of them) and 8-byte values. Every figure is the median of several repeats, each
repeat timing streamstate and then its baseline, so machine noise hits both alike. Rows with
target "-" are context: they show the work the timed operations defer (the hash index a
restore builds on the first point lookup; the sort a bulk put_many leaves for the first
ordered read). The last two rows compare an incremental checkpoint (checkpoint_delta after
1% of the keys were rewritten) with a full one, in time and in bytes.
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import timed

from streamstate import InMemoryStateBackend

Row = dict[str, Any]


def _pair(
    ours: Callable[[], Callable[[], Any]],
    theirs: Callable[[], Callable[[], Any]],
    repeats: int,
) -> tuple[float, float]:
    """Median seconds of ours() and theirs(); each factory returns a fresh zero-argument
    callable, so per-repeat setup (an empty backend, a fresh dict) stays untimed."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        a.append(timed(ours()))
        b.append(timed(theirs()))
    return statistics.median(a), statistics.median(b)


def _updater(d: dict[bytes, bytes], keys: list[bytes], values: list[bytes]) -> Callable[[], None]:
    return lambda: d.update(zip(keys, values, strict=True))


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


def _row(operation: str, ours: float, theirs: float, target: str) -> Row:
    return {
        "operation": operation,
        "streamstate": _fmt(ours),
        "baseline": _fmt(theirs),
        "ratio": theirs / ours,
        "target": target,
    }


def _size_row(operation: str, ours: int, theirs: int) -> Row:
    return {
        "operation": operation,
        "streamstate": f"{ours / 1e3:.1f} kB",
        "baseline": f"{theirs / 1e6:.1f} MB",
        "ratio": theirs / ours,
        "target": "-",
    }


def run(quick: bool = False) -> list[Row]:
    """Measure every figure of issue 4; returns one row per figure."""
    n = 100_000 if quick else 1_000_000
    repeats = 3 if quick else 5
    rng = random.Random(4)
    keys = [bytes([i % 100]) + rng.randbytes(15) for i in range(n)]
    values = [rng.randbytes(8) for _ in range(n)]
    prefix = bytes([42])
    label = f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"

    backend = InMemoryStateBackend()
    backend.put_many(keys, values)
    backend.range_scan(b"\xff")  # settle the deferred ordering before steady-state figures
    reference = dict(zip(keys, values, strict=True))
    snapshot = backend.checkpoint(1)
    pickled = pickle.dumps(reference, protocol=pickle.HIGHEST_PROTOCOL)
    rows: list[Row] = []

    def fresh_backend_then(op: Callable[[InMemoryStateBackend], Any]) -> Callable[[], Any]:
        target = InMemoryStateBackend()
        return lambda: op(target)

    ours, theirs = _pair(
        lambda: lambda: backend.checkpoint(2),
        lambda: lambda: pickle.dumps(reference, protocol=pickle.HIGHEST_PROTOCOL),
        repeats,
    )
    rows.append(_row(f"checkpoint {label} vs pickle.dumps", ours, theirs, ">= 10x"))

    ours, theirs = _pair(
        lambda: fresh_backend_then(lambda b: b.restore(snapshot)),
        lambda: lambda: pickle.loads(pickled),
        repeats,
    )
    rows.append(_row(f"restore {label} vs pickle.loads", ours, theirs, ">= 10x"))

    ours, theirs = _pair(
        lambda: lambda: backend.range_scan(prefix),
        lambda: lambda: {k: v for k, v in reference.items() if k.startswith(prefix)},
        max(repeats, 9),
    )
    rows.append(_row(f"range_scan 1% of {label} vs dict comprehension", ours, theirs, ">= 100x"))

    ours, theirs = _pair(
        lambda: fresh_backend_then(lambda b: b.put_many(keys, values)),
        lambda: _updater({}, keys, values),
        repeats,
    )
    rows.append(_row(f"put_many {label} new keys vs dict.update", ours, theirs, ">= 1x"))

    ours, theirs = _pair(
        lambda: lambda: backend.get_many(keys),
        lambda: lambda: [reference.get(k) for k in keys],
        repeats,
    )
    rows.append(_row(f"get_many {label} vs [d.get(k) for k in keys]", ours, theirs, ">= 1x"))

    # Context: the same work end to end, including what the timed operations defer.
    def restore_then_get(b: InMemoryStateBackend) -> Any:
        b.restore(snapshot)
        return b.get(keys[0])

    ours, theirs = _pair(
        lambda: fresh_backend_then(restore_then_get),
        lambda: lambda: pickle.loads(pickled).get(keys[0]),
        repeats,
    )
    rows.append(_row("restore + first get (index build) vs loads + get", ours, theirs, "-"))

    def load_then_scan(b: InMemoryStateBackend) -> Any:
        b.put_many(keys, values)
        return b.range_scan(prefix)

    def update_then_filter(d: dict[bytes, bytes]) -> Callable[[], Any]:
        def work() -> Any:
            d.update(zip(keys, values, strict=True))
            return {k: v for k, v in d.items() if k.startswith(prefix)}

        return work

    ours, theirs = _pair(
        lambda: fresh_backend_then(load_then_scan),
        lambda: update_then_filter({}),
        repeats,
    )
    rows.append(_row("put_many + first range_scan (sort) vs update + filter", ours, theirs, "-"))

    ours, theirs = _pair(
        lambda: lambda: backend.put_many(keys, values),
        lambda: lambda: reference.update(zip(keys, values, strict=True)),
        repeats,
    )
    rows.append(_row(f"put_many {label} existing keys vs dict.update", ours, theirs, "-"))

    # Incremental checkpoints (issue 13): 1% of the keys rewritten since the last capture,
    # then a delta against a full checkpoint of the same state. Each factory rewrites the
    # keys untimed; both captures reset the change tracking, so every repeat starts alike.
    touched = keys[::100]
    rewritten = [rng.randbytes(8) for _ in touched]

    def touch_then(capture: Callable[[], bytes]) -> Callable[[], bytes]:
        backend.checkpoint_delta(3)
        backend.put_many(touched, rewritten)
        return capture

    ours, theirs = _pair(
        lambda: touch_then(lambda: backend.checkpoint_delta(4)),
        lambda: touch_then(lambda: backend.checkpoint(4)),
        repeats,
    )
    rows.append(_row(f"checkpoint_delta, 1% of {label} touched, vs checkpoint", ours, theirs, "-"))
    delta = touch_then(lambda: backend.checkpoint_delta(4))()
    rows.append(
        _size_row(
            f"delta bytes, 1% of {label} touched, vs checkpoint",
            len(delta),
            len(touch_then(lambda: backend.checkpoint(4))()),
        )
    )
    return rows


def _met(row: Row) -> str:
    target = str(row["target"])
    if not target.startswith(">="):
        return ""
    return "yes" if row["ratio"] >= float(target[2:].strip().rstrip("x")) else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k entries, fewer repeats")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    header = ("operation", "streamstate", "baseline", "ratio", "target", "met")
    table = [
        (
            r["operation"],
            r["streamstate"],
            r["baseline"],
            f"{r['ratio']:.1f}x",
            r["target"],
            _met(r),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *table, strict=True)]
    for line in (header, *table):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
