// 07: expert parallelism across MPI ranks. Rank 0 writes a Mixtral-shaped checkpoint (8 experts,
// top-2, SwiGLU) and quantizes its experts to int4; every rank then loads only the experts the
// placement gives it (plus the replicated router), routes its own tokens, and runs the layer
// with the other ranks: counts, then token rows, go to the experts' ranks with all-to-all-v and
// the results come back. Rank 0 prints each rank's load; every rank checks its output against
// the single-process layer.
//
//   mpirun -n 2 ./07_expert_parallel [--small] [--full]
//
// --small: a tiny layer (ctest); default: hidden 1024, intermediate 3584 (Mixtral at a quarter
// width); --full: Mixtral 8x7B's 4096 x 14336 (writes a 2.8 GB checkpoint).
#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <moqe/dist/mpi.hpp>
#include <moqe/moqe.hpp>
#include <random>
#include <string>

namespace {

int run(int argc, char** argv) {
  auto comm = std::make_shared<moqe::MpiCommunicator>(MPI_COMM_WORLD);
  const int rank = comm->rank(), ranks = comm->size();
  bool small = false, full = false;
  for (int i = 1; i < argc; ++i) {
    small = small || std::string(argv[i]) == "--small";
    full = full || std::string(argv[i]) == "--full";
  }
  moqe::SyntheticMoeSpec spec;  // mixtral, 8 experts, top-2
  spec.hidden = small ? 128 : full ? 4096 : 1024;
  spec.intermediate = small ? 256 : full ? 14336 : 3584;

  // Rank 0 makes the checkpoint in a directory named after its pid, which every rank learns.
  int64_t pid = getpid();
  MPI_Bcast(&pid, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("moqe-ex07-{}", pid);
  struct Cleanup {  // rank 0 removes the directory, also when an error ends the run
    std::filesystem::path dir;
    bool owner;
    ~Cleanup() {
      std::error_code ec;
      if (owner) std::filesystem::remove_all(dir, ec);
    }
  } cleanup{dir, rank == 0};
  if (rank == 0) {
    std::printf("writing a mixtral layer (hidden %lld, intermediate %lld, 8 experts) ...\n",
                static_cast<long long>(spec.hidden), static_cast<long long>(spec.intermediate));
    moqe::write_synthetic_moe(dir / "model", spec);
    moqe::ConvertOptions q;  // int4, group 128: experts only (the router stays BF16)
    q.bits = 4;
    q.group_policy = moqe::GroupPolicy::kFixed;
    q.group_size = 128;
    moqe::quantize_checkpoint(moqe::Checkpoint(dir / "model"), dir / "int4.safetensors", q);
  }
  comm->barrier();

  const moqe::Checkpoint ckpt(dir / "int4.safetensors");
  const moqe::MoeConfig config =
      moqe::read_moe_config(dir / "model" / "config.json", moqe::Family::kMixtral);
  const std::string prefix = moqe::synthetic_moe_prefix(spec);
  const auto placement = moqe::ExpertPlacement::contiguous(config.num_experts(), ranks);
  moqe::ExpertParallelMoELayer layer =
      moqe::load_expert_parallel_layer(ckpt, prefix, config, comm, placement);
  const auto mine = layer.local_expert_ids();
  std::printf("rank %d holds experts %lld..%lld: %.1f MB of weights\n", rank,
              mine.empty() ? -1LL : static_cast<long long>(mine.front()),
              mine.empty() ? -1LL : static_cast<long long>(mine.back()),
              static_cast<double>(layer.stats().weight_bytes) / 1e6);

  // Each rank serves its own batch (a different size on each rank).
  const int64_t h = spec.hidden, tokens = 8 + 8 * rank;
  std::vector<float> x(static_cast<size_t>(tokens * h)), y(x.size());
  std::mt19937 rng(static_cast<uint32_t>(17 + rank));
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& v : x) v = g(rng);
  auto ws = layer.make_workspace(tokens);
  const int steps = 5;
  comm->barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    layer.run(moqe::MatrixView<const float>(x.data(), tokens, h),
              moqe::MatrixView<float>(y.data(), tokens, h), ws);
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
      steps;
  const std::vector<moqe::RankLoad> load = layer.gather_stats(ws);
  if (rank == 0) {
    std::printf("\n%-5s %7s %14s %12s %12s\n", "rank", "tokens", "rows computed", "MB sent",
                "MB received");
    for (size_t p = 0; p < load.size(); ++p) {
      std::printf("%-5zu %7lld %14lld %12.3f %12.3f\n", p, static_cast<long long>(load[p].tokens),
                  static_cast<long long>(load[p].rows_computed),
                  static_cast<double>(load[p].bytes_sent) / 1e6,
                  static_cast<double>(load[p].bytes_received) / 1e6);
    }
    std::printf("%.2f ms per step (rank 0's clock, %d ranks)\n", ms, ranks);
  }

  // Self-check: the single-process layer (all experts, loaded here only for the check) gives the
  // same output to fp32 rounding (bit for bit with the reference kernels).
  const moqe::MoELayer reference = moqe::load_moe_layer(ckpt, prefix, config);
  std::vector<float> y_ref(x.size());
  auto ws_ref = reference.make_workspace(tokens);
  reference.run(moqe::MatrixView<const float>(x.data(), tokens, h),
                moqe::MatrixView<float>(y_ref.data(), tokens, h), ws_ref);
  const moqe::ErrorStats e = moqe::compare(moqe::MatrixView<const float>(y_ref.data(), tokens, h),
                                           moqe::MatrixView<const float>(y.data(), tokens, h));
  const int ok = e.rel_frobenius < 1e-5 ? 1 : 0;
  std::printf("rank %d: output vs single-process layer: relative error %.2e %s\n", rank,
              e.rel_frobenius, ok ? "ok" : "FAILED");
  int all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  comm->barrier();  // every rank is done with the files before rank 0 removes them
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 1;
  try {
    rc = run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);  // the other ranks may be waiting in a collective
  }
  MPI_Finalize();
  return rc;
}
