// 05: task-level MoE (Task-MoE). A task router sends every token of a task to the same experts,
// so the experts a task uses are known ahead of time: extract_task() builds a smaller layer that
// holds only those, which serves the task with the same outputs and a fraction of the memory.
#include <moqe/moqe.hpp>

#include <cstdio>
#include <memory>
#include <random>

int main() {
  const int64_t e = 16, h = 256, i = 512, k = 2;
  std::vector<std::shared_ptr<const moqe::ExpertMLP>> experts;
  for (int64_t x = 0; x < e; ++x) {
    auto lin = [&](int64_t n, int64_t kk, uint32_t seed) {
      const auto w = moqe::synthetic_weights(n, kk, seed);
      return moqe::QuantizedLinear::from_quantized(moqe::quantize(
          moqe::MatrixView<const float>(w.data(), n, kk), {4, moqe::QuantMode::kSym, 128}));
    };
    const auto s = static_cast<uint32_t>(3 * x);
    experts.push_back(std::make_shared<const moqe::ExpertMLP>(moqe::ExpertMLP::glu(
        lin(i, h, s), lin(i, h, s + 1), lin(h, i, s + 2), moqe::Activation::kSilu)));
  }
  moqe::RouterConfig c;
  c.kind = moqe::RouterKind::kTask;
  c.num_experts = e;
  c.top_k = k;
  c.tasks = {{{0, 5}, {0.7f, 0.3f}}, {{3, 12}, {0.5f, 0.5f}}, {{7, 8}, {0.6f, 0.4f}}};
  const moqe::MoELayer full(moqe::Router(c, {}, h), experts);
  const moqe::MoELayer sub = full.extract_task(1);

  const int64_t t = 8;
  std::vector<float> x(static_cast<size_t>(t * h)), y_full(x.size()), y_sub(x.size());
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (auto& v : x) v = g(rng);
  auto ws_full = full.make_workspace(t), ws_sub = sub.make_workspace(t);
  moqe::MoELayer::RunOptions task1;
  task1.task_id = 1;
  full.run(moqe::MatrixView<const float>(x.data(), t, h),
           moqe::MatrixView<float>(y_full.data(), t, h), ws_full, task1);
  sub.run(moqe::MatrixView<const float>(x.data(), t, h),
          moqe::MatrixView<float>(y_sub.data(), t, h), ws_sub);
  const moqe::LayerStats a = full.stats(), b = sub.stats();
  std::printf("full layer: %lld experts, %lld parameters, %lld bytes\n",
              static_cast<long long>(a.experts), static_cast<long long>(a.parameters),
              static_cast<long long>(a.weight_bytes));
  std::printf("task 1:     %lld experts, %lld parameters, %lld bytes (%.1fx smaller)\n",
              static_cast<long long>(b.experts), static_cast<long long>(b.parameters),
              static_cast<long long>(b.weight_bytes),
              double(a.weight_bytes) / double(b.weight_bytes));
  std::printf("outputs identical: %s\n", y_full == y_sub ? "yes" : "NO");
  return y_full == y_sub && b.experts == k ? 0 : 1;
}
