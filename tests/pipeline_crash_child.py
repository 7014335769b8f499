"""Child process for test_checkpoint_crash.py: a pipeline with incremental, asynchronous
checkpoints over a fixed source, run until it finishes or is killed.

Usage: ``python pipeline_crash_child.py RESULT_FILE local DIR`` or
``python pipeline_crash_child.py RESULT_FILE s3 ENDPOINT BUCKET``. It recovers, prints
``ready OFFSET`` (the offset it resumes from), runs to the end of the source and, if it
gets there, writes its final per-key results to ``RESULT_FILE`` (an ``.npz``) and prints
``done``. The source (:func:`crash_source`) is a pure function of nothing, so the parent
can compute the one-shot group-by it must equal.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from streamstate.pipeline import ArraySource, Batch, Pipeline

ROWS = 240_000
KEYS = 3_000
BATCH_SIZE = 2_000
# Small cadences, so that kills land inside captures, uploads, manifests and prunes.
PIPELINE: dict[str, Any] = {
    "key": "k",
    "values": ["v"],
    "partitions": 2,
    "batch_size": BATCH_SIZE,
    "checkpoint_every": 3,
    "full_checkpoint_every": 4,
    "keep_checkpoints": 2,
}
READ_PAUSE = 0.008  # per batch: stretches a whole run to ~1 s plus its checkpoints


def crash_source() -> ArraySource:
    """The events every child replays: integer-valued floats, so sums are exact."""
    rng = np.random.default_rng(20261201)
    keys = rng.integers(0, KEYS, ROWS)
    keys[rng.random(ROWS) < 0.7] %= 50  # a hot set: most deltas are small
    values = rng.integers(-1_000, 1_000, ROWS).astype(np.float64)
    return ArraySource("events", {"k": keys, "v": values})


class SlowSource:
    """The crash source, read a little slower, so a run lasts long enough to be hit."""

    def __init__(self, inner: ArraySource) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    def read(self, offset: int, max_rows: int) -> Batch | None:
        time.sleep(READ_PAUSE)
        return self.inner.read(offset, max_rows)


def open_store(kind: str, where: list[str]) -> Any:
    """The checkpoint store the arguments name (a directory, or an S3 bucket)."""
    if kind == "local":
        return where[0]
    from conftest import S3Server  # the test suite's S3 settings, from this directory

    endpoint, bucket = where
    return S3Server(endpoint).store(bucket)


def main() -> int:
    result_file, kind, *where = sys.argv[1:]
    pipe = Pipeline(SlowSource(crash_source()), store=open_store(kind, where), **PIPELINE)
    print(f"ready {pipe.recover()}", flush=True)
    report = pipe.run()
    assert report.finished
    results = pipe.results("v")
    np.savez(result_file, **{name: results[name] for name in ("key", "count", "sum", "min", "max")})
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
