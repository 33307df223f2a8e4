// The umbrella header compiles on its own and pulls in no CUDA header.
#include <moqe/moqe.hpp>

#if defined(__CUDA_RUNTIME_H__) || defined(__CUDA_RUNTIME_API_H__) || defined(CUDA_VERSION)
#error "moqe/moqe.hpp must not include CUDA headers"
#endif

#include <catch2/catch.hpp>

TEST_CASE("moqe.hpp is self-contained", "[core]") { CHECK(std::string(moqe::kVersion) == "0.1.0"); }
