"""Sources split into shards (no Ray): every row in exactly one shard, shard offsets that
round-trip through JSON, and offsets translated between shard counts exactly or refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamstate import IncompatibleCheckpointError, SourceError
from streamstate.pipeline.sources import (
    ArraySource,
    ParquetSource,
    Source,
    can_shard,
    check_batch,
    shard_offset,
    shard_positions,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _read_all(source: Source, offset: object, max_rows: int) -> tuple[list[int], object]:
    """Every ``row`` value a source reads from ``offset`` to its end, and the end offset
    (each batch checked against the source contract)."""
    rows: list[int] = []
    while (batch := source.read(offset, max_rows)) is not None:
        end = check_batch(batch, source.name, offset, ["row"])
        if end == offset:
            break  # a followed source with nothing new
        rows.extend(np.asarray(batch.columns["row"]).tolist())
        offset = json.loads(json.dumps(end))  # as a manifest hands it back
    return rows, offset


def _rows_read(total: int, count: int, positions: list[int]) -> set[int]:
    """The rows ``count`` array shards at ``positions`` have read."""
    read: set[int] = set()
    for i, position in enumerate(positions):
        read.update(range(i * total // count, position))
    return read


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(0, 300),
    count=st.integers(1, 9),
    max_rows=st.integers(1, 50),
)
def test_array_shards_hold_every_row_exactly_once(total: int, count: int, max_rows: int) -> None:
    source = ArraySource("s", {"row": np.arange(total)})
    assert can_shard(source)
    shards = source.shards(count)
    assert len(shards) == count and sum(len(shard) for shard in shards) == total
    seen: list[int] = []
    for shard in shards:
        rows, end = _read_all(shard, shard.start_offset, max_rows)
        assert rows == sorted(rows)  # a shard reads its rows in order
        seen.extend(rows)
        assert end == shard.start_offset + len(shard)
    assert seen == list(range(total))
    # The shards' offsets round-trip as the whole source's offset.
    ends = [shard.start_offset + len(shard) for shard in shards]
    combined = json.loads(json.dumps(shard_offset(ends)))
    assert source.shard_offsets(combined, count) == ends
    assert (shard_positions(combined) or [combined]) == ends


@settings(max_examples=120, deadline=None)
@given(data=st.data(), total=st.integers(0, 200), old=st.integers(1, 6), new=st.integers(1, 6))
def test_array_offsets_translate_exactly_or_are_refused(
    data: st.DataObject, total: int, old: int, new: int
) -> None:
    source = ArraySource("s", {"row": np.arange(total)})
    positions = [
        data.draw(st.integers(i * total // old, (i + 1) * total // old)) for i in range(old)
    ]
    offset = shard_offset(positions)
    read = _rows_read(total, old, positions)
    # Translatable exactly when the rows read are, in every new shard, a prefix of it.
    bounds = [range(i * total // new, (i + 1) * total // new) for i in range(new)]
    prefixes = all(
        (inside := read & set(rows)) == set(range(rows.start, rows.start + len(inside)))
        for rows in bounds
    )
    try:
        translated = source.shard_offsets(offset, new)
    except IncompatibleCheckpointError as exc:
        assert "cannot continue" in str(exc) and not prefixes
    else:
        assert prefixes
        assert _rows_read(total, new, translated) == read  # no row lost, none twice
    # A plain offset (the driver-routing path's) always translates, to any count.
    plain = data.draw(st.integers(0, total))
    assert _rows_read(total, new, source.shard_offsets(plain, new)) == set(range(plain))


def test_a_whole_array_source_reads_its_shards_offset_when_it_is_a_prefix() -> None:
    source = ArraySource("s", {"row": np.arange(10)})
    done = {"shards": [5, 10]}  # both shards at their end
    assert source.read(done, 4) is None
    prefix = {"shards": [5, 7]}
    assert source.shard_offsets(prefix, 3) == [3, 6, 7]  # shard 0 done, 1 done, 2 at 7
    batch = source.read({"shards": [5, 5]}, 3)  # shard 0 done, shard 1 untouched: row 5
    assert batch is not None and batch.offset == {"shards": [5, 5]} and batch.next_offset == 8
    assert check_batch(batch, "s", {"shards": [5, 5]}, ["row"]) == 8
    with pytest.raises(IncompatibleCheckpointError, match="rows \\[5, 7\\) are read"):
        source.read({"shards": [2, 7]}, 3)
    with pytest.raises(SourceError, match="not one of 2 shard"):
        source.shard_offsets({"shards": [6, 7]}, 2)  # row 6 is not in shard 0
    with pytest.raises(IncompatibleCheckpointError, match="two or more"):
        source.shard_offsets({"shards": [3]}, 2)
    with pytest.raises(ValueError, match=">= 1"):
        source.shards(0)
    with pytest.raises(TypeError, match="int"):
        source.shard_offsets(0, 2.0)  # type: ignore[arg-type]
    shard = source.shards(2)[1]
    assert "shard=5..10" in repr(shard) and shard.start_offset == 5
    with pytest.raises(SourceError, match="shard already"):
        shard.shards(2)


def _write_files(directory: Path, sizes: list[int], first: int = 0) -> int:
    """Parquet files ``part-NNN.parquet`` of consecutive ``row`` values; returns the next."""
    row = first
    for number, size in enumerate(sizes):
        table = pa.table({"row": np.arange(row, row + size), "key": np.arange(size) % 7})
        pq.write_table(table, directory / f"part-{number + first:06d}.parquet", row_group_size=5)
        row += size
    return row


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_parquet_shards_hold_every_row_once_and_follow_new_files(
    count: int, tmp_path: Path
) -> None:
    sizes = [12, 0, 7, 30, 1, 16, 9, 22]
    total = _write_files(tmp_path, sizes)
    source = ParquetSource(tmp_path, "files", follow=True)
    shards = source.shards(count)
    assert sorted(n for shard in shards for n in shard.files()) == source.files()
    seen: list[int] = []
    ends = []
    for shard in shards:
        rows, end = _read_all(shard, shard.start_offset, 8)
        seen.extend(rows)
        ends.append(end)
    assert sorted(seen) == list(range(total)) and len(seen) == total
    # New files arrive: each lands in exactly one shard, read from where it stood.
    more = _write_files(tmp_path, [6, 11, 3], first=100) - 100
    fresh: list[int] = []
    for shard, end in zip(shards, ends, strict=True):
        rows, _ = _read_all(shard, end, 8)
        fresh.extend(rows)
    assert sorted(fresh) == list(range(100, 100 + more))
    if count > 1:
        assert "shard=" in repr(shards[0])


def test_parquet_offsets_translate_between_counts_exactly_or_are_refused(tmp_path: Path) -> None:
    _write_files(tmp_path, [10, 10, 10, 10, 10, 10])
    source = ParquetSource(tmp_path, "files")
    names = source.files()
    # A plain offset (files before part-3 read, 4 rows of it) splits into shard offsets that
    # read exactly those rows.
    plain = {"file": names[3], "row": 4}
    for count in (2, 3, 4):
        positions = source.shard_offsets(plain, count)
        shards = source.shards(count)
        rest = sorted(r for shard, at in zip(shards, positions, strict=True)
                      for r in _read_all(shard, at, 100)[0])
        assert rest == list(range(34, 60)), count
        assert json.loads(json.dumps(shard_offset(positions))) == shard_offset(positions)
        # ...and back: the shards' offset is a prefix, so one reader continues from it.
        assert source.shard_offsets(shard_offset(positions), 1) == [plain] or count == 1
    # Shards that each read their first file are no prefix: one reader cannot continue.
    shards = source.shards(2)
    firsts = [{"file": shard.files()[0], "row": 10} for shard in shards]
    if sorted(f["file"] for f in firsts) != names[:2]:
        with pytest.raises(IncompatibleCheckpointError, match="cannot continue"):
            source.shard_offsets({"shards": firsts}, 1)
    with pytest.raises(SourceError, match="which it is not in"):
        source.shard_offsets({"shards": [firsts[1], firsts[0]]}, 2)
