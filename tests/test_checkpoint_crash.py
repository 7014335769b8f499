"""SIGKILL a committing process at random moments: recovery never loses a commit.

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
from pathlib import Path

import obstore
import pytest
from obstore.store import LocalStore

from streamstate.checkpoint import ObjectStoreCheckpointer

CHILD = Path(__file__).with_name("ckpt_crash_child.py")
sys.path.insert(0, str(CHILD.parent))
from ckpt_crash_child import digest_of_state

KILLS = 50


def run_child_until_killed(store: Path, delay: float) -> tuple[list[str], int]:
    """Start the child, SIGKILL it ``delay`` seconds after it is ready; return its lines."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(store)],
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
        time.sleep(delay)
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

    for round_no in range(KILLS):
        delay = 0.0 if round_no % 10 == 0 else rng.uniform(0, 0.3)
        lines, returncode = run_child_until_killed(store, delay)
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
