#include <climits>
#include <string>

#include "moqe/core/error.hpp"
#include "moqe/dist/mpi.hpp"

namespace moqe {

namespace {

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  MOQE_FAIL("MPI: {} failed: {}", call, std::string(text, static_cast<size_t>(len)));
}

int as_int(int64_t v, const char* what) {
  MOQE_CHECK(v >= 0 && v <= INT_MAX, "MPI: {} {} does not fit MPI's int counts", what, v);
  return static_cast<int>(v);
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm) {
  int initialized = 0;
  check_mpi(MPI_Initialized(&initialized), "MPI_Initialized");
  MOQE_CHECK(initialized, "MpiCommunicator: MPI_Init has not been called");
  check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
  check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  for (int i = 0; i < 2; ++i) {
    counts_[i].resize(static_cast<size_t>(size_));
    displs_[i].resize(static_cast<size_t>(size_));
  }
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;  // too late to free; MPI_Finalize has released everything
  if (row_type_ != MPI_DATATYPE_NULL) MPI_Type_free(&row_type_);
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCommunicator::all_to_all(std::span<const int64_t> send, std::span<int64_t> recv) {
  const auto p = static_cast<size_t>(size_);
  MOQE_CHECK(send.size() == recv.size() && send.size() % p == 0,
             "mpi all_to_all: {} values sent and {} received over {} ranks", send.size(),
             recv.size(), p);
  const int n = as_int(static_cast<int64_t>(send.size() / p), "block size");
  check_mpi(MPI_Alltoall(send.data(), n, MPI_INT64_T, recv.data(), n, MPI_INT64_T, comm_),
            "MPI_Alltoall");
}

void MpiCommunicator::all_gather(std::span<const int64_t> send, std::span<int64_t> recv) {
  MOQE_CHECK(recv.size() == send.size() * static_cast<size_t>(size_),
             "mpi all_gather: {} values sent, {} received over {} ranks", send.size(), recv.size(),
             size_);
  const int n = as_int(static_cast<int64_t>(send.size()), "block size");
  check_mpi(MPI_Allgather(send.data(), n, MPI_INT64_T, recv.data(), n, MPI_INT64_T, comm_),
            "MPI_Allgather");
}

void MpiCommunicator::all_to_all_rows(const float* send, std::span<const int64_t> send_rows,
                                      float* recv, std::span<const int64_t> recv_rows,
                                      int64_t row_floats) {
  detail::check_all_to_all_rows(*this, send, send_rows, recv, recv_rows, row_floats);
  if (row_floats != row_floats_) {
    if (row_type_ != MPI_DATATYPE_NULL) check_mpi(MPI_Type_free(&row_type_), "MPI_Type_free");
    check_mpi(MPI_Type_contiguous(as_int(row_floats, "row length"), MPI_FLOAT, &row_type_),
              "MPI_Type_contiguous");
    check_mpi(MPI_Type_commit(&row_type_), "MPI_Type_commit");
    row_floats_ = row_floats;
  }
  const std::span<const int64_t> rows[2] = {send_rows, recv_rows};
  for (int i = 0; i < 2; ++i) {
    int64_t at = 0;
    for (int p = 0; p < size_; ++p) {
      counts_[i][static_cast<size_t>(p)] = as_int(rows[i][static_cast<size_t>(p)], "row count");
      displs_[i][static_cast<size_t>(p)] = as_int(at, "row offset");
      at += rows[i][static_cast<size_t>(p)];
    }
  }
  // MPI wants non-null buffers on some implementations even for zero counts.
  static float dummy = 0.0f;
  check_mpi(MPI_Alltoallv(send != nullptr ? send : &dummy, counts_[0].data(), displs_[0].data(),
                          row_type_, recv != nullptr ? recv : &dummy, counts_[1].data(),
                          displs_[1].data(), row_type_, comm_),
            "MPI_Alltoallv");
}

void MpiCommunicator::barrier() { check_mpi(MPI_Barrier(comm_), "MPI_Barrier"); }

}  // namespace moqe
