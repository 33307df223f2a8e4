#include "commands.hpp"

#include <fmt/core.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moqe/core/error.hpp"
#include "moqe/io/checkpoint.hpp"
#include "moqe/io/convert.hpp"
#include "moqe/io/quantized_format.hpp"
#include "moqe/moe/loader.hpp"
#ifdef MOQE_CLI_WITH_CUDA
#include "moqe/cuda/moe.hpp"
#endif
#include "table.hpp"

namespace moqe::cli {
namespace {

// A one-line progress display on stderr, redrawn in place; silent when stderr is not a terminal
// (logs get the final table instead).
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled && isatty(STDERR_FILENO)) {}
  ~Progress() { clear(); }
  void operator()(const ConvertProgress& p) {
    if (!enabled_) return;
    std::string line = fmt::format("[{:>4}/{}] {}", p.index + (p.index < p.total), p.total, p.name);
    if (line.size() > 100) line = line.substr(0, 97) + "...";
    std::fprintf(stderr, "\r\033[K%s", line.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }
  void clear() {
    if (drawn_) std::fprintf(stderr, "\r\033[K");
    drawn_ = false;
  }

 private:
  bool enabled_;
  bool drawn_ = false;
};

std::string ratio(int64_t before, int64_t after) {
  return after > 0 ? fmt::format("{:.2f}x smaller", static_cast<double>(before) / after) : "-";
}

std::string sqnr_str(double db) { return std::isfinite(db) ? fmt::format("{:.2f}", db) : "inf"; }

void print_quantize_report(const ConvertReport& r, const std::filesystem::path& out) {
  Table t({"tensor", "shape", "in", "scheme", "G", "rel.err", "max.abs", "SQNR dB", "bits/w",
           "bytes in", "bytes out"},
          {false, false, false, false, true, true, true, true, true, true, true});
  int64_t copied = 0, copied_bytes = 0;
  for (const TensorReport& x : r.tensors) {
    if (!x.quantized) {
      if (!x.note.empty()) {
        t.add_row({x.name, shape_str(x.shape), x.input_dtype, x.note, "", "", "", "", "",
                   human_bytes(x.bytes_in), human_bytes(x.bytes_out)});
      }
      ++copied;
      copied_bytes += x.bytes_in;
      continue;
    }
    t.add_row({x.name, shape_str(x.shape), x.input_dtype,
               fmt::format("int{} {}", x.scheme.bits, to_string(x.scheme.mode)),
               x.group_size == x.shape.back() ? "channel" : std::to_string(x.group_size),
               fmt::format("{:.5f}", x.error.rel_frobenius), fmt::format("{:.4g}", x.error.max_abs),
               sqnr_str(x.error.sqnr_db), fmt::format("{:.3f}", x.bits_per_weight),
               human_bytes(x.bytes_in), human_bytes(x.bytes_out)});
  }
  std::fputs(t.render().c_str(), stdout);
  std::printf("quantized %lld tensors: %s -> %s (%s)\n", static_cast<long long>(r.quantized_count),
              human_bytes(r.quantized_bytes_in).c_str(), human_bytes(r.quantized_bytes_out).c_str(),
              ratio(r.quantized_bytes_in, r.quantized_bytes_out).c_str());
  std::printf("copied %lld tensors unchanged (%s)\n", static_cast<long long>(copied),
              human_bytes(copied_bytes).c_str());
  std::printf("total: %s -> %s (%s) in %.1f s; wrote %s\n", human_bytes(r.bytes_in).c_str(),
              human_bytes(r.bytes_out).c_str(), ratio(r.bytes_in, r.bytes_out).c_str(), r.seconds,
              out.string().c_str());
}

// Through a temporary file and a rename, like the checkpoint writer (and removed on a signal).
void write_text_atomically(const std::filesystem::path& path, const std::string& text) {
  write_file_atomically(path, std::as_bytes(std::span(text.data(), text.size())));
}

}  // namespace

void add_inspect(CLI::App& app, Action& action) {
  struct Opts {
    std::vector<std::string> files;
    bool raw = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("inspect", "List tensors, dtypes, shapes, bytes and schemes");
  cmd->add_option("FILE", o->files,
                  "safetensors file, model.safetensors.index.json, or checkpoint directory")
      ->required();
  cmd->add_flag("--raw", o->raw, "list the stored parts of quantized weights separately");
  cmd->callback([&action, o] {
    action = [o] {
      for (const std::string& path : o->files) {
        const Checkpoint ckpt(path);
        const auto& meta = ckpt.metadata();
        const auto fmt_it = meta.find(std::string(kFormatKey));
        Table t({"tensor", "dtype", "shape", "bytes", "scheme"},
                {false, false, false, true, false});
        int64_t total = 0;
        for (const std::string& name : ckpt.tensor_names()) {
          const TensorInfo& info = ckpt.info(name);
          total += static_cast<int64_t>(info.nbytes());
          if (!o->raw && is_companion_tensor(ckpt, name)) continue;
          t.add_row({name, std::string(dtype_name(info.dtype)), shape_str(info.shape),
                     std::to_string(info.nbytes()), ""});
        }
        if (!o->raw) {
          for (const std::string& name : quantized_weight_names(ckpt)) {
            const QuantizedMatrix q = load_quantized(ckpt, name);
            t.add_row(
                {name, "moqe", shape_str({q.rows(), q.cols()}), std::to_string(q.storage_bytes()),
                 fmt::format("{} ({:.3f} bits/w)", q.scheme().to_string(), q.bits_per_weight())});
          }
        }
        std::printf(
            "%s: %zu tensors, %s%s\n", path.c_str(), ckpt.size(), human_bytes(total).c_str(),
            fmt_it != meta.end() ? fmt::format(", moqe format {}", fmt_it->second).c_str() : "");
        std::fputs(t.render().c_str(), stdout);
        if (o->raw) {
          for (const std::string& name : quantized_weight_names(ckpt)) {
            const QuantizedMatrix q = load_quantized(ckpt, name);
            std::printf("quantized %s [%lld, %lld]: %s (%.3f bits/w)\n", name.c_str(),
                        static_cast<long long>(q.rows()), static_cast<long long>(q.cols()),
                        q.scheme().to_string().c_str(), q.bits_per_weight());
          }
        }
      }
      return 0;
    };
  });
}

void add_quantize(CLI::App& app, Action& action) {
  struct Opts {
    std::string input, output, mode = "sym", group = "default", scale = "f16", report;
    std::string include{default_include_regex()}, exclude;
    int bits = 0, threads = 0;
    double tau = 0.10;
    std::optional<double> budget;
    bool quiet = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("quantize", "Quantize the expert weights of a checkpoint");
  cmd->add_option("--input", o->input, "safetensors file, index json or checkpoint directory")
      ->required();
  cmd->add_option("--output", o->output, "output .safetensors file (written atomically)")
      ->required();
  cmd->add_option("--bits", o->bits, "bit width: 2, 3, 4 or 8")->required();
  cmd->add_option("--mode", o->mode, "sym | sym_full | asym")->capture_default_str();
  cmd->add_option("--group-size", o->group,
                  "G (a multiple of 32 dividing K), channel, adaptive, or default (128 where it "
                  "divides K, else channel)")
      ->capture_default_str();
  cmd->add_option("--scale-dtype", o->scale, "f16 | f32")->capture_default_str();
  cmd->add_option("--tau", o->tau, "adaptive: relative error slack over the finest group")
      ->capture_default_str();
  cmd->add_option("--error-budget", o->budget,
                  "adaptive: largest group with relative Frobenius error <= this");
  cmd->add_option("--include", o->include, "regex of tensor names to quantize")
      ->capture_default_str();
  cmd->add_option("--exclude", o->exclude, "regex of tensor names never to quantize");
  cmd->add_option("--report", o->report, "write a JSON report of every tensor to this file");
  cmd->add_option("--threads", o->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--quiet", o->quiet, "no progress display and no table");
  cmd->callback([&action, o] {
    action = [o] {
      ConvertOptions c;
      c.bits = o->bits;
      auto mode = parse_quant_mode(o->mode);
      MOQE_CHECK(mode.has_value(), "unknown --mode '{}'; supported: sym, sym_full, asym", o->mode);
      c.mode = *mode;
      auto scale = parse_scale_type(o->scale);
      MOQE_CHECK(scale.has_value(), "unknown --scale-dtype '{}'; supported: f16, f32", o->scale);
      c.scale_type = *scale;
      if (o->group == "default") {
        c.group_policy = GroupPolicy::kDefault;
      } else if (o->group == "channel") {
        c.group_policy = GroupPolicy::kPerChannel;
      } else if (o->group == "adaptive") {
        c.group_policy = GroupPolicy::kAdaptive;
      } else {
        c.group_policy = GroupPolicy::kFixed;
        size_t used = 0;
        long long g = 0;
        try {
          g = std::stoll(o->group, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        MOQE_CHECK(used == o->group.size() && g > 0 && g % kGroupQuantum == 0,
                   "invalid --group-size '{}': use a positive multiple of {}, channel, adaptive "
                   "or default",
                   o->group, kGroupQuantum);
        c.group_size = g;
      }
      MOQE_CHECK(o->bits == 2 || o->bits == 3 || o->bits == 4 || o->bits == 8,
                 "unsupported --bits {}; supported: 2, 3, 4, 8", o->bits);
      MOQE_CHECK(o->tau >= 0, "invalid --tau {}: must be >= 0", o->tau);
      c.adaptive.tau = o->tau;
      c.adaptive.error_budget = o->budget;
      MOQE_CHECK(!o->budget || *o->budget >= 0, "invalid --error-budget {}: must be >= 0",
                 o->budget.value_or(0));
      MOQE_CHECK(o->budget.has_value() <= (c.group_policy == GroupPolicy::kAdaptive),
                 "--error-budget applies only with --group-size adaptive");
      c.include_regex = o->include;
      c.exclude_regex = o->exclude;
      c.num_threads = o->threads;
      const Checkpoint input(o->input);
      Progress progress(!o->quiet);
      const ConvertReport r = quantize_checkpoint(
          input, o->output, c, [&progress](const ConvertProgress& p) { progress(p); });
      progress.clear();
      if (!o->report.empty()) write_text_atomically(o->report, report_to_json(r));
      if (!o->quiet) print_quantize_report(r, o->output);
      if (r.quantized_count == 0) {
        std::fprintf(stderr,
                     "moqe: warning: no tensor matched --include '%s'; the output is a copy\n",
                     o->include.c_str());
      }
      return 0;
    };
  });
}

void add_dequantize(CLI::App& app, Action& action) {
  struct Opts {
    std::string input, output;
    int threads = 0;
    bool quiet = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd =
      app.add_subcommand("dequantize", "Write the quantized weights of a checkpoint back as F32");
  cmd->add_option("--input", o->input, "moqe-quantized checkpoint")->required();
  cmd->add_option("--output", o->output, "output .safetensors file (written atomically)")
      ->required();
  cmd->add_option("--threads", o->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--quiet", o->quiet, "no progress display and no summary");
  cmd->callback([&action, o] {
    action = [o] {
      const Checkpoint input(o->input);
      Progress progress(!o->quiet);
      const ConvertReport r = dequantize_checkpoint(
          input, o->output, o->threads, [&progress](const ConvertProgress& p) { progress(p); });
      progress.clear();
      if (!o->quiet) {
        std::printf("dequantized %lld tensors to F32, copied %zu; %s -> %s in %.1f s; wrote %s\n",
                    static_cast<long long>(r.quantized_count),
                    r.tensors.size() - static_cast<size_t>(r.quantized_count),
                    human_bytes(r.bytes_in).c_str(), human_bytes(r.bytes_out).c_str(), r.seconds,
                    o->output.c_str());
      }
      return 0;
    };
  });
}

void add_moe_forward(CLI::App& app, Action& action) {
  struct Opts {
    std::string weights, prefix, family, config, input, output, device = "cpu";
    std::string switch_dropped = "passthrough", numerics = "exact";
    int threads = 0;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("moe-forward", "Run one MoE layer of a checkpoint on x");
  cmd->add_option("--weights", o->weights, "checkpoint file, index json or directory")->required();
  cmd->add_option("--prefix", o->prefix, "the layer's tensor prefix, e.g. model.layers.0.mlp")
      ->required();
  cmd->add_option("--family", o->family, supported_families())->required();
  cmd->add_option("--config", o->config, "config.json (default: beside the weights)");
  cmd->add_option("--input", o->input, "safetensors file with tensor x [T, H] (F32)")->required();
  cmd->add_option("--output", o->output, "safetensors file for y, topk_ids, topk_weights")
      ->required();
  cmd->add_option("--device", o->device, "cpu | cuda")->capture_default_str();
  cmd->add_option("--threads", o->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_option("--numerics", o->numerics,
                  "cpu, quantized experts: exact (fp32 activations) or fast (activations "
                  "quantized to int8 per 32-block; ~0.5% relative error, faster)")
      ->capture_default_str();
  cmd->add_option("--switch-dropped", o->switch_dropped,
                  "switch: a token over capacity outputs p_max * x (passthrough; transformers 4) "
                  "or 0 (zero; transformers 5)")
      ->capture_default_str();
  cmd->callback([&action, o] {
    action = [o] {
      MOQE_CHECK(o->switch_dropped == "passthrough" || o->switch_dropped == "zero",
                 "unknown --switch-dropped '{}'; use passthrough or zero", o->switch_dropped);
      auto family = parse_family(o->family);
      MOQE_CHECK(family.has_value(), "unknown --family '{}'; supported: {}", o->family,
                 supported_families());
      MOQE_CHECK(o->device == "cpu" || o->device == "cuda",
                 "unknown --device '{}'; use cpu or cuda", o->device);
      MOQE_CHECK(o->numerics == "exact" || o->numerics == "fast",
                 "unknown --numerics '{}'; use exact or fast", o->numerics);
      MOQE_CHECK(o->numerics == "exact" || o->device == "cpu",
                 "--numerics fast is a CPU option (the CUDA layer multiplies fp16/bf16 "
                 "activations); drop it for --device cuda");
#ifndef MOQE_CLI_WITH_CUDA
      MOQE_CHECK(o->device == "cpu",
                 "--device cuda: this moqe was built without its CUDA component; use --device cpu");
#endif
      const std::filesystem::path config =
          o->config.empty() ? default_config_path(o->weights) : std::filesystem::path(o->config);
      const MoeConfig mc = read_moe_config(config, *family);
      const Checkpoint weights(o->weights);
      const Checkpoint in(o->input);
      auto read_x = [&](int64_t hidden) {
        MOQE_CHECK(in.contains("x"), "{}: no tensor 'x' (expected F32 [tokens, {}])", o->input,
                   hidden);
        const TensorInfo& xi = in.info("x");
        MOQE_CHECK(xi.dtype == DType::kF32 && xi.shape.size() == 2 && xi.shape[1] == hidden,
                   "{}: tensor 'x' is {}, expected F32 [tokens, {}]", o->input, xi.describe(),
                   hidden);
        return std::make_pair(xi.shape[0], in.to_float("x"));
      };
      std::vector<float> y;
      Routing r;
      int64_t t = 0, h = 0;
      if (o->device == "cpu") {
        const MoELayer layer =
            load_moe_layer(weights, o->prefix, mc,
                           {true, o->threads, o->switch_dropped == "passthrough",
                            o->numerics == "fast" ? Numerics::kFast : Numerics::kExact});
        h = layer.hidden();
        const auto [tokens, x] = read_x(h);
        t = tokens;
        y.resize(static_cast<size_t>(t * h));
        MoELayer::Workspace ws = layer.make_workspace(t);
        layer.run(MatrixView<const float>(x.data(), t, h), MatrixView<float>(y.data(), t, h), ws,
                  {o->threads, {}, {}, 0, {}});
        r = ws.routing;
      } else {
#ifdef MOQE_CLI_WITH_CUDA
        MOQE_CHECK(cuda::device_count() > 0, "--device cuda: no CUDA device is available");
        cuda::DeviceLoadOptions dlo;
        dlo.switch_passthrough = o->switch_dropped == "passthrough";
        const cuda::MoELayer layer = [&] {
          try {
            return cuda::MoELayer::load(weights, o->prefix, mc, dlo);
          } catch (const Error& e) {
            MOQE_FAIL("--device cuda: {}", e.what());
          }
        }();
        h = layer.hidden();
        const auto [tokens, x] = read_x(h);
        t = tokens;
        y.resize(static_cast<size_t>(t * h));
        cuda::MoELayer::Workspace ws = layer.make_workspace(t);
        const size_t bytes = std::max<size_t>(y.size(), 1) * sizeof(float);
        cuda::DeviceBuffer dx(bytes), dy(bytes);
        if (t > 0) dx.upload(std::span<const float>(x));
        layer.run(dx.as<float>(), dy.as<float>(), t, ws);
        cuda::download(ws.routing, r);
        if (t > 0) dy.download(std::span<float>(y));
#endif
      }
      SafetensorsWriter w;
      w.add_values<float>("y", DType::kF32, {t, h}, y);
      w.add_values<int32_t>("topk_ids", DType::kI32, {t, r.slots}, r.ids);
      w.add_values<float>("topk_weights", DType::kF32, {t, r.slots}, r.weights);
      w.set_metadata("moqe.family", o->family);
      w.set_metadata("moqe.prefix", o->prefix);
      w.set_metadata("moqe.device", o->device);
      w.set_metadata("moqe.numerics", o->numerics);
      w.write(o->output);
      return 0;
    };
  });
}

}  // namespace moqe::cli
