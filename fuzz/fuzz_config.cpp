// Fuzzes config.json parsing for every family, and what a parsed config drives: the layer loader
// (on a tiny checkpoint of that family) and the router on ordinary, NaN and infinite tokens.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <vector>

#include "fuzz_common.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/synthetic.hpp"
#include "moqe/moe/loader.hpp"

namespace {

namespace fs = std::filesystem;

// The families write_synthetic_moe makes checkpoints of; every other family's config is parsed.
constexpr moqe::Family kSynthetic[] = {moqe::Family::kMixtral,    moqe::Family::kQwen2Moe,
                                       moqe::Family::kQwen3Moe,   moqe::Family::kOlmoe,
                                       moqe::Family::kDeepSeekV2, moqe::Family::kDeepSeekV3,
                                       moqe::Family::kSwitch};

struct Fixture {
  std::unique_ptr<moqe::Checkpoint> ckpt;
  std::string prefix;
};

// One tiny checkpoint per family (4 experts, hidden 32), made once.
const Fixture* fixture(moqe::Family family) {
  static const std::map<moqe::Family, Fixture> all = [] {
    std::map<moqe::Family, Fixture> m;
    for (moqe::Family f : kSynthetic) {
      moqe::SyntheticMoeSpec s;
      s.family = std::string(moqe::to_string(f));
      s.hidden = 32;
      s.intermediate = 32;
      s.experts = 4;
      s.top_k = f == moqe::Family::kSwitch ? 1 : 2;
      s.n_group = 2;
      s.topk_group = 1;
      s.shared_intermediate = f == moqe::Family::kQwen2Moe ? 32 : 0;
      s.dtype = moqe::DType::kF32;
      const fs::path dir = moqe::fuzz::scratch_dir() / s.family;
      moqe::write_synthetic_moe(dir, s);
      m[f] = Fixture{std::make_unique<moqe::Checkpoint>(dir), moqe::synthetic_moe_prefix(s)};
    }
    return m;
  }();
  const auto it = all.find(family);
  return it == all.end() ? nullptr : &it->second;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const moqe::fuzz::MemFile file(data, size);
  moqe::fuzz::rejects([&] { moqe::read_moe_config(file.path()); });  // detection from model_type
  for (const moqe::FamilyInfo& info : moqe::families()) {
    const moqe::Family family = info.family;
    const Fixture* fx = fixture(family);
    moqe::fuzz::rejects([&] {
      const moqe::MoeConfig c = moqe::read_moe_config(file.path(), family, true);
      if (c.num_experts() <= 0 || c.top_k() <= 0 || c.top_k() > c.num_experts()) __builtin_trap();
      if (fx == nullptr) return;
      const moqe::MoELayer layer = moqe::load_moe_layer(*fx->ckpt, fx->prefix, c, {true, 1, true});
      const int64_t t = 4, h = layer.hidden();
      std::vector<float> x(static_cast<size_t>(t * h), 0.25f), y(x.size());
      x[0] = std::numeric_limits<float>::quiet_NaN();
      x[static_cast<size_t>(h)] = std::numeric_limits<float>::infinity();
      x[static_cast<size_t>(2 * h)] = -std::numeric_limits<float>::infinity();
      moqe::MoELayer::Workspace ws = layer.make_workspace(t);
      layer.run(moqe::MatrixView<const float>(x.data(), t, h),
                moqe::MatrixView<float>(y.data(), t, h), ws, {1, {}, {}, 0, {}});
      for (int32_t id : ws.routing.ids) {
        if (id < -1 || id >= layer.num_experts()) __builtin_trap();
      }
    });
  }
  return 0;
}
