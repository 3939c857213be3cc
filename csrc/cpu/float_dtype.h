// The kernels' Dtype of a float tensor's scalar type (float32, bfloat16, float16), for the op layer
// (the kernels themselves see only cpu::Dtype), and a finiteness scan.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/kernels/int8_gemm.h"  // Dtype
#include "stable_tensor.h"

namespace torchslim {

inline cpu::Dtype float_dtype(ScalarType t) {
  return t == ScalarType::BFloat16 ? cpu::Dtype::BF16 : t == ScalarType::Half ? cpu::Dtype::F16 : cpu::Dtype::F32;
}

// Whether every element of a contiguous float32 / bfloat16 / float16 tensor is finite (an exponent
// field of all ones is Inf or NaN).
inline bool all_finite(const Tensor& t) {
  const int64_t n = t.numel();
  if (t.scalar_type() == ScalarType::Float) {
    const auto* p = static_cast<const uint32_t*>(t.const_data_ptr());
    for (int64_t i = 0; i < n; ++i)
      if ((p[i] & 0x7F800000u) == 0x7F800000u) return false;
    return true;
  }
  const uint16_t exponent = t.scalar_type() == ScalarType::BFloat16 ? 0x7F80 : 0x7C00;
  const auto* p = static_cast<const uint16_t*>(t.const_data_ptr());
  for (int64_t i = 0; i < n; ++i)
    if ((p[i] & exponent) == exponent) return false;
  return true;
}

}  // namespace torchslim
