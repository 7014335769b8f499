"""Shared primitives: CRC32C, LZ4 blocks and SHA-256 against the libraries users would
otherwise call, plus the cost of one call into the compiled module.

    python benchmarks/bench_primitives.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import google_crc32c
import lz4.block
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, gb_per_s, interleaved_medians, print_table, row

import streamstate
from streamstate import _core


def _realistic_bytes(size: int, seed: int = 0) -> bytes:
    """Half random, half repetitive records: compresses about 2x, like real state blobs."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 50_000, size // 16, dtype=np.int64)
    values = np.round(rng.normal(100, 15, size // 16), 1)
    return (np.column_stack([keys, values.view(np.int64)]).tobytes() + bytes(size))[:size]


def bench_crc32c(quick: bool) -> list[Row]:
    data = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    loops = 20 if quick else 200
    ours, google, single = interleaved_medians(
        [
            lambda: [streamstate.crc32c(data) for _ in range(loops)],
            lambda: [google_crc32c.value(data) for _ in range(loops)],
            lambda: [_core._crc32c_single_stream(data) for _ in range(loops)],
        ],
        repeats=3 if quick else 7,
    )
    n = len(data) * loops
    return [
        row("crc32c 1 MiB vs google-crc32c", gb_per_s(n, ours), gb_per_s(n, google), google / ours,
            ">= 10 GB/s"),
        row("crc32c 1 MiB vs single-stream loop", gb_per_s(n, ours), gb_per_s(n, single),
            single / ours, "(3 streams ~2x)"),
    ]


def bench_lz4(quick: bool) -> list[Row]:
    rows: list[Row] = []
    for size in ([1 << 16] if quick else [1 << 16, 1 << 20, 16 << 20]):
        data = _realistic_bytes(size)
        loops = max(1, (8 << 20) // size) if not quick else 4
        blob = lz4.block.compress(data, store_size=True)
        c_ours, c_theirs, d_ours, d_theirs = interleaved_medians(
            [
                lambda data=data, loops=loops: [streamstate.lz4_compress(data) for _ in range(loops)],
                lambda data=data, loops=loops: [
                    lz4.block.compress(data, store_size=True) for _ in range(loops)
                ],
                lambda blob=blob, loops=loops: [streamstate.lz4_decompress(blob) for _ in range(loops)],
                lambda blob=blob, loops=loops: [lz4.block.decompress(blob) for _ in range(loops)],
            ],
            repeats=3 if quick else 9,
        )
        n = size * loops
        label = f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
        rows.append(row(f"lz4_compress {label} vs python-lz4", gb_per_s(n, c_ours),
                        gb_per_s(n, c_theirs), c_theirs / c_ours, ">= 0.95x"))
        rows.append(row(f"lz4_decompress {label} vs python-lz4", gb_per_s(n, d_ours),
                        gb_per_s(n, d_theirs), d_theirs / d_ours, ">= 0.95x"))
    return rows


def bench_sha256(quick: bool) -> list[Row]:
    rows: list[Row] = []
    for size in ([1 << 16] if quick else [1 << 16, 16 << 20]):
        data = _realistic_bytes(size, seed=2)
        loops = max(1, (32 << 20) // size) if not quick else 4
        ours, theirs = interleaved_medians(
            [
                lambda data=data, loops=loops: [streamstate.sha256_hex(data) for _ in range(loops)],
                lambda data=data, loops=loops: [
                    hashlib.sha256(data).hexdigest() for _ in range(loops)
                ],
            ],
            repeats=3 if quick else 7,
        )
        n = size * loops
        label = f"{size >> 10} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
        rows.append(row(f"sha256_hex {label} vs hashlib", gb_per_s(n, ours), gb_per_s(n, theirs),
                        theirs / ours, ">= 0.95x"))
    return rows


def bench_call_overhead(quick: bool) -> list[Row]:
    loops = 100_000 if quick else 1_000_000
    noop = _core._noop

    def ours() -> None:
        for _ in range(loops):
            noop()

    def python_noop_fn() -> None:
        pass

    def baseline() -> None:
        for _ in range(loops):
            python_noop_fn()

    t_ours, t_base = interleaved_medians([ours, baseline], repeats=5)
    ns_ours = t_ours / loops * 1e9
    ns_base = t_base / loops * 1e9
    return [row("call overhead: _core._noop() vs a Python no-op function", f"{ns_ours:.0f} ns/call",
                f"{ns_base:.0f} ns/call", t_base / t_ours, "report")]


def run(quick: bool = False) -> list[Row]:
    """All primitive benchmarks; ``quick`` shrinks sizes and repeats for a smoke run."""
    return bench_crc32c(quick) + bench_lz4(quick) + bench_sha256(quick) + bench_call_overhead(quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run(quick=args.quick)
    print_table(rows, title=f"primitives (hardware CRC32C: {_core.crc32c_is_hardware()})")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
