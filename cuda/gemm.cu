// Host side of the mixed-precision GEMM: weight re-layout and upload, shape checks, and the
// dispatch table of the kernels instantiated in gemm_mma_*.cu and gemm_simple.cu.
#include <algorithm>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "check.cuh"
#include "gemm_launch.cuh"
#include "moqe/cuda/gemm.hpp"
#include "moqe/cuda/mma_layout.hpp"

namespace moqe::cuda {

using detail::GemmArgs;

// The device buffers of a DeviceQuantizedMatrix, for the kernels' arguments.
struct detail::GemmAccess {
  static void weights(const DeviceQuantizedMatrix& w, GemmArgs& a) {
    a.qweight = w.qweight_.as<const uint8_t>();
    a.qweight_stride = w.qweight_stride_;
    a.scales = w.scales_.data();
    a.scales_f16 = w.scales_f16_;
    a.scales_stride = w.scales_stride_;
    a.zeros = w.scheme_.has_zeros() ? w.zeros_.as<const uint8_t>() : nullptr;
    a.zeros_stride = w.zeros_stride_;
    a.tiles = static_cast<int>(w.tiles_);
    a.hi_offset = mma::hi_plane_offset(w.tiles_, w.k_ / mma::kChunkCols);
    a.glu = w.glu_;
    a.glu_rows = w.glu_ ? w.n_ : 0;
  }
  static int64_t tiles(const DeviceQuantizedMatrix& w) { return w.tiles_; }
};

namespace {

// Grid limits: tiles of W along grid.y (65535), experts along grid.z.
constexpr int64_t kMaxGridYZ = 65535;
// Token blocks launched along grid.x at most; blocks loop over the rest.
constexpr int64_t kMaxTokenBlocks = 1 << 16;

// True when a and b store codes the same way: bits, mode, scale type and (resolved) group size.
// A per-channel scheme equals groups of K.
bool same_codes(const QuantizedMatrix& a, const QuantizedMatrix& b) {
  return a.bits() == b.bits() && a.scheme().mode == b.scheme().mode &&
         a.scheme().scale_type == b.scheme().scale_type && a.group_size() == b.group_size();
}

GemmPath resolve_path(GemmPath path, const QuantScheme& scheme, int64_t k) {
  if (path != GemmPath::kAuto) return path;
  return check_gemm_path(GemmPath::kMma, scheme, k).empty() ? GemmPath::kMma : GemmPath::kSimple;
}

template <class T>
constexpr int act_index() {
  static_assert(std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>,
                "activations are Half or BFloat16");
  return std::is_same_v<T, Half> ? 0 : 1;
}

template <class T>
constexpr detail::OutType out_type() {
  if constexpr (std::is_same_v<T, Half>) {
    return detail::OutType::kF16;
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return detail::OutType::kBF16;
  } else {
    static_assert(std::is_same_v<T, float>, "outputs are Half, BFloat16 or float");
    return detail::OutType::kF32;
  }
}

using Launcher = void (*)(const GemmArgs&, int64_t, int, cudaStream_t);

// [act][bits index][token tiles index], generated from MOQE_GEMM_MMA_CONFIGS.
constexpr int bits_index(int bits) { return bits == 2 ? 0 : (bits == 3 ? 1 : (bits == 4 ? 2 : 3)); }
constexpr int tiles_index(int mt) { return mt == 1 ? 0 : (mt == 2 ? 1 : 2); }
struct MmaTable {
  Launcher fn[2][4][3] = {};
  constexpr MmaTable() {
#define MOQE_GEMM_TABLE_ENTRY(bits, act, mt) \
  fn[act][bits_index(bits)][tiles_index(mt)] = &detail::launch_gemm_mma<bits, act, mt>;
    MOQE_GEMM_MMA_CONFIGS(MOQE_GEMM_TABLE_ENTRY, 0)
    MOQE_GEMM_MMA_CONFIGS(MOQE_GEMM_TABLE_ENTRY, 1)
#undef MOQE_GEMM_TABLE_ENTRY
  }
};
constexpr MmaTable kMmaTable;

// The token tile (8 * mt rows per block) for experts of about `rows` rows.
int token_tiles(int64_t rows) { return rows <= 8 ? 1 : (rows <= 16 ? 2 : 4); }

template <class TIn, class TOut>
GemmArgs make_args(MatrixView<const TIn> x, const DeviceQuantizedMatrix& w, MatrixView<TOut> y,
                   const GemmEpilogue& epilogue) {
  GemmArgs a;
  a.x = x.data();
  a.ldx = x.row_stride();
  a.y = y.data();
  a.ldy = y.row_stride();
  a.out_type = out_type<TOut>();
  a.n = static_cast<int>(w.rows());
  a.k = static_cast<int>(w.cols());
  detail::GemmAccess::weights(w, a);
  a.zero_const = w.scheme().code_offset();
  a.group_size = static_cast<int>(w.group_size());
  a.groups = static_cast<int>(w.cols() / w.group_size());
  a.bits = w.scheme().bits;
  a.row_bytes = packed_row_bytes(w.cols(), w.scheme().bits);
  a.act = epilogue.activate ? static_cast<int>(epilogue.activation) : -1;
  a.row_scale = epilogue.row_scale;
  a.row_index = epilogue.row_index;
  return a;
}

template <class TIn, class TOut>
void check_operands(const char* what, MatrixView<const TIn> x, const DeviceQuantizedMatrix& w,
                    MatrixView<TOut> y) {
  MOQE_CHECK(w.num_experts() > 0, "cuda::{}: the weights are empty (default-constructed)", what);
  MOQE_CHECK(x.cols() == w.cols(), "cuda::{}: x {} has {} columns but W [{}, {}] has K = {}", what,
             shape_string(x), x.cols(), w.rows(), w.cols(), w.cols());
  MOQE_CHECK(y.rows() == x.rows() && y.cols() == w.rows(),
             "cuda::{}: y {} should be [{}, {}] for x {} and W [{}, {}]", what, shape_string(y),
             x.rows(), w.rows(), shape_string(x), w.rows(), w.cols());
  if (w.path() == GemmPath::kMma) {
    MOQE_CHECK(reinterpret_cast<uintptr_t>(x.data()) % 16 == 0 && x.row_stride() % 8 == 0,
               "cuda::{}: the mma path reads x in 16-byte vectors: its data must be 16-byte "
               "aligned and its row stride ({}) a multiple of 8",
               what, x.row_stride());
  }
}

int multiprocessors() {
  int device = 0, sms = 0;
  MOQE_CUDA_CHECK(cudaGetDevice(&device));
  MOQE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Launches w's kernel for experts of about rows_hint rows (`active` of the `experts` have rows).
template <int kAct>
void launch(GemmArgs& args, const DeviceQuantizedMatrix& w, int64_t rows_hint, int experts,
            int64_t active, Stream stream) {
  if (w.path() == GemmPath::kMma) {
    const int mt = token_tiles(rows_hint);
    const int64_t blocks =
        std::clamp<int64_t>((rows_hint + 8 * mt - 1) / (8 * mt), 1, kMaxTokenBlocks);
    const int64_t tiles = detail::GemmAccess::tiles(w);
    args.warps = detail::mma_warps(args.k, blocks * tiles * active, multiprocessors());
    kMmaTable.fn[kAct][bits_index(w.scheme().bits)][tiles_index(mt)](args, blocks, experts, stream);
  } else {
    const int64_t blocks = std::clamp<int64_t>(rows_hint, 1, kMaxTokenBlocks);
    detail::launch_gemm_simple<kAct>(args, blocks, experts, stream);
  }
}

}  // namespace

std::vector<int64_t> mma::glu_row_map(int64_t inter) {
  const int64_t tiles = (inter + kGluColsPerTile - 1) / kGluColsPerTile;
  std::vector<int64_t> map(static_cast<size_t>(tiles * kTileRows));
  for (size_t r = 0; r < map.size(); ++r) {
    map[r] = glu_source_row(static_cast<int64_t>(r), inter);
  }
  return map;
}

mma::PackedWeights mma::pack(const QuantizedMatrix& q, std::span<const int64_t> row_map) {
  const int64_t n = q.rows(), k = q.cols(), groups = q.groups_per_row();
  const int bits = q.bits();
  const std::string reason = check_gemm_path(GemmPath::kMma, q.scheme(), k);
  MOQE_CHECK(reason.empty(), "cuda::mma::pack: {}", reason);
  MOQE_CHECK(row_map.size() % kTileRows == 0,
             "cuda::mma::pack: the row map holds {} rows, not a multiple of {}", row_map.size(),
             kTileRows);
  for (const int64_t r : row_map) {
    MOQE_CHECK(r >= -1 && r < n, "cuda::mma::pack: the row map names row {} of a matrix of {}", r,
               n);
  }
  // The row of q that packed row r holds, or -1.
  auto source = [&](int64_t r) -> int64_t {
    if (!row_map.empty()) return row_map[static_cast<size_t>(r)];
    return r < n ? r : -1;
  };
  const int64_t tiles = row_map.empty() ? (n + kTileRows - 1) / kTileRows
                                        : static_cast<int64_t>(row_map.size()) / kTileRows;
  const int64_t chunks = k / kChunkCols;
  const int64_t bytes = chunk_bytes(bits);
  PackedWeights out;
  out.qweight.resize(static_cast<size_t>(tiles * chunks * 32 * bytes));
  out.scales.resize(static_cast<size_t>(tiles * groups * kTileRows));
  if (q.scheme().has_zeros()) out.zeros.resize(out.scales.size());
  std::vector<uint8_t> codes;  // the tile's codes, [16, K]
  for (int64_t tile = 0; tile < tiles; ++tile) {
    codes.assign(static_cast<size_t>(kTileRows * k), 0);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t row = source(tile * kTileRows + r);
      if (row >= 0) unpack_row(q.packed_row(row), k, bits, codes.data() + r * k);
    }
    const int wb = word_bits(bits);  // 3-bit codes: their low two bits here, bit 2 in hi
    for (int64_t c = 0; c < chunks; ++c) {
      for (int lane = 0; lane < 32; ++lane) {
        uint32_t words[4] = {0, 0, 0, 0}, hi = 0;
        for (int p = 0; p < 8; ++p) {
          const int64_t i = pair_row(p, lane / 4) * k + c * kChunkCols + pair_col(p, lane % 4);
          const uint32_t first = codes[static_cast<size_t>(i)];
          const uint32_t second = codes[static_cast<size_t>(i + 1)];
          const uint32_t low = (1u << wb) - 1u;
          const int shift = wb * (p % pairs_per_word(wb));
          words[p / pairs_per_word(wb)] |=
              ((first & low) << shift) | ((second & low) << (16 + shift));
          if (bits == 3) hi |= ((first >> 2) << p) | ((second >> 2) << (8 + p));
        }
        const int64_t slot = (tile * chunks + c) * 32 + lane;
        const int64_t word_bytes = chunk_bytes(wb);
        uint8_t* dst = out.qweight.data() + slot * word_bytes;
        for (int64_t b = 0; b < word_bytes; ++b) {
          dst[b] = static_cast<uint8_t>(words[b / 4] >> (8 * (b % 4)));
        }
        if (bits == 3) {
          uint8_t* hdst = out.qweight.data() + hi_plane_offset(tiles, chunks) + slot * 2;
          hdst[0] = static_cast<uint8_t>(hi);
          hdst[1] = static_cast<uint8_t>(hi >> 8);
        }
      }
    }
    for (int64_t gi = 0; gi < groups; ++gi) {
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t row = source(tile * kTileRows + r);
        const size_t i = static_cast<size_t>((tile * groups + gi) * kTileRows + r);
        out.scales[i] = row >= 0 ? q.scale(row, gi) : 0.0f;
        if (!out.zeros.empty()) out.zeros[i] = row >= 0 ? static_cast<uint8_t>(q.zero(row, gi)) : 0;
      }
    }
  }
  return out;
}

std::string check_gemm_path(GemmPath path, const QuantScheme& scheme, int64_t k) {
  if (path != GemmPath::kMma) return {};
  if (k % 32 != 0) {
    return MOQE_FORMAT(
        "the mma GEMM path needs K a multiple of 32, not {} (use the simple path, "
        "which GemmPath::kAuto picks)",
        k);
  }
  if (scheme.bits != 2 && scheme.bits != 3 && scheme.bits != 4 && scheme.bits != 8) {
    return MOQE_FORMAT("the mma GEMM path supports 2-, 3-, 4- and 8-bit codes, not {}-bit",
                       scheme.bits);
  }
  return {};
}

DeviceQuantizedMatrix::DeviceQuantizedMatrix(const QuantizedMatrix& q, GemmPath path)
    : DeviceQuantizedMatrix(stack(std::span<const QuantizedMatrix>(&q, 1), path)) {}

DeviceQuantizedMatrix DeviceQuantizedMatrix::stack(std::span<const QuantizedMatrix> experts,
                                                   GemmPath path) {
  return build(experts, path, false);
}

DeviceQuantizedMatrix DeviceQuantizedMatrix::stack_glu(std::span<const QuantizedMatrix> gate,
                                                       std::span<const QuantizedMatrix> up,
                                                       GemmPath path) {
  MOQE_CHECK(!gate.empty() && gate.size() == up.size(),
             "cuda::DeviceQuantizedMatrix::stack_glu: {} gate and {} up matrices", gate.size(),
             up.size());
  std::vector<QuantizedMatrix> fused;
  fused.reserve(gate.size());
  for (size_t e = 0; e < gate.size(); ++e) {
    const QuantizedMatrix& g = gate[e];
    const QuantizedMatrix& u = up[e];
    MOQE_CHECK(g.rows() == u.rows() && g.cols() == u.cols() && same_codes(g, u),
               "cuda::DeviceQuantizedMatrix::stack_glu: expert {}'s gate is [{}, {}] {} and its "
               "up [{}, {}] {}: a GLU matrix needs one shape and scheme",
               e, g.rows(), g.cols(), g.scheme().to_string(), u.rows(), u.cols(),
               u.scheme().to_string());
    fused.push_back(QuantizedMatrix::concat_rows(g, u, MOQE_FORMAT("expert {} gate and up", e)));
  }
  return build(fused, path, true);
}

DeviceQuantizedMatrix DeviceQuantizedMatrix::build(std::span<const QuantizedMatrix> experts,
                                                   GemmPath path, bool glu) {
  MOQE_CHECK(!experts.empty(), "cuda::DeviceQuantizedMatrix: no experts given");
  for (const QuantizedMatrix& q : experts) {
    MOQE_CHECK(!q.has_input_order(),
               "cuda::DeviceQuantizedMatrix: act-order (input-ordered) matrices are not "
               "implemented on the device yet; run the layer on the CPU");
  }
  const QuantizedMatrix& q0 = experts[0];
  for (size_t e = 1; e < experts.size(); ++e) {
    MOQE_CHECK(experts[e].rows() == q0.rows() && experts[e].cols() == q0.cols() &&
                   same_codes(experts[e], q0),
               "cuda::DeviceQuantizedMatrix: expert {} is [{}, {}] {}, expert 0 is [{}, {}] {}", e,
               experts[e].rows(), experts[e].cols(), experts[e].scheme().to_string(), q0.rows(),
               q0.cols(), q0.scheme().to_string());
  }
  // n: outputs (I of [2I, K] for glu).
  const int64_t n = glu ? q0.rows() / 2 : q0.rows(), k = q0.cols();
  MOQE_CHECK(n > 0 && k > 0, "cuda::DeviceQuantizedMatrix: empty matrix [{}, {}]{}", q0.rows(), k,
             glu ? " (gate and up)" : "");
  MOQE_CHECK(k <= INT32_MAX / 2, "cuda::DeviceQuantizedMatrix: K = {} is too large", k);
  MOQE_CHECK(static_cast<int64_t>(experts.size()) <= kMaxGridYZ,
             "cuda::DeviceQuantizedMatrix: {} experts; at most {} per stack", experts.size(),
             kMaxGridYZ);
  const int64_t tiles = glu ? (n + mma::kGluColsPerTile - 1) / mma::kGluColsPerTile
                            : (n + mma::kTileRows - 1) / mma::kTileRows;
  MOQE_CHECK(tiles <= kMaxGridYZ && (n + 7) / 8 <= kMaxGridYZ,
             "cuda::DeviceQuantizedMatrix: N = {} outputs; at most {}", n, 8 * kMaxGridYZ);
  const std::string reason = check_gemm_path(path, q0.scheme(), k);
  MOQE_CHECK(reason.empty(), "cuda::DeviceQuantizedMatrix: {} for [{}, {}] {}", reason, n, k,
             q0.scheme().to_string());

  DeviceQuantizedMatrix d;
  d.experts_ = static_cast<int64_t>(experts.size());
  d.n_ = n;
  d.k_ = k;
  d.tiles_ = tiles;
  d.glu_ = glu;
  d.group_ = q0.group_size();
  d.scheme_ = q0.scheme();
  d.path_ = resolve_path(path, q0.scheme(), k);
  const bool zeros = q0.scheme().has_zeros();
  const int64_t groups = q0.groups_per_row();
  std::vector<uint8_t> qw;
  std::vector<float> sc;
  std::vector<uint8_t> zs;
  if (d.path_ == GemmPath::kMma) {
    d.qweight_stride_ = tiles * (k / mma::kChunkCols) * 32 * mma::chunk_bytes(q0.bits());
    d.scales_stride_ = tiles * groups * mma::kTileRows;
    d.zeros_stride_ = zeros ? d.scales_stride_ : 0;
  } else {
    d.qweight_stride_ = q0.rows() * q0.row_bytes();
    d.scales_stride_ = q0.rows() * groups;
    d.zeros_stride_ = zeros ? q0.rows() * groups : 0;
  }
  const std::vector<int64_t> row_map = glu ? mma::glu_row_map(n) : std::vector<int64_t>{};
  qw.resize(static_cast<size_t>(d.qweight_stride_ * d.experts_));
  sc.resize(static_cast<size_t>(d.scales_stride_ * d.experts_));
  zs.resize(static_cast<size_t>(d.zeros_stride_ * d.experts_));
  for (int64_t e = 0; e < d.experts_; ++e) {
    const QuantizedMatrix& q = experts[static_cast<size_t>(e)];
    uint8_t* qwe = qw.data() + e * d.qweight_stride_;
    float* sce = sc.data() + e * d.scales_stride_;
    uint8_t* zse = zs.data() + e * d.zeros_stride_;
    if (d.path_ == GemmPath::kMma) {
      const mma::PackedWeights packed = mma::pack(q, row_map);
      std::copy(packed.qweight.begin(), packed.qweight.end(), qwe);
      std::copy(packed.scales.begin(), packed.scales.end(), sce);
      std::copy(packed.zeros.begin(), packed.zeros.end(), zse);
    } else {
      std::copy(q.qweight().begin(), q.qweight().end(), qwe);
      std::copy(q.scales().begin(), q.scales().end(), sce);
      if (zeros) std::copy(q.zeros().begin(), q.zeros().end(), zse);
    }
  }
  d.qweight_ = DeviceBuffer(qw.size());
  d.qweight_.upload(qw.data(), qw.size());
  d.scales_f16_ = std::all_of(sc.begin(), sc.end(), [](float v) { return round_to_half(v) == v; });
  if (d.scales_f16_) {  // fp16 values (the kF16 scale type): exact in half the bytes
    std::vector<uint16_t> sc16(sc.size());
    for (size_t i = 0; i < sc.size(); ++i) sc16[i] = float_to_half_bits(sc[i]);
    d.scales_ = DeviceBuffer(sc16.size() * sizeof(uint16_t));
    d.scales_.upload(sc16.data(), sc16.size() * sizeof(uint16_t));
  } else {
    d.scales_ = DeviceBuffer(sc.size() * sizeof(float));
    d.scales_.upload(sc.data(), sc.size() * sizeof(float));
  }
  d.zeros_ = DeviceBuffer(zs.size());
  d.zeros_.upload(zs.data(), zs.size());
  return d;
}

template <class TIn, class TOut>
void gemm(MatrixView<const TIn> x, const DeviceQuantizedMatrix& w, MatrixView<TOut> y,
          const GemmEpilogue& epilogue, Stream stream, int64_t expert) {
  check_operands("gemm", x, w, y);
  MOQE_CHECK(expert >= 0 && expert < w.num_experts(),
             "cuda::gemm: expert {} is out of range (the weights hold {})", expert,
             w.num_experts());
  if (x.rows() == 0) return;
  GemmArgs args = make_args(x, w, y, epilogue);
  args.m = x.rows();
  args.expert = static_cast<int>(expert);
  launch<act_index<TIn>()>(args, w, x.rows(), 1, 1, stream);
}

template <class TIn, class TOut>
void gemm_grouped(MatrixView<const TIn> x, const DeviceQuantizedMatrix& w, const int64_t* offsets,
                  MatrixView<TOut> y, const GemmEpilogue& epilogue, Stream stream,
                  int64_t max_rows_hint, const int32_t* expert_list) {
  check_operands("gemm_grouped", x, w, y);
  MOQE_CHECK(offsets != nullptr, "cuda::gemm_grouped: offsets is null ({} experts)",
             w.num_experts());
  if (x.rows() == 0) return;
  // Without a hint: twice the mean rows per expert (at least one token tile), which covers a
  // decode batch in one block per expert; larger experts loop, results are the same.
  const int64_t mean = (x.rows() + w.num_experts() - 1) / w.num_experts();
  const int64_t hint =
      max_rows_hint >= 0 ? max_rows_hint : std::min(x.rows(), std::max<int64_t>(8, 2 * mean));
  GemmArgs args = make_args(x, w, y, epilogue);
  args.offsets = offsets;
  args.expert_list = expert_list;
  // Experts with rows: at most one per row. With a list of them the grid holds only those.
  const int64_t active = std::min(w.num_experts(), x.rows());
  const int64_t grid_experts = expert_list != nullptr ? active : w.num_experts();
  launch<act_index<TIn>()>(args, w, hint, static_cast<int>(grid_experts), active, stream);
}

#define MOQE_CUDA_GEMM_INSTANTIATE(TIn, TOut)                                                  \
  template void gemm<TIn, TOut>(MatrixView<const TIn>, const DeviceQuantizedMatrix&,           \
                                MatrixView<TOut>, const GemmEpilogue&, Stream, int64_t);       \
  template void gemm_grouped<TIn, TOut>(MatrixView<const TIn>, const DeviceQuantizedMatrix&,   \
                                        const int64_t*, MatrixView<TOut>, const GemmEpilogue&, \
                                        Stream, int64_t, const int32_t*);
MOQE_CUDA_GEMM_INSTANTIATE(Half, Half)
MOQE_CUDA_GEMM_INSTANTIATE(Half, BFloat16)
MOQE_CUDA_GEMM_INSTANTIATE(Half, float)
MOQE_CUDA_GEMM_INSTANTIATE(BFloat16, Half)
MOQE_CUDA_GEMM_INSTANTIATE(BFloat16, BFloat16)
MOQE_CUDA_GEMM_INSTANTIATE(BFloat16, float)
#undef MOQE_CUDA_GEMM_INSTANTIATE

}  // namespace moqe::cuda
