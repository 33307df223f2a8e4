// Loading an MoE layer of any family of the table (moe/family.hpp) from a checkpoint: the layer's
// tensor names are planned from the family first, every tensor under the prefix must be one of
// them (docs/families.md), then the router, the experts in the family's layout (per-expert or
// fused, original or moqe-quantized), the shared expert and the biases are read.
#include "moqe/moe/loader.hpp"

#include <algorithm>
#include <cstring>
#include <set>
#include <type_traits>

#include "moqe/core/error.hpp"
#include "moqe/io/quantized_format.hpp"

namespace moqe {
namespace {

// Rows first, first + step, ... (count) of a matrix.
struct RowPick {
  int64_t first = 0, count = 0, step = 1;
};

std::string join(std::string_view prefix, std::string_view rest) {
  // "../x" names a sibling of the layer's module.
  while (rest.starts_with("../")) {
    const size_t dot = prefix.rfind('.');
    prefix = dot == std::string_view::npos ? std::string_view() : prefix.substr(0, dot);
    rest.remove_prefix(3);
  }
  return prefix.empty() ? std::string(rest) : std::string(prefix) + "." + std::string(rest);
}

bool has_weight(const Checkpoint& ckpt, const std::string& name) {
  return is_quantized(ckpt, name) || ckpt.contains(name);
}

// Other tools' quantized tensors under a module (GPTQ/AWQ qweight, compressed-tensors
// weight_packed, bitsandbytes absmax): a hint for errors, "" when there are none.
std::string foreign_quantization(const Checkpoint& ckpt, std::string_view prefix) {
  const std::string p = std::string(prefix) + ".";
  for (const std::string& n : ckpt.tensor_names()) {
    if (!n.starts_with(p) || is_companion_tensor(ckpt, n)) continue;
    const QuantizationConfig& qc = ckpt.quantization();
    const std::string config =
        qc.source.empty()
            ? std::string("no config.json beside the weights says how they are stored")
            : (qc.method.empty()
                   ? fmt::format("{} has no quantization_config", qc.source.string())
                   : fmt::format("{} says quant_method '{}'", qc.source.string(), qc.method));
    if (n.ends_with(".qweight") || n.ends_with(".qzeros") || n.ends_with(".g_idx")) {
      return fmt::format(
          " ('{}' is a GPTQ or AWQ tensor, and {}: moqe reads GPTQ and AWQ checkpoints through "
          "their config.json's quantization_config)",
          n, config);
    }
    if (n.ends_with(".weight_packed") || n.ends_with(".weight_scale")) {
      return fmt::format(
          " ('{}' is a compressed-tensors (llm-compressor) tensor, and {}: moqe reads them "
          "through their config.json's quantization_config)",
          n, config);
    }
    if (n.ends_with("_blocks") || n.ends_with(".absmax")) {
      return fmt::format(
          " ('{}' is an MXFP4 or bitsandbytes tensor: moqe reads moqe-quantized, F32, F16 and "
          "BF16 weights)",
          n);
    }
  }
  return {};
}

// The shape of a weight in any storage; an error naming it (and what the module holds instead)
// when it is absent.
std::vector<int64_t> shape_of(const Checkpoint& ckpt, const std::string& name,
                              std::string_view module) {
  if (!has_weight(ckpt, name)) {
    MOQE_FAIL("{}: missing tensor '{}'{}", ckpt.path().string(), name,
              foreign_quantization(ckpt, module));
  }
  return weight_shape(ckpt, name);
}

// A dense or quantized 2-D weight with its expected shape checked.
QuantizedLinear load_linear(const Checkpoint& ckpt, const std::string& name, int64_t n, int64_t k,
                            Numerics numerics) {
  const std::string where = ckpt.path().string();
  if (is_quantized(ckpt, name)) {
    MOQE_CHECK(stored_scheme(ckpt, name).stack.experts == 0,
               "{}: tensor '{}' is a quantized fused expert tensor; one matrix [{}, {}] expected",
               where, name, n, k);
    QuantizedMatrix q = load_quantized(ckpt, name);
    MOQE_CHECK(q.rows() == n && q.cols() == k,
               "{}: tensor '{}' has shape [{}, {}], expected [{}, {}]", where, name, q.rows(),
               q.cols(), n, k);
    return QuantizedLinear::from_quantized(std::move(q), numerics);
  }
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}' (expected shape [{}, {}])", where, name,
             n, k);
  const TensorInfo& t = ckpt.info(name);
  MOQE_CHECK(t.shape == std::vector<int64_t>({n, k}),
             "{}: tensor '{}' has shape {}, expected [{}, {}]", where, name,
             shape_to_string(t.shape), n, k);
  if (t.dtype == DType::kF16 || t.dtype == DType::kBF16) {
    const auto b = ckpt.bytes(name);
    std::vector<uint16_t> bits(static_cast<size_t>(n * k));
    if (!bits.empty()) std::memcpy(bits.data(), b.data(), b.size());
    return QuantizedLinear::from_half(std::move(bits), t.dtype, n, k);
  }
  DenseWeight w = load_weight_f32(ckpt, name);
  return QuantizedLinear::from_f32(std::move(w.values), n, k);
}

// Selected rows of expert e's matrix W_e [n, k] in a moqe-quantized fused tensor.
QuantizedMatrix quantized_expert_rows(const Checkpoint& ckpt, const std::string& name,
                                      const ExpertStack& stack, int64_t e, int64_t n, int64_t k,
                                      RowPick pick) {
  const std::string where = ckpt.path().string();
  {
    const StoredScheme s = stored_scheme(ckpt, name);
    QuantizedMatrix w;
    if (s.stack.experts > 0) {
      MOQE_CHECK(s.stack.experts == stack.experts && s.stack.transposed == stack.transposed,
                 "{}: tensor '{}' was quantized as {} experts{} but this family stores {} "
                 "experts{}",
                 where, name, s.stack.experts, s.stack.transposed ? " (transposed)" : "",
                 stack.experts, stack.transposed ? " (transposed)" : "");
      w = load_quantized_expert(ckpt, name, e);
    } else {
      // A stack of untransposed row blocks quantized as one matrix (DBRX's w1 and v1): the rows
      // of expert e are a block of it.
      MOQE_CHECK(!stack.transposed,
                 "{}: tensor '{}' was quantized as one matrix, but it holds {} experts' "
                 "transposed matrices; quantize the checkpoint with its config.json beside it",
                 where, name, stack.experts);
      const QuantizedMatrix all = load_quantized(ckpt, name);
      MOQE_CHECK(all.rows() == stack.experts * n && all.cols() == k,
                 "{}: tensor '{}' has shape [{}, {}], expected [{} * {}, {}]", where, name,
                 all.rows(), all.cols(), stack.experts, n, k);
      w = all.take_rows(e * n, n, 1, name);
    }
    MOQE_CHECK(w.rows() == n && w.cols() == k,
               "{}: expert {} of '{}' has shape [{}, {}], expected [{}, {}]", where, e, name,
               w.rows(), w.cols(), n, k);
    return w.take_rows(pick.first, pick.count, pick.step, name);
  }
}

// Selected rows of expert e's matrix W_e [n, k] in a fused tensor (dense or moqe-quantized).
QuantizedLinear load_expert_rows(const Checkpoint& ckpt, const std::string& name,
                                 const ExpertStack& stack, int64_t e, int64_t n, int64_t k,
                                 RowPick pick, Numerics numerics) {
  const std::string where = ckpt.path().string();
  if (is_quantized(ckpt, name)) {
    return QuantizedLinear::from_quantized(quantized_expert_rows(ckpt, name, stack, e, n, k, pick),
                                           numerics);
  }
  const TensorInfo& t = ckpt.info(name);
  MOQE_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kF16 || t.dtype == DType::kBF16,
             "{}: fused expert tensor '{}' is {}; F32, F16 or BF16 expected", where, name,
             dtype_name(t.dtype));
  // Element (r, c) of W_e sits at block (r, c), or (c, r) when the stack is transposed.
  const int64_t a = stack.transposed ? k : n, b = stack.transposed ? n : k;
  const size_t es = dtype_size(t.dtype);
  const std::byte* block = ckpt.bytes(name).data() + static_cast<size_t>(e * a * b) * es;
  auto gather = [&](auto* out) {
    using T = std::remove_pointer_t<decltype(out)>;
    for (int64_t i = 0; i < pick.count; ++i) {
      const int64_t r = pick.first + i * pick.step;
      for (int64_t c = 0; c < k; ++c) {
        const int64_t at = stack.transposed ? c * b + r : r * b + c;
        std::memcpy(out + i * k + c, block + static_cast<size_t>(at) * es, sizeof(T));
      }
    }
  };
  if (t.dtype == DType::kF32) {
    std::vector<float> v(static_cast<size_t>(pick.count * k));
    gather(v.data());
    return QuantizedLinear::from_f32(std::move(v), pick.count, k);
  }
  std::vector<uint16_t> v(static_cast<size_t>(pick.count * k));
  gather(v.data());
  return QuantizedLinear::from_half(std::move(v), t.dtype, pick.count, k);
}

std::vector<float> load_vector(const Checkpoint& ckpt, const std::string& name, int64_t n) {
  MOQE_CHECK(ckpt.contains(name), "{}: missing tensor '{}' (expected {} values)",
             ckpt.path().string(), name, n);
  const TensorInfo& t = ckpt.info(name);
  MOQE_CHECK(t.numel() == n, "{}: tensor '{}' has shape {}, expected {} values",
             ckpt.path().string(), name, shape_to_string(t.shape), n);
  return ckpt.to_float(name);
}

// Expert e's values of a bias stacked as [E, m], at positions first, first + step, ...
std::vector<float> stacked_bias(const std::vector<float>& all, int64_t e, int64_t m, RowPick pick) {
  std::vector<float> out(static_cast<size_t>(pick.count));
  for (int64_t i = 0; i < pick.count; ++i) out[i] = all[e * m + pick.first + i * pick.step];
  return out;
}

// Where one projection's matrix comes from: rows `pick` of a plain 2-D tensor [n, k], or of
// expert `expert`'s matrix W_e [n, k] in a fused tensor.
struct MatrixSource {
  std::string tensor;
  std::optional<ExpertStack> stack;
  int64_t expert = 0;
  int64_t n = 0, k = 0;
  RowPick pick;
};

// One expert (routed or shared): its projections, biases and GLU product.
struct ExpertSource {
  std::optional<MatrixSource> gate;  // absent: an MLP
  MatrixSource up, down;
  MlpBiases biases;
};

MatrixSource whole(std::string tensor, int64_t n, int64_t k) {
  return {std::move(tensor), std::nullopt, 0, n, k, {0, n, 1}};
}

// Reads one layer: the names it uses, then the parts.
class LayerLoader {
 public:
  LayerLoader(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& c,
              const LoadOptions& o)
      : ckpt_(ckpt), prefix_(prefix), c_(c), f_(family_info(c.family)), o_(o) {}

  // Plans every name, checks that nothing else lies under the prefix, and builds the router.
  Router plan() {
    const int64_t e_count = c_.router.num_experts;
    const std::string gate_name = name(f_.router);
    // The names first: a checkpoint of another family or prefix shows as tensors left over.
    use(gate_name);
    use_expert_names();
    plan_shared();
    if (c_.router_bias) use(name(f_.router_bias));
    if (c_.correction_bias) use(name(f_.correction_bias));
    if (!f_.output_bias.empty()) use(name(f_.output_bias));
    check_unused();
    const std::vector<int64_t> gshape = shape_of(ckpt_, gate_name, prefix_);
    MOQE_CHECK(gshape.size() == 2 && gshape[0] == e_count && gshape[1] > 0,
               "{}: router '{}' has shape {}, but the {} config has {} experts (expected [{}, "
               "hidden])",
               where(), gate_name, shape_to_string(gshape), f_.name, e_count, e_count);
    h_ = gshape[1];
    check_expert_shapes();

    RouterConfig rc = c_.router;
    if (c_.router_bias) rc.router_bias = load_vector(ckpt_, name(f_.router_bias), e_count);
    if (c_.correction_bias) {
      rc.correction_bias = load_vector(ckpt_, name(f_.correction_bias), e_count);
    }
    return Router(std::move(rc), load_weight_f32(ckpt_, gate_name, o_.num_threads).values, h_);
  }

  int64_t hidden() const { return h_; }

  std::vector<int64_t> selected(std::optional<std::span<const int64_t>> which) const {
    const int64_t e_count = c_.router.num_experts;
    std::vector<int64_t> out;
    if (which) {
      for (const int64_t e : *which) {
        MOQE_CHECK(e >= 0 && e < e_count, "{}: expert {} requested of the {} experts of '{}'",
                   where(), e, e_count, prefix_);
        out.push_back(e);
      }
    } else {
      for (int64_t e = 0; e < e_count; ++e) out.push_back(e);
    }
    return out;
  }

  std::vector<float> output_bias() const {
    return f_.output_bias.empty() ? std::vector<float>{}
                                  : load_vector(ckpt_, name(f_.output_bias), h_);
  }

  // Routed expert e, where its weights are.
  ExpertSource expert(int64_t e) const {
    const int64_t h = h_, i = i_, en = c_.router.num_experts;
    auto fused = [&](const char* n, bool transposed, int64_t rows, int64_t k, RowPick p) {
      return MatrixSource{name(n), ExpertStack{en, transposed}, e, rows, k, p};
    };
    ExpertSource x;
    switch (f_.layout) {
      case ExpertLayout::kPerExpert: {
        if (fused_) {
          x.gate = fused("experts.gate_up_proj", false, 2 * i, h, {0, i, 1});
          x.up = fused("experts.gate_up_proj", false, 2 * i, h, {i, i, 1});
          x.down = fused("experts.down_proj", false, h, i, {0, h, 1});
          return x;
        }
        const std::string b = expert_base(e);
        const std::string g = b + "." + std::string(f_.gate) + ".weight";
        const std::vector<int64_t> gs = shape_of(ckpt_, g, b);
        MOQE_CHECK(gs.size() == 2 && gs[1] == h,
                   "{}: tensor '{}' has shape {}, expected [intermediate, {}]", where(), g,
                   shape_to_string(gs), h);
        x.gate = whole(g, gs[0], h);
        x.up = whole(b + "." + std::string(f_.up) + ".weight", gs[0], h);
        x.down = whole(b + "." + std::string(f_.down) + ".weight", h, gs[0]);
        return x;
      }
      case ExpertLayout::kSwitch: {
        const std::string b = expert_base(e);
        const std::vector<int64_t> us = shape_of(ckpt_, b + ".wi.weight", b);
        MOQE_CHECK(us.size() == 2 && us[1] == h,
                   "{}: tensor '{}' has shape {}, expected [d_ff, {}]", where(), b + ".wi.weight",
                   shape_to_string(us), h);
        x.up = whole(b + ".wi.weight", us[0], h);
        x.down = whole(b + ".wo.weight", h, us[0]);
        return x;
      }
      case ExpertLayout::kGptOss: {
        const std::vector<float> gub =
            load_vector(ckpt_, name("experts.gate_up_proj_bias"), en * 2 * i);
        const std::vector<float> db = load_vector(ckpt_, name("experts.down_proj_bias"), en * h);
        x.biases = {stacked_bias(gub, e, 2 * i, {0, i, 2}), stacked_bias(gub, e, 2 * i, {1, i, 2}),
                    stacked_bias(db, e, h, {0, h, 1})};
        x.gate = fused("experts.gate_up_proj", true, 2 * i, h, {0, i, 2});
        x.up = fused("experts.gate_up_proj", true, 2 * i, h, {1, i, 2});
        x.down = fused("experts.down_proj", true, h, i, {0, h, 1});
        return x;
      }
      case ExpertLayout::kLlama4:
        x.gate = fused("experts.gate_up_proj", true, 2 * i, h, {0, i, 1});
        x.up = fused("experts.gate_up_proj", true, 2 * i, h, {i, i, 1});
        x.down = fused("experts.down_proj", true, h, i, {0, h, 1});
        return x;
      case ExpertLayout::kInputOutputLinear:
        x.gate = fused("input_linear.weight", false, 2 * i, h, {0, i, 1});
        x.up = fused("input_linear.weight", false, 2 * i, h, {i, i, 1});
        x.down = fused("output_linear.weight", false, h, i, {0, h, 1});
        return x;
      case ExpertLayout::kDbrx:
        x.gate = fused("experts.mlp.w1", false, i, h, {0, i, 1});
        x.up = fused("experts.mlp.v1", false, i, h, {0, i, 1});
        x.down = fused("experts.mlp.w2", true, h, i, {0, h, 1});
        return x;
    }
    MOQE_FAIL("{}: unknown expert layout", where());
  }

  // The shared expert, when the layer has one.
  std::optional<ExpertSource> shared() const {
    if (!c_.shared) return std::nullopt;
    const int64_t h = h_;
    const std::string module = name(f_.shared);
    ExpertSource x;
    if (f_.shared_layout == SharedLayout::kGateUpDown) {
      const std::string g = shared_name("gate_proj.weight");
      const std::vector<int64_t> gs = shape_of(ckpt_, g, module);
      MOQE_CHECK(gs.size() == 2 && gs[1] == h,
                 "{}: tensor '{}' has shape {}, expected [intermediate, {}]", where(), g,
                 shape_to_string(gs), h);
      const int64_t i = gs[0];
      x.gate = whole(g, i, h);
      x.up = whole(shared_name("up_proj.weight"), i, h);
      x.down = whole(shared_name("down_proj.weight"), h, i);
      if (c_.shared_biases) {
        x.biases.gate = load_vector(ckpt_, shared_name("gate_proj.bias"), i);
        x.biases.up = load_vector(ckpt_, shared_name("up_proj.bias"), i);
        x.biases.down = load_vector(ckpt_, shared_name("down_proj.bias"), h);
      }
    } else {
      const std::string in = shared_name("input_linear.weight");
      const std::vector<int64_t> is = shape_of(ckpt_, in, module);
      MOQE_CHECK(is.size() == 2 && is[1] == h && is[0] % 2 == 0,
                 "{}: tensor '{}' has shape {}, expected [2 * intermediate, {}]", where(), in,
                 shape_to_string(is), h);
      const int64_t i = is[0] / 2;
      x.gate = MatrixSource{in, std::nullopt, 0, 2 * i, h, {0, i, 1}};
      x.up = MatrixSource{in, std::nullopt, 0, 2 * i, h, {i, i, 1}};
      x.down = whole(shared_name("output_linear.weight"), h, i);
    }
    return x;
  }

  std::vector<float> shared_gate() const {
    return f_.shared_gate.empty() ? std::vector<float>{}
                                  : load_vector(ckpt_, name(f_.shared_gate), h_);
  }

  // A projection for the CPU kernels (dense or quantized storage, as stored).
  QuantizedLinear linear(const MatrixSource& m) const {
    const Numerics nm = o_.numerics;
    if (m.stack) {
      return load_expert_rows(ckpt_, m.tensor, *m.stack, m.expert, m.n, m.k, m.pick, nm);
    }
    if (m.pick.first == 0 && m.pick.count == m.n && m.pick.step == 1) {
      return load_linear(ckpt_, m.tensor, m.n, m.k, nm);
    }
    if (is_quantized(ckpt_, m.tensor)) return QuantizedLinear::from_quantized(quantized(m), nm);
    return load_expert_rows(ckpt_, m.tensor, ExpertStack{1, false}, 0, m.n, m.k, m.pick, nm);
  }

  // A projection as moqe-quantized codes (the CUDA layer's input); an unquantized one is an
  // error naming the tensor.
  QuantizedMatrix quantized(const MatrixSource& m) const {
    if (!is_quantized(ckpt_, m.tensor)) {
      MOQE_CHECK(ckpt_.contains(m.tensor), "{}: missing tensor '{}'", where(), m.tensor);
      MOQE_FAIL(
          "{}: tensor '{}' is {}, not moqe-quantized: the CUDA layer runs quantized experts "
          "only (quantize it with `moqe quantize`, or run the layer on the CPU)",
          where(), m.tensor, ckpt_.info(m.tensor).describe());
    }
    if (m.stack)
      return quantized_expert_rows(ckpt_, m.tensor, *m.stack, m.expert, m.n, m.k, m.pick);
    MOQE_CHECK(stored_scheme(ckpt_, m.tensor).stack.experts == 0,
               "{}: tensor '{}' is a quantized fused expert tensor; one matrix [{}, {}] expected",
               where(), m.tensor, m.n, m.k);
    const QuantizedMatrix q = load_quantized(ckpt_, m.tensor);
    MOQE_CHECK(q.rows() == m.n && q.cols() == m.k,
               "{}: tensor '{}' has shape [{}, {}], expected [{}, {}]", where(), m.tensor, q.rows(),
               q.cols(), m.n, m.k);
    if (m.pick.first == 0 && m.pick.count == m.n && m.pick.step == 1) return q;
    return q.take_rows(m.pick.first, m.pick.count, m.pick.step, m.tensor);
  }

  std::shared_ptr<const ExpertMLP> mlp(const ExpertSource& x) const {
    if (!x.gate) {
      return std::make_shared<const ExpertMLP>(
          ExpertMLP::mlp(linear(x.up), linear(x.down), c_.activation, x.biases));
    }
    if (c_.swiglu) {
      return std::make_shared<const ExpertMLP>(ExpertMLP::clamped_glu(
          linear(*x.gate), linear(x.up), linear(x.down), *c_.swiglu, o_.fuse_gate_up, x.biases));
    }
    return std::make_shared<const ExpertMLP>(ExpertMLP::glu(
        linear(*x.gate), linear(x.up), linear(x.down), c_.activation, o_.fuse_gate_up, x.biases));
  }

 private:
  const Checkpoint& ckpt_;
  std::string prefix_;
  const MoeConfig& c_;
  const FamilyInfo& f_;
  const LoadOptions& o_;
  int64_t h_ = 0, i_ = 0;  // hidden, and the routed experts' intermediate size (fused layouts)
  bool fused_ = false;     // kPerExpert read from transformers 5's fused tensors
  std::set<std::string> used_;

  std::string where() const { return ckpt_.path().string(); }
  std::string name(std::string_view rel) const { return join(prefix_, rel); }
  void use(const std::string& n) { used_.insert(n); }

  std::string expert_base(int64_t e) const {
    return name(f_.layout == ExpertLayout::kSwitch ? "experts.expert_" + std::to_string(e)
                                                   : "experts." + std::to_string(e));
  }

  std::string shared_name(std::string_view part) const {
    return name(std::string(f_.shared) + "." + std::string(part));
  }

  // Checks a fused tensor's shape (as stored, before any quantization) against the expected.
  void check_fused(const std::string& n, const std::vector<int64_t>& expected) const {
    const std::vector<int64_t> s = shape_of(ckpt_, n, prefix_);
    MOQE_CHECK(s == expected, "{}: tensor '{}' has shape {}, expected {}", where(), n,
               shape_to_string(s), shape_to_string(expected));
  }

  // The intermediate size from a fused tensor's dimension `dim` (divided by `div`).
  int64_t inter_of(const std::string& n, size_t dim, int64_t div) const {
    const std::vector<int64_t> s = shape_of(ckpt_, n, prefix_);
    MOQE_CHECK(s.size() > dim && s[dim] % div == 0 && s[dim] > 0,
               "{}: tensor '{}' has shape {}, which is not a {} layout", where(), n,
               shape_to_string(s), f_.name);
    return s[dim] / div;
  }

  // Marks the tensors of the checkpoint named `<expert_base(x)>.<p>.weight` for an expert
  // x < num_experts and p one of `projections`. Walks the checkpoint's names rather than the
  // experts, so a config claiming 2^34 experts costs no more than one of 8.
  void use_per_expert(std::initializer_list<std::string_view> projections) {
    const int64_t e = c_.router.num_experts;
    const std::string base = expert_base(0);
    const std::string lead = base.substr(0, base.size() - 1);  // up to the expert number
    for (const std::string& t : ckpt_.tensor_names()) {
      const std::string w = companion_weight(ckpt_, t);  // a quantized weight's parts
      const std::string& n = w.empty() ? t : w;
      if (!n.starts_with(lead)) continue;
      const std::string_view rest = std::string_view(n).substr(lead.size());
      const size_t dot = rest.find('.');
      if (dot == std::string_view::npos || dot == 0 || dot > 18) continue;
      int64_t x = 0;
      bool digits = rest[0] != '0' || dot == 1;  // expert_base never writes leading zeros
      for (size_t i = 0; i < dot && digits; ++i) {
        digits = rest[i] >= '0' && rest[i] <= '9';
        x = 10 * x + (rest[i] - '0');
      }
      if (!digits || x >= e) continue;
      for (std::string_view p : projections) {
        if (rest.substr(dot + 1) == std::string(p) + ".weight") use(n);
      }
    }
  }

  // The names of the routed experts' tensors in the family's layout.
  void use_expert_names() {
    switch (f_.layout) {
      case ExpertLayout::kPerExpert:
        fused_ = has_weight(ckpt_, name("experts.gate_up_proj"));
        if (fused_) {
          use(name("experts.gate_up_proj"));
          use(name("experts.down_proj"));
        } else {
          use_per_expert({f_.gate, f_.up, f_.down});
        }
        break;
      case ExpertLayout::kSwitch:
        use_per_expert({"wi", "wo"});
        break;
      case ExpertLayout::kGptOss:
        for (const char* n : {"experts.gate_up_proj", "experts.down_proj",
                              "experts.gate_up_proj_bias", "experts.down_proj_bias"}) {
          use(name(n));
        }
        break;
      case ExpertLayout::kLlama4:
        use(name("experts.gate_up_proj"));
        use(name("experts.down_proj"));
        break;
      case ExpertLayout::kInputOutputLinear:
        use(name("input_linear.weight"));
        use(name("output_linear.weight"));
        break;
      case ExpertLayout::kDbrx:
        for (const char* n : {"experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"}) use(name(n));
        break;
    }
  }

  // The fused layouts' shapes, and their intermediate size.
  void check_expert_shapes() {
    const int64_t e = c_.router.num_experts, h = h_;
    switch (f_.layout) {
      case ExpertLayout::kPerExpert:
        if (fused_) {
          i_ = inter_of(name("experts.gate_up_proj"), 1, 2);
          check_fused(name("experts.gate_up_proj"), {e, 2 * i_, h});
          check_fused(name("experts.down_proj"), {e, h, i_});
        }
        break;
      case ExpertLayout::kSwitch:
        break;
      case ExpertLayout::kGptOss:
      case ExpertLayout::kLlama4:
        i_ = inter_of(name("experts.gate_up_proj"), 2, 2);
        check_fused(name("experts.gate_up_proj"), {e, h, 2 * i_});
        check_fused(name("experts.down_proj"), {e, i_, h});
        break;
      case ExpertLayout::kInputOutputLinear:
        i_ = inter_of(name("input_linear.weight"), 1, 2);
        check_fused(name("input_linear.weight"), {e, 2 * i_, h});
        check_fused(name("output_linear.weight"), {e, h, i_});
        break;
      case ExpertLayout::kDbrx: {
        const int64_t rows = inter_of(name("experts.mlp.w1"), 0, 1);
        MOQE_CHECK(rows % e == 0, "{}: tensor '{}' has {} rows, not a multiple of the {} experts",
                   where(), name("experts.mlp.w1"), rows, e);
        i_ = rows / e;
        for (const char* p : {"experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"}) {
          check_fused(name(p), {e * i_, h});
        }
        break;
      }
    }
  }

  void plan_shared() {
    if (!c_.shared) return;
    if (f_.shared_layout == SharedLayout::kGateUpDown) {
      for (const char* p : {"gate_proj", "up_proj", "down_proj"}) {
        use(shared_name(std::string(p) + ".weight"));
        if (c_.shared_biases) use(shared_name(std::string(p) + ".bias"));
      }
    } else if (f_.shared_layout == SharedLayout::kInputOutput) {
      use(shared_name("input_linear.weight"));
      use(shared_name("output_linear.weight"));
    }
    if (!f_.shared_gate.empty()) use(name(f_.shared_gate));
  }

  // Every tensor under the prefix (and under a sibling shared module) must be one the family
  // reads: a leftover means the family or the prefix is not what the checkpoint holds.
  void check_unused() {
    if (o_.allow_unused_tensors) return;
    std::vector<std::string> scopes = {prefix_ + "."};
    if (f_.shared.starts_with("../")) scopes.push_back(name(f_.shared) + ".");
    auto accounted = [&](const std::string& n) {
      // A quantized weight's parts belong to the layer when the weight does.
      const std::string w = companion_weight(ckpt_, n);
      if (used_.count(w.empty() ? n : w) != 0) return true;
      return ckpt_.info(n).numel() == 0;  // an empty module (n_shared_experts = 0) adds nothing
    };
    std::vector<std::string> unused;
    for (const std::string& n : ckpt_.tensor_names()) {
      bool in_scope = false;
      for (const std::string& s : scopes) in_scope = in_scope || n.starts_with(s);
      if (in_scope && !accounted(n)) unused.push_back(n);
    }
    if (unused.empty()) return;
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 8; ++i) {
      if (i > 0) list.append(", ");
      list.append(unused[i]);
    }
    if (unused.size() > 8) list += fmt::format(", ... ({} in all)", unused.size());
    MOQE_FAIL(
        "{}: {} tensor(s) under '{}' are not part of a {} layer: {}{}. Check --prefix and the "
        "family (config.json model_type '{}'); --allow-unused-tensors runs the layer anyway",
        where(), unused.size(), prefix_, f_.name, list, foreign_quantization(ckpt_, prefix_),
        c_.model_type);
  }
};

}  // namespace

std::filesystem::path default_config_path(const std::filesystem::path& weights) {
  if (std::filesystem::is_directory(weights)) return weights / "config.json";
  return weights.parent_path() / "config.json";
}

std::optional<ExpertStack> expert_stack(const MoeConfig& c, std::string_view n,
                                        std::span<const int64_t> shape) {
  const FamilyInfo& f = family_info(c.family);
  const int64_t e = c.router.num_experts;
  auto ends = [&](std::string_view s) {
    return n.ends_with(s) && n.size() > s.size() && n[n.size() - s.size() - 1] == '.';
  };
  const bool three_d = shape.size() == 3;
  switch (f.layout) {
    case ExpertLayout::kPerExpert:
      if (three_d && (ends("experts.gate_up_proj") || ends("experts.down_proj"))) {
        return ExpertStack{shape[0], false};
      }
      break;
    case ExpertLayout::kGptOss:
    case ExpertLayout::kLlama4:
      if (three_d && (ends("experts.gate_up_proj") || ends("experts.down_proj"))) {
        return ExpertStack{shape[0], true};
      }
      break;
    case ExpertLayout::kInputOutputLinear:
      if (three_d && (ends("input_linear.weight") || ends("output_linear.weight"))) {
        return ExpertStack{shape[0], false};
      }
      break;
    case ExpertLayout::kDbrx:
      if (shape.size() == 2 && (ends("experts.mlp.w1") || ends("experts.mlp.v1"))) {
        return ExpertStack{e, false};
      }
      if (shape.size() == 2 && ends("experts.mlp.w2")) return ExpertStack{e, true};
      break;
    case ExpertLayout::kSwitch:
      break;
  }
  return std::nullopt;
}

QuantizedLinear load_linear(const Checkpoint& ckpt, std::string_view name, Numerics numerics) {
  const std::string n(name);
  MOQE_CHECK(has_weight(ckpt, n), "{}: missing tensor '{}'{}", ckpt.path().string(), n,
             foreign_quantization(ckpt, name.substr(0, name.rfind('.'))));
  const std::vector<int64_t> s = weight_shape(ckpt, n);
  MOQE_CHECK(s.size() == 2, "{}: tensor '{}' has shape {}, not a matrix", ckpt.path().string(), n,
             shape_to_string(s));
  return load_linear(ckpt, n, s[0], s[1], numerics);
}

MoELayer load_moe_layer(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& c,
                        const LoadOptions& options) {
  MoeLayerParts parts = load_moe_parts(ckpt, prefix, c, options);
  return MoELayer(std::move(parts.router), std::move(parts.experts), std::move(parts.shared), {},
                  std::move(parts.output_bias));
}

MoeLayerParts load_moe_parts(const Checkpoint& ckpt, std::string_view prefix, const MoeConfig& c,
                             const LoadOptions& options,
                             std::optional<std::span<const int64_t>> which) {
  MoeConfig layer = c.for_layer(prefix);
  layer.router.switch_passthrough = options.switch_passthrough;
  LayerLoader l(ckpt, prefix, layer, options);
  MoeLayerParts parts;
  parts.router = l.plan();
  parts.hidden = l.hidden();
  for (const int64_t e : l.selected(which)) parts.experts.push_back(l.mlp(l.expert(e)));
  if (const std::optional<ExpertSource> s = l.shared()) {
    parts.shared.push_back({l.mlp(*s), l.shared_gate(), layer.shared_combine});
  }
  parts.output_bias = l.output_bias();
  return parts;
}

QuantizedLayer load_quantized_layer(const Checkpoint& ckpt, std::string_view prefix,
                                    const MoeConfig& c, const LoadOptions& options) {
  MoeConfig layer = c.for_layer(prefix);
  layer.router.switch_passthrough = options.switch_passthrough;
  LayerLoader l(ckpt, prefix, layer, options);
  QuantizedLayer q;
  q.router = l.plan();
  q.hidden = l.hidden();
  auto add = [&](const ExpertSource& x, QuantizedExperts& out) {
    MOQE_CHECK(!x.biases.gate.size() && !x.biases.up.size() && !x.biases.down.size(),
               "{}: the {} layer's experts have biases, which the quantized-expert path does not "
               "carry",
               ckpt.path().string(), to_string(layer.family));
    if (x.gate) out.gate.push_back(l.quantized(*x.gate));
    out.up.push_back(l.quantized(x.up));
    out.down.push_back(l.quantized(x.down));
  };
  for (const int64_t e : l.selected(std::nullopt)) add(l.expert(e), q.experts);
  if (const std::optional<ExpertSource> s = l.shared()) {
    q.shared.emplace();
    add(*s, *q.shared);
    q.shared_gate = l.shared_gate();
  }
  q.output_bias = l.output_bias();
  return q;
}

}  // namespace moqe
