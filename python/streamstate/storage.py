"""Resolving where checkpoints live: an obstore store, or a URL naming one.

The local filesystem is the embedded default; ``memory://`` is handy in tests; ``s3://``,
``gs://`` and ``az://`` URLs go to obstore's cloud stores (credentials from the environment,
as obstore reads them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union
from urllib.parse import unquote, urlparse

from obstore.store import LocalStore, MemoryStore, ObjectStore, from_url

__all__ = ["StoreLike", "default_store_path", "describe_store", "resolve_store"]

#: An obstore store instance, a URL (``file:///``, ``memory://``, ``s3://bucket/prefix``), or
#: a local directory path.
StoreLike = Union[ObjectStore, str, "os.PathLike[str]"]


def default_store_path() -> Path:
    """The local directory used when no store is given: ``$STREAMSTATE_HOME`` or
    ``~/.local/share/streamstate``."""
    home = os.environ.get("STREAMSTATE_HOME")
    if home:
        return Path(home)
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "streamstate"


def resolve_store(store: StoreLike, **options: Any) -> ObjectStore:
    """Return an obstore store for ``store``.

    Store instances pass through unchanged. A ``file://`` URL or a plain path becomes a
    :class:`~obstore.store.LocalStore` rooted there (the directory is created); ``memory://``
    a fresh :class:`~obstore.store.MemoryStore`; anything else goes to
    :func:`obstore.store.from_url` with ``options`` (e.g. ``endpoint``, ``region``).
    """
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if not isinstance(store, str):
        return store
    parsed = urlparse(store)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else store).expanduser()
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URLs must be local (file:///path), got {store!r}")
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(str(path.resolve()), automatic_cleanup=True)
    if parsed.scheme == "memory":
        return MemoryStore()
    return from_url(store, **options)


def describe_store(store: ObjectStore) -> str:
    """A short human-readable description of a store, for ``__repr__`` and logs."""
    prefix = getattr(store, "prefix", None)
    return f"{type(store).__name__}({str(prefix)!r})" if prefix is not None else type(store).__name__
