// The kernels' Dtype of a float tensor's scalar type (float32, bfloat16, float16), for the op layer
// (includes ATen; the kernels themselves see only cpu::Dtype).
#pragma once
#include <c10/core/ScalarType.h>

#include "cpu/kernels/int8_gemm.h"  // Dtype

namespace torchslim {

inline cpu::Dtype float_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? cpu::Dtype::BF16 : t == at::kHalf ? cpu::Dtype::F16 : cpu::Dtype::F32;
}

}  // namespace torchslim
