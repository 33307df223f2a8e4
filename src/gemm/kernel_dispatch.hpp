// Private: choosing a kernel template from runtime values, written once for every instruction-set
// file (no intrinsics here). f(std::integral_constant<...>{}) is called with the value, so a
// caller names its template once: by_bits(bits, [](auto b) { return kernel<decltype(b)::value>; }).
#pragma once

#include <type_traits>

namespace moqe::detail {

template <int V>
using Int = std::integral_constant<int, V>;

// Rows of activations per call: 1..4 (more: 4).
template <class F>
auto by_rows(int mcount, F f) {
  switch (mcount) {
    case 1:
      return f(Int<1>{});
    case 2:
      return f(Int<2>{});
    case 3:
      return f(Int<3>{});
    default:
      return f(Int<4>{});
  }
}

// Code widths: 2, 3, 4, 8.
template <class F>
auto by_bits(int bits, F f) {
  switch (bits) {
    case 2:
      return f(Int<2>{});
    case 3:
      return f(Int<3>{});
    case 4:
      return f(Int<4>{});
    default:
      return f(Int<8>{});
  }
}

template <class F>
auto by_flag(bool flag, F f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace moqe::detail
