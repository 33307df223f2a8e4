#include "moqe/core/error.hpp"

namespace moqe::detail {

void throw_error(std::string message) { throw Error(std::move(message)); }

}  // namespace moqe::detail
