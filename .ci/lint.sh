#!/usr/bin/env bash
# Static checks: ruff, mypy --strict over python/streamstate, and stubtest comparing the
# hand-written python/streamstate/_core.pyi with the compiled module, so the stubs cannot
# drift from the bindings. The tools come from the `lint` dependency group in pyproject.toml.
# Expects .ci/setup.sh to have run (streamstate, with its compiled _core, is in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

py=.venv/bin/python
"$py" -m pip install -q --group lint

echo "-- ruff"
"$py" -m ruff check python tests benchmarks .ci
echo "-- mypy (strict, as configured in pyproject.toml)"
"$py" -m mypy
echo "-- stubtest: python/streamstate/_core.pyi against the installed _core"
# The stubs come from python/ (mypy_path in pyproject.toml); the runtime side is the build
# installed in .venv, since the repository root holds no streamstate package of its own.
"$py" -m mypy.stubtest streamstate._core --mypy-config-file pyproject.toml \
  --allowlist .ci/stubtest-allowlist.txt
