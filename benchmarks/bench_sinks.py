"""What exactly-once output costs: ``ParquetSink`` stage + publish of one epoch's window rows.

    python benchmarks/bench_sinks.py [--quick]

One epoch of emitted window rows (``key``, ``window_start``, ``window_end`` and the seven
statistics of one value column; 1M rows, ``--quick``: 100K) is staged and published by a
``ParquetSink`` on a local directory: a Parquet file written into a buffer, its SHA-256,
one put under ``_staging/``, then a rename to its final name. The baseline writes the same
table with ``pyarrow.parquet.write_table`` straight to its final path (same codec), with no
staging, digest or crash safety. A second row does the same for ``CallableSink`` (an Arrow
IPC object staged in the store, read back, checked against its digest and handed to a
function that only counts rows, then deleted) against the same stream written to a local
file, memory-mapped back and handed to the function by hand. Reported, no target: the
ratios are the price of output that survives a crash exactly once (or, for a function, at
least once).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, interleaved_medians, print_table, row

try:
    import streamstate as ss
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import streamstate as ss


def _window_rows(n: int) -> pa.Table:
    """``n`` rows shaped like a windowed pipeline's output, in 64K-row batches."""
    rng = np.random.default_rng(7)
    start = np.sort(rng.integers(0, 3_600_000, n)) // 60_000 * 60_000
    columns: dict[str, object] = {
        "key": rng.integers(0, 100_000, n),
        "window_start": start,
        "window_end": start + 60_000,
        "v_count": rng.integers(1, 50, n),
    }
    for stat in ("sum", "min", "max", "mean", "var", "std"):
        columns[f"v_{stat}"] = rng.normal(0, 1, n)
    return pa.table(columns).combine_chunks()


def run(quick: bool = False) -> list[Row]:
    """One row per sink: stage + publish of one epoch against writing it directly."""
    n = 100_000 if quick else 1_000_000
    table = _window_rows(n)
    batches = table.to_batches(max_chunksize=65_536)
    repeats = 3 if quick else 5
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-sinks-") as tmp:
        root = Path(tmp)
        sink = ss.ParquetSink(root / "sink", "out")
        direct = root / "direct"
        direct.mkdir()
        epochs = iter(range(1 << 40))

        def through_sink() -> None:
            epoch = next(epochs)
            sink.publish(epoch, sink.stage(epoch, batches))

        def written_directly() -> None:
            pq.write_table(table, direct / "epoch.parquet", compression=sink.compression)

        t_sink, t_direct = interleaved_medians([through_sink, written_directly], repeats)
        rows.append(
            row(
                f"ParquetSink stage + publish of one epoch ({n:,} window rows) vs "
                "pyarrow.parquet.write_table to the final path",
                f"{t_sink * 1e3:.0f} ms",
                f"{t_direct * 1e3:.0f} ms",
                t_direct / t_sink,
                "reported",
            )
        )

        delivered = [0]

        def fn(batch: pa.RecordBatch) -> None:
            delivered[0] += batch.num_rows

        callable_sink = ss.CallableSink(fn)
        callable_sink.bind(root / "checkpoints", "sinks/fn")

        def through_callable() -> None:
            epoch = next(epochs)
            callable_sink.publish(epoch, callable_sink.stage(epoch, batches))

        by_hand = root / "by-hand.arrows"

        def staged_by_hand() -> None:
            with pa.OSFile(str(by_hand), "wb") as out, pa.ipc.new_stream(out, table.schema) as w:
                w.write_table(pa.Table.from_batches(batches))
            with pa.memory_map(str(by_hand)) as source:
                for batch in pa.ipc.open_stream(source):
                    fn(batch)
            by_hand.unlink()

        t_callable, t_call = interleaved_medians([through_callable, staged_by_hand], repeats)
        rows.append(
            row(
                f"CallableSink stage + publish of one epoch ({n:,} rows, fn counts rows) vs "
                "the IPC stream written to a local file, read back and delivered by hand",
                f"{t_callable * 1e3:.0f} ms",
                f"{t_call * 1e3:.0f} ms",
                t_call / t_callable,
                "reported",
            )
        )
    return rows


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100K rows")
    print_table(run(parser.parse_args().quick), "sinks")


if __name__ == "__main__":
    main()
