#include "moqe/io/checkpoint.hpp"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <system_error>

#include "moqe/core/error.hpp"

namespace moqe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::string_view kIndexName = "model.safetensors.index.json";
constexpr std::string_view kSingleName = "model.safetensors";

bool is_index_path(const fs::path& p) { return p.extension() == ".json"; }

json read_json(const fs::path& p) {
  // Not a FIFO or device (reading one could block forever or never end), and bounded in size.
  std::error_code ec;
  MOQE_CHECK(fs::is_regular_file(p, ec), "{}: not a regular file", p.string());
  const uintmax_t size = fs::file_size(p, ec);
  MOQE_CHECK(!ec, "{}: cannot stat: {}", p.string(), ec.message());
  MOQE_CHECK(size <= Checkpoint::kMaxIndexBytes,
             "{}: index of {} bytes exceeds the limit of {} bytes", p.string(), size,
             Checkpoint::kMaxIndexBytes);
  std::ifstream in(p, std::ios::binary);
  MOQE_CHECK(in.is_open(), "{}: cannot open", p.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  MOQE_CHECK(!in.bad(), "{}: read error", p.string());
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    MOQE_FAIL("{}: not valid JSON: {}", p.string(), e.what());
  }
}

// Shard names come from a file the user may not control: keep them inside the index's directory.
void check_shard_name(const fs::path& index, const std::string& tensor, const std::string& shard) {
  MOQE_CHECK(!shard.empty(), "{}: weight_map entry of tensor '{}' is an empty file name",
             index.string(), tensor);
  // The system would silently open the name up to the NUL: another file than the one named.
  MOQE_CHECK(shard.find('\0') == std::string::npos,
             "{}: weight_map entry of tensor '{}' contains a NUL character", index.string(),
             tensor);
  const fs::path p(shard);
  MOQE_CHECK(!p.is_absolute() && !p.has_root_path(),
             "{}: weight_map places tensor '{}' in '{}', an absolute path (shards must be "
             "relative to the index's directory)",
             index.string(), tensor, shard);
  for (const fs::path& part : p) {
    MOQE_CHECK(part != "..",
               "{}: weight_map places tensor '{}' in '{}', which leaves the index's directory",
               index.string(), tensor, shard);
  }
}

}  // namespace

Checkpoint::Checkpoint(const std::filesystem::path& path) : path_(path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  MOQE_CHECK(fs::exists(st), "{}: no such file or directory", path.string());

  fs::path index;
  if (fs::is_directory(st)) {
    std::vector<fs::path> found;
    for (fs::directory_iterator it(path, ec), end; !ec && it != end; it.increment(ec)) {
      if (it->path().extension() == ".safetensors" && it->is_regular_file()) {
        found.push_back(it->path());
      }
    }
    MOQE_CHECK(!ec, "{}: cannot list directory: {}", path.string(), ec.message());
    std::sort(found.begin(), found.end());
    if (fs::exists(path / kIndexName, ec)) {
      index = path / kIndexName;
    } else {
      std::string names;
      for (const fs::path& f : found) {
        if (!names.empty()) names.append(", ");
        names.append(f.filename().string());
      }
      MOQE_CHECK(fs::exists(path / kSingleName, ec),
                 "{}: no {} or {} in the directory{}{}; name the file to read", path.string(),
                 kSingleName, kIndexName, found.empty() ? "" : "; it holds ", names);
      add_file(path / kSingleName);
      for (const fs::path& f : found) {
        if (f.filename() != kSingleName) ignored_.push_back(f);
      }
      return;
    }
    // Shards are added below; what the index does not name is ignored.
    ignored_ = std::move(found);
  } else if (is_index_path(path)) {
    index = path;
  } else {
    add_file(path);
    return;
  }

  const json doc = read_json(index);
  const std::string where = index.string();
  MOQE_CHECK(doc.is_object(), "{}: an index must be a JSON object", where);
  const auto wm = doc.find("weight_map");
  MOQE_CHECK(wm != doc.end() && wm->is_object(), "{}: missing \"weight_map\" object", where);
  MOQE_CHECK(!wm->empty(), "{}: \"weight_map\" is empty", where);

  // Each shard is opened once, in name order, so files() is deterministic.
  std::set<std::string> shards;
  for (const auto& [tensor, shard] : wm->items()) {
    MOQE_CHECK(shard.is_string(), "{}: weight_map entry of tensor '{}' is a JSON {}, not a string",
               where, tensor, shard.type_name());
    check_shard_name(index, tensor, shard.get_ref<const std::string&>());
    shards.insert(shard.get<std::string>());
  }
  const fs::path dir = index.parent_path();
  std::map<std::string, size_t, std::less<>> shard_file;
  for (const std::string& shard : shards) {
    const fs::path file = dir / shard;
    MOQE_CHECK(fs::exists(file, ec), "{}: shard '{}' is missing ({} does not exist)", where, shard,
               file.string());
    try {
      add_file(file);
    } catch (const Error& e) {
      MOQE_FAIL("{}: shard '{}': {}", where, shard, e.what());
    }
    shard_file.emplace(shard, files_.size() - 1);
  }
  std::erase_if(ignored_, [&](const fs::path& f) {
    for (const auto& file : files_) {
      if (fs::equivalent(file->path(), f, ec)) return true;
    }
    return false;
  });
  for (const auto& [tensor, shard] : wm->items()) {
    const SafetensorsFile& f =
        *files_[shard_file.find(shard.get_ref<const std::string&>())->second];
    // add_file already rejected a name in two shards, so holding it means where_ points here.
    MOQE_CHECK(f.contains(tensor),
               "{}: weight_map places tensor '{}' in shard '{}', but {} does not contain it", where,
               tensor, shard.get_ref<const std::string&>(), f.path().string());
  }
}

void Checkpoint::add_file(const std::filesystem::path& file) {
  files_.push_back(std::make_unique<SafetensorsFile>(file));
  const size_t k = files_.size() - 1;
  const SafetensorsFile& f = *files_[k];
  for (const TensorInfo& t : f.tensors()) {
    const auto [it, inserted] = where_.emplace(t.name, k);
    MOQE_CHECK(inserted, "tensor '{}' is present in both {} and {}", t.name,
               files_[it->second]->path().string(), f.path().string());
  }
  // The first file's value wins: quantized shards all repeat the same format keys.
  for (const auto& [key, value] : f.metadata()) metadata_.emplace(key, value);
}

const QuantizationConfig& Checkpoint::quantization() const {
  LazyQuantization& l = *quantization_;
  std::call_once(l.once, [&] {
    std::error_code ec;
    const fs::path dir = fs::is_directory(path_, ec) ? path_ : path_.parent_path();
    const fs::path config = dir / "config.json";
    l.config = fs::exists(config, ec) ? read_quantization_config(config) : QuantizationConfig{};
  });
  return *l.config;
}

void Checkpoint::set_quantization(QuantizationConfig q) {
  std::call_once(quantization_->once, [] {});
  quantization_->config = std::move(q);
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> names;
  names.reserve(where_.size());
  for (const auto& [name, file] : where_) names.push_back(name);
  return names;
}

bool Checkpoint::contains(std::string_view name) const { return where_.contains(name); }

const SafetensorsFile& Checkpoint::file_of(std::string_view name) const {
  const auto it = where_.find(name);
  MOQE_CHECK(it != where_.end(), "{}: no tensor named '{}'", path_.string(), name);
  return *files_[it->second];
}

}  // namespace moqe
