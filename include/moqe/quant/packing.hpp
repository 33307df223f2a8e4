// Bit packing of quantization codes: little-endian bit order within each row (code j of a row
// occupies bits [j*b, (j+1)*b) of the row's bit stream, bit i of the stream is bit i%8 of byte
// i/8), rows padded to a whole byte. 3-bit codes pack 8 to 3 bytes; 4-bit codes put code 2j in
// the low nibble of byte j.
#pragma once

#include <cstdint>

#include "moqe/core/config.hpp"

namespace moqe {

MOQE_HOST_DEVICE constexpr int64_t packed_row_bytes(int64_t k, int bits) {
  return (k * bits + 7) / 8;
}

// Code j of a packed row.
MOQE_HOST_DEVICE inline uint32_t unpack_code(const uint8_t* row, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t byte = bit >> 3;
  const int off = static_cast<int>(bit & 7);
  uint32_t v = row[byte];
  if (off + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (v >> off) & ((1u << bits) - 1u);
}

// Packs k codes (each < 2^bits) into packed_row_bytes(k, bits) bytes; padding bits are zero.
void pack_row(const uint8_t* codes, int64_t k, int bits, uint8_t* out);
// Unpacks k codes.
void unpack_row(const uint8_t* packed, int64_t k, int bits, uint8_t* codes);

}  // namespace moqe
