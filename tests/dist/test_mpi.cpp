// moqe_mpi_tests: the expert-parallel layer across processes, run by ctest under mpirun with 1, 2
// and 4 ranks. Every rank runs every case (they are collective); each rank's output must equal
// the single-process layer's on the same tokens, bit for bit.
#define CATCH_CONFIG_RUNNER
#include <mpi.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <numeric>

#include "dist/ep_cases.hpp"
#include "moqe/dist/mpi.hpp"

using namespace moqe;

namespace {

std::shared_ptr<Communicator> world() { return std::make_shared<MpiCommunicator>(); }

}  // namespace

TEST_CASE("mpi: all_to_all and all_gather", "[mpi]") {
  MpiCommunicator c;
  const int p = c.size(), me = c.rank();
  std::vector<int64_t> send(static_cast<size_t>(2 * p)), recv(send.size());
  for (int q = 0; q < p; ++q) {
    send[static_cast<size_t>(2 * q)] = 100 * me + q;
    send[static_cast<size_t>(2 * q + 1)] = -me;
  }
  c.all_to_all(send, recv);
  for (int q = 0; q < p; ++q) {
    CHECK(recv[static_cast<size_t>(2 * q)] == 100 * q + me);
    CHECK(recv[static_cast<size_t>(2 * q + 1)] == -q);
  }
  const int64_t mine[2] = {me, 7};
  std::vector<int64_t> all(static_cast<size_t>(2 * p));
  c.all_gather(mine, all);
  for (int q = 0; q < p; ++q) CHECK(all[static_cast<size_t>(2 * q)] == q);
  c.barrier();
}

TEST_CASE("mpi: all_to_all_rows delivers every row to its rank, zero counts included", "[mpi]") {
  MpiCommunicator c;
  const int p = c.size(), me = c.rank();
  const int64_t w = 5;
  // Rank s sends (s + d) % 3 rows to rank d: some pairs send nothing.
  auto rows = [](int s, int d) { return static_cast<int64_t>((s + d) % 3); };
  std::vector<int64_t> send_rows(static_cast<size_t>(p)), recv_rows(static_cast<size_t>(p));
  for (int q = 0; q < p; ++q) {
    send_rows[static_cast<size_t>(q)] = rows(me, q);
    recv_rows[static_cast<size_t>(q)] = rows(q, me);
  }
  const int64_t ns = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
  const int64_t nr = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  std::vector<float> send(static_cast<size_t>(ns * w)), recv(static_cast<size_t>(nr * w), -1.0f);
  int64_t at = 0;
  for (int q = 0; q < p; ++q) {
    for (int64_t r = 0; r < rows(me, q); ++r, ++at) {
      for (int64_t k = 0; k < w; ++k) {
        send[static_cast<size_t>(at * w + k)] =
            static_cast<float>(1000 * me + 100 * q + 10 * r + k);
      }
    }
  }
  c.all_to_all_rows(send.data(), send_rows, recv.data(), recv_rows, w);
  at = 0;
  for (int q = 0; q < p; ++q) {
    for (int64_t r = 0; r < rows(q, me); ++r, ++at) {
      for (int64_t k = 0; k < w; ++k) {
        CHECK(recv[static_cast<size_t>(at * w + k)] ==
              static_cast<float>(1000 * q + 100 * me + 10 * r + k));
      }
    }
  }
}

TEST_CASE("mpi: the expert-parallel layer equals MoELayer for every family", "[mpi]") {
  SECTION("reference kernels: bit for bit") {
    const test::ScopedCpuIsa reference(CpuIsa::kReference);
    test::ep_check_families(world(), test::EpMatch::kBits);
  }
  SECTION("this machine's kernels: to fp32 rounding") {
    test::ep_check_families(world(), test::EpMatch::kRounding);
  }
}

TEST_CASE("mpi: the expert-parallel layer equals MoELayer for every router", "[mpi]") {
  SECTION("reference kernels: bit for bit") {
    const test::ScopedCpuIsa reference(CpuIsa::kReference);
    test::ep_check_memory_layers(world(), test::EpMatch::kBits);
  }
  SECTION("this machine's kernels: to fp32 rounding") {
    test::ep_check_memory_layers(world(), test::EpMatch::kRounding);
  }
}

TEST_CASE("mpi: ranks that disagree on the placement all fail at construction", "[mpi]") {
  auto comm = world();
  if (comm->size() < 2) return;
  const auto layers = test::ep_memory_layers();
  const MoELayer& full = layers[1].second;
  std::vector<int32_t> owner(static_cast<size_t>(full.num_experts()), 0);
  if (comm->rank() == 1) owner[0] = 1;  // rank 1 believes it holds expert 0
  CHECK_THROWS_WITH(ExpertParallelMoELayer::from_layer(
                        full, comm, ExpertPlacement::from_owners(owner, comm->size())),
                    Catch::Contains("different placement or layer shape"));
}

TEST_CASE("mpi: an error on one rank before the exchange is an error on every rank", "[mpi]") {
  auto comm = world();
  const auto layers = test::ep_memory_layers();
  const MoELayer& full = layers[1].second;
  ExpertParallelMoELayer ep = ExpertParallelMoELayer::from_layer(
      full, comm, ExpertPlacement::contiguous(full.num_experts(), comm->size()));
  auto ws = ep.make_workspace(4);
  const int64_t h = full.hidden();
  const int64_t t = comm->rank() == comm->size() - 1 ? 5 : 3;  // the last rank overflows
  std::vector<float> x(static_cast<size_t>(t * h), 0.5f), y(x.size());
  if (comm->rank() == comm->size() - 1) {
    CHECK_THROWS_WITH(
        ep.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y.data(), t, h), ws),
        Catch::Contains("5 tokens exceed the workspace's 4"));
  } else {
    CHECK_THROWS_WITH(
        ep.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y.data(), t, h), ws),
        Catch::Contains("rank " + std::to_string(comm->size() - 1) + " failed in this step"));
  }
  // The layer still works afterwards, on every rank.
  std::vector<float> x3(static_cast<size_t>(3 * h), 0.25f), y3(x3.size());
  ep.run(MatrixView<const float>(x3.data(), 3, h), MatrixView<float>(y3.data(), 3, h), ws);
  CHECK(ws.stats.tokens == 3);
}

TEST_CASE("mpi: a rank that planned for fewer tokens receives more rows than planned", "[mpi]") {
  auto comm = world();
  const test::ScopedCpuIsa reference(CpuIsa::kReference);  // bit for bit
  const auto layers = test::ep_memory_layers();
  const MoELayer& full = layers[0].second;  // glu experts, grouped pass, residual
  ExpertParallelMoELayer ep = ExpertParallelMoELayer::from_layer(
      full, comm, ExpertPlacement::from_owners(std::vector<int32_t>(6, 0), comm->size()));
  // Rank 0 holds every expert and plans for one token; the others send it 20 tokens each.
  const int64_t t = comm->rank() == 0 ? 1 : 20, h = full.hidden();
  auto ws = ep.make_workspace(t);
  const size_t planned = ws.xr.size();
  const auto x = test::ep_random_x(t, h, static_cast<uint32_t>(50 + comm->rank()));
  std::vector<float> y(x.size()), y_full(x.size());
  ep.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y.data(), t, h), ws);
  auto ws_full = full.make_workspace(t);
  full.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y_full.data(), t, h),
           ws_full);
  CHECK(std::memcmp(y.data(), y_full.data(), y.size() * sizeof(float)) == 0);
  if (comm->rank() == 0 && comm->size() > 1) CHECK(ws.xr.size() > planned);  // it grew
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int failed = Catch::Session().run(argc, argv);
  // Every rank's verdict decides the exit status of each, so mpirun and ctest see one answer.
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any != 0 && failed == 0) std::fprintf(stderr, "another rank failed\n");
  MPI_Finalize();
  return any != 0 ? 1 : 0;
}
