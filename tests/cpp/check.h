// The checks the C++ unit tests share: there is no test framework, so each test is a plain
// executable whose CHECKs report and count failures without stopping, and whose main ends
// with `return check_summary("test_name");` (non-zero exit when any check failed).
#pragma once

#include <atomic>
#include <cstdio>

#include "core/errors.h"

namespace streamstate::test {

// Atomic because some tests check from worker threads.
inline std::atomic<int> g_check_failures{0};

inline void check_failed(const char* file, int line, const char* condition) {
  std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", file, line, condition);
  ++g_check_failures;
}

[[nodiscard]] inline int check_failures() noexcept { return g_check_failures.load(); }

// Prints the outcome; the exit code for main.
[[nodiscard]] inline int check_summary(const char* test_name) {
  const int failures = check_failures();
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", test_name);
  return 0;
}

// True when fn throws CorruptDataError; any other exception propagates and fails the test.
template <class Fn>
[[nodiscard]] bool throws_corrupt(Fn&& fn) {
  try {
    fn();
  } catch (const CorruptDataError&) {
    return true;
  }
  return false;
}

}  // namespace streamstate::test

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) ::streamstate::test::check_failed(__FILE__, __LINE__, #cond); \
  } while (0)
