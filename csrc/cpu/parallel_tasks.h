// Dynamic scheduling of a call's tasks over torch's threads (the op layer only).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "stable_tensor.h"

namespace torchslim {

inline int64_t num_threads() { return int64_t(torch::stable::get_num_threads()); }

// Runs fn(b, e) over [0, n) in chunks of at least `grain` on torch's threads (its one OpenMP pool).
template <class F>
void parallel_for(int64_t n, int64_t grain, const F& fn) {
  torch::stable::parallel_for(0, n, grain, fn);
}

// Runs fn(t) for t in [0, tasks) on torch's threads, each thread taking the next task when it is
// done (an atomic counter), rather than parallel_for's fixed equal shares: on these shared
// machines one thread is often slowed by another tenant, and with fixed halves the call waited for
// it (M = 1 on 11008 x 4096 bf16 2:4 varied 2.6-4.8 ms between runs; dense, which balances, did not).
template <class F>
void parallel_tasks(int64_t tasks, const F& fn) {
  std::atomic<int64_t> next{0};
  parallel_for(std::min<int64_t>(tasks, num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tasks; t = next++) fn(t);
  });
}

}  // namespace torchslim
