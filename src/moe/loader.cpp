#include "moqe/moe/loader.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>

#include "../io/json_text.hpp"
#include "moqe/core/error.hpp"
#include "moqe/io/quantized_format.hpp"

namespace moqe {
namespace {

constexpr Family kFamilies[] = {Family::kMixtral, Family::kQwen2Moe,   Family::kQwen3Moe,
                                Family::kOlmoe,   Family::kDeepSeekV2, Family::kDeepSeekV3,
                                Family::kSwitch};

std::string join(std::string_view prefix, std::string_view rest) {
  return prefix.empty() ? std::string(rest) : std::string(prefix) + "." + std::string(rest);
}

// A dense or quantized 2-D weight with its expected shape checked.
QuantizedLinear load_linear(const Checkpoint& ckpt, const std::string& name, int64_t n, int64_t k,
                            Numerics numerics) {
  const std::string where = ckpt.path().string();
  if (is_quantized(ckpt, name)) {
    QuantizedMatrix q = load_quantized(ckpt, name);
    MOQE_CHECK(q.rows() == n && q.cols() == k,
               "{}: tensor '{}' has shape [{}, {}], expected [{}, {}]", where, name, q.rows(),
               q.cols(), n, k);
    return QuantizedLinear::from_quantized(std::move(q), numerics);
  }
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}' (expected shape [{}, {}])", where, name,
             n, k);
  const TensorInfo& t = ckpt.info(name);
  MOQE_CHECK(t.shape == std::vector<int64_t>({n, k}),
             "{}: tensor '{}' has shape {}, expected [{}, {}]", where, name,
             shape_to_string(t.shape), n, k);
  if (t.dtype == DType::kF16 || t.dtype == DType::kBF16) {
    const auto b = ckpt.bytes(name);
    std::vector<uint16_t> bits(static_cast<size_t>(n * k));
    if (!bits.empty()) std::memcpy(bits.data(), b.data(), b.size());
    return QuantizedLinear::from_half(std::move(bits), t.dtype, n, k);
  }
  DenseWeight w = load_weight_f32(ckpt, name);
  return QuantizedLinear::from_f32(std::move(w.values), n, k);
}

bool has_weight(const Checkpoint& ckpt, const std::string& name) {
  return is_quantized(ckpt, name) || ckpt.contains(name);
}

// Shape of a 2-D weight (quantized or not) or an error naming it.
std::vector<int64_t> shape_of(const Checkpoint& ckpt, const std::string& name) {
  MOQE_CHECK(has_weight(ckpt, name), "{}: missing tensor '{}'", ckpt.path().string(), name);
  return weight_shape(ckpt, name);
}

// Slice e of a 3-D fused tensor [E, R, C] as a linear of `rows` rows starting at `row0`.
QuantizedLinear slice_fused(const Checkpoint& ckpt, const std::string& name, int64_t e,
                            int64_t row0, int64_t rows) {
  const TensorInfo& t = ckpt.info(name);
  const int64_t r = t.shape[1], c = t.shape[2];
  const size_t es = dtype_size(t.dtype);
  const auto bytes = ckpt.bytes(name).subspan(static_cast<size_t>((e * r + row0) * c) * es,
                                              static_cast<size_t>(rows * c) * es);
  if (t.dtype == DType::kF16 || t.dtype == DType::kBF16) {
    std::vector<uint16_t> bits(static_cast<size_t>(rows * c));
    std::memcpy(bits.data(), bytes.data(), bytes.size());
    return QuantizedLinear::from_half(std::move(bits), t.dtype, rows, c);
  }
  MOQE_CHECK(t.dtype == DType::kF32,
             "{}: fused expert tensor '{}' is {}; F32, F16 or BF16 expected", ckpt.path().string(),
             name, dtype_name(t.dtype));
  std::vector<float> v(static_cast<size_t>(rows * c));
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return QuantizedLinear::from_f32(std::move(v), rows, c);
}

std::vector<float> load_vector(const Checkpoint& ckpt, const std::string& name, int64_t n) {
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}' (expected [{}])", ckpt.path().string(),
             name, n);
  const TensorInfo& t = ckpt.info(name);
  int64_t numel = 1;
  for (int64_t d : t.shape) numel *= d;
  MOQE_CHECK(numel == n, "{}: tensor '{}' has shape {}, expected {} values", ckpt.path().string(),
             name, shape_to_string(t.shape), n);
  return ckpt.to_float(name);
}

}  // namespace

std::string_view to_string(Family f) {
  switch (f) {
    case Family::kMixtral:
      return "mixtral";
    case Family::kQwen2Moe:
      return "qwen2_moe";
    case Family::kQwen3Moe:
      return "qwen3_moe";
    case Family::kOlmoe:
      return "olmoe";
    case Family::kDeepSeekV2:
      return "deepseek_v2";
    case Family::kDeepSeekV3:
      return "deepseek_v3";
    case Family::kSwitch:
      return "switch";
  }
  return "?";
}

std::optional<Family> parse_family(std::string_view s) {
  for (Family f : kFamilies) {
    if (to_string(f) == s) return f;
  }
  return std::nullopt;
}

std::string supported_families() {
  std::string out;
  for (Family f : kFamilies) out += (out.empty() ? "" : ", ") + std::string(to_string(f));
  return out;
}

std::filesystem::path default_config_path(const std::filesystem::path& weights) {
  if (std::filesystem::is_directory(weights)) return weights / "config.json";
  return weights.parent_path() / "config.json";
}

MoeConfig read_moe_config(const std::filesystem::path& path, Family family) {
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
  auto get_int = [&](const char* key, int64_t def) -> int64_t {
    if (!j.contains(key) || j[key].is_null()) return def;
    MOQE_CHECK(j[key].is_number_integer(), "{}: '{}' must be an integer, got {}", path.string(),
               key, detail::json_brief(j[key]));
    return j[key].get<int64_t>();
  };
  auto get_num = [&](const char* key, double def) -> double {
    if (!j.contains(key) || j[key].is_null()) return def;
    MOQE_CHECK(j[key].is_number(), "{}: '{}' must be a number, got {}", path.string(), key,
               detail::json_brief(j[key]));
    return j[key].get<double>();
  };
  auto get_bool = [&](const char* key, bool def) -> bool {
    if (!j.contains(key) || j[key].is_null()) return def;
    MOQE_CHECK(j[key].is_boolean(), "{}: '{}' must be true or false, got {}", path.string(), key,
               detail::json_brief(j[key]));
    return j[key].get<bool>();
  };
  auto get_str = [&](const char* key, const char* def) -> std::string {
    if (!j.contains(key) || j[key].is_null()) return def;
    MOQE_CHECK(j[key].is_string(), "{}: '{}' must be a string, got {}", path.string(), key,
               detail::json_brief(j[key]));
    return j[key].get<std::string>();
  };
  MoeConfig c;
  c.family = family;
  std::string act = "silu";
  switch (family) {
    case Family::kMixtral:
      c.num_experts = get_int("num_local_experts", get_int("num_experts", 8));
      c.top_k = get_int("num_experts_per_tok", 2);
      c.norm_topk_prob = true;
      act = get_str("hidden_act", "silu");
      break;
    case Family::kQwen2Moe:
    case Family::kQwen3Moe:
    case Family::kOlmoe:
      // transformers 5 may write "num_experts": null beside "num_local_experts".
      c.num_experts =
          get_int("num_experts", get_int("num_local_experts", family == Family::kQwen2Moe   ? 60
                                                              : family == Family::kQwen3Moe ? 128
                                                                                            : 64));
      c.top_k = get_int("num_experts_per_tok", family == Family::kQwen2Moe ? 4 : 8);
      c.norm_topk_prob = get_bool("norm_topk_prob", false);
      act = get_str("hidden_act", "silu");
      break;
    case Family::kDeepSeekV2:
    case Family::kDeepSeekV3: {
      const bool v3 = family == Family::kDeepSeekV3;
      c.num_experts = get_int("n_routed_experts", v3 ? 256 : 64);
      c.top_k = get_int("num_experts_per_tok", v3 ? 8 : 6);
      c.n_shared_experts = get_int("n_shared_experts", v3 ? 1 : 2);
      c.n_group = get_int("n_group", v3 ? 8 : 1);
      c.topk_group = get_int("topk_group", v3 ? 4 : 1);
      const double scaling = get_num("routed_scaling_factor", v3 ? 2.5 : 1.0);
      // 1e999 parses as inf, and a double past the float range has no float value: every
      // routing weight would be inf or NaN.
      MOQE_CHECK(std::fabs(scaling) <= std::numeric_limits<float>::max(),
                 "{}: routed_scaling_factor {} is not a finite float", path.string(), scaling);
      c.routed_scaling_factor = static_cast<float>(scaling);
      c.norm_topk_prob = get_bool("norm_topk_prob", v3);
      act = get_str("hidden_act", "silu");
      const std::string method = get_str("topk_method", v3 ? "noaux_tc" : "greedy");
      if (v3) {
        MOQE_CHECK(method == "noaux_tc",
                   "{}: deepseek_v3 topk_method '{}' is not supported "
                   "(noaux_tc)",
                   path.string(), method);
        const std::string scoring = get_str("scoring_func", "sigmoid");
        MOQE_CHECK(scoring == "sigmoid",
                   "{}: deepseek_v3 scoring_func '{}' is not supported "
                   "(sigmoid)",
                   path.string(), scoring);
      } else {
        MOQE_CHECK(method == "greedy" || method == "group_limited_greedy",
                   "{}: deepseek_v2 topk_method '{}' is not supported (greedy, "
                   "group_limited_greedy)",
                   path.string(), method);
        c.topk_method = method == "greedy" ? TopkMethod::kGreedy : TopkMethod::kGroupLimitedGreedy;
        const std::string scoring = get_str("scoring_func", "softmax");
        MOQE_CHECK(scoring == "softmax",
                   "{}: deepseek_v2 scoring_func '{}' is not supported "
                   "(softmax)",
                   path.string(), scoring);
      }
      break;
    }
    case Family::kSwitch:
      c.num_experts = get_int("num_experts", 8);
      c.top_k = 1;
      c.expert_capacity = get_int("expert_capacity", 64);
      act = get_str("dense_act_fn", "relu");
      break;
  }
  auto a = parse_activation(act);
  MOQE_CHECK(a.has_value(),
             "{}: unsupported activation '{}' (silu, gelu, gelu_new, "
             "gelu_pytorch_tanh, relu)",
             path.string(), act);
  c.activation = *a;
  MOQE_CHECK(c.num_experts > 0, "{}: the number of experts must be positive, got {}", path.string(),
             c.num_experts);
  MOQE_CHECK(c.top_k > 0 && c.top_k <= c.num_experts,
             "{}: num_experts_per_tok {} must be between 1 and the {} experts", path.string(),
             c.top_k, c.num_experts);
  return c;
}

MoELayer load_moe_layer(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& c,
                        const LoadOptions& options) {
  MoeLayerParts parts = load_moe_parts(ckpt, prefix, c, options);
  return MoELayer(std::move(parts.router), std::move(parts.experts), std::move(parts.shared));
}

MoeLayerParts load_moe_parts(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& c,
                             const LoadOptions& options,
                             std::optional<std::span<const int64_t>> which) {
  const std::string where = ckpt.path().string();
  const int64_t e_count = c.num_experts;
  const bool is_switch = c.family == Family::kSwitch;

  // Router.
  const std::string gate_name =
      join(prefix, is_switch ? "router.classifier.weight" : "gate.weight");
  const std::vector<int64_t> gshape = shape_of(ckpt, gate_name);
  MOQE_CHECK(gshape.size() == 2 && gshape[0] == e_count,
             "{}: router '{}' has shape {}, expected [{}, hidden] for {} experts", where, gate_name,
             shape_to_string(gshape), e_count, e_count);
  const int64_t h = gshape[1];
  MOQE_CHECK(!ckpt.contains(join(prefix, is_switch ? "router.classifier.bias" : "gate.bias")),
             "{}: router biases are not supported ('{}')", where,
             join(prefix, is_switch ? "router.classifier.bias" : "gate.bias"));
  RouterConfig rc;
  rc.num_experts = e_count;
  rc.top_k = c.top_k;
  rc.norm_topk_prob = c.norm_topk_prob;
  switch (c.family) {
    case Family::kMixtral:
      rc.kind = RouterKind::kMixtral;
      break;
    case Family::kQwen2Moe:
    case Family::kQwen3Moe:
    case Family::kOlmoe:
      rc.kind = RouterKind::kSoftmaxTopK;
      break;
    case Family::kDeepSeekV2:
    case Family::kDeepSeekV3:
      rc.kind = c.family == Family::kDeepSeekV2 ? RouterKind::kDeepSeekV2 : RouterKind::kDeepSeekV3;
      rc.topk_method = c.topk_method;
      rc.n_group = c.n_group;
      rc.topk_group = c.topk_group;
      rc.routed_scaling_factor = c.routed_scaling_factor;
      if (c.family == Family::kDeepSeekV3) {
        const std::string bias = join(prefix, "gate.e_score_correction_bias");
        rc.correction_bias = ckpt.contains(bias)
                                 ? load_vector(ckpt, bias, e_count)
                                 : std::vector<float>(static_cast<size_t>(e_count), 0.0f);
      }
      break;
    case Family::kSwitch:
      rc.kind = RouterKind::kSwitch;
      rc.expert_capacity = c.expert_capacity;
      rc.switch_passthrough = options.switch_passthrough;
      break;
  }
  Router router(std::move(rc), load_weight_f32(ckpt, gate_name, options.num_threads).values, h);
  std::vector<int64_t> selected;
  if (which) {
    for (const int64_t e : *which) {
      MOQE_CHECK(e >= 0 && e < e_count, "{}: expert {} requested of the {} experts of '{}'", where,
                 e, e_count, prefix);
      selected.push_back(e);
    }
  } else {
    for (int64_t e = 0; e < e_count; ++e) selected.push_back(e);
  }

  // Experts: per-expert tensors, or the fused 3-D layout.
  std::vector<std::shared_ptr<const ExpertMLP>> experts;
  const std::string fused_gu = join(prefix, "experts.gate_up_proj");
  const std::string fused_down = join(prefix, "experts.down_proj");
  const bool fused = !is_switch && ckpt.contains(fused_gu);
  if (fused) {
    MOQE_CHECK(ckpt.contains(fused_down), "{}: '{}' present but '{}' missing", where, fused_gu,
               fused_down);
    const TensorInfo& gu = ckpt.info(fused_gu);
    const TensorInfo& dn = ckpt.info(fused_down);
    MOQE_CHECK(
        gu.shape.size() == 3 && gu.shape[0] == e_count && gu.shape[2] == h && gu.shape[1] % 2 == 0,
        "{}: tensor '{}' has shape {}, expected [{}, 2 * intermediate, {}]", where, fused_gu,
        shape_to_string(gu.shape), e_count, h);
    const int64_t i = gu.shape[1] / 2;
    MOQE_CHECK(dn.shape == std::vector<int64_t>({e_count, h, i}),
               "{}: tensor '{}' has shape {}, expected [{}, {}, {}]", where, fused_down,
               shape_to_string(dn.shape), e_count, h, i);
    for (const int64_t e : selected) {
      experts.push_back(std::make_shared<const ExpertMLP>(ExpertMLP::glu(
          slice_fused(ckpt, fused_gu, e, 0, i), slice_fused(ckpt, fused_gu, e, i, i),
          slice_fused(ckpt, fused_down, e, 0, h), c.activation, options.fuse_gate_up)));
    }
  } else {
    for (const int64_t e : selected) {
      if (is_switch) {
        const std::string base = join(prefix, "experts.expert_" + std::to_string(e));
        const bool gated = has_weight(ckpt, base + ".wi_0.weight");
        const std::string up_name = base + (gated ? ".wi_1.weight" : ".wi.weight");
        const std::vector<int64_t> us = shape_of(ckpt, up_name);
        MOQE_CHECK(us.size() == 2 && us[1] == h,
                   "{}: tensor '{}' has shape {}, expected [d_ff, {}]", where, up_name,
                   shape_to_string(us), h);
        const int64_t i = us[0];
        QuantizedLinear up = load_linear(ckpt, up_name, i, h, options.numerics);
        QuantizedLinear down = load_linear(ckpt, base + ".wo.weight", h, i, options.numerics);
        experts.push_back(std::make_shared<const ExpertMLP>(
            gated
                ? ExpertMLP::glu(load_linear(ckpt, base + ".wi_0.weight", i, h, options.numerics),
                                 std::move(up), std::move(down), c.activation, options.fuse_gate_up)
                : ExpertMLP::mlp(std::move(up), std::move(down), c.activation)));
        continue;
      }
      const std::string base = join(prefix, "experts." + std::to_string(e));
      const bool mixtral = c.family == Family::kMixtral;
      const std::string g = base + (mixtral ? ".w1.weight" : ".gate_proj.weight");
      const std::string u = base + (mixtral ? ".w3.weight" : ".up_proj.weight");
      const std::string d = base + (mixtral ? ".w2.weight" : ".down_proj.weight");
      const std::vector<int64_t> gs = shape_of(ckpt, g);
      MOQE_CHECK(gs.size() == 2 && gs[1] == h,
                 "{}: tensor '{}' has shape {}, expected [intermediate, {}]", where, g,
                 shape_to_string(gs), h);
      const int64_t i = gs[0];
      experts.push_back(std::make_shared<const ExpertMLP>(ExpertMLP::glu(
          load_linear(ckpt, g, i, h, options.numerics),
          load_linear(ckpt, u, i, h, options.numerics),
          load_linear(ckpt, d, h, i, options.numerics), c.activation, options.fuse_gate_up)));
    }
  }

  // Shared experts.
  std::vector<SharedExpert> shared;
  auto load_shared = [&](const std::string& base) {
    const std::vector<int64_t> gs = shape_of(ckpt, base + ".gate_proj.weight");
    MOQE_CHECK(gs.size() == 2 && gs[1] == h,
               "{}: tensor '{}' has shape {}, expected [intermediate, {}]", where,
               base + ".gate_proj.weight", shape_to_string(gs), h);
    const int64_t i = gs[0];
    return std::make_shared<const ExpertMLP>(
        ExpertMLP::glu(load_linear(ckpt, base + ".gate_proj.weight", i, h, options.numerics),
                       load_linear(ckpt, base + ".up_proj.weight", i, h, options.numerics),
                       load_linear(ckpt, base + ".down_proj.weight", h, i, options.numerics),
                       c.activation, options.fuse_gate_up));
  };
  if (c.family == Family::kQwen2Moe) {
    const std::string base = join(prefix, "shared_expert");
    const bool has = has_weight(ckpt, base + ".gate_proj.weight");
    if (has) {
      SharedExpert s;
      s.mlp = load_shared(base);
      s.gate = load_vector(ckpt, join(prefix, "shared_expert_gate.weight"), h);
      shared.push_back(std::move(s));
    }
  } else if (c.family == Family::kDeepSeekV2 || c.family == Family::kDeepSeekV3) {
    const std::string base = join(prefix, "shared_experts");
    const bool has = has_weight(ckpt, base + ".gate_proj.weight");
    MOQE_CHECK(has || c.n_shared_experts == 0,
               "{}: config has n_shared_experts = {} but tensor '{}' is missing", where,
               c.n_shared_experts, base + ".gate_proj.weight");
    if (has) shared.push_back({load_shared(base), {}});
  }
  return {std::move(router), std::move(experts), std::move(shared), h};
}

}  // namespace moqe
