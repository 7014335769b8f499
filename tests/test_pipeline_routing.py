"""Routing keys to partitions: stable, fair, independent of batch shape and string width."""

from __future__ import annotations

import numpy as np
import pytest

from streamstate.pipeline import route_partitions


def test_route_partitions_is_stable_and_in_range() -> None:
    keys = np.arange(10_000, dtype=np.int64)
    parts = route_partitions(keys, 4)
    assert parts.min() == 0 and parts.max() == 3
    # Every partition gets a fair share (a broken mixer would pile keys into one).
    assert np.bincount(parts, minlength=4).min() > 2000
    np.testing.assert_array_equal(parts, route_partitions(keys.copy(), 4))
    # A key routes the same whether it arrives alone or in a batch.
    assert all(route_partitions(keys[i : i + 1], 4)[0] == parts[i] for i in range(0, 10_000, 997))


def test_route_partitions_for_strings_ignores_padding_width() -> None:
    short = np.array([b"a", b"bb"], dtype="S2")
    wide = np.array([b"a", b"bb"], dtype="S9")
    np.testing.assert_array_equal(route_partitions(short, 7), route_partitions(wide, 7))
    as_str = np.array(["a", "bb"], dtype=object)
    np.testing.assert_array_equal(route_partitions(as_str, 7), route_partitions(short, 7))
    with pytest.raises(ValueError):
        route_partitions(short, 0)
