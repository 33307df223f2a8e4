#include "commands.hpp"

#include <fmt/core.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "moqe/core/dtypes.hpp"
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
  int64_t copied = 0, copied_bytes = 0, kept = 0;
  std::string kept_from;
  for (const TensorReport& x : r.tensors) {
    if (x.kept) kept_from = x.input_dtype;
    if (!x.quantized) {
      if (!x.note.empty()) {
        t.add_row({x.name, shape_str(x.shape), x.input_dtype, x.note, "", "", "", "", "",
                   human_bytes(x.bytes_in), human_bytes(x.bytes_out)});
      }
      ++copied;
      copied_bytes += x.bytes_in;
      continue;
    }
    kept += x.kept ? 1 : 0;
    t.add_row({x.name, shape_str(x.shape), x.input_dtype,
               fmt::format("int{} {}", x.scheme.bits, to_string(x.scheme.mode)),
               x.group_size == x.shape.back() ? "channel" : std::to_string(x.group_size),
               x.kept ? "kept" : fmt::format("{:.5f}", x.error.rel_frobenius),
               x.kept ? "-" : fmt::format("{:.4g}", x.error.max_abs),
               x.kept ? "-" : sqnr_str(x.error.sqnr_db), fmt::format("{:.3f}", x.bits_per_weight),
               human_bytes(x.bytes_in), human_bytes(x.bytes_out)});
  }
  std::fputs(t.render().c_str(), stdout);
  std::printf("quantized %lld tensors: %s -> %s (%s)\n", static_cast<long long>(r.quantized_count),
              human_bytes(r.quantized_bytes_in).c_str(), human_bytes(r.quantized_bytes_out).c_str(),
              ratio(r.quantized_bytes_in, r.quantized_bytes_out).c_str());
  if (kept > 0) {
    std::printf(
        "of which %lld already quantized by %s: kept as stored (lossless; the quantization "
        "options apply to the others)\n",
        static_cast<long long>(kept), kept_from.c_str());
  }
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

namespace {

// The checkpoint's config.json and the family it names: --family auto (the default) detects it;
// a named family must agree with model_type unless --family-override.
MoeConfig config_for(const std::string& weights, const std::string& config_arg,
                     const std::string& family, bool override) {
  const std::filesystem::path config =
      config_arg.empty() ? default_config_path(weights) : std::filesystem::path(config_arg);
  if (family == "auto") {
    MOQE_CHECK(!override, "--family-override needs a --family to use instead of model_type");
    return read_moe_config(config);
  }
  const auto f = parse_family(family);
  MOQE_CHECK(f.has_value(), "unknown --family '{}'; supported: auto, {}", family,
             supported_families());
  return read_moe_config(config, *f, override);
}

void warn_ignored(const Checkpoint& ckpt) {
  if (ckpt.ignored().empty()) return;
  std::string names;
  for (const auto& f : ckpt.ignored()) {
    if (!names.empty()) names.append(", ");
    names.append(f.filename().string());
  }
  std::fprintf(stderr, "moqe: warning: %s: not part of the checkpoint, ignored: %s\n",
               ckpt.path().string().c_str(), names.c_str());
}

// The output must not replace an input (a file of the checkpoint, x, the config), and its
// directory must take a new file: both are checked before the layer is loaded or run.
void check_output(const std::filesystem::path& out, const std::vector<std::filesystem::path>& in,
                  const Checkpoint* checkpoint = nullptr) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> files = in;
  if (checkpoint != nullptr) {
    for (const auto& f : checkpoint->files()) files.push_back(f->path());
  }
  for (const fs::path& p : files) {
    if (fs::exists(out, ec) && fs::exists(p, ec) && fs::equivalent(out, p, ec)) {
      MOQE_FAIL("--output {} is also an input ({}); write the result elsewhere", out.string(),
                p.string());
    }
  }
  MOQE_CHECK(!fs::is_directory(out, ec), "--output {} is a directory; name a file", out.string());
  const fs::path dir = out.has_parent_path() ? out.parent_path() : fs::path(".");
  MOQE_CHECK(fs::is_directory(dir, ec), "--output {}: directory {} does not exist", out.string(),
             dir.string());
  MOQE_CHECK(::access(dir.c_str(), W_OK | X_OK) == 0,
             "--output {}: cannot write into directory {} ({})", out.string(), dir.string(),
             std::strerror(errno));
}

std::optional<DType> parse_output_dtype(const std::string& s) {
  if (s == "f32" || s == "F32") return DType::kF32;
  if (s == "f16" || s == "F16") return DType::kF16;
  if (s == "bf16" || s == "BF16") return DType::kBF16;
  return std::nullopt;
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
        std::string format;
        if (fmt_it != meta.end()) format = fmt::format(", moqe format {}", fmt_it->second);
        const QuantizationConfig& qc = ckpt.quantization();
        if (qc.format != ForeignFormat::kNone) {
          format += fmt::format(", {} weights ({})", to_string(qc.format), qc.source.string());
        } else if (!qc.method.empty()) {
          format += fmt::format(", quant_method '{}' (not read by moqe)", qc.method);
        }
        std::printf("%s: %zu tensors, %s%s\n", path.c_str(), ckpt.size(),
                    human_bytes(total).c_str(), format.c_str());
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
    std::string input, output, mode = "auto", method = "auto", group = "default", scale = "f16",
                               report;
    std::string config, family = "auto";
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
  cmd->add_option("--mode", o->mode,
                  "sym | sym_full | asym, or auto: asym at 2 and 3 bits, sym at 4 and 8")
      ->capture_default_str();
  cmd->add_option("--method", o->method,
                  "how scales and zero points are chosen: rtn (round to nearest), search "
                  "(clipping search + least squares), hqq, or auto: search at 2 and 3 bits, rtn "
                  "at 4 and 8")
      ->capture_default_str();
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
  cmd->add_option("--config", o->config,
                  "config.json naming the model family (default: beside the input, if there); "
                  "needed for fused expert tensors");
  cmd->add_option("--family", o->family, "auto (from config.json) or a family name")
      ->capture_default_str();
  cmd->add_option("--threads", o->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--quiet", o->quiet, "no progress display and no table");
  cmd->callback([&action, o] {
    action = [o] {
      ConvertOptions c;
      c.bits = o->bits;
      if (o->mode != "auto") {
        c.mode = parse_quant_mode(o->mode);
        MOQE_CHECK(c.mode.has_value(), "unknown --mode '{}'; supported: auto, sym, sym_full, asym",
                   o->mode);
      }
      if (o->method != "auto") {
        c.method = parse_quant_method(o->method);
        MOQE_CHECK(c.method.has_value(), "unknown --method '{}'; supported: auto, rtn, search, hqq",
                   o->method);
      }
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
      // The family (from config.json, when there is one) says how fused expert tensors hold
      // their experts.
      const std::filesystem::path config =
          o->config.empty() ? default_config_path(o->input) : std::filesystem::path(o->config);
      std::optional<MoeConfig> family;
      if (!o->config.empty() || std::filesystem::exists(config)) {
        family = config_for(o->input, config.string(), o->family, false);
        c.expert_stack = [mc = *family](std::string_view name, std::span<const int64_t> shape) {
          return expert_stack(mc, name, shape);
        };
      } else {
        MOQE_CHECK(o->family == "auto", "--family {}: no config.json beside {} (pass --config)",
                   o->family, o->input);
      }
      Checkpoint input(o->input);
      // Other tools' quantized weights are read through the config's quantization_config.
      if (!o->config.empty()) input.set_quantization(read_quantization_config(o->config));
      check_output(o->output, {config}, &input);
      warn_ignored(input);
      Progress progress(!o->quiet);
      const ConvertReport r = quantize_checkpoint(
          input, o->output, c, [&progress](const ConvertProgress& p) { progress(p); });
      progress.clear();
      if (!o->report.empty()) write_text_atomically(o->report, report_to_json(r));
      // A weight error this large is more noise than signal in the layer's output: say so.
      const TensorReport* worst = nullptr;
      int64_t noisy = 0;
      for (const TensorReport& x : r.tensors) {
        if (!x.quantized || x.kept || x.error.rel_frobenius < 0.5) continue;
        ++noisy;
        if (worst == nullptr || x.error.rel_frobenius > worst->error.rel_frobenius) worst = &x;
      }
      if (worst != nullptr) {
        std::fprintf(stderr,
                     "moqe: warning: %lld quantized tensor(s) have a relative error of 0.5 or "
                     "more (largest %.3f, '%s', %s): their layers' outputs will be mostly noise; "
                     "use more bits or smaller groups\n",
                     static_cast<long long>(noisy), worst->error.rel_frobenius, worst->name.c_str(),
                     worst->scheme.to_string().c_str());
      }
      if (!o->quiet) {
        const QuantMode mode = c.mode.value_or(default_mode(c.bits));
        const QuantMethod method = c.method.value_or(default_method(c.bits));
        std::printf("%d bits, mode %s%s, method %s%s\n", c.bits,
                    std::string(to_string(mode)).c_str(), c.mode ? "" : " (default)",
                    std::string(to_string(method)).c_str(), c.method ? "" : " (default)");
        if (family) {
          std::printf("family %s (from %s)\n", std::string(to_string(family->family)).c_str(),
                      config.string().c_str());
        }
        print_quantize_report(r, o->output);
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
      check_output(o->output, {}, &input);
      warn_ignored(input);
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
    std::string weights, prefix, family = "auto", config, input, output, device = "cpu";
    std::string switch_dropped = "zero", numerics = "exact", output_dtype = "same";
    int threads = 0;
    int64_t chunk = 1024;
    bool override_family = false, allow_unused = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("moe-forward", "Run one MoE layer of a checkpoint on x");
  cmd->add_option("--weights", o->weights,
                  "checkpoint: a .safetensors file, an index json, or a directory holding "
                  "model.safetensors or model.safetensors.index.json")
      ->required();
  cmd->add_option("--prefix", o->prefix,
                  "the layer's tensor prefix, e.g. model.layers.0.mlp (docs/families.md lists "
                  "each family's)")
      ->required();
  cmd->add_option("--family", o->family,
                  "auto (from config.json's model_type) or one of: " + supported_families())
      ->capture_default_str();
  cmd->add_flag("--family-override", o->override_family,
                "run --family even though config.json's model_type names another family "
                "(custom models)");
  cmd->add_option("--config", o->config, "config.json (default: beside the weights)");
  cmd->add_option("--input", o->input, "safetensors file with tensor x [T, H] (F32, F16 or BF16)")
      ->required();
  cmd->add_option("--output", o->output, "safetensors file for y, topk_ids, topk_weights")
      ->required();
  cmd->add_option("--output-dtype", o->output_dtype, "y's dtype: same (as x), f32, f16 or bf16")
      ->capture_default_str();
  cmd->add_option("--device", o->device, "cpu | cuda")->capture_default_str();
  cmd->add_option("--threads", o->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_option("--chunk-tokens", o->chunk,
                  "tokens per step on the CPU (bounds the workspace; routers with capacity limits "
                  "take all tokens at once)")
      ->capture_default_str();
  cmd->add_option("--numerics", o->numerics,
                  "cpu, quantized experts: exact (fp32 activations) or fast (activations "
                  "quantized to int8 per 32-block; ~0.5% relative error, faster)")
      ->capture_default_str();
  cmd->add_option("--switch-dropped", o->switch_dropped,
                  "switch_transformers: a token over capacity outputs 0 (zero; transformers 5) or "
                  "p_max * x (passthrough; transformers 4)")
      ->capture_default_str();
  cmd->add_flag("--allow-unused-tensors", o->allow_unused,
                "run even when tensors under the prefix are not part of the family's layer");
  cmd->callback([&action, o] {
    action = [o] {
      MOQE_CHECK(o->switch_dropped == "passthrough" || o->switch_dropped == "zero",
                 "unknown --switch-dropped '{}'; use zero or passthrough", o->switch_dropped);
      MOQE_CHECK(o->device == "cpu" || o->device == "cuda",
                 "unknown --device '{}'; use cpu or cuda", o->device);
      MOQE_CHECK(o->numerics == "exact" || o->numerics == "fast",
                 "unknown --numerics '{}'; use exact or fast", o->numerics);
      MOQE_CHECK(o->numerics == "exact" || o->device == "cpu",
                 "--numerics fast is a CPU option (the CUDA layer multiplies fp16/bf16 "
                 "activations); drop it for --device cuda");
      MOQE_CHECK(o->output_dtype == "same" || parse_output_dtype(o->output_dtype).has_value(),
                 "unknown --output-dtype '{}'; use same, f32, f16 or bf16", o->output_dtype);
      MOQE_CHECK(o->chunk > 0, "--chunk-tokens {} must be positive", o->chunk);
#ifndef MOQE_CLI_WITH_CUDA
      MOQE_CHECK(o->device == "cpu",
                 "--device cuda: this moqe was built without its CUDA component; use --device cpu");
#endif
      Checkpoint weights(o->weights);
      if (!o->config.empty()) weights.set_quantization(read_quantization_config(o->config));
      check_output(o->output,
                   {o->input, o->config.empty() ? default_config_path(o->weights)
                                                : std::filesystem::path(o->config)},
                   &weights);
      const MoeConfig mc = config_for(o->weights, o->config, o->family, o->override_family);
      warn_ignored(weights);
      const Checkpoint in(o->input);
      MOQE_CHECK(in.contains("x"),
                 "{}: no tensor 'x' (expected [tokens, hidden] of F32, F16 or BF16)", o->input);
      const TensorInfo& xi = in.info("x");
      MOQE_CHECK((xi.dtype == DType::kF32 || xi.dtype == DType::kF16 || xi.dtype == DType::kBF16) &&
                     xi.shape.size() == 2,
                 "{}: tensor 'x' is {}, expected F32, F16 or BF16 [tokens, hidden]", o->input,
                 xi.describe());
      const DType out_dtype =
          o->output_dtype == "same" ? xi.dtype : *parse_output_dtype(o->output_dtype);
      const int64_t t = xi.shape[0];
      int64_t h = 0;
      const std::byte* x_bytes = in.bytes("x").data();
      auto check_hidden = [&](int64_t hidden) {
        h = hidden;
        MOQE_CHECK(xi.shape[1] == h, "{}: tensor 'x' is {}, but the layer's hidden size is {}",
                   o->input, xi.describe(), h);
      };
      // Rows [t0, t0 + n) of x as fp32.
      auto x_rows = [&](int64_t t0, int64_t n, std::vector<float>& out) {
        out.resize(static_cast<size_t>(n * h));
        to_float(xi.dtype, x_bytes + static_cast<size_t>(t0 * h) * dtype_size(xi.dtype), out.size(),
                 out.data());
      };
      std::vector<std::byte> y;
      auto store_y = [&](int64_t t0, std::span<const float> v) {
        std::byte* dst = y.data() + static_cast<size_t>(t0 * h) * dtype_size(out_dtype);
        for (size_t i = 0; i < v.size(); ++i) {
          if (out_dtype == DType::kF32) {
            std::memcpy(dst + 4 * i, &v[i], 4);
          } else {
            const uint16_t b =
                out_dtype == DType::kF16 ? float_to_half_bits(v[i]) : float_to_bf16_bits(v[i]);
            std::memcpy(dst + 2 * i, &b, 2);
          }
        }
      };
      std::vector<int32_t> ids;
      std::vector<float> weights_out;
      int64_t slots = 0;
      if (o->device == "cpu") {
        LoadOptions lo;
        lo.num_threads = o->threads;
        lo.switch_passthrough = o->switch_dropped == "passthrough";
        lo.numerics = o->numerics == "fast" ? Numerics::kFast : Numerics::kExact;
        lo.allow_unused_tensors = o->allow_unused;
        const MoELayer layer = load_moe_layer(weights, o->prefix, mc, lo);
        check_hidden(layer.hidden());
        y.resize(static_cast<size_t>(t * h) * dtype_size(out_dtype));
        const RouterConfig& rc = layer.router().config();
        // Capacity is counted over the whole input (one sequence): such routers see it at once.
        const bool whole = (rc.kind == RouterKind::kSwitch && rc.expert_capacity > 0) ||
                           rc.capacity_factor > 0 || rc.kind == RouterKind::kExpertChoice;
        const int64_t all = std::max<int64_t>(t, 1);
        const int64_t chunk = whole ? all : std::min(o->chunk, all);
        slots = layer.router().slots_per_token();
        ids.resize(static_cast<size_t>(t * slots));
        weights_out.resize(ids.size());
        MoELayer::Workspace ws = layer.make_workspace(chunk);
        std::vector<float> xc, yc;
        for (int64_t t0 = 0; t0 < t; t0 += chunk) {
          const int64_t n = std::min(chunk, t - t0);
          x_rows(t0, n, xc);
          yc.resize(xc.size());
          layer.run(MatrixView<const float>(xc.data(), n, h), MatrixView<float>(yc.data(), n, h),
                    ws, {o->threads, {}, {}, 0, {}});
          store_y(t0, yc);
          std::copy_n(ws.routing.ids.begin(), n * slots, ids.begin() + t0 * slots);
          std::copy_n(ws.routing.weights.begin(), n * slots, weights_out.begin() + t0 * slots);
        }
      } else {
#ifdef MOQE_CLI_WITH_CUDA
        MOQE_CHECK(cuda::device_count() > 0, "--device cuda: no CUDA device is available");
        cuda::DeviceLoadOptions dlo;
        dlo.switch_passthrough = o->switch_dropped == "passthrough";
        dlo.allow_unused_tensors = o->allow_unused;
        const cuda::MoELayer layer = [&] {
          try {
            return cuda::MoELayer::load(weights, o->prefix, mc, dlo);
          } catch (const Error& e) {
            MOQE_FAIL("--device cuda: {}", e.what());
          }
        }();
        check_hidden(layer.hidden());
        y.resize(static_cast<size_t>(t * h) * dtype_size(out_dtype));
        std::vector<float> x;
        x_rows(0, t, x);
        std::vector<float> yf(x.size());
        cuda::MoELayer::Workspace ws = layer.make_workspace(t);
        const size_t bytes = std::max<size_t>(yf.size(), 1) * sizeof(float);
        cuda::DeviceBuffer dx(bytes), dy(bytes);
        if (t > 0) dx.upload(std::span<const float>(x));
        layer.run(dx.as<float>(), dy.as<float>(), t, ws);
        Routing r;
        cuda::download(ws.routing, r);
        if (t > 0) dy.download(std::span<float>(yf));
        store_y(0, yf);
        slots = r.slots;
        ids = r.ids;
        weights_out = r.weights;
#endif
      }
      SafetensorsWriter w;
      w.add(std::string("y"), out_dtype, {t, h}, std::move(y));
      w.add_values<int32_t>("topk_ids", DType::kI32, {t, slots}, ids);
      w.add_values<float>("topk_weights", DType::kF32, {t, slots}, weights_out);
      w.set_metadata("moqe.family", std::string(to_string(mc.family)));
      w.set_metadata("moqe.prefix", o->prefix);
      w.set_metadata("moqe.device", o->device);
      w.set_metadata("moqe.numerics", o->numerics);
      w.write(o->output);
      return 0;
    };
  });
}

void add_families(CLI::App& app, Action& action) {
  CLI::App* cmd = app.add_subcommand(
      "families", "List the MoE families moqe loads (the table of docs/families.md)");
  cmd->callback([&action] {
    action = [] {
      std::fputs(families_markdown().c_str(), stdout);
      return 0;
    };
  });
}

}  // namespace moqe::cli
