// 09: a whole decoder block assembled from moqe's parts, the way an application embeds moqe in
// its own model: RMSNorm, the attention projections as QuantizedLinear (int8, loaded from a
// checkpoint with load_linear), causal multi-head attention written here, the MoE layer (int4
// experts, load_moe_layer) and the two residual adds, all on bf16 hidden states (the layers take
// MatrixView<const BFloat16> in and MatrixView<BFloat16> out). The same block runs once more on
// fp32 activations over the same quantized weights, and the bf16 run must agree with it to within
// the rounding bf16 activations cost.
//
//   ./09_transformer_block [--small]
#include <unistd.h>
#include <moqe/moqe.hpp>

#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>

namespace {

// float -> T (rounded to nearest even for BFloat16) and back.
template <class T>
T to(float v) {
  return T(v);
}
template <class T>
float from(T v) {
  return static_cast<float>(v);
}

struct Block {
  int64_t hidden = 0, heads = 0, head_dim = 0;
  std::vector<float> attn_norm, moe_norm;  // RMSNorm weights [H]
  moqe::QuantizedLinear q, k, v, o;        // attention projections [H, H]
  moqe::MoELayer moe;
  float eps = 1e-6f;
};

// Activations of one forward pass over up to max_tokens tokens, in T.
template <class T>
struct Scratch {
  std::vector<T> xn, q, k, v, att, h, hn, m;
  std::vector<float> scores;
  moqe::MoELayer::Workspace moe;
  Scratch(const Block& b, int64_t max_tokens)
      : xn(static_cast<size_t>(max_tokens * b.hidden)),
        q(xn.size()),
        k(xn.size()),
        v(xn.size()),
        att(xn.size()),
        h(xn.size()),
        hn(xn.size()),
        m(xn.size()),
        scores(static_cast<size_t>(max_tokens)),
        moe(b.moe.make_workspace(max_tokens)) {}
};

template <class T>
moqe::MatrixView<T> rows(std::vector<T>& v, int64_t t, int64_t h) {
  return moqe::MatrixView<T>(v.data(), t, h);
}
template <class T>
moqe::MatrixView<const T> crows(const std::vector<T>& v, int64_t t, int64_t h) {
  return moqe::MatrixView<const T>(v.data(), t, h);
}

// out = x / rms(x) * w, per row, in fp32; stored as T.
template <class T>
void rms_norm(moqe::MatrixView<const T> x, const std::vector<float>& w, float eps,
              moqe::MatrixView<T> out) {
  for (int64_t t = 0; t < x.rows(); ++t) {
    double ss = 0;
    for (int64_t c = 0; c < x.cols(); ++c) ss += double(from(x(t, c))) * from(x(t, c));
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / x.cols()) + eps);
    for (int64_t c = 0; c < x.cols(); ++c) out(t, c) = to<T>(from(x(t, c)) * inv * w[c]);
  }
}

// Causal softmax attention of one sequence, per head, in fp32 on T inputs; out in T.
template <class T>
void attention(const Block& b, moqe::MatrixView<const T> q, moqe::MatrixView<const T> k,
               moqe::MatrixView<const T> v, std::vector<float>& scores, moqe::MatrixView<T> out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(b.head_dim));
  for (int64_t hd = 0; hd < b.heads; ++hd) {
    const int64_t c0 = hd * b.head_dim;
    for (int64_t i = 0; i < q.rows(); ++i) {
      float mx = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        float s = 0;
        for (int64_t d = 0; d < b.head_dim; ++d) s += from(q(i, c0 + d)) * from(k(j, c0 + d));
        scores[j] = s * scale;
        mx = std::max(mx, scores[j]);
      }
      float sum = 0;
      for (int64_t j = 0; j <= i; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
      for (int64_t d = 0; d < b.head_dim; ++d) {
        float acc = 0;
        for (int64_t j = 0; j <= i; ++j) acc += scores[j] * from(v(j, c0 + d));
        out(i, c0 + d) = to<T>(acc / sum);
      }
    }
  }
}

// y = h + moe(norm(h)), h = x + o(attention(norm(x))), for T = float or moqe::BFloat16.
template <class T>
void forward(const Block& b, moqe::MatrixView<const T> x, moqe::MatrixView<T> y, Scratch<T>& s) {
  const int64_t t = x.rows(), h = b.hidden;
  rms_norm(x, b.attn_norm, b.eps, rows(s.xn, t, h));
  b.q.forward(crows(s.xn, t, h), rows(s.q, t, h));
  b.k.forward(crows(s.xn, t, h), rows(s.k, t, h));
  b.v.forward(crows(s.xn, t, h), rows(s.v, t, h));
  attention(b, crows(s.q, t, h), crows(s.k, t, h), crows(s.v, t, h), s.scores, rows(s.att, t, h));
  b.o.forward(crows(s.att, t, h), rows(s.h, t, h));  // o(att), then the residual add in place
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t c = 0; c < h; ++c) s.h[i * h + c] = to<T>(from(x(i, c)) + from(s.h[i * h + c]));
  }
  rms_norm(crows(s.h, t, h), b.moe_norm, b.eps, rows(s.hn, t, h));
  b.moe.run(crows(s.hn, t, h), rows(s.m, t, h), s.moe);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t c = 0; c < h; ++c) y(i, c) = to<T>(from(s.h[i * h + c]) + from(s.m[i * h + c]));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::string(argv[1]) == "--small";
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("moqe-ex09-{}", getpid());
  // A Mixtral-style MoE layer (write_synthetic_moe) and the block's attention and norms beside it.
  moqe::SyntheticMoeSpec spec;
  spec.family = "mixtral";
  spec.hidden = small ? 256 : 1024;
  spec.intermediate = small ? 512 : 3584;
  spec.experts = 8;
  spec.top_k = 2;
  moqe::write_synthetic_moe(dir / "moe", spec);
  const int64_t h = spec.hidden, heads = 8;
  {
    moqe::SafetensorsWriter w;
    for (const char* p : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      const std::vector<float> m = moqe::synthetic_weights(h, h, static_cast<uint32_t>(p[0]));
      w.add_values<float>(fmt::format("model.layers.0.self_attn.{}.weight", p), moqe::DType::kF32,
                          {h, h}, m);
    }
    std::vector<float> norm(static_cast<size_t>(h));
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(0.8f, 1.2f);
    for (auto& v : norm) v = u(rng);
    w.add_values<float>("model.layers.0.input_layernorm.weight", moqe::DType::kF32, {h}, norm);
    w.write(dir / "attention.safetensors");
  }
  // Attention projections to int8 per channel, experts to int4 groups of 128.
  moqe::ConvertOptions a8;
  a8.bits = 8;
  a8.group_policy = moqe::GroupPolicy::kPerChannel;
  a8.include_regex = "self_attn\\.[qkvo]_proj\\.weight$";
  moqe::quantize_checkpoint(moqe::Checkpoint(dir / "attention.safetensors"),
                            dir / "attn8.safetensors", a8);
  moqe::ConvertOptions e4;
  e4.bits = 4;
  e4.group_policy = moqe::GroupPolicy::kFixed;
  e4.group_size = 128;
  moqe::quantize_checkpoint(moqe::Checkpoint(dir / "moe"), dir / "moe4.safetensors", e4);

  const moqe::Checkpoint attn(dir / "attn8.safetensors"), moe(dir / "moe4.safetensors");
  Block b;
  b.hidden = h;
  b.heads = heads;
  b.head_dim = h / heads;
  const std::string layer = "model.layers.0.";
  b.q = moqe::load_linear(attn, layer + "self_attn.q_proj.weight");
  b.k = moqe::load_linear(attn, layer + "self_attn.k_proj.weight");
  b.v = moqe::load_linear(attn, layer + "self_attn.v_proj.weight");
  b.o = moqe::load_linear(attn, layer + "self_attn.o_proj.weight");
  b.attn_norm = attn.to_float(layer + "input_layernorm.weight");
  b.moe_norm = moe.to_float(layer + "post_attention_layernorm.weight");
  const moqe::MoeConfig config = moqe::read_moe_config(dir / "moe" / "config.json");
  b.moe = moqe::load_moe_layer(moe, moqe::synthetic_moe_prefix(spec), config);
  std::printf("block: hidden %lld, %lld heads, attention %s (%s), experts %s\n",
              static_cast<long long>(h), static_cast<long long>(heads),
              b.q.scheme().to_string().c_str(), std::string(moqe::to_string(b.q.isa())).c_str(),
              b.moe.expert(0).down().scheme().to_string().c_str());

  // One sequence of T tokens through the block, in bf16 and in fp32.
  const int64_t t = small ? 12 : 64;
  std::vector<float> x32(static_cast<size_t>(t * h));
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& v : x32) v = g(rng);
  std::vector<moqe::BFloat16> x16(x32.size()), y16(x32.size());
  for (size_t i = 0; i < x32.size(); ++i) {
    x16[i] = moqe::BFloat16(x32[i]);
    x32[i] = static_cast<float>(x16[i]);  // both runs start from the same (bf16) hidden states
  }
  std::vector<float> y32(x32.size());
  Scratch<float> s32(b, t);
  Scratch<moqe::BFloat16> s16(b, t);
  forward<float>(b, crows(x32, t, h), rows(y32, t, h), s32);
  forward<moqe::BFloat16>(b, crows(x16, t, h), rows(y16, t, h), s16);
  double num = 0, den = 0, moe_num = 0, moe_den = 0;
  for (size_t i = 0; i < y32.size(); ++i) {
    const double d = static_cast<float>(y16[i]) - double(y32[i]);
    num += d * d;
    den += double(y32[i]) * y32[i];
    const double dm = static_cast<float>(s16.m[i]) - double(s32.m[i]);
    moe_num += dm * dm;
    moe_den += double(s32.m[i]) * s32.m[i];
  }
  const double rel = std::sqrt(num / den), moe_rel = std::sqrt(moe_num / moe_den);
  std::printf(
      "bf16 block against fp32 on the same weights: output rel. error %.2e, MoE output "
      "%.2e\n",
      rel, moe_rel);
  std::printf("routing: %zu of %zu token-expert choices identical\n",
              static_cast<size_t>(std::inner_product(
                  s16.moe.routing.ids.begin(), s16.moe.routing.ids.begin() + t * 2,
                  s32.moe.routing.ids.begin(), size_t{0}, std::plus<>(),
                  [](int32_t a, int32_t c) { return a == c ? size_t{1} : size_t{0}; })),
              static_cast<size_t>(t * 2));
  std::filesystem::remove_all(dir);
  // bf16 keeps 8 significant bits (unit roundoff u = 2^-9): the block rounds its activations 8
  // times (norm, q/k/v, attention, o, residual, norm, MoE, residual), each adding at most u
  // relative to what it rounds; with no amplification their sum stays under 8 u = 2^-6 (measured:
  // about 1.7 u). A wrong path (a projection skipped, a stride misread) gives errors of order 1,
  // and a routing flip on a near tie a few percent.
  const double bound = std::ldexp(1.0, -6);
  if (!(rel < bound)) {
    std::printf("FAIL: the bf16 block is %.2e from the fp32 one (bound %.2e)\n", rel, bound);
    return 1;
  }
  std::printf("ok (bound %.2e)\n", bound);
  return 0;
}
