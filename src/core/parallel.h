// Parallel loops for the core: tbb::parallel_for / parallel_invoke, except under
// ThreadSanitizer.
//
// The system oneTBB is not built with TSan, so TSan sees neither the scheduler's ordering
// (caller -> tasks -> caller) nor the synchronisation inside TBB's inline headers, and reports
// both as races. A TSan build therefore runs the very same task bodies on plain std::threads,
// which TSan understands: races between our task bodies are still caught, TBB's internals
// are not in the picture. Every other build is a direct TBB call.
#pragma once

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_invoke.h>

#include <utility>

#if defined(__SANITIZE_THREAD__)
#include <algorithm>
#include <functional>
#include <exception>
#include <thread>
#include <vector>
#endif

namespace streamstate {

#if defined(__SANITIZE_THREAD__)
namespace detail {

// Runs each task on its own thread and rethrows the first exception, like TBB does.
template <typename Task>
void run_on_threads(std::vector<Task>& tasks) {
  std::vector<std::exception_ptr> errors(tasks.size());
  std::vector<std::thread> threads;
  threads.reserve(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    threads.emplace_back([&, i] {
      try {
        tasks[i]();
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace detail
#endif

template <typename Value, typename Body, typename... Partitioner>
void parallel_for(const tbb::blocked_range<Value>& range, const Body& body,
                  Partitioner&&... partitioner) {
#if defined(__SANITIZE_THREAD__)
  const std::size_t n = range.size();
  const std::size_t parts = std::min<std::size_t>(n, 4);
  std::vector<std::function<void()>> tasks;
  for (std::size_t p = 0; p < parts; ++p) {
    const Value lo = static_cast<Value>(range.begin() + n * p / parts);
    const Value hi = static_cast<Value>(range.begin() + n * (p + 1) / parts);
    tasks.emplace_back([&body, lo, hi] { body(tbb::blocked_range<Value>(lo, hi)); });
  }
  detail::run_on_threads(tasks);
  ((void)partitioner, ...);
#else
  tbb::parallel_for(range, body, std::forward<Partitioner>(partitioner)...);
#endif
}

template <typename F, typename G>
void parallel_invoke(const F& f, const G& g) {
#if defined(__SANITIZE_THREAD__)
  std::vector<std::function<void()>> tasks{f, g};
  detail::run_on_threads(tasks);
#else
  tbb::parallel_invoke(f, g);
#endif
}

}  // namespace streamstate
