#include "moqe/io/synthetic.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <random>

#include "moqe/core/dtypes.hpp"
#include "moqe/core/error.hpp"
#include "moqe/io/safetensors.hpp"

namespace moqe {
namespace {

std::vector<std::byte> encode(const std::vector<float>& v, DType t) {
  std::vector<std::byte> out(v.size() * dtype_size(t));
  if (t == DType::kF32) {
    std::memcpy(out.data(), v.data(), out.size());
  } else {
    for (size_t i = 0; i < v.size(); ++i) {
      const uint16_t h = t == DType::kF16 ? float_to_half_bits(v[i]) : float_to_bf16_bits(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

}  // namespace

std::vector<float> synthetic_weights(int64_t n, int64_t k, uint32_t seed, double outlier_fraction,
                                     float outlier_scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f / std::sqrt(static_cast<float>(k)));
  std::vector<float> w(static_cast<size_t>(n * k));
  for (auto& x : w) x = g(rng);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t c = 0; c < k; ++c) {
    if (u(rng) < outlier_fraction) {
      for (int64_t r = 0; r < n; ++r) w[r * k + c] *= outlier_scale;
    }
  }
  return w;
}

std::string synthetic_moe_prefix(const SyntheticMoeSpec& s, int64_t layer) {
  if (s.family == "mixtral") return fmt::format("model.layers.{}.block_sparse_moe", layer);
  if (s.family == "switch" || s.family == "switch_transformers") {
    return fmt::format("encoder.block.{}.layer.1.mlp", 2 * layer + 1);
  }
  return fmt::format("model.layers.{}.mlp", layer);
}

std::vector<std::filesystem::path> write_synthetic_moe(const std::filesystem::path& dir,
                                                       const SyntheticMoeSpec& s) {
  const std::string& f = s.family;
  const bool mixtral = f == "mixtral", qwen2 = f == "qwen2_moe",
             deepseek = f.starts_with("deepseek_"), v3 = f == "deepseek_v3",
             sw = f == "switch" || f == "switch_transformers";
  MOQE_CHECK(mixtral || qwen2 || f == "qwen3_moe" || f == "olmoe" ||
                 (deepseek && (v3 || f == "deepseek_v2")) || sw,
             "write_synthetic_moe: unknown family '{}'", f);
  MOQE_CHECK(s.dtype == DType::kF32 || s.dtype == DType::kF16 || s.dtype == DType::kBF16,
             "write_synthetic_moe: dtype {} is not F32, F16 or BF16", dtype_name(s.dtype));
  MOQE_CHECK(s.hidden > 0 && s.intermediate > 0 && s.experts > 0 && s.layers > 0 && s.shards > 0 &&
                 s.top_k > 0 && s.top_k <= s.experts,
             "write_synthetic_moe: invalid sizes");
  MOQE_CHECK(!(sw && s.fused_experts), "write_synthetic_moe: switch has no fused layout");
  MOQE_CHECK(!deepseek || s.shared_intermediate % s.intermediate == 0,
             "write_synthetic_moe: deepseek shared_intermediate {} is not a multiple of {}",
             s.shared_intermediate, s.intermediate);
  std::filesystem::create_directories(dir);
  std::vector<SafetensorsWriter> writers(static_cast<size_t>(s.shards));
  std::vector<std::pair<std::string, int>> placed;
  uint32_t seed = s.seed * 7919u + 1u;
  int64_t count = 0;
  auto put = [&](const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    const int shard = static_cast<int>(count++ % s.shards);
    writers[shard].add(name, s.dtype, std::move(shape), encode(v, s.dtype));
    placed.emplace_back(name, shard);
  };
  auto matrix = [&](const std::string& name, int64_t n, int64_t k) {
    put(name, {n, k}, synthetic_weights(n, k, seed++, s.outlier_fraction, s.outlier_scale));
  };
  std::mt19937 rng(s.seed + 17u);
  std::normal_distribution<float> small(0.0f, 0.05f);
  const int64_t h = s.hidden, i = s.intermediate, e_count = s.experts;
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = synthetic_moe_prefix(s, l) + ".";
    const std::string block = sw ? fmt::format("encoder.block.{}.layer.1.", 2 * l + 1)
                                 : fmt::format("model.layers.{}.", l);
    put(block + (sw ? "layer_norm.weight" : "post_attention_layernorm.weight"), {h},
        std::vector<float>(static_cast<size_t>(h), 1.0f));
    if (!sw) matrix(block + "self_attn.o_proj.weight", h, h);
    matrix(p + (sw ? "router.classifier.weight" : "gate.weight"), e_count, h);
    if (v3) {
      std::vector<float> bias(static_cast<size_t>(e_count));
      for (auto& b : bias) b = small(rng);
      put(p + "gate.e_score_correction_bias", {e_count}, bias);
    }
    if (s.fused_experts) {
      std::vector<float> gu, down;
      for (int64_t e = 0; e < e_count; ++e) {
        const auto m = synthetic_weights(2 * i, h, seed++, s.outlier_fraction, s.outlier_scale);
        gu.insert(gu.end(), m.begin(), m.end());
        const auto d = synthetic_weights(h, i, seed++, s.outlier_fraction, s.outlier_scale);
        down.insert(down.end(), d.begin(), d.end());
      }
      put(p + "experts.gate_up_proj", {e_count, 2 * i, h}, gu);
      put(p + "experts.down_proj", {e_count, h, i}, down);
    } else {
      for (int64_t e = 0; e < e_count; ++e) {
        if (sw) {
          const std::string x = fmt::format("{}experts.expert_{}.", p, e);
          matrix(x + "wi.weight", i, h);
          matrix(x + "wo.weight", h, i);
        } else {
          const std::string x = fmt::format("{}experts.{}.", p, e);
          matrix(x + (mixtral ? "w1.weight" : "gate_proj.weight"), i, h);
          matrix(x + (mixtral ? "w3.weight" : "up_proj.weight"), i, h);
          matrix(x + (mixtral ? "w2.weight" : "down_proj.weight"), h, i);
        }
      }
    }
    if ((qwen2 || deepseek) && s.shared_intermediate > 0) {
      const std::string x = p + (qwen2 ? "shared_expert." : "shared_experts.");
      matrix(x + "gate_proj.weight", s.shared_intermediate, h);
      matrix(x + "up_proj.weight", s.shared_intermediate, h);
      matrix(x + "down_proj.weight", h, s.shared_intermediate);
      if (qwen2) matrix(p + "shared_expert_gate.weight", 1, h);
    }
  }
  std::vector<std::filesystem::path> written;
  auto shard_name = [&](int n) {
    return s.shards == 1 ? std::string("model.safetensors")
                         : fmt::format("model-{:05d}-of-{:05d}.safetensors", n + 1, s.shards);
  };
  for (int n = 0; n < s.shards; ++n) {
    writers[n].set_metadata("format", "pt");
    written.push_back(dir / shard_name(n));
    writers[n].write(written.back());
  }
  if (s.shards > 1) {
    nlohmann::json index;
    index["metadata"] = {{"total_size", 0}};
    for (const auto& [name, shard] : placed) index["weight_map"][name] = shard_name(shard);
    written.push_back(dir / "model.safetensors.index.json");
    std::ofstream(written.back()) << index.dump(2);
  }
  nlohmann::json c = {{"model_type", sw ? "switch_transformers" : f},
                      {"num_hidden_layers", s.layers},
                      {"torch_dtype", s.dtype == DType::kF32   ? "float32"
                                      : s.dtype == DType::kF16 ? "float16"
                                                               : "bfloat16"}};
  if (mixtral) {
    c.update({{"hidden_size", h},
              {"intermediate_size", i},
              {"num_local_experts", e_count},
              {"num_experts_per_tok", s.top_k},
              {"hidden_act", "silu"}});
  } else if (sw) {
    c.update({{"d_model", h},
              {"d_ff", i},
              {"num_experts", e_count},
              {"expert_capacity", s.expert_capacity},
              {"dense_act_fn", "relu"}});
  } else if (deepseek) {
    c.update({{"hidden_size", h},
              {"moe_intermediate_size", i},
              {"n_routed_experts", e_count},
              {"n_shared_experts", s.shared_intermediate / i},
              {"num_experts_per_tok", s.top_k},
              {"n_group", s.n_group},
              {"topk_group", s.topk_group},
              {"routed_scaling_factor", s.routed_scaling_factor},
              {"norm_topk_prob", s.norm_topk_prob},
              {"hidden_act", "silu"},
              {"topk_method", v3 ? "noaux_tc" : s.topk_method},
              {"scoring_func", v3 ? "sigmoid" : "softmax"}});
  } else {
    c.update({{"hidden_size", h},
              {f == "olmoe" ? "intermediate_size" : "moe_intermediate_size", i},
              {"num_experts", e_count},
              {"num_experts_per_tok", s.top_k},
              {"norm_topk_prob", s.norm_topk_prob},
              {"hidden_act", "silu"}});
    if (qwen2) c["shared_expert_intermediate_size"] = s.shared_intermediate;
  }
  written.push_back(dir / "config.json");
  std::ofstream(written.back()) << c.dump(2);
  return written;
}

}  // namespace moqe
