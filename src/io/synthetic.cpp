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

std::vector<std::filesystem::path> write_synthetic_moe(const std::filesystem::path& dir,
                                                       const SyntheticMoeSpec& s) {
  MOQE_CHECK(s.family == "mixtral", "write_synthetic_moe: unsupported family '{}' (mixtral)",
             s.family);
  MOQE_CHECK(s.dtype == DType::kF32 || s.dtype == DType::kF16 || s.dtype == DType::kBF16,
             "write_synthetic_moe: dtype {} is not F32, F16 or BF16", dtype_name(s.dtype));
  MOQE_CHECK(s.hidden > 0 && s.intermediate > 0 && s.experts > 0 && s.layers > 0 && s.shards > 0,
             "write_synthetic_moe: invalid sizes");
  std::filesystem::create_directories(dir);
  std::vector<SafetensorsWriter> writers(static_cast<size_t>(s.shards));
  std::vector<std::pair<std::string, int>> placed;
  uint32_t seed = s.seed * 7919u + 1u;
  int64_t count = 0;
  auto add = [&](const std::string& name, int64_t n, int64_t k, bool is_vector = false) {
    const int shard = static_cast<int>(count++ % s.shards);
    std::vector<float> v =
        is_vector ? std::vector<float>(static_cast<size_t>(n), 1.0f)
                  : synthetic_weights(n, k, seed++, s.outlier_fraction, s.outlier_scale);
    std::vector<int64_t> shape = is_vector ? std::vector<int64_t>{n} : std::vector<int64_t>{n, k};
    writers[shard].add(name, s.dtype, shape, encode(v, s.dtype));
    placed.emplace_back(name, shard);
  };
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "post_attention_layernorm.weight", s.hidden, 1, true);
    add(p + "self_attn.o_proj.weight", s.hidden, s.hidden);
    add(p + "block_sparse_moe.gate.weight", s.experts, s.hidden);
    for (int64_t e = 0; e < s.experts; ++e) {
      const std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      add(x + "w1.weight", s.intermediate, s.hidden);
      add(x + "w3.weight", s.intermediate, s.hidden);
      add(x + "w2.weight", s.hidden, s.intermediate);
    }
  }
  std::vector<std::filesystem::path> written;
  auto shard_name = [&](int i) {
    return s.shards == 1 ? std::string("model.safetensors")
                         : fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, s.shards);
  };
  for (int i = 0; i < s.shards; ++i) {
    writers[i].set_metadata("format", "pt");
    written.push_back(dir / shard_name(i));
    writers[i].write(written.back());
  }
  if (s.shards > 1) {
    nlohmann::json index;
    index["metadata"] = {{"total_size", 0}};
    for (const auto& [name, shard] : placed) index["weight_map"][name] = shard_name(shard);
    written.push_back(dir / "model.safetensors.index.json");
    std::ofstream(written.back()) << index.dump(2);
  }
  nlohmann::json config = {{"model_type", "mixtral"},
                           {"architectures", {"MixtralForCausalLM"}},
                           {"hidden_size", s.hidden},
                           {"intermediate_size", s.intermediate},
                           {"num_local_experts", s.experts},
                           {"num_experts_per_tok", s.top_k},
                           {"num_hidden_layers", s.layers},
                           {"hidden_act", "silu"},
                           {"torch_dtype", s.dtype == DType::kF32   ? "float32"
                                           : s.dtype == DType::kF16 ? "float16"
                                                                    : "bfloat16"}};
  written.push_back(dir / "config.json");
  std::ofstream(written.back()) << config.dump(2);
  return written;
}

}  // namespace moqe
