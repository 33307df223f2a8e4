#include "moqe/dist/communicator.hpp"

#include <algorithm>
#include <cstring>
#include <functional>

#include "moqe/core/error.hpp"

namespace moqe {

namespace detail {

RowCounts check_all_to_all_rows(const Communicator& c, const float* send,
                                std::span<const int64_t> send_rows, const float* recv,
                                std::span<const int64_t> recv_rows, int64_t row_floats) {
  const auto p = static_cast<size_t>(c.size());
  MOQE_CHECK(send_rows.size() == p && recv_rows.size() == p,
             "{} all_to_all_rows: {} send and {} receive counts for {} ranks", c.backend(),
             send_rows.size(), recv_rows.size(), p);
  MOQE_CHECK(row_floats > 0, "{} all_to_all_rows: row length {} is not positive", c.backend(),
             row_floats);
  RowCounts n;
  for (size_t r = 0; r < p; ++r) {
    MOQE_CHECK(send_rows[r] >= 0 && recv_rows[r] >= 0,
               "{} all_to_all_rows: negative row count for rank {} ({} sent, {} received)",
               c.backend(), r, send_rows[r], recv_rows[r]);
    n.sent += send_rows[r];
    n.received += recv_rows[r];
  }
  MOQE_CHECK((n.sent == 0 || send != nullptr) && (n.received == 0 || recv != nullptr),
             "{} all_to_all_rows: a null buffer for {} rows sent, {} received", c.backend(), n.sent,
             n.received);
  if (n.sent > 0 && n.received > 0) {
    const auto* s0 = reinterpret_cast<const char*>(send);
    const auto* r0 = reinterpret_cast<const char*>(recv);
    const size_t sb = static_cast<size_t>(n.sent * row_floats) * sizeof(float);
    const size_t rb = static_cast<size_t>(n.received * row_floats) * sizeof(float);
    const bool overlap = std::less<>()(s0, r0 + rb) && std::less<>()(r0, s0 + sb);
    MOQE_CHECK(!overlap, "{} all_to_all_rows: the send and receive buffers overlap", c.backend());
  }
  return n;
}

}  // namespace detail

void LocalCommunicator::all_to_all(std::span<const int64_t> send, std::span<int64_t> recv) {
  MOQE_CHECK(send.size() == recv.size(), "local all_to_all: {} values sent, {} expected back",
             send.size(), recv.size());
  std::copy(send.begin(), send.end(), recv.begin());
}

void LocalCommunicator::all_gather(std::span<const int64_t> send, std::span<int64_t> recv) {
  MOQE_CHECK(send.size() == recv.size(), "local all_gather: {} values sent, {} expected back",
             send.size(), recv.size());
  std::copy(send.begin(), send.end(), recv.begin());
}

void LocalCommunicator::all_to_all_rows(const float* send, std::span<const int64_t> send_rows,
                                        float* recv, std::span<const int64_t> recv_rows,
                                        int64_t row_floats) {
  const detail::RowCounts n =
      detail::check_all_to_all_rows(*this, send, send_rows, recv, recv_rows, row_floats);
  MOQE_CHECK(n.sent == n.received, "local all_to_all_rows: {} rows sent to self, {} expected",
             n.sent, n.received);
  if (n.sent > 0) {
    std::memcpy(recv, send, static_cast<size_t>(n.sent * row_floats) * sizeof(float));
  }
}

}  // namespace moqe
