// The per-token quantization every CPU path shares (see QuantizeArgs in int8_gemm.h): the row
// logic once, the two vectorizable loops (absmax, quantize) supplied by each instruction set.
#pragma once
#include <cmath>
#include <cstring>

#include "int8_gemm.h"

namespace torchslim::cpu {
namespace {

// One element: round half to even (the default rounding mode), clamp.
inline int8_t quantize_one(float v, float inv) {
  const float r = std::nearbyint(v * inv);
  return int8_t(std::fmin(std::fmax(r, -127.f), 127.f));
}

// absmax_of(m): the row's largest |x|, NaN or Inf if the row holds a NaN or an Inf.
// quantize_row(m, inv, q): writes q[0, K) = quantize_one(x[m, k], inv) and returns their sum.
template <class AbsMax, class QuantizeRow>
inline void quantize_rows_with(const QuantizeArgs& a, int64_t m0, int64_t m1, AbsMax absmax_of,
                               QuantizeRow quantize_row) {
  if (a.K_pad == 0) {  // K = 0: empty rows (and a q with no storage, which memset must not see)
    for (int64_t m = m0; m < m1; ++m) {
      a.scale[m] = 0.f;
      if (a.row_offset) a.row_offset[m] = 0;
    }
    return;
  }
  for (int64_t m = m0; m < m1; ++m) {
    const float absmax = absmax_of(m);
    int8_t* q = a.q + m * a.ldq;
    const float inv = 127.f / absmax;
    int32_t sum = 0;
    if (!std::isfinite(absmax) || std::isinf(inv)) {
      // NaN/Inf rows: scale NaN, so the output row is NaN as a float GEMM's would be. Zero rows,
      // and rows so small (absmax < 127 / FLT_MAX) that 127 / absmax overflows: scale 0.
      a.scale[m] = std::isfinite(absmax) ? 0.f : NAN;
      std::memset(q, 0, a.K_pad);
    } else {
      a.scale[m] = absmax / 127.f;
      sum = quantize_row(m, inv, q);
      std::memset(q + a.K, 0, a.K_pad - a.K);
    }
    if (a.row_offset) a.row_offset[m] = 128 * sum;
  }
}

}  // namespace
}  // namespace torchslim::cpu
