// The committed transformers fixtures of every MoE family (tests/data/families, written by
// scripts/hf_crosscheck.py): their cases and expected results, for the CPU and CUDA tests.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "moqe/io/checkpoint.hpp"

namespace moqe::test {

namespace fs = std::filesystem;

// MOQE_TEST_DATA (a copy of tests/data elsewhere, as on a GPU machine that runs binaries built
// here) overrides the source tree's path compiled in.
inline fs::path test_data(const char* sub, const char* compiled) {
  const char* env = std::getenv("MOQE_TEST_DATA");
  return env != nullptr && *env != '\0' ? fs::path(env) / sub : fs::path(compiled);
}

inline const fs::path kFixtures = test_data("families", MOQE_FAMILY_FIXTURES);

struct FixtureCase {
  std::string name, family, prefix;
  int64_t k = 0;
  fs::path dir;
  std::string format;  // tests/data/formats: gptq, awq or ct
};

// The cases of a fixture directory's cases.json (tests/data/families by default, or
// tests/data/formats, written by scripts/make_format_fixtures.py).
inline std::vector<FixtureCase> fixture_cases(const fs::path& root = kFixtures) {
  std::ifstream f(root / "cases.json");
  REQUIRE(f.good());
  const nlohmann::json j = nlohmann::json::parse(f);
  std::vector<FixtureCase> out;
  for (const auto& [name, meta] : j.at("cases").items()) {
    out.push_back({name, meta.at("family").get<std::string>(), meta.at("prefix").get<std::string>(),
                   meta.value("k", int64_t{0}), root / name, meta.value("format", "")});
  }
  return out;
}

struct Expected {
  int64_t t = 0, h = 0, k = 0;
  std::vector<float> x, y, weights;
  std::vector<int32_t> ids;
};

inline Expected expected(const FixtureCase& c) {
  Expected e;
  const Checkpoint x(c.dir / "x.safetensors");
  e.x = x.to_float("x");
  e.t = x.info("x").shape[0];
  e.h = x.info("x").shape[1];
  const Checkpoint r(c.dir / "expected.safetensors");
  e.y = r.to_float("y");
  e.weights = r.to_float("topk_weights");
  e.k = r.info("topk_ids").shape[1];
  const auto b = r.bytes("topk_ids");
  e.ids.resize(b.size() / 4);
  std::memcpy(e.ids.data(), b.data(), b.size());
  return e;
}

inline double rel_err(std::span<const float> got, std::span<const float> ref) {
  double e = 0, n = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    e += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
    n += double(ref[i]) * ref[i];
  }
  return std::sqrt(e / std::max(n, 1e-300));
}

// transformers' ids per token as sets, and each chosen expert's weight (within 1e-5 relative).
inline void check_routing(const Expected& e, std::span<const int32_t> ids,
                          std::span<const float> weights) {
  for (int64_t t = 0; t < e.t; ++t) {
    std::map<int32_t, float> want, got;
    for (int64_t j = 0; j < e.k; ++j) {
      want[e.ids[t * e.k + j]] = e.weights[t * e.k + j];
      got[ids[t * e.k + j]] = weights[t * e.k + j];
    }
    CAPTURE(t);
    REQUIRE(got.size() == want.size());
    for (const auto& [id, w] : want) {
      REQUIRE(got.count(id) == 1);
      CHECK(got[id] == Approx(w).epsilon(1e-5));
    }
  }
}

inline const FixtureCase& find_case(const std::vector<FixtureCase>& cases,
                                    const std::string& name) {
  for (const FixtureCase& c : cases) {
    if (c.name == name) return c;
  }
  FAIL("no fixture case " << name);
  return cases.front();
}

}  // namespace moqe::test
