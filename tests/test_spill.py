"""SpillingAggregator: exact results at every memory limit, failure behaviour, cleanup."""

from __future__ import annotations

import errno
import gc
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamstate
from streamstate import CorruptDataError, SpillError, StreamStateError
from streamstate.spill import (
    MIN_MEM_LIMIT_BYTES,
    RSS_OVERHEAD_BYTES,
    SpillingAggregator,
    cleanup_stale_spill_dirs,
)
from streamstate.stats import STAT_COLUMNS

KiB = 1024
MiB = 1024 * KiB
PYTHONPATH = str(Path(streamstate.__file__).resolve().parent.parent)


# -- reference ---------------------------------------------------------------------------


def reference(keys: Any, values: Any, nan: str = "skip") -> dict[str, np.ndarray]:
    """Per-key count / sum / min / max / mean / var (two-pass), sorted by key, with numpy."""
    karr = keys if isinstance(keys, np.ndarray) else np.array(keys, dtype=object)
    vals = np.asarray(values, dtype=np.float64)
    if nan == "skip":
        keep = ~np.isnan(vals)
        karr, vals = karr[keep], vals[keep]
    uniq, inv = np.unique(karr, return_inverse=True)
    inv = inv.reshape(-1)
    count = np.bincount(inv, minlength=len(uniq))
    total = np.bincount(inv, weights=vals, minlength=len(uniq))
    lo = np.full(len(uniq), np.inf)
    hi = np.full(len(uniq), -np.inf)
    np.minimum.at(lo, inv, vals)
    np.maximum.at(hi, inv, vals)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        m2 = np.bincount(inv, weights=(vals - mean[inv]) ** 2, minlength=len(uniq))
        var = np.where(count > 1, m2 / (count - 1), np.nan)
    return {
        "key": uniq,
        "count": count,
        "sum": total,
        "min": lo,
        "max": hi,
        "mean": mean,
        "var": var,
    }


def sorted_result(cols: dict[str, Any]) -> dict[str, np.ndarray]:
    keys = cols["key"]
    karr = keys if isinstance(keys, np.ndarray) else np.array(keys, dtype=object)
    order = np.argsort(karr, kind="stable")
    out = {name: np.asarray(cols[name])[order] for name in STAT_COLUMNS[1:]}
    out["key"] = karr[order]
    return out


def assert_matches(cols: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    got = sorted_result(cols)
    assert len(got["key"]) == len(expected["key"])
    assert (got["key"] == expected["key"]).all()
    np.testing.assert_array_equal(got["count"], expected["count"])
    # Integer-valued inputs: sums are exact whatever the merge order.
    for name in ("sum", "min", "max"):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got["var"], expected["var"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got["std"], np.sqrt(got["var"]), equal_nan=True)


def as_mapping(cols: dict[str, Any]) -> dict[Any, tuple[Any, ...]]:
    keys = cols["key"]
    keys = [int(k) for k in keys] if isinstance(keys, np.ndarray) else list(keys)
    assert len(set(keys)) == len(keys), "a key appears twice in the result"
    return {
        k: tuple(cols[c][i] for c in ("count", "sum", "min", "max", "mean", "var"))
        for i, k in enumerate(keys)
    }


def int_data(n: int, distinct: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.integers(-(2**62), 2**62, distinct, dtype=np.int64)[rng.integers(0, distinct, n)]
    values = rng.integers(-1000, 1000, n).astype(np.float64)
    return keys, values


def listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


# -- correctness -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit", [None, 64 * KiB, 80 * KiB, 128 * KiB, 300 * KiB, 1 * MiB, 4 * MiB]
)
def test_int_keys_exact_at_every_limit(limit: int | None, tmp_path: Path) -> None:
    keys, values = int_data(120_000, 30_000, seed=limit or 1)
    with SpillingAggregator(limit, spill_dir=tmp_path) as agg:
        for start in range(0, len(keys), 25_000):
            agg.accumulate_batch(keys[start : start + 25_000], values[start : start + 25_000])
        cols = agg.drain()
        if limit is not None and limit <= 1 * MiB:
            assert agg.spill_count > 0
            assert agg.total_spilled_bytes > 0
        if limit is None or limit >= 4 * MiB:
            assert agg.spill_count == 0
        if limit is not None:
            assert 0 < agg.peak_memory_bytes <= limit
    assert_matches(cols, reference(keys, values))
    assert listdir(tmp_path) == []


def test_several_levels_of_repartitioning(tmp_path: Path) -> None:
    keys, values = int_data(400_000, 250_000, seed=7)
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(keys, values)
        cols = agg.drain()
        assert agg.spill_depth >= 3, agg.diagnostics()
        assert agg.peak_memory_bytes <= 64 * KiB
    assert_matches(cols, reference(keys, values))


@pytest.mark.parametrize("limit", [None, 64 * KiB, 200 * KiB, 2 * MiB])
def test_bytes_and_str_keys(limit: int | None, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pool = [f"user-{i}-{'x' * int(rng.integers(0, 40))}".encode() for i in range(20_000)]
    idx = rng.integers(0, len(pool), 80_000)
    keys: list[bytes | str] = [pool[i] for i in idx]
    keys[::3] = [k.decode() for k in keys[::3]]  # str keys fold as their UTF-8 bytes
    values = rng.integers(0, 50, len(keys)).astype(np.float64)
    with SpillingAggregator(limit, spill_dir=tmp_path, key_type="bytes") as agg:
        agg.accumulate_batch(keys[:50_000], values[:50_000])
        for k, v in zip(keys[50_000:50_100], values[50_000:50_100], strict=True):
            agg.accumulate(k, v)
        agg.accumulate_batch(keys[50_100:], values[50_100:])
        cols = agg.drain()
        if limit is not None and limit < 1 * MiB:
            assert agg.spill_count > 0
    assert all(type(k) is bytes for k in cols["key"])
    encoded = np.array([k.encode() if isinstance(k, str) else k for k in keys], dtype=object)
    assert_matches(cols, reference(encoded, values))


def test_ninety_percent_skew(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    n = 300_000
    keys = rng.integers(1, 60_000, n, dtype=np.int64)
    keys[rng.random(n) < 0.9] = 0
    values = rng.integers(0, 100, n).astype(np.float64)
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(keys, values)
        cols = agg.drain()
        assert agg.spill_count > 0
        assert agg.peak_memory_bytes <= 64 * KiB
    expected = reference(keys, values)
    assert expected["count"][0] > 0.85 * n  # key 0 sorts first
    assert_matches(cols, expected)


def test_empty_input(tmp_path: Path) -> None:
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(np.array([], dtype=np.int64), np.array([]))
        agg.accumulate_batch([], [])
        cols = agg.drain()
    assert list(cols) == list(STAT_COLUMNS)
    assert all(len(cols[c]) == 0 for c in STAT_COLUMNS)
    assert cols["key"].dtype == np.int64 and cols["count"].dtype == np.uint64
    assert agg.spill_count == 0 and agg.in_memory_groups == 0
    with SpillingAggregator(None, spill_dir=tmp_path, key_type="bytes") as agg:
        assert agg.drain()["key"] == []


def test_result_shape_matches_store_columns(tmp_path: Path) -> None:
    with SpillingAggregator(spill_dir=tmp_path) as agg:
        agg.accumulate_batch(np.array([5, 5, 7]), np.array([1.0, 3.0, 2.0]))
        cols = agg.drain()
    assert list(cols) == list(STAT_COLUMNS)
    assert cols["count"].dtype == np.uint64
    assert all(cols[c].dtype == np.float64 for c in STAT_COLUMNS[2:])
    got = as_mapping(cols)
    assert got[5][:5] == (2, 4.0, 1.0, 3.0, 2.0) and got[5][5] == pytest.approx(2.0)
    assert got[7][:5] == (1, 2.0, 2.0, 2.0, 2.0) and math.isnan(got[7][5])


def test_to_pandas(tmp_path: Path) -> None:
    keys, values = int_data(20_000, 3_000, seed=5)
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(keys, values)
        df = agg.to_pandas()
    assert list(df.columns) == list(STAT_COLUMNS[1:])
    expected = reference(keys, values)
    assert len(df) == len(expected["key"])
    df = df.sort_index()
    np.testing.assert_array_equal(df.index.to_numpy(), expected["key"])
    np.testing.assert_array_equal(df["count"].to_numpy(), expected["count"])
    np.testing.assert_array_equal(df["sum"].to_numpy(), expected["sum"])


def test_numerically_stable_variance(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 2_000, 60_000, dtype=np.int64)
    values = 1e9 + rng.normal(0, 1, len(keys))
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(keys, values)
        cols = agg.drain()
        assert agg.spill_count > 0
    got = sorted_result(cols)
    np.testing.assert_allclose(got["var"], reference(keys, values)["var"], rtol=1e-6)


@pytest.mark.parametrize("limit", [64 * KiB, None])
def test_nan_policies(limit: int | None, tmp_path: Path) -> None:
    keys = np.arange(30_000, dtype=np.int64) % 9_000
    values = (keys % 13).astype(np.float64)
    values[::97] = np.nan
    with SpillingAggregator(limit, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(keys, values)
        agg.accumulate(1, math.nan)
        assert_matches(agg.drain(), reference(keys, values, nan="skip"))
    with SpillingAggregator(limit, spill_dir=tmp_path, nan_policy="propagate") as agg:
        agg.accumulate_batch(keys, values)
        got = as_mapping(agg.drain())
    poisoned = set(keys[np.isnan(values)].tolist())
    assert poisoned
    for k, (count, s, lo, hi, mean, _var) in got.items():
        assert count == np.count_nonzero(keys == k)
        assert all(math.isnan(x) for x in (s, lo, hi, mean)) == (k in poisoned)
    with SpillingAggregator(limit, spill_dir=tmp_path, nan_policy="raise") as agg:
        clean = ~np.isnan(values)
        agg.accumulate_batch(keys[clean], values[clean])
        with pytest.raises(ValueError, match="index 0 is NaN"):
            agg.accumulate_batch(keys, values)
        with pytest.raises(ValueError, match="NaN"):
            agg.accumulate(3, math.nan)
        # The rejected batch folded nothing.
        assert_matches(agg.drain(), reference(keys[clean], values[clean]))


def test_results_do_not_depend_on_threads(tmp_path: Path) -> None:
    keys, values = int_data(100_000, 40_000, seed=9)
    results = []
    for threads in (1, 2, 3):
        with SpillingAggregator(128 * KiB, spill_dir=tmp_path, threads=threads) as agg:
            assert agg.threads == threads
            agg.accumulate_batch(keys, values)
            results.append(as_mapping(agg.drain()))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k, v in results[0].items():
            assert other[k][:4] == v[:4]


def test_concurrent_callers_are_serialised(tmp_path: Path) -> None:
    keys, values = int_data(200_000, 50_000, seed=4)
    with SpillingAggregator(256 * KiB, spill_dir=tmp_path) as agg:
        chunks = np.array_split(np.arange(len(keys)), 4)
        errors: list[Exception] = []

        def feed(idx: np.ndarray) -> None:
            try:
                for part in np.array_split(idx, 10):
                    agg.accumulate_batch(keys[part], values[part])
            except Exception as exc:  # noqa: BLE001 - reported by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=feed, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert_matches(agg.drain(), reference(keys, values))


@given(
    rows=st.lists(
        st.tuples(st.integers(0, 4_000), st.integers(-50, 50)), min_size=0, max_size=3_000
    ),
    limit=st.sampled_from([64 * KiB, 72 * KiB, 96 * KiB, None]),
    threads=st.sampled_from([1, 2]),
)
def test_any_limit_gives_the_unlimited_answer(
    rows: list[tuple[int, int]], limit: int | None, threads: int
) -> None:
    keys = np.array([k * 7919 for k, _ in rows], dtype=np.int64)
    values = np.array([v for _, v in rows], dtype=np.float64)
    with SpillingAggregator(limit, threads=threads) as agg:
        half = len(rows) // 2
        agg.accumulate_batch(keys[:half], values[:half])
        agg.accumulate_batch(keys[half:], values[half:])
        cols = agg.drain()
    assert_matches(cols, reference(keys, values))


# -- diagnostics and API ----------------------------------------------------------------


def test_diagnostics_survive_drain(tmp_path: Path) -> None:
    keys, values = int_data(50_000, 20_000, seed=8)
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path)
    agg.accumulate_batch(keys, values)
    before = agg.diagnostics()
    assert before["spill_count"] > 0 and before["spill_files"] > 0
    assert before["in_memory_groups"] > 0
    assert before["spilled_batch_count"] >= before["spill_count"]
    agg.drain()
    after = agg.diagnostics()
    assert after["in_memory_groups"] == before["in_memory_groups"]
    assert after["spill_count"] >= before["spill_count"]
    assert after["total_spilled_bytes"] >= before["total_spilled_bytes"]
    assert after["peak_memory_bytes"] >= before["peak_memory_bytes"]
    assert after["spill_files"] == 0 and after["memory_bytes"] == 0
    assert agg.closed
    assert "closed" in repr(agg) and "spill_count=" in repr(agg)
    with pytest.raises(ValueError, match="closed"):
        agg.accumulate(1, 1.0)
    with pytest.raises(ValueError, match="closed"):
        agg.drain()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 65536"):
        SpillingAggregator(MIN_MEM_LIMIT_BYTES - 1, spill_dir=tmp_path)
    with pytest.raises(ValueError, match="key_type"):
        SpillingAggregator(spill_dir=tmp_path, key_type="float")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nan_policy"):
        SpillingAggregator(spill_dir=tmp_path, nan_policy="ignore")  # type: ignore[arg-type]
    assert listdir(tmp_path) == []
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(np.array([1, 2]), np.array([1.0, 2.0]))
        with pytest.raises(ValueError, match="differ in length"):
            agg.accumulate_batch(np.array([1, 2, 3]), np.array([1.0, 2.0]))
        with pytest.raises(TypeError, match="integers"):
            agg.accumulate_batch(np.array([1.5]), np.array([1.0]))
        with pytest.raises(TypeError):
            agg.accumulate("a", 1.0)  # type: ignore[arg-type]
        with pytest.raises(OverflowError):
            agg.accumulate_batch(np.array([2**63], dtype=np.uint64), np.array([1.0]))
        with pytest.raises(ValueError, match="one-dimensional"):
            agg.accumulate_batch(np.zeros((2, 2), dtype=np.int64), np.zeros(4))
        # None of the rejected calls folded anything.
        got = as_mapping(agg.drain())
        assert {k: v[:5] for k, v in got.items()} == {
            1: (1, 1.0, 1.0, 1.0, 1.0),
            2: (1, 2.0, 2.0, 2.0, 2.0),
        }
    with SpillingAggregator(spill_dir=tmp_path, key_type="bytes") as agg:
        agg.accumulate_batch([b"a"], [1.0])
        with pytest.raises(TypeError, match="index 1 must be bytes or str"):
            agg.accumulate_batch([b"b", 3], [1.0, 2.0])
        with pytest.raises(TypeError):
            agg.accumulate_batch(b"ab", [1.0, 2.0])
        assert agg.drain()["key"] == [b"a"]


def test_key_larger_than_the_limit_still_finishes(tmp_path: Path) -> None:
    big = b"k" * (200 * KiB)
    keys = [big, b"small", big] + [str(i).encode() for i in range(5_000)]
    values = np.arange(len(keys), dtype=np.float64)
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path, key_type="bytes") as agg:
        agg.accumulate_batch(keys, values)
        cols = agg.drain()
    got = as_mapping(cols)
    assert got[big][:2] == (2, 2.0)
    assert len(got) == 5_002


def test_int64_extremes(tmp_path: Path) -> None:
    keys = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, -1] * 3, dtype=np.int64)
    values = np.arange(len(keys), dtype=np.float64)
    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        agg.accumulate_batch(keys, values)
        agg.accumulate(np.int64(5), 1)
        assert_matches(
            agg.drain(),
            reference(np.append(keys, np.int64(5)), np.append(values, 1.0)),
        )


# -- files: cleanup on every path --------------------------------------------------------


def spill_some(agg: SpillingAggregator, seed: int = 0) -> None:
    keys, values = int_data(30_000, 20_000, seed=seed)
    agg.accumulate_batch(keys, values)
    assert agg.spill_count > 0


def spill_files(agg: SpillingAggregator) -> list[Path]:
    return sorted(agg.spill_dir.glob("*.spill"))


def test_private_directory_is_marked_and_removed(tmp_path: Path) -> None:
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path)
    assert agg.spill_dir.parent == tmp_path
    marker = (agg.spill_dir / ".streamstate-spill").read_text()
    assert f"pid={os.getpid()}" in marker
    spill_some(agg)
    assert spill_files(agg)
    agg.drain()
    assert listdir(tmp_path) == []


def test_cleanup_on_close_exit_gc_and_error(tmp_path: Path) -> None:
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path)
    spill_some(agg)
    agg.close()
    agg.close()
    assert listdir(tmp_path) == []

    with SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg:
        spill_some(agg)
    assert listdir(tmp_path) == []

    with (
        pytest.raises(RuntimeError, match="boom"),
        SpillingAggregator(64 * KiB, spill_dir=tmp_path) as agg,
    ):
        spill_some(agg)
        raise RuntimeError("boom")
    assert listdir(tmp_path) == []

    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path)
    spill_some(agg)
    del agg
    gc.collect()
    assert listdir(tmp_path) == []


def test_default_spill_dir_is_cleaned(tmp_path: Path) -> None:
    agg = SpillingAggregator(64 * KiB)
    spill_some(agg)
    private = agg.spill_dir
    assert private.is_dir() and spill_files(agg)
    agg.close()
    assert not private.exists()


def run_python(code: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_cleanup_at_interpreter_exit(tmp_path: Path) -> None:
    proc = run_python(
        f"""
        import numpy as np
        from streamstate import SpillingAggregator
        agg = SpillingAggregator(64 * 1024, spill_dir={str(tmp_path)!r})
        agg.accumulate_batch(np.arange(50_000, dtype=np.int64), np.ones(50_000))
        assert agg.spill_count > 0
        print(agg.spill_dir)
        globals()["keep"] = agg  # alive until the interpreter shuts down
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert not Path(proc.stdout.strip()).exists()
    assert listdir(tmp_path) == []


def test_killed_process_leaves_a_marked_dir_that_the_next_run_removes(tmp_path: Path) -> None:
    proc = run_python(
        f"""
        import os, signal, sys
        import numpy as np
        from streamstate import SpillingAggregator
        agg = SpillingAggregator(64 * 1024, spill_dir={str(tmp_path)!r})
        agg.accumulate_batch(np.arange(50_000, dtype=np.int64), np.ones(50_000))
        print(agg.spill_dir, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert proc.returncode == -signal.SIGKILL
    leftover = Path(proc.stdout.strip())
    assert leftover.is_dir() and list(leftover.glob("*.spill"))
    assert (leftover / ".streamstate-spill").is_file()
    unrelated = tmp_path / "streamstate-spill-unmarked"
    unrelated.mkdir()  # no marker: never touched
    mine = SpillingAggregator(64 * KiB, spill_dir=tmp_path)  # sweeps dead owners' dirs
    assert not leftover.exists()
    assert unrelated.exists() and mine.spill_dir.exists()
    assert cleanup_stale_spill_dirs(tmp_path) == []  # the live one stays
    mine.close()


def test_forked_child_leaves_the_parents_files_alone(tmp_path: Path) -> None:
    keys, values = int_data(40_000, 20_000, seed=12)
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path, threads=1)
    agg.accumulate_batch(keys, values)
    files = spill_files(agg)
    assert files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child drops its copy: the finalizer, then the C++ destructors
        try:
            agg.close()
            agg._core.close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert spill_files(agg) == files
    assert_matches(agg.drain(), reference(keys, values))
    assert listdir(tmp_path) == []


# -- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["middle", "header", "truncate", "block-boundary"])
def test_corrupted_spill_file_is_detected(where: str, tmp_path: Path) -> None:
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path)
    spill_some(agg, seed=3)
    victim = max(spill_files(agg), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if where == "middle":
        data[len(data) // 2] ^= 0x40
    elif where == "header":
        data[1] ^= 0x01
    elif where == "truncate":
        del data[-7:]
    else:  # cut exactly after the first block: still well-formed, but groups are missing
        first_block = int.from_bytes(data[12:16], "little")
        del data[12 + 12 + first_block :]
        assert len(data) < victim.stat().st_size
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match=victim.name) as info:
        agg.drain()
    assert str(victim) in str(info.value)
    assert isinstance(info.value, StreamStateError) and isinstance(info.value, ValueError)
    assert listdir(tmp_path) == []  # nothing left, no partial result
    assert agg.closed
    with pytest.raises(CorruptDataError):  # the failure sticks
        agg.drain()


def test_unwritable_spill_dir_raises_spill_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(SpillError) as info:
        SpillingAggregator(64 * KiB, spill_dir=blocker / "spill")
    assert isinstance(info.value, OSError) and isinstance(info.value, StreamStateError)
    assert str(blocker) in str(info.value)


def test_spill_directory_vanishing_mid_run_raises_spill_error(tmp_path: Path) -> None:
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path)
    agg.accumulate_batch(np.arange(100, dtype=np.int64), np.ones(100))
    for p in agg.spill_dir.iterdir():
        p.unlink()
    agg.spill_dir.rmdir()
    with pytest.raises(SpillError) as info:
        agg.accumulate_batch(np.arange(50_000, dtype=np.int64), np.ones(50_000))
    assert info.value.filename.startswith(str(agg.spill_dir))
    assert info.value.errno == 2
    assert agg.closed
    with pytest.raises(SpillError):
        agg.drain()
    assert listdir(tmp_path) == []


def test_disk_full_raises_spill_error(tmp_path: Path) -> None:
    # A full disk: a 128 KiB tmpfs, mounted in a private user and mount namespace so no
    # privilege is needed and nothing outlives the child. (Spill files are no longer
    # opened through a symlink, so /dev/full cannot stand in for one.)
    full = tmp_path / "full"
    full.mkdir()
    code = f"""
        import os
        import numpy as np
        from streamstate import SpillError, SpillingAggregator
        agg = SpillingAggregator(64 * 1024, spill_dir={str(full)!r}, threads=1)
        try:
            agg.accumulate_batch(np.arange(200_000, dtype=np.int64), np.ones(200_000))
        except SpillError as exc:
            print(exc.errno, exc.filename, exc, sep="\\n")
        agg.close()
        print(sorted(os.listdir({str(full)!r})))
        """
    mount = 'mount -t tmpfs -o size=128k tmpfs "$1" && exec "$2" -c "$3"'
    try:
        proc = subprocess.run(
            [
                "unshare",
                "--user",
                "--map-root-user",
                "--mount",
                "sh",
                "-c",
                mount,
                "sh",
                str(full),
                sys.executable,
                textwrap.dedent(code),
            ],
            check=False,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
            capture_output=True,
            text=True,
            timeout=120,
        )
    except FileNotFoundError:  # pragma: no cover - util-linux is everywhere the tests run
        pytest.skip("unshare(1) is needed to simulate a full disk")
    if proc.returncode != 0 and ("unshare" in proc.stderr or "mount" in proc.stderr):
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    errno_text, filename, message, left = proc.stdout.splitlines()
    assert int(errno_text) == 28
    assert "No space left" in message
    assert "lane0-" in filename
    assert left == "[]"


# -- files: nobody else can redirect the spill files ------------------------------------

OTHER_UID = 65534  # nobody


def test_default_parent_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"streamstate-spill-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    os.chown(shared, OTHER_UID, -1)
    with pytest.raises(SpillError, match=f"owned by uid {OTHER_UID}") as info:
        SpillingAggregator(64 * KiB)
    assert info.value.filename == str(shared) and isinstance(info.value, StreamStateError)
    assert listdir(shared) == []  # nothing was created where the other user could reach it

    # Planted as a symlink to a directory of ours, or ours but open to everyone: refused.
    os.chown(shared, os.getuid(), -1)
    with pytest.raises(SpillError, match="writable by other users"):
        SpillingAggregator(64 * KiB)
    shared.rmdir()
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    shared.symlink_to(target)
    with pytest.raises(SpillError, match="symlink"):
        SpillingAggregator(64 * KiB)
    assert listdir(target) == []

    # Absent, it is created private, and used.
    shared.unlink()
    with SpillingAggregator(64 * KiB) as agg:
        spill_some(agg)
        assert agg.spill_dir.parent == shared
        assert stat.S_IMODE(shared.stat().st_mode) == 0o700
        assert stat.S_IMODE(agg.spill_dir.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("mode", "owner", "problem"),
    [
        (0o777, None, "writable by other users"),
        (0o770, None, "writable by other users"),
        (0o755, OTHER_UID, f"owned by uid {OTHER_UID}"),
        (0o1777, OTHER_UID, f"owned by uid {OTHER_UID}"),  # its owner can still rename
    ],
)
def test_spill_dir_others_can_write_is_refused(
    mode: int, owner: int | None, problem: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    if owner is not None:
        os.chown(shared, owner, -1)
    with pytest.raises(SpillError, match=problem):
        SpillingAggregator(64 * KiB, spill_dir=shared)
    assert listdir(shared) == []


def test_sticky_world_writable_spill_dir_is_accepted(tmp_path: Path) -> None:
    # Like /tmp: others can write, but only we (and the directory's owner) can rename ours.
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with SpillingAggregator(64 * KiB, spill_dir=sticky) as agg:
        spill_some(agg)
        assert stat.S_IMODE(agg.spill_dir.stat().st_mode) == 0o700
    assert listdir(sticky) == []


def test_symlink_planted_at_a_spill_file_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"the victim's data")
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path / "spill", threads=1)
    for i in range(4):  # the first spill files this lane will create
        (agg.spill_dir / f"lane0-{i}.spill").symlink_to(victim)
    with pytest.raises(SpillError) as info:
        agg.accumulate_batch(np.arange(50_000, dtype=np.int64), np.ones(50_000))
    assert info.value.errno == errno.EEXIST and "lane0-" in info.value.filename
    assert victim.read_bytes() == b"the victim's data"
    agg.close()
    assert listdir(tmp_path / "spill") == []


@pytest.mark.parametrize("then", ["append", "drain"])
def test_spill_file_swapped_for_a_symlink_is_refused(then: str, tmp_path: Path) -> None:
    keys, values = int_data(60_000, 30_000, seed=4)
    agg = SpillingAggregator(64 * KiB, spill_dir=tmp_path / "spill", threads=1)
    agg.accumulate_batch(keys[:30_000], values[:30_000])
    copies = tmp_path / "copies"
    copies.mkdir()
    for f in spill_files(agg):  # same bytes, same size: only the symlink gives it away
        copy = copies / f.name
        copy.write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(copy)
    before = {c.name: c.read_bytes() for c in copies.iterdir()}
    with pytest.raises(SpillError) as info:
        if then == "append":
            agg.accumulate_batch(keys[30_000:], values[30_000:])
        else:
            agg.drain()
    assert info.value.errno == errno.ELOOP
    assert {c.name: c.read_bytes() for c in copies.iterdir()} == before
    agg.close()
    assert listdir(tmp_path / "spill") == []


def test_cleanup_leaves_other_users_and_symlinked_dirs_alone(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    marker = f"pid={done.stdout.strip()}\nstart=\nhost={socket.gethostname()}\n"
    stale = {}
    for name in ("mine", "theirs", "target"):
        d = tmp_path / f"streamstate-spill-1-{name}" if name != "target" else tmp_path / name
        d.mkdir()
        (d / ".streamstate-spill").write_text(marker)
        (d / "lane0-0.spill").write_bytes(b"data")
        stale[name] = d
    os.chown(stale["theirs"], OTHER_UID, -1)
    link = tmp_path / "streamstate-spill-1-link"
    link.symlink_to(stale["target"])
    removed = cleanup_stale_spill_dirs(tmp_path)
    assert removed == [stale["mine"]]  # a dead owner's directory of ours: swept
    assert (stale["theirs"] / "lane0-0.spill").exists()
    assert (stale["target"] / "lane0-0.spill").exists() and link.is_symlink()


# -- memory ------------------------------------------------------------------------------


RSS_SCRIPT = """
import sys
import numpy as np
from streamstate import SpillingAggregator

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

limit = int(sys.argv[1]) or None
rng = np.random.default_rng(0)
n, distinct = 3_000_000, 600_000
keys = rng.integers(0, distinct, n, dtype=np.int64)
values = rng.integers(0, 100, n).astype(np.float64)
agg = SpillingAggregator(limit, spill_dir=sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark: everything before this is the baseline
base = status("VmRSS")
for i in range(0, n, 1 << 19):
    agg.accumulate_batch(keys[i : i + (1 << 19)], values[i : i + (1 << 19)])
accumulate_growth = status("VmHWM") - base
cols = agg.drain()
result = sum(c.nbytes for c in cols.values())
drain_growth = status("VmHWM") - base
print(accumulate_growth, drain_growth, result, agg.peak_memory_bytes)
"""


@pytest.mark.slow  # not under ASan: its shadow memory and quarantine inflate RSS
def test_peak_rss_stays_within_the_limit(tmp_path: Path) -> None:
    def measure(limit: int) -> tuple[int, int, int, int]:
        proc = subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, str(limit), str(tmp_path)],
            check=False,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        a, d, r, p = (int(x) for x in proc.stdout.split())
        return a, d, r, p

    limit = 8 * MiB
    acc, drain, result, peak = measure(limit)
    assert peak <= limit
    assert acc <= limit + RSS_OVERHEAD_BYTES
    assert drain <= limit + RSS_OVERHEAD_BYTES + result
    # The check can fail: without a limit the same input needs far more.
    acc_unlimited, _, _, peak_unlimited = measure(0)
    assert peak_unlimited > 4 * limit
    assert acc_unlimited > limit + RSS_OVERHEAD_BYTES
    assert listdir(tmp_path) == []


def test_bytes_keys_follow_the_stores_rules(tmp_path: Path) -> None:
    # The same rule as NumericAggregateStore(key_type="bytes"): bytes, str and buffers of
    # single bytes are keys; numbers (numpy integers included) are refused, not reinterpreted.
    with SpillingAggregator(spill_dir=tmp_path, key_type="bytes") as agg:
        agg.accumulate_batch([b"a", "a", bytearray(b"a"), memoryview(b"a")], [1.0, 2.0, 3.0, 4.0])
        agg.accumulate(bytearray(b"a"), 5.0)  # type: ignore[arg-type]
        for bad in (np.array([1, 2]), [np.int64(1), np.int64(2)]):
            with pytest.raises(TypeError, match="index 0 must be bytes or str"):
                agg.accumulate_batch(bad, [1.0, 2.0])
        with pytest.raises(TypeError, match="key must be bytes or str"):
            agg.accumulate(np.int64(1), 1.0)  # type: ignore[arg-type]
        result = agg.drain()
        assert result["key"] == [b"a"] and result["count"].tolist() == [5]
