// The family table (moe/family.hpp) and config.json parsing per family (moe/loader.hpp). Each
// reader takes exactly the keys that family's configuration class and MoE block in transformers
// read, with that class's defaults; docs/families.md is generated from the same table.
#include "moqe/moe/family.hpp"

#include <fmt/core.h>

#include <array>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "../io/json_text.hpp"
#include "moqe/core/error.hpp"
#include "moqe/moe/loader.hpp"

namespace moqe {
namespace {

using Names = std::span<const std::string_view>;

// Reads config.json keys with a family's defaults; every error names the file and the key.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& j, std::string where, std::string_view family)
      : j_(j), where_(std::move(where)), family_(family) {}

  bool has(std::string_view key) const {
    const auto it = j_.find(key);
    return it != j_.end() && !it->is_null();
  }
  // The first of `keys` present (aliases, as transformers' attribute_map), or nullptr.
  const nlohmann::json* find(std::initializer_list<std::string_view> keys,
                             std::string_view* which) const {
    for (std::string_view k : keys) {
      const auto it = j_.find(k);
      if (it != j_.end() && !it->is_null()) {
        *which = k;
        return &*it;
      }
    }
    return nullptr;
  }
  int64_t integer(std::initializer_list<std::string_view> keys, std::optional<int64_t> def) const {
    std::string_view k = *keys.begin();
    const nlohmann::json* v = find(keys, &k);
    if (v == nullptr) return required(k, def);
    MOQE_CHECK(v->is_number_integer(), "{}: '{}' must be an integer, got {}", where_, k,
               detail::json_brief(*v));
    return v->get<int64_t>();
  }
  double number(std::string_view key, std::optional<double> def) const {
    std::string_view k = key;
    const nlohmann::json* v = find({key}, &k);
    if (v == nullptr) return required(k, def);
    MOQE_CHECK(v->is_number(), "{}: '{}' must be a number, got {}", where_, k,
               detail::json_brief(*v));
    const double d = v->get<double>();
    // 1e999 parses as inf, and a double past the float range has no float value.
    MOQE_CHECK(std::fabs(d) <= std::numeric_limits<float>::max(),
               "{}: '{}' = {} is not a finite float", where_, k, d);
    return d;
  }
  bool boolean(std::string_view key, bool def) const {
    std::string_view k = key;
    const nlohmann::json* v = find({key}, &k);
    if (v == nullptr) return def;
    MOQE_CHECK(v->is_boolean(), "{}: '{}' must be true or false, got {}", where_, k,
               detail::json_brief(*v));
    return v->get<bool>();
  }
  std::string string(std::string_view key, std::string_view def) const {
    std::string_view k = key;
    const nlohmann::json* v = find({key}, &k);
    if (v == nullptr) return std::string(def);
    MOQE_CHECK(v->is_string(), "{}: '{}' must be a string, got {}", where_, k,
               detail::json_brief(*v));
    return v->get<std::string>();
  }
  // An integer, or a list of integers per layer (HunYuan).
  int64_t integer_or_list(std::string_view key, int64_t def, std::vector<int64_t>& list) const {
    std::string_view k = key;
    const nlohmann::json* v = find({key}, &k);
    if (v == nullptr) return def;
    if (v->is_array()) {
      MOQE_CHECK(!v->empty(), "{}: '{}' is an empty list", where_, k);
      for (const auto& e : *v) {
        MOQE_CHECK(e.is_number_integer(), "{}: '{}' must hold integers, got {}", where_, k,
                   detail::json_brief(e));
        list.push_back(e.get<int64_t>());
      }
      return list.front();
    }
    MOQE_CHECK(v->is_number_integer(), "{}: '{}' must be an integer or a list of integers, got {}",
               where_, k, detail::json_brief(*v));
    return v->get<int64_t>();
  }
  Activation activation(std::string_view key, std::string_view def) const {
    const std::string act = string(key, def);
    const auto a = parse_activation(act);
    MOQE_CHECK(a.has_value(),
               "{}: unsupported activation {} = '{}' (silu, swish, gelu, gelu_new, "
               "gelu_pytorch_tanh, gelu_fast, relu)",
               where_, key, act);
    return *a;
  }
  const nlohmann::json& json() const { return j_; }
  const std::string& where() const { return where_; }

 private:
  template <class T>
  T required(std::string_view key, std::optional<T> def) const {
    MOQE_CHECK(def.has_value(),
               "{}: the {} family needs '{}', which is missing (transformers has no default "
               "for it)",
               where_, family_, key);
    return *def;
  }
  const nlohmann::json& j_;
  std::string where_;
  std::string_view family_;
};

void set_experts(MoeConfig& c, int64_t e, int64_t k) {
  c.router.num_experts = e;
  c.router.top_k = k;
}

// The config.json key that gave the top-k (for messages).
std::string_view top_k_key(Family f) {
  switch (f) {
    case Family::kErnie4_5Moe:
      return "moe_k";
    case Family::kHunYuanV1Moe:
      return "moe_topk";
    case Family::kDbrx:
      return "ffn_config.moe_top_k";
    default:
      return "num_experts_per_tok";
  }
}

// DeepSeek-V3-style sigmoid routing: correction bias, groups, renormalization, scaling.
void sigmoid_routing(const ConfigReader& r, MoeConfig& c, int64_t n_group, int64_t topk_group,
                     double scaling, bool norm) {
  c.router.kind = RouterKind::kDeepSeekV3;
  c.router.n_group = r.integer({"n_group"}, n_group);
  c.router.topk_group = r.integer({"topk_group"}, topk_group);
  c.router.routed_scaling_factor = static_cast<float>(r.number("routed_scaling_factor", scaling));
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", norm);
  c.correction_bias = true;
}

void read_mixtral(const ConfigReader& r, MoeConfig& c) {  // mixtral, minimax
  set_experts(c, r.integer({"num_local_experts", "num_experts"}, 8),
              r.integer({"num_experts_per_tok"}, 2));
  c.router.kind = RouterKind::kMixtral;
  c.activation = r.activation("hidden_act", "silu");
}

void read_qwen2_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 60), r.integer({"num_experts_per_tok"}, 4));
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", false);
  c.activation = r.activation("hidden_act", "silu");
  c.shared = true;
}

void read_qwen3_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts", "num_local_experts"}, 128),
              r.integer({"num_experts_per_tok"}, 8));
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", false);
  c.activation = r.activation("hidden_act", "silu");
}

void read_qwen3_next(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 512), r.integer({"num_experts_per_tok"}, 10));
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", true);
  c.activation = r.activation("hidden_act", "silu");
  c.shared = true;
}

void read_qwen3_5_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 256), r.integer({"num_experts_per_tok"}, 8));
  c.router.kind = RouterKind::kMixtral;  // always renormalized: the class has no norm_topk_prob
  c.activation = r.activation("hidden_act", "silu");
  c.shared = true;
}

void read_olmoe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts", "num_local_experts"}, 64),
              r.integer({"num_experts_per_tok"}, 8));
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", false);
  c.activation = r.activation("hidden_act", "silu");
}

void read_flex_olmo(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts", "num_local_experts"}, 7),
              r.integer({"num_experts_per_tok"}, 5));
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", false);
  c.activation = r.activation("hidden_act", "silu");
}

void read_deepseek_v2(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"n_routed_experts", "num_experts"}, 64),
              r.integer({"num_experts_per_tok"}, std::nullopt));
  c.router.kind = RouterKind::kDeepSeekV2;
  const std::string method = r.string("topk_method", "greedy");
  MOQE_CHECK(method == "greedy" || method == "group_limited_greedy",
             "{}: deepseek_v2 topk_method '{}' is not one transformers computes (greedy, "
             "group_limited_greedy)",
             r.where(), method);
  c.router.topk_method = method == "greedy" ? TopkMethod::kGreedy : TopkMethod::kGroupLimitedGreedy;
  if (c.router.topk_method == TopkMethod::kGroupLimitedGreedy) {
    c.router.n_group = r.integer({"n_group"}, std::nullopt);
    c.router.topk_group = r.integer({"topk_group"}, std::nullopt);
  }
  c.router.routed_scaling_factor = static_cast<float>(r.number("routed_scaling_factor", 1.0));
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"n_shared_experts"}, 2) > 0;
  c.shared_biases = r.boolean("mlp_bias", false);
}

void read_deepseek_v3(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"n_routed_experts", "num_local_experts"}, 256),
              r.integer({"num_experts_per_tok"}, 8));
  sigmoid_routing(r, c, 8, 4, 2.5, true);
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"n_shared_experts"}, 1) > 0;
}

void read_glm4_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"n_routed_experts", "num_local_experts"}, 128),
              r.integer({"num_experts_per_tok"}, 8));
  sigmoid_routing(r, c, 1, 1, 1.0, true);
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"n_shared_experts"}, 1) > 0;
}

void read_glm4_moe_lite(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"n_routed_experts", "num_local_experts"}, 64),
              r.integer({"num_experts_per_tok"}, 4));
  sigmoid_routing(r, c, 1, 1, 1.8, true);
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"n_shared_experts"}, 1) > 0;
}

void read_dots1(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"n_routed_experts", "num_local_experts"}, std::nullopt),
              r.integer({"num_experts_per_tok"}, std::nullopt));
  sigmoid_routing(r, c, 1, 1, 1.0, false);
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"n_shared_experts"}, std::nullopt) > 0;
}

void read_cohere2_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 8), r.integer({"num_experts_per_tok"}, 2));
  const std::string fn = r.string("expert_selection_fn", "softmax");
  MOQE_CHECK(fn == "softmax" || fn == "sigmoid",
             "{}: cohere2_moe expert_selection_fn '{}' must be softmax or sigmoid", r.where(), fn);
  c.router.kind = fn == "softmax" ? RouterKind::kTopKSoftmax : RouterKind::kTopKSigmoid;
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", true);
  c.router.norm_epsilon = 0;  // sigmoid scores / their sum
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"num_shared_experts"}, 0) > 0;
  const std::string combine = r.string("shared_expert_combination_strategy", "average");
  MOQE_CHECK(combine == "sum" || combine == "average",
             "{}: cohere2_moe shared_expert_combination_strategy '{}' must be sum or average",
             r.where(), combine);
  c.shared_combine = combine == "sum" ? SharedCombine::kAdd : SharedCombine::kAverage;
}

void read_switch(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 8), 1);
  c.router.kind = RouterKind::kSwitch;
  c.router.expert_capacity = r.integer({"expert_capacity"}, 64);
  c.activation = r.activation("dense_act_fn", "relu");
  c.router_bias = r.boolean("router_bias", false);
  const std::string dtype = r.string("router_dtype", "float32");
  MOQE_CHECK(dtype == "float32",
             "{}: switch_transformers router_dtype '{}' is not supported (float32: moqe computes "
             "the router in fp32)",
             r.where(), dtype);
}

void read_phimoe(const ConfigReader& r, MoeConfig& c) {
  // transformers' sparsemixer always routes to two experts, whatever num_experts_per_tok says.
  set_experts(c, r.integer({"num_local_experts"}, 16), 2);
  c.router.kind = RouterKind::kSparseMixer;
  c.router.jitter_eps = static_cast<float>(r.number("router_jitter_noise", 0.01));
  c.activation = r.activation("hidden_act", "silu");
}

void read_minimax_m2(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_local_experts", "num_experts"}, 256),
              r.integer({"num_experts_per_tok"}, 8));
  c.router.kind = RouterKind::kDeepSeekV3;  // one group, always renormalized, no epsilon
  c.router.norm_topk_prob = true;
  c.router.norm_epsilon = 0;
  c.correction_bias = true;
  c.activation = r.activation("hidden_act", "silu");
}

void read_exaone_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 64), r.integer({"num_experts_per_tok"}, 8));
  sigmoid_routing(r, c, 1, 1, 2.5, true);
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"num_shared_experts"}, 1) > 0;
}

void read_ernie4_5_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"moe_num_experts", "num_experts"}, 64),
              r.integer({"moe_k", "num_experts_per_tok"}, 6));
  c.router.norm_topk_prob = true;  // divided by max(sum, moe_norm_min)
  c.router.norm_epsilon = 0;
  c.router.norm_min = static_cast<float>(r.number("moe_norm_min", 1e-12));
  c.correction_bias = true;
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"moe_num_shared_experts"}, 2) > 0;
  c.shared_biases = r.boolean("use_bias", false);
}

void read_lfm2_moe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 32), r.integer({"num_experts_per_tok"}, 4));
  c.router.kind = RouterKind::kDeepSeekV3;  // one group
  c.router.norm_topk_prob = r.boolean("norm_topk_prob", true);
  c.router.norm_epsilon = 1e-6f;
  c.router.routed_scaling_factor = static_cast<float>(r.number("routed_scaling_factor", 1.0));
  c.correction_bias = r.boolean("use_expert_bias", true);
  c.activation = Activation::kSilu;  // its experts call F.silu; hidden_act is not read
}

void read_hunyuan(const ConfigReader& r, MoeConfig& c) {
  const int64_t e = r.integer_or_list("num_experts", 1, c.layer_num_experts);
  const int64_t k = r.integer_or_list("moe_topk", 1, c.layer_top_k);
  set_experts(c, e, k);
  c.router.kind = RouterKind::kMixtral;
  c.activation = r.activation("hidden_act", "silu");
  c.shared = true;
}

void read_afmoe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_experts"}, 64), r.integer({"num_experts_per_tok"}, 6));
  c.router.kind = RouterKind::kDeepSeekV3;  // one group, always renormalized
  c.router.norm_topk_prob = true;
  c.router.routed_scaling_factor = static_cast<float>(r.number("route_scale", 1.0));
  c.correction_bias = true;
  c.activation = r.activation("hidden_act", "silu");
  c.shared = r.integer({"num_shared_experts"}, 2) > 0;
}

void read_gpt_oss(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_local_experts", "num_experts"}, 128),
              r.integer({"num_experts_per_tok"}, 4));
  c.router.kind = RouterKind::kTopKSoftmax;
  c.router_bias = true;
  c.swiglu = ClampedSwiglu{static_cast<float>(r.number("swiglu_alpha", 1.702)),
                           static_cast<float>(r.number("swiglu_limit", 7.0))};
}

void read_llama4_text(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_local_experts"}, 16), r.integer({"num_experts_per_tok"}, 1));
  c.router.kind = RouterKind::kTopKSigmoid;
  c.router.scale_input = true;
  c.activation = r.activation("hidden_act", "silu");
  c.shared = true;
}

void read_granitemoe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_local_experts"}, 8), r.integer({"num_experts_per_tok"}, 2));
  c.router.kind = RouterKind::kTopKSoftmax;
  c.activation = r.activation("hidden_act", "silu");
}

void read_granitemoeshared(const ConfigReader& r, MoeConfig& c) {
  read_granitemoe(r, c);
  c.shared = r.integer({"shared_intermediate_size"}, 0) > 0;
}

void read_jetmoe(const ConfigReader& r, MoeConfig& c) {
  set_experts(c, r.integer({"num_local_experts"}, 8), r.integer({"num_experts_per_tok"}, 2));
  c.router.kind = RouterKind::kTopKSoftmax;
  c.activation = r.activation("activation_function", "silu");
}

void read_dbrx(const ConfigReader& top, MoeConfig& c) {
  // Every MoE key lives in ffn_config (DbrxFFNConfig's defaults when it is absent).
  static const nlohmann::json kEmpty = nlohmann::json::object();
  const nlohmann::json& f = top.has("ffn_config") ? top.json()["ffn_config"] : kEmpty;
  MOQE_CHECK(f.is_object(), "{}: 'ffn_config' must be an object, got {}", top.where(),
             detail::json_brief(f));
  const ConfigReader r(f, top.where() + " (ffn_config)", "dbrx");
  set_experts(c, r.integer({"moe_num_experts"}, 4), r.integer({"moe_top_k"}, 1));
  c.router.kind = RouterKind::kSoftmaxTopK;
  if (r.has("moe_normalize_expert_weights") || !f.contains("moe_normalize_expert_weights")) {
    c.router.norm_topk_prob = true;
    c.router.norm_p = static_cast<float>(r.number("moe_normalize_expert_weights", 1.0));
    c.router.norm_epsilon = 0;
  }  // null: not normalized
  std::string act = "silu";
  if (r.has("ffn_act_fn")) {
    const nlohmann::json& a = f["ffn_act_fn"];
    MOQE_CHECK(a.is_object(), "{}: 'ffn_config.ffn_act_fn' must be an object, got {}", top.where(),
               detail::json_brief(a));
    act = ConfigReader(a, top.where() + " (ffn_config.ffn_act_fn)", "dbrx").string("name", "silu");
  }
  const auto parsed = parse_activation(act);
  MOQE_CHECK(parsed.has_value(), "{}: unsupported activation ffn_config.ffn_act_fn.name = '{}'",
             top.where(), act);
  c.activation = *parsed;
}

using Reader = void (*)(const ConfigReader&, MoeConfig&);

struct Entry {
  FamilyInfo info;
  Reader read;
  bool text_config;  // the MoE keys may sit in a nested text_config (multimodal checkpoints)
};

constexpr std::string_view kGateUpDown[] = {"gate_proj", "up_proj", "down_proj"};

#define MOQE_NAMES(var, ...) constexpr std::string_view var[] = {__VA_ARGS__}
MOQE_NAMES(kMtMixtral, "mixtral");
MOQE_NAMES(kArMixtral, "MixtralForCausalLM");
MOQE_NAMES(kMtMiniMax, "minimax");
MOQE_NAMES(kArMiniMax, "MiniMaxForCausalLM");
MOQE_NAMES(kMtQwen2, "qwen2_moe");
MOQE_NAMES(kArQwen2, "Qwen2MoeForCausalLM");
MOQE_NAMES(kMtQwen3, "qwen3_moe");
MOQE_NAMES(kArQwen3, "Qwen3MoeForCausalLM");
MOQE_NAMES(kMtQwen3Next, "qwen3_next");
MOQE_NAMES(kArQwen3Next, "Qwen3NextForCausalLM");
MOQE_NAMES(kMtQwen3_5, "qwen3_5_moe", "qwen3_5_moe_text");
MOQE_NAMES(kArQwen3_5, "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM");
MOQE_NAMES(kMtOlmoe, "olmoe");
MOQE_NAMES(kArOlmoe, "OlmoeForCausalLM");
MOQE_NAMES(kMtFlexOlmo, "flex_olmo");
MOQE_NAMES(kArFlexOlmo, "FlexOlmoForCausalLM");
MOQE_NAMES(kMtDsV2, "deepseek_v2");
MOQE_NAMES(kArDsV2, "DeepseekV2ForCausalLM");
MOQE_NAMES(kMtDsV3, "deepseek_v3", "kimi_k2");
MOQE_NAMES(kArDsV3, "DeepseekV3ForCausalLM");
MOQE_NAMES(kMtGlm4, "glm4_moe");
MOQE_NAMES(kArGlm4, "Glm4MoeForCausalLM");
MOQE_NAMES(kMtGlm4Lite, "glm4_moe_lite");
MOQE_NAMES(kArGlm4Lite, "Glm4MoeLiteForCausalLM");
MOQE_NAMES(kMtDots1, "dots1");
MOQE_NAMES(kArDots1, "Dots1ForCausalLM");
MOQE_NAMES(kMtCohere2, "cohere2_moe");
MOQE_NAMES(kArCohere2, "Cohere2MoeForCausalLM");
MOQE_NAMES(kMtSwitch, "switch_transformers", "switch");
MOQE_NAMES(kArSwitch, "SwitchTransformersForConditionalGeneration");
MOQE_NAMES(kMtPhimoe, "phimoe");
MOQE_NAMES(kArPhimoe, "PhimoeForCausalLM");
MOQE_NAMES(kMtMiniMaxM2, "minimax_m2");
MOQE_NAMES(kArMiniMaxM2, "MiniMaxM2ForCausalLM");
MOQE_NAMES(kMtExaone, "exaone_moe");
MOQE_NAMES(kArExaone, "ExaoneMoeForCausalLM");
MOQE_NAMES(kMtErnie, "ernie4_5_moe");
MOQE_NAMES(kArErnie, "Ernie4_5_MoeForCausalLM");
MOQE_NAMES(kMtLfm2, "lfm2_moe");
MOQE_NAMES(kArLfm2, "Lfm2MoeForCausalLM");
MOQE_NAMES(kMtHunyuan, "hunyuan_v1_moe");
MOQE_NAMES(kArHunyuan, "HunYuanMoEV1ForCausalLM");
MOQE_NAMES(kMtAfmoe, "afmoe");
MOQE_NAMES(kArAfmoe, "AfmoeForCausalLM");
MOQE_NAMES(kMtGptOss, "gpt_oss");
MOQE_NAMES(kArGptOss, "GptOssForCausalLM");
MOQE_NAMES(kMtLlama4, "llama4_text", "llama4");
MOQE_NAMES(kArLlama4, "Llama4ForCausalLM", "Llama4ForConditionalGeneration");
MOQE_NAMES(kMtGranite, "granitemoe");
MOQE_NAMES(kArGranite, "GraniteMoeForCausalLM");
MOQE_NAMES(kMtGraniteShared, "granitemoeshared");
MOQE_NAMES(kArGraniteShared, "GraniteMoeSharedForCausalLM");
MOQE_NAMES(kMtJetMoe, "jetmoe");
MOQE_NAMES(kArJetMoe, "JetMoeForCausalLM");
MOQE_NAMES(kMtDbrx, "dbrx");
MOQE_NAMES(kArDbrx, "DbrxForCausalLM");
#undef MOQE_NAMES

constexpr std::string_view kV3Routing =
    "sigmoid; top-k of sigmoid + e_score_correction_bias within the topk_group best of n_group "
    "groups (scored by their top 2); weights the sigmoids, renormalized iff norm_topk_prob "
    "(+1e-20), "
    "times routed_scaling_factor";
constexpr std::string_view kGlu = "down(act(gate x) * up x)";

// clang-format off
const Entry kTable[] = {
  {{Family::kMixtral, "mixtral", kMtMixtral, kArMixtral, "model.layers.N.block_sparse_moe",
    "gate.weight", "", "", ExpertLayout::kPerExpert, "w1", "w3", "w2", SharedLayout::kNone, "", "",
    "", "softmax, top-k, renormalized", kGlu,
    "num_local_experts (8), num_experts_per_tok (2), hidden_act (silu)"},
   read_mixtral, false},
  {{Family::kMiniMax, "minimax", kMtMiniMax, kArMiniMax, "model.layers.N.block_sparse_moe",
    "gate.weight", "", "", ExpertLayout::kPerExpert, "w1", "w3", "w2", SharedLayout::kNone, "", "",
    "", "softmax, top-k, renormalized", kGlu,
    "num_local_experts (8), num_experts_per_tok (2), hidden_act (silu)"},
   read_mixtral, false},
  {{Family::kQwen2Moe, "qwen2_moe", kMtQwen2, kArQwen2, "model.layers.N.mlp", "gate.weight", "", "",
    ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1], kGateUpDown[2],
    SharedLayout::kGateUpDown, "shared_expert", "shared_expert_gate.weight", "",
    "softmax, top-k, renormalized iff norm_topk_prob",
    "down(act(gate x) * up x); plus sigmoid(shared_expert_gate x) * shared_expert(x)",
    "num_experts (60), num_experts_per_tok (4), norm_topk_prob (false), hidden_act (silu)"},
   read_qwen2_moe, false},
  {{Family::kQwen3Moe, "qwen3_moe", kMtQwen3, kArQwen3, "model.layers.N.mlp", "gate.weight", "", "",
    ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1], kGateUpDown[2], SharedLayout::kNone,
    "", "", "", "softmax, top-k, renormalized iff norm_topk_prob", kGlu,
    "num_experts (128), num_experts_per_tok (8), norm_topk_prob (false), hidden_act (silu)"},
   read_qwen3_moe, false},
  {{Family::kQwen3Next, "qwen3_next", kMtQwen3Next, kArQwen3Next, "model.layers.N.mlp",
    "gate.weight", "", "", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1],
    kGateUpDown[2], SharedLayout::kGateUpDown, "shared_expert", "shared_expert_gate.weight", "",
    "softmax, top-k, renormalized iff norm_topk_prob",
    "down(act(gate x) * up x); plus sigmoid(shared_expert_gate x) * shared_expert(x)",
    "num_experts (512), num_experts_per_tok (10), norm_topk_prob (true), hidden_act (silu)"},
   read_qwen3_next, false},
  {{Family::kQwen3_5Moe, "qwen3_5_moe", kMtQwen3_5, kArQwen3_5, "model.language_model.layers.N.mlp",
    "gate.weight", "", "", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1],
    kGateUpDown[2], SharedLayout::kGateUpDown, "shared_expert", "shared_expert_gate.weight", "",
    "softmax, top-k, always renormalized",
    "down(act(gate x) * up x); plus sigmoid(shared_expert_gate x) * shared_expert(x)",
    "num_experts (256), num_experts_per_tok (8), hidden_act (silu); in text_config for "
    "qwen3_5_moe"},
   read_qwen3_5_moe, true},
  {{Family::kOlmoe, "olmoe", kMtOlmoe, kArOlmoe, "model.layers.N.mlp", "gate.weight", "", "",
    ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1], kGateUpDown[2], SharedLayout::kNone,
    "", "", "", "softmax, top-k, renormalized iff norm_topk_prob", kGlu,
    "num_experts (64), num_experts_per_tok (8), norm_topk_prob (false), hidden_act (silu)"},
   read_olmoe, false},
  {{Family::kFlexOlmo, "flex_olmo", kMtFlexOlmo, kArFlexOlmo, "model.layers.N.mlp", "gate.weight",
    "", "", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1], kGateUpDown[2],
    SharedLayout::kNone, "", "", "", "softmax, top-k, renormalized iff norm_topk_prob", kGlu,
    "num_experts (7), num_experts_per_tok (5), norm_topk_prob (false), hidden_act (silu)"},
   read_flex_olmo, false},
  {{Family::kDeepSeekV2, "deepseek_v2", kMtDsV2, kArDsV2, "model.layers.N.mlp", "gate.weight", "",
    "", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1], kGateUpDown[2],
    SharedLayout::kGateUpDown, "shared_experts", "", "",
    "softmax; greedy or group_limited_greedy (groups scored by their max); weights times "
    "routed_scaling_factor, never renormalized (norm_topk_prob is not read)",
    "down(act(gate x) * up x); plus shared_experts(x) (with biases iff mlp_bias)",
    "n_routed_experts (64), num_experts_per_tok (required), topk_method (greedy), n_group and "
    "topk_group (required for group_limited_greedy), routed_scaling_factor (1.0), "
    "n_shared_experts (2), mlp_bias (false), hidden_act (silu)"},
   read_deepseek_v2, false},
  {{Family::kDeepSeekV3, "deepseek_v3", kMtDsV3, kArDsV3, "model.layers.N.mlp", "gate.weight", "",
    "gate.e_score_correction_bias", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1],
    kGateUpDown[2], SharedLayout::kGateUpDown, "shared_experts", "", "", kV3Routing,
    "down(act(gate x) * up x); plus shared_experts(x)",
    "n_routed_experts (256), num_experts_per_tok (8), n_group (8), topk_group (4), "
    "routed_scaling_factor (2.5), norm_topk_prob (true), n_shared_experts (1), hidden_act (silu); "
    "topk_method and scoring_func are not read (transformers does not read them)"},
   read_deepseek_v3, false},
  {{Family::kGlm4Moe, "glm4_moe", kMtGlm4, kArGlm4, "model.layers.N.mlp", "gate.weight", "",
    "gate.e_score_correction_bias", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1],
    kGateUpDown[2], SharedLayout::kGateUpDown, "shared_experts", "", "", kV3Routing,
    "down(act(gate x) * up x); plus shared_experts(x)",
    "n_routed_experts (128), num_experts_per_tok (8), n_group (1), topk_group (1), "
    "routed_scaling_factor (1.0), norm_topk_prob (true), n_shared_experts (1), hidden_act (silu)"},
   read_glm4_moe, false},
  {{Family::kGlm4MoeLite, "glm4_moe_lite", kMtGlm4Lite, kArGlm4Lite, "model.layers.N.mlp",
    "gate.weight", "", "gate.e_score_correction_bias", ExpertLayout::kPerExpert, kGateUpDown[0],
    kGateUpDown[1], kGateUpDown[2], SharedLayout::kGateUpDown, "shared_experts", "", "", kV3Routing,
    "down(act(gate x) * up x); plus shared_experts(x)",
    "n_routed_experts (64), num_experts_per_tok (4), n_group (1), topk_group (1), "
    "routed_scaling_factor (1.8), norm_topk_prob (true), n_shared_experts (1), hidden_act (silu)"},
   read_glm4_moe_lite, false},
  {{Family::kDots1, "dots1", kMtDots1, kArDots1, "model.layers.N.mlp", "gate.weight", "",
    "gate.e_score_correction_bias", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1],
    kGateUpDown[2], SharedLayout::kGateUpDown, "shared_experts", "", "", kV3Routing,
    "down(act(gate x) * up x); plus shared_experts(x)",
    "n_routed_experts (required), num_experts_per_tok (required), n_shared_experts (required), "
    "n_group (1), topk_group (1), routed_scaling_factor (1.0), norm_topk_prob (false), "
    "hidden_act (silu)"},
   read_dots1, false},
  {{Family::kCohere2Moe, "cohere2_moe", kMtCohere2, kArCohere2, "model.layers.N.mlp", "gate.weight",
    "", "", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1], kGateUpDown[2],
    SharedLayout::kGateUpDown, "shared_experts", "", "",
    "top-k of the logits; weights softmax over them (expert_selection_fn softmax) or their sigmoids, "
    "renormalized iff norm_topk_prob (sigmoid)",
    "down(act(gate x) * up x); plus shared_experts(x) when num_shared_experts > 0, summed or "
    "averaged (shared_expert_combination_strategy)",
    "num_experts (8), num_experts_per_tok (2), expert_selection_fn (softmax), norm_topk_prob "
    "(true), num_shared_experts (0), shared_expert_combination_strategy (average), hidden_act "
    "(silu)"},
   read_cohere2_moe, false},
  {{Family::kSwitch, "switch_transformers", kMtSwitch, kArSwitch, "encoder.block.N.layer.1.mlp",
    "router.classifier.weight", "router.classifier.bias", "", ExpertLayout::kSwitch, "", "wi", "wo",
    SharedLayout::kNone, "", "", "",
    "softmax, top-1, expert_capacity tokens per expert per sequence in token order; a token over "
    "capacity outputs 0 (--switch-dropped passthrough: p_max x, transformers 4)",
    "wo(act(wi x))",
    "num_experts (8), expert_capacity (64), router_bias (false: a router bias is read when "
    "present), router_dtype (float32), dense_act_fn (relu)"},
   read_switch, false},
  {{Family::kPhimoe, "phimoe", kMtPhimoe, kArPhimoe, "model.layers.N.block_sparse_moe",
    "gate.weight", "", "", ExpertLayout::kPerExpert, "w1", "w3", "w2", SharedLayout::kNone, "", "",
    "",
    "sparsemixer (inference): two experts, each weighted by its softmax over the logits within "
    "2 router_jitter_noise (relative) of it", kGlu,
    "num_local_experts (16), router_jitter_noise (0.01), hidden_act (silu); num_experts_per_tok is "
    "not read (always 2)"},
   read_phimoe, false},
  {{Family::kMiniMaxM2, "minimax_m2", kMtMiniMaxM2, kArMiniMaxM2, "model.layers.N.block_sparse_moe",
    "gate.weight", "", "e_score_correction_bias", ExpertLayout::kPerExpert, "w1", "w3", "w2",
    SharedLayout::kNone, "", "", "",
    "sigmoid; top-k of sigmoid + e_score_correction_bias; weights the sigmoids, renormalized",
    kGlu, "num_local_experts (256), num_experts_per_tok (8), hidden_act (silu)"},
   read_minimax_m2, false},
  {{Family::kExaoneMoe, "exaone_moe", kMtExaone, kArExaone, "model.layers.N.mlp", "gate.weight", "",
    "e_score_correction_bias", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1],
    kGateUpDown[2], SharedLayout::kGateUpDown, "shared_experts", "", "", kV3Routing,
    "down(act(gate x) * up x); plus shared_experts(x)",
    "num_experts (64), num_experts_per_tok (8), n_group (1), topk_group (1), "
    "routed_scaling_factor (2.5), norm_topk_prob (true), num_shared_experts (1), hidden_act "
    "(silu)"},
   read_exaone_moe, false},
  {{Family::kErnie4_5Moe, "ernie4_5_moe", kMtErnie, kArErnie, "model.layers.N.mlp", "gate.weight",
    "", "moe_statics.e_score_correction_bias", ExpertLayout::kPerExpert, kGateUpDown[0],
    kGateUpDown[1], kGateUpDown[2], SharedLayout::kGateUpDown, "shared_experts", "", "",
    "softmax; top-k of softmax + e_score_correction_bias; weights the softmax values divided by "
    "max(their sum, moe_norm_min)",
    "down(act(gate x) * up x); plus shared_experts(x) when moe_num_shared_experts > 0 (with "
    "biases iff use_bias)",
    "moe_num_experts (64), moe_k (6), moe_num_shared_experts (2), moe_norm_min (1e-12), use_bias "
    "(false), hidden_act (silu)"},
   read_ernie4_5_moe, false},
  {{Family::kLfm2Moe, "lfm2_moe", kMtLfm2, kArLfm2, "model.layers.N.feed_forward", "gate.weight",
    "", "expert_bias", ExpertLayout::kPerExpert, "w1", "w3", "w2", SharedLayout::kNone, "", "", "",
    "sigmoid; top-k of sigmoid (+ expert_bias iff use_expert_bias); weights the sigmoids, "
    "renormalized iff norm_topk_prob (+1e-6), times routed_scaling_factor",
    "down(silu(gate x) * up x) (hidden_act is not read)",
    "num_experts (32), num_experts_per_tok (4), use_expert_bias (true), norm_topk_prob (true), "
    "routed_scaling_factor (1.0)"},
   read_lfm2_moe, false},
  {{Family::kHunYuanV1Moe, "hunyuan_v1_moe", kMtHunyuan, kArHunyuan, "model.layers.N.mlp",
    "gate.wg.weight", "", "", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1],
    kGateUpDown[2], SharedLayout::kGateUpDown, "shared_mlp", "", "",
    "softmax, top-k, renormalized",
    "down(act(gate x) * up x); plus shared_mlp(x)",
    "num_experts (1), moe_topk (1), each an integer or a list per layer; hidden_act (silu)"},
   read_hunyuan, false},
  {{Family::kAfmoe, "afmoe", kMtAfmoe, kArAfmoe, "model.layers.N.mlp", "router.gate.weight", "",
    "expert_bias", ExpertLayout::kPerExpert, kGateUpDown[0], kGateUpDown[1], kGateUpDown[2],
    SharedLayout::kGateUpDown, "shared_experts", "", "",
    "sigmoid; top-k of sigmoid + expert_bias; weights the sigmoids, renormalized (+1e-20), times "
    "route_scale",
    "down(act(gate x) * up x); plus shared_experts(x)",
    "num_experts (64), num_experts_per_tok (6), num_shared_experts (2), route_scale (1.0), "
    "hidden_act (silu)"},
   read_afmoe, false},
  {{Family::kGptOss, "gpt_oss", kMtGptOss, kArGptOss, "model.layers.N.mlp", "router.weight",
    "router.bias", "", ExpertLayout::kGptOss, "", "", "", SharedLayout::kNone, "", "", "",
    "top-k of the logits (router bias included); weights softmax over them",
    "down(min(g, limit) sigmoid(alpha min(g, limit)) (clamp(u, -limit, limit) + 1)) + "
    "down_bias, g and u gate x and up x with their biases",
    "num_local_experts (128), num_experts_per_tok (4), swiglu_alpha (1.702), swiglu_limit (7.0)"},
   read_gpt_oss, false},
  {{Family::kLlama4Text, "llama4_text", kMtLlama4, kArLlama4, "model.layers.N.feed_forward",
    "router.weight", "", "", ExpertLayout::kLlama4, "", "", "", SharedLayout::kGateUpDown,
    "shared_expert", "", "",
    "top-k of the logits; weights their sigmoids, which scale the expert's input",
    "down(act(gate w x) * up w x) for weight w; plus shared_expert(x)",
    "num_local_experts (16), num_experts_per_tok (1), hidden_act (silu); in text_config for "
    "llama4"},
   read_llama4_text, true},
  {{Family::kGraniteMoe, "granitemoe", kMtGranite, kArGranite, "model.layers.N.block_sparse_moe",
    "router.layer.weight", "", "", ExpertLayout::kInputOutputLinear, "", "", "",
    SharedLayout::kNone, "", "", "", "top-k of the logits; weights softmax over them", kGlu,
    "num_local_experts (8), num_experts_per_tok (2), hidden_act (silu)"},
   read_granitemoe, false},
  {{Family::kGraniteMoeShared, "granitemoeshared", kMtGraniteShared, kArGraniteShared,
    "model.layers.N.block_sparse_moe", "router.layer.weight", "", "",
    ExpertLayout::kInputOutputLinear, "", "", "", SharedLayout::kInputOutput, "../shared_mlp", "",
    "", "top-k of the logits; weights softmax over them",
    "down(act(gate x) * up x); plus the layer's shared_mlp(x) when shared_intermediate_size > 0",
    "num_local_experts (8), num_experts_per_tok (2), shared_intermediate_size (0), hidden_act "
    "(silu)"},
   read_granitemoeshared, false},
  {{Family::kJetMoe, "jetmoe", kMtJetMoe, kArJetMoe, "model.layers.N.mlp", "router.layer.weight",
    "", "", ExpertLayout::kInputOutputLinear, "", "", "", SharedLayout::kNone, "", "", "bias",
    "top-k of the logits; weights softmax over them",
    "down(act(gate x) * up x); plus the layer's output bias",
    "num_local_experts (8), num_experts_per_tok (2), activation_function (silu)"},
   read_jetmoe, false},
  {{Family::kDbrx, "dbrx", kMtDbrx, kArDbrx, "transformer.blocks.N.ffn", "router.layer.weight", "",
    "", ExpertLayout::kDbrx, "", "", "", SharedLayout::kNone, "", "", "",
    "softmax, top-k, divided by the moe_normalize_expert_weights-norm of the chosen (none when "
    "null)", kGlu,
    "ffn_config: moe_num_experts (4), moe_top_k (1), moe_normalize_expert_weights (1.0), "
    "ffn_act_fn.name (silu)"},
   read_dbrx, false},
};
// clang-format on

const Entry& entry(Family f) {
  for (const Entry& e : kTable) {
    if (e.info.family == f) return e;
  }
  MOQE_FAIL("unknown family {}", static_cast<int>(f));
}

nlohmann::json parse_config_file(const std::filesystem::path& path) {
  // A FIFO or device could block or never end; real configs are a few kB.
  constexpr uintmax_t kMaxConfigBytes = 16 << 20;
  std::error_code ec;
  const std::filesystem::file_status st = std::filesystem::status(path, ec);
  MOQE_CHECK(std::filesystem::exists(st), "cannot open config {}: no such file", path.string());
  MOQE_CHECK(std::filesystem::is_regular_file(st), "config {}: not a regular file", path.string());
  const uintmax_t size = std::filesystem::file_size(path, ec);
  MOQE_CHECK(!ec, "config {}: cannot stat: {}", path.string(), ec.message());
  MOQE_CHECK(size <= kMaxConfigBytes, "config {}: {} bytes exceeds the limit of {} bytes",
             path.string(), size, kMaxConfigBytes);
  std::ifstream f(path);
  MOQE_CHECK(f.good(), "cannot open config {}", path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    MOQE_FAIL("{}: not valid JSON ({})", path.string(), e.what());
  }
  MOQE_CHECK(j.is_object(), "{}: the config is not a JSON object", path.string());
  return j;
}

std::string string_key(const nlohmann::json& j, const char* key, const std::string& where) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return {};
  MOQE_CHECK(it->is_string(), "{}: '{}' must be a string, got {}", where, key,
             detail::json_brief(*it));
  return it->get<std::string>();
}

// The family a model_type (or, failing that, an architectures entry) names.
std::optional<Family> family_of(const nlohmann::json& j, const std::string& where,
                                std::string* model_type) {
  *model_type = string_key(j, "model_type", where);
  if (!model_type->empty()) {
    for (const Entry& e : kTable) {
      for (std::string_view m : e.info.model_types) {
        if (m == *model_type) return e.info.family;
      }
    }
    return std::nullopt;
  }
  const auto arch = j.find("architectures");
  if (arch != j.end() && arch->is_array()) {
    for (const auto& a : *arch) {
      if (!a.is_string()) continue;
      for (const Entry& e : kTable) {
        for (std::string_view n : e.info.architectures) {
          if (n == a.get<std::string>()) return e.info.family;
        }
      }
    }
  }
  return std::nullopt;
}

}  // namespace

std::span<const FamilyInfo> families() {
  static const std::vector<FamilyInfo> infos = [] {
    std::vector<FamilyInfo> v;
    for (const Entry& e : kTable) v.push_back(e.info);
    return v;
  }();
  return infos;
}

const FamilyInfo& family_info(Family f) { return entry(f).info; }

std::string_view to_string(Family f) { return entry(f).info.name; }

std::optional<Family> parse_family(std::string_view s) {
  for (const Entry& e : kTable) {
    for (std::string_view m : e.info.model_types) {
      if (m == s) return e.info.family;
    }
  }
  return std::nullopt;
}

std::string supported_families() {
  std::string out;
  for (const Entry& e : kTable) {
    if (!out.empty()) out.append(", ");
    out.append(e.info.name);
  }
  return out;
}

std::string families_markdown() {
  std::string md =
      "| family | model_type | layer prefix | router | routing | experts | config keys "
      "(transformers' defaults) |\n|---|---|---|---|---|---|---|\n";
  for (const Entry& e : kTable) {
    const FamilyInfo& f = e.info;
    std::string router = fmt::format("`{}`", f.router);
    if (!f.router_bias.empty()) router += fmt::format(", bias `{}`", f.router_bias);
    if (!f.correction_bias.empty()) {
      router += fmt::format(", selection bias `{}`", f.correction_bias);
    }
    std::string types;
    for (std::string_view m : f.model_types) {
      if (!types.empty()) types.append(", ");
      types.append("`").append(m).append("`");
    }
    md += fmt::format("| {} | {} | `{}` | {} | {} | {} | {} |\n", f.name, types, f.layer, router,
                      f.routing, f.experts, f.config_keys);
  }
  return md;
}

MoeConfig MoeConfig::for_layer(std::string_view prefix) const {
  if (layer_num_experts.empty() && layer_top_k.empty()) return *this;
  // The layer index follows "layers." in the prefix (model.layers.7.mlp).
  const size_t at = prefix.find("layers.");
  int64_t layer = -1;
  if (at != std::string_view::npos) {
    layer = 0;
    size_t i = at + 7;
    const size_t digits = i;
    for (; i < prefix.size() && prefix[i] >= '0' && prefix[i] <= '9'; ++i) {
      layer = layer * 10 + (prefix[i] - '0');
      if (layer > (1 << 20)) break;
    }
    if (i == digits) layer = -1;
  }
  MOQE_CHECK(layer >= 0,
             "{}: num_experts / moe_topk are given per layer, and the prefix '{}' names no layer "
             "(model.layers.N...)",
             to_string(family), prefix);
  MoeConfig c = *this;
  auto pick = [&](const std::vector<int64_t>& list, const char* key) {
    MOQE_CHECK(layer < static_cast<int64_t>(list.size()),
               "{}: '{}' lists {} layers; the prefix '{}' is layer {}", to_string(family), key,
               list.size(), prefix, layer);
    return list[static_cast<size_t>(layer)];
  };
  if (!layer_num_experts.empty()) c.router.num_experts = pick(layer_num_experts, "num_experts");
  if (!layer_top_k.empty()) c.router.top_k = pick(layer_top_k, "moe_topk");
  c.layer_num_experts.clear();
  c.layer_top_k.clear();
  MOQE_CHECK(c.router.top_k > 0 && c.router.top_k <= c.router.num_experts,
             "{}: layer {} routes to {} of {} experts", to_string(family), layer, c.router.top_k,
             c.router.num_experts);
  return c;
}

Family detect_family(const std::filesystem::path& path) {
  const nlohmann::json j = parse_config_file(path);
  std::string model_type;
  const std::optional<Family> f = family_of(j, path.string(), &model_type);
  MOQE_CHECK(f.has_value() || !model_type.empty(),
             "{}: no model_type (nor a known architectures entry) says which MoE family this is; "
             "pass --family (supported: {})",
             path.string(), supported_families());
  MOQE_CHECK(f.has_value(), "{}: model_type '{}' is not an MoE family moqe knows; supported: {}",
             path.string(), model_type, supported_families());
  return *f;
}

MoeConfig read_moe_config(const std::filesystem::path& path) {
  return read_moe_config(path, detect_family(path));
}

MoeConfig read_moe_config(const std::filesystem::path& path, Family family,
                          bool allow_other_model_type) {
  const nlohmann::json j = parse_config_file(path);
  const std::string where = path.string();
  std::string model_type;
  const std::optional<Family> named = family_of(j, where, &model_type);
  const Entry& e = entry(family);
  if (!allow_other_model_type) {
    MOQE_CHECK(model_type.empty() || (named.has_value() && *named == family),
               "{}: model_type '{}' {}, but the family asked for is {}; drop --family to use the "
               "config's, or allow the mismatch for a custom model (--family-override)",
               where, model_type,
               named ? fmt::format("is the {} family", to_string(*named))
                     : std::string("is not a family moqe knows"),
               e.info.name);
  }
  MoeConfig c;
  c.family = family;
  c.model_type = model_type;
  // Multimodal checkpoints (qwen3_5_moe, llama4) keep the language model's keys in text_config.
  const nlohmann::json* keys = &j;
  std::string where_keys = where;
  const auto text = j.find("text_config");
  if (e.text_config && text != j.end() && text->is_object()) {
    keys = &*text;
    where_keys = where + " (text_config)";
  }
  const ConfigReader reader(*keys, where_keys, e.info.name);
  e.read(reader, c);
  MOQE_CHECK(c.router.num_experts > 0, "{}: the number of experts must be positive, got {}", where,
             c.router.num_experts);
  MOQE_CHECK(c.router.top_k > 0 && c.router.top_k <= c.router.num_experts,
             "{}: {} {} must be between 1 and the {} experts", where, top_k_key(family),
             c.router.top_k, c.router.num_experts);
  for (const int64_t v : c.layer_num_experts) {
    MOQE_CHECK(v > 0, "{}: num_experts lists {}, which must be positive", where, v);
  }
  return c;
}

}  // namespace moqe
