// Expert-parallel checks shared by the in-process tests (LocalCommunicator) and the MPI tests
// (moqe_mpi_tests under mpirun with 1, 2 and 4 ranks). Every call is collective: all ranks run
// the same cases in the same order, and checks use CHECK (not REQUIRE) inside collective
// sequences so that a failing rank keeps taking part in the exchanges.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include "moqe/dist/expert_parallel.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/io/synthetic.hpp"
#include "test_util.hpp"

namespace moqe::test {

struct EpFamilyCase {
  std::string name;
  SyntheticMoeSpec spec;
  bool quantize = false;  // run from a moqe-quantized copy (int4 g32) of the checkpoint
};

// Every family, with its routing options, shared experts, fused layouts and Switch overflow.
inline std::vector<EpFamilyCase> ep_family_cases() {
  auto base = [](const std::string& family) {
    SyntheticMoeSpec s;
    s.family = family;
    s.hidden = 64;
    s.intermediate = 96;
    s.experts = 8;
    s.top_k = family == "switch" ? 1 : 2;
    s.dtype = DType::kF32;
    s.seed = 21;
    return s;
  };
  std::vector<EpFamilyCase> cases;
  cases.push_back({"mixtral", base("mixtral")});
  auto mq = base("mixtral");
  mq.dtype = DType::kBF16;
  cases.push_back({"mixtral int4", mq, true});
  auto mf = base("mixtral");
  mf.fused_experts = true;
  mf.dtype = DType::kBF16;
  cases.push_back({"mixtral fused bf16", mf});
  auto q2 = base("qwen2_moe");
  q2.shared_intermediate = 128;
  q2.top_k = 4;
  cases.push_back({"qwen2_moe shared", q2});
  auto q3 = base("qwen3_moe");
  q3.norm_topk_prob = true;
  q3.shards = 2;
  cases.push_back({"qwen3_moe sharded", q3});
  cases.push_back({"olmoe", base("olmoe")});
  auto v2 = base("deepseek_v2");
  v2.topk_method = "group_limited_greedy";
  v2.n_group = 4;
  v2.topk_group = 2;
  v2.top_k = 3;
  v2.routed_scaling_factor = 16.0f;
  v2.shared_intermediate = 192;
  cases.push_back({"deepseek_v2 group-limited", v2});
  auto v3 = base("deepseek_v3");
  v3.n_group = 4;
  v3.topk_group = 2;
  v3.top_k = 4;
  v3.norm_topk_prob = true;
  v3.routed_scaling_factor = 2.5f;
  v3.shared_intermediate = 96;
  cases.push_back({"deepseek_v3", v3});
  auto sw = base("switch");
  sw.expert_capacity = 3;  // some tokens overflow and pass through
  cases.push_back({"switch capacity", sw});
  return cases;
}

// Placements for `ranks` ranks over `experts` experts: contiguous blocks, and an uneven map
// (most experts on the last rank, one on rank 0, none on the ranks between).
inline std::vector<std::pair<std::string, ExpertPlacement>> ep_placements(int64_t experts,
                                                                          int ranks) {
  std::vector<std::pair<std::string, ExpertPlacement>> out;
  out.emplace_back("contiguous", ExpertPlacement::contiguous(experts, ranks));
  std::vector<int32_t> owner(static_cast<size_t>(experts), ranks - 1);
  owner[3] = 0;
  out.emplace_back("uneven", ExpertPlacement::from_owners(owner, ranks));
  return out;
}

inline std::vector<float> ep_random_x(int64_t t, int64_t h, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(t * h));
  for (auto& v : x) v = g(rng);
  return x;
}

// Tokens on rank r in step `step`: different counts per rank, rank 1 has none in step 0.
inline int64_t ep_tokens(int rank, int step) {
  if (rank == 1 && step == 0) return 0;
  return 5 + 7 * rank + 3 * step;
}

// Relative L2 difference of two outputs (0 when both are 0).
inline double ep_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double e = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    n += double(b[i]) * b[i];
  }
  return n == 0 ? std::sqrt(e) : std::sqrt(e / n);
}

// How the two layers must agree. Bit for bit with the reference kernels, whose summation order
// is per row. The SIMD kernels tile rows by four with a per-tile accumulator layout, so a row's
// rounding depends on how many rows share its expert, which differs between one process and
// many (as it does in MoELayer between two batch compositions): there the outputs agree to fp32
// rounding, checked with the 1e-5 relative bound the layer tests use against a double reference.
enum class EpMatch { kBits, kRounding };

// Runs one step on both layers for this rank's tokens and compares the outputs; some tokens are
// inactive; task routers get per-token task ids. Collective: every rank calls it for the same
// step. Step 1 sizes each rank's workspace for its own tokens only, so a rank with few tokens
// receives more rows than it planned for from ranks with more (the growth path).
inline void ep_check_step(const MoELayer& full, ExpertParallelMoELayer& ep, int step,
                          const std::string& what, EpMatch match) {
  Communicator& comm = ep.communicator();
  const int rank = comm.rank(), ranks = comm.size();
  const int64_t t = ep_tokens(rank, step), h = full.hidden();
  const auto x = ep_random_x(t, h, static_cast<uint32_t>(1000 * step + rank + 1));
  std::vector<uint8_t> active(static_cast<size_t>(t), 1);
  for (int64_t i = 2; i < t; i += 5) active[static_cast<size_t>(i)] = 0;
  std::vector<int32_t> task_ids(static_cast<size_t>(t));
  for (int64_t i = 0; i < t; ++i) task_ids[static_cast<size_t>(i)] = static_cast<int32_t>(i % 2);
  MoeRunOptions o;
  o.active = active;
  if (full.router().kind() == RouterKind::kTask) o.task_ids = task_ids;
  std::vector<float> y_full(x.size(), -7.0f), y_ep(x.size(), 9.0f);
  auto ws_full = full.make_workspace(64);
  full.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y_full.data(), t, h), ws_full,
           o);
  auto ws = ep.make_workspace(step == 1 ? t : 64);
  ep.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y_ep.data(), t, h), ws, o);
  INFO(what << " rank " << rank << " step " << step << " tokens " << t);
  if (match == EpMatch::kBits) {
    CHECK((y_full.empty() ||
           std::memcmp(y_full.data(), y_ep.data(), y_full.size() * sizeof(float)) == 0));
  } else {
    CHECK(ep_rel_diff(y_ep, y_full) < 1e-5);
  }
  CHECK(ws.routing.ids == ws_full.routing.ids);
  {  // The full layer's routing given to the expert-parallel one (collective: every rank does).
    MoeRunOptions given = o;
    given.routing = &ws_full.routing;
    auto ws_given = ep.make_workspace(64);
    std::vector<float> y_given(x.size(), 5.0f);
    ep.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y_given.data(), t, h),
           ws_given, given);
    CHECK(y_given == y_ep);
  }
  // Only kept slots of active tokens travel: the rows sent are the full layer's routed rows.
  int64_t sent = 0;
  for (const int64_t n : ws.stats.rows_to) sent += n;
  CHECK(sent == ws_full.plan.rows());
  CHECK(ws.stats.routed_rows == ws_full.plan.rows());
  CHECK(ws.stats.tokens == t);
  // Rows sent to each rank, as every sender saw them: R[a][b] = rows a sent to b.
  std::vector<int64_t> r_to(static_cast<size_t>(ranks * ranks)),
      r_from(static_cast<size_t>(ranks * ranks));
  comm.all_gather(ws.stats.rows_to, r_to);
  comm.all_gather(ws.stats.rows_from, r_from);
  auto to = [&](int a, int b) { return r_to[static_cast<size_t>(a * ranks + b)]; };
  for (int a = 0; a < ranks; ++a) {
    for (int b = 0; b < ranks; ++b) {
      CHECK(to(a, b) == r_from[static_cast<size_t>(b * ranks + a)]);  // b received what a sent
    }
  }
  // The rows this rank's experts ran are the rows the other ranks say they sent here, and each
  // expert ran the rows that the senders' routings gave it.
  int64_t ran = 0, sent_here = 0;
  for (const int64_t n : ws.stats.expert_rows) ran += n;
  for (int a = 0; a < ranks; ++a) sent_here += to(a, rank);
  CHECK(ran == sent_here);
  const std::vector<RankLoad> load = ep.gather_stats(ws);
  for (int a = 0; a < ranks; ++a) {
    int64_t out_rows = 0;  // rows a sent to others plus results it returned to them
    for (int b = 0; b < ranks; ++b) {
      if (b != a) out_rows += to(a, b) + to(b, a);
    }
    CHECK(load[static_cast<size_t>(a)].bytes_sent == out_rows * h * 4);
    CHECK(load[static_cast<size_t>(a)].bytes_received == out_rows * h * 4);
  }
  CHECK(load[static_cast<size_t>(rank)].tokens == t);
  CHECK(load[static_cast<size_t>(rank)].rows_computed == ran);
}

// A copy of `ckpt` (one file, metadata kept) without the tensors of the routed experts this rank
// does not hold: loading the rank's layer from it proves that no other expert is ever read.
inline void ep_write_rank_only(const Checkpoint& ckpt, const std::filesystem::path& out,
                               const ExpertPlacement& placement, int rank) {
  SafetensorsWriter w;
  for (const auto& [k, v] : ckpt.metadata()) w.set_metadata(k, v);
  for (const std::string& name : ckpt.tensor_names()) {
    bool foreign = false;
    for (int64_t e = 0; e < placement.num_experts(); ++e) {
      if (placement.owner(e) == rank) continue;
      const std::string id = std::to_string(e);
      foreign = foreign || name.find(".experts." + id + ".") != std::string::npos ||
                name.find(".experts.expert_" + id + ".") != std::string::npos;
    }
    if (foreign) continue;
    const TensorInfo& t = ckpt.info(name);
    w.add_view(name, t.dtype, t.shape, ckpt.bytes(name));
  }
  w.write(out);
}

// The expert-parallel layer, loaded rank by rank from a copy of the checkpoint holding only the
// rank's experts (fused layouts: from the whole file, whose other experts' bytes are skipped),
// equals the single-process layer for every family and placement.
inline void ep_check_families(const std::shared_ptr<Communicator>& comm, EpMatch match) {
  for (const EpFamilyCase& c : ep_family_cases()) {
    TempDir dir;  // per process: every rank writes the same checkpoint (same seed)
    write_synthetic_moe(dir.path(), c.spec);
    std::filesystem::path weights = dir.path();
    if (c.quantize) {
      ConvertOptions q;
      q.bits = 4;
      q.group_policy = GroupPolicy::kFixed;
      q.group_size = 32;
      weights = dir / "q";
      std::filesystem::create_directories(weights);
      quantize_checkpoint(Checkpoint(dir.path()), weights / "model.safetensors", q);
    }
    const Checkpoint ckpt(weights);
    const Family family = *parse_family(c.spec.family);
    const MoeConfig config = read_moe_config(dir / "config.json", family);
    const std::string prefix = synthetic_moe_prefix(c.spec);
    const MoELayer full = load_moe_layer(ckpt, prefix, config);
    for (auto& [pname, placement] : ep_placements(c.spec.experts, comm->size())) {
      // Each rank loads from a copy holding only its own experts (fused layouts: from the whole
      // file, where the other experts' bytes are never touched): the full loader fails on it.
      TempDir own;
      std::filesystem::path own_weights = weights;
      if (!c.spec.fused_experts) {
        own_weights = own / "model.safetensors";
        ep_write_rank_only(ckpt, own_weights, placement, comm->rank());
        if (placement.experts_of(comm->rank()).size() < static_cast<size_t>(c.spec.experts)) {
          // "missing tensor", or for quantized weights "missing its qweight tensor"
          CHECK_THROWS_WITH(load_moe_layer(Checkpoint(own_weights), prefix, config),
                            Catch::Contains("missing") && Catch::Contains("tensor"));
        }
      }
      ExpertParallelMoELayer ep =
          load_expert_parallel_layer(Checkpoint(own_weights), prefix, config, comm, placement);
      CHECK(ep.local_experts().size() ==
            static_cast<int64_t>(placement.experts_of(comm->rank()).size()));
      for (int step = 0; step < 2; ++step) {
        ep_check_step(full, ep, step, c.name + " " + pname, match);
      }
    }
  }
}

// Layers built in memory: the routers no checkpoint family uses (expert choice, task, capacity
// factor), the PR-MoE residual MLP, unfused experts (the ungrouped path) and mlp experts.
inline std::vector<std::pair<std::string, MoELayer>> ep_memory_layers() {
  const int64_t h = 48, i = 40, e = 6;
  std::mt19937 rng(77);
  std::normal_distribution<float> g(0.0f, 0.2f);
  auto rnd = [&](int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = g(rng);
    return v;
  };
  auto glu = [&](bool fuse) {
    return std::make_shared<const ExpertMLP>(ExpertMLP::glu(
        QuantizedLinear::from_f32(rnd(i * h), i, h), QuantizedLinear::from_f32(rnd(i * h), i, h),
        QuantizedLinear::from_f32(rnd(h * i), h, i), Activation::kSilu, fuse));
  };
  auto mlp = [&]() {
    return std::make_shared<const ExpertMLP>(
        ExpertMLP::mlp(QuantizedLinear::from_f32(rnd(i * h), i, h),
                       QuantizedLinear::from_f32(rnd(h * i), h, i), Activation::kGelu));
  };
  auto experts = [&](bool fuse, bool use_mlp) {
    std::vector<std::shared_ptr<const ExpertMLP>> v;
    for (int64_t k = 0; k < e; ++k) v.push_back(use_mlp ? mlp() : glu(fuse));
    return v;
  };
  std::vector<std::pair<std::string, MoELayer>> out;
  RouterConfig mix;
  mix.kind = RouterKind::kMixtral;
  mix.num_experts = e;
  mix.top_k = 2;
  out.emplace_back("pr-moe residual", MoELayer(Router(mix, rnd(e * h), h), experts(true, false), {},
                                               ResidualMLP{glu(true), rnd(2 * h)}));
  out.emplace_back("unfused experts", MoELayer(Router(mix, rnd(e * h), h), experts(false, false)));
  RouterConfig ec;
  ec.kind = RouterKind::kExpertChoice;
  ec.num_experts = e;
  ec.top_k = 2;
  out.emplace_back("expert choice, mlp experts",
                   MoELayer(Router(ec, rnd(e * h), h), experts(true, true)));
  RouterConfig cf;
  cf.kind = RouterKind::kSoftmaxTopK;
  cf.num_experts = e;
  cf.top_k = 3;
  cf.capacity_factor = 0.6;
  out.emplace_back("capacity factor", MoELayer(Router(cf, rnd(e * h), h), experts(true, false)));
  RouterConfig task;
  task.kind = RouterKind::kTask;
  task.num_experts = e;
  task.top_k = 2;
  task.tasks = {{{4, 1}, {0.75f, 0.25f}}, {{0, 5}, {0.5f, 0.5f}}};
  out.emplace_back("task router", MoELayer(Router(task, {}, h), experts(true, false)));
  return out;
}

inline void ep_check_memory_layers(const std::shared_ptr<Communicator>& comm, EpMatch match) {
  for (auto& [name, full] : ep_memory_layers()) {
    for (auto& [pname, placement] : ep_placements(full.num_experts(), comm->size())) {
      ExpertParallelMoELayer ep = ExpertParallelMoELayer::from_layer(full, comm, placement);
      for (int step = 0; step < 2; ++step) {
        ep_check_step(full, ep, step, name + " " + pname, match);
      }
    }
  }
}

}  // namespace moqe::test
