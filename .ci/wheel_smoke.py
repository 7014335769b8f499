"""Smoke test of an installed streamstate wheel, run by .ci/wheel.sh in a fresh virtualenv.

Checks what a user of the wheel meets first: the import, a fold and its merged result, a
snapshot round trip, the checksums and LZ4, the optional-dependency message of
streamstate.testing, and that the shared libraries loaded are the wheel's own copies
(auditwheel's ``streamstate.libs``), not the build machine's.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy as np

import streamstate as ss


def check_installed_from_wheel() -> Path:
    package = Path(ss.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert package.parent == site, f"streamstate imported from {package}, not from {site}"
    return site


def check_bundled_libraries(site: Path) -> None:
    bundled = site / "streamstate.libs"
    assert bundled.is_dir(), f"no {bundled}: the wheel was not repaired by auditwheel"
    # The mapped files of this process: the last field of each /proc/self/maps line.
    maps = Path("/proc/self/maps").read_text().splitlines()
    loaded = {Path(fields[-1]) for fields in map(str.split, maps) if fields[-1].startswith("/")}
    for stem in ("libtbb", "liblz4", "libcrypto"):
        paths = sorted(str(p) for p in loaded if p.name.startswith(stem) and ".so" in p.name)
        assert paths, f"{stem} is not loaded at all"
        assert all(p.startswith(str(bundled)) for p in paths), f"{stem} loaded from {paths}"


def check_fold_and_snapshot() -> None:
    store = ss.NumericAggregateStore(num_partitions=2)
    with store.partition(0) as part:
        part.fold(np.array([1, 2, 1]), np.array([1.0, 2.0, 3.0]))
    with store.partition(1) as part:
        part.fold(np.array([1]), np.array([10.0]))
    stats = store.result(1)
    assert stats is not None and (stats.count, stats.sum, stats.max) == (3, 14.0, 10.0), stats
    restored = ss.NumericAggregateStore(num_partitions=2)
    restored.restore(store.snapshot())
    assert restored.result(1) == stats and restored.result(2) == store.result(2)
    assert restored.snapshot() == store.snapshot()


def check_primitives() -> None:
    assert ss.crc32c(b"123456789") == 0xE3069283
    assert ss.sha256_hex(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    data = b"streamstate " * 1000
    blob = ss.lz4_compress(data)
    assert len(blob) < len(data) and ss.lz4_decompress(blob) == data


def check_testing_names_its_extra() -> None:
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        pass
    else:  # a wheel venv with hypothesis installed cannot show the message
        return
    try:
        import streamstate.testing  # noqa: F401
    except ImportError as exc:
        assert "pip install streamstate[test]" in str(exc), exc
    else:
        raise AssertionError("streamstate.testing imported without hypothesis")


def main() -> None:
    site = check_installed_from_wheel()
    check_bundled_libraries(site)
    check_fold_and_snapshot()
    check_primitives()
    check_testing_names_its_extra()
    print(f"wheel smoke test passed: streamstate {ss.__version__} from {site}", file=sys.stderr)


if __name__ == "__main__":
    main()
