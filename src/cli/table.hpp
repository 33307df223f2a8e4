// Plain-text tables and human-readable sizes for the tool's output.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moqe::cli {

class Table {
 public:
  explicit Table(std::vector<std::string> header, std::vector<bool> right_align = {});
  void add_row(std::vector<std::string> row);
  void add_separator();
  std::string render() const;

 private:
  std::vector<std::string> header_;
  std::vector<bool> right_;
  std::vector<std::vector<std::string>> rows_;  // an empty row is a separator
};

// "1.50 MiB", "812 B".
std::string human_bytes(int64_t bytes);
// "[14336, 4096]"
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace moqe::cli
