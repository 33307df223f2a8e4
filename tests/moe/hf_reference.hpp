// A plain per-token reference of each family's Hugging Face MoE block, written separately from the
// library: it reads the raw tensors by their Hugging Face names and computes in double precision.
// Used to check the loaders and MoELayer end to end.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "moqe/io/checkpoint.hpp"

namespace moqe::test {

struct RefFamily {
  std::string
      family;  // mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v2 | deepseek_v3 | switch
  int64_t experts = 0, top_k = 0;
  bool norm_topk_prob = false;
  bool group_limited = false;  // deepseek_v2
  int64_t n_group = 1, topk_group = 1;
  double scaling = 1.0;
  int64_t capacity = 0;  // switch
  bool fused = false;    // experts.gate_up_proj / experts.down_proj
};

struct RefResult {
  std::vector<double> y;        // [T, H]
  std::vector<int32_t> ids;     // [T, k]
  std::vector<double> weights;  // [T, k]
};

class RefMoe {
 public:
  RefMoe(const Checkpoint& ckpt, std::string prefix, RefFamily f)
      : ckpt_(ckpt), p_(std::move(prefix) + "."), f_(std::move(f)) {}

  RefResult run(const std::vector<float>& x, int64_t t_count, int64_t h) const {
    RefResult r;
    const int64_t e_count = f_.experts, k = f_.top_k;
    const bool sw = f_.family == "switch";
    const auto wg = ckpt_.to_float(p_ + (sw ? "router.classifier.weight" : "gate.weight"));
    std::vector<double> bias(static_cast<size_t>(e_count), 0.0);
    if (f_.family == "deepseek_v3") {
      const auto b = ckpt_.to_float(p_ + "gate.e_score_correction_bias");
      bias.assign(b.begin(), b.end());
    }
    r.y.assign(static_cast<size_t>(t_count * h), 0.0);
    std::vector<int64_t> load(static_cast<size_t>(e_count), 0);
    for (int64_t t = 0; t < t_count; ++t) {
      const float* xt = &x[t * h];
      std::vector<double> l(static_cast<size_t>(e_count));
      for (int64_t e = 0; e < e_count; ++e) {
        double s = 0;
        for (int64_t c = 0; c < h; ++c) s += double(xt[c]) * wg[e * h + c];
        l[e] = s;
      }
      std::vector<double> score = l, choice;
      if (f_.family == "deepseek_v3") {
        for (auto& v : score) v = 1.0 / (1.0 + std::exp(-v));
      } else {
        const double m = *std::max_element(l.begin(), l.end());
        double sum = 0;
        for (auto& v : score) sum += (v = std::exp(v - m));
        for (auto& v : score) v /= sum;
      }
      choice = score;
      if (f_.family == "deepseek_v3") {
        for (int64_t e = 0; e < e_count; ++e) choice[e] += bias[e];
      }
      const bool grouped = f_.family == "deepseek_v3" || f_.group_limited;
      if (grouped) {
        const int64_t gs = e_count / f_.n_group;
        std::vector<double> gscore(static_cast<size_t>(f_.n_group));
        for (int64_t g = 0; g < f_.n_group; ++g) {
          std::vector<double> v(choice.begin() + g * gs, choice.begin() + (g + 1) * gs);
          std::sort(v.rbegin(), v.rend());
          gscore[g] = f_.family == "deepseek_v3" ? v[0] + v[1] : v[0];
        }
        const auto keep = top(gscore, f_.topk_group);
        for (int64_t g = 0; g < f_.n_group; ++g) {
          if (std::find(keep.begin(), keep.end(), g) != keep.end()) continue;
          for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
            choice[e] = f_.family == "deepseek_v3" ? -INFINITY : 0.0;
          }
        }
      }
      const auto ids = top(choice, k);
      std::vector<double> w(static_cast<size_t>(k));
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += (w[j] = score[ids[j]]);
      const bool deepseek = f_.family.starts_with("deepseek");
      if (f_.family == "mixtral" || (f_.norm_topk_prob && !deepseek)) {
        for (auto& v : w) v /= sum;
      }
      if (deepseek) {
        if (f_.norm_topk_prob && f_.family == "deepseek_v3") {  // V2 ignores the flag
          for (auto& v : w) v /= sum + 1e-20;
        }
        for (auto& v : w) v *= f_.scaling;
      }
      for (int64_t j = 0; j < k; ++j) {
        r.ids.push_back(static_cast<int32_t>(ids[j]));
        r.weights.push_back(w[j]);
      }
      double* yt = &r.y[t * h];
      if (sw && ++load[ids[0]] > f_.capacity) {  // over capacity: the input passes through
        for (int64_t c = 0; c < h; ++c) yt[c] = w[0] * xt[c];
        continue;
      }
      for (int64_t j = 0; j < k; ++j) {
        const auto out = expert(ids[j], xt, h);
        for (int64_t c = 0; c < h; ++c) yt[c] += w[j] * out[c];
      }
      if (f_.family == "qwen2_moe" && ckpt_.contains(p_ + "shared_expert.gate_proj.weight")) {
        const auto g = ckpt_.to_float(p_ + "shared_expert_gate.weight");
        double gl = 0;
        for (int64_t c = 0; c < h; ++c) gl += double(g[c]) * xt[c];
        const auto out =
            glu(p_ + "shared_expert.gate_proj.weight", p_ + "shared_expert.up_proj.weight",
                p_ + "shared_expert.down_proj.weight", xt, h);
        for (int64_t c = 0; c < h; ++c) yt[c] += out[c] / (1.0 + std::exp(-gl));
      }
      if (deepseek && ckpt_.contains(p_ + "shared_experts.gate_proj.weight")) {
        const auto out =
            glu(p_ + "shared_experts.gate_proj.weight", p_ + "shared_experts.up_proj.weight",
                p_ + "shared_experts.down_proj.weight", xt, h);
        for (int64_t c = 0; c < h; ++c) yt[c] += out[c];
      }
    }
    return r;
  }

 private:
  // Indices of the k largest, ties to the lower index.
  static std::vector<int64_t> top(const std::vector<double>& v, int64_t k) {
    std::vector<int64_t> idx(v.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
    idx.resize(static_cast<size_t>(k));
    return idx;
  }

  static std::vector<double> matvec(const std::vector<float>& w, int64_t n, int64_t k,
                                    const double* x) {
    std::vector<double> y(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) {
      double s = 0;
      for (int64_t c = 0; c < k; ++c) s += double(w[r * k + c]) * x[c];
      y[r] = s;
    }
    return y;
  }

  std::vector<double> glu_from(const std::vector<float>& gate, const std::vector<float>& up,
                               const std::vector<float>& down, int64_t i, const float* xt,
                               int64_t h) const {
    std::vector<double> xd(xt, xt + h);
    const auto g = matvec(gate, i, h, xd.data()), u = matvec(up, i, h, xd.data());
    std::vector<double> a(static_cast<size_t>(i));
    for (int64_t c = 0; c < i; ++c) a[c] = g[c] / (1.0 + std::exp(-g[c])) * u[c];
    return matvec(down, h, i, a.data());
  }

  std::vector<double> glu(const std::string& g, const std::string& u, const std::string& d,
                          const float* xt, int64_t h) const {
    const int64_t i = ckpt_.info(g).shape[0];
    return glu_from(ckpt_.to_float(g), ckpt_.to_float(u), ckpt_.to_float(d), i, xt, h);
  }

  std::vector<double> expert(int64_t e, const float* xt, int64_t h) const {
    if (f_.family == "switch") {
      const std::string b = p_ + "experts.expert_" + std::to_string(e) + ".";
      const auto wi = ckpt_.to_float(b + "wi.weight"), wo = ckpt_.to_float(b + "wo.weight");
      const int64_t i = ckpt_.info(b + "wi.weight").shape[0];
      std::vector<double> xd(xt, xt + h);
      auto a = matvec(wi, i, h, xd.data());
      for (auto& v : a) v = v > 0 ? v : 0;
      return matvec(wo, h, i, a.data());
    }
    if (f_.fused) {
      const auto gu = ckpt_.to_float(p_ + "experts.gate_up_proj");
      const auto dn = ckpt_.to_float(p_ + "experts.down_proj");
      const int64_t i = ckpt_.info(p_ + "experts.gate_up_proj").shape[1] / 2;
      const auto* base = gu.data() + e * 2 * i * h;
      return glu_from(std::vector<float>(base, base + i * h),
                      std::vector<float>(base + i * h, base + 2 * i * h),
                      std::vector<float>(dn.begin() + e * h * i, dn.begin() + (e + 1) * h * i), i,
                      xt, h);
    }
    const std::string b = p_ + "experts." + std::to_string(e) + ".";
    if (f_.family == "mixtral")
      return glu(b + "w1.weight", b + "w3.weight", b + "w2.weight", xt, h);
    return glu(b + "gate_proj.weight", b + "up_proj.weight", b + "down_proj.weight", xt, h);
  }

  const Checkpoint& ckpt_;
  std::string p_;
  RefFamily f_;
};

}  // namespace moqe::test
