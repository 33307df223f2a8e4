#include <catch2/catch.hpp>

#include "moqe/core/error.hpp"
#include "moqe/quant/scheme.hpp"

using namespace moqe;

TEST_CASE("check_scheme accepts the supported table and names what it rejects", "[quant][scheme]") {
  for (int bits : kSupportedBits) {
    for (QuantMode mode : kSupportedModes) {
      for (int64_t g : {int64_t{32}, int64_t{64}, int64_t{128}, kPerChannel}) {
        CHECK(check_scheme({bits, mode, g, ScaleType::kF16}, 4096).empty());
      }
    }
  }
  CHECK(check_scheme({4, QuantMode::kSym, 100, ScaleType::kF32}, 100).empty());  // G == K
  CHECK(check_scheme({5, QuantMode::kSym, 128}, 4096) ==
        "unsupported bits 5; supported: 2, 3, 4, 8");
  CHECK_THAT(check_scheme({3, QuantMode::kSym, 96}, 4096),
             Catch::Contains("unsupported group_size 96 for K = 4096"));
  CHECK_THAT(check_scheme({4, QuantMode::kSym, 48}, 96), Catch::Contains("multiple of 32"));
  CHECK_THAT(check_scheme({4, QuantMode::kSym, 64}, 96), Catch::Contains("group_size 64"));
  CHECK_THROWS_WITH(validate_scheme({4, QuantMode::kSym, 96}, 4096, "tensor 'w'"),
                    Catch::StartsWith("tensor 'w': unsupported group_size 96"));
}

TEST_CASE("bits per weight follows DESIGN's formula", "[quant][scheme]") {
  CHECK(QuantScheme{4, QuantMode::kSym, 128}.bits_per_weight(4096) == Approx(4.125));
  CHECK(QuantScheme{4, QuantMode::kAsym, 128}.bits_per_weight(4096) == Approx(4.1875));
  CHECK(QuantScheme{2, QuantMode::kSym, kPerChannel, ScaleType::kF32}.bits_per_weight(1024) ==
        Approx(2.03125));
  CHECK(QuantScheme{8, QuantMode::kSymFull, 32}.bits_per_weight(64) == Approx(8.5));
  CHECK(QuantScheme{3, QuantMode::kAsym, 64}.to_string() == "int3 asym g64 f16");
  CHECK(QuantScheme{4, QuantMode::kSym, kPerChannel}.to_string() == "int4 sym channel f16");
  CHECK(parse_quant_mode("sym_full") == QuantMode::kSymFull);
  CHECK_FALSE(parse_quant_mode("int4").has_value());
}
