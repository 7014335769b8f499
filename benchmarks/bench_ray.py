"""RayPipeline (2 workers on a local Ray) against the in-process Pipeline (issue 16).

    python benchmarks/bench_ray.py [--quick]

The same job, 10M events over 1M int64 keys (``--quick``: 1M events over 100K keys) in
64K-row batches, two value columns, 2 partitions, a checkpoint every 10 batches to a
LocalStore: by a :class:`~streamstate.pipeline.Pipeline` (2 partition threads in this
process), by a :class:`~streamstate.ray.RayPipeline` (2 worker actors) with the driver
routing every batch and shipping each worker its slice through Ray's object store
(``read_on_workers=False``), and by one with the workers reading a shard each and sending
each other their slices (``read_on_workers=True``; the shards are put in the object store
inside the clock; a step reads a batch of each shard, so a checkpoint every 5 steps),
in turn, medians of the runs. Each run starts on an empty store; the Ray workers are
started (and the cluster up) before the clock starts, as a long-running job would have
them. Target: >= 0.7x the in-process speed on 2 cores (what Ray adds is more machines, not
these two cores).

The per-batch actor overhead is measured on its own: a worker's ``fold`` call with an empty
slice list, many in flight as the pipeline keeps them, so it is the round trip and
(de)serialisation Ray adds per batch and worker, without folding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, print_table, row

try:
    import streamstate as ss
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import streamstate as ss

from streamstate.pipeline import ArraySource, Pipeline
from streamstate.ray import MAX_BATCHES_IN_FLIGHT, RayPipeline

BATCH = 65_536


def _columns(events: int, keys: int) -> dict[str, Any]:
    rng = np.random.default_rng(16)
    return {
        "user": rng.integers(0, keys, events, dtype=np.int64),
        "amount": rng.normal(100.0, 25.0, events),
        "fee": rng.exponential(2.0, events),
    }


def _options(store: Path) -> dict[str, Any]:
    return {
        "key": "user",
        "values": ["amount", "fee"],
        "partitions": 2,
        "store": store,
        "batch_size": BATCH,
        "checkpoint_every": 10,
    }


def _in_process(source: ArraySource, work: Path) -> float:
    with tempfile.TemporaryDirectory(dir=work) as store, Pipeline(source, **_options(Path(store))) as pipe:
        started = time.perf_counter()
        report = pipe.run()
        seconds = time.perf_counter() - started
        assert report.finished and report.events == len(source)
        return seconds


def _on_ray(source: ArraySource, work: Path, read_on_workers: bool) -> float:
    with tempfile.TemporaryDirectory(dir=work) as store:
        options = _options(Path(store))
        if read_on_workers:  # a step reads a batch of each shard: checkpoint as often in rows
            options["checkpoint_every"] //= 2
        pipe = RayPipeline(source, num_workers=2, key_type="int64",
                           read_on_workers=read_on_workers, **options)
        with pipe:
            pipe.recover()  # an empty store: starts nothing
            pipe._start_workers("int64")  # the actors up before the clock, as in a long job
            started = time.perf_counter()
            report = pipe.run()
            seconds = time.perf_counter() - started
            assert report.finished and report.events == len(source) and report.restarts == 0
            return seconds


def _actor_overhead(batches: int) -> float:
    """Seconds per empty ``fold`` call, ``MAX_BATCHES_IN_FLIGHT`` in flight."""
    import ray

    from streamstate.ray import PartitionsWorker

    with tempfile.TemporaryDirectory() as store:
        checkpointer = ss.ObjectStoreCheckpointer(store)
        worker = ray.remote(PartitionsWorker).remote(
            0, 1, 1, "int64", "skip", ["amount"], checkpointer
        )
        ray.get(worker.ready.remote())
        started = time.perf_counter()
        in_flight: list[Any] = []
        for _ in range(batches):
            in_flight.append(worker.fold.remote([]))
            if len(in_flight) > MAX_BATCHES_IN_FLIGHT:
                ray.get(in_flight.pop(0))
        ray.get(in_flight)
        seconds = (time.perf_counter() - started) / batches
        ray.kill(worker)
        return seconds


def run(quick: bool = False) -> list[Row]:
    """Rows for the pipeline comparisons (driver routing, sharded reads, in-process), one
    for the actor overhead per batch."""
    import ray

    events, keys = (1_000_000, 100_000) if quick else (10_000_000, 1_000_000)
    repeats = 3
    source = ArraySource("events", _columns(events, keys))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        warm = ArraySource("events", _columns(BATCH * 2, 1000))
        _on_ray(warm, work, False)  # warm the workers' imports
        _on_ray(warm, work, True)
        local, remote, sharded = [], [], []
        for _ in range(repeats):
            local.append(_in_process(source, work))
            remote.append(_on_ray(source, work, False))
            sharded.append(_on_ray(source, work, True))
    t_local, t_ray = statistics.median(local), statistics.median(remote)
    t_sharded = statistics.median(sharded)
    batches = -(-events // BATCH)
    overhead = _actor_overhead(200 if quick else 1000)
    return [
        row(
            f"{events:,} events / {keys:,} keys, 64K batches, checkpoint every 10: RayPipeline "
            "(2 workers) vs in-process Pipeline (2 partitions)",
            f"{events / t_ray / 1e6:.2f} M ev/s",
            f"{events / t_local / 1e6:.2f} M ev/s",
            t_local / t_ray,
            ">= 0.7x",
        ),
        row(
            f"{events:,} events / {keys:,} keys: RayPipeline, workers reading their shards, "
            "vs in-process Pipeline",
            f"{events / t_sharded / 1e6:.2f} M ev/s",
            f"{events / t_local / 1e6:.2f} M ev/s",
            t_local / t_sharded,
            ">= 0.7x",
        ),
        row(
            f"{events:,} events / {keys:,} keys: RayPipeline, workers reading their shards, "
            "vs the driver reading and routing",
            f"{events / t_sharded / 1e6:.2f} M ev/s",
            f"{events / t_ray / 1e6:.2f} M ev/s",
            t_ray / t_sharded,
            "reported",
        ),
        row(
            f"actor overhead per batch and worker (empty fold call, {MAX_BATCHES_IN_FLIGHT} in "
            f"flight) vs the Ray run's time per batch ({batches} batches)",
            f"{overhead * 1e3:.2f} ms",
            f"{t_ray / batches * 1e3:.2f} ms",
            overhead / (t_ray / batches),
            "reported (share of a batch)",
        ),
    ]


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M events over 100K keys")
    print_table(run(parser.parse_args().quick), "ray")


if __name__ == "__main__":
    main()
