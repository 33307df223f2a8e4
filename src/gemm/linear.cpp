#include "moqe/gemm/linear.hpp"

#include "cpu_kernels.hpp"

#include <algorithm>
#include <cstring>

#include "moqe/core/dtypes.hpp"
#include "moqe/core/threading.hpp"
#include "moqe/gemm/reference.hpp"
#include "moqe/quant/numerics.hpp"

namespace moqe {

QuantizedLinear QuantizedLinear::from_quantized(QuantizedMatrix q, Numerics numerics) {
  QuantizedLinear l;
  l.n_ = q.rows();
  l.k_ = q.cols();
  l.storage_ = WeightStorage::kQuantized;
  l.scheme_ = q.scheme();
  l.group_ = q.group_size();
  if (q.has_input_order()) {
    l.order_ = std::make_shared<const std::vector<int32_t>>(q.input_order().begin(),
                                                            q.input_order().end());
  }
  l.q_ = std::make_shared<const QuantizedMatrix>(std::move(q));
  l.choose_kernel(numerics);
  return l;
}

QuantizedLinear QuantizedLinear::from_f32(std::vector<float> w, int64_t n, int64_t k) {
  MOQE_CHECK(n >= 0 && k > 0 && static_cast<int64_t>(w.size()) == n * k,
             "QuantizedLinear: {} fp32 values do not make a [{}, {}] weight", w.size(), n, k);
  QuantizedLinear l;
  l.n_ = n;
  l.k_ = k;
  l.storage_ = WeightStorage::kF32;
  l.f32_ = std::make_shared<const std::vector<float>>(std::move(w));
  l.choose_kernel();
  return l;
}

QuantizedLinear QuantizedLinear::from_half(std::vector<uint16_t> bits, DType dtype, int64_t n,
                                           int64_t k) {
  MOQE_CHECK(dtype == DType::kF16 || dtype == DType::kBF16,
             "QuantizedLinear: 2-byte weights must be F16 or BF16, not {}", dtype_name(dtype));
  MOQE_CHECK(n >= 0 && k > 0 && static_cast<int64_t>(bits.size()) == n * k,
             "QuantizedLinear: {} values do not make a [{}, {}] weight", bits.size(), n, k);
  QuantizedLinear l;
  l.n_ = n;
  l.k_ = k;
  l.storage_ = dtype == DType::kF16 ? WeightStorage::kF16 : WeightStorage::kBF16;
  l.half_ = std::make_shared<const std::vector<uint16_t>>(std::move(bits));
  l.choose_kernel();
  return l;
}

namespace {

// Whether the AVX-512 decode kernels (1-4 activation rows) of `level` are used. Under an explicit
// cap (MOQE_CPU_ISA, set_cpu_isa_cap) they are wherever the cap and the CPU allow. Without one,
// each kernel family takes the level measured fastest: AVX-512's exact kernels and VNNI fast
// kernels measured slower than AVX2's at one activation row on both AVX-512 machines measured
// (a Zen 4 EPYC and a Xeon with AMX; docs/kernels.md), so none is selected by default.
[[maybe_unused]] bool avx512_decode_selected(CpuIsa level) {
  return cpu_isa_cap().has_value() && active_cpu_isa() >= level;
}

}  // namespace

void QuantizedLinear::choose_kernel(Numerics requested) {
  isa_ = CpuIsa::kReference;
  numerics_ = Numerics::kExact;
  kernels_.reset();
#if defined(MOQE_HAVE_AVX2_KERNELS)
  if (active_cpu_isa() < CpuIsa::kAvx2) return;
  auto table = std::make_shared<detail::KernelTable>();
  if (storage_ == WeightStorage::kQuantized) {
    // Called once per layer, from the constructors: the layout is packed here, for the numerics
    // chosen here (a fast layer's paired codes or an exact layer's signed levels serve only it).
    MOQE_CHECK(packed_ == nullptr, "QuantizedLinear: kernels are chosen once, when it is built");
    if (!detail::can_pack(*q_)) return;  // whole 32-blocks only: the reference runs it
    numerics_ = requested == Numerics::kFast && detail::fast_mode_supported(scheme_.bits)
                    ? Numerics::kFast
                    : Numerics::kExact;
    detail::PackedQuant packed = detail::pack(*q_);
    // Exact 4-bit rows whose groups are whole pairs of blocks take the field kernels (AVX2; on
    // AVX-512 the pair-of-blocks kernels below read the signed layout instead).
    bool avx512_exact = false;
#if defined(MOQE_HAVE_AVX512_KERNELS)
    avx512_exact = avx512_decode_selected(CpuIsa::kAvx512) && detail::avx512_fits(packed);
#endif
    const bool fields = numerics_ == Numerics::kExact && !avx512_exact && detail::can_field(packed);
    if ((numerics_ == Numerics::kFast && detail::can_pair(packed)) || fields) {
      detail::pair_blocks(packed);
    }
    if (numerics_ == Numerics::kExact && !fields && detail::can_sign(packed)) {
      detail::sign_levels(packed);
    }
    packed_ = std::make_shared<const detail::PackedQuant>(std::move(packed));
    q_.reset();  // the kernels and decode_row read the packed copy only
    isa_ = CpuIsa::kAvx2;
    for (int m = 1; m <= 4; ++m) {
      if (numerics_ == Numerics::kFast) {
        table->fast[m - 1] = detail::fast_kernel_avx2(scheme_.bits, m, packed_->paired);
      } else if (fields) {
        table->fields[m - 1] = detail::field_kernel_avx2(m);
      } else {
        table->quant[m - 1] = detail::quant_kernel_avx2(scheme_.bits, m, packed_->signed_levels);
      }
    }
#if defined(MOQE_HAVE_AVX512_KERNELS)
    // The same layouts, read two blocks at a time (rows that avx512_fits); the prefill GEMM below
    // stays AVX2's.
    if (detail::avx512_fits(*packed_)) {
      if (numerics_ == Numerics::kExact && avx512_exact) {
        for (int m = 1; m <= 4; ++m) {
          table->quant[m - 1] =
              detail::quant_kernel_avx512(scheme_.bits, m, packed_->signed_levels);
        }
        table->pair_order_x = true;
        isa_ = CpuIsa::kAvx512;
      }
      if (numerics_ == Numerics::kFast && avx512_decode_selected(CpuIsa::kAvx512Vnni) &&
          detail::fast_kernel_avx512vnni(scheme_.bits, 1, packed_->paired) != nullptr) {
        for (int m = 1; m <= 4; ++m) {
          table->fast[m - 1] = detail::fast_kernel_avx512vnni(scheme_.bits, m, packed_->paired);
        }
        isa_ = CpuIsa::kAvx512Vnni;
      }
    }
#endif
    if (numerics_ == Numerics::kExact) {
      table->quant_gemm =
          detail::quant_gemm_kernel_avx2(scheme_.bits, packed_->signed_levels, fields);
    }
  } else {
    const detail::DenseKind kind = storage_ == WeightStorage::kF32   ? detail::DenseKind::kF32
                                   : storage_ == WeightStorage::kF16 ? detail::DenseKind::kF16
                                                                     : detail::DenseKind::kBF16;
    for (int m = 1; m <= 4; ++m) table->dense[m - 1] = detail::dense_kernel_avx2(kind, m);
    if (k_ % 8 == 0) table->dense_gemm = detail::dense_gemm_kernel_avx2(kind);
  }
  kernels_ = std::move(table);
  if (isa_ == CpuIsa::kReference) isa_ = CpuIsa::kAvx2;
#else
  (void)requested;
#endif
}

bool QuantizedLinear::can_concat(const QuantizedLinear& a, const QuantizedLinear& b) {
  if (a.storage_ != b.storage_ || a.k_ != b.k_) return false;
  if (a.is_quantized()) {
    return a.scheme_.bits == b.scheme_.bits && a.scheme_.mode == b.scheme_.mode &&
           a.scheme_.scale_type == b.scheme_.scale_type && a.group_ == b.group_ &&
           a.numerics_ == b.numerics_ && (a.packed_ != nullptr) == (b.packed_ != nullptr) &&
           (a.packed_ == nullptr || detail::same_layout(*a.packed_, *b.packed_)) &&
           (a.order_ == b.order_ || (a.order_ && b.order_ && *a.order_ == *b.order_));
  }
  return true;
}

QuantizedLinear QuantizedLinear::concat_rows(const QuantizedLinear& a, const QuantizedLinear& b) {
  MOQE_CHECK(can_concat(a, b), "QuantizedLinear: cannot fuse {} [{}, {}] with {} [{}, {}]",
             a.describe(), a.n_, a.k_, b.describe(), b.n_, b.k_);
  auto cat = [](const auto& x, const auto& y) {
    std::remove_cvref_t<decltype(x)> out(x.begin(), x.end());
    out.insert(out.end(), y.begin(), y.end());
    return out;
  };
  switch (a.storage_) {
    case WeightStorage::kF32:
      return from_f32(cat(*a.f32_, *b.f32_), a.n_ + b.n_, a.k_);
    case WeightStorage::kF16:
    case WeightStorage::kBF16:
      return from_half(cat(*a.half_, *b.half_),
                       a.storage_ == WeightStorage::kF16 ? DType::kF16 : DType::kBF16, a.n_ + b.n_,
                       a.k_);
    case WeightStorage::kQuantized: {
      if (a.packed_) {
        QuantizedLinear l = a;
        l.n_ = a.n_ + b.n_;
        l.packed_ = std::make_shared<const detail::PackedQuant>(
            detail::concat_rows(*a.packed_, *b.packed_));
        return l;
      }
      return from_quantized(QuantizedMatrix::concat_rows(*a.q_, *b.q_, "fused gate_up"),
                            a.numerics_);
    }
  }
  MOQE_FAIL("QuantizedLinear: unknown storage");
}

QuantizedLinear QuantizedLinear::clone() const {
  QuantizedLinear c = *this;
  if (f32_) c.f32_ = std::make_shared<const std::vector<float>>(*f32_);
  if (half_) c.half_ = std::make_shared<const std::vector<uint16_t>>(*half_);
  // The SIMD kernels read only the packed copy; the file-layout matrix is shared then.
  if (packed_) {
    c.packed_ = std::make_shared<const detail::PackedQuant>(*packed_);
  } else if (q_) {
    c.q_ = std::make_shared<const QuantizedMatrix>(*q_);
  }
  return c;
}

int64_t QuantizedLinear::weight_bytes() const {
  switch (storage_) {
    case WeightStorage::kF32:
      return n_ * k_ * 4;
    case WeightStorage::kF16:
    case WeightStorage::kBF16:
      return n_ * k_ * 2;
    case WeightStorage::kQuantized:
      return packed_ ? packed_->kernel_bytes() : q_->storage_bytes();
  }
  return 0;
}

std::string QuantizedLinear::describe() const {
  switch (storage_) {
    case WeightStorage::kF32:
      return "f32";
    case WeightStorage::kF16:
      return "f16";
    case WeightStorage::kBF16:
      return "bf16";
    case WeightStorage::kQuantized:
      return scheme_.to_string();
  }
  return "?";
}

void QuantizedLinear::decode_row(int64_t n, float* out) const {
  switch (storage_) {
    case WeightStorage::kF32:
      std::memcpy(out, f32_->data() + n * k_, sizeof(float) * static_cast<size_t>(k_));
      return;
    case WeightStorage::kF16: {
      const uint16_t* src = half_->data() + n * k_;
      for (int64_t i = 0; i < k_; ++i) out[i] = half_bits_to_float(src[i]);
      return;
    }
    case WeightStorage::kBF16: {
      const uint16_t* src = half_->data() + n * k_;
      for (int64_t i = 0; i < k_; ++i) out[i] = bf16_bits_to_float(src[i]);
      return;
    }
    case WeightStorage::kQuantized: {
      if (packed_) {
        if (!order_) {
          detail::decode_row(*packed_, n, out);
          return;
        }
        thread_local std::vector<float> stored;  // the packed codes are in stored order
        stored.resize(static_cast<size_t>(k_));
        detail::decode_row(*packed_, n, stored.data());
        for (int64_t c = 0; c < k_; ++c) out[(*order_)[static_cast<size_t>(c)]] = stored[c];
        return;
      }
      thread_local std::vector<uint8_t> codes;
      codes.resize(static_cast<size_t>(k_));
      q_->dequantize_row(n, out, codes.data());
      return;
    }
  }
}

std::vector<float> QuantizedLinear::to_f32() const {
  std::vector<float> w(static_cast<size_t>(n_ * k_));
  for (int64_t n = 0; n < n_; ++n) decode_row(n, w.data() + n * k_);
  return w;
}

void QuantizedLinear::prepare(MatrixView<const float> x_in, LinearScratch& scratch) const {
  scratch.m = x_in.rows();
  scratch.k = k_;
  scratch.groups = 0;
  MatrixView<const float> x = x_in;
  if (order_ && kernels_) {
    // The packed codes are in stored column order: the kernels read x gathered the same way.
    scratch.xorder.resize(static_cast<size_t>(x_in.rows() * k_));
    const int32_t* o = order_->data();
    for (int64_t m = 0; m < x_in.rows(); ++m) {
      const float* src = x_in.row(m);
      float* dst = scratch.xorder.data() + m * k_;
      for (int64_t c = 0; c < k_; ++c) dst[c] = src[o[c]];
    }
    x = MatrixView<const float>(scratch.xorder.data(), x_in.rows(), k_);
  }
#if defined(MOQE_HAVE_AVX2_KERNELS)
  if (isa_ >= CpuIsa::kAvx2 && packed_) {
    // The AVX-512 exact kernels read x in pair order; the prefill GEMM reads x itself.
    if (kernels_->pair_order_x && x.rows() < detail::kGemmMinRows) {
      detail::pair_order_rows(x.data(), x.row_stride(), x.rows(), k_, scratch.xp);
    }
    if (kernels_->fields[0] != nullptr && x.rows() < detail::kGemmMinRows) {
      detail::field_order_rows_avx2(x.data(), x.row_stride(), x.rows(), k_, packed_->group,
                                    packed_->zero.empty() ? packed_->zero_const : 1, scratch);
    }
    if (numerics_ == Numerics::kFast) {
      detail::quantize_activations_avx2(x.data(), x.row_stride(), x.rows(), k_, packed_->group,
                                        scratch);
    }
  }
#endif
}

void QuantizedLinear::forward_rows(MatrixView<const float> x_in, const LinearScratch& scratch,
                                   MatrixView<float> y, int64_t n0, int64_t n1) const {
  const int64_t m_count = x_in.rows();
  if (m_count == 0 || n0 >= n1) return;
  if (kernels_) {
    const detail::KernelTable& kt = *kernels_;
    // An input order: the kernels read the gathered x prepare() made.
    const MatrixView<const float> x =
        order_ ? MatrixView<const float>(scratch.xorder.data(), m_count, k_) : x_in;
    if (numerics_ == Numerics::kFast || kt.pair_order_x || kt.fields[0] != nullptr || order_) {
      MOQE_CHECK(scratch.m == m_count && scratch.k == k_,
                 "QuantizedLinear [{}, {}]: forward_rows needs the scratch prepare() made for this "
                 "input ({} x {}), not one for {} x {}",
                 n_, k_, m_count, k_, scratch.m, scratch.k);
    }
    const void* dense = f32_    ? static_cast<const void*>(f32_->data())
                        : half_ ? static_cast<const void*>(half_->data())
                                : nullptr;
    if (m_count >= detail::kGemmMinRows) {
      if (kt.quant_gemm != nullptr) {
        kt.quant_gemm(*packed_, x.data(), x.row_stride(), m_count, y.data(), y.row_stride(), n0,
                      n1);
        return;
      }
      if (kt.dense_gemm != nullptr) {
        kt.dense_gemm(dense, k_, x.data(), x.row_stride(), m_count, y.data(), y.row_stride(), n0,
                      n1);
        return;
      }
    }
    // The kernels take activation rows four at a time and stream W once per four. With more
    // rows, W goes in blocks of rows small enough to stay in the L2 cache (~96 KiB) while every
    // group of four activation rows passes over them, so W is read from memory once. Each output
    // is still computed by the same kernel over the same rows: blocking changes no result.
    const int64_t row_bytes =
        packed_ ? packed_->row_bytes : k_ * static_cast<int64_t>(f32_ ? sizeof(float) : 2);
    const int64_t block = m_count <= 4 ? n1 - n0 : std::max<int64_t>(16, (96 << 10) / row_bytes);
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
      const int64_t b1 = std::min(n1, b0 + block);
      for (int64_t m0 = 0; m0 < m_count; m0 += 4) {
        const int mc = static_cast<int>(std::min<int64_t>(4, m_count - m0));
        if (kt.fast[mc - 1] != nullptr) {
          kt.fast[mc - 1](*packed_, scratch, m0, mc, y.row(m0), y.row_stride(), b0, b1);
        } else if (kt.fields[mc - 1] != nullptr) {
          kt.fields[mc - 1](*packed_, scratch, m0, mc, y.row(m0), y.row_stride(), b0, b1);
        } else if (kt.quant[mc - 1] != nullptr) {
          const float* xm = kt.pair_order_x ? scratch.xp.data() + m0 * k_ : x.row(m0);
          kt.quant[mc - 1](*packed_, xm, kt.pair_order_x ? k_ : x.row_stride(), mc, y.row(m0),
                           y.row_stride(), b0, b1);
        } else {
          kt.dense[mc - 1](dense, k_, x.row(m0), x.row_stride(), mc, y.row(m0), y.row_stride(), b0,
                           b1);
        }
      }
    }
    return;
  }
  (void)scratch;
  const MatrixView<const float> x = x_in;  // the reference decodes rows in the input's order
  thread_local std::vector<float> row;
  if (row.size() < static_cast<size_t>(k_)) row.resize(static_cast<size_t>(k_));
  for (int64_t n = n0; n < n1; ++n) {
    const float* w = f32_ ? f32_->data() + n * k_ : (decode_row(n, row.data()), row.data());
    for (int64_t m = 0; m < m_count; ++m) y(m, n) = dot_f32(x.row(m), w, k_);
  }
}

void QuantizedLinear::forward(MatrixView<const float> x, MatrixView<float> y,
                              int num_threads) const {
  MOQE_CHECK(x.cols() == k_ && y.rows() == x.rows() && y.cols() == n_,
             "QuantizedLinear [{}, {}]: input {} and output {} do not fit", n_, k_, shape_string(x),
             shape_string(y));
  if (x.rows() == 0 || n_ == 0) return;
  thread_local LinearScratch scratch;  // reused: no allocation once grown
  prepare(x, scratch);
  const LinearScratch& s = scratch;  // the workers must see this thread's buffer
  parallel_for(n_, num_threads, 16, [&](int64_t n0, int64_t n1) { forward_rows(x, s, y, n0, n1); });
}

template <HalfActivation T>
void QuantizedLinear::forward(MatrixView<const T> x, MatrixView<T> y, int num_threads) const {
  MOQE_CHECK(x.cols() == k_ && y.cols() == n_ && y.rows() == x.rows(),
             "QuantizedLinear [{}, {}]: input {} and output {} do not fit", n_, k_, shape_string(x),
             shape_string(y));
  // Per-thread buffers, grown once: no allocation per call after warm-up.
  thread_local std::vector<float> x32, y32;
  x32.resize(static_cast<size_t>(x.rows() * k_));
  y32.resize(static_cast<size_t>(x.rows() * n_));
  const MatrixView<float> xv(x32.data(), x.rows(), k_), yv(y32.data(), x.rows(), n_);
  widen_rows(x, xv);
  forward(MatrixView<const float>(xv), yv, num_threads);
  round_rows(MatrixView<const float>(yv), y);
}

template void QuantizedLinear::forward<Half>(MatrixView<const Half>, MatrixView<Half>, int) const;
template void QuantizedLinear::forward<BFloat16>(MatrixView<const BFloat16>, MatrixView<BFloat16>,
                                                 int) const;

}  // namespace moqe
