#!/usr/bin/env bash
# Sets up a fresh machine for streamstate: the three system libraries the C++ core links
# (oneTBB, LZ4, OpenSSL), a virtualenv in .venv, and streamstate built and installed into it
# with the extras named in $STREAMSTATE_EXTRAS (default: test,demo).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pkg in libtbb-dev liblz4-dev libssl-dev g++ pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "streamstate needs these Debian packages: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q ".[${STREAMSTATE_EXTRAS:-test,demo}]"
echo "streamstate installed in .venv ($(.venv/bin/python -c 'import streamstate; print(streamstate.__version__)'))"
