#include "moqe/core/threading.hpp"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <mutex>

namespace moqe {

int default_num_threads() { return std::max(1, omp_get_max_threads()); }

void parallel_for(int64_t n, int num_threads, int64_t min_chunk,
                  FunctionRef<void(int64_t, int64_t)> body) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  int threads = num_threads > 0 ? num_threads : default_num_threads();
  threads = static_cast<int>(std::min<int64_t>(threads, (n + min_chunk - 1) / min_chunk));
  if (threads <= 1) {
    body(0, n);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t begin = n * t / nt;
    const int64_t end = n * (t + 1) / nt;
    if (begin < end) {
      try {
        body(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace moqe
