// Fuzzes the quantized-format reader: a weight "w" whose scheme metadata and companion tensors
// (qweight, scales, zeros: dtype, shape, bytes) come from the input, in a small text format:
//
//   line 1     the "moqe.scheme.w" metadata value, verbatim
//   lines 2..  "<part> <dtype> <dim>..." for each stored tensor (part: qweight, scales, zeros)
//   ""         an empty line, then the bytes that fill the tensors (repeated; zeros if none)
//
// fuzz/make_corpus.py writes seeds in this format.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_common.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace {

constexpr uint64_t kMaxTensorBytes = 1 << 20;  // keeps each run fast

bool small(int64_t rows, int64_t cols) {
  int64_t n = 0;
  return rows >= 0 && cols >= 0 && !__builtin_mul_overflow(rows, cols, &n) && n <= (1 << 20);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t eol = in.find('\n');
  if (eol == std::string_view::npos) return 0;
  const std::string scheme(in.substr(0, eol));
  const size_t body_end = in.find("\n\n", eol);
  const std::string_view specs = in.substr(
      eol + 1, body_end == std::string_view::npos ? std::string_view::npos : body_end - eol - 1);
  const std::string_view fill =
      body_end == std::string_view::npos ? std::string_view() : in.substr(body_end + 2);

  moqe::SafetensorsWriter w;
  std::istringstream lines{std::string(specs)};
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string part, dtype_name;
    fields >> part >> dtype_name;
    const auto dtype = moqe::parse_dtype(dtype_name);
    if (part.empty() || part.size() > 16 || !dtype) return 0;
    std::vector<int64_t> shape;
    uint64_t bytes = moqe::dtype_size(*dtype);
    for (int64_t d = 0; shape.size() < 4 && fields >> d;) {
      if (d < 0 || __builtin_mul_overflow(bytes, static_cast<uint64_t>(d), &bytes)) return 0;
      shape.push_back(d);
    }
    if (bytes > kMaxTensorBytes) return 0;
    std::vector<std::byte> b(bytes);
    for (size_t i = 0; i < b.size() && !fill.empty(); ++i) {
      b[i] = static_cast<std::byte>(fill[i % fill.size()]);
    }
    if (w.contains("w." + part)) return 0;
    w.add("w." + part, *dtype, std::move(shape), std::move(b));
  }
  w.set_metadata("moqe.format", "1");
  w.set_metadata("moqe.scheme.w", scheme);
  const auto path = moqe::fuzz::scratch_dir() / "q.safetensors";
  if (moqe::fuzz::rejects([&] { w.write(path); })) return 0;  // e.g. a name that is not UTF-8

  moqe::fuzz::rejects([&] {
    const moqe::Checkpoint ckpt(path);
    (void)moqe::is_quantized(ckpt, "w");
    (void)moqe::is_companion_tensor(ckpt, "w.qweight");
    moqe::fuzz::rejects([&] { (void)moqe::weight_shape(ckpt, "w"); });
    const moqe::QuantizedMatrix q = moqe::load_quantized(ckpt, "w");
    if (!small(q.rows(), q.cols())) return;
    const std::vector<float> v = moqe::dequantize(q, 1);
    if (static_cast<int64_t>(v.size()) != q.rows() * q.cols()) __builtin_trap();
    if (q.rows() > 0) (void)q.at(q.rows() - 1, q.cols() - 1);
    const moqe::DenseWeight d = moqe::load_weight_f32(ckpt, "w", 1);
    if (d.values != v) __builtin_trap();
  });
  return 0;
}
