#include <utility>

#include "check.cuh"
#include "moqe/cuda/runtime.hpp"

namespace moqe::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

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

void DeviceBuffer::upload(const void* host, size_t bytes) {
  MOQE_CHECK(bytes <= bytes_, "upload of {} bytes into a device buffer of {}", bytes, bytes_);
  if (bytes > 0) MOQE_CUDA_CHECK(cudaMemcpy(data_, host, bytes, cudaMemcpyHostToDevice));
}

void DeviceBuffer::download(void* host, size_t bytes) const {
  MOQE_CHECK(bytes <= bytes_, "download of {} bytes from a device buffer of {}", bytes, bytes_);
  if (bytes > 0) MOQE_CUDA_CHECK(cudaMemcpy(host, data_, bytes, cudaMemcpyDeviceToHost));
}

}  // namespace moqe::cuda
