// Communicator: the collective operations expert parallelism needs, over an existing distributed
// engine. moqe::moqe holds only this interface and LocalCommunicator (one rank); MpiCommunicator
// (moqe::mpi, include/moqe/dist/mpi.hpp) and NcclCommunicator (moqe::cuda, moqe/cuda/nccl.hpp)
// are the real ones, so the core library never depends on MPI or NCCL.
//
// Every call is collective: all ranks make the same calls in the same order, with sizes that
// agree. Buffers are host memory. A communicator runs one collective at a time; it is not for
// concurrent use from several threads.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

namespace moqe {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string_view backend() const = 0;  // "local", "mpi", "nccl"

  // Fixed-size all-to-all: send holds size() blocks of n values, block p for rank p; afterwards
  // recv's block p holds what rank p sent to this rank. send.size() == recv.size() == size() * n.
  virtual void all_to_all(std::span<const int64_t> send, std::span<int64_t> recv) = 0;
  // recv's block p (of send.size() values) is rank p's send. recv.size() == size() * send.size().
  virtual void all_gather(std::span<const int64_t> send, std::span<int64_t> recv) = 0;
  // Variable all-to-all of rows of row_floats floats. send holds send_rows[0] rows for rank 0,
  // then send_rows[1] rows for rank 1, ...; recv receives recv_rows[p] rows from rank p, in rank
  // order. recv_rows[p] must equal what rank p sends to this rank (exchange the counts first with
  // all_to_all). send and recv must not overlap.
  virtual void all_to_all_rows(const float* send, std::span<const int64_t> send_rows, float* recv,
                               std::span<const int64_t> recv_rows, int64_t row_floats) = 0;
  virtual void barrier() = 0;
};

// One rank, no transport: every collective is a copy. The expert-parallel layer on it equals the
// plain layer; tests and single-process programs use it.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string_view backend() const override { return "local"; }
  void all_to_all(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void all_gather(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void all_to_all_rows(const float* send, std::span<const int64_t> send_rows, float* recv,
                       std::span<const int64_t> recv_rows, int64_t row_floats) override;
  void barrier() override {}
};

namespace detail {
// Checks the arguments of all_to_all_rows (sizes, counts, overlap) for every backend; returns the
// total rows sent and received.
struct RowCounts {
  int64_t sent = 0, received = 0;
};
RowCounts check_all_to_all_rows(const Communicator& c, const float* send,
                                std::span<const int64_t> send_rows, const float* recv,
                                std::span<const int64_t> recv_rows, int64_t row_floats);
}  // namespace detail

}  // namespace moqe
