// Scalar float <-> bfloat16 / float16 conversions (round to nearest even, NaN kept quiet) and the
// scalar GEMM epilogue, for the portable and AVX2 kernels. Static inline: each ISA file gets its own copy.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "int8_gemm.h"

namespace torchslim::cpu {
namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

// IEEE half <-> float in integer arithmetic (round to nearest even, NaN kept quiet), not _Float16:
// without F16C, GCC lowers _Float16 conversions to libgcc calls (__extendhfsf2, __truncsfhf2) that
// exist only from GCC 12's libgcc, which would tie the wheel to manylinux_2_35 instead of 2_28.
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float f = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  const uint32_t bits = exponent == 0x1F ? sign | 0x7F800000u | (mantissa << 13)  // Inf, NaN
                                         : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return sign | 0x7E00;  // NaN
  if (ax >= 0x477FF000u) return sign | 0x7C00;  // from 65520 (65504 + half an ulp, a tie to even) on: Inf
  if (ax < 0x38800000u)  // below 2^-14: a subnormal (or zero) in units of 2^-24; 1024 is the smallest normal
    return sign | uint16_t(std::nearbyint(std::fabs(f) * 16777216.0f));
  uint32_t h = (ax >> 13) - (112u << 10);  // exponent rebiased from 127 to 15, top 10 mantissa bits
  const uint32_t rest = ax & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // a carry moves into the exponent, as it should
  return sign | uint16_t(h);
}

inline float load_as_float(const void* p, Dtype dt, int64_t i) {
  switch (dt) {
    case Dtype::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case Dtype::F16: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_from_float(void* p, Dtype dt, int64_t i, float v) {
  switch (dt) {
    case Dtype::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    case Dtype::F16: static_cast<uint16_t*>(p)[i] = float_to_f16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Whether row m's outputs can be formed as fma(acc, a_scale[m] * b_scale[n], bias) in float32:
// true unless that scale product would overflow (x near FLT_MAX with a large weight scale, where
// 0 * Inf would turn a true 0 into NaN) or fall below the normal range (and lose precision).
// a_scale_lo / a_scale_hi bound the safe row scales for this weight (see GemmArgs); zero and NaN
// row scales are safe (the output is the bias, or NaN).
inline bool float_epilogue_is_exact(const GemmArgs& g, int64_t m) {
  const double s = g.a_scale[m];
  return !(s > 0 && (s < g.a_scale_lo || s > g.a_scale_hi));
}

// The fused epilogue of one 16-channel block for row m, from the exact int32 sums of q * w. Rows
// whose scale product leaves float32's normal range take it in double (the product of two
// float32 values is exact there), rounded once to float32: rare, and never on real activations.
inline void epilogue_block_scalar(const GemmArgs& g, const int32_t* acc, int64_t m, int64_t nb) {
  const bool fast = float_epilogue_is_exact(g, m);
  for (int64_t j = 0; j < kBlockN && nb * kBlockN + j < g.N; ++j) {
    const int64_t n = nb * kBlockN + j;
    const float bias = g.bias ? g.bias[n] : 0.f;
    const float v = fast ? std::fma(float(acc[j]), g.a_scale[m] * g.b_scale[n], bias)
                         : float(std::fma(double(acc[j]), double(g.a_scale[m]) * g.b_scale[n], double(bias)));
    store_from_float(g.out, g.out_dtype, m * g.ldo + n, v);
  }
}

}  // namespace
}  // namespace torchslim::cpu
