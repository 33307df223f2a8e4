// The subcommands of the `moqe` tool. Each registers its options on the app and, when chosen,
// stores the action to run after parsing.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace moqe::cli {

using Action = std::function<int()>;

void add_inspect(CLI::App& app, Action& action);
void add_quantize(CLI::App& app, Action& action);
void add_dequantize(CLI::App& app, Action& action);
void add_moe_forward(CLI::App& app, Action& action);
void add_families(CLI::App& app, Action& action);

}  // namespace moqe::cli
