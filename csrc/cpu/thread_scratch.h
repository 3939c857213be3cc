// Scratch tensors kept per calling thread across calls (the op layer only: includes ATen).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <cstdint>

namespace torchslim {

// Who uses a scratch: one buffer each, so that two users never alias within one call.
enum class Scratch {
  Int8Q,
  Sparse24Blocks,
  Sparse24XTiles,
  Sparse24Acc,
  CsrTiles,
  LowrankXTiles,
  LowrankTTiles,
  LowrankT,
  Count
};

// An uninitialized tensor of `sizes` that stays valid until the calling thread asks for the same
// slot again (so: only within one op call, never returned). Why: a fresh allocation of more than the
// allocator's mmap threshold is a fresh mapping each call, whose page faults (or zeroing, where memory
// is locked) measured up to a quarter of a 2:4 float32 call at M = 128 on the small layers. Up to
// kMaxCachedBytes per slot stays allocated for the thread's life; larger requests are plain allocations.
inline at::Tensor thread_scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t kMaxCachedBytes = int64_t(32) << 20;
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (bytes > kMaxCachedBytes) return at::empty(sizes, options);
  thread_local at::Tensor cache[int(Scratch::Count)];
  at::Tensor& c = cache[int(slot)];
  if (!c.defined() || c.numel() < bytes) c = at::empty({bytes}, options.dtype(at::kByte));
  return at::from_blob(c.data_ptr(), sizes, options);
}

}  // namespace torchslim
