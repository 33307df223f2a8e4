#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "moqe/quant/packing.hpp"

using namespace moqe;

TEST_CASE("packing lays codes out little-endian within each row", "[quant][packing]") {
  std::vector<uint8_t> out(3);
  const std::vector<uint8_t> c4 = {1, 2, 3, 4};
  pack_row(c4.data(), 4, 4, out.data());
  CHECK(out[0] == 0x21);
  CHECK(out[1] == 0x43);
  const std::vector<uint8_t> c2 = {0, 1, 2, 3};
  pack_row(c2.data(), 4, 2, out.data());
  CHECK(out[0] == 0xe4);
  const std::vector<uint8_t> c3 = {0, 1, 2, 3, 4, 5, 6, 7};  // 8 codes in 3 bytes
  pack_row(c3.data(), 8, 3, out.data());
  CHECK(out == std::vector<uint8_t>{0x88, 0xc6, 0xfa});
  CHECK(packed_row_bytes(8, 3) == 3);
  CHECK(packed_row_bytes(9, 3) == 4);
  CHECK(packed_row_bytes(5, 4) == 3);
  CHECK(packed_row_bytes(7, 2) == 2);
}

TEST_CASE("pack and unpack round-trip every width and odd length", "[quant][packing]") {
  std::mt19937 rng(42);
  for (int bits : {2, 3, 4, 8}) {
    for (int64_t k : {1, 2, 3, 7, 8, 13, 31, 33, 100, 4097}) {
      std::vector<uint8_t> codes(static_cast<size_t>(k)), back(codes.size());
      for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
      std::vector<uint8_t> packed(static_cast<size_t>(packed_row_bytes(k, bits)), 0xff);
      pack_row(codes.data(), k, bits, packed.data());
      unpack_row(packed.data(), k, bits, back.data());
      REQUIRE(back == codes);
      for (int64_t j = 0; j < k; ++j) REQUIRE(unpack_code(packed.data(), j, bits) == codes[j]);
      // Padding bits of the last byte are zero.
      const int64_t used = (k * bits) % 8;
      if (used != 0) REQUIRE((packed.back() >> used) == 0);
    }
  }
}
