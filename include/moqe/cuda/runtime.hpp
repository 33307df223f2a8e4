// Host-side CUDA runtime helpers of the moqe::cuda component: device discovery, owning device
// buffers and streams. No CUDA header is needed to include this file (streams are the runtime's
// opaque CUstream_st pointers, declared here).
#pragma once

#include <cstddef>
#include <span>
#include <string>

struct CUstream_st;

namespace moqe::cuda {

using Stream = CUstream_st*;  // cudaStream_t; nullptr is the default stream

// Number of usable devices; 0 when there is no device or no driver (never throws).
int device_count();
// Why device_count() is 0, as the CUDA runtime said it ("cudaErrorNoDevice (no CUDA-capable
// device is detected)", a driver too old for the runtime, ...); "" when there are devices.
std::string device_error();
// "NVIDIA H100 80GB HBM3 (sm_90)". Throws moqe::Error for an invalid index.
std::string device_name(int device = 0);

// An owning device allocation (cudaMalloc / cudaFree).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return bytes_; }

  // Synchronous copies: complete when the call returns (an upload is visible to later work on
  // any stream). They do not wait for other streams: a download of what a kernel on a stream of
  // the caller's writes needs that stream synchronized first. Sizes are checked.
  void upload(const void* host, size_t bytes);
  void download(void* host, size_t bytes) const;
  template <class T>
  void upload(std::span<const T> host) {
    upload(host.data(), host.size_bytes());
  }
  template <class T>
  void download(std::span<T> host) const {
    download(host.data(), host.size_bytes());
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace moqe::cuda
