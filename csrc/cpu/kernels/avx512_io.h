// 16-lane float loads and stores in float32 / bfloat16 / float16 for AVX-512 kernels (masked, so
// row and column tails never touch memory outside the tensor). Only included by files compiled
// with AVX-512 flags.
#pragma once
#include <immintrin.h>

#include "int8_gemm.h"
#include "scalar_convert.h"

namespace torchslim::cpu {
namespace {

inline __m512 load16(const void* p, Dtype dt, int64_t i, __mmask16 mask) {
  switch (dt) {
    case Dtype::BF16: {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case Dtype::F16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
    default:
      return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
  }
}

inline void store16(void* p, Dtype dt, int64_t i, __m512 v, __mmask16 mask) {
  switch (dt) {
    case Dtype::BF16: {
#ifdef __AVX512BF16__
      // One instruction (round to nearest even) where the file is built for AVX512_BF16 (AMX);
      // NaN made the quiet NaN 0x7FC0, as on the other paths (it keeps the sign and payload).
      const __m256i h = _mm256_mask_mov_epi16((__m256i)_mm512_cvtneps_pbh(v), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                              _mm256_set1_epi16(0x7FC0));
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, mask, h);
      break;
#endif
      // Round to nearest even; NaN becomes the quiet NaN 0x7FC0, as c10::BFloat16 does.
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, mask, _mm512_cvtepi32_epi16(r));
      break;
    }
    case Dtype::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, mask,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    default:
      _mm512_mask_storeu_ps(static_cast<float*>(p) + i, mask, v);
  }
}

inline __mmask16 tail_mask(int64_t valid) {
  return valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
}

// Per-channel epilogue operands of one 16-channel block, loaded once for all its rows.
struct ChannelBlock {
  __m512 scale, bias;
  __mmask16 mask;
  int64_t n0;
};

inline ChannelBlock channel_block(const GemmArgs& g, int64_t n0) {
  const __mmask16 mask = tail_mask(g.N - n0);
  return {_mm512_maskz_loadu_ps(mask, g.b_scale + n0),
          g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + n0) : _mm512_setzero_ps(), mask, n0};
}

// The epilogue of a tile in which some row's scale product leaves float32's normal range (rare):
// the scalar epilogue, which takes those rows in double.
__attribute__((noinline, cold)) void epilogue_tile_scalar(const GemmArgs& g, const ChannelBlock* cbs, int64_t n,
                                                          int64_t m, int64_t rows, const int32_t* const* sums,
                                                          int64_t row_stride) {
  alignas(64) int32_t c[kBlockN];
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      _mm512_store_si512(c, _mm512_sub_epi32(_mm512_load_si512(sums[j] + r * row_stride),
                                             _mm512_set1_epi32(g.a_offset[m + r])));
      epilogue_block_scalar(g, c, m + r, cbs[j].n0 / kBlockN);
    }
}

// The fused epilogue of a tile: rows [m, m + rows) x the n blocks of cbs, the int32 sums of
// q * (w + 128) of row r and block j at sums[j] + r * row_stride: undo the offset with the row sum
// of q, int32 -> float, both scales, bias, cast, store. The arguments are read into locals once
// (the output stores could alias g and force reloads: at small K the epilogue is a large share of
// the time). A tile with a row whose scale product leaves float32's normal range goes to the
// scalar epilogue, which takes that row in double.
__attribute__((always_inline)) inline void epilogue_tile(const GemmArgs& g, const ChannelBlock* cbs, int64_t n,
                                                         int64_t m, int64_t rows, const int32_t* const* sums,
                                                         int64_t row_stride) {
  bool exact = true;
  for (int64_t r = 0; r < rows; ++r) exact &= float_epilogue_is_exact(g, m + r);
  if (__builtin_expect(!exact, 0)) return epilogue_tile_scalar(g, cbs, n, m, rows, sums, row_stride);
  const float* a_scale = g.a_scale + m;
  const int32_t* a_offset = g.a_offset + m;
  void* out = g.out;
  const int64_t ldo = g.ldo;
  const Dtype dtype = g.out_dtype;
  for (int64_t j = 0; j < n; ++j) {
    const ChannelBlock cb = cbs[j];
    for (int64_t r = 0; r < rows; ++r) {
      const __m512i acc = _mm512_sub_epi32(_mm512_load_si512(sums[j] + r * row_stride), _mm512_set1_epi32(a_offset[r]));
      const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(cb.scale, _mm512_set1_ps(a_scale[r])), cb.bias);
      store16(out, dtype, (m + r) * ldo + cb.n0, v, cb.mask);
    }
  }
}

}  // namespace
}  // namespace torchslim::cpu
