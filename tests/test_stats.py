"""The numeric partial at the edges of the double range, on every path that folds or merges it.

Reference: numpy's results for infinities and NaN (``np.sum``, ``np.mean``, ``np.var(ddof=1)``,
``np.min``/``np.max``), exact rational arithmetic for finite values. The two agree wherever
numpy's own float arithmetic cannot overflow; where it can (``1e308 + 1e308 - 1e308`` summed
in that order is inf in numpy, 1e308 in another order), the exact value is the one answer
every order of adds and merges can give, so the store must give it whatever the order.
"""

from __future__ import annotations

import itertools
import math
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamstate as ss
from streamstate import CorruptDataError, _core
from streamstate.spill import SpillingAggregator

INF = math.inf
DBL_MAX = sys.float_info.max
DBL_MAX_EXACT = Fraction(DBL_MAX)
TINY = Fraction(2) ** -1074  # the smallest subnormal
KiB = 1024

EXTREMES = [
    INF,
    -INF,
    DBL_MAX,
    -DBL_MAX,
    1e308,
    -1e308,
    2.0**400,  # where the scaled representation starts
    -(2.0**400),
    math.nextafter(2.0**400, 0.0),
    1.5e154,  # its square overflows
    -1.5e154,
    5e-324,
    -5e-324,
    sys.float_info.min,
    0.0,
    -0.0,
    1.0,
    -1.0,
]
extreme_floats = st.one_of(
    st.floats(allow_nan=False),  # infinities, huge magnitudes and subnormals included
    st.sampled_from(EXTREMES),
    st.floats(-1e3, 1e3),
)
value_lists = st.lists(extreme_floats, min_size=1, max_size=16)


# -- the reference -----------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What a group of values must give: exact values, or the non-finite answer, and the
    rounding each finite result may carry (in units of the data, never relative to the
    result: a sum that cancels to 1 from 1e308 and -1e308 is only known to ~1e292)."""

    count: int
    min: float
    max: float
    sum: Fraction | float  # a Fraction when exact, else NaN or an infinity
    mean: Fraction | float
    var: Fraction | float
    sum_tol: Fraction
    mean_tol: Fraction
    var_tol: Fraction


def expected_stats(values: list[float]) -> Expected:
    n = len(values)
    if any(math.isnan(v) for v in values):
        nan = math.nan
        return Expected(n, nan, nan, nan, nan, nan, Fraction(0), Fraction(0), Fraction(0))
    lo, hi = min(values), max(values)
    if INF in values or -INF in values:
        both = INF in values and -INF in values
        total = math.nan if both else (INF if INF in values else -INF)
        return Expected(n, lo, hi, total, total, math.nan, Fraction(0), Fraction(0), Fraction(0))
    exact = [Fraction(v) for v in values]
    total_exact = sum(exact, Fraction(0))
    mean = total_exact / n
    abs_sum = sum((abs(x) for x in exact), Fraction(0))
    biggest = max(abs(x) for x in exact)
    spread = Fraction(hi) - Fraction(lo)
    if n > 1:
        var: Fraction | float = sum(((x - mean) ** 2 for x in exact), Fraction(0)) / (n - 1)
        var_tol = Fraction(1, 10**12) * n * n * spread * spread / (n - 1) + Fraction(1, 10**300)
    else:
        var, var_tol = math.nan, Fraction(0)
    return Expected(
        count=n,
        min=lo,
        max=hi,
        sum=total_exact,
        mean=mean,
        var=var,
        sum_tol=Fraction(1, 10**13) * n * abs_sum + 4 * n * TINY,
        mean_tol=Fraction(1, 10**13) * n * biggest + 4 * TINY,
        var_tol=var_tol,
    )


def near_overflow(exact: Fraction | float, tol: Fraction) -> bool:
    """Within rounding of the largest double: inf and a finite value are both right."""
    return isinstance(exact, Fraction) and abs(exact) + tol >= DBL_MAX_EXACT


def assert_value(got: float, exact: Fraction | float, tol: Fraction, what: str) -> None:
    if not isinstance(exact, Fraction):  # NaN or an infinity: exactly that
        if math.isnan(exact):
            assert math.isnan(got), f"{what}: {got!r}, expected nan"
        else:
            assert got == exact, f"{what}: {got!r}, expected {exact!r}"
        return
    assert not math.isnan(got), f"{what}: nan, expected {float(exact)!r}"
    if math.isinf(got):
        # Only when the exact value is beyond (or within rounding of) the double range.
        assert near_overflow(exact, tol) and (got > 0) == (exact > 0), (
            f"{what}: {got!r}, expected {float(exact)!r}"
        )
    else:
        assert abs(Fraction(got) - exact) <= tol, f"{what}: {got!r}, expected ~{float(exact)!r}"


def assert_stats(got: tuple[Any, ...], values: list[float], what: str = "") -> None:
    """`got` is (count, sum, min, max, mean, var, std) for `values`."""
    e = expected_stats(values)
    count, total, lo, hi, mean, var, std = got
    assert count == e.count, what
    for name, value, want in (("min", lo, e.min), ("max", hi, e.max)):
        if math.isnan(want):
            assert math.isnan(value), f"{what} {name}"
        else:
            assert value == want, f"{what} {name}: {value!r} != {want!r}"
    assert_value(total, e.sum, e.sum_tol, f"{what} sum")
    assert_value(mean, e.mean, e.mean_tol, f"{what} mean")
    assert_value(var, e.var, e.var_tol, f"{what} var")
    if not math.isnan(var):
        assert std == pytest.approx(math.sqrt(var), rel=1e-15), what
    assert_agrees_with_numpy(got, values, e, what)


def assert_agrees_with_numpy(
    got: tuple[Any, ...], values: list[float], e: Expected, what: str
) -> None:
    """numpy's answer wherever its float arithmetic cannot overflow part way."""
    arr = np.array(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if sum(Fraction(abs(float(x))) for x in finite) >= DBL_MAX_EXACT / 2:
        return  # numpy's running sum may overflow, and then depends on the order
    with np.errstate(all="ignore"):
        np_sum, np_mean = float(np.sum(arr)), float(np.mean(arr))
        np_var = float(np.var(arr, ddof=1)) if len(arr) > 1 else math.nan
    _, total, lo, hi, mean, var, _ = got
    assert_value(
        total,
        Fraction(np_sum) if math.isfinite(np_sum) else np_sum,
        e.sum_tol,
        f"{what} sum vs numpy",
    )
    assert_value(
        mean,
        Fraction(np_mean) if math.isfinite(np_mean) else np_mean,
        e.mean_tol,
        f"{what} mean vs numpy",
    )
    if not math.isnan(np.min(arr)):
        assert (lo, hi) == (float(np.min(arr)), float(np.max(arr))), what
    m2_bound = isinstance(e.var, Fraction) and e.var * (len(arr) - 1) < DBL_MAX_EXACT / 2
    # numpy's mean is off by up to ~n ulps of the data, which its squares carry along: for
    # large enough data the square of that error alone overflows (var inf for equal values).
    biggest = max((Fraction(abs(float(x))) for x in finite), default=Fraction(0))
    slack = (Fraction(1, 10**14) * len(arr) * biggest) ** 2
    if (m2_bound and len(arr) * slack < DBL_MAX_EXACT / 2) or not isinstance(e.var, Fraction):
        want = Fraction(np_var) if math.isfinite(np_var) else np_var
        assert_value(var, want, e.var_tol + slack, f"{what} var vs numpy")


def outcome(value: float) -> str:
    """The inf/NaN-ness of a result, which no order of adds and merges may change."""
    return "nan" if math.isnan(value) else ("finite" if math.isfinite(value) else str(value))


def assert_same_outcomes(results: list[tuple[Any, ...]], values: list[float]) -> None:
    e = expected_stats(values)
    columns = ((1, e.sum, e.sum_tol), (4, e.mean, e.mean_tol), (5, e.var, e.var_tol))
    for column, exact, tol in columns:
        if near_overflow(exact, tol):
            continue  # rounding decides there, in numpy as much as here
        assert len({outcome(r[column]) for r in results}) == 1, [r[column] for r in results]


# -- the partial itself: fold and merge in any order -------------------------------------


def _merge_tree(partials: list[bytes], order: list[int]) -> bytes:
    """Merge neighbours in the order given (an arbitrary binary tree over the partials)."""
    work = list(partials)
    for i in order:
        if len(work) < 2:
            break
        i %= len(work) - 1
        work[i : i + 2] = [_core._moments_merge(work[i], work[i + 1])]
    while len(work) > 1:
        work[0:2] = [_core._moments_merge(work[0], work[1])]
    return work[0]


@settings(max_examples=300)
@given(
    values=value_lists,
    cuts=st.lists(st.integers(0, 16), max_size=5),
    order=st.lists(st.integers(0, 10), max_size=5),
    permutation=st.randoms(use_true_random=False),
)
def test_partial_fold_and_merge_match_numpy_in_any_order(
    values: list[float], cuts: list[int], order: list[int], permutation: Any
) -> None:
    shuffled = list(values)
    permutation.shuffle(shuffled)
    results = []
    for data in (values, values[::-1], shuffled):
        whole = _core._moments_stats(_core._moments_of(np.array(data)))
        bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
        parts = [_core._moments_of(np.array(data[a:b])) for a, b in itertools.pairwise(bounds)]
        merged = _core._moments_stats(_merge_tree(parts, order))
        assert_stats(whole, values, "fold")
        assert_stats(merged, values, "merge")
        results += [whole, merged]
    assert_same_outcomes(results, values)


@pytest.mark.parametrize(
    ("values", "mean", "total"),
    [
        ([INF, 1.0], INF, INF),
        ([1.0, INF, 2.0], INF, INF),
        ([1e308, -1e308], 0.0, 0.0),
        ([-1e308, 1e308, 1e308], 1e308 / 3, 1e308),  # the running sum overflows part way
        ([INF, -INF, 1.0], math.nan, math.nan),
        ([DBL_MAX, DBL_MAX], DBL_MAX, INF),
    ],
)
def test_issue_examples_on_every_path(
    values: list[float], mean: float, total: float, tmp_path: Path
) -> None:
    def check(stats: tuple[Any, ...], what: str) -> None:
        assert stats[1] == pytest.approx(total, nan_ok=True), what
        assert stats[4] == pytest.approx(mean, nan_ok=True), what

    for data in (values, values[::-1]):
        check(_core._moments_stats(_core._moments_of(np.array(data))), "fold")
        one_each = [_core._moments_of(np.array([v])) for v in data]
        check(_core._moments_stats(_merge_tree(one_each, [])), "merge")
        store = ss.NumericAggregateStore(len(data))
        for pid, v in enumerate(data):
            store.partition(pid).fold(np.array([7]), np.array([v]))
            store.partition(pid).publish()
        check(store._result_tuple(7), "store")  # type: ignore[arg-type]
        with SpillingAggregator(None, spill_dir=tmp_path) as agg:
            agg.accumulate_batch(np.full(len(data), 7), np.array(data))
            cols = agg.drain()
        check(
            tuple(cols[c][0] for c in ("count", "sum", "min", "max", "mean", "var", "std")), "spill"
        )


# -- NumericAggregateStore: fold, publish, results, snapshot ------------------------------


@st.composite
def grouped_rows(draw: st.DrawFn, with_nan: bool = True) -> list[tuple[int, float]]:
    value = st.one_of(extreme_floats, st.just(math.nan)) if with_nan else extreme_floats
    return draw(st.lists(st.tuples(st.integers(0, 3), value), min_size=1, max_size=40))


def expected_groups(rows: list[tuple[int, float]], nan_policy: str) -> dict[int, list[float]]:
    groups: dict[int, list[float]] = {}
    for k, v in rows:
        if nan_policy == "skip" and math.isnan(v):
            continue
        groups.setdefault(k, []).append(v)
    return groups


def _key(k: int, key_type: str) -> Any:
    return k if key_type == "int64" else f"k{k}".encode()


def _columns_by_key(cols: dict[str, Any], key_type: str) -> dict[int, tuple[Any, ...]]:
    keys = cols["key"]
    out = {}
    for i, k in enumerate(keys):
        key = int(k) if key_type == "int64" else int(k[1:])
        out[key] = tuple(cols[c][i] for c in ("count", "sum", "min", "max", "mean", "var", "std"))
    return out


@settings(max_examples=150)
@given(
    rows=grouped_rows(),
    owners=st.lists(st.integers(0, 2), min_size=40, max_size=40),
    publish_after=st.lists(st.booleans(), min_size=40, max_size=40),
    key_type=st.sampled_from(["int64", "bytes"]),
    nan_policy=st.sampled_from(["skip", "propagate"]),
)
def test_numeric_store_matches_numpy(
    rows: list[tuple[int, float]],
    owners: list[int],
    publish_after: list[bool],
    key_type: str,
    nan_policy: str,
) -> None:
    store = ss.NumericAggregateStore(3, key_type=key_type, nan_policy=nan_policy)  # type: ignore[arg-type]
    # One row a batch, folded by the partition `owners` picks, published now and then: the
    # shared map merges the partitions' partials, each in the order its rows came.
    for i, (k, v) in enumerate(rows):
        part = store.partition(owners[i])
        part.fold([_key(k, key_type)] if key_type == "bytes" else np.array([k]), np.array([v]))
        if publish_after[i]:
            part.publish()
    for pid in range(3):
        store.partition(pid).publish()
    groups = expected_groups(rows, nan_policy)
    got = _columns_by_key(store.results(), key_type)
    assert sorted(got) == sorted(groups)
    for k, values in groups.items():
        assert_stats(got[k], values, f"results key {k}")
        assert_stats(store._result_tuple(_key(k, key_type)), values, f"result key {k}")  # type: ignore[arg-type]
    # The scaled representation survives a snapshot, and a restored store keeps folding.
    restored = ss.NumericAggregateStore(3, key_type=key_type, nan_policy=nan_policy)  # type: ignore[arg-type]
    restored.restore(store.snapshot())
    again = _columns_by_key(restored.results(), key_type)
    for k in groups:
        np.testing.assert_array_equal(np.array(again[k]), np.array(got[k]))


@settings(max_examples=100)
@given(rows=grouped_rows(with_nan=False), batch=st.integers(1, 40))
def test_batched_folds_match_numpy(rows: list[tuple[int, float]], batch: int) -> None:
    """Many rows a batch, one partition: the fast add path on its own."""
    store = ss.NumericAggregateStore(1)
    part = store.partition(0)
    keys = np.array([k for k, _ in rows])
    values = np.array([v for _, v in rows])
    for lo in range(0, len(rows), batch):
        part.fold(keys[lo : lo + batch], values[lo : lo + batch])
    part.publish()
    got = _columns_by_key(store.results(), "int64")
    for k, group in expected_groups(rows, "skip").items():
        assert_stats(got[k], group, f"key {k}")


def test_scatter_path_handles_extremes() -> None:
    """Past ~400K keys big batches are folded shard by shard: same answers there."""
    rng = np.random.default_rng(3)
    store = ss.NumericAggregateStore(1)
    part = store.partition(0)
    filler = np.arange(1_000, 401_000)
    part.fold(filler, np.ones(len(filler)))
    groups = {
        0: [INF, 1.0],
        1: [1.0, INF, 2.0],
        2: [1e308, -1e308],
        3: [-1e308, 1e308, 1e308],
        4: [5e-324, 1e-323, -5e-324],
        5: [DBL_MAX, -DBL_MAX, 2.0**400, 1.0],
    }
    keys = np.concatenate([filler, np.repeat(list(groups), [len(v) for v in groups.values()])])
    values = np.concatenate([np.zeros(len(filler)), np.concatenate(list(groups.values()))])
    order = rng.permutation(len(keys))
    part.fold(keys[order], values[order])
    part.publish()
    for k, group in groups.items():
        assert_stats(store._result_tuple(k), group, f"key {k}")  # type: ignore[arg-type]


# -- SpillingAggregator: spilled partials merged back ------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    rows=grouped_rows(),
    key_type=st.sampled_from(["int64", "bytes"]),
    nan_policy=st.sampled_from(["skip", "propagate"]),
    threads=st.sampled_from([1, 2]),
)
def test_spilling_aggregator_matches_numpy(
    rows: list[tuple[int, float]], key_type: str, nan_policy: str, threads: int
) -> None:
    # 20K filler keys a batch overflow a 64 KiB limit, so each group's partial is spilled
    # and merged back from its file (as a singleton or a full partial) at drain.
    filler = list(range(100, 20_100))
    with SpillingAggregator(
        64 * KiB,
        key_type=key_type,
        nan_policy=nan_policy,
        threads=threads,  # type: ignore[arg-type]
    ) as agg:
        for lo in range(0, len(rows), 5):
            chunk = rows[lo : lo + 5]
            ks = [k for k, _ in chunk] + filler
            vs = np.array([v for _, v in chunk] + [1.0] * len(filler))
            agg.accumulate_batch(
                np.array(ks) if key_type == "int64" else [_key(k, key_type) for k in ks], vs
            )
        cols = agg.drain()
        assert agg.spill_count > 0
    got = _columns_by_key(cols, key_type)
    for k, values in expected_groups(rows, nan_policy).items():
        assert_stats(got[k], values, f"key {k}")


# -- the encoding -------------------------------------------------------------------------


def _encoded(
    count: int, total: float, lo: float, hi: float, shift: float, dsum: float, dsq: float
) -> bytes:
    return struct.pack("<Q6d", count, total, lo, hi, shift, dsum, dsq)


def test_partials_encoded_in_plain_units_still_decode() -> None:
    # Before huge values were scaled, [2^401, 2^401 + 2^349] was encoded as it was summed.
    big, step = 2.0**401, 2.0**349
    legacy = _encoded(2, 2 * big + step, big, big + step, big, step, step * step)
    count, total, lo, hi, mean, var, _ = _core._moments_stats(legacy)
    assert (count, total, lo, hi) == (2, 2 * big + step, big, big + step)
    assert mean == big + step / 2
    assert var == pytest.approx(step * step / 2, rel=1e-15)
    # And it merges with a partial of today's encoding.
    merged = _core._moments_stats(_core._moments_merge(legacy, _core._moments_of(np.array([big]))))
    assert_stats(merged, [big, big + step, big])


def test_scaled_flag_on_an_ordinary_partial_is_corrupt() -> None:
    flagged = _encoded(2**63 | 2, 3.0, 1.0, 2.0, 1.0, 1.0, 1.0)
    with pytest.raises(CorruptDataError, match="scaled"):
        _core._moments_stats(flagged)
    # The flag is set only where it belongs, and round-trips through the encoding.
    huge = _core._moments_of(np.array([1e300, -1e300]))
    assert struct.unpack_from("<Q", huge)[0] >> 63 == 1
    assert struct.unpack_from("<Q", _core._moments_of(np.array([1.0, 2.0])))[0] >> 63 == 0
    assert_stats(_core._moments_stats(huge), [1e300, -1e300])
