#!/usr/bin/env bash
# Builds the C++ unit tests with ThreadSanitizer and runs them: the concurrent stores, the
# state backend's locking and the parallel codecs, exercised from real threads.
# Expects .ci/setup.sh to have run (it provides .venv with cmake, ninja and pybind11).
set -euo pipefail
cd "$(dirname "$0")/.."

build=build/tsan
.venv/bin/python -m pip install -q --group native   # cmake, ninja, pybind11 (pyproject.toml)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSTREAMSTATE_SANITIZE_THREAD=ON \
  -DSTREAMSTATE_DEV_OUTPUT_DIR="$PWD/$build/module" \
  -Dpybind11_DIR="$(.venv/bin/python -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$PWD/.venv/bin/python" >/dev/null
# Only the C++ tests: a TSan-built Python module would need a TSan-built interpreter.
targets=$(cd tests/cpp && ls test_*.cpp | sed 's/\.cpp$//')
cmake --build "$build" -j 2 --target $targets
(cd "$build" && TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" ctest --output-on-failure)
