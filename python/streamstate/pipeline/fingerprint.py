"""The job fingerprint: what a checkpoint's state means, recorded in every checkpoint.

State folded by one job definition is meaningless to another: per-key sums of ``amount``
grouped by ``user`` must not be resumed as sums of ``price`` grouped by ``shop``. Every
pipeline checkpoint therefore carries the definition that produced it in a small JSON
artifact of its own (the :class:`JobRecord`), and a pipeline refuses to resume from a
checkpoint whose definition differs from its own in anything that changes the meaning of
the state. The partition count is deliberately not part of it: partitions only decide which
thread folds a key.

The fingerprint also names each job's default checkpoint location, so two jobs that were
given no store never share one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import IncompatibleCheckpointError
from ..storage import default_store_path

__all__ = ["FINGERPRINT_OPERATOR", "JobFingerprint", "JobRecord", "key_types_compatible"]

#: The operator under which every pipeline checkpoint stores its job record (partition 0).
FINGERPRINT_OPERATOR = "job"

# Bumped only if the meaning of an existing field changes. New fingerprint fields (the
# windowing, when it exists) need no bump: a field a checkpoint lacks compares as None.
_FORMAT = 1
# NumericAggregateStore's own limit.
_MAX_PARTITIONS = 65536


def key_types_compatible(recorded: str, current: str) -> bool:
    """Whether state recorded under key type ``recorded`` means the same under ``current``.

    ``"str"`` and ``"bytes"`` stores hold the same state (byte-string keys, str as UTF-8)
    and differ only in how results hand keys back; pipelines before str keys recorded text
    keys as ``"bytes"``, and those checkpoints resume as ``"str"`` jobs.
    """
    return recorded == current or {recorded, current} == {"str", "bytes"}


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class JobFingerprint:
    """The parts of a pipeline's definition that give its state its meaning.

    ``key_type`` is None while it is still to be inferred from the source's keys. ``values``
    is kept sorted: the state of each value column is stored under its name, so their order
    does not matter.
    """

    source: str
    key: str
    values: tuple[str, ...]
    key_type: str | None
    nan_policy: str

    @classmethod
    def of(
        cls, source: str, key: str, values: Sequence[str], key_type: str | None, nan_policy: str
    ) -> JobFingerprint:
        """The fingerprint of one definition (``values`` in any order)."""
        return cls(source, key, tuple(sorted(values)), key_type, nan_policy)

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON values (``values`` a list)."""
        document = asdict(self)
        document["values"] = list(self.values)
        return document

    def digest(self) -> str:
        """A short hex digest of the canonical JSON form: equal definitions, equal digests."""
        return hashlib.sha256(_canonical(self.as_dict())).hexdigest()[:16]

    def default_location(self) -> Path:
        """Where this job checkpoints when given no store: one directory per definition,
        ``<default store path>/pipelines/<source>-<digest>``."""
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", self.source)[:48].strip("._") or "job"
        return default_store_path() / "pipelines" / f"{readable}-{self.digest()}"

    def differences(self, recorded: Mapping[str, Any]) -> tuple[str, ...]:
        """One ``"field: checkpoint has X, this job has Y"`` line per field in which a
        recorded fingerprint differs. An unresolved ``key_type`` (None) on either side
        matches any key type, and ``"str"`` matches ``"bytes"`` (see
        :func:`key_types_compatible`); a field this version does not know is a difference unless
        the checkpoint left it empty."""
        ours = self.as_dict()
        lines = []
        for name in sorted(set(ours) | set(recorded)):
            theirs, mine = recorded.get(name), ours.get(name)
            if name == "key_type" and (
                theirs is None
                or mine is None
                or key_types_compatible(str(theirs), str(mine))
            ):
                continue
            if theirs != mine:
                lines.append(f"{name}: checkpoint has {theirs!r}, this job has {mine!r}")
        return tuple(lines)

    def check_compatible(self, recorded: Mapping[str, Any], where: str) -> None:
        """Raise :class:`~streamstate.IncompatibleCheckpointError` naming every field in
        which ``recorded`` (the fingerprint stored in checkpoint ``where``) differs."""
        differences = self.differences(recorded)
        if differences:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} was written by a different job ("
                + "; ".join(differences)
                + "); resume it with the same definition, or give this job its own store",
                differences,
            )


def _is_key_groups(value: object, partitions: int) -> bool:
    """Whether a record's ``key_groups`` is a valid count for ``partitions``."""
    return type(value) is int and partitions <= value <= _MAX_PARTITIONS


@dataclass(frozen=True)
class JobRecord:
    """The job artifact of one checkpoint: the fingerprint, and how the state is laid out.

    ``store_partitions`` is the partition count of the stores the snapshots came from. A
    job resumed with another partition count rescales: each key ends up held by the
    partition it routes to now. ``key_groups`` is the store's key groups (fixed for the
    life of the job), None in records written before key groups: such snapshots are not
    sectioned, and restore into a store of ``store_partitions`` that is then rescaled
    (``NumericAggregateStore.repartitioned``); sectioned ones restore straight into the
    new partitions (``NumericAggregateStore.restore_from``) when no delta follows them.
    """

    fingerprint: Mapping[str, Any]
    store_partitions: int
    key_groups: int | None = None

    @staticmethod
    def encode(
        fingerprint: JobFingerprint, store_partitions: int, key_groups: int | None = None
    ) -> bytes:
        """The artifact's bytes: canonical JSON."""
        layout: dict[str, int] = {"store_partitions": store_partitions}
        if key_groups is not None:
            layout["key_groups"] = key_groups
        return _canonical({"format": _FORMAT, "job": fingerprint.as_dict(), "layout": layout})

    @classmethod
    def decode(cls, data: bytes, where: str) -> JobRecord:
        """Parse the artifact stored in checkpoint ``where``; anything that is not one
        raises :class:`~streamstate.IncompatibleCheckpointError`."""
        not_ours = IncompatibleCheckpointError(
            f"checkpoint {where}: its {FINGERPRINT_OPERATOR!r} artifact is not a pipeline's "
            "job record, so the checkpoint was written by something other than a pipeline"
        )
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise not_ours from None
        if not isinstance(document, dict):
            raise not_ours
        version = document.get("format")
        if isinstance(version, bool) or not isinstance(version, int):
            raise not_ours
        if version > _FORMAT:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} has a job record of format {version}; this version of "
                f"streamstate reads format {_FORMAT} or older"
            )
        job, layout = document.get("job"), document.get("layout")
        partitions = layout.get("store_partitions") if isinstance(layout, dict) else None
        groups = layout.get("key_groups") if isinstance(layout, dict) else None
        if (
            not isinstance(job, dict)
            or isinstance(partitions, bool)
            or not isinstance(partitions, int)
            or not 1 <= partitions <= _MAX_PARTITIONS
            or not (groups is None or _is_key_groups(groups, partitions))
        ):
            raise not_ours
        return cls(job, partitions, groups)
