// A consumer of moqe::mpi: a one-rank expert-parallel layer over MPI equals the plain layer.
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <moqe/dist/mpi.hpp>
#include <moqe/moqe.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  {
    auto comm = std::make_shared<moqe::MpiCommunicator>();
    moqe::RouterConfig rc_cfg;
    rc_cfg.kind = moqe::RouterKind::kMixtral;
    rc_cfg.num_experts = 4;
    rc_cfg.top_k = 2;
    const int64_t h = 32, i = 64;
    std::vector<float> gate(4 * h), w1(i * h), w2(h * i);
    for (size_t k = 0; k < gate.size(); ++k) gate[k] = 0.01f * static_cast<float>(k % 17) - 0.08f;
    for (size_t k = 0; k < w1.size(); ++k) w1[k] = 0.02f * static_cast<float>(k % 13) - 0.1f;
    for (size_t k = 0; k < w2.size(); ++k) w2[k] = 0.03f * static_cast<float>(k % 11) - 0.15f;
    std::vector<std::shared_ptr<const moqe::ExpertMLP>> experts;
    for (int e = 0; e < 4; ++e) {
      experts.push_back(std::make_shared<const moqe::ExpertMLP>(moqe::ExpertMLP::glu(
          moqe::QuantizedLinear::from_f32(w1, i, h), moqe::QuantizedLinear::from_f32(w1, i, h),
          moqe::QuantizedLinear::from_f32(w2, h, i), moqe::Activation::kSilu)));
    }
    const moqe::MoELayer layer(moqe::Router(rc_cfg, gate, h), experts);
    auto ep = moqe::ExpertParallelMoELayer::from_layer(
        layer, comm, moqe::ExpertPlacement::contiguous(4, comm->size()));
    std::vector<float> x(3 * h), y1(x.size()), y2(x.size());
    for (size_t k = 0; k < x.size(); ++k) x[k] = static_cast<float>(k % 7) - 3.0f;
    auto ws1 = layer.make_workspace(3);
    auto ws2 = ep.make_workspace(3);
    layer.run(moqe::MatrixView<const float>(x.data(), 3, h),
              moqe::MatrixView<float>(y1.data(), 3, h), ws1);
    ep.run(moqe::MatrixView<const float>(x.data(), 3, h), moqe::MatrixView<float>(y2.data(), 3, h),
           ws2);
    rc = std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0 ? 0 : 1;
    std::printf("moqe::mpi consumer: %s\n", rc == 0 ? "ok" : "outputs differ");
  }
  MPI_Finalize();
  return rc;
}
