"""Rescaling a store from N to M partitions (issue 16): ``NumericAggregateStore.repartitioned``.

    python benchmarks/bench_rescale.py [--quick]

A store of 2 partitions, each folded with 1M rows over 1M int64 keys (``--quick``: 100K),
is rescaled to 4 and to 1 partitions, once with one partition published and the other's
partials still local, once with both published. The baseline is what a resume with another
partition count did before: the full snapshot restored into a store of max(old, new)
partitions, which moves no key (each stays in its old partition's slot). A rescale restores
the snapshot into the old count and then ``repartitioned(M)``: the ratio is what exact
ownership adds to a resume. Reported, no target.

Key groups: snapshots are sectioned by key group, and ``restore_from`` decodes only the
sections of the groups its partitions own. Two more rows per state: one new partition of 4
(a worker of a 4-way job) restoring its share of the 2-partition snapshot against all 4
restoring everything (the ratio approaches 4 when decoding dominates; checking the whole
container's checksum is the part that does not shrink), and a resume that reads the full
snapshot straight into 4 partitions (``restore_from``, the pipeline's path for a full
checkpoint) against restore + ``repartitioned(4)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, interleaved_medians, print_table, row

try:
    import streamstate as ss
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import streamstate as ss


def _store(rows: int, publish_both: bool) -> ss.NumericAggregateStore:
    rng = np.random.default_rng(1)
    store = ss.NumericAggregateStore(2)
    for p in range(2):
        store.partition(p).fold(rng.integers(0, rows, rows), rng.normal(0, 1, rows))
    store.partition(0).publish()
    if publish_both:
        store.partition(1).publish()
    return store


def _restored(snapshot: bytes, partitions: int) -> ss.NumericAggregateStore:
    store = ss.NumericAggregateStore(partitions)
    store.restore(snapshot)
    return store


def _restored_from(
    snapshot: bytes, partitions: int, owned: list[int] | None = None
) -> ss.NumericAggregateStore:
    store = ss.NumericAggregateStore(partitions)
    store.restore_from([snapshot], partitions=owned)
    return store


def run(quick: bool = False) -> list[Row]:
    """One row per (state, target partition count): the cost of a resume that rescales."""
    rows_n = 100_000 if quick else 1_000_000
    rows: list[Row] = []
    for publish_both, state in ((False, "half published"), (True, "all published")):
        source = _store(rows_n, publish_both)
        keys, snapshot = len(source), source.snapshot()
        for target in (4, 1):
            # Both start from the checkpoint's bytes, as a resume does.
            t_new, t_old = interleaved_medians(
                [
                    lambda s=snapshot, m=target: _restored(s, 2).repartitioned(m),
                    lambda s=snapshot, m=target: _restored(s, max(m, 2)),
                ],
                repeats=3 if quick else 5,
            )
            rows.append(
                row(
                    f"resume 2 -> {target} partitions, {keys:,} keys, {state}: restore + "
                    "repartitioned vs the old restore into max(old, new) partitions",
                    f"{t_new * 1e3:.0f} ms",
                    f"{t_old * 1e3:.0f} ms",
                    t_old / t_new,
                    "reported",
                )
            )
        repeats = 3 if quick else 5
        t_one, t_all = interleaved_medians(
            [
                lambda s=snapshot: _restored_from(s, 4, [1]),
                lambda s=snapshot: _restored_from(s, 4),
            ],
            repeats=repeats,
        )
        rows.append(
            row(
                f"restore_from 2 -> partition 1 of 4, {keys:,} keys, {state}: its key "
                "groups' sections only vs every section",
                f"{t_one * 1e3:.0f} ms",
                f"{t_all * 1e3:.0f} ms",
                t_all / t_one,
                "reported",
            )
        )
        t_from, t_repart = interleaved_medians(
            [
                lambda s=snapshot: _restored_from(s, 4),
                lambda s=snapshot: _restored(s, 2).repartitioned(4),
            ],
            repeats=repeats,
        )
        rows.append(
            row(
                f"resume 2 -> 4 partitions, {keys:,} keys, {state}: restore_from vs "
                "restore + repartitioned",
                f"{t_from * 1e3:.0f} ms",
                f"{t_repart * 1e3:.0f} ms",
                t_repart / t_from,
                "reported",
            )
        )
    return rows


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100K rows per partition")
    print_table(run(parser.parse_args().quick), "rescale")


if __name__ == "__main__":
    main()
