"""A pipeline's key type: text keys are "str" (results, pandas, Arrow and Polars give str),
byte keys "bytes", and checkpoints that older versions recorded as "bytes" for text keys
still resume."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import MemoryStore

from streamstate import IncompatibleCheckpointError, SourceError
from streamstate.pipeline import ArraySource, JobFingerprint, Pipeline
from streamstate.pipeline.fingerprint import key_types_compatible

polars = pytest.importorskip("polars")

TEXT = ["apple", "pear", "apple", "fig", "pear", "apple"]


def _counts(pipe: Pipeline) -> dict[Any, int]:
    results = pipe.results("v")
    return dict(zip(list(results["key"]), results["count"].tolist(), strict=True))


@pytest.mark.parametrize(
    "keys",
    [
        np.array(TEXT),  # numpy U
        TEXT,  # a list of str (an object array)
        np.array(TEXT, dtype=object),
        pa.array(TEXT),  # Arrow string
        pa.array(TEXT, pa.large_string()),
    ],
    ids=["numpy-U", "list", "object", "arrow-string", "arrow-large-string"],
)
def test_text_keys_are_str_everywhere(keys: Any) -> None:
    pipe = Pipeline(ArraySource("e", {"k": keys, "v": np.arange(6.0)}), key="k", values="v",
                    store=MemoryStore(), batch_size=4)
    pipe.run()
    assert pipe.key_type == "str"
    assert _counts(pipe) == {"apple": 3, "pear": 2, "fig": 1}
    assert pipe.fingerprint.key_type == "str"
    table = pipe.to_arrow()
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("count").type == pa.int64()
    assert dict(zip(table["key"].to_pylist(), table["count"].to_pylist(), strict=True)) == {
        "apple": 3, "pear": 2, "fig": 1}
    frame = pipe.to_pandas("v")
    assert sorted(frame.index) == ["apple", "fig", "pear"]
    assert frame.loc["apple", "sum"] == 0.0 + 2.0 + 5.0
    assert pipe.to_polars()["key"].dtype == polars.String


@pytest.mark.parametrize(
    "keys",
    [np.array([k.encode() for k in TEXT]), [k.encode() for k in TEXT],
     pa.array([k.encode() for k in TEXT], pa.binary())],
    ids=["numpy-S", "list", "arrow-binary"],
)
def test_byte_keys_stay_bytes(keys: Any) -> None:
    pipe = Pipeline(ArraySource("e", {"k": keys, "v": np.ones(6)}), key="k", values="v",
                    store=MemoryStore())
    pipe.run()
    assert pipe.key_type == "bytes"
    assert _counts(pipe) == {b"apple": 3, b"pear": 2, b"fig": 1}
    assert pipe.to_arrow().schema.field("key").type == pa.binary()
    assert pipe.to_polars()["key"].dtype == polars.Binary


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(st.characters(codec="utf-8"), max_size=6), min_size=1, max_size=60),
       st.integers(1, 3))
def test_any_text_keys_count_like_a_counter(keys: list[str], partitions: int) -> None:
    source = ArraySource("e", {"k": np.array(keys, dtype=object), "v": np.ones(len(keys))})
    pipe = Pipeline(source, key="k", values="v", partitions=partitions, store=MemoryStore(),
                    batch_size=7)
    pipe.run()
    assert _counts(pipe) == dict(Counter(keys))


def test_a_checkpoint_recorded_as_bytes_for_text_keys_resumes_as_str() -> None:
    # What versions before str keys wrote: text keys folded by a "bytes" job.
    store = MemoryStore()
    keys = np.array(TEXT * 50)
    common: dict[str, Any] = {"key": "k", "values": "v", "store": store, "batch_size": 40,
                              "checkpoint_every": 2}
    source = ArraySource("e", {"k": keys, "v": np.ones(len(keys))})
    old = Pipeline(source, key_type="bytes", **common)
    old.run(max_batches=5)  # a crash after the checkpoint at offset 160
    assert old.key_type == "bytes" and old.committed_offset == 160
    assert set(_counts(old)) <= {b"apple", b"pear", b"fig"}

    resumed = Pipeline(source, **common)
    report = resumed.run()
    assert report.recovered_epoch == 2 and report.start_offset == 160
    assert resumed.key_type == "str"
    assert _counts(resumed) == {"apple": 150, "pear": 100, "fig": 50}
    assert resumed.to_arrow().schema.field("key").type == pa.string()

    # A job that names "str" resumes it too (the fingerprint check lets it through).
    named = Pipeline(source, key_type="str", **common)
    assert named.run().recovered_epoch is not None
    assert _counts(named) == {"apple": 150, "pear": 100, "fig": 50}


def test_an_int64_checkpoint_is_still_refused_to_a_str_job() -> None:
    store = MemoryStore()
    Pipeline(ArraySource("e", {"k": np.arange(10), "v": np.ones(10)}), key="k", values="v",
             store=store).run()
    text = ArraySource("e", {"k": np.array(["a"] * 20), "v": np.ones(20)})
    with pytest.raises(IncompatibleCheckpointError, match="key_type"):
        Pipeline(text, key="k", values="v", store=store).run()
    with pytest.raises(IncompatibleCheckpointError, match="key_type"):
        Pipeline(text, key="k", values="v", store=store, key_type="str").run()


def test_a_str_job_refuses_a_batch_of_bytes_and_a_bytes_job_takes_text() -> None:
    mixed = np.array(["a", "b", b"c", b"d"], dtype=object)
    pipe = Pipeline(ArraySource("e", {"k": mixed, "v": np.ones(4)}), key="k", values="v",
                    store=MemoryStore(), batch_size=2)
    with pytest.raises(SourceError, match=r"offset 2 has bytes keys .* keys are str"):
        pipe.run()
    as_bytes = Pipeline(ArraySource("e", {"k": mixed, "v": np.ones(4)}), key="k", values="v",
                        store=MemoryStore(), batch_size=2, key_type="bytes")
    as_bytes.run()
    assert _counts(as_bytes) == {b"a": 1, b"b": 1, b"c": 1, b"d": 1}


def test_str_and_bytes_are_the_only_compatible_pair_of_key_types() -> None:
    assert key_types_compatible("bytes", "str") and key_types_compatible("str", "bytes")
    assert key_types_compatible("int64", "int64")
    assert not key_types_compatible("int64", "str")
    assert not key_types_compatible("bytes", "int64")
    fingerprint = JobFingerprint.of("e", "k", ["v"], "str", "skip")
    recorded = {**fingerprint.as_dict(), "key_type": "bytes"}
    assert fingerprint.differences(recorded) == ()
    assert fingerprint.differences({**recorded, "key_type": "int64"}) == (
        "key_type: checkpoint has 'int64', this job has 'str'",)
