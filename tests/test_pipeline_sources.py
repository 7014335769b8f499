"""The source contract as the pipeline enforces it: offsets that match the rows and move
forward, and unbounded sources that are idle without spinning or checkpointing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from obstore.store import MemoryStore

from streamstate import SourceError
from streamstate.pipeline import ArraySource, Batch, Pipeline


class ScriptedSource:
    """Answers each read with ``script(offset, max_rows)``; counts the reads."""

    def __init__(self, script: Callable[[int, int], Batch | None]) -> None:
        self.script = script
        self.reads = 0

    @property
    def name(self) -> str:
        return "scripted"

    def read(self, offset: int, max_rows: int) -> Batch | None:
        self.reads += 1
        return self.script(offset, max_rows)


def _columns(rows: int, start: int = 0) -> Mapping[str, Any]:
    return {"k": np.arange(start, start + rows) % 4, "v": np.ones(rows)}


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (Batch(_columns(50), 0, 10), r"10 rows by its offsets \(0 to 10\) but column 'k' has 50"),
        (Batch(_columns(10), 5, 15), "starts at offset 5"),
        (Batch(_columns(0), 0, -3), "ends before it starts"),
        (Batch({"k": np.arange(10), "v": np.ones(9)}, 0, 10), "'v' has 9 rows"),
        (Batch(_columns(10), 0.0, 10), "int"),  # type: ignore[arg-type]
    ],
)
def test_a_batch_that_breaks_the_contract_is_refused(batch: Batch, message: str) -> None:
    source = ScriptedSource(lambda offset, _n: batch if offset == 0 else None)
    pipe = Pipeline(source, key="k", values=["v"], store=MemoryStore())
    with pytest.raises(SourceError, match=message):
        pipe.run()
    assert pipe.offset == 0 and not pipe.checkpointer.list_checkpoints()


def test_offsets_must_continue_where_the_previous_batch_ended() -> None:
    inner = ArraySource("inner", _columns(30))

    def script(offset: int, n: int) -> Batch | None:
        if offset == 20:  # replays the first batch instead of the third
            return inner.read(0, n)
        return inner.read(offset, n)

    pipe = Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                    batch_size=10, checkpoint_every=1)
    with pytest.raises(SourceError, match="asked for offset 20"):
        pipe.run(max_batches=50)  # bounded: a pipeline trusting the source loops forever
    recovered = pipe.checkpointer.recover(rebuild=False)  # store deltas: see Pipeline
    assert recovered is not None and recovered.source_offsets == {"scripted": 20}


def test_numpy_integer_offsets_are_accepted() -> None:
    inner = ArraySource("inner", _columns(30))

    def script(offset: int, n: int) -> Batch | None:
        batch = inner.read(offset, n)
        if batch is None:
            return None
        start, end = np.int64(batch.offset), np.int64(batch.next_offset)
        return Batch(batch.columns, start, end)  # type: ignore[arg-type]

    with Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                  batch_size=7) as pipe:
        report = pipe.run()
        assert report.finished and report.events == 30 and pipe.offset == 30
        assert type(pipe.offset) is int
        assert int(pipe.results("v")["count"].sum()) == 30


def test_an_idle_unbounded_source_backs_off_and_writes_no_checkpoints() -> None:
    source = ScriptedSource(lambda offset, _n: Batch(_columns(0), offset, offset))
    pipe = Pipeline(source, key="k", values=["v"], store=MemoryStore(), checkpoint_every=1,
                    max_idle_sleep=0.004)
    report = pipe.run(max_batches=20)
    assert not report.finished and report.batches == 0 and report.empty_batches == 20
    assert report.checkpoints == [] and pipe.checkpointer.list_checkpoints() == []
    # 1 ms, 2 ms, then the 4 ms cap for the remaining 17 empty batches (sleep never wakes early)
    assert report.idle_seconds >= 0.001 + 0.002 + 17 * 0.004
    assert source.reads == 20


def test_empty_batches_between_data_do_not_count_towards_checkpoints() -> None:
    inner = ArraySource("inner", _columns(40))
    polls: dict[int, int] = {}

    def script(offset: int, n: int) -> Batch | None:
        polls[offset] = polls.get(offset, 0) + 1
        if polls[offset] <= 25:  # 25 empty polls before every batch
            return Batch(_columns(0), offset, offset)
        return inner.read(offset, n)

    with Pipeline(ScriptedSource(script), key="k", values=["v"], store=MemoryStore(),
                  batch_size=10, checkpoint_every=2, max_idle_sleep=0.0) as pipe:
        report = pipe.run()
        assert report.finished and report.events == 40
        assert report.batches == 4 and report.empty_batches == 125
        assert [c.offset for c in report.checkpoints] == [20, 40]
        assert int(pipe.results("v")["count"].sum()) == 40


def test_a_run_with_nothing_new_commits_nothing() -> None:
    store = MemoryStore()
    source = ArraySource("events", _columns(25))
    Pipeline(source, key="k", values=["v"], store=store, batch_size=10).run()
    again = Pipeline(source, key="k", values=["v"], store=store, batch_size=10)
    report = again.run()
    assert report.finished and report.events == 0 and report.checkpoints == []
    assert again.epoch == 1
