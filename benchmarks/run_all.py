"""Run every benchmark in this folder and print one table.

    python benchmarks/run_all.py            # full sizes (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick    # small sizes, a smoke run
    python benchmarks/run_all.py --write benchmarks/RESULTS.md

Each ``bench_<concept>.py`` exposes ``run(quick) -> rows``; every row measures streamstate
and its baseline side by side in the same run, so the ratio is what to read on a shared,
noisy machine.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _harness import Row


def discover(only: list[str] | None) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if only:
        names = [n for n in names if any(o in n for o in only)]
    return names


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}"


def render(sections: list[tuple[str, list[Row]]]) -> str:
    headers = ["benchmark", "operation", "streamstate", "baseline", "ratio", "target"]
    cells = []
    for name, rows in sections:
        for r in rows:
            ratio = r["ratio"]
            cells.append(
                [
                    name,
                    str(r["operation"]),
                    str(r["streamstate"]),
                    str(r["baseline"]),
                    f"{ratio:.2f}x" if isinstance(ratio, float) else str(ratio),
                    str(r["target"]),
                ]
            )
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--only", nargs="*", help="run benchmarks whose name contains these")
    parser.add_argument("--write", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()

    sections: list[tuple[str, list[Row]]] = []
    failed = []
    start = time.perf_counter()
    for name in discover(args.only):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(name)
            rows = module.run(quick=args.quick)
        except Exception:  # noqa: BLE001  (report the failed script, run the others)
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"  {name}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        sections.append((name.removeprefix("bench_"), rows))

    table = render(sections)
    header = (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine_line()}"
        f"{' (quick sizes)' if args.quick else ''}; total {time.perf_counter() - start:.0f} s.\n"
        "Ratios are streamstate's speed over the baseline's, measured side by side in one run "
        "(medians of repeats); higher is better.\n"
    )
    print()
    print(header)
    print(table)
    if args.write:
        args.write.write_text(
            "# Benchmark results\n\n"
            "Produced by `python benchmarks/run_all.py"
            f"{' --quick' if args.quick else ''} --write {args.write}`.\n\n"
            + header
            + "\n"
            + table
            + "\n"
        )
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
