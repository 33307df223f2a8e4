// NcclCommunicator: moqe's Communicator over NCCL, the component moqe::nccl (built when NCCL is
// found; linking it defines MOQE_HAVE_NCCL). No CUDA or NCCL header is needed to include this
// file.
//
// Two interfaces:
// - Communicator's (host memory): buffers are staged through device memory, synchronously, so
//   CPU layers (ExpertParallelMoELayer) run over NCCL unchanged.
// - all_to_all_rows_device (device memory): grouped ncclSend/ncclRecv enqueued on a stream,
//   asynchronous, for device-resident layers.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "moqe/cuda/runtime.hpp"
#include "moqe/dist/communicator.hpp"

struct ncclComm;

namespace moqe::cuda {

using NcclUniqueId = std::array<char, 128>;  // ncclUniqueId's bytes

// Made on one rank and handed to the others (e.g. with MPI_Bcast) before they construct.
NcclUniqueId nccl_unique_id();

class NcclCommunicator final : public Communicator {
 public:
  // Rank `rank` of `ranks`, on CUDA device `device`, joining the group that `id` names.
  NcclCommunicator(const NcclUniqueId& id, int ranks, int rank, int device = 0);
  // A one-rank communicator on `device` (one process, one GPU).
  static std::unique_ptr<NcclCommunicator> single(int device = 0);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  ncclComm* comm() const { return comm_; }
  int device() const { return device_; }
  Stream stream() const { return stream_; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "nccl"; }
  void all_to_all(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void all_gather(std::span<const int64_t> send, std::span<int64_t> recv) override;
  void all_to_all_rows(const float* send, std::span<const int64_t> send_rows, float* recv,
                       std::span<const int64_t> recv_rows, int64_t row_floats) override;
  void barrier() override;

  // send and recv are device pointers; counts as in all_to_all_rows (host arrays). Enqueued on
  // `stream`; returns without waiting.
  void all_to_all_rows_device(const float* send, std::span<const int64_t> send_rows, float* recv,
                              std::span<const int64_t> recv_rows, int64_t row_floats,
                              Stream stream);

 private:
  explicit NcclCommunicator(int device);
  ncclComm* comm_ = nullptr;
  int rank_ = 0, size_ = 1, device_ = 0;
  Stream stream_ = nullptr;
  DeviceBuffer send_buf_, recv_buf_;  // staging for the host interface
  void stage(size_t send_bytes, size_t recv_bytes);
};

}  // namespace moqe::cuda
