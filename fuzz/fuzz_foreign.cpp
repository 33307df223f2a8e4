// Fuzzes the readers of other tools' quantized weights (GPTQ, AWQ, compressed-tensors): a weight
// "w.weight" whose config and tensors come from the input, in fuzz_quantized's text format:
//
//   line 1     config.json's quantization_config, verbatim
//   lines 2..  "<part> <dtype> <dim>..." for each tensor w.<part> (qweight, qzeros, scales, g_idx,
//              weight_packed, weight_scale, weight_zero_point, weight_shape, weight_g_idx, weight)
//   ""         an empty line, then the bytes that fill the tensors (repeated; zeros if none)
//
// fuzz/make_corpus.py writes seeds in this format.
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_common.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/foreign.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/io/safetensors.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace {

constexpr uint64_t kMaxTensorBytes = 1 << 20;  // keeps each run fast

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t eol = in.find('\n');
  if (eol == std::string_view::npos) return 0;
  const std::string config(in.substr(0, eol));
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
    if (part.empty() || part.size() > 24 || !dtype) return 0;
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
  const auto dir = moqe::fuzz::scratch_dir() / "foreign";
  std::filesystem::create_directories(dir);
  if (moqe::fuzz::rejects([&] { w.write(dir / "model.safetensors"); })) return 0;
  std::ofstream(dir / "config.json", std::ios::trunc)
      << "{\"quantization_config\":" << config << "}";

  moqe::fuzz::rejects([&] {
    const moqe::Checkpoint ckpt(dir / "model.safetensors");
    (void)ckpt.quantization();
    const std::vector<std::string> names = moqe::quantized_weight_names(ckpt);
    for (const std::string& t : ckpt.tensor_names()) (void)moqe::companion_weight(ckpt, t);
    for (const std::string& n : names) {
      moqe::fuzz::rejects([&] { (void)moqe::weight_shape(ckpt, n); });
      const moqe::QuantizedMatrix q = moqe::load_quantized(ckpt, n);
      const std::vector<float> v = moqe::dequantize(q, 1);
      if (static_cast<int64_t>(v.size()) != q.rows() * q.cols()) __builtin_trap();
      if (q.rows() > 0) {
        // Element access agrees with the row decoder (which undoes any act-order permutation).
        const int64_t c = q.cols() - 1;
        if (q.at(q.rows() - 1, c) != v[static_cast<size_t>(q.rows() * q.cols() - 1)]) {
          __builtin_trap();
        }
      }
      const moqe::DenseWeight d = moqe::load_weight_f32(ckpt, n, 1);
      if (d.values != v) __builtin_trap();
    }
  });
  return 0;
}
