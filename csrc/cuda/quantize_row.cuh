// Per-token (per-row) int8 quantization, element by element: the device functions that define it.
// One place for the rounding, shared by every CUDA kernel that quantizes activations
// (quantize_per_token.cu, int8_decode.cu), so they agree bit for bit with each other, with the
// CPU kernel (quantize_rows_scalar) and with reference.quantize_per_token:
//   absmax = max |x| over the row (NaN and +-Inf counted as +Inf),
//   scale = absmax / 127 (IEEE division), inv = 127 / absmax,
//   q = round_half_even(x * inv) (one IEEE multiply, never contracted into an FMA), clamped to +-127;
//   a row of zeros, or with absmax below 127 / FLT_MAX (127 / absmax overflows) -> scale 0, q 0;
//   a row holding NaN or +-Inf -> scale NaN, q 0.
// A file that includes this must be compiled with -ftz=false -prec-div=true (cmake/cuda.cmake):
// fabsf / fmaxf of a subnormal x must not flush it to zero.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

namespace torchslim {
namespace quantize_row {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// |v| as the reduction sees it: NaN and +-Inf become +Inf, so after the max-reduction a row is
// non-finite exactly when its absmax is +Inf (a finite row's absmax is at most FLT_MAX). fmaxf
// over these values is associative and commutative (no NaN reaches it): any reduction order
// gives the same absmax.
__device__ __forceinline__ float abs_or_inf(float v) {
  const float a = fabsf(v);
  return a <= FLT_MAX ? a : __int_as_float(0x7f800000);
}

// What a row's absmax implies: its scale, the multiplier of its elements, and whether every q of
// the row is 0 (a non-finite row, or one that counts as zeros).
struct RowScale {
  float scale;  // absmax / 127, 0, or NaN
  float inv;    // 127 / absmax: the multiplier of quantize_one (unused when zero_q)
  bool zero_q;  // every q of the row is 0
};

__device__ __forceinline__ RowScale row_scale(float amax) {
  const bool nonfinite = amax > FLT_MAX;
  const float inv = __fdiv_rn(127.f, amax);
  const bool zero = isinf(inv);  // absmax 0, or below 127 / FLT_MAX: counts as a row of zeros
  RowScale r;
  r.scale = nonfinite ? __int_as_float(0x7fffffff) : (zero ? 0.f : __fdiv_rn(amax, 127.f));
  r.inv = inv;
  r.zero_q = nonfinite || zero;
  return r;
}

__device__ __forceinline__ int8_t quantize_one(float v, float inv) {
  // __fmul_rn is never fused with anything; __float2int_rn rounds half to even.
  int r = __float2int_rn(__fmul_rn(v, inv));
  r = r < -127 ? -127 : (r > 127 ? 127 : r);
  return static_cast<int8_t>(r);
}

}  // namespace quantize_row
}  // namespace torchslim
