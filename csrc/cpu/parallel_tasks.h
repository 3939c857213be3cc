// Dynamic scheduling of a call's tasks over torch's threads (the op layer only: includes ATen).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace torchslim {

// Runs fn(t) for t in [0, tasks) on torch's threads, each thread taking the next task when it is
// done (an atomic counter), rather than at::parallel_for's fixed equal shares: on these shared
// machines one thread is often slowed by another tenant, and with fixed halves the call waited for
// it (M = 1 on 11008 x 4096 bf16 2:4 varied 2.6-4.8 ms between runs; dense, which balances, did not).
template <class F>
void parallel_tasks(int64_t tasks, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tasks; t = next++) fn(t);
  });
}

}  // namespace torchslim
