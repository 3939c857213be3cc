// The kernels' Dtype of a float tensor's scalar type (float32, bfloat16, float16), for the op layer
// (the kernels themselves see only cpu::Dtype), a finiteness scan, and the bias as float32.
#pragma once
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/kernels/int8_gemm.h"  // Dtype
#include "cpu/kernels/scalar_convert.h"
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

// The bias as float32 for the kernels, first rounded to `round_to` (x's dtype: F.linear adds the bias in
// x's dtype), or nullptr for none. Valid until the calling thread's next call (a thread-local buffer):
// converted here rather than by two ATen calls through the stable dispatcher (~2 us each at one token).
// A float64 bias takes ATen's conversion (one rounding from float64, kept in `keep`).
inline const float* bias_as_floats(const std::optional<Tensor>& bias, std::optional<ScalarType> round_to,
                                   Tensor& keep) {
  if (!bias.has_value()) return nullptr;
  const Tensor& b = *bias;
  const ScalarType bt = b.scalar_type();
  if (!is_float(bt)) {
    keep = contiguous_as(round_to ? contiguous_as(b, *round_to) : b, ScalarType::Float);
    return keep.const_data_ptr<float>();
  }
  thread_local std::vector<float> buf;
  const int64_t n = b.numel(), stride = n > 1 ? b.stride(0) : 1;
  buf.resize(size_t(n));
  const cpu::Dtype from = float_dtype(bt);
  const void* src = b.const_data_ptr();  // once: each accessor is a call into torch's shim
  const bool to_bf16 = round_to == ScalarType::BFloat16 && bt != ScalarType::BFloat16;
  const bool to_f16 = round_to == ScalarType::Half && bt != ScalarType::Half;
  for (int64_t i = 0; i < n; ++i) {
    float v = cpu::load_as_float(src, from, i * stride);
    if (to_bf16) v = cpu::bf16_to_float(cpu::float_to_bf16(v));
    else if (to_f16) v = cpu::f16_to_float(cpu::float_to_f16(v));
    buf[size_t(i)] = v;
  }
  return buf.data();
}

}  // namespace torchslim
