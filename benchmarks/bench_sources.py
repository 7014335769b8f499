"""Benchmarks for the pipeline's sources (issue 15): what reading Arrow and Parquet costs.

Run as a script (``python benchmarks/bench_sources.py [--quick]``) to print one row per
figure, medians of interleaved runs, against the same job over an ``ArraySource`` of numpy
columns already in memory (string keys as numpy ``S``, the fastest the pipeline reads):

- ``ArrowSource`` over a ``pyarrow.Table`` (string keys as Arrow arrays, values as numpy
  views of the Arrow buffers): the target is parity (>= 0.9x);
- ``ParquetSource`` over a local directory of Parquet files (8 files, row groups of 64K
  rows, snappy), which decodes every row group as it goes: reported, no target.

The job: 2M events (``--quick``: 400K), 10K string keys, one float value, 2 partitions,
batches of 16K rows, a checkpoint every 10 batches to a MemoryStore.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import interleaved_medians, print_table, row, rows_per_s

try:
    import streamstate  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import pyarrow as pa
import pyarrow.parquet as pq
from obstore.store import MemoryStore

from streamstate.pipeline import ArraySource, ArrowSource, ParquetSource, Pipeline, Source

FILES = 8


def _job(source: Source) -> int:
    with Pipeline(source, key="user", values=["amount"], partitions=2, store=MemoryStore(),
                  batch_size=16_384, checkpoint_every=10) as pipe:
        return pipe.run().events


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The table rows (see the module docstring)."""
    events = 400_000 if quick else 2_000_000
    rng = np.random.default_rng(0)
    users = np.char.encode(np.char.add("user-", rng.integers(0, 10_000, events).astype(str)))
    amounts = rng.gamma(2.0, 30.0, events)
    table = pa.table({"user": pa.array(users.astype(object), pa.string()), "amount": amounts})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        per_file = -(-events // FILES)
        for number in range(FILES):
            part = table.slice(number * per_file, per_file)
            pq.write_table(part, Path(tmp) / f"part-{number:03d}.parquet", row_group_size=65_536)
        arrays = ArraySource("events", {"user": users, "amount": amounts})
        arrow = ArrowSource(table, name="events")
        parquet = ParquetSource(tmp, name="events")
        assert _job(arrays) == _job(arrow) == _job(parquet) == events
        base, arrow_s, parquet_s = interleaved_medians(
            [lambda: _job(arrays), lambda: _job(arrow), lambda: _job(parquet)],
            repeats=3 if quick else 5,
        )
    baseline = f"{rows_per_s(events, base)} (ArraySource)"
    rows.append(row("ArrowSource(Table), str keys", rows_per_s(events, arrow_s), baseline,
                    base / arrow_s, ">= 0.9x"))
    rows.append(row("ParquetSource(local dir)", rows_per_s(events, parquet_s), baseline,
                    base / parquet_s, "reported"))
    return rows


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer repeats")
    print_table(run(parser.parse_args().quick), "sources")


if __name__ == "__main__":
    main()
