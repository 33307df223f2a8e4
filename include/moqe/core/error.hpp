// moqe::Error and MOQE_CHECK: the public API reports bad input by throwing an Error whose message
// names the offending values, shapes, files and tensors.
#pragma once

#include <fmt/core.h>

#include <stdexcept>
#include <string>

namespace moqe {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] void throw_error(std::string message);

// Run-time formatting for CUDA translation units: nvcc cannot evaluate fmt's consteval
// format-string checks, which host code keeps.
template <class... Args>
std::string format_runtime(fmt::string_view f, const Args&... args) {
  return fmt::vformat(f, fmt::make_format_args(args...));
}
}  // namespace detail

}  // namespace moqe

#if defined(__CUDACC__)
#define MOQE_FORMAT(...) ::moqe::detail::format_runtime(__VA_ARGS__)
#else
#define MOQE_FORMAT(...) ::fmt::format(__VA_ARGS__)
#endif

// MOQE_CHECK(cond, "format {}", args...): throws moqe::Error with the formatted message when cond
// is false. The message is only formatted on failure.
#define MOQE_CHECK(cond, ...)                                \
  do {                                                       \
    if (!(cond)) [[unlikely]] {                              \
      ::moqe::detail::throw_error(MOQE_FORMAT(__VA_ARGS__)); \
    }                                                        \
  } while (0)

#define MOQE_FAIL(...) ::moqe::detail::throw_error(MOQE_FORMAT(__VA_ARGS__))
