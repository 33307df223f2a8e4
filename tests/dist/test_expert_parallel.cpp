// The expert-parallel layer in one process (LocalCommunicator): placements, argument checks, and
// equality with MoELayer for every family and router. The same cases run across processes in
// moqe_mpi_tests (tests/dist/test_mpi.cpp).
#include <catch2/catch.hpp>

#include "dist/ep_cases.hpp"

using namespace moqe;

TEST_CASE("placements: contiguous blocks and explicit maps", "[dist]") {
  const ExpertPlacement p = ExpertPlacement::contiguous(10, 4);
  CHECK(p.ranks() == 4);
  CHECK(p.max_local_experts() == 3);
  CHECK(std::vector<int64_t>(p.experts_of(0).begin(), p.experts_of(0).end()) ==
        std::vector<int64_t>{0, 1, 2});
  CHECK(std::vector<int64_t>(p.experts_of(1).begin(), p.experts_of(1).end()) ==
        std::vector<int64_t>{3, 4, 5});
  CHECK(std::vector<int64_t>(p.experts_of(3).begin(), p.experts_of(3).end()) ==
        std::vector<int64_t>{8, 9});
  const ExpertPlacement more_ranks = ExpertPlacement::contiguous(2, 3);
  CHECK(more_ranks.experts_of(2).empty());
  const ExpertPlacement m = ExpertPlacement::from_owners({2, 0, 2, 2}, 3);
  CHECK(m.experts_of(1).empty());
  CHECK(std::vector<int64_t>(m.experts_of(2).begin(), m.experts_of(2).end()) ==
        std::vector<int64_t>{0, 2, 3});
  CHECK(m.owner(1) == 0);
  CHECK_THROWS_WITH(ExpertPlacement::from_owners({0, 3}, 3),
                    Catch::Contains("expert 1 is placed on rank 3"));
  CHECK_THROWS_WITH(ExpertPlacement::contiguous(0, 2), Catch::Contains("0 experts"));
  CHECK_THROWS_WITH(p.experts_of(4), Catch::Contains("rank 4 of 4"));
}

TEST_CASE("the local communicator moves rows to itself and checks its arguments", "[dist]") {
  LocalCommunicator c;
  const std::vector<float> send = {1, 2, 3, 4, 5, 6};
  std::vector<float> recv(6);
  const int64_t rows[1] = {3};
  c.all_to_all_rows(send.data(), rows, recv.data(), rows, 2);
  CHECK(recv == send);
  const int64_t wrong[1] = {2};
  CHECK_THROWS_WITH(c.all_to_all_rows(send.data(), rows, recv.data(), wrong, 2),
                    Catch::Contains("3 rows sent to self, 2 expected"));
  const int64_t two[2] = {1, 1};
  CHECK_THROWS_WITH(c.all_to_all_rows(send.data(), two, recv.data(), two, 2),
                    Catch::Contains("2 send and 2 receive counts for 1 ranks"));
  CHECK_THROWS_WITH(c.all_to_all_rows(recv.data(), rows, recv.data() + 2, rows, 2),
                    Catch::Contains("overlap"));
}

TEST_CASE("the expert-parallel layer on one rank equals MoELayer for every family", "[dist]") {
  // One rank runs each expert on the same rows as MoELayer: bit for bit with any kernels.
  test::ep_check_families(std::make_shared<LocalCommunicator>(), test::EpMatch::kBits);
}

TEST_CASE("the expert-parallel layer on one rank equals MoELayer for every router", "[dist]") {
  test::ep_check_memory_layers(std::make_shared<LocalCommunicator>(), test::EpMatch::kBits);
}

TEST_CASE("the expert-parallel layer rejects a placement that does not fit", "[dist]") {
  const auto layers = test::ep_memory_layers();
  const MoELayer& full = layers[0].second;
  auto comm = std::make_shared<LocalCommunicator>();
  CHECK_THROWS_WITH(
      ExpertParallelMoELayer::from_layer(full, comm, ExpertPlacement::contiguous(6, 2)),
      Catch::Contains("placement is for 2 ranks, the local communicator has 1"));
  CHECK_THROWS_WITH(
      ExpertParallelMoELayer::from_layer(full, comm, ExpertPlacement::contiguous(5, 1)),
      Catch::Contains("placement has 5 experts, the layer 6"));
  ExpertParallelMoELayer ep =
      ExpertParallelMoELayer::from_layer(full, comm, ExpertPlacement::contiguous(6, 1));
  auto ws = ep.make_workspace(4);
  std::vector<float> x(5 * 48), y(x.size());
  CHECK_THROWS_WITH(
      ep.run(MatrixView<const float>(x.data(), 5, 48), MatrixView<float>(y.data(), 5, 48), ws),
      Catch::Contains("5 tokens exceed the workspace's 4"));
}

TEST_CASE("partial loading and bucket orders reject what does not fit", "[dist]") {
  test::TempDir dir;
  SyntheticMoeSpec s;
  s.hidden = 32;
  s.intermediate = 32;
  s.experts = 4;
  write_synthetic_moe(dir.path(), s);
  const Checkpoint ckpt(dir.path());
  const MoeConfig config = read_moe_config(dir / "config.json", Family::kMixtral);
  const int64_t want[] = {1, 9};
  CHECK_THROWS_WITH(load_moe_parts(ckpt, synthetic_moe_prefix(s), config, {}, want),
                    Catch::Contains("expert 9 requested of the 4 experts"));
  const int64_t two[] = {3, 1};
  const MoeLayerParts parts = load_moe_parts(ckpt, synthetic_moe_prefix(s), config, {}, two);
  CHECK(parts.experts.size() == 2);
  CHECK(parts.hidden == 32);

  Routing r;
  r.reset(1, 1, 4);
  r.ids[0] = 2;
  r.kept[0] = 1;
  DispatchPlan plan;
  const int32_t short_order[] = {0, 1, 2};
  CHECK_THROWS_WITH(plan.build(r, short_order), Catch::Contains("3 buckets for 4 experts"));
  const int32_t order[] = {3, 2, 1, 0};
  plan.build(r, order);
  CHECK(plan.expert_rows(1) == 1);  // expert 2 lands in bucket 1
}
