"""Benchmark of the LCB1 checkpoint-batch codec (issue 6).

Workload: 64 MiB of realistic checkpoint state, i.e. a few thousand snapshot-codec blobs
(``encode_records``) of numeric aggregate partials (key, count, sum, min, max, mean, M2),
which LZ4 compresses to a bit over half.

Rows (ratio = baseline time / streamstate time, so higher is better):

* ``encode_batch`` vs ``lz4_compress`` of the same body alone (framing + CRC32C cost)
* ``decode_batch`` vs ``lz4_decompress`` of the same block alone
* both vs a plain-Python implementation of the same format (struct + python-lz4 +
  google-crc32c)

Run: ``PYTHONPATH=python python benchmarks/bench_batcher.py [--quick]``. Each figure is the
median of several runs, streamstate and baseline interleaved so load on a shared machine
hits both alike; the last column gives the same ratio in CPU time (all threads).
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time
from collections.abc import Callable

import google_crc32c
import lz4.block
import numpy as np

import streamstate
from streamstate.codec import RecordKind, encode_records

MiB = 1 << 20


def make_state(total_bytes: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Snapshot blobs of numeric aggregate partials until the body reaches total_bytes."""
    rng = np.random.default_rng(seed)
    entries: list[tuple[str, bytes]] = []
    size = 0
    i = 0
    while size < total_bytes:
        n = 256
        groups = rng.integers(0, 1 << 22, n)
        count = rng.integers(1, 5000, n)
        mean = rng.normal(120.0, 30.0, n).round(3)
        spread = rng.gamma(2.0, 10.0, n)
        records = [
            (
                f"user-{g:08d}".encode(),
                struct.pack("<qddddd", c, m * c, m - 3 * s, m + 3 * s, m, s * s * (c - 1)),
            )
            for g, c, m, s in zip(
                groups.tolist(), count.tolist(), mean.tolist(), spread.tolist(), strict=True
            )
        ]
        blob = encode_records(RecordKind.NUMERIC_AGGREGATE_STORE, records)
        key = f"partition-{i % 64:03d}/aggregate-{i // 64:05d}"
        entries.append((key, blob))
        size += len(key) + len(blob) + 8
        i += 1
    return entries


# -- the same format in plain Python (the baseline) ----------------------------------------


def py_encode(entries: list[tuple[str, bytes]]) -> bytes:
    parts: list[bytes] = []
    pack = struct.Struct("<I").pack
    for key, data in entries:
        k = key.encode("utf-8")
        parts += (pack(len(k)), k, pack(len(data)), data)
    body = b"".join(parts)
    compressed = lz4.block.compress(body, store_size=True)
    crc = google_crc32c.value(compressed)
    return b"".join((b"LCB1", struct.pack("<IIII", 2, len(entries), len(body), crc), compressed))


def py_decode(raw: bytes) -> list[tuple[str, bytes]]:
    view = memoryview(raw)
    if raw[:4] != b"LCB1":
        raise ValueError("invalid batch magic")
    version, count, size = struct.unpack_from("<III", view, 4)
    compressed = raw[20:] if version == 2 else raw[16:]  # google-crc32c wants bytes
    if version == 2 and struct.unpack_from("<I", view, 16)[0] != google_crc32c.value(compressed):
        raise ValueError("CRC32C mismatch")
    body = lz4.block.decompress(compressed)
    if len(body) != size:
        raise ValueError("size mismatch")
    unpack = struct.Struct("<I").unpack_from
    out = []
    pos = 0
    for _ in range(count):
        (n,) = unpack(body, pos)
        key = body[pos + 4 : pos + 4 + n].decode("utf-8")
        pos += 4 + n
        (n,) = unpack(body, pos)
        out.append((key, body[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    if pos != len(body):
        raise ValueError("trailing bytes")
    return out


# -- measurement ----------------------------------------------------------------------------


class Timing:
    """Median wall and CPU seconds (CPU summed over all threads, TBB workers included)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def measure(self, fn: Callable[[], object]) -> None:
        w, c = time.perf_counter(), time.process_time()
        fn()
        self.cpu.append(time.process_time() - c)
        self.wall.append(time.perf_counter() - w)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def paired(
    ours: Callable[[], object], baseline: Callable[[], object], repeats: int
) -> tuple[Timing, Timing]:
    """Runs both `repeats` times, interleaved, after one warm-up run of each."""
    ours()
    baseline()
    a, b = Timing(), Timing()
    for _ in range(repeats):
        a.measure(ours)
        b.measure(baseline)
    return a, b


def row(operation: str, body: int, ours: Timing, base: Timing, target: float) -> dict[str, object]:
    def rate(seconds: float) -> str:
        return f"{body / MiB / seconds:,.0f} MiB/s ({seconds * 1e3:.1f} ms)"

    return {
        "operation": operation,
        "streamstate": rate(ours.median_wall),
        "baseline": rate(base.median_wall),
        "ratio": base.median_wall / ours.median_wall,
        "target": f">= {target}x",
        # The same ratio in CPU time: steadier than wall time on a shared, loaded machine.
        "cpu_ratio": base.median_cpu / ours.median_cpu,
    }


def run(quick: bool = False) -> list[dict[str, object]]:
    size = 4 * MiB if quick else 64 * MiB
    repeats = 3 if quick else 9
    entries = make_state(size)
    body = b"".join(
        struct.pack("<I", len(k.encode())) + k.encode() + struct.pack("<I", len(v)) + v
        for k, v in entries
    )
    block = streamstate.lz4_compress(body)
    raw = streamstate.encode_batch(entries)
    assert streamstate.decode_batch(raw) == entries == py_decode(raw)
    assert py_decode(py_encode(entries)) == entries == streamstate.decode_batch(py_encode(entries))
    n = len(body)
    label = f"({len(entries)} blobs, {n / MiB:.0f} MiB, ratio {len(raw) / n:.2f})"

    rows = []
    ours, base = paired(
        lambda: streamstate.encode_batch(entries), lambda: streamstate.lz4_compress(body), repeats
    )
    rows.append(row(f"encode_batch vs lz4_compress(body) {label}", n, ours, base, 0.9))
    ours, base = paired(
        lambda: streamstate.decode_batch(raw), lambda: streamstate.lz4_decompress(block), repeats
    )
    rows.append(row("decode_batch vs lz4_decompress(block)", n, ours, base, 0.9))
    ours, base = paired(
        lambda: streamstate.encode_batch(entries), lambda: py_encode(entries), repeats
    )
    rows.append(row("encode_batch vs plain Python (struct+lz4+crc32c)", n, ours, base, 1.3))
    ours, base = paired(lambda: streamstate.decode_batch(raw), lambda: py_decode(raw), repeats)
    rows.append(row("decode_batch vs plain Python (struct+lz4+crc32c)", n, ours, base, 1.3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 MiB, 3 repeats (smoke run)")
    args = parser.parse_args()
    rows = run(quick=args.quick)
    header = (
        f"{'operation':<62} {'streamstate':>24} {'baseline':>24} {'ratio':>6}  {'target':<8}"
        "  CPU-time ratio"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['operation']:<62} {r['streamstate']:>24} {r['baseline']:>24} "
            f"{r['ratio']:>5.2f}x  {r['target']:<8}  {r['cpu_ratio']:.2f}x"
        )


if __name__ == "__main__":
    main()
