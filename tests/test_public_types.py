"""What the type hints promise is what the runtime takes: numpy arrays are bytes-like
wherever bytes are (the stubs of the core and the Python wrappers alike)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

import streamstate as ss
from streamstate import codec, serde

# Each line passes a numpy array where bytes go; run below and type-checked by mypy.
USER_CODE = textwrap.dedent(
    """\
    from __future__ import annotations

    import numpy as np

    import streamstate as ss
    from streamstate import codec, serde

    raw = np.frombuffer(b"12345678", dtype=np.uint8)
    words = np.array([0x3132333435363738], dtype=">u8")
    checksum: int = ss.crc32c(raw)
    digest: str = ss.sha256_hex(words)
    packed: bytes = ss.lz4_compress(raw)
    batch: bytes = ss.encode_batch([("k", raw)])
    records: bytes = codec.encode_records(1, [(raw, words)])
    decoded = codec.decode_records(np.frombuffer(records, dtype=np.uint8))
    number: int = serde.Int64().decode(words)
    real: float = serde.Float64().decode(raw)
    copied: bytes = serde.Bytes().encode(words)
    """
)


def test_numpy_arrays_work_where_bytes_do() -> None:
    scope: dict[str, object] = {}
    exec(compile(USER_CODE, "user_code", "exec"), scope)  # noqa: S102 - our own snippet
    raw = b"12345678"
    assert scope["checksum"] == ss.crc32c(raw)
    assert scope["digest"] == ss.sha256_hex(raw)  # a big-endian word holds those bytes
    assert scope["packed"] == ss.lz4_compress(raw)
    assert scope["batch"] == ss.encode_batch([("k", raw)])
    assert scope["decoded"] == (1, [(raw, raw)])
    assert scope["number"] == serde.Int64().decode(raw)
    assert scope["real"] == serde.Float64().decode(raw)
    assert scope["copied"] == raw


def test_eight_byte_serdes_count_bytes_not_elements() -> None:
    # len() of a numpy array counts elements: one int64 is 8 bytes, eight uint16 are 16.
    assert serde.Int64().decode(np.frombuffer(serde.Int64().encode(-5), ">i8")) == -5
    with pytest.raises(ss.CorruptDataError, match="expected 8 bytes, got 16"):
        serde.Int64().decode(np.zeros(8, dtype=np.uint16))
    with pytest.raises(serde.SerdeError, match="bytes-like"):
        serde.Bytes().encode("text")  # type: ignore[arg-type]
    assert codec.decode_records(codec.encode_records(7, [])) == (7, [])


@pytest.mark.slow
def test_numpy_arrays_type_check_where_bytes_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = pytest.importorskip("mypy.api")
    user = tmp_path / "user_code.py"
    user.write_text(USER_CODE)
    package_root = Path(ss.__file__).resolve().parent.parent
    if package_root.name != "site-packages":
        # A source tree (PYTHONPATH=python): mypy reads it only through MYPYPATH, and refuses
        # site-packages there, where an installed package is found by itself.
        monkeypatch.setenv("MYPYPATH", str(package_root))
    else:
        monkeypatch.delenv("MYPYPATH", raising=False)
    # Silent: the package is checked by lint; here only the user's calls are under test.
    out, err, status = api.run(
        ["--strict", "--follow-imports=silent", "--python-version", "3.11",
         "--cache-dir", str(tmp_path / "cache"), "--config-file", "", str(user)]
    )
    assert status == 0, out + err
