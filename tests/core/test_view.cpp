#include <catch2/catch.hpp>

#include <vector>

#include "moqe/core/view.hpp"

using namespace moqe;

TEST_CASE("MatrixView addresses strided rows and checks its shape", "[core][view]") {
  std::vector<float> buf(3 * 5);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  MatrixView<float> v(buf.data(), 3, 4, 5);  // one padding column per row
  CHECK(v(1, 0) == 5.0f);
  CHECK(v(2, 3) == 13.0f);
  CHECK_FALSE(v.contiguous());
  MatrixView<const float> c = v;  // const conversion
  CHECK(c.row(2)[1] == 11.0f);
  const auto b = v.block(1, 1, 2, 2);
  CHECK(b(0, 0) == 6.0f);
  CHECK(b(1, 1) == 12.0f);
  CHECK_THROWS_WITH(v.block(2, 0, 2, 1), Catch::Contains("outside shape [3, 4]"));
  CHECK_THROWS_WITH(MatrixView<float>(buf.data(), 3, 6, 5), Catch::Contains("row stride 5"));
  CHECK_THROWS_WITH(MatrixView<float>(std::span<float>(buf), 4, 4),
                    Catch::Contains("15 elements cannot hold shape [4, 4]"));
  MatrixView<float> empty(nullptr, 0, 7);
  CHECK(empty.empty());
}
