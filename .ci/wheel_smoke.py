"""Smoke test of an installed streamstate wheel, run by .ci/wheel.sh in a fresh virtualenv.

Checks what a user of the wheel meets first: the import, a fold and its merged result, a
snapshot round trip, the checksums and LZ4, the optional-dependency message of
streamstate.testing, and that the shared libraries loaded are the wheel's own copies
(auditwheel's ``streamstate.libs``), not the build machine's.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

import streamstate as ss
from streamstate import _core


def check_installed_from_wheel() -> Path:
    package = Path(ss.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert package.parent == site, f"streamstate imported from {package}, not from {site}"
    return site


def check_bundled_libraries(site: Path) -> None:
    bundled = (site / "streamstate.libs").resolve()
    assert bundled.is_dir(), f"no {bundled}: the wheel was not repaired by auditwheel"
    # What _core's dependencies resolve to ("libtbb-<hash>.so.12 => /path (0x...)")...
    resolved = {}
    for line in subprocess.run(
        ["ldd", _core.__file__], check=True, capture_output=True, text=True
    ).stdout.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if arrow:
            resolved[name] = Path(rest.split(" (")[0]).resolve()
    # ...and what this process has mapped. The interpreter's own _hashlib may map the system
    # libcrypto as well; what matters is that _core's copies are the bundled ones.
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = {Path(fields[-1]).resolve() for fields in map(str.split, maps) if fields[-1][:1] == "/"}
    for stem in ("libtbb", "liblz4", "libcrypto"):
        paths = [path for name, path in resolved.items() if name.startswith(stem)]
        assert paths, f"_core does not link {stem}: {sorted(resolved)}"
        for path in paths:
            assert path.parent == bundled, f"_core's {stem} resolves to {path}, not {bundled}"
            assert path in mapped, f"the bundled {path.name} is not loaded"


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
    single = restored.result(2)  # one value: var is NaN, so compare the fields that exist
    assert restored.result(1) == stats and single is not None and single.count == 1
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
