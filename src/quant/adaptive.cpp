#include "moqe/quant/adaptive.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "methods.hpp"
#include "moqe/core/threading.hpp"
#include "moqe/quant/numerics.hpp"

namespace moqe {

double relative_error(MatrixView<const float> w, const QuantScheme& scheme, int num_threads,
                      QuantMethod method) {
  const detail::GroupQuantizer choose = detail::group_quantizer(method);
  validate_scheme(scheme, w.cols(), "relative_error");
  const int64_t k = w.cols(), g = scheme.resolved_group_size(k);
  std::vector<double> ref2(static_cast<size_t>(w.rows())), err2(ref2.size());
  parallel_for(w.rows(), num_threads, 4, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> codes(static_cast<size_t>(g));
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = w.row(r);
      double a2 = 0, e2 = 0;
      for (int64_t j = 0; j < k / g; ++j) {
        const float* grp = row + j * g;
        const GroupParams p =
            choose(grp, g, scheme.bits, scheme.mode, scheme.scale_type, codes.data());
        for (int64_t i = 0; i < g; ++i) {
          const double d = static_cast<double>(grp[i]) - dequantize_code(codes[i], p.zero, p.scale);
          a2 += static_cast<double>(grp[i]) * grp[i];
          e2 += d * d;
        }
      }
      ref2[r] = a2;
      err2[r] = e2;
    }
  });
  double a = 0, e = 0;
  for (size_t r = 0; r < ref2.size(); ++r) {
    a += ref2[r];
    e += err2[r];
  }
  if (e == 0) return 0;
  return a == 0 ? std::numeric_limits<double>::infinity() : std::sqrt(e / a);
}

AdaptiveResult quantize_adaptive(MatrixView<const float> w, const QuantScheme& base,
                                 const AdaptiveOptions& adaptive, const QuantizeOptions& options) {
  const int64_t k = w.cols();
  MOQE_CHECK(adaptive.tau >= 0, "adaptive granularity: tau must be >= 0, got {}", adaptive.tau);
  MOQE_CHECK(!adaptive.error_budget || *adaptive.error_budget >= 0,
             "adaptive granularity: the error budget must be >= 0, got {}",
             adaptive.error_budget.value_or(0));
  check_finite(w, options.name, options.num_threads);

  // Resolved, valid, distinct candidates, largest first.
  std::vector<int64_t> sizes;
  for (int64_t c : adaptive.candidates) {
    QuantScheme s = base;
    s.group_size = c;
    if (check_scheme(s, k).empty()) sizes.push_back(s.resolved_group_size(k));
  }
  std::sort(sizes.begin(), sizes.end(), std::greater<>());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  MOQE_CHECK(!sizes.empty(),
             "tensor '{}' of shape [{}, {}]: no candidate group size divides K = {}", options.name,
             w.rows(), k, k);

  AdaptiveResult result;
  for (int64_t g : sizes) {
    QuantScheme s = base;
    s.group_size = g == k ? kPerChannel : g;
    result.candidates.push_back(
        {g, relative_error(w, s, options.num_threads, options.method), s.bits_per_weight(k)});
  }
  const double finest = result.candidates.back().rel_error;
  result.threshold = adaptive.error_budget ? *adaptive.error_budget : (1.0 + adaptive.tau) * finest;
  result.chosen_group_size = sizes.back();
  result.budget_met = false;
  for (const AdaptiveCandidate& c : result.candidates) {  // largest G first
    if (c.rel_error <= result.threshold) {
      result.chosen_group_size = c.group_size;
      result.budget_met = true;
      break;
    }
  }
  QuantScheme chosen = base;
  chosen.group_size = result.chosen_group_size == k ? kPerChannel : result.chosen_group_size;
  result.matrix = quantize(w, chosen, options);
  return result;
}

}  // namespace moqe
