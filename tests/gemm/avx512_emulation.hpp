// Tests only: the AVX-512 intrinsics of src/gemm/kernels_avx512.cpp emulated on any x86-64, so
// the kernels' logic is checked against the scalar oracle on machines without AVX-512 (like the
// development and CI machines). SIMDe (libsimde-dev) implements the intrinsics portably; the six
// lane-wise conversions and shifts its Debian 12 version (0.7.4) lacks are written here from the
// Intel Intrinsics Guide's definitions. The dot products, byte shuffles and variable shifts,
// whose semantics matter most, are SIMDe's.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstdint>

// vcvtdq2ps: int32 -> fp32, round to nearest (the default MXCSR mode).
inline __m512 moqe_emu_cvtepi32_ps(__m512i a) {
  int32_t in[16];
  float out[16];
  _mm512_storeu_si512(in, a);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(in[i]);
  return _mm512_loadu_ps(out);
}
// vpsrad: arithmetic right shift; counts above 31 fill with the sign bit.
inline __m512i moqe_emu_srai_epi32(__m512i a, unsigned imm) {
  int32_t v[16];
  _mm512_storeu_si512(v, a);
  for (int i = 0; i < 16; ++i) v[i] = imm > 31 ? (v[i] < 0 ? -1 : 0) : v[i] >> imm;
  return _mm512_loadu_si512(v);
}
// vpmovsxwd / vpmovzxwd: 16 int16 (uint16) lanes of a 256-bit vector to int32.
template <class T>
inline __m512i moqe_emu_widen16(__m256i a) {
  T in[16];
  int32_t out[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return _mm512_loadu_si512(out);
}
// vpmovsxbd / vpmovzxbd: 16 int8 (uint8) lanes of a 128-bit vector to int32.
template <class T>
inline __m512i moqe_emu_widen8(__m128i a) {
  T in[16];
  int32_t out[16];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return _mm512_loadu_si512(out);
}

#define _mm512_cvtepi32_ps(a) moqe_emu_cvtepi32_ps(a)
#define _mm512_srai_epi32(a, imm) moqe_emu_srai_epi32((a), (imm))
#define _mm512_cvtepi16_epi32(a) moqe_emu_widen16<int16_t>(a)
#define _mm512_cvtepu16_epi32(a) moqe_emu_widen16<uint16_t>(a)
#define _mm512_cvtepi8_epi32(a) moqe_emu_widen8<int8_t>(a)
#define _mm512_cvtepu8_epi32(a) moqe_emu_widen8<uint8_t>(a)
