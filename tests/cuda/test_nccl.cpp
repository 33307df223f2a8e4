// NcclCommunicator on one GPU (one rank): its collectives move the right values, and the
// expert-parallel layer over it equals MoELayer bit for bit. Without a device each test reports
// "SKIPPED: no CUDA device".
#include <catch2/catch.hpp>

#include <vector>

#include "cuda/require_device.hpp"
#include "dist/ep_cases.hpp"
#include "moqe/cuda/nccl.hpp"
#include "moqe/cuda/runtime.hpp"

using namespace moqe;

TEST_CASE("nccl: one-rank collectives", "[cuda][nccl]") {
  MOQE_REQUIRE_DEVICE();
  auto c = cuda::NcclCommunicator::single(0);
  CHECK(c->size() == 1);
  CHECK(c->rank() == 0);
  const std::vector<int64_t> send = {4, -5, 6};
  std::vector<int64_t> recv(3);
  c->all_to_all(send, recv);
  CHECK(recv == send);
  recv.assign(3, 0);
  c->all_gather(send, recv);
  CHECK(recv == send);
  std::vector<float> rows(7 * 3), out(rows.size(), -1.0f);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = 0.5f * static_cast<float>(i) - 3.0f;
  const int64_t n[1] = {7};
  c->all_to_all_rows(rows.data(), n, out.data(), n, 3);
  CHECK(out == rows);
  const int64_t none[1] = {0};
  c->all_to_all_rows(nullptr, none, nullptr, none, 3);  // nothing to move is fine
  c->barrier();
}

TEST_CASE("nccl: the expert-parallel layer over one GPU rank equals MoELayer", "[cuda][nccl]") {
  MOQE_REQUIRE_DEVICE();
  std::shared_ptr<Communicator> comm = cuda::NcclCommunicator::single(0);
  test::ep_check_families(comm, test::EpMatch::kBits);
  test::ep_check_memory_layers(comm, test::EpMatch::kBits);
}
