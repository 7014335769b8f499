"""Child process for test_pipeline_windows.py: a windowed pipeline publishing to a
ParquetSink in its own checkpoint store, run until it finishes or is killed.

Usage: ``python pipeline_windows_crash_child.py local DIR`` or
``python pipeline_windows_crash_child.py s3 ENDPOINT BUCKET``. It recovers, prints
``ready OFFSET``, runs to the end of the source and prints ``done``. The windows are
published under :data:`OUTPUT_PREFIX` of the same store; the source
(:func:`windowed_source`) is a pure function of nothing, so the parent can compute the
windows it must publish, exactly once.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from pipeline_crash_child import SlowSource  # a run slow enough to be hit (this directory)

from streamstate.pipeline import ArraySource, Pipeline
from streamstate.sinks import ParquetSink
from streamstate.windows import Tumbling

ROWS = 60_000
KEYS = 50
BATCH_SIZE = 1_000
OUTPUT_PREFIX = "out/"
LATE_PREFIX = "late/"
WINDOW = Tumbling("5s")
LATENESS = 2_000  # ms
PIPELINE: dict[str, Any] = {
    "key": "k",
    "values": ["v"],
    "time": "t",
    "window": WINDOW,
    "allowed_lateness": LATENESS,
    "partitions": 2,
    "batch_size": BATCH_SIZE,
    "checkpoint_every": 3,
    "full_checkpoint_every": 3,
    "keep_checkpoints": 2,
}


def windowed_source() -> ArraySource:
    """Times moving forward ~5 ms a row with up to 8 s of disorder (some events late),
    integer-valued floats (exact sums)."""
    rng = np.random.default_rng(20261202)
    times = np.arange(ROWS, dtype=np.int64) * 5 - rng.integers(0, 8_000, ROWS)
    keys = rng.integers(0, KEYS, ROWS)
    values = rng.integers(-1_000, 1_000, ROWS).astype(np.float64)
    return ArraySource("events", {"k": keys, "t": times, "v": values})


def open_store(kind: str, where: list[str]) -> Any:
    """The store the arguments name (a directory, or an S3 bucket)."""
    if kind == "local":
        from obstore.store import LocalStore

        return LocalStore(where[0], mkdir=True)
    from conftest import S3Server  # the test suite's S3 settings, from this directory

    endpoint, bucket = where
    return S3Server(endpoint).store(bucket)


def make_pipeline(source: Any, store: Any) -> Pipeline:
    """The job every child (and the parent's final check) runs."""
    return Pipeline(
        source,
        store=store,
        sink=ParquetSink(store, prefix=OUTPUT_PREFIX),
        late_sink=ParquetSink(store, prefix=LATE_PREFIX),
        **PIPELINE,
    )


def main() -> int:
    kind, *where = sys.argv[1:]
    pipe = make_pipeline(SlowSource(windowed_source()), open_store(kind, where))
    print(f"ready {pipe.recover()}", flush=True)
    report = pipe.run()
    assert report.finished
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
