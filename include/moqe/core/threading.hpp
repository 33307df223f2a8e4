// Parallel loops over a caller-chosen number of threads. OpenMP stays inside the compiled library,
// so consumers of the headers need no OpenMP flags.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace moqe {

// A non-owning reference to a callable (no allocation, unlike std::function).
template <class Sig>
class FunctionRef;

template <class R, class... Args>
class FunctionRef<R(Args...)> {
 public:
  template <class F>
  requires(!std::is_same_v<std::remove_cvref_t<F>, FunctionRef> &&
           std::is_invocable_r_v<R, F&, Args...>)
      FunctionRef(F&& f)  // NOLINT(google-explicit-constructor)
      : obj_(const_cast<void*>(static_cast<const void*>(&f))), call_([](void* o, Args... a) -> R {
          return (*static_cast<std::remove_reference_t<F>*>(o))(std::forward<Args>(a)...);
        }) {}
  R operator()(Args... a) const { return call_(obj_, std::forward<Args>(a)...); }

 private:
  void* obj_;
  R (*call_)(void*, Args...);
};

// The thread count used when a caller passes 0: OMP_NUM_THREADS or the number of cores.
int default_num_threads();

// Calls body(begin, end) on disjoint chunks covering [0, n), using up to num_threads threads
// (0 = default_num_threads()). Chunks hold at least min_chunk items. Runs inline when one thread
// suffices. Exceptions thrown by body are rethrown on the calling thread (the first one wins).
void parallel_for(int64_t n, int num_threads, int64_t min_chunk,
                  FunctionRef<void(int64_t begin, int64_t end)> body);

}  // namespace moqe
