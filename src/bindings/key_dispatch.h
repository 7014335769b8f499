// The two key flavours (int64 and byte strings) behind one Python class, and the options
// every keyed binding parses the same way (key_type, nan_policy).
#pragma once

#include "bindings/arguments.h"
#include "bindings/prelude.h"
#include "core/stats.h"

#include <memory>
#include <string_view>
#include <utility>
#include <variant>

namespace streamstate::bindings {

enum class KeyType { kInt64, kBytes };

inline KeyType key_type_arg(py::handle value) {
  return choice_arg(value, "key_type", {"int64", "bytes"}) == "int64" ? KeyType::kInt64
                                                                       : KeyType::kBytes;
}

inline constexpr std::string_view key_type_name(KeyType type) noexcept {
  return type == KeyType::kInt64 ? "int64" : "bytes";
}

inline NanPolicy nan_policy_arg(py::handle value) {
  const std::string_view name = choice_arg(value, "nan_policy", {"skip", "propagate", "raise"});
  if (name == "propagate") return NanPolicy::kPropagate;
  if (name == "raise") return NanPolicy::kRaise;
  return NanPolicy::kSkip;
}

inline constexpr std::string_view nan_policy_name(NanPolicy policy) noexcept {
  switch (policy) {
    case NanPolicy::kSkip:
      return "skip";
    case NanPolicy::kPropagate:
      return "propagate";
    case NanPolicy::kRaise:
      return "raise";
  }
  return "skip";
}

// One object of either key flavour: `Int64Impl` for key_type="int64", `BytesImpl` for
// "bytes". visit() calls a generic lambda with whichever is held.
template <class Int64Impl, class BytesImpl>
class KeyDispatch {
 public:
  template <class... Args>
  KeyDispatch(KeyType type, Args&&... args) {
    if (type == KeyType::kInt64) {
      impl_.template emplace<0>(std::make_unique<Int64Impl>(std::forward<Args>(args)...));
    } else {
      impl_.template emplace<1>(std::make_unique<BytesImpl>(std::forward<Args>(args)...));
    }
  }

  [[nodiscard]] KeyType key_type() const noexcept {
    return impl_.index() == 0 ? KeyType::kInt64 : KeyType::kBytes;
  }
  [[nodiscard]] bool is_bytes() const noexcept { return impl_.index() == 1; }
  [[nodiscard]] Int64Impl& int64() const noexcept { return *std::get<0>(impl_); }
  [[nodiscard]] BytesImpl& bytes() const noexcept { return *std::get<1>(impl_); }

  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit([&](const auto& impl) -> decltype(auto) { return f(*impl); }, impl_);
  }

 private:
  std::variant<std::unique_ptr<Int64Impl>, std::unique_ptr<BytesImpl>> impl_;
};

}  // namespace streamstate::bindings
