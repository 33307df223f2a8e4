#include "moqe/io/quantized_format.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>

#include "json_text.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/core/error.hpp"
#include "moqe/io/foreign.hpp"

namespace moqe {
namespace {

std::string scheme_key(std::string_view name) {
  return std::string(kSchemeKeyPrefix) + std::string(name);
}

const std::string* find_scheme(const Checkpoint& ckpt, std::string_view name) {
  auto it = ckpt.metadata().find(scheme_key(name));
  return it == ckpt.metadata().end() ? nullptr : &it->second;
}

std::string where(const Checkpoint& ckpt, std::string_view name) {
  return fmt::format("{}: tensor '{}'", ckpt.path().string(), name);
}

// Reads a tensor's bytes into a vector of T, checking dtype and shape.
template <class T>
std::vector<T> read_exact(const Checkpoint& ckpt, const std::string& tensor, DType dtype,
                          const std::vector<int64_t>& shape, std::string_view part) {
  MOQE_CHECK(ckpt.contains(tensor), "{}: quantized weight is missing its {} tensor '{}'",
             ckpt.path().string(), part, tensor);
  const TensorInfo& t = ckpt.info(tensor);
  MOQE_CHECK(t.dtype == dtype && t.shape == shape, "{}: expected {} {}, found {}",
             where(ckpt, tensor), dtype_name(dtype), shape_to_string(shape), t.describe());
  std::span<const std::byte> b = ckpt.bytes(tensor);
  std::vector<T> out(b.size() / sizeof(T));
  if (!b.empty()) std::memcpy(out.data(), b.data(), b.size());
  return out;
}

}  // namespace

namespace {
nlohmann::json scheme_object(const QuantizedMatrix& q) {
  nlohmann::json j;
  j["bits"] = q.bits();
  j["mode"] = std::string(to_string(q.scheme().mode));
  j["group_size"] = q.group_size();
  j["shape"] = {q.rows(), q.cols()};
  j["scale_dtype"] = q.scheme().scale_type == ScaleType::kF16 ? "F16" : "F32";
  j["code_offset"] = q.scheme().code_offset();
  return j;
}
}  // namespace

std::string scheme_to_json(const QuantizedMatrix& q) { return scheme_object(q).dump(); }

StoredScheme parse_scheme_json(std::string_view full_text, std::string_view what) {
  const std::string text = detail::text_brief(full_text);  // for messages
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(full_text);
  } catch (const nlohmann::json::exception& e) {
    MOQE_FAIL("{}: the scheme metadata is not valid JSON ({})", what, e.what());
  }
  MOQE_CHECK(j.is_object(), "{}: the scheme metadata is not a JSON object", what);
  auto get_int = [&](const char* key) -> int64_t {
    MOQE_CHECK(j.contains(key) && j[key].is_number_integer(),
               "{}: the scheme metadata lacks an integer '{}': {}", what, key, text);
    return j[key].get<int64_t>();
  };
  auto get_str = [&](const char* key) -> std::string {
    MOQE_CHECK(j.contains(key) && j[key].is_string(),
               "{}: the scheme metadata lacks a string '{}': {}", what, key, text);
    return j[key].get<std::string>();
  };
  StoredScheme s;
  const int64_t bits = get_int("bits");
  MOQE_CHECK(bits > 0 && bits <= 8, "{}: unsupported bits {}; supported: 2, 3, 4, 8", what, bits);
  s.scheme.bits = static_cast<int>(bits);
  const std::string mode = get_str("mode");
  auto m = parse_quant_mode(mode);
  MOQE_CHECK(m.has_value(), "{}: unknown quantization mode '{}'; supported: sym, sym_full, asym",
             what, mode);
  s.scheme.mode = *m;
  s.scheme.group_size = get_int("group_size");
  const std::string st = j.contains("scale_dtype") ? get_str("scale_dtype") : "F16";
  auto t = parse_scale_type(st);
  MOQE_CHECK(t.has_value(), "{}: unknown scale_dtype '{}'; supported: F16, F32", what, st);
  s.scheme.scale_type = *t;
  MOQE_CHECK(j.contains("shape") && j["shape"].is_array() && j["shape"].size() == 2 &&
                 j["shape"][0].is_number_integer() && j["shape"][1].is_number_integer(),
             "{}: the scheme metadata lacks a 2-D integer 'shape': {}", what, text);
  s.rows = j["shape"][0].get<int64_t>();
  s.cols = j["shape"][1].get<int64_t>();
  MOQE_CHECK(s.rows >= 0 && s.cols > 0, "{}: invalid quantized shape [{}, {}]", what, s.rows,
             s.cols);
  // The companion tensors' sizes (rows x cols x bits / 8 and the like) must not overflow: the
  // stored parts are then checked against them.
  // A row's bits (cols x 8 at most) must fit even when there are no rows.
  int64_t row_bits = 0, bits_total = 0;
  MOQE_CHECK(!__builtin_mul_overflow(s.cols, int64_t{8}, &row_bits) &&
                 !__builtin_mul_overflow(s.rows, row_bits, &bits_total),
             "{}: quantized shape [{}, {}] is too large (its size overflows 64 bits)", what, s.rows,
             s.cols);
  validate_scheme(s.scheme, s.cols, what);
  if (j.contains("code_offset")) {
    MOQE_CHECK(get_int("code_offset") == s.scheme.code_offset(),
               "{}: code_offset {} does not match {} at {} bits (expected {})", what,
               get_int("code_offset"), mode, s.scheme.bits, s.scheme.code_offset());
  }
  if (j.contains("input_order")) {
    MOQE_CHECK(j["input_order"].is_boolean(), "{}: 'input_order' must be true or false: {}", what,
               text);
    s.input_order = j["input_order"].get<bool>();
  }
  if (j.contains("experts")) {
    s.stack.experts = get_int("experts");
    MOQE_CHECK(s.stack.experts > 0 && s.stack.experts <= (int64_t{1} << 24),
               "{}: invalid expert count {} in the scheme metadata", what, s.stack.experts);
    int64_t total = 0;
    MOQE_CHECK(!__builtin_mul_overflow(s.stack.experts, bits_total, &total),
               "{}: {} experts of [{}, {}] overflow 64 bits", what, s.stack.experts, s.rows,
               s.cols);
    MOQE_CHECK(j.contains("transposed") && j["transposed"].is_boolean(),
               "{}: the scheme metadata of a fused expert tensor lacks a boolean 'transposed': {}",
               what, text);
    s.stack.transposed = j["transposed"].get<bool>();
    MOQE_CHECK(j.contains("source_shape") && j["source_shape"].is_array(),
               "{}: the scheme metadata of a fused expert tensor lacks 'source_shape': {}", what,
               text);
    int64_t numel = 1;
    for (const auto& d : j["source_shape"]) {
      MOQE_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0,
                 "{}: 'source_shape' must hold non-negative integers: {}", what, text);
      s.source_shape.push_back(d.get<int64_t>());
      MOQE_CHECK(!__builtin_mul_overflow(numel, d.get<int64_t>(), &numel),
                 "{}: 'source_shape' overflows 64 bits: {}", what, text);
    }
    MOQE_CHECK(numel == s.stack.experts * s.rows * s.cols,
               "{}: source_shape {} does not hold {} experts of [{}, {}]", what,
               shape_to_string(s.source_shape), s.stack.experts, s.rows, s.cols);
  }
  return s;
}

void add_quantized(SafetensorsWriter& writer, const std::string& name, const QuantizedMatrix& q) {
  const int64_t n = q.rows(), ng = q.groups_per_row();
  writer.add_values<uint8_t>(name + ".qweight", DType::kU8, {n, q.row_bytes()}, q.qweight());
  if (q.scheme().scale_type == ScaleType::kF16) {
    std::vector<uint16_t> h(q.scales().size());
    std::transform(q.scales().begin(), q.scales().end(), h.begin(), float_to_half_bits);
    writer.add_values<uint16_t>(name + ".scales", DType::kF16, {n, ng}, h);
  } else {
    writer.add_values<float>(name + ".scales", DType::kF32, {n, ng}, q.scales());
  }
  if (q.scheme().has_zeros()) {
    writer.add_values<uint8_t>(name + ".zeros", DType::kU8, {n, ng}, q.zeros());
  }
  nlohmann::json j = scheme_object(q);
  if (q.has_input_order()) {
    writer.add_values<int32_t>(name + ".input_order", DType::kI32, {q.cols()}, q.input_order());
    j["input_order"] = true;
  }
  writer.set_metadata(std::string(kFormatKey), std::string(kFormatVersion));
  writer.set_metadata(scheme_key(name), j.dump());
}

void add_quantized_experts(SafetensorsWriter& writer, const std::string& name,
                           std::span<const QuantizedMatrix> experts, const ExpertStack& stack,
                           std::vector<int64_t> source_shape) {
  MOQE_CHECK(!experts.empty() && static_cast<int64_t>(experts.size()) == stack.experts,
             "add_quantized_experts: {} matrices for {} experts of '{}'", experts.size(),
             stack.experts, name);
  const QuantizedMatrix& q0 = experts[0];
  for (const QuantizedMatrix& q : experts) {
    MOQE_CHECK(!q.has_input_order(),
               "add_quantized_experts: '{}': a fused expert tensor cannot store act-order "
               "matrices",
               name);
    MOQE_CHECK(q.rows() == q0.rows() && q.cols() == q0.cols() &&
                   q.scheme().to_string() == q0.scheme().to_string() &&
                   q.group_size() == q0.group_size(),
               "add_quantized_experts: the experts of '{}' differ in shape or scheme", name);
  }
  const int64_t e = stack.experts, n = q0.rows(), ng = q0.groups_per_row();
  std::vector<uint8_t> qweight, zeros;
  std::vector<uint16_t> half;
  std::vector<float> full;
  for (const QuantizedMatrix& q : experts) {
    qweight.insert(qweight.end(), q.qweight().begin(), q.qweight().end());
    zeros.insert(zeros.end(), q.zeros().begin(), q.zeros().end());
    if (q.scheme().scale_type == ScaleType::kF16) {
      for (const float v : q.scales()) half.push_back(float_to_half_bits(v));
    } else {
      full.insert(full.end(), q.scales().begin(), q.scales().end());
    }
  }
  writer.add_values<uint8_t>(name + ".qweight", DType::kU8, {e, n, q0.row_bytes()}, qweight);
  if (q0.scheme().scale_type == ScaleType::kF16) {
    writer.add_values<uint16_t>(name + ".scales", DType::kF16, {e, n, ng}, half);
  } else {
    writer.add_values<float>(name + ".scales", DType::kF32, {e, n, ng}, full);
  }
  if (q0.scheme().has_zeros()) {
    writer.add_values<uint8_t>(name + ".zeros", DType::kU8, {e, n, ng}, zeros);
  }
  nlohmann::json j = scheme_object(q0);
  j["experts"] = e;
  j["transposed"] = stack.transposed;
  j["source_shape"] = source_shape;
  writer.set_metadata(std::string(kFormatKey), std::string(kFormatVersion));
  writer.set_metadata(scheme_key(name), j.dump());
}

StoredScheme stored_scheme(const Checkpoint& ckpt, std::string_view name) {
  if (find_scheme(ckpt, name) == nullptr && is_foreign_quantized(ckpt, name)) {
    const QuantizedMatrix q = load_foreign(ckpt, name);
    StoredScheme s;
    s.scheme = q.scheme();
    s.scheme.group_size = q.group_size();
    s.rows = q.rows();
    s.cols = q.cols();
    s.input_order = q.has_input_order();
    return s;
  }
  const std::string* json = find_scheme(ckpt, name);
  MOQE_CHECK(json != nullptr, "{}: no quantized weight '{}' (no '{}' metadata)",
             ckpt.path().string(), name, scheme_key(name));
  return parse_scheme_json(*json, where(ckpt, name));
}

bool is_quantized(const Checkpoint& ckpt, std::string_view name) {
  return find_scheme(ckpt, name) != nullptr || is_foreign_quantized(ckpt, name);
}

std::vector<std::string> quantized_weight_names(const Checkpoint& ckpt) {
  std::vector<std::string> names;
  for (const auto& [key, value] : ckpt.metadata()) {
    if (key.starts_with(kSchemeKeyPrefix)) names.push_back(key.substr(kSchemeKeyPrefix.size()));
  }
  for (std::string& n : foreign_weight_names(ckpt)) names.push_back(std::move(n));
  std::sort(names.begin(), names.end());
  return names;
}

namespace {

// Matrix `e` of a quantized weight (e = -1: a plain matrix), every part checked against its scheme.
QuantizedMatrix load_quantized_part(const Checkpoint& ckpt, std::string_view name, int64_t e) {
  const std::string* json = find_scheme(ckpt, name);
  MOQE_CHECK(json != nullptr, "{}: no quantized weight '{}' (no '{}' metadata)",
             ckpt.path().string(), name, scheme_key(name));
  auto fmt_it = ckpt.metadata().find(std::string(kFormatKey));
  MOQE_CHECK(fmt_it != ckpt.metadata().end() && fmt_it->second == kFormatVersion,
             "{}: unsupported moqe.format '{}' (this build reads format {})", ckpt.path().string(),
             fmt_it == ckpt.metadata().end() ? std::string("<missing>") : fmt_it->second,
             kFormatVersion);
  const std::string what = where(ckpt, name);
  const StoredScheme s = parse_scheme_json(*json, what);
  const int64_t experts = s.stack.experts;
  MOQE_CHECK(e >= 0 || experts == 0,
             "{}: a fused tensor of {} experts' weights, not one matrix (read it per expert)", what,
             experts);
  MOQE_CHECK(e < 0 || experts > 0, "{}: one matrix, not a fused expert tensor", what);
  MOQE_CHECK(e < experts || experts == 0, "{}: expert {} of {}", what, e, experts);
  const std::string base(name);
  const int64_t n = s.rows, ng = s.cols / s.scheme.resolved_group_size(s.cols);
  const int64_t rb = packed_row_bytes(s.cols, s.scheme.bits);
  auto shape = [&](int64_t c) {
    return experts == 0 ? std::vector<int64_t>{n, c} : std::vector<int64_t>{experts, n, c};
  };
  // One expert's slice of a part, checked as a whole.
  auto part = [&](const std::string& tensor, DType dtype, int64_t c, std::string_view what_part) {
    MOQE_CHECK(ckpt.contains(tensor), "{}: quantized weight is missing its {} tensor '{}'",
               ckpt.path().string(), what_part, tensor);
    const TensorInfo& t = ckpt.info(tensor);
    MOQE_CHECK(t.dtype == dtype && t.shape == shape(c), "{}: expected {} {}, found {}",
               where(ckpt, tensor), dtype_name(dtype), shape_to_string(shape(c)), t.describe());
    const size_t bytes = static_cast<size_t>(n * c) * dtype_size(dtype);
    return ckpt.bytes(tensor).subspan(experts == 0 ? 0 : static_cast<size_t>(e) * bytes, bytes);
  };
  auto as = [](std::span<const std::byte> b, auto tag) {
    std::vector<decltype(tag)> v(b.size() / sizeof(tag));
    if (!b.empty()) std::memcpy(v.data(), b.data(), b.size());
    return v;
  };
  auto qweight = as(part(base + ".qweight", DType::kU8, rb, "qweight"), uint8_t{});
  std::vector<float> scales;
  if (s.scheme.scale_type == ScaleType::kF16) {
    auto h = as(part(base + ".scales", DType::kF16, ng, "scales"), uint16_t{});
    scales.resize(h.size());
    std::transform(h.begin(), h.end(), scales.begin(), half_bits_to_float);
  } else {
    scales = as(part(base + ".scales", DType::kF32, ng, "scales"), float{});
  }
  std::vector<uint8_t> zeros;
  if (s.scheme.has_zeros()) zeros = as(part(base + ".zeros", DType::kU8, ng, "zeros"), uint8_t{});
  QuantizedMatrix q = QuantizedMatrix::from_parts(
      n, s.cols, s.scheme, std::move(qweight), std::move(scales), std::move(zeros),
      experts == 0 ? what : fmt::format("{} (expert {})", what, e));
  if (s.input_order) {
    MOQE_CHECK(experts == 0, "{}: a fused expert tensor with an input order", what);
    const std::string t = base + ".input_order";
    MOQE_CHECK(ckpt.contains(t), "{}: quantized weight is missing its input_order tensor '{}'",
               ckpt.path().string(), t);
    const TensorInfo& ti = ckpt.info(t);
    MOQE_CHECK(ti.dtype == DType::kI32 && ti.shape == std::vector<int64_t>{s.cols},
               "{}: expected I32 [{}], found {}", where(ckpt, t), s.cols, ti.describe());
    q.set_input_order(as(ckpt.bytes(t), int32_t{}), what);
  }
  return q;
}

}  // namespace

QuantizedMatrix load_quantized(const Checkpoint& ckpt, std::string_view name) {
  if (find_scheme(ckpt, name) == nullptr && is_foreign_quantized(ckpt, name)) {
    return load_foreign(ckpt, name);
  }
  return load_quantized_part(ckpt, name, -1);
}

QuantizedMatrix load_quantized_expert(const Checkpoint& ckpt, std::string_view name, int64_t e) {
  return load_quantized_part(ckpt, name, e);
}

std::string companion_weight(const Checkpoint& ckpt, std::string_view name) {
  if (std::string w = foreign_part_weight(ckpt, name); !w.empty()) return w;
  for (std::string_view suffix : {".qweight", ".scales", ".zeros", ".input_order"}) {
    if (name.ends_with(suffix) && is_quantized(ckpt, name.substr(0, name.size() - suffix.size()))) {
      return std::string(name.substr(0, name.size() - suffix.size()));
    }
  }
  constexpr std::string_view kInv = "_scale_inv";
  if (name.ends_with(kInv)) {
    const std::string_view base = name.substr(0, name.size() - kInv.size());
    if (ckpt.contains(base) && ckpt.info(base).dtype == DType::kF8_E4M3) return std::string(base);
  }
  return {};
}

bool is_companion_tensor(const Checkpoint& ckpt, std::string_view name) {
  return !companion_weight(ckpt, name).empty();
}

std::vector<int64_t> weight_shape(const Checkpoint& ckpt, std::string_view name) {
  if (find_scheme(ckpt, name) == nullptr && is_foreign_quantized(ckpt, name)) {
    return foreign_shape(ckpt, name);
  }
  if (const std::string* json = find_scheme(ckpt, name)) {
    const StoredScheme s = parse_scheme_json(*json, where(ckpt, name));
    if (s.stack.experts > 0) return s.source_shape;
    return {s.rows, s.cols};
  }
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}'", ckpt.path().string(), name);
  return ckpt.info(name).shape;
}

DenseWeight load_weight_f32(const Checkpoint& ckpt, std::string_view name, int num_threads) {
  DenseWeight w;
  if (is_quantized(ckpt, name)) {
    const QuantizedMatrix q = load_quantized(ckpt, name);
    w.rows = q.rows();
    w.cols = q.cols();
    w.values = dequantize(q, num_threads);
    return w;
  }
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}'", ckpt.path().string(), name);
  const TensorInfo& t = ckpt.info(name);
  MOQE_CHECK(t.shape.size() == 2, "{}: expected a 2-D weight, found {}", where(ckpt, name),
             t.describe());
  w.rows = t.shape[0];
  w.cols = t.shape[1];
  if (t.dtype == DType::kF8_E4M3) {
    // DeepSeek-V3 style: one F32 inverse scale per 128x128 block multiplies the fp8 values.
    const std::string inv = std::string(name) + "_scale_inv";
    MOQE_CHECK(ckpt.contains(inv), "{}: F8_E4M3 weight without its block scales '{}'",
               where(ckpt, name), inv);
    constexpr int64_t kBlock = 128;
    const int64_t br = (w.rows + kBlock - 1) / kBlock, bc = (w.cols + kBlock - 1) / kBlock;
    const TensorInfo& ti = ckpt.info(inv);
    MOQE_CHECK(ti.shape == std::vector<int64_t>({br, bc}),
               "{}: block scales {} do not match weight {} (expected [{}, {}] for 128x128 blocks)",
               where(ckpt, inv), ti.describe(), t.describe(), br, bc);
    const std::vector<float> s = ckpt.to_float(inv);
    w.values = ckpt.to_float(name);
    for (int64_t r = 0; r < w.rows; ++r) {
      for (int64_t c = 0; c < w.cols; ++c)
        w.values[r * w.cols + c] *= s[(r / kBlock) * bc + c / kBlock];
    }
    return w;
  }
  MOQE_CHECK(dtype_is_float(t.dtype), "{}: expected a floating-point weight, found {}",
             where(ckpt, name), t.describe());
  w.values = ckpt.to_float(name);
  return w;
}

DenseWeight load_expert_f32(const Checkpoint& ckpt, std::string_view name, const ExpertStack& stack,
                            int64_t e) {
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}'", ckpt.path().string(), name);
  const TensorInfo& t = ckpt.info(name);
  MOQE_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kF16 || t.dtype == DType::kBF16,
             "{}: a fused expert tensor must be F32, F16 or BF16, found {}", where(ckpt, name),
             t.describe());
  const int64_t numel = t.numel();
  MOQE_CHECK(stack.experts > 0 && numel % stack.experts == 0 && !t.shape.empty() &&
                 t.shape.back() > 0 && e >= 0 && e < stack.experts,
             "{}: {} does not hold expert {} of {}", where(ckpt, name), t.describe(), e,
             stack.experts);
  const int64_t b = t.shape.back(), a = numel / stack.experts / b;
  const size_t es = dtype_size(t.dtype);
  const auto bytes = ckpt.bytes(name).subspan(static_cast<size_t>(e * a * b) * es,
                                              static_cast<size_t>(a * b) * es);
  std::vector<float> block(static_cast<size_t>(a * b));
  to_float(t.dtype, bytes.data(), block.size(), block.data());
  DenseWeight w;
  if (!stack.transposed) {
    w.rows = a;
    w.cols = b;
    w.values = std::move(block);
  } else {
    w.rows = b;
    w.cols = a;
    w.values.resize(block.size());
    for (int64_t r = 0; r < a; ++r) {
      for (int64_t c = 0; c < b; ++c) w.values[c * a + r] = block[r * b + c];
    }
  }
  return w;
}

DenseTensor load_tensor_f32(const Checkpoint& ckpt, std::string_view name, int num_threads) {
  if (is_quantized(ckpt, name)) {
    const StoredScheme s = stored_scheme(ckpt, name);
    if (s.stack.experts == 0) {
      DenseWeight w = load_weight_f32(ckpt, name, num_threads);
      return {std::move(w.values), {w.rows, w.cols}};
    }
    DenseTensor out;
    out.shape = s.source_shape;
    const int64_t per = s.rows * s.cols;
    out.values.resize(static_cast<size_t>(s.stack.experts * per));
    for (int64_t e = 0; e < s.stack.experts; ++e) {
      const std::vector<float> w = dequantize(load_quantized_expert(ckpt, name, e), num_threads);
      float* dst = out.values.data() + e * per;
      if (!s.stack.transposed) {
        std::copy(w.begin(), w.end(), dst);
      } else {  // W_e [N, K] back to the stored block [K, N]
        for (int64_t r = 0; r < s.rows; ++r) {
          for (int64_t c = 0; c < s.cols; ++c) dst[c * s.rows + r] = w[r * s.cols + c];
        }
      }
    }
    return out;
  }
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}'", ckpt.path().string(), name);
  const TensorInfo& t = ckpt.info(name);
  if (t.shape.size() == 2) {
    DenseWeight w = load_weight_f32(ckpt, name, num_threads);
    return {std::move(w.values), t.shape};
  }
  return {ckpt.to_float(name), t.shape};
}

}  // namespace moqe
