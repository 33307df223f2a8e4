// Fuzzes the safetensors reader: any bytes as a file, then every accessor on what it accepted,
// including moqe's quantized format when the metadata claims it.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_common.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace {

// rows x cols is small enough to materialize (and the product does not overflow).
bool small(int64_t rows, int64_t cols) {
  int64_t n = 0;
  return rows >= 0 && cols >= 0 && !__builtin_mul_overflow(rows, cols, &n) && n <= (1 << 20);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const moqe::fuzz::MemFile file(data, size);
  moqe::fuzz::rejects([&] {
    const moqe::SafetensorsFile f(file.path());
    uint64_t end = 0;
    for (const moqe::TensorInfo& t : f.tensors()) {
      // The reader promised a tiling of the data buffer that fits the file.
      if (t.begin != end || t.end < t.begin || t.end - t.begin != f.bytes(t.name).size()) {
        __builtin_trap();
      }
      end = t.end;
      if (static_cast<uint64_t>(t.numel()) * moqe::dtype_size(t.dtype) != t.nbytes()) {
        __builtin_trap();
      }
      (void)t.describe();
      if (moqe::dtype_is_convertible(t.dtype)) {
        const std::vector<float> v = f.to_float(t.name);
        if (static_cast<int64_t>(v.size()) != t.numel()) __builtin_trap();
      }
    }
  });
  // The same bytes as a checkpoint: quantized weights, fp8 block scales, companion tensors.
  moqe::fuzz::rejects([&] {
    const moqe::Checkpoint ckpt(file.path());
    for (const std::string& name : ckpt.tensor_names()) (void)moqe::is_companion_tensor(ckpt, name);
    for (const std::string& name : moqe::quantized_weight_names(ckpt)) {
      moqe::fuzz::rejects([&] {
        const moqe::QuantizedMatrix q = moqe::load_quantized(ckpt, name);
        if (small(q.rows(), q.cols())) (void)moqe::dequantize(q, 1);
      });
    }
    for (const std::string& name : ckpt.tensor_names()) {
      moqe::fuzz::rejects([&] {
        const std::vector<int64_t> shape = moqe::weight_shape(ckpt, name);
        if (shape.size() == 2 && small(shape[0], shape[1])) {
          (void)moqe::load_weight_f32(ckpt, name, 1);
        }
      });
    }
  });
  return 0;
}
