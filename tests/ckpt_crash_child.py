"""Child process for test_checkpoint_crash.py: commit checkpoints in a loop until killed.

Usage: ``python ckpt_crash_child.py STORE_DIR``. On start it recovers (continuing from the
recovered epoch), then for each epoch prints ``intent E DIGEST`` before committing and
``committed E DIGEST`` once ``commit()`` has returned, then prunes to the last 3. Every
line is flushed before the next step, so the parent knows exactly what was promised.

The state of every epoch is a pure function of the epoch (:func:`state_at`), so a digest
names the content unambiguously. Epochs divisible by 3 are full snapshots; the others are
record deltas against the previous checkpoint, so recovery walks real delta chains.
"""

from __future__ import annotations

import hashlib
import sys

from streamstate.checkpoint import ObjectStoreCheckpointer, encode_delta
from streamstate.codec import decode_records, encode_records

PARTITIONS = 4
KEYS = 500
BLOB_BYTES = 4 << 20  # makes the commit, not preparing its content, most of each epoch


def state_at(epoch: int, partition: int) -> dict[bytes, bytes]:
    """Partition state after ``epoch``: a fifth of the keys change each epoch, one key is
    added per epoch and the one added two epochs ago is deleted."""
    state = {
        b"k%05d" % i: b"%d:%d:%d" % (partition, i, epoch - ((epoch - i) % 5)) for i in range(KEYS)
    }
    for e in (epoch - 1, epoch):
        if e >= 0:
            state[b"e%d" % e] = b"added at %d" % e
    return state


def blob_at(epoch: int) -> bytes:
    seed = hashlib.sha256(b"blob %d" % epoch).digest()
    return (seed * (BLOB_BYTES // len(seed) + 1))[:BLOB_BYTES]


def delta_between(old: dict[bytes, bytes], new: dict[bytes, bytes]) -> bytes:
    changes: list[tuple[bytes, bytes | None]] = [(k, None) for k in old if k not in new]
    changes += [(k, v) for k, v in new.items() if old.get(k) != v]
    return encode_delta(changes)


def digest_of_state(state: dict[str, dict[int, bytes]]) -> str:
    """Content digest, independent of record order: what both processes compare."""
    h = hashlib.sha256()
    for op in sorted(state):
        for partition in sorted(state[op]):
            data = state[op][partition]
            h.update(b"%s/%d\n" % (op.encode(), partition))
            if op == "blob":
                h.update(hashlib.sha256(data).digest())
            else:
                _, records = decode_records(data)
                for key, value in sorted(records):
                    h.update(b"%d:%s=%d:%s;" % (len(key), key, len(value), value))
    return h.hexdigest()


def expected_state(epoch: int) -> dict[str, dict[int, bytes]]:
    return {
        "agg": {
            p: encode_records(0, sorted(state_at(epoch, p).items())) for p in range(PARTITIONS)
        },
        "blob": {0: blob_at(epoch)},
    }


def main() -> int:
    checkpointer = ObjectStoreCheckpointer(sys.argv[1])
    recovered = checkpointer.recover()
    if recovered is None:
        epoch, parent = -1, None
    else:
        epoch, parent = recovered.epoch, recovered.checkpoint_id
        if digest_of_state(recovered.state) != digest_of_state(expected_state(epoch)):
            print(f"mismatch {epoch}", flush=True)
            return 3
        if recovered.source_offsets != {"src": epoch}:
            print(f"offsets-mismatch {epoch}", flush=True)
            return 3
    print(f"ready {epoch}", flush=True)
    while True:
        epoch += 1
        expected = expected_state(epoch)
        snapshots: list[tuple[str, int, bool, bytes]] = []
        for p in range(PARTITIONS):
            if epoch % 3 == 0 or parent is None:
                snapshots.append(("agg", p, False, expected["agg"][p]))
            else:
                delta = delta_between(state_at(epoch - 1, p), state_at(epoch, p))
                snapshots.append(("agg", p, True, delta))
        snapshots.append(("blob", 0, False, expected["blob"][0]))
        digest = digest_of_state(expected)
        print(f"intent {epoch} {digest}", flush=True)
        manifest = checkpointer.commit(
            epoch, snapshots, source_offsets={"src": epoch}, parent=parent
        )
        print(f"committed {epoch} {digest}", flush=True)
        parent = manifest.checkpoint_id
        checkpointer.prune(keep_last=3)


if __name__ == "__main__":
    sys.exit(main())
