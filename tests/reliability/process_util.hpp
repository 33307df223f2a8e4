// Child processes for the reliability tests: the moqe tool started with fork + exec (so that a
// test can set limits in the child, signal it mid-run, or run two at once), and its outcome.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>

namespace moqe::test {

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

struct Outcome {
  bool exited = false;  // by exit() rather than by a signal
  int code = -1;        // exit status, or the signal that ended it
  std::string err;      // stderr
};

// The moqe tool running as a child process, with stdout and stderr in files beside `log`.
class CliProcess {
 public:
  // `limit_file_size`: RLIMIT_FSIZE for the child, in bytes (its SIGXFSZ disposition is left as
  // inherited: the tool itself must cope).
  CliProcess(const std::vector<std::string>& args, const std::filesystem::path& log,
             std::optional<rlim_t> limit_file_size = std::nullopt)
      : out_(log.string() + ".out"), err_(log.string() + ".err") {
    std::vector<std::string> argv_s{MOQE_CLI_PATH};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int out_fd = ::open(out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const int err_fd = ::open(err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    pid_ = ::fork();
    if (pid_ == 0) {  // only async-signal-safe calls until exec
      ::dup2(out_fd, STDOUT_FILENO);
      ::dup2(err_fd, STDERR_FILENO);
      const int null_fd = ::open("/dev/null", O_RDONLY);
      ::dup2(null_fd, STDIN_FILENO);
      // The test runner may block or ignore signals; the tool must start with the defaults.
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      for (int sig : {SIGINT, SIGTERM, SIGXFSZ}) ::signal(sig, SIG_DFL);
      if (limit_file_size) {
        struct rlimit r {};
        r.rlim_cur = r.rlim_max = *limit_file_size;
        ::setrlimit(RLIMIT_FSIZE, &r);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(out_fd);
    ::close(err_fd);
  }
  ~CliProcess() {
    if (pid_ > 0 && !waited_) {
      ::kill(pid_, SIGKILL);
      wait();
    }
  }
  CliProcess(const CliProcess&) = delete;
  CliProcess& operator=(const CliProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool running() {
    if (waited_) return false;
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      waited_ = true;
      status_ = status;
      return false;
    }
    return true;
  }
  void signal(int sig) const { ::kill(pid_, sig); }
  Outcome wait() {
    if (!waited_) {
      while (::waitpid(pid_, &status_, 0) < 0 && errno == EINTR) {
      }
      waited_ = true;
    }
    // A child ended by a signal or _exit (the tool's handlers) skips libomp's cleanup of its
    // registration file (Clang builds): remove it so that test runs leave /dev/shm as it was.
    std::error_code ec;
    std::filesystem::remove(fmt::format("/dev/shm/__KMP_REGISTERED_LIB_{}_{}", pid_, ::getuid()),
                            ec);
    Outcome o;
    o.exited = WIFEXITED(status_);
    o.code = o.exited ? WEXITSTATUS(status_) : WTERMSIG(status_);
    o.err = read_text(err_);
    return o;
  }
  std::string out() const { return read_text(out_); }

 private:
  std::filesystem::path out_, err_;
  pid_t pid_ = -1;
  int status_ = 0;
  bool waited_ = false;
};

// Polls `pred` every millisecond until it holds or `timeout` passes.
template <class Pred>
bool wait_until(Pred pred, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return pred();
}

}  // namespace moqe::test
