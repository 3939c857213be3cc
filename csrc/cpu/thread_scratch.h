// Scratch tensors kept per calling thread across calls (the op layer only).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "stable_tensor.h"

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

inline int64_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Char: case ScalarType::Byte: return 1;
    case ScalarType::BFloat16: case ScalarType::Half: case ScalarType::Short: return 2;
    case ScalarType::Float: case ScalarType::Int: return 4;
    default: return 8;
  }
}

// An uninitialized CPU tensor of `sizes` that stays valid until the calling thread asks for the same
// slot again (so: only within one op call, never returned). Why: a fresh allocation of more than the
// allocator's mmap threshold is a fresh mapping each call, whose page faults (or zeroing, where memory
// is locked) measured up to a quarter of a 2:4 float32 call at M = 128 on the small layers. Up to
// kMaxCachedBytes per slot stays allocated for the thread's life; larger requests are plain allocations.
inline Tensor thread_scratch(Scratch slot, std::initializer_list<int64_t> sizes, ScalarType dtype) {
  constexpr int64_t kMaxCachedBytes = int64_t(32) << 20;
  const Device cpu(DeviceType::CPU);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * element_size(dtype);
  if (bytes > kMaxCachedBytes) return empty(sizes, dtype, cpu);
  thread_local Tensor cache[int(Scratch::Count)];
  Tensor& c = cache[int(slot)];
  if (!c.defined() || c.numel() < bytes) c = empty({bytes}, ScalarType::Byte, cpu);
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (int64_t d = int64_t(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes.begin()[d];
  }
  return torch::stable::from_blob(c.mutable_data_ptr(), torch::headeronly::IntHeaderOnlyArrayRef(sizes),
                                  torch::headeronly::IntHeaderOnlyArrayRef(strides), cpu, dtype);
}

}  // namespace torchslim
