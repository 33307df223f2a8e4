#include <nccl.h>

#include <cstring>
#include <utility>

#include "check.cuh"
#include "moqe/cuda/nccl.hpp"

#define MOQE_NCCL_CHECK(call)                                                     \
  do {                                                                            \
    const ncclResult_t moqe_nccl_status_ = (call);                                \
    MOQE_CHECK(moqe_nccl_status_ == ncclSuccess, "NCCL error {} in {} at {}:{}",  \
               ncclGetErrorString(moqe_nccl_status_), #call, __FILE__, __LINE__); \
  } while (0)

namespace moqe::cuda {
namespace {

// Ends an NCCL group on every path: a failed call inside it must not leave later calls of this
// thread joined to a broken group.
class NcclGroup {
 public:
  NcclGroup() { MOQE_NCCL_CHECK(ncclGroupStart()); }
  ~NcclGroup() {
    if (open_) ncclGroupEnd();
  }
  void end() {
    open_ = false;
    MOQE_NCCL_CHECK(ncclGroupEnd());
  }
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

 private:
  bool open_ = true;
};

}  // namespace

static_assert(sizeof(ncclUniqueId) == sizeof(NcclUniqueId), "ncclUniqueId is 128 bytes");

NcclUniqueId nccl_unique_id() {
  ncclUniqueId id;
  MOQE_NCCL_CHECK(ncclGetUniqueId(&id));
  NcclUniqueId out;
  std::memcpy(out.data(), &id, sizeof id);
  return out;
}

NcclCommunicator::NcclCommunicator(int device) : device_(device) {
  MOQE_CHECK(device >= 0 && device < device_count(),
             "NcclCommunicator: no CUDA device {} ({} present)", device, device_count());
  const detail::DeviceScope on(device);
  MOQE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}

NcclCommunicator::NcclCommunicator(const NcclUniqueId& id, int ranks, int rank, int device)
    : NcclCommunicator(device) {
  MOQE_CHECK(ranks > 0 && rank >= 0 && rank < ranks, "NcclCommunicator: rank {} of {}", rank,
             ranks);
  ncclUniqueId nid;
  std::memcpy(&nid, id.data(), sizeof nid);
  const detail::DeviceScope on(device_);
  MOQE_NCCL_CHECK(ncclCommInitRank(&comm_, ranks, nid, rank));
  rank_ = rank;
  size_ = ranks;
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::single(int device) {
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator(device));
  int devs[1] = {device};
  const detail::DeviceScope on(device);
  MOQE_NCCL_CHECK(ncclCommInitAll(&c->comm_, 1, devs));
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  int previous = -1;
  const bool restore = cudaGetDevice(&previous) == cudaSuccess;
  cudaSetDevice(device_);
  if (comm_ != nullptr) ncclCommDestroy(comm_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
  if (restore) cudaSetDevice(previous);
}

// Callers hold a DeviceScope of device_: the staging buffers live on this rank's device.
void NcclCommunicator::stage(size_t send_bytes, size_t recv_bytes) {
  if (send_buf_.size() < send_bytes) send_buf_ = DeviceBuffer(send_bytes);
  if (recv_buf_.size() < recv_bytes) recv_buf_ = DeviceBuffer(recv_bytes);
}

void NcclCommunicator::all_to_all(std::span<const int64_t> send, std::span<int64_t> recv) {
  const auto p = static_cast<size_t>(size_);
  MOQE_CHECK(send.size() == recv.size() && send.size() % p == 0,
             "nccl all_to_all: {} values sent and {} received over {} ranks", send.size(),
             recv.size(), p);
  const size_t n = send.size() / p;
  const detail::DeviceScope on(device_);
  stage(send.size_bytes(), recv.size_bytes());
  auto* s = send_buf_.as<int64_t>();
  auto* r = recv_buf_.as<int64_t>();
  MOQE_CUDA_CHECK(
      cudaMemcpyAsync(s, send.data(), send.size_bytes(), cudaMemcpyHostToDevice, stream_));
  NcclGroup group;
  for (size_t q = 0; q < p; ++q) {
    MOQE_NCCL_CHECK(ncclSend(s + q * n, n, ncclInt64, static_cast<int>(q), comm_, stream_));
    MOQE_NCCL_CHECK(ncclRecv(r + q * n, n, ncclInt64, static_cast<int>(q), comm_, stream_));
  }
  group.end();
  MOQE_CUDA_CHECK(
      cudaMemcpyAsync(recv.data(), r, recv.size_bytes(), cudaMemcpyDeviceToHost, stream_));
  MOQE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void NcclCommunicator::all_gather(std::span<const int64_t> send, std::span<int64_t> recv) {
  MOQE_CHECK(recv.size() == send.size() * static_cast<size_t>(size_),
             "nccl all_gather: {} values sent, {} received over {} ranks", send.size(), recv.size(),
             size_);
  if (send.empty()) return;
  const detail::DeviceScope on(device_);
  stage(send.size_bytes(), recv.size_bytes());
  MOQE_CUDA_CHECK(cudaMemcpyAsync(send_buf_.data(), send.data(), send.size_bytes(),
                                  cudaMemcpyHostToDevice, stream_));
  MOQE_NCCL_CHECK(
      ncclAllGather(send_buf_.data(), recv_buf_.data(), send.size(), ncclInt64, comm_, stream_));
  MOQE_CUDA_CHECK(cudaMemcpyAsync(recv.data(), recv_buf_.data(), recv.size_bytes(),
                                  cudaMemcpyDeviceToHost, stream_));
  MOQE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void NcclCommunicator::all_to_all_rows_device(const float* send, std::span<const int64_t> send_rows,
                                              float* recv, std::span<const int64_t> recv_rows,
                                              int64_t row_floats, Stream stream) {
  moqe::detail::check_all_to_all_rows(*this, send, send_rows, recv, recv_rows, row_floats);
  const detail::DeviceScope on(device_);
  const auto w = static_cast<size_t>(row_floats);
  size_t s_at = 0, r_at = 0;
  NcclGroup group;
  for (int q = 0; q < size_; ++q) {
    const auto ns = static_cast<size_t>(send_rows[static_cast<size_t>(q)]) * w;
    const auto nr = static_cast<size_t>(recv_rows[static_cast<size_t>(q)]) * w;
    if (ns > 0) MOQE_NCCL_CHECK(ncclSend(send + s_at, ns, ncclFloat32, q, comm_, stream));
    if (nr > 0) MOQE_NCCL_CHECK(ncclRecv(recv + r_at, nr, ncclFloat32, q, comm_, stream));
    s_at += ns;
    r_at += nr;
  }
  group.end();
}

void NcclCommunicator::all_to_all_rows(const float* send, std::span<const int64_t> send_rows,
                                       float* recv, std::span<const int64_t> recv_rows,
                                       int64_t row_floats) {
  const moqe::detail::RowCounts n =
      moqe::detail::check_all_to_all_rows(*this, send, send_rows, recv, recv_rows, row_floats);
  const size_t sb = static_cast<size_t>(n.sent * row_floats) * sizeof(float);
  const size_t rb = static_cast<size_t>(n.received * row_floats) * sizeof(float);
  const detail::DeviceScope on(device_);
  stage(sb, rb);
  if (sb > 0) {
    MOQE_CUDA_CHECK(cudaMemcpyAsync(send_buf_.data(), send, sb, cudaMemcpyHostToDevice, stream_));
  }
  all_to_all_rows_device(send_buf_.as<float>(), send_rows, recv_buf_.as<float>(), recv_rows,
                         row_floats, stream_);
  if (rb > 0) {
    MOQE_CUDA_CHECK(cudaMemcpyAsync(recv, recv_buf_.data(), rb, cudaMemcpyDeviceToHost, stream_));
  }
  MOQE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void NcclCommunicator::barrier() {
  const detail::DeviceScope on(device_);
  stage(sizeof(int64_t), sizeof(int64_t));
  MOQE_NCCL_CHECK(
      ncclAllReduce(send_buf_.data(), recv_buf_.data(), 1, ncclInt64, ncclSum, comm_, stream_));
  MOQE_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

}  // namespace moqe::cuda
