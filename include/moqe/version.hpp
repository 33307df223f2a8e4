// moqe's version.
#pragma once

#define MOQE_VERSION_MAJOR 0
#define MOQE_VERSION_MINOR 1
#define MOQE_VERSION_PATCH 0

namespace moqe {
inline constexpr const char* kVersion = "0.1.0";
}  // namespace moqe
