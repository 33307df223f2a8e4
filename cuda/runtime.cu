#include <utility>

#include "check.cuh"
#include "moqe/cuda/runtime.hpp"

namespace moqe::cuda {

namespace {

// The outcome of the first device query, kept: CUDA reports a missing driver or device once.
struct Devices {
  int count = 0;
  std::string error;  // why count is 0, when the runtime said
};

const Devices& devices() {
  static const Devices d = [] {
    Devices r;
    const cudaError_t e = cudaGetDeviceCount(&r.count);
    if (e != cudaSuccess) {
      r.count = 0;
      r.error = MOQE_FORMAT("{} ({})", cudaGetErrorName(e), cudaGetErrorString(e));
      cudaGetLastError();  // clear the sticky "no driver / no device" error
    } else if (r.count == 0) {
      r.error = "the CUDA runtime reports no device";
    }
    return r;
  }();
  return d;
}

}  // namespace

int device_count() { return devices().count; }

std::string device_error() { return devices().error; }

std::string device_name(int device) {
  MOQE_CHECK(device >= 0 && device < device_count(), "no CUDA device {} ({} present)", device,
             device_count());
  cudaDeviceProp p{};
  MOQE_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return MOQE_FORMAT("{} (sm_{}{})", p.name, p.major, p.minor);
}

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  if (bytes > 0) MOQE_CUDA_CHECK(cudaMalloc(&data_, bytes));
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

// A copy from pageable memory through cudaMemcpy may return before the device has the data
// (the runtime stages it); the copies here go through the calling thread's default stream and
// wait for it, so the data is in place for work on any stream once they return.
void DeviceBuffer::upload(const void* host, size_t bytes) {
  MOQE_CHECK(bytes <= bytes_, "upload of {} bytes into a device buffer of {}", bytes, bytes_);
  if (bytes == 0) return;
  MOQE_CUDA_CHECK(cudaMemcpyAsync(data_, host, bytes, cudaMemcpyHostToDevice, cudaStreamPerThread));
  MOQE_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
}

void DeviceBuffer::download(void* host, size_t bytes) const {
  MOQE_CHECK(bytes <= bytes_, "download of {} bytes from a device buffer of {}", bytes, bytes_);
  if (bytes == 0) return;
  MOQE_CUDA_CHECK(cudaMemcpyAsync(host, data_, bytes, cudaMemcpyDeviceToHost, cudaStreamPerThread));
  MOQE_CUDA_CHECK(cudaStreamSynchronize(cudaStreamPerThread));
}

}  // namespace moqe::cuda
