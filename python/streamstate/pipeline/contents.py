"""How a pipeline lays its state out in a checkpoint, and the checks before resuming one.

A pipeline checkpoint holds exactly two artifacts, both as partition 0: under
``"aggregates"`` the snapshot of the one store holding every value column, and under
``"job"`` the :class:`~streamstate.pipeline.JobRecord`. In an incremental checkpoint the
``"aggregates"`` artifact is a delta (``is_delta``) holding the store's ``snapshot_delta()``
instead, applied by the store itself on recovery. The snapshot is either an LCB1 batch
packing it under :data:`STORE_ENTRY` (LZ4-compressed: small or redundant state), or, when
LZ4 would not halve it, the store's own record container (magic ``SSRC``, CRC-checked) as
it was captured: a stored LCB1 batch around it would add nothing but a copy and a second
CRC pass over tens of MB, on the two cores the partitions fold on. Checkpoints written before one store held every
column pack one one-column store's snapshot (or delta) per value column, named after the
column; they are still read (the pipeline joins them into one store). Read a
pipeline's checkpoints with ``ObjectStoreCheckpointer.recover(rebuild=False)`` (the default
rebuild applies record deltas, cannot apply these, and would fall back to the chain's
full checkpoint). The source
offsets hold one entry, the job's source. Anything else was written by something other
than this job's pipeline and is refused with
:class:`~streamstate.IncompatibleCheckpointError` rather than half-read.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from .._typing import BytesLike, byte_view
from ..batcher import auto_compression, decode_batch, encode_batch, encode_batch_into
from ..checkpoint import ObjectStoreCheckpointer, RecoveredCheckpoint, verify_integrity
from ..errors import CheckpointError, CorruptDataError, IncompatibleCheckpointError, SourceError
from .fingerprint import FINGERPRINT_OPERATOR, JobFingerprint, JobRecord
from .sources import Offset, plain_offset, shard_positions

__all__ = [
    "STATE_OPERATOR",
    "STORE_ENTRY",
    "check_layout",
    "check_newest",
    "pack_state",
    "packed_entries",
    "state_chain_bytes",
    "unpack_state",
]

#: The operator under which a pipeline checkpoints its packed store snapshots.
STATE_OPERATOR = "aggregates"
#: The packed entry of the one store holding every value column (a NUL-led name, which
#: no source column is given: older checkpoints name their entries after the columns).
STORE_ENTRY = "\x00store"
#: How every store snapshot (the project's record container) begins; never an LCB1 batch's.
_RECORD_MAGIC = b"SSRC"


def pack_state(
    snapshots: Iterable[tuple[str, BytesLike]],
    record: bytes,
    is_delta: bool = False,
    out: bytearray | None = None,
) -> list[tuple[str, int, bool, BytesLike]]:
    """The items to commit for ``(entry, store snapshot)`` pairs (``STORE_ENTRY`` and the
    store's snapshot) and a job record; ``is_delta`` when the snapshots are deltas.

    Large float partials barely compress (LZ4 saved ~21% on a 1M-key snapshot), and on two
    cores shared with the folding partitions the match search cost more than hashing and
    writing those bytes. So when ``"auto"`` compression would store the body, the one
    store's snapshot is the state item's data itself, uncopied (see the module notes; the
    caller must not change it until the commit landed). Otherwise the snapshots are packed
    into an LCB1 batch; with ``out`` it is written into that buffer (reused across
    checkpoints, so its pages are mapped already) and that is the state item's data.
    """
    entries = list(snapshots)
    packed: BytesLike
    if (
        len(entries) == 1
        and entries[0][0] == STORE_ENTRY
        and byte_view(entries[0][1])[:4] == _RECORD_MAGIC
        and auto_compression(entries) == "stored"
    ):
        packed = entries[0][1]
    elif out is None:
        packed = encode_batch(entries, compression="auto")
    else:
        encode_batch_into(entries, out, compression="auto")
        packed = out
    return [
        (STATE_OPERATOR, 0, is_delta, packed),
        (FINGERPRINT_OPERATOR, 0, False, record),
    ]


def check_layout(
    fingerprint: JobFingerprint,
    where: str,
    partitions: Mapping[str, Collection[int]],
    offsets: Mapping[str, Any],
    record: bytes | None,
    start_offset: Offset = None,
) -> tuple[JobRecord | None, Offset]:
    """Check that checkpoint ``where`` (its partition ids per operator, its source offsets
    and its job record's bytes) belongs to the job ``fingerprint`` describes; return the
    parsed record (None for a checkpoint written before records existed) and the offset.
    The offset must be of the JSON kind of the source's ``start_offset`` (an int for an
    int, a dict for a dict, ...) when one is given: a source reads only its own offsets."""
    operators = set(partitions)
    if STATE_OPERATOR not in operators or operators - {STATE_OPERATOR, FINGERPRINT_OPERATOR}:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} holds operators {sorted(operators)}; a pipeline's checkpoint "
            f"holds {STATE_OPERATOR!r} and {FINGERPRINT_OPERATOR!r}, so this one was written "
            "by something else"
        )
    for operator, ids in partitions.items():
        if list(ids) != [0]:  # refused rather than silently dropping partitions
            raise IncompatibleCheckpointError(
                f"checkpoint {where} holds {len(ids)} partitions under operator {operator!r} "
                f"(ids {sorted(ids)}); a pipeline writes exactly one (partition 0), so it was "
                "written by something else"
            )
    job: JobRecord | None = None
    if FINGERPRINT_OPERATOR in operators:
        job = JobRecord.decode(record if record is not None else b"", where)
        fingerprint.check_compatible(job.fingerprint, where)
    # else: written before checkpoints carried a record; the state's shape decides.
    name = fingerprint.source
    if set(offsets) != {name}:
        raise IncompatibleCheckpointError(
            f"checkpoint {where} records offsets for sources {sorted(offsets)}, not (only) "
            f"for this job's source {name!r}"
        )
    offset = offsets[name]
    try:
        plain = plain_offset(offset, "the recorded offset", name)
    except SourceError:
        plain = None
    if (
        plain != offset
        or (isinstance(offset, int) and offset < 0)
        or (
            start_offset is not None
            and type(offset) is not type(start_offset)
            and shard_positions(offset) is None  # several shards' offsets: the source reads them
        )
    ):
        raise IncompatibleCheckpointError(
            f"checkpoint {where}: the offset of source {name!r} is {offset!r}, not a source "
            "offset (an int >= 0, or a JSON value of ints, strs, lists and dicts)"
        )
    return job, offset


def check_newest(
    checkpointer: ObjectStoreCheckpointer, fingerprint: JobFingerprint, start_offset: Offset = None
) -> None:
    """Refuse a foreign newest checkpoint from its manifest and small job record alone,
    before any of its state is downloaded. Damage is left to recovery, which falls back to
    an older checkpoint (and :func:`unpack_state` checks whichever it chose)."""
    try:
        ids = checkpointer.list_checkpoints()
        if not ids:
            return
        manifest = checkpointer.load_manifest(ids[-1])
        job = manifest.operators.get(FINGERPRINT_OPERATOR)
        record = None
        if job is not None and len(job.partitions) == 1:
            entry = job.partitions[0]
            record = checkpointer.load_artifact(entry.path)
            verify_integrity(entry.path, record, entry.sha256)
    except (CheckpointError, CorruptDataError, FileNotFoundError):
        return
    partitions = {
        operator: [p.partition_id for p in entry.partitions]
        for operator, entry in manifest.operators.items()
    }
    where = str(manifest.checkpoint_id)
    check_layout(fingerprint, where, partitions, manifest.source_offsets, record, start_offset)


def packed_entries(packed: bytes) -> list[tuple[str, bytes]]:
    """The (name, blob) entries of one packed ``"aggregates"`` artifact, which is an LCB1
    batch or a bare store snapshot (see :func:`pack_state`; a bare one is checked by the
    store that restores it). Raises ``CorruptDataError`` for anything else."""
    return [(STORE_ENTRY, packed)] if packed[:4] == _RECORD_MAGIC else decode_batch(packed)


def _unpack(
    packed: bytes, where: str, what: str, values: Collection[str], layout: set[str] | None
) -> dict[str, bytes]:
    """The blobs of one packed ``"aggregates"`` artifact, after checking that it holds the
    one store (``STORE_ENTRY``) or, in the older layout, exactly the columns ``values``;
    and, when ``layout`` is given, that it holds the same entries (a chain keeps one)."""
    try:
        entries = packed_entries(packed)
    except CorruptDataError as exc:
        raise IncompatibleCheckpointError(
            f"checkpoint {where}: its {STATE_OPERATOR!r} {what} is not a pipeline's packed "
            f"store state ({exc})"
        ) from exc
    blobs = dict(entries)
    names = set(blobs)
    if len(blobs) != len(entries) or names not in ({STORE_ENTRY}, set(values)):
        raise IncompatibleCheckpointError(
            f"checkpoint {where} holds state for {sorted(n for n, _ in entries)} in its "
            f"{what}; this job aggregates {sorted(values)}"
        )
    if layout is not None and names != layout:
        raise IncompatibleCheckpointError(
            f"checkpoint {where}: its {what} holds {sorted(names)}, its snapshot "
            f"{sorted(layout)}; a chain keeps one layout"
        )
    return blobs


def unpack_state(
    recovered: RecoveredCheckpoint, fingerprint: JobFingerprint, start_offset: Offset = None
) -> tuple[JobRecord | None, Offset, dict[str, bytes], list[dict[str, bytes]]]:
    """Check a recovered checkpoint's layout and definition; return its job record, the
    source offset, the full store snapshot (under ``STORE_ENTRY``, or in the older layout
    one per value column), and (for a checkpoint recovered with ``rebuild=False`` at the
    end of a delta chain) the deltas to apply to it, oldest first, keyed alike.
    ``start_offset`` as for :func:`check_layout`."""
    where = str(recovered.checkpoint_id)
    state = recovered.state
    record_bytes = state.get(FINGERPRINT_OPERATOR, {}).get(0)
    record, offset = check_layout(
        fingerprint, where, state, recovered.source_offsets, record_bytes, start_offset
    )
    values = fingerprint.values
    snapshots = _unpack(state[STATE_OPERATOR][0], where, "snapshot", values, None)
    chain = recovered.deltas.get(STATE_OPERATOR, {}).get(0, ())
    deltas = [
        _unpack(delta, where, f"delta {i} of {len(chain)}", values, set(snapshots))
        for i, delta in enumerate(chain, 1)
    ]
    return record, offset, snapshots, deltas


def state_chain_bytes(recovered: RecoveredCheckpoint) -> tuple[int, list[int]]:
    """The bytes of a recovered (``rebuild=False``) checkpoint's state chain: its full
    snapshot's artifact, and each delta artifact after it."""
    chain = recovered.deltas.get(STATE_OPERATOR, {}).get(0, ())
    return len(recovered.state[STATE_OPERATOR][0]), [len(delta) for delta in chain]
