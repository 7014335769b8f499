"""SIGKILL a committing process at random moments: recovery never loses a commit.

Two children are attacked. The checkpointer's (below) commits raw checkpoints; the
pipeline's (``pipeline_crash_child.py``, see :func:`test_sigkill_a_pipeline_with_incremental
_async_checkpoints`) folds a source with incremental, asynchronous checkpoints, and after
every kill the recovered state must equal a one-shot pandas group-by of the events before
the recovered offset, and every finished run's results that of all of them.

The child (``ckpt_crash_child.py``) prints ``intent E DIGEST`` before it starts committing
epoch E and ``committed E DIGEST`` after ``commit()`` returned. After each kill, with R the
newest epoch ever reported committed, recovery must return exactly one of:

* epoch R with R's content: nothing reported committed is lost; or
* epoch R + 1 with the content announced by its ``intent`` line, if the kill landed after
  the manifest was written (the commit point) but before the child could report it.

Nothing older, nothing half-written, no fallback needed, never different bytes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import pandas as pd
import pytest
from obstore.store import LocalStore

from streamstate.checkpoint import ObjectStoreCheckpointer

CHILD = Path(__file__).with_name("ckpt_crash_child.py")
PIPELINE_CHILD = Path(__file__).with_name("pipeline_crash_child.py")
sys.path.insert(0, str(CHILD.parent))
from ckpt_crash_child import digest_of_state
from pipeline_crash_child import PIPELINE, crash_source

from streamstate.pipeline import Pipeline

KILLS = 50


def run_child_until_killed(
    args: Sequence[str], delay: float, child: Path = CHILD
) -> tuple[list[str], int]:
    """Start ``child`` with ``args``, SIGKILL it ``delay`` seconds after it is ready
    (unless it has exited by then); return its lines and exit code."""
    proc = subprocess.Popen(
        [sys.executable, str(child), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("ready"):
                ready.set()
        ready.set()  # EOF: the child exited (or was killed) before getting ready

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(timeout=30), "child never became ready"
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        returncode = proc.wait(timeout=30)
        reader.join(timeout=30)
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert lines and lines[0].startswith("ready"), f"child failed: {lines} {stderr}"
    return lines, returncode


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_a_commit(tmp_path: Path) -> None:
    seed = int(os.environ.get("STREAMSTATE_CRASH_SEED", "20240607"))
    rng = random.Random(seed)
    store = tmp_path / "store"
    store.mkdir()
    committed: dict[int, str] = {}  # epoch -> digest, reported by the child
    reported = -1
    unreported_recoveries = 0
    mid_commit = 0  # kills that landed between an intent and its "committed" line
    started = time.monotonic()

    round_no = -1
    while True:
        round_no += 1
        # At least KILLS rounds; on a loaded machine fewer random kills land inside a commit,
        # so keep killing (up to 3x) until enough of them have.
        if round_no >= KILLS and (mid_commit >= KILLS // 5 or round_no >= 3 * KILLS):
            break
        delay = 0.0 if round_no % 10 == 0 else rng.uniform(0, 0.3)
        lines, returncode = run_child_until_killed([str(store)], delay)
        context = f"round {round_no} (seed {seed}, delay {delay:.3f} s): {lines[:1] + lines[-3:]}"
        assert returncode == -signal.SIGKILL, f"child exited on its own: {context}"
        # The child started from what recovery returned after the previous kill.
        assert int(lines[0].split()[1]) == reported, context
        mid_commit += lines[-1].startswith("intent")
        intents: dict[int, str] = {}
        for line in lines[1:]:
            kind, epoch_text, digest = line.split()
            epoch = int(epoch_text)
            if kind == "intent":
                intents[epoch] = digest
            else:
                assert kind == "committed" and intents[epoch] == digest, context
                committed[epoch] = digest
                reported = max(reported, epoch)

        recovered = ObjectStoreCheckpointer(store).recover()
        if reported < 0 and recovered is None:
            continue
        assert recovered is not None, f"a reported commit was lost: {context}"
        assert recovered.fallbacks == (), f"needed a fallback: {recovered.fallbacks} {context}"
        assert recovered.source_offsets == {"src": recovered.epoch}
        digest = digest_of_state(recovered.state)
        if recovered.epoch == reported:
            assert digest == committed[reported], f"content differs from the commit: {context}"
        else:
            assert recovered.epoch == reported + 1, (
                f"recovered epoch {recovered.epoch}, reported {reported}: {context}"
            )
            assert digest == intents[recovered.epoch], f"content differs: {context}"
            unreported_recoveries += 1
            # It is committed now: the next child continues from it.
            committed[recovered.epoch] = digest
            reported = recovered.epoch

    elapsed = time.monotonic() - started
    # Progress was made across the kills, and the store did not accumulate garbage.
    assert reported >= KILLS // 2, f"only reached epoch {reported} in {elapsed:.0f} s"
    assert mid_commit >= KILLS // 5, f"only {mid_commit} kills landed inside a commit"
    visible = {
        ObjectStoreCheckpointer(store).paths.id_of(meta["path"])
        for meta in obstore.list(LocalStore(str(store))).collect()
    } - {None}
    assert len(visible) <= 3 + 2 + 1, visible  # keep_last, delta ancestors, one in flight
    # A put killed mid-write leaves LocalStore's staging file ("name#N"), which obstore
    # can neither list nor delete; count them for the record (they are never read).
    staging = [p for p in (store / "checkpoints").rglob("*#*") if p.is_file()]
    print(
        f"{KILLS} kills in {elapsed:.1f} s, reached epoch {reported}, "
        f"{mid_commit} kills inside a commit, {unreported_recoveries} recoveries of a commit "
        f"the child had not reported yet, {len(staging)} orphaned LocalStore staging files"
    )


# -- a pipeline with incremental, asynchronous checkpoints -------------------------------


def _group_by(end: int) -> pd.DataFrame:
    """The one-shot pandas group-by of the crash source's first ``end`` events."""
    batch = crash_source().read(0, end) if end else None
    frame = pd.DataFrame(
        {"k": np.zeros(0, np.int64), "v": np.zeros(0)} if batch is None else batch.columns
    )
    return frame.groupby("k")["v"].agg(["count", "sum", "min", "max"])


def _assert_group_by(results: Any, end: int, context: str) -> None:
    expected = _group_by(end)
    order = np.argsort(np.asarray(results["key"]), kind="stable")
    assert np.array_equal(np.asarray(results["key"])[order], expected.index.to_numpy()), context
    for column in ("count", "sum", "min", "max"):
        assert np.array_equal(
            np.asarray(results[column])[order], expected[column].to_numpy()
        ), f"{column}: {context}"


def _attack_pipeline(target: int, new_job: Any, seed: int) -> tuple[int, int, int, int]:
    """SIGKILL pipeline children at random moments until ``target`` kills landed, starting
    a new job (``new_job() -> (child args, store)``) whenever one finishes, then finish the
    last one unkilled. After every kill, the recovered state equals the group-by of the
    events before its offset, and that offset never goes back. Returns (kills, finished
    jobs, kills that found a checkpoint newer than the previous kill's, kills whose
    recovery applied deltas)."""
    rng = random.Random(seed)
    kills = finished = progressed = chained = 0
    args, store = new_job()
    committed = 0
    for round_no in range(3 * target + 1):
        last = kills == target
        delay = 3600.0 if last else rng.uniform(0.0, 1.0)
        lines, returncode = run_child_until_killed(args, delay, PIPELINE_CHILD)
        context = f"round {round_no} (seed {seed}, delay {delay:.3f} s): {lines}"
        assert lines[0] == f"ready {committed}", f"resumed elsewhere: {context}"
        if lines[-1] == "done":  # finished; the kill may have hit its interpreter's exit
            assert returncode in (0, -signal.SIGKILL), context
            with np.load(args[0]) as results:
                _assert_group_by(results, len(crash_source()), context)
            finished += 1
            if last:
                break
            args, store = new_job()
            committed = 0
            continue
        assert not last and returncode == -signal.SIGKILL, f"child failed: {context}"
        kills += 1
        survivor = Pipeline(crash_source(), store=store, **PIPELINE)
        offset = survivor.recover()
        assert offset >= committed, f"a committed checkpoint was lost: {context}"
        progressed += offset > committed
        committed = offset
        newest = ObjectStoreCheckpointer(store).recover(rebuild=False)
        chained += newest is not None and newest.delta_count > 0
        _assert_group_by(survivor.results("v"), offset, f"offset {offset}: {context}")
    else:
        raise AssertionError(f"{kills} kills in {3 * target + 1} rounds: children end too soon")
    return kills, finished, progressed, chained


def _local_jobs(tmp_path: Path) -> Any:
    jobs = iter(range(1_000))

    def new_job() -> tuple[list[str], Any]:
        job = next(jobs)
        store = tmp_path / f"job-{job}"
        return [str(tmp_path / f"result-{job}.npz"), "local", str(store)], store

    return new_job


def _s3_jobs(tmp_path: Path, s3_server: Any) -> Any:
    jobs = iter(range(1_000))

    def new_job() -> tuple[list[str], Any]:
        bucket = s3_server.create_bucket()
        result = str(tmp_path / f"result-{next(jobs)}.npz")
        return [result, "s3", s3_server.endpoint, bucket], s3_server.store(bucket)

    return new_job


def test_sigkill_a_pipeline_a_few_times(tmp_path: Path) -> None:
    kills, finished, _, _ = _attack_pipeline(3, _local_jobs(tmp_path), seed=7)
    assert kills == 3 and finished >= 1


PIPELINE_KILLS = 12  # per backend: 24 in all


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_a_pipeline_with_incremental_async_checkpoints(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    seed = int(os.environ.get("STREAMSTATE_CRASH_SEED", "20261201"))
    new_job = (
        _local_jobs(tmp_path)
        if backend == "local"
        else _s3_jobs(tmp_path, request.getfixturevalue("s3_server"))
    )
    kills, finished, progressed, chained = _attack_pipeline(PIPELINE_KILLS, new_job, seed)
    print(f"{backend}: {kills} kills, {finished} finished jobs, {progressed} kills after "
          f"progress, {chained} recoveries through deltas")  # fmt: skip
    assert kills == PIPELINE_KILLS and finished >= 1
    assert progressed >= kills // 3, "most kills found no new checkpoint: no progress"
    assert chained >= 1, "no kill was recovered through a delta chain"
