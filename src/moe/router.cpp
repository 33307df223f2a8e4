#include "moqe/moe/router.hpp"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "moqe/core/threading.hpp"
#include "moqe/gemm/linear.hpp"

namespace moqe {
namespace {

// a ranks above b (values va, vb at indices ia < ib or not): larger first, NaN last, then the
// lower index.
inline bool ranks_above(float va, int64_t ia, float vb, int64_t ib) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na != nb) return nb;
  if (!na && va != vb) return va > vb;
  return ia < ib;
}

void softmax_inplace(float* v, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, v[i]);
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = std::exp(v[i] - m);
    sum += v[i];
  }
  for (int64_t i = 0; i < n; ++i) v[i] /= sum;
}

// w[0..k) divided by the norm of the chosen weights (RouterConfig: renormalization).
void renormalize(float* w, int64_t k, const RouterConfig& c) {
  float norm = 0;
  if (c.norm_p == 1.0f) {
    for (int64_t j = 0; j < k; ++j) norm += w[j];
  } else {
    for (int64_t j = 0; j < k; ++j) norm += std::pow(std::fabs(w[j]), c.norm_p);
    norm = std::pow(norm, 1.0f / c.norm_p);
  }
  const float d = std::max(norm + c.norm_epsilon, c.norm_min);
  for (int64_t j = 0; j < k; ++j) w[j] /= d;
}

// Phi-3.5-MoE's sparsemixer at inference (transformers' sparsemixer with training off): the
// best expert, weighted by its softmax over the logits within 2 eps (relative) of it, then the
// best of the rest, weighted the same way over the rest. Division and comparison as written there.
void sparsemixer(const float* p, int64_t e, float eps, int32_t* ids, float* w,
                 std::vector<float>& masked) {
  masked.assign(p, p + e);
  for (int pick = 0; pick < 2; ++pick) {
    int32_t best = 0;
    topk_indices(masked.data(), e, 1, &best);
    const float m = masked[best];
    float sum = 0;
    for (int64_t j = 0; j < e; ++j) {
      const float factor = std::max(std::fabs(p[j]), m);
      const bool out = (m - p[j]) / factor > 2 * eps || masked[j] == -INFINITY;
      if (!out) sum += std::exp(masked[j] - m);
    }
    ids[pick] = best;
    w[pick] = std::exp(masked[best] - m) / sum;
    masked[best] = -INFINITY;
  }
}

// Saturates: a huge capacity_factor means no limit, and casting past int64 would be undefined.
int64_t ceil_div(double a, double b) {
  const double q = std::ceil(a / b);
  return q < 9.2e18 ? static_cast<int64_t>(q) : std::numeric_limits<int64_t>::max();
}

}  // namespace

std::string_view to_string(RouterKind kind) {
  switch (kind) {
    case RouterKind::kSoftmaxTopK:
      return "softmax_topk";
    case RouterKind::kMixtral:
      return "mixtral";
    case RouterKind::kDeepSeekV2:
      return "deepseek_v2";
    case RouterKind::kDeepSeekV3:
      return "deepseek_v3";
    case RouterKind::kSwitch:
      return "switch";
    case RouterKind::kTask:
      return "task";
    case RouterKind::kExpertChoice:
      return "expert_choice";
    case RouterKind::kTopKSoftmax:
      return "topk_softmax";
    case RouterKind::kTopKSigmoid:
      return "topk_sigmoid";
    case RouterKind::kSparseMixer:
      return "sparsemixer";
  }
  return "?";
}

std::optional<RouterKind> parse_router_kind(std::string_view s) {
  for (RouterKind k :
       {RouterKind::kSoftmaxTopK, RouterKind::kMixtral, RouterKind::kDeepSeekV2,
        RouterKind::kDeepSeekV3, RouterKind::kSwitch, RouterKind::kTask, RouterKind::kExpertChoice,
        RouterKind::kTopKSoftmax, RouterKind::kTopKSigmoid, RouterKind::kSparseMixer}) {
    if (to_string(k) == s) return k;
  }
  return std::nullopt;
}

void topk_indices(const float* v, int64_t n, int64_t k, int32_t* out, const uint8_t* excluded) {
  // Repeated selection: k is small (<= 8 in practice) and this keeps the tie rule obvious.
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (excluded != nullptr && excluded[i]) continue;
      bool taken = false;
      for (int64_t p = 0; p < j; ++p) taken = taken || out[p] == i;
      if (taken) continue;
      if (best < 0 || ranks_above(v[i], i, v[best], best)) best = i;
    }
    out[j] = static_cast<int32_t>(best);
  }
}

std::string check_router_config(const RouterConfig& c) {
  const int64_t e = c.num_experts;
  if (e <= 0) return fmt::format("num_experts must be positive, got {}", e);
  if (c.kind != RouterKind::kExpertChoice && (c.top_k <= 0 || c.top_k > e)) {
    return fmt::format("top_k {} must be between 1 and num_experts {}", c.top_k, e);
  }
  if (c.kind == RouterKind::kExpertChoice && c.top_k <= 0) {
    return fmt::format("top_k {} must be positive", c.top_k);
  }
  if (c.kind == RouterKind::kSwitch && c.top_k != 1) {
    return fmt::format("the switch router is top-1, got top_k {}", c.top_k);
  }
  if (!(c.capacity_factor >= 0) || std::isinf(c.capacity_factor)) {  // NaN fails >= too
    return fmt::format("capacity_factor {} must be finite and >= 0", c.capacity_factor);
  }
  if (c.expert_capacity < 0)
    return fmt::format("expert_capacity {} is negative", c.expert_capacity);
  const bool grouped =
      c.kind == RouterKind::kDeepSeekV3 ||
      (c.kind == RouterKind::kDeepSeekV2 && c.topk_method == TopkMethod::kGroupLimitedGreedy);
  if (grouped) {
    if (c.n_group <= 0 || e % c.n_group != 0) {
      return fmt::format("n_group {} must divide num_experts {}", c.n_group, e);
    }
    if (c.topk_group <= 0 || c.topk_group > c.n_group) {
      return fmt::format("topk_group {} must be between 1 and n_group {}", c.topk_group, c.n_group);
    }
    if (c.top_k > c.topk_group * (e / c.n_group)) {
      return fmt::format("top_k {} exceeds the {} experts of the {} kept groups", c.top_k,
                         c.topk_group * (e / c.n_group), c.topk_group);
    }
    if (c.kind == RouterKind::kDeepSeekV3 && e / c.n_group < 2) {
      return fmt::format(
          "deepseek_v3 scores groups by their top 2: {} experts per group is too few",
          e / c.n_group);
    }
  }
  if (!c.correction_bias.empty()) {
    if (c.kind != RouterKind::kDeepSeekV3 && c.kind != RouterKind::kSoftmaxTopK &&
        c.kind != RouterKind::kMixtral) {
      return fmt::format(
          "a correction bias applies to deepseek_v3, softmax_topk and mixtral "
          "routing, not {}",
          to_string(c.kind));
    }
    if (static_cast<int64_t>(c.correction_bias.size()) != e) {
      return fmt::format("the correction bias has {} values for {} experts",
                         c.correction_bias.size(), e);
    }
  }
  if (!c.router_bias.empty()) {
    if (c.kind == RouterKind::kTask) return "the task router has no logits to bias";
    if (static_cast<int64_t>(c.router_bias.size()) != e) {
      return fmt::format("the router bias has {} values for {} experts", c.router_bias.size(), e);
    }
  }
  if (!(c.norm_epsilon >= 0) || !std::isfinite(c.norm_epsilon) || !(c.norm_min >= 0) ||
      !std::isfinite(c.norm_min)) {
    return fmt::format("norm_epsilon {} and norm_min {} must be finite and >= 0", c.norm_epsilon,
                       c.norm_min);
  }
  if (!(c.norm_p > 0) || !std::isfinite(c.norm_p)) {
    return fmt::format("norm_p {} must be finite and positive", c.norm_p);
  }
  if (c.kind == RouterKind::kSparseMixer) {
    if (c.top_k != 2) return fmt::format("sparsemixer routes to 2 experts, got top_k {}", c.top_k);
    if (!(c.jitter_eps >= 0) || !std::isfinite(c.jitter_eps)) {
      return fmt::format("jitter_eps {} must be finite and >= 0", c.jitter_eps);
    }
  }
  if (c.scale_input && (c.kind == RouterKind::kSwitch || c.kind == RouterKind::kExpertChoice)) {
    return fmt::format("scale_input does not apply to {} routing", to_string(c.kind));
  }
  if (c.kind == RouterKind::kTask) {
    if (c.tasks.empty()) return "the task router needs at least one task";
    for (size_t t = 0; t < c.tasks.size(); ++t) {
      const TaskRoute& r = c.tasks[t];
      if (static_cast<int64_t>(r.experts.size()) != c.top_k ||
          r.weights.size() != r.experts.size()) {
        return fmt::format("task {} has {} experts and {} weights; top_k is {}", t,
                           r.experts.size(), r.weights.size(), c.top_k);
      }
      for (size_t j = 0; j < r.experts.size(); ++j) {
        const int32_t x = r.experts[j];
        if (x < 0 || x >= e) return fmt::format("task {} names expert {} of {}", t, x, e);
        // An expert sees each token at most once (the layer's workspace is sized for that).
        if (std::find(r.experts.begin(), r.experts.begin() + j, x) != r.experts.begin() + j) {
          return fmt::format("task {} names expert {} twice", t, x);
        }
      }
    }
  }
  return {};
}

void Routing::reset(int64_t t, int64_t s, int64_t e) {
  tokens = t;
  slots = s;
  num_experts = e;
  ids.assign(static_cast<size_t>(t * s), -1);
  weights.assign(ids.size(), 0.0f);
  kept.assign(ids.size(), 0);
  passthrough.assign(static_cast<size_t>(t), 0);
  expert_load.assign(static_cast<size_t>(e), 0);
  expert_dropped.assign(static_cast<size_t>(e), 0);
}

Router::Router(RouterConfig config, std::vector<float> gate_weight, int64_t hidden)
    : config_(std::move(config)), gate_(std::move(gate_weight)), hidden_(hidden) {
  const std::string reason = check_router_config(config_);
  MOQE_CHECK(reason.empty(), "{} router: {}", to_string(config_.kind), reason);
  if (config_.kind != RouterKind::kTask) {
    MOQE_CHECK(hidden > 0 && static_cast<int64_t>(gate_.size()) == config_.num_experts * hidden,
               "{} router: the gate weight holds {} values, expected [{}, {}]",
               to_string(config_.kind), gate_.size(), config_.num_experts, hidden);
    gate_linear_ = std::make_shared<const QuantizedLinear>(
        QuantizedLinear::from_f32(gate_, config_.num_experts, hidden));
  }
}

int64_t Router::slots_per_token() const {
  return config_.kind == RouterKind::kExpertChoice ? config_.num_experts : config_.top_k;
}

void Router::logits(MatrixView<const float> x, MatrixView<float> out, int num_threads) const {
  MOQE_CHECK(config_.kind != RouterKind::kTask, "the task router has no logits");
  MOQE_CHECK(x.cols() == hidden_ && out.rows() == x.rows() && out.cols() == config_.num_experts,
             "{} router: logits of x {} into {}, expected [{}, {}] into [{}, {}]",
             to_string(config_.kind), shape_string(x), shape_string(out), x.rows(), hidden_,
             x.rows(), config_.num_experts);
  gate_linear_->forward(x, out, num_threads);
  if (!config_.router_bias.empty()) {
    for (int64_t t = 0; t < out.rows(); ++t) {
      for (int64_t i = 0; i < config_.num_experts; ++i) out(t, i) += config_.router_bias[i];
    }
  }
}

void Router::route(MatrixView<const float> x, Routing& out, const RouteOptions& o) const {
  const RouterConfig& c = config_;
  const int64_t t_count = x.rows(), e = c.num_experts, k = c.top_k, slots = slots_per_token();
  if (c.kind != RouterKind::kTask) {
    MOQE_CHECK(x.cols() == hidden_, "{} router: input {} does not match the hidden size {}",
               to_string(c.kind), shape_string(x), hidden_);
  }
  MOQE_CHECK(o.active.empty() || static_cast<int64_t>(o.active.size()) == t_count,
             "route: the active mask has {} entries for {} tokens", o.active.size(), t_count);
  MOQE_CHECK(o.task_ids.empty() || static_cast<int64_t>(o.task_ids.size()) == t_count,
             "route: {} task ids for {} tokens", o.task_ids.size(), t_count);
  out.reset(t_count, slots, e);
  auto active = [&](int64_t t) { return o.active.empty() || o.active[t] != 0; };

  if (c.kind == RouterKind::kTask) {
    for (int64_t t = 0; t < t_count; ++t) {
      if (!active(t)) continue;
      const int32_t id = o.task_ids.empty() ? o.task_id : o.task_ids[t];
      MOQE_CHECK(id >= 0 && id < static_cast<int32_t>(c.tasks.size()),
                 "task router: task id {} of token {} is not one of the {} tasks", id, t,
                 c.tasks.size());
      for (int64_t j = 0; j < k; ++j) {
        out.ids[t * k + j] = c.tasks[id].experts[j];
        out.weights[t * k + j] = c.tasks[id].weights[j];
        out.kept[t * k + j] = 1;
      }
    }
  } else {
    if (out.scratch.size() < static_cast<size_t>(t_count * e)) out.scratch.resize(t_count * e);
    MatrixView<float> scores(out.scratch.data(), t_count, e);
    logits(x, scores, o.num_threads);
    if (c.kind != RouterKind::kExpertChoice) {
      parallel_for(t_count, o.num_threads, 64, [&](int64_t t0, int64_t t1) {
        // Per-thread scratch, grown once: routing allocates nothing per call after warm-up.
        thread_local std::vector<uint8_t> masked;
        thread_local std::vector<float> choice;
        masked.resize(static_cast<size_t>(e));
        choice.resize(static_cast<size_t>(e));
        // n_group is validated (and used) only by group-limited routing; a greedy DeepSeek-V2
        // config may carry any value there.
        const bool grouped =
            c.kind == RouterKind::kDeepSeekV3 ||
            (c.kind == RouterKind::kDeepSeekV2 && c.topk_method == TopkMethod::kGroupLimitedGreedy);
        const int64_t n_group = grouped ? c.n_group : 1;
        thread_local std::vector<float> group_score;
        thread_local std::vector<int32_t> keep;
        group_score.resize(static_cast<size_t>(n_group));
        keep.resize(static_cast<size_t>(n_group));
        for (int64_t t = t0; t < t1; ++t) {
          if (!active(t)) continue;
          float* p = scores.row(t);
          int32_t* ids = &out.ids[t * slots];
          float* w = &out.weights[t * slots];
          const int64_t gsize = e / n_group;
          auto mask_groups = [&]() {  // keep the topk_group best groups (scored into group_score)
            topk_indices(group_score.data(), c.n_group, c.topk_group, keep.data());
            std::fill(masked.begin(), masked.end(), 1);
            for (int64_t g = 0; g < c.topk_group; ++g) {
              std::fill_n(masked.begin() + keep[g] * gsize, gsize, 0);
            }
          };
          switch (c.kind) {
            case RouterKind::kSoftmaxTopK:
            case RouterKind::kMixtral:
            case RouterKind::kSwitch: {
              softmax_inplace(p, e);
              if (c.correction_bias.empty()) {
                topk_indices(p, e, k, ids);
              } else {  // ERNIE 4.5: chosen by p + bias, weighted by p
                for (int64_t i = 0; i < e; ++i) choice[i] = p[i] + c.correction_bias[i];
                topk_indices(choice.data(), e, k, ids);
              }
              for (int64_t j = 0; j < k; ++j) w[j] = p[ids[j]];
              const bool renorm = c.kind == RouterKind::kMixtral ||
                                  (c.kind == RouterKind::kSoftmaxTopK && c.norm_topk_prob);
              if (renorm) renormalize(w, k, c);
              break;
            }
            case RouterKind::kTopKSoftmax:
            case RouterKind::kTopKSigmoid: {
              topk_indices(p, e, k, ids);
              if (c.kind == RouterKind::kTopKSoftmax) {
                float m = p[ids[0]], sum = 0;
                for (int64_t j = 1; j < k; ++j) m = std::max(m, p[ids[j]]);
                for (int64_t j = 0; j < k; ++j) sum += (w[j] = std::exp(p[ids[j]] - m));
                for (int64_t j = 0; j < k; ++j) w[j] /= sum;
              } else {
                for (int64_t j = 0; j < k; ++j) w[j] = 1.0f / (1.0f + std::exp(-p[ids[j]]));
                if (c.norm_topk_prob) renormalize(w, k, c);
              }
              break;
            }
            case RouterKind::kSparseMixer:
              sparsemixer(p, e, c.jitter_eps, ids, w, choice);
              break;
            case RouterKind::kDeepSeekV2: {
              softmax_inplace(p, e);
              if (c.topk_method == TopkMethod::kGroupLimitedGreedy) {
                for (int64_t g = 0; g < c.n_group; ++g) {
                  group_score[g] = *std::max_element(p + g * gsize, p + (g + 1) * gsize);
                }
                mask_groups();
                // Masked experts score 0 (the reference implementation's fill value).
                for (int64_t i = 0; i < e; ++i) choice[i] = masked[i] ? 0.0f : p[i];
                topk_indices(choice.data(), e, k, ids);
              } else {
                topk_indices(p, e, k, ids);
              }
              // As the Hugging Face implementation: never renormalized (norm_topk_prob is not
              // read for V2), always scaled.
              for (int64_t j = 0; j < k; ++j) w[j] = p[ids[j]] * c.routed_scaling_factor;
              break;
            }
            case RouterKind::kDeepSeekV3: {
              for (int64_t i = 0; i < e; ++i) {
                p[i] = 1.0f / (1.0f + std::exp(-p[i]));
                choice[i] = p[i] + (c.correction_bias.empty() ? 0.0f : c.correction_bias[i]);
              }
              for (int64_t g = 0; g < c.n_group; ++g) {
                int32_t top2[2];
                topk_indices(choice.data() + g * gsize, gsize, 2, top2);
                group_score[g] = choice[g * gsize + top2[0]] + choice[g * gsize + top2[1]];
              }
              mask_groups();
              for (int64_t i = 0; i < e; ++i) {
                if (masked[i]) choice[i] = -INFINITY;
              }
              // Excluded as well as -inf: a kept expert whose score is NaN must not lose its
              // place to a masked one (NaN ranks below -inf).
              topk_indices(choice.data(), e, k, ids, masked.data());
              for (int64_t j = 0; j < k; ++j) w[j] = p[ids[j]];
              if (c.norm_topk_prob) renormalize(w, k, c);
              for (int64_t j = 0; j < k; ++j) w[j] *= c.routed_scaling_factor;
              break;
            }
            default:
              break;
          }
          for (int64_t j = 0; j < k; ++j) out.kept[t * slots + j] = 1;
        }
      });
    } else {  // expert choice: softmax over experts per token, then each expert takes its top C
      for (int64_t t = 0; t < t_count; ++t) {
        if (active(t)) softmax_inplace(scores.row(t), e);
      }
      int64_t n_active = 0;
      for (int64_t t = 0; t < t_count; ++t) n_active += active(t) ? 1 : 0;
      const int64_t cap =
          std::min(n_active, c.expert_capacity > 0 ? c.expert_capacity
                                                   : ceil_div(double(n_active) * k, double(e)));
      parallel_for(e, o.num_threads, 1, [&](int64_t e0, int64_t e1) {
        thread_local std::vector<float> col;
        thread_local std::vector<uint8_t> excluded;
        thread_local std::vector<int32_t> chosen;
        col.resize(static_cast<size_t>(t_count));
        excluded.resize(static_cast<size_t>(t_count));
        chosen.resize(static_cast<size_t>(cap));
        for (int64_t x_e = e0; x_e < e1; ++x_e) {
          for (int64_t t = 0; t < t_count; ++t) {
            col[t] = scores(t, x_e);
            excluded[t] = active(t) ? 0 : 1;
          }
          topk_indices(col.data(), t_count, cap, chosen.data(), excluded.data());
          for (int64_t j = 0; j < cap; ++j) {  // slot x_e of token chosen[j]
            const int64_t s = chosen[j] * slots + x_e;
            out.ids[s] = static_cast<int32_t>(x_e);
            out.weights[s] = col[chosen[j]];
            out.kept[s] = 1;
          }
        }
      });
    }
  }

  // Capacity, in token order (a sequential pass: admission depends on earlier tokens).
  if (c.kind == RouterKind::kSwitch && c.expert_capacity > 0) {
    const int64_t whole[1] = {t_count};
    const std::span<const int64_t> seq =
        o.sequence_lengths.empty() ? std::span<const int64_t>(whole) : o.sequence_lengths;
    int64_t total = 0;
    for (int64_t s : seq) {
      MOQE_CHECK(s >= 0, "switch router: negative sequence length {}", s);
      total += s;
    }
    MOQE_CHECK(total == t_count, "switch router: sequence lengths sum to {}, not {} tokens", total,
               t_count);
    thread_local std::vector<int64_t> load;
    load.resize(static_cast<size_t>(e));
    int64_t t = 0;
    for (int64_t s : seq) {
      std::fill(load.begin(), load.end(), 0);
      for (int64_t end = t + s; t < end; ++t) {
        if (!active(t)) continue;
        const int32_t id = out.ids[t];
        if (++load[id] > c.expert_capacity) {
          out.kept[t] = 0;
          out.passthrough[t] = c.switch_passthrough ? 1 : 0;  // output p_max * x, or 0
          out.expert_dropped[id]++;
        }
      }
    }
  } else if (c.capacity_factor > 0 && c.kind != RouterKind::kExpertChoice) {
    int64_t n_active = 0;
    for (int64_t t = 0; t < t_count; ++t) n_active += active(t) ? 1 : 0;
    const int64_t cap = ceil_div(c.capacity_factor * double(n_active) * double(k), double(e));
    thread_local std::vector<int64_t> load;
    load.assign(static_cast<size_t>(e), 0);
    for (int64_t s = 0; s < t_count * slots; ++s) {
      const int32_t id = out.ids[s];
      if (id < 0 || !out.kept[s]) continue;
      if (++load[id] > cap) {
        out.kept[s] = 0;
        out.expert_dropped[id]++;
      }
    }
  }
  for (int64_t s = 0; s < t_count * slots; ++s) {
    if (out.kept[s]) out.expert_load[out.ids[s]]++;
  }
}

}  // namespace moqe
