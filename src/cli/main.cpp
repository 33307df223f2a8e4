// moqe: inspect, quantize and dequantize checkpoints, and run one MoE layer (DESIGN.md section 5).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <new>

#include "commands.hpp"
#include "moqe/core/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{
      "moqe: mixture-of-quantized-experts tools (inspect, quantize, dequantize, moe-forward)",
      "moqe"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moqe 0.1.0");
  moqe::cli::Action action;
  moqe::cli::add_inspect(app, action);
  moqe::cli::add_quantize(app, action);
  moqe::cli::add_dequantize(app, action);
  moqe::cli::add_moe_forward(app, action);
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
