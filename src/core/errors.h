// Exception types thrown by the C++ core. The bindings translate each into the matching
// Python class in streamstate.errors, so C++ code never needs Python headers to report errors.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace streamstate {

// Input bytes that cannot be what they claim to be (truncated, bit-flipped, foreign).
// Maps to streamstate.CorruptDataError (a ValueError).
class CorruptDataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A file-system failure while spilling or reading spill files back.
// Maps to streamstate.SpillError (an OSError); carries the path and errno.
class SpillIoError : public std::runtime_error {
 public:
  SpillIoError(const std::string& message, std::string path, int error_number)
      : std::runtime_error(message), path_(std::move(path)), errno_(error_number) {}
  [[nodiscard]] const std::string& path() const noexcept { return path_; }
  [[nodiscard]] int error_number() const noexcept { return errno_; }

 private:
  std::string path_;
  int errno_;
};

// Misuse of an API with arguments that are well-formed but not allowed (maps to ValueError).
using InvalidArgument = std::invalid_argument;

}  // namespace streamstate
