// MpiCommunicator: moqe's Communicator over MPI (component moqe::mpi; link it and call MPI_Init
// first). Rows travel as one contiguous MPI datatype per row, so the int counts of
// MPI_Alltoallv count rows, not floats.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "moqe/dist/communicator.hpp"

namespace moqe {

class MpiCommunicator final : public Communicator {
 public:
  // Duplicates `comm` (moqe's messages never mix with the caller's) and sets MPI_ERRORS_RETURN on
  // the duplicate, so an MPI failure is a moqe::Error naming the call. Destroy it before
  // MPI_Finalize.
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  MPI_Comm comm() const { return comm_; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "mpi"; }
  void all_to_all(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void all_gather(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void all_to_all_rows(const float* send, std::span<const int64_t> send_rows, float* recv,
                       std::span<const int64_t> recv_rows, int64_t row_floats) override;
  void barrier() override;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;  // row_floats_ contiguous floats
  int64_t row_floats_ = 0;
  std::vector<int> counts_[2], displs_[2];  // send, receive
};

}  // namespace moqe
