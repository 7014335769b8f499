#!/usr/bin/env bash
# Builds the C++ core with AddressSanitizer + UndefinedBehaviorSanitizer beside the installed
# package and runs the C++ unit tests and the fast Python tests against it.
# Expects .ci/setup.sh to have run (it provides .venv with the test dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."

build=build/asan
pkg=build/asan-pkg
rm -rf "$pkg"
mkdir -p "$pkg"
cp -r python/streamstate "$pkg/"
rm -f "$pkg"/streamstate/_core*.so
.venv/bin/python -m pip install -q --group native   # cmake, ninja, pybind11 (pyproject.toml)
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSTREAMSTATE_SANITIZE=ON \
  -DSTREAMSTATE_DEV_OUTPUT_DIR="$PWD/$pkg/streamstate" \
  -Dpybind11_DIR="$(.venv/bin/python -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$PWD/.venv/bin/python" >/dev/null
cmake --build "$build" -j 2

export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if ls "$build"/test_* >/dev/null 2>&1; then
  (cd "$build" && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure)
fi

# CPython itself is not built with ASan: preload the runtime, and leave leak checking to the
# C++ tests above (the interpreter keeps allocations alive until exit by design). libstdc++
# is preloaded too, or ASan's __cxa_throw interceptor finds no real function to call (python
# does not link libstdc++) and aborts on the first C++ exception.
preload="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libstdc++.so)"
LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0 \
  PYTHONPATH="$PWD/$pkg" .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" \
  -o addopts="-ra --import-mode=importlib" tests "$@"
