// moqe: inspect, quantize and dequantize checkpoints, and run one MoE layer (docs/design.md).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <exception>
#include <new>

#include "commands.hpp"
#include "moqe/core/error.hpp"
#include "moqe/io/safetensors.hpp"

namespace {

// SIGINT, SIGTERM, SIGHUP: remove the temporary file of any write in progress (the previous
// output, if any, is untouched: it is only ever replaced by a rename), say so, and exit 128 + sig.
// Only async-signal-safe calls here.
extern "C" void on_terminating_signal(int sig) {
  moqe::remove_temporary_files();
  const char* msg = sig == SIGINT    ? "\nmoqe: interrupted (SIGINT); no output was written\n"
                    : sig == SIGTERM ? "moqe: terminated (SIGTERM); no output was written\n"
                                     : "moqe: hangup (SIGHUP); no output was written\n";
  size_t n = 0;
  while (msg[n] != '\0') ++n;
  (void)!::write(STDERR_FILENO, msg, n);
  ::_exit(128 + sig);
}

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_terminating_signal;
  sigfillset(&sa.sa_mask);  // one handler at a time
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
  // Past a file size limit (ulimit -f), write() then fails with EFBIG and the writer reports it
  // and cleans up, instead of the process dying mid-write.
  std::signal(SIGXFSZ, SIG_IGN);
}

}  // namespace

int main(int argc, char** argv) {
  install_signal_handlers();
  CLI::App app{
      "moqe: mixture-of-quantized-experts tools (inspect, quantize, dequantize, moe-forward, "
      "families)",
      "moqe"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moqe 0.1.0");
  moqe::cli::Action action;
  moqe::cli::add_inspect(app, action);
  moqe::cli::add_quantize(app, action);
  moqe::cli::add_dequantize(app, action);
  moqe::cli::add_moe_forward(app, action);
  moqe::cli::add_families(app, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  // Every failure ends here with one message and a non-zero status: never a crash, and the
  // writers have already removed any temporary file.
  try {
    return action();
  } catch (const moqe::Error& e) {
    std::fprintf(stderr, "moqe: error: %s\n", e.what());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "moqe: error: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moqe: error: %s\n", e.what());
  }
  return 1;
}
