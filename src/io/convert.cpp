#include "moqe/io/convert.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <regex>

#include "moqe/core/error.hpp"
#include "moqe/io/foreign.hpp"
#include "moqe/io/quantized_format.hpp"

namespace moqe {
namespace {

std::regex compile_regex(const std::string& pattern, std::string_view option) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    MOQE_FAIL("invalid {} regular expression '{}': {}", option, pattern, e.what());
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

QuantMode mode_of(const ConvertOptions& o) { return o.mode.value_or(default_mode(o.bits)); }
QuantMethod method_of(const ConvertOptions& o) { return o.method.value_or(default_method(o.bits)); }

// Group size for a K under a fixed policy; an error naming the tensor when it does not divide K.
QuantScheme scheme_for(const ConvertOptions& o, const std::string& name, int64_t k) {
  QuantScheme s{o.bits, mode_of(o), kPerChannel, o.scale_type};
  switch (o.group_policy) {
    case GroupPolicy::kDefault:
      s.group_size = (k % 128 == 0) ? 128 : kPerChannel;
      break;
    case GroupPolicy::kFixed:
      s.group_size = o.group_size;
      break;
    case GroupPolicy::kPerChannel:
    case GroupPolicy::kAdaptive:
      s.group_size = kPerChannel;
      break;
  }
  validate_scheme(s, k, fmt::format("tensor '{}' with K = {}", name, k));
  return s;
}

// The adaptive rule (quant/adaptive.hpp) for a fused expert tensor: e(G) over all its experts'
// weights together, so that one group size serves every expert.
int64_t choose_stack_group(const Checkpoint& input, const std::string& name,
                           const ExpertStack& stack, const QuantScheme& base,
                           const ConvertOptions& o) {
  std::vector<int64_t> sizes;
  int64_t k = 0;
  {
    const DenseWeight w0 = load_expert_f32(input, name, stack, 0);
    k = w0.cols;
    for (int64_t c : o.adaptive.candidates) {
      QuantScheme s = base;
      s.group_size = c;
      if (check_scheme(s, k).empty()) sizes.push_back(s.resolved_group_size(k));
    }
  }
  std::sort(sizes.begin(), sizes.end(), std::greater<>());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  MOQE_CHECK(!sizes.empty(), "tensor '{}': no candidate group size divides K = {}", name, k);
  std::vector<double> err2(sizes.size(), 0.0);
  double ref2 = 0;
  for (int64_t e = 0; e < stack.experts; ++e) {
    const DenseWeight w = load_expert_f32(input, name, stack, e);
    const MatrixView<const float> view(w.values.data(), w.rows, w.cols);
    check_finite(view, fmt::format("{} (expert {})", name, e), o.num_threads);
    double a2 = 0;
    for (const float v : w.values) a2 += double(v) * v;
    ref2 += a2;
    for (size_t i = 0; i < sizes.size(); ++i) {
      QuantScheme s = base;
      s.group_size = sizes[i] == k ? kPerChannel : sizes[i];
      const double rel = relative_error(view, s, o.num_threads, method_of(o));
      err2[i] += rel * rel * a2;
    }
  }
  auto rel = [&](size_t i) { return ref2 > 0 ? std::sqrt(err2[i] / ref2) : 0.0; };
  const double threshold = o.adaptive.error_budget ? *o.adaptive.error_budget
                                                   : (1.0 + o.adaptive.tau) * rel(sizes.size() - 1);
  int64_t chosen = sizes.back();
  for (size_t i = 0; i < sizes.size(); ++i) {  // largest G first
    if (rel(i) <= threshold) {
      chosen = sizes[i];
      break;
    }
  }
  return chosen == k ? kPerChannel : chosen;
}

void copy_metadata(const Checkpoint& input, SafetensorsWriter& writer, bool keep_moqe) {
  for (const auto& [key, value] : input.metadata()) {
    if (!keep_moqe && key.starts_with("moqe.")) continue;
    writer.set_metadata(key, value);
  }
}

}  // namespace

QuantMode default_mode(int bits) { return bits <= 3 ? QuantMode::kAsym : QuantMode::kSym; }

QuantMethod default_method(int bits) {
  return bits <= 3 ? QuantMethod::kSearch : QuantMethod::kRtn;
}

std::string_view default_include_regex() {
  return R"((^|\.)experts\.(\d+|expert_\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj|wi|wo)\.weight$)"
         R"(|(^|\.)experts\.(gate_up_proj|down_proj)$)"
         R"(|(^|\.)(block_sparse_moe|mlp)\.(input_linear|output_linear)\.weight$)"
         R"(|(^|\.)experts\.mlp\.(w1|v1|w2)$)";
}

ConvertReport quantize_checkpoint(const Checkpoint& input, const std::filesystem::path& output,
                                  const ConvertOptions& o, const ProgressFn& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::regex include = compile_regex(o.include_regex, "--include");
  const bool has_exclude = !o.exclude_regex.empty();
  const std::regex exclude =
      has_exclude ? compile_regex(o.exclude_regex, "--exclude") : std::regex();
  QuantScheme probe{o.bits, mode_of(o), kPerChannel, o.scale_type};
  validate_scheme(probe, 1, "quantize");  // bits and mode, before any work

  SafetensorsWriter writer;
  copy_metadata(input, writer, /*keep_moqe=*/true);
  ConvertReport report;
  auto wanted = [&](const std::string& name) {
    return std::regex_search(name, include) && !(has_exclude && std::regex_search(name, exclude));
  };
  // Fused expert tensors: 3-D ones, and DBRX's 2-D stacks, which only their names tell apart.
  static const std::regex dbrx_stack(R"((^|\.)experts\.mlp\.(w1|v1|w2)$)");
  auto stack_of = [&](const std::string& name) -> std::optional<ExpertStack> {
    const TensorInfo& t = input.info(name);
    if (!dtype_is_float(t.dtype)) return std::nullopt;
    const bool fused =
        t.shape.size() == 3 || (t.shape.size() == 2 && std::regex_search(name, dbrx_stack));
    if (!fused) return std::nullopt;
    std::optional<ExpertStack> s = o.expert_stack ? o.expert_stack(name, t.shape) : std::nullopt;
    MOQE_CHECK(s.has_value(),
               "{}: tensor '{}' {} holds several experts' weights in a layout that depends on "
               "the model family, and {} (put the model's config.json beside the weights, or "
               "--exclude the tensor)",
               input.path().string(), name, t.describe(),
               o.expert_stack ? "its family does not store experts this way"
                              : "no config.json names the family");
    return s;
  };
  // A 2-D float weight (fp8 block-scaled ones included) that is not part of a quantized weight,
  // or a fused expert tensor.
  auto quantizable = [&](const std::string& name) {
    const TensorInfo& t = input.info(name);
    if (is_companion_tensor(input, name) || !dtype_is_float(t.dtype)) return false;
    if (stack_of(name)) return true;
    return t.shape.size() == 2 && t.shape[1] > 0;
  };
  const std::vector<std::string> names = input.tensor_names();
  // Other tools' quantized weights (GPTQ, AWQ, compressed-tensors) are rewritten in moqe's
  // format as they are: their codes, scales and zero points, losslessly, whatever --bits says.
  for (const std::string& name : foreign_weight_names(input)) {
    const QuantizedMatrix q = load_quantized(input, name);
    TensorReport r;
    r.name = name;
    r.shape = {q.rows(), q.cols()};
    r.input_dtype = std::string(to_string(input.quantization().format));
    r.quantized = true;
    r.scheme = q.scheme();
    r.group_size = q.group_size();
    r.bytes_in = r.bytes_out = q.storage_bytes();
    r.bits_per_weight = q.bits_per_weight();
    r.kept = true;
    add_quantized(writer, name, q);
    report.quantized_count++;
    report.quantized_bytes_in += r.bytes_in;
    report.quantized_bytes_out += r.bytes_out;
    report.bytes_in += r.bytes_in;
    report.bytes_out += r.bytes_out;
    report.tensors.push_back(std::move(r));
  }
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    if (progress) progress({i, names.size(), name});
    if (is_foreign_part(input, name)) continue;  // rewritten above
    const TensorInfo& t = input.info(name);
    // The block scales of an fp8 weight that is quantized are folded into it.
    constexpr std::string_view kInv = "_scale_inv";
    if (name.ends_with(kInv) && is_companion_tensor(input, name)) {
      const std::string base = name.substr(0, name.size() - kInv.size());
      if (wanted(base) && quantizable(base)) continue;
    }
    TensorReport r;
    r.name = name;
    r.shape = t.shape;
    r.input_dtype = std::string(dtype_name(t.dtype));
    r.bytes_in = static_cast<int64_t>(t.nbytes());
    const bool quantize_it = wanted(name) && quantizable(name);
    if (wanted(name) && !quantize_it && !is_companion_tensor(input, name)) {
      r.note = t.shape.size() != 2 ? "not 2-D: copied" : "not a float matrix: copied";
    }
    const std::optional<ExpertStack> stack = quantize_it ? stack_of(name) : std::nullopt;
    if (stack) {
      MOQE_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kF16 || t.dtype == DType::kBF16,
                 "{}: fused expert tensor '{}' is {}; F32, F16 or BF16 expected",
                 input.path().string(), name, t.describe());
      std::vector<QuantizedMatrix> experts;
      double err2 = 0, ref2 = 0, max_abs = 0;
      // One scheme for all the experts of a fused tensor: the adaptive rule weighs every
      // expert's error together.
      QuantScheme scheme = scheme_for(o, name, load_expert_f32(input, name, *stack, 0).cols);
      if (o.group_policy == GroupPolicy::kAdaptive) {
        scheme.group_size = choose_stack_group(input, name, *stack, scheme, o);
        r.note = fmt::format("adaptive over the {} experts", stack->experts);
      }
      for (int64_t e = 0; e < stack->experts; ++e) {
        const DenseWeight w = load_expert_f32(input, name, *stack, e);
        const MatrixView<const float> view(w.values.data(), w.rows, w.cols);
        const std::string what = fmt::format("{} (expert {})", name, e);
        const QuantizeOptions qo{o.num_threads, what, method_of(o)};
        QuantizedMatrix q = quantize(view, scheme, qo);
        const ErrorStats es = quantization_error(view, q, o.num_threads);
        double n2 = 0;
        for (const float v : w.values) n2 += double(v) * v;
        ref2 += n2;
        err2 += es.rel_frobenius * es.rel_frobenius * n2;
        max_abs = std::max(max_abs, es.max_abs);
        experts.push_back(std::move(q));
      }
      r.quantized = true;
      r.method = method_of(o);
      r.scheme = experts[0].scheme();
      r.group_size = experts[0].group_size();
      r.error.rel_frobenius = ref2 > 0 ? std::sqrt(err2 / ref2) : 0;
      r.error.max_abs = max_abs;
      r.error.sqnr_db = err2 > 0 ? 10 * std::log10(ref2 / err2) : INFINITY;
      for (const QuantizedMatrix& q : experts) r.bytes_out += q.storage_bytes();
      r.bits_per_weight = 8.0 * static_cast<double>(r.bytes_out) / static_cast<double>(t.numel());
      r.note = fmt::format("{}{} experts{}", r.note.empty() ? "" : r.note + "; ", stack->experts,
                           stack->transposed ? ", transposed" : "");
      add_quantized_experts(writer, name, experts, *stack, t.shape);
      report.quantized_count++;
      report.quantized_bytes_in += r.bytes_in;
      report.quantized_bytes_out += r.bytes_out;
    } else if (quantize_it) {
      const DenseWeight w = load_weight_f32(input, name, o.num_threads);
      const MatrixView<const float> view(w.values.data(), w.rows, w.cols);
      const QuantizeOptions qo{o.num_threads, name, method_of(o)};
      QuantizedMatrix q;
      if (o.group_policy == GroupPolicy::kAdaptive) {
        AdaptiveResult a = quantize_adaptive(view, scheme_for(o, name, w.cols), o.adaptive, qo);
        if (!a.budget_met) {
          r.note = fmt::format("error budget {:.4g} not met; finest group kept", a.threshold);
        }
        q = std::move(a.matrix);
      } else {
        q = quantize(view, scheme_for(o, name, w.cols), qo);
      }
      r.quantized = true;
      r.method = method_of(o);
      r.scheme = q.scheme();
      r.group_size = q.group_size();
      r.error = quantization_error(view, q, o.num_threads);
      r.bytes_out = q.storage_bytes();
      r.bits_per_weight = q.bits_per_weight();
      add_quantized(writer, name, q);
      report.quantized_count++;
      report.quantized_bytes_in += r.bytes_in;
      report.quantized_bytes_out += r.bytes_out;
    } else {
      writer.add_view(name, t.dtype, t.shape, input.bytes(name));
      r.bytes_out = r.bytes_in;
    }
    report.bytes_in += r.bytes_in;
    report.bytes_out += r.bytes_out;
    report.tensors.push_back(std::move(r));
  }
  MOQE_CHECK(report.quantized_count > 0,
             "{}: no tensor matched --include '{}'{} (nothing to quantize; {} tensors in the "
             "input)",
             input.path().string(), o.include_regex,
             has_exclude ? fmt::format(" and not --exclude '{}'", o.exclude_regex) : std::string(),
             names.size());
  if (progress) progress({names.size(), names.size(), "writing " + output.string()});
  writer.write(output);
  report.seconds = seconds_since(t0);
  return report;
}

ConvertReport dequantize_checkpoint(const Checkpoint& input, const std::filesystem::path& output,
                                    int num_threads, const ProgressFn& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  SafetensorsWriter writer;
  copy_metadata(input, writer, /*keep_moqe=*/false);
  ConvertReport report;
  std::vector<std::string> names = input.tensor_names();
  for (const std::string& q : quantized_weight_names(input)) names.push_back(q);
  std::sort(names.begin(), names.end());
  // compressed-tensors' 8-bit weights keep the weight's own name.
  names.erase(std::unique(names.begin(), names.end()), names.end());
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    if (progress) progress({i, names.size(), name});
    TensorReport r;
    r.name = name;
    if (is_quantized(input, name)) {
      const StoredScheme s = stored_scheme(input, name);
      DenseTensor d = load_tensor_f32(input, name, num_threads);
      r.quantized = true;
      r.scheme = s.scheme;
      r.group_size = s.scheme.resolved_group_size(s.cols);
      r.shape = d.shape;
      for (const char* part : {".qweight", ".scales", ".zeros"}) {
        if (input.contains(name + part)) {
          r.bytes_in += static_cast<int64_t>(input.info(name + part).nbytes());
        }
      }
      r.bytes_out = static_cast<int64_t>(d.values.size()) * 4;
      r.input_dtype = "moqe";
      writer.add_values<float>(name, DType::kF32, r.shape, std::span<const float>(d.values));
      report.quantized_count++;
    } else if (is_companion_tensor(input, name) && !name.ends_with("_scale_inv")) {
      continue;  // folded into its weight above
    } else {
      const TensorInfo& t = input.info(name);
      r.shape = t.shape;
      r.input_dtype = std::string(dtype_name(t.dtype));
      r.bytes_in = r.bytes_out = static_cast<int64_t>(t.nbytes());
      writer.add_view(name, t.dtype, t.shape, input.bytes(name));
    }
    report.bytes_in += r.bytes_in;
    report.bytes_out += r.bytes_out;
    report.tensors.push_back(std::move(r));
  }
  if (progress) progress({names.size(), names.size(), "writing " + output.string()});
  writer.write(output);
  report.seconds = seconds_since(t0);
  return report;
}

std::string report_to_json(const ConvertReport& report) {
  nlohmann::json j;
  j["format"] = "moqe.report.1";
  j["seconds"] = report.seconds;
  j["bytes_in"] = report.bytes_in;
  j["bytes_out"] = report.bytes_out;
  j["quantized_tensors"] = report.quantized_count;
  j["quantized_bytes_in"] = report.quantized_bytes_in;
  j["quantized_bytes_out"] = report.quantized_bytes_out;
  nlohmann::json tensors = nlohmann::json::array();
  for (const TensorReport& r : report.tensors) {
    nlohmann::json t;
    t["name"] = r.name;
    t["shape"] = r.shape;
    t["input_dtype"] = r.input_dtype;
    t["quantized"] = r.quantized;
    t["bytes_in"] = r.bytes_in;
    t["bytes_out"] = r.bytes_out;
    if (r.quantized) {
      t["bits"] = r.scheme.bits;
      t["mode"] = std::string(to_string(r.scheme.mode));
      if (!r.kept) t["method"] = std::string(to_string(r.method));
      t["group_size"] = r.group_size;
      t["scale_dtype"] = std::string(to_string(r.scheme.scale_type));
      t["bits_per_weight"] = r.bits_per_weight;
      t["rel_frobenius"] = r.error.rel_frobenius;
      t["max_abs"] = r.error.max_abs;
      // JSON has no infinity: an exact reconstruction reports null.
      t["sqnr_db"] =
          std::isfinite(r.error.sqnr_db) ? nlohmann::json(r.error.sqnr_db) : nlohmann::json();
    }
    if (!r.note.empty()) t["note"] = r.note;
    if (r.kept) {
      t["kept"] = true;  // another tool's codes as stored: no error was measured
      t["rel_frobenius"] = t["max_abs"] = t["sqnr_db"] = nlohmann::json();
    }
    tensors.push_back(std::move(t));
  }
  j["tensors"] = std::move(tensors);
  return j.dump(2);
}

}  // namespace moqe
