// Running the `moqe` tool from tests as a user runs it: real files, real exit codes.
#pragma once

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "test_util.hpp"

namespace moqe::test {

struct Run {
  int status = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// env: "NAME=value ..." set for this run only.
inline Run moqe_cli(const TempDir& dir, const std::string& args, const std::string& env = "") {
  const auto out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string cmd = env + " " + std::string(MOQE_CLI_PATH) + " " + args + " >" +
                          out.string() + " 2>" + err.string() + " </dev/null";
  const int raw = std::system(cmd.c_str());
  Run r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  r.out = slurp(out);
  r.err = slurp(err);
  std::filesystem::remove(out);
  std::filesystem::remove(err);
  return r;
}

inline int count_lines(const std::string& s) {
  return static_cast<int>(std::count(s.begin(), s.end(), '\n'));
}

}  // namespace moqe::test
