#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "moqe/core/error.hpp"
#include "moqe/io/dtype.hpp"

namespace {

using moqe::DType;

template <class T>
std::vector<std::byte> le_bytes(std::initializer_list<T> values) {
  std::vector<std::byte> b(values.size() * sizeof(T));
  std::memcpy(b.data(), std::data(values), b.size());
  return b;
}

template <class T>
std::vector<float> convert(DType t, std::initializer_list<T> values) {
  const std::vector<std::byte> b = le_bytes(values);
  std::vector<float> out(values.size());
  moqe::to_float(t, b.data(), out.size(), out.data());
  return out;
}

const DType kAllTypes[] = {
    DType::kBool, DType::kU8,  DType::kI8,  DType::kF8_E5M2, DType::kF8_E4M3, DType::kF8_E8M0,
    DType::kI16,  DType::kU16, DType::kF16, DType::kBF16,    DType::kI32,     DType::kU32,
    DType::kF32,  DType::kC64, DType::kF64, DType::kI64,     DType::kU64,
};

}  // namespace

TEST_CASE("dtype names and sizes follow safetensors", "[io][dtype]") {
  for (DType t : kAllTypes) {
    const auto parsed = moqe::parse_dtype(moqe::dtype_name(t));
    REQUIRE(parsed.has_value());
    CHECK(*parsed == t);
  }
  CHECK(moqe::dtype_name(DType::kBF16) == "BF16");
  CHECK(moqe::dtype_name(DType::kF8_E4M3) == "F8_E4M3");
  CHECK_FALSE(moqe::parse_dtype("F4").has_value());
  CHECK_FALSE(moqe::parse_dtype("f32").has_value());
  CHECK_FALSE(moqe::parse_dtype("").has_value());
  CHECK(moqe::dtype_size(DType::kBool) == 1);
  CHECK(moqe::dtype_size(DType::kF8_E8M0) == 1);
  CHECK(moqe::dtype_size(DType::kBF16) == 2);
  CHECK(moqe::dtype_size(DType::kU32) == 4);
  CHECK(moqe::dtype_size(DType::kC64) == 8);
  CHECK(moqe::dtype_size(DType::kU64) == 8);
}

TEST_CASE("dtype classification", "[io][dtype]") {
  for (DType t : kAllTypes) {
    const bool convertible = t != DType::kC64 && t != DType::kF8_E8M0;
    CHECK(moqe::dtype_is_convertible(t) == convertible);
    // Everything called float must also be convertible.
    if (moqe::dtype_is_float(t)) CHECK(moqe::dtype_is_convertible(t));
  }
  CHECK(moqe::dtype_is_float(DType::kF8_E4M3));
  CHECK(moqe::dtype_is_float(DType::kBF16));
  CHECK_FALSE(moqe::dtype_is_float(DType::kI32));
  CHECK_FALSE(moqe::dtype_is_float(DType::kC64));
}

TEST_CASE("F16 to float, including subnormals, inf and NaN", "[io][dtype]") {
  const auto v = convert<uint16_t>(DType::kF16, {0x3c00, 0xc000, 0x7bff, 0x0001, 0x03ff, 0x0400,
                                                 0x7c00, 0xfc00, 0x7e00, 0x8000, 0x3555});
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -2.0f);
  CHECK(v[2] == 65504.0f);
  CHECK(v[3] == std::ldexp(1.0f, -24));
  CHECK(v[4] == std::ldexp(1023.0f, -24));
  CHECK(v[5] == std::ldexp(1.0f, -14));
  CHECK(std::isinf(v[6]));
  CHECK(v[6] > 0);
  CHECK(std::isinf(v[7]));
  CHECK(v[7] < 0);
  CHECK(std::isnan(v[8]));
  CHECK(v[9] == 0.0f);
  CHECK(std::signbit(v[9]));
  CHECK(v[10] == 0.333251953125f);  // (1 + 341/1024) / 4
}

TEST_CASE("BF16 to float", "[io][dtype]") {
  const auto v =
      convert<uint16_t>(DType::kBF16, {0x3f80, 0xc040, 0x7f80, 0xff80, 0x7fc0, 0x0001, 0x3e80});
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -3.0f);
  CHECK(std::isinf(v[2]));
  CHECK(v[2] > 0);
  CHECK(std::isinf(v[3]));
  CHECK(v[3] < 0);
  CHECK(std::isnan(v[4]));
  CHECK(v[5] == std::ldexp(1.0f, -133));  // fp32 subnormal
  CHECK(v[6] == 0.25f);
}

TEST_CASE("F8_E4M3 (OCP fn) to float", "[io][dtype]") {
  CHECK(moqe::fp8_e4m3_to_float(0x7e) == 448.0f);
  CHECK(moqe::fp8_e4m3_to_float(0xfe) == -448.0f);
  CHECK(moqe::fp8_e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(moqe::fp8_e4m3_to_float(0x07) == std::ldexp(7.0f, -9));
  CHECK(moqe::fp8_e4m3_to_float(0x08) == std::ldexp(1.0f, -6));
  CHECK(moqe::fp8_e4m3_to_float(0x38) == 1.0f);
  CHECK(moqe::fp8_e4m3_to_float(0x78) == 256.0f);  // no infinity: e=15 is a normal binade
  CHECK(moqe::fp8_e4m3_to_float(0x00) == 0.0f);
  CHECK(std::signbit(moqe::fp8_e4m3_to_float(0x80)));
  CHECK(std::isnan(moqe::fp8_e4m3_to_float(0x7f)));
  CHECK(std::isnan(moqe::fp8_e4m3_to_float(0xff)));

  // Every code against the format's definition.
  for (int i = 0; i < 256; ++i) {
    const int e = (i >> 3) & 0xf, m = i & 7;
    const float sign = (i & 0x80) ? -1.0f : 1.0f;
    const float f = moqe::fp8_e4m3_to_float(static_cast<uint8_t>(i));
    if (e == 15 && m == 7) {
      CHECK(std::isnan(f));
    } else if (e == 0) {
      CHECK(f == sign * std::ldexp(static_cast<float>(m), -9));
    } else {
      CHECK(f == sign * std::ldexp(1.0f + m / 8.0f, e - 7));
    }
  }

  const auto v = convert<uint8_t>(DType::kF8_E4M3, {0x7e, 0x01, 0x7f, 0xb8});
  CHECK(v[0] == 448.0f);
  CHECK(v[1] == std::ldexp(1.0f, -9));
  CHECK(std::isnan(v[2]));
  CHECK(v[3] == -1.0f);
}

TEST_CASE("F8_E5M2 to float", "[io][dtype]") {
  CHECK(moqe::fp8_e5m2_to_float(0x3c) == 1.0f);
  CHECK(moqe::fp8_e5m2_to_float(0x7b) == 57344.0f);
  CHECK(moqe::fp8_e5m2_to_float(0x01) == std::ldexp(1.0f, -16));
  CHECK(moqe::fp8_e5m2_to_float(0x04) == std::ldexp(1.0f, -14));
  CHECK(std::isinf(moqe::fp8_e5m2_to_float(0x7c)));
  CHECK(moqe::fp8_e5m2_to_float(0xfc) < 0);
  CHECK(std::isnan(moqe::fp8_e5m2_to_float(0x7d)));
  CHECK(std::isnan(moqe::fp8_e5m2_to_float(0xff)));

  for (int i = 0; i < 256; ++i) {
    const int e = (i >> 2) & 0x1f, m = i & 3;
    const float sign = (i & 0x80) ? -1.0f : 1.0f;
    const float f = moqe::fp8_e5m2_to_float(static_cast<uint8_t>(i));
    if (e == 31) {
      CHECK((m == 0 ? std::isinf(f) : std::isnan(f)));
    } else if (e == 0) {
      CHECK(f == sign * std::ldexp(static_cast<float>(m), -16));
    } else {
      CHECK(f == sign * std::ldexp(1.0f + m / 4.0f, e - 15));
    }
  }

  const auto v = convert<uint8_t>(DType::kF8_E5M2, {0x3c, 0xc0});
  CHECK(v[0] == 1.0f);
  CHECK(v[1] == -2.0f);
}

TEST_CASE("F32, F64 and integer types convert by value", "[io][dtype]") {
  CHECK(convert<float>(DType::kF32, {1.5f, -0.0f})[0] == 1.5f);
  CHECK(convert<double>(DType::kF64, {0.1, -1e300})[0] == 0.1f);
  CHECK(std::isinf(convert<double>(DType::kF64, {0.1, -1e300})[1]));
  CHECK(convert<uint8_t>(DType::kBool, {0, 1, 2}) == std::vector<float>{0, 1, 1});
  CHECK(convert<uint8_t>(DType::kU8, {0, 255}) == std::vector<float>{0, 255});
  CHECK(convert<int8_t>(DType::kI8, {-128, 127}) == std::vector<float>{-128, 127});
  CHECK(convert<int16_t>(DType::kI16, {-32768, 7}) == std::vector<float>{-32768, 7});
  CHECK(convert<uint16_t>(DType::kU16, {65535}) == std::vector<float>{65535});
  CHECK(convert<int32_t>(DType::kI32, {-123456}) == std::vector<float>{-123456});
  CHECK(convert<uint32_t>(DType::kU32, {4000000000u}) == std::vector<float>{4000000000.0f});
  CHECK(convert<int64_t>(DType::kI64, {-5, int64_t{1} << 40}) ==
        std::vector<float>{-5, 1099511627776.0f});
  CHECK(convert<uint64_t>(DType::kU64, {std::numeric_limits<uint64_t>::max()})[0] ==
        18446744073709551616.0f);
}

TEST_CASE("to_float reads unaligned data", "[io][dtype]") {
  const float values[3] = {1.25f, -2.5f, 3.0e-7f};
  std::vector<std::byte> buf(1 + sizeof values);
  std::memcpy(buf.data() + 1, values, sizeof values);
  float out[3];
  moqe::to_float(DType::kF32, buf.data() + 1, 3, out);
  CHECK(out[0] == values[0]);
  CHECK(out[1] == values[1]);
  CHECK(out[2] == values[2]);

  const double d[2] = {0.5, -8.0};
  std::vector<std::byte> dbuf(3 + sizeof d);
  std::memcpy(dbuf.data() + 3, d, sizeof d);
  moqe::to_float(DType::kF64, dbuf.data() + 3, 2, out);
  CHECK(out[0] == 0.5f);
  CHECK(out[1] == -8.0f);
}

TEST_CASE("C64 and F8_E8M0 are not convertible", "[io][dtype]") {
  std::vector<std::byte> b(16);
  float out[2];
  REQUIRE_THROWS_AS(moqe::to_float(DType::kC64, b.data(), 1, out), moqe::Error);
  REQUIRE_THROWS_WITH(moqe::to_float(DType::kC64, b.data(), 1, out), Catch::Contains("C64"));
  REQUIRE_THROWS_WITH(moqe::to_float(DType::kF8_E8M0, b.data(), 2, out),
                      Catch::Contains("F8_E8M0"));
}
