#include "moqe/quant/packing.hpp"

#include <cstring>

namespace moqe {

void pack_row(const uint8_t* codes, int64_t k, int bits, uint8_t* out) {
  const int64_t nbytes = packed_row_bytes(k, bits);
  if (bits == 8) {
    std::memcpy(out, codes, static_cast<size_t>(k));
    return;
  }
  std::memset(out, 0, static_cast<size_t>(nbytes));
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t bit = j * bits;
    const uint32_t v = (codes[j] & mask) << (bit & 7);
    out[bit >> 3] |= static_cast<uint8_t>(v);
    if ((bit & 7) + bits > 8) out[(bit >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
  }
}

void unpack_row(const uint8_t* packed, int64_t k, int bits, uint8_t* codes) {
  if (bits == 8) {
    std::memcpy(codes, packed, static_cast<size_t>(k));
    return;
  }
  for (int64_t j = 0; j < k; ++j) codes[j] = static_cast<uint8_t>(unpack_code(packed, j, bits));
}

}  // namespace moqe
