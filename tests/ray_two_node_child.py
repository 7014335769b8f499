"""A RayPipeline on a two-node Ray cluster on this machine, run by test_ray.py in a process
of its own (a process connects to one cluster, and the test module holds a local one).

``ray.cluster_utils.Cluster`` starts a head node and a second node as ``ray start --head``
and ``ray start --address`` would, as processes of its own that its ``shutdown()`` ends
(``ray stop`` would end every Ray process on the machine). Each node has one CPU and each
worker asks for one, so the two workers run on different nodes. One is killed mid-run;
prints one JSON line of what the test checks.
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import pandas as pd
import ray
from ray.cluster_utils import Cluster

from streamstate.pipeline import ArraySource, Batch
from streamstate.ray import RayPipeline


def main() -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},  # on a free port
    )
    cluster.add_node(num_cpus=1)
    try:
        rng = np.random.default_rng(2)
        rows = 24 * 16_384
        columns = {"k": rng.integers(0, 20_000, rows), "v": rng.normal(0, 1, rows)}
        with tempfile.TemporaryDirectory() as store:
            pipe = RayPipeline(ArraySource("two-node", columns), key="k", values="v",
                               partitions=4, num_workers=2, store=store, batch_size=16_384,
                               checkpoint_every=5, ray_address=cluster.address,
                               actor_options={"num_cpus": 1})
            with pipe:
                killed: list[int] = []

                def kill_once(batch: Batch) -> None:
                    # Once a checkpoint has landed (the workers read a shard each, so the
                    # offsets are every shard's): the replacements restore it.
                    if pipe.epoch >= 1 and not killed:
                        killed.append(pipe.epoch)
                        ray.kill(pipe.workers[1])

                report = pipe.run(on_batch=kill_once)
                nodes = {node for node, _ in ray.get([w.ready.remote() for w in pipe.workers])}
                got = pipe.to_pandas("v").sort_index()
                want = pd.DataFrame(columns).groupby("k")["v"].agg(["count", "sum"])
                equal = bool(
                    (got["count"].to_numpy() == want["count"].to_numpy()).all()
                    and np.allclose(got["sum"].to_numpy(), want["sum"].to_numpy(), rtol=1e-9)
                )
        print(json.dumps({"nodes": len(nodes), "restarts": report.restarts,
                          "finished": report.finished, "equal": equal}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
