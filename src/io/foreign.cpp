// Readers of other tools' quantized weights (io/foreign.hpp; layouts in docs/formats.md). Each
// unpacks the codes, zero points and scales of one weight and repacks them in moqe's layout: the
// dequantized values (q - z) * s are the same numbers (exact in fp32), and moqe's kernels run them.
#include "moqe/io/foreign.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <regex>

#include "json_text.hpp"
#include "moqe/core/dtypes.hpp"
#include "moqe/core/error.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/quant/packing.hpp"
#include "moqe/quant/quantized_matrix.hpp"

namespace moqe {
namespace {

constexpr uint64_t kMaxConfigBytes = 16 << 20;

std::string base_of(std::string_view name) {
  constexpr std::string_view kWeight = ".weight";
  return std::string(name.ends_with(kWeight) ? name.substr(0, name.size() - kWeight.size()) : name);
}

// A tensor's elements as T, checking its dtype and shape.
template <class T>
std::vector<T> read_as(const Checkpoint& ckpt, const std::string& t, DType dtype,
                       const std::vector<int64_t>& shape) {
  const TensorInfo& i = ckpt.info(t);
  MOQE_CHECK(i.dtype == dtype && i.shape == shape, "{}: tensor '{}' is {}, expected {} {}",
             ckpt.path().string(), t, i.describe(), dtype_name(dtype), shape_to_string(shape));
  std::vector<T> v(static_cast<size_t>(i.numel()));
  const auto b = ckpt.bytes(t);
  if (!b.empty()) std::memcpy(v.data(), b.data(), b.size());
  return v;
}

// Code i of a little-endian stream of 32-bit words: bits [i b, i b + b) of the concatenation,
// word w supplying bits 32 w .. 32 w + 31; `word(w)` reads word w.
template <class Word>
uint32_t stream_code(const Word& word, int64_t i, int bits) {
  const int64_t bit = i * bits, w = bit / 32;
  const int off = static_cast<int>(bit % 32);
  uint64_t v = word(w) >> off;
  if (off + bits > 32) v |= static_cast<uint64_t>(word(w + 1)) << (32 - off);
  return static_cast<uint32_t>(v & ((1u << bits) - 1));
}

// Code i with 32 / b codes per word (compressed-tensors before 0.18), code j at bits b j.
template <class Word>
uint32_t padded_code(const Word& word, int64_t i, int bits) {
  const int64_t per = 32 / bits;
  return (word(i / per) >> (bits * (i % per))) & ((1u << bits) - 1);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scales as floats and the scale type that keeps them exact.
std::vector<float> read_scales(const Checkpoint& ckpt, const std::string& t,
                               const std::vector<int64_t>& shape, ScaleType* type) {
  const TensorInfo& i = ckpt.info(t);
  MOQE_CHECK(i.shape == shape &&
                 (i.dtype == DType::kF16 || i.dtype == DType::kBF16 || i.dtype == DType::kF32),
             "{}: tensor '{}' is {}, expected F16, BF16 or F32 {}", ckpt.path().string(), t,
             i.describe(), shape_to_string(shape));
  *type = i.dtype == DType::kF16 ? ScaleType::kF16 : ScaleType::kF32;  // bf16 fits fp32 exactly
  std::vector<float> v = ckpt.to_float(t);
  for (size_t j = 0; j < v.size(); ++j) {
    MOQE_CHECK(std::isfinite(v[j]), "{}: tensor '{}' holds a non-finite scale {} at {}",
               ckpt.path().string(), t, v[j], j);
  }
  return v;
}

// The pieces every integer format reduces to: codes [N, K] in input order, per-group scale and
// zero point [N, groups], groups of G along K, and an optional act-order group index.
struct Unpacked {
  int64_t n = 0, k = 0, g = 0;
  int bits = 0;
  std::vector<uint8_t> codes;  // [N, K]
  std::vector<float> scales;   // [N, K/G]
  std::vector<int32_t> zeros;  // [N, K/G]; empty: the symmetric offset 2^(b-1)
  ScaleType scale_type = ScaleType::kF16;
  std::vector<int32_t> g_idx;  // [K] group of each input column; empty: k / G
};

// moqe's matrix for those pieces: groups contiguous (columns in act order when g_idx permutes
// them), symmetric when every zero point is the offset 2^(b-1) (sym_full: all 2^b codes).
QuantizedMatrix to_matrix(Unpacked u, const std::string& what) {
  const int64_t ng = u.k / u.g, offset = int64_t{1} << (u.bits - 1);
  std::vector<int32_t> order;
  if (!u.g_idx.empty()) {
    std::vector<int64_t> count(static_cast<size_t>(ng), 0);
    bool trivial = true;
    for (int64_t c = 0; c < u.k; ++c) {
      const int32_t gi = u.g_idx[static_cast<size_t>(c)];
      MOQE_CHECK(gi >= 0 && gi < ng, "{}: g_idx[{}] = {} is not one of the {} groups", what, c, gi,
                 ng);
      count[static_cast<size_t>(gi)]++;
      trivial = trivial && gi == c / u.g;
    }
    for (int64_t gi = 0; gi < ng; ++gi) {
      MOQE_CHECK(count[static_cast<size_t>(gi)] == u.g,
                 "{}: g_idx gives group {} {} columns, not the group size {}", what, gi,
                 count[static_cast<size_t>(gi)], u.g);
    }
    if (!trivial) {
      order.resize(static_cast<size_t>(u.k));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return u.g_idx[static_cast<size_t>(a)] < u.g_idx[static_cast<size_t>(b)];
      });
    }
  }
  bool sym = true;
  for (const int32_t z : u.zeros) {
    MOQE_CHECK(z >= 0 && z < (1 << u.bits), "{}: zero point {} is outside [0, {}]", what, z,
               (1 << u.bits) - 1);
    sym = sym && z == offset;
  }
  QuantScheme scheme{u.bits, sym ? QuantMode::kSymFull : QuantMode::kAsym,
                     u.g == u.k ? kPerChannel : u.g, u.scale_type};
  validate_scheme(scheme, u.k, what);
  const int64_t rb = packed_row_bytes(u.k, u.bits);
  std::vector<uint8_t> packed(static_cast<size_t>(u.n * rb)), row(static_cast<size_t>(u.k));
  for (int64_t n = 0; n < u.n; ++n) {
    const uint8_t* src = u.codes.data() + n * u.k;
    if (order.empty()) {
      pack_row(src, u.k, u.bits, packed.data() + n * rb);
    } else {
      for (int64_t c = 0; c < u.k; ++c) row[c] = src[order[c]];
      pack_row(row.data(), u.k, u.bits, packed.data() + n * rb);
    }
  }
  std::vector<uint8_t> zeros;
  if (!sym) zeros.assign(u.zeros.begin(), u.zeros.end());
  QuantizedMatrix q = QuantizedMatrix::from_parts(u.n, u.k, scheme, std::move(packed),
                                                  std::move(u.scales), std::move(zeros), what);
  if (!order.empty()) q.set_input_order(std::move(order), what);
  return q;
}

// --- GPTQ: qweight I32 [K b / 32, N] packed along K, qzeros I32 [K/G, N b / 32] along N
//     (v1: stored minus one), scales [K/G, N], optional g_idx I32 [K] -----------------------

// A GPTQ weight's [N, K] from its headers: qweight I32 [ceil(K b / 32), N], K from g_idx [K]
// when there is one.
std::array<int64_t, 2> gptq_shape(const Checkpoint& ckpt, const std::string& x, int bits) {
  const TensorInfo& qw = ckpt.info(x + ".qweight");
  MOQE_CHECK(qw.dtype == DType::kI32 && qw.shape.size() == 2,
             "{}: tensor '{}' is {}, expected I32 [K * bits / 32, N]", ckpt.path().string(),
             x + ".qweight", qw.describe());
  int64_t k = qw.shape[0] * 32 / bits;
  if (ckpt.contains(x + ".g_idx")) {
    const TensorInfo& gi = ckpt.info(x + ".g_idx");
    MOQE_CHECK(gi.shape.size() == 1, "{}: tensor '{}' is {}, expected I32 [K]",
               ckpt.path().string(), x + ".g_idx", gi.describe());
    k = gi.shape[0];
  }
  MOQE_CHECK(k > 0 && qw.shape[0] == ceil_div(k * bits, 32),
             "{}: tensor '{}' has {} rows, not the {} that K = {} at {} bits packs into",
             ckpt.path().string(), x + ".qweight", qw.shape[0], ceil_div(k * bits, 32), k, bits);
  return {qw.shape[1], k};
}

// An AWQ weight's [N, K] from its headers: qweight I32 [K, N / 8].
std::array<int64_t, 2> awq_shape(const Checkpoint& ckpt, const std::string& x) {
  const TensorInfo& qw = ckpt.info(x + ".qweight");
  MOQE_CHECK(qw.dtype == DType::kI32 && qw.shape.size() == 2,
             "{}: tensor '{}' is {}, expected I32 [K, N / 8]", ckpt.path().string(), x + ".qweight",
             qw.describe());
  return {qw.shape[1] * 8, qw.shape[0]};
}

// A naive compressed-tensors weight's [N, K]: weight I8 [N, K].
std::array<int64_t, 2> ct_naive_shape(const Checkpoint& ckpt, const std::string& x) {
  const TensorInfo& w = ckpt.info(x + ".weight");
  MOQE_CHECK(w.dtype == DType::kI8 && w.shape.size() == 2,
             "{}: tensor '{}' is {}, expected I8 [N, K]", ckpt.path().string(), x + ".weight",
             w.describe());
  return {w.shape[0], w.shape[1]};
}

Unpacked unpack_gptq(const Checkpoint& ckpt, const std::string& x, const QuantizationConfig& qc) {
  const TensorInfo& qw = ckpt.info(x + ".qweight");
  Unpacked u;
  u.bits = qc.bits;
  const std::array<int64_t, 2> nk = gptq_shape(ckpt, x, u.bits);
  u.n = nk[0];
  u.k = nk[1];
  const bool has_gidx = ckpt.contains(x + ".g_idx");
  const TensorInfo& sc = ckpt.info(x + ".scales");
  MOQE_CHECK(
      sc.shape.size() == 2 && sc.shape[1] == u.n && sc.shape[0] > 0 && u.k % sc.shape[0] == 0,
      "{}: tensor '{}' is {}, expected [groups, {}] with groups dividing K = {}",
      ckpt.path().string(), x + ".scales", sc.describe(), u.n, u.k);
  const int64_t ng = sc.shape[0];
  u.g = u.k / ng;
  const std::vector<uint32_t> words =
      read_as<uint32_t>(ckpt, x + ".qweight", DType::kI32, qw.shape);
  std::vector<uint32_t> zw =
      read_as<uint32_t>(ckpt, x + ".qzeros", DType::kI32, {ng, ceil_div(u.n * u.bits, 32)});
  const int64_t nz = ceil_div(u.n * u.bits, 32);
  if (!qc.gptq_v2 && u.bits == 3 && qc.gptq_int3_word_offsets) {
    // GPTQModel before 7.0 subtracted these from the words of each triple (the 96-bit stream of
    // 32 zero points), which is not one per field; adding them back is the exact inverse.
    constexpr uint32_t kOffsets[3] = {0x24924924u, 0x92492492u, 0x49249249u};
    for (int64_t gi = 0; gi < ng; ++gi) {
      for (int64_t w = 0; w < nz; ++w) zw[static_cast<size_t>(gi * nz + w)] += kOffsets[w % 3];
    }
  } else if (!qc.gptq_v2 && u.bits != 3) {
    // v1 stores z - 1: adding 1 to every field of each word, carries included, is the exact
    // inverse of the writer's subtraction (a per-field +1 breaks on z = 0).
    uint32_t one = 0;
    for (int f = 0; f < 32 / u.bits; ++f) one |= 1u << (f * u.bits);
    for (uint32_t& w : zw) w += one;
  }
  u.codes.resize(static_cast<size_t>(u.n * u.k));
  for (int64_t n = 0; n < u.n; ++n) {
    auto word = [&](int64_t r) { return words[static_cast<size_t>(r * u.n + n)]; };
    for (int64_t c = 0; c < u.k; ++c) {
      u.codes[static_cast<size_t>(n * u.k + c)] =
          static_cast<uint8_t>(stream_code(word, c, u.bits));
    }
  }
  std::vector<float> s = read_scales(ckpt, x + ".scales", sc.shape, &u.scale_type);
  u.scales.resize(static_cast<size_t>(u.n * ng));
  u.zeros.resize(u.scales.size());
  for (int64_t gi = 0; gi < ng; ++gi) {
    auto word = [&](int64_t w) { return zw[static_cast<size_t>(gi * nz + w)]; };
    for (int64_t n = 0; n < u.n; ++n) {
      uint32_t z = stream_code(word, n, u.bits);
      if (!qc.gptq_v2 && u.bits == 3 && !qc.gptq_int3_word_offsets) z = (z + 1) & 7;
      u.zeros[static_cast<size_t>(n * ng + gi)] = static_cast<int32_t>(z);
      u.scales[static_cast<size_t>(n * ng + gi)] = s[static_cast<size_t>(gi * u.n + n)];
    }
  }
  if (has_gidx) u.g_idx = read_as<int32_t>(ckpt, x + ".g_idx", DType::kI32, {u.k});
  return u;
}

// --- AWQ (GEMM): qweight I32 [K, N/8] and qzeros I32 [K/G, N/8] packed along N with column
//     8c + j in nibble [0, 4, 1, 5, 2, 6, 3, 7][j]; scales [K/G, N] ---------------------------

Unpacked unpack_awq(const Checkpoint& ckpt, const std::string& x) {
  constexpr int kNibble[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  const TensorInfo& qw = ckpt.info(x + ".qweight");
  Unpacked u;
  u.bits = 4;
  const std::array<int64_t, 2> nk = awq_shape(ckpt, x);
  u.n = nk[0];
  u.k = nk[1];
  const TensorInfo& sc = ckpt.info(x + ".scales");
  MOQE_CHECK(
      sc.shape.size() == 2 && sc.shape[1] == u.n && sc.shape[0] > 0 && u.k % sc.shape[0] == 0,
      "{}: tensor '{}' is {}, expected [groups, {}] with groups dividing K = {}",
      ckpt.path().string(), x + ".scales", sc.describe(), u.n, u.k);
  const int64_t ng = sc.shape[0], w8 = qw.shape[1];
  u.g = u.k / ng;
  const std::vector<uint32_t> words =
      read_as<uint32_t>(ckpt, x + ".qweight", DType::kI32, qw.shape);
  const std::vector<uint32_t> zw = read_as<uint32_t>(ckpt, x + ".qzeros", DType::kI32, {ng, w8});
  auto field = [&](uint32_t word, int64_t n) { return (word >> (4 * kNibble[n % 8])) & 15u; };
  u.codes.resize(static_cast<size_t>(u.n * u.k));
  for (int64_t c = 0; c < u.k; ++c) {
    for (int64_t n = 0; n < u.n; ++n) {
      u.codes[static_cast<size_t>(n * u.k + c)] =
          static_cast<uint8_t>(field(words[static_cast<size_t>(c * w8 + n / 8)], n));
    }
  }
  std::vector<float> s = read_scales(ckpt, x + ".scales", sc.shape, &u.scale_type);
  u.scales.resize(static_cast<size_t>(u.n * ng));
  u.zeros.resize(u.scales.size());
  for (int64_t gi = 0; gi < ng; ++gi) {
    for (int64_t n = 0; n < u.n; ++n) {
      u.zeros[static_cast<size_t>(n * ng + gi)] =
          static_cast<int32_t>(field(zw[static_cast<size_t>(gi * w8 + n / 8)], n));
      u.scales[static_cast<size_t>(n * ng + gi)] = s[static_cast<size_t>(gi * u.n + n)];
    }
  }
  return u;
}

// --- compressed-tensors ------------------------------------------------------------------

// The config group that quantizes module `x`, or nullptr when an ignore entry matches it or no
// group does. As compressed-tensors matches: "re:<regex>" from the start of the name (re.match),
// anything else the whole name, or "Linear" (every weight read here is a Linear's); a group
// naming the module exactly wins over one matching it by a regex, which wins over "Linear".
const CompressedTensorsGroup* ct_group(const QuantizationConfig& qc, const std::string& x) {
  auto regex_matches = [&](const std::string& pattern) {
    try {
      return std::regex_search(x, std::regex(pattern.substr(3)),
                               std::regex_constants::match_continuous);
    } catch (const std::regex_error& e) {
      MOQE_FAIL("{}: invalid compressed-tensors pattern '{}': {}", qc.source.string(), pattern,
                e.what());
    }
  };
  // 0: the exact name, 1: a regex, 2: the class; -1: no match.
  auto rank = [&](const std::string& pattern) {
    if (pattern == x) return 0;
    if (pattern.starts_with("re:")) return regex_matches(pattern) ? 1 : -1;
    return pattern == "Linear" ? 2 : -1;
  };
  for (const std::string& i : qc.ignore) {
    if (rank(i) >= 0) return nullptr;
  }
  const CompressedTensorsGroup* best = nullptr;
  int best_rank = 3;
  for (const CompressedTensorsGroup& g : qc.groups) {
    for (const std::string& t : g.targets) {
      const int r = rank(t);
      if (r >= 0 && r < best_rank) {
        best = &g;
        best_rank = r;
      }
    }
  }
  return best;
}

const CompressedTensorsGroup& ct_group_or_fail(const Checkpoint& ckpt, const std::string& x) {
  const QuantizationConfig& qc = ckpt.quantization();
  const CompressedTensorsGroup* g = ct_group(qc, x);
  MOQE_CHECK(g != nullptr,
             "{}: module '{}' holds compressed-tensors weights, but no config group of {} "
             "quantizes it (its targets and ignore list)",
             ckpt.path().string(), x, qc.source.string());
  return *g;
}

// Group size and group count of a compressed-tensors weight from its strategy.
void ct_groups(const CompressedTensorsGroup& cg, Unpacked& u, const std::string& what) {
  if (cg.strategy == "group") {
    MOQE_CHECK(cg.group_size > 0 && u.k % cg.group_size == 0,
               "{}: group_size {} does not divide K = {}", what, cg.group_size, u.k);
    u.g = cg.group_size;
  } else if (cg.strategy == "channel" || cg.strategy == "tensor") {
    u.g = u.k;
  } else {
    MOQE_FAIL("{}: compressed-tensors strategy '{}' is not read (group, channel, tensor)", what,
              cg.strategy);
  }
}

// A pack-quantized weight's [N, K] from its weight_shape tensor (I64, or I32 in some writers),
// each within [1, 2^31) so that every size computed from them fits.
std::array<int64_t, 2> ct_weight_shape(const Checkpoint& ckpt, const std::string& x) {
  const std::string t = x + ".weight_shape";
  const TensorInfo& ws = ckpt.info(t);
  MOQE_CHECK((ws.dtype == DType::kI64 || ws.dtype == DType::kI32) && ws.numel() == 2,
             "{}: tensor '{}' is {}, expected I64 [2]", ckpt.path().string(), t, ws.describe());
  const auto b = ckpt.bytes(t);
  std::array<int64_t, 2> v{};
  for (size_t i = 0; i < 2; ++i) {
    if (ws.dtype == DType::kI64) {
      std::memcpy(&v[i], b.data() + 8 * i, 8);
    } else {
      int32_t w = 0;
      std::memcpy(&w, b.data() + 4 * i, 4);
      v[i] = w;
    }
  }
  constexpr int64_t kMax = int64_t{1} << 31;
  MOQE_CHECK(v[0] > 0 && v[1] > 0 && v[0] < kMax && v[1] < kMax,
             "{}: tensor '{}' holds [{}, {}], not a weight's [N, K] (each in [1, 2^31))",
             ckpt.path().string(), t, v[0], v[1]);
  return v;
}

// pack-quantized: weight_packed I32 [N, words] along K (codes q + 2^(b-1)), weight_scale
// [N, K/G] (or [N, 1]), asym: weight_zero_point I32 [N b / 32, K/G] packed along N, weight_shape
// [2], optional weight_g_idx I32 [K].
Unpacked unpack_ct_packed(const Checkpoint& ckpt, const std::string& x, const std::string& what) {
  const QuantizationConfig& qc = ckpt.quantization();
  const CompressedTensorsGroup& cg = ct_group_or_fail(ckpt, x);
  Unpacked u;
  u.bits = cg.bits;
  const std::array<int64_t, 2> shape = ct_weight_shape(ckpt, x);
  u.n = shape[0];
  u.k = shape[1];
  ct_groups(cg, u, what);
  const int64_t ng = u.k / u.g;
  const bool padded = qc.ct_padded && 32 % u.bits != 0;
  const int64_t words = padded ? ceil_div(u.k, 32 / u.bits) : ceil_div(u.k * u.bits, 32);
  const std::vector<uint32_t> wp =
      read_as<uint32_t>(ckpt, x + ".weight_packed", DType::kI32, {u.n, words});
  u.codes.resize(static_cast<size_t>(u.n * u.k));
  for (int64_t n = 0; n < u.n; ++n) {
    auto word = [&](int64_t w) { return wp[static_cast<size_t>(n * words + w)]; };
    for (int64_t c = 0; c < u.k; ++c) {
      u.codes[static_cast<size_t>(n * u.k + c)] = static_cast<uint8_t>(
          padded ? padded_code(word, c, u.bits) : stream_code(word, c, u.bits));
    }
  }
  const int64_t sg = cg.strategy == "group" ? ng : 1;
  std::vector<float> s = cg.strategy == "tensor"
                             ? read_scales(ckpt, x + ".weight_scale", {1}, &u.scale_type)
                             : read_scales(ckpt, x + ".weight_scale", {u.n, sg}, &u.scale_type);
  u.scales.resize(static_cast<size_t>(u.n * ng));
  for (int64_t n = 0; n < u.n; ++n) {
    for (int64_t gi = 0; gi < ng; ++gi) {
      u.scales[static_cast<size_t>(n * ng + gi)] =
          s[cg.strategy == "tensor" ? 0 : static_cast<size_t>(n * sg + gi)];
    }
  }
  if (!cg.symmetric) {
    MOQE_CHECK(cg.strategy != "tensor", "{}: asymmetric tensor-wise weights are not read", what);
    const int64_t zr = padded ? ceil_div(u.n, 32 / u.bits) : ceil_div(u.n * u.bits, 32);
    const std::vector<uint32_t> zp =
        read_as<uint32_t>(ckpt, x + ".weight_zero_point", DType::kI32, {zr, sg});
    u.zeros.resize(u.scales.size());
    for (int64_t gi = 0; gi < sg; ++gi) {
      auto word = [&](int64_t r) { return zp[static_cast<size_t>(r * sg + gi)]; };
      for (int64_t n = 0; n < u.n; ++n) {
        u.zeros[static_cast<size_t>(n * ng + gi)] = static_cast<int32_t>(
            padded ? padded_code(word, n, u.bits) : stream_code(word, n, u.bits));
      }
    }
  } else {
    u.zeros.assign(u.scales.size(), 1 << (u.bits - 1));
  }
  if (ckpt.contains(x + ".weight_g_idx")) {
    u.g_idx = read_as<int32_t>(ckpt, x + ".weight_g_idx", DType::kI32, {u.k});
    // -1 marks a weight quantized without activation order.
    if (std::all_of(u.g_idx.begin(), u.g_idx.end(), [](int32_t v) { return v == -1; })) {
      u.g_idx.clear();
    }
  }
  return u;
}

// naive- / int-quantized (8 bits): weight I8 [N, K] signed, weight_scale [N, 1] / [N, K/G] /
// [1], asym: weight_zero_point I8 of the scale's shape.
Unpacked unpack_ct_naive(const Checkpoint& ckpt, const std::string& x, const std::string& what) {
  const CompressedTensorsGroup& cg = ct_group_or_fail(ckpt, x);
  MOQE_CHECK(cg.bits == 8, "{}: {}-bit naive compressed-tensors weights are not read (8 bits)",
             what, cg.bits);
  const TensorInfo& w = ckpt.info(x + ".weight");
  Unpacked u;
  u.bits = 8;
  const std::array<int64_t, 2> nk = ct_naive_shape(ckpt, x);
  u.n = nk[0];
  u.k = nk[1];
  ct_groups(cg, u, what);
  const int64_t ng = u.k / u.g, sg = cg.strategy == "group" ? ng : 1;
  const std::vector<int8_t> q = read_as<int8_t>(ckpt, x + ".weight", DType::kI8, w.shape);
  u.codes.resize(q.size());
  for (size_t i = 0; i < q.size(); ++i) u.codes[i] = static_cast<uint8_t>(q[i] + 128);
  const std::vector<int64_t> sshape =
      cg.strategy == "tensor" ? std::vector<int64_t>{1} : std::vector<int64_t>{u.n, sg};
  std::vector<float> s = read_scales(ckpt, x + ".weight_scale", sshape, &u.scale_type);
  std::vector<int8_t> zp;
  if (!cg.symmetric) zp = read_as<int8_t>(ckpt, x + ".weight_zero_point", DType::kI8, sshape);
  u.scales.resize(static_cast<size_t>(u.n * ng));
  u.zeros.resize(u.scales.size());
  for (int64_t n = 0; n < u.n; ++n) {
    for (int64_t gi = 0; gi < ng; ++gi) {
      const size_t at = cg.strategy == "tensor" ? 0 : static_cast<size_t>(n * sg + gi % sg);
      u.scales[static_cast<size_t>(n * ng + gi)] = s[at];
      u.zeros[static_cast<size_t>(n * ng + gi)] = zp.empty() ? 128 : zp[at] + 128;
    }
  }
  return u;
}

bool is_ct_naive(const Checkpoint& ckpt, const std::string& x) {
  return ckpt.contains(x + ".weight") && ckpt.info(x + ".weight").dtype == DType::kI8 &&
         ckpt.contains(x + ".weight_scale");
}

}  // namespace

std::string_view to_string(ForeignFormat f) {
  switch (f) {
    case ForeignFormat::kNone:
      return "none";
    case ForeignFormat::kGptq:
      return "gptq";
    case ForeignFormat::kAwq:
      return "awq";
    case ForeignFormat::kCompressedTensors:
      return "compressed-tensors";
  }
  return "?";
}

QuantizationConfig read_quantization_config(const std::filesystem::path& path) {
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  MOQE_CHECK(!ec && std::filesystem::is_regular_file(path, ec) && size <= kMaxConfigBytes,
             "config {}: not a regular file of at most {} bytes", path.string(), kMaxConfigBytes);
  std::ifstream f(path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    MOQE_FAIL("{}: not valid JSON ({})", path.string(), e.what());
  }
  QuantizationConfig qc;
  qc.source = path;
  if (!j.is_object()) return qc;
  const nlohmann::json* q = nullptr;
  for (const char* key : {"quantization_config", "compression_config"}) {
    if (j.contains(key) && j[key].is_object()) q = &j[key];
  }
  if (q == nullptr && j.contains("text_config") && j["text_config"].is_object() &&
      j["text_config"].contains("quantization_config")) {
    q = &j["text_config"]["quantization_config"];
  }
  if (q == nullptr) return qc;
  const std::string where = path.string() + " (quantization_config)";
  auto str = [&](const nlohmann::json& o, const char* key, const char* def) {
    if (!o.contains(key) || o[key].is_null()) return std::string(def);
    MOQE_CHECK(o[key].is_string(), "{}: '{}' must be a string, got {}", where, key,
               detail::json_brief(o[key]));
    return o[key].get<std::string>();
  };
  auto integer = [&](const nlohmann::json& o, const char* key, int64_t def) -> int64_t {
    if (!o.contains(key) || o[key].is_null()) return def;
    MOQE_CHECK(o[key].is_number_integer(), "{}: '{}' must be an integer, got {}", where, key,
               detail::json_brief(o[key]));
    return o[key].get<int64_t>();
  };
  auto boolean = [&](const nlohmann::json& o, const char* key, bool def) {
    if (!o.contains(key) || o[key].is_null()) return def;
    MOQE_CHECK(o[key].is_boolean(), "{}: '{}' must be true or false, got {}", where, key,
               detail::json_brief(o[key]));
    return o[key].get<bool>();
  };
  qc.method = str(*q, "quant_method", "");
  if (qc.method == "gptq") {
    qc.bits = static_cast<int>(integer(*q, "bits", 4));
    qc.group_size = integer(*q, "group_size", 128);
    std::string fmt = str(*q, "checkpoint_format", "");
    if (fmt.empty()) fmt = str(*q, "format", "gptq");
    MOQE_CHECK(fmt == "gptq" || fmt == "gptq_v2",
               "{}: GPTQ checkpoint_format '{}' is not read (gptq, gptq_v2)", where, fmt);
    MOQE_CHECK(qc.bits == 2 || qc.bits == 3 || qc.bits == 4 || qc.bits == 8,
               "{}: GPTQ bits {} are not read (2, 3, 4, 8)", where, qc.bits);
    qc.gptq_v2 = fmt == "gptq_v2";
    // meta.quantizer lists the writers, e.g. ["gptqmodel:4.2.5"].
    if (q->contains("meta") && (*q)["meta"].is_object() && (*q)["meta"].contains("quantizer")) {
      const nlohmann::json& w = (*q)["meta"]["quantizer"];
      std::vector<std::string> writers;
      if (w.is_string()) writers.push_back(w.get<std::string>());
      if (w.is_array()) {
        for (const auto& i : w) {
          if (i.is_string()) writers.push_back(i.get<std::string>());
        }
      }
      for (const std::string& v : writers) {
        constexpr std::string_view kTool = "gptqmodel:";
        if (v.starts_with(kTool) && v.size() > kTool.size() &&
            std::isdigit(static_cast<unsigned char>(v[kTool.size()]))) {
          qc.gptq_int3_word_offsets =
              qc.bits == 3 && !qc.gptq_v2 && std::atoi(v.c_str() + kTool.size()) < 7;
        }
      }
    }
    qc.format = ForeignFormat::kGptq;
  } else if (qc.method == "awq") {
    qc.bits = static_cast<int>(integer(*q, "bits", integer(*q, "w_bit", 4)));
    qc.group_size = integer(*q, "group_size", integer(*q, "q_group_size", 128));
    const std::string version = str(*q, "version", "gemm");
    MOQE_CHECK(version == "gemm" || version == "GEMM", "{}: AWQ version '{}' is not read (gemm)",
               where, version);
    MOQE_CHECK(qc.bits == 4, "{}: AWQ bits {} are not read (4)", where, qc.bits);
    qc.format = ForeignFormat::kAwq;
  } else if (qc.method == "compressed-tensors") {
    const std::string top = str(*q, "format", "");
    const std::string version = str(*q, "version", "");
    // Before 0.18.0, 3-, 5-, 6- and 7-bit codes were padded to 32 / b per int32.
    if (!version.empty()) {
      int major = 0, minor = 0;
      std::sscanf(version.c_str(), "%d.%d", &major, &minor);
      qc.ct_padded = major == 0 && minor < 18;
    }
    if (q->contains("ignore") && (*q)["ignore"].is_array()) {
      for (const auto& i : (*q)["ignore"]) {
        if (i.is_string()) qc.ignore.push_back(i.get<std::string>());
      }
    }
    MOQE_CHECK(q->contains("config_groups") && (*q)["config_groups"].is_object(),
               "{}: compressed-tensors without 'config_groups'", where);
    for (const auto& [name, g] : (*q)["config_groups"].items()) {
      MOQE_CHECK(g.is_object() && g.contains("weights") && g["weights"].is_object(),
                 "{}: config group '{}' has no 'weights' object", where, name);
      const nlohmann::json& w = g["weights"];
      CompressedTensorsGroup cg;
      if (g.contains("targets") && g["targets"].is_array()) {
        for (const auto& t : g["targets"]) {
          if (t.is_string()) cg.targets.push_back(t.get<std::string>());
        }
      }
      cg.bits = static_cast<int>(integer(w, "num_bits", 8));
      cg.symmetric = boolean(w, "symmetric", true);
      cg.strategy = str(w, "strategy", "tensor");
      cg.group_size = integer(w, "group_size", 0);
      // A group's own format wins; "mixed-precision" at the top says each group has its own.
      cg.format = str(g, "format", top == "mixed-precision" ? "" : top.c_str());
      const std::string type = str(w, "type", "int");
      MOQE_CHECK(type == "int",
                 "{}: config group '{}' holds {} weights (format '{}'), which moqe does not read "
                 "(integer weights only)",
                 where, name, type, cg.format);
      MOQE_CHECK(cg.format.empty() || cg.format == "pack-quantized" ||
                     cg.format == "naive-quantized" || cg.format == "int-quantized",
                 "{}: compressed-tensors format '{}' of group '{}' is not read (pack-quantized, "
                 "naive-quantized, int-quantized)",
                 where, cg.format, name);
      MOQE_CHECK(cg.bits == 2 || cg.bits == 3 || cg.bits == 4 || cg.bits == 8,
                 "{}: {}-bit weights of group '{}' are not read (2, 3, 4, 8)", where, cg.bits,
                 name);
      qc.groups.push_back(std::move(cg));
    }
    qc.format = ForeignFormat::kCompressedTensors;
  }
  return qc;
}

bool is_foreign_quantized(const Checkpoint& ckpt, std::string_view name) {
  const std::string x = base_of(name);
  const bool gptq_like = ckpt.contains(x + ".qweight") && ckpt.contains(x + ".qzeros");
  const bool packed = ckpt.contains(x + ".weight_packed");
  const bool naive = is_ct_naive(ckpt, x);
  if (!gptq_like && !packed && !naive) return false;
  const QuantizationConfig& qc = ckpt.quantization();
  switch (qc.format) {
    case ForeignFormat::kGptq:
    case ForeignFormat::kAwq:
      return gptq_like;
    case ForeignFormat::kCompressedTensors:
      return packed || naive;
    case ForeignFormat::kNone:
      break;
  }
  return false;
}

std::vector<int64_t> foreign_shape(const Checkpoint& ckpt, std::string_view name) {
  // Reading the whole weight would be wasteful; the shapes are in the headers.
  const std::string x = base_of(name);
  const QuantizationConfig& qc = ckpt.quantization();
  switch (qc.format) {
    case ForeignFormat::kGptq: {
      const std::array<int64_t, 2> s = gptq_shape(ckpt, x, qc.bits);
      return {s[0], s[1]};
    }
    case ForeignFormat::kAwq: {
      const std::array<int64_t, 2> s = awq_shape(ckpt, x);
      return {s[0], s[1]};
    }
    case ForeignFormat::kCompressedTensors: {
      const std::array<int64_t, 2> s =
          is_ct_naive(ckpt, x) ? ct_naive_shape(ckpt, x) : ct_weight_shape(ckpt, x);
      return {s[0], s[1]};
    }
    case ForeignFormat::kNone:
      break;
  }
  MOQE_FAIL("{}: '{}' is not a foreign-quantized weight", ckpt.path().string(), name);
}

QuantizedMatrix load_foreign(const Checkpoint& ckpt, std::string_view name) {
  const std::string x = base_of(name);
  const QuantizationConfig& qc = ckpt.quantization();
  const std::string what =
      fmt::format("{}: {} weight '{}'", ckpt.path().string(), to_string(qc.format), x);
  MOQE_CHECK(is_foreign_quantized(ckpt, name), "{}: no {} tensors", what, to_string(qc.format));
  switch (qc.format) {
    case ForeignFormat::kGptq:
      return to_matrix(unpack_gptq(ckpt, x, qc), what);
    case ForeignFormat::kAwq:
      return to_matrix(unpack_awq(ckpt, x), what);
    case ForeignFormat::kCompressedTensors:
      return to_matrix(
          is_ct_naive(ckpt, x) ? unpack_ct_naive(ckpt, x, what) : unpack_ct_packed(ckpt, x, what),
          what);
    case ForeignFormat::kNone:
      break;
  }
  MOQE_FAIL("{}: not a foreign-quantized weight", what);
}

std::string foreign_part_weight(const Checkpoint& ckpt, std::string_view tensor) {
  static constexpr std::string_view kParts[] = {".qweight",
                                                ".qzeros",
                                                ".scales",
                                                ".g_idx",
                                                ".weight_packed",
                                                ".weight_scale",
                                                ".weight_zero_point",
                                                ".weight_shape",
                                                ".weight_g_idx"};
  for (std::string_view p : kParts) {
    if (tensor.ends_with(p)) {
      const std::string w = std::string(tensor.substr(0, tensor.size() - p.size())) + ".weight";
      return is_foreign_quantized(ckpt, w) ? w : std::string();
    }
  }
  // compressed-tensors' 8-bit weights keep the weight's own name.
  if (tensor.ends_with(".weight") && is_ct_naive(ckpt, base_of(tensor)) &&
      is_foreign_quantized(ckpt, tensor)) {
    return std::string(tensor);
  }
  return {};
}

bool is_foreign_part(const Checkpoint& ckpt, std::string_view tensor) {
  return !foreign_part_weight(ckpt, tensor).empty();
}

std::vector<std::string> foreign_weight_names(const Checkpoint& ckpt) {
  std::vector<std::string> out;
  for (const std::string& t : ckpt.tensor_names()) {
    for (std::string_view sig : {".qweight", ".weight_packed", ".weight_scale"}) {
      if (!t.ends_with(sig)) continue;
      const std::string w = t.substr(0, t.size() - sig.size()) + ".weight";
      if (is_foreign_quantized(ckpt, w)) out.push_back(w);
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace moqe
