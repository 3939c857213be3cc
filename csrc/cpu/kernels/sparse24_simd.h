// AVX-512 building blocks of the 2:4 kernels (sparse24_avx512.cpp, sparse24_amx.cpp): metadata to
// lane masks, and the expansion of compressed values into their lanes. Only included by files
// compiled with AVX-512 BW + VBMI2 flags.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "sparse24.h"

namespace torchslim::cpu {
namespace {

// Columns per slab: the lane masks of 512 columns (64 meta bytes) are made in one pass.
constexpr int64_t kSlab = 512;

// The lane masks of up to 64 meta bytes (2 groups each) into mk[0..nbytes): byte b of mk holds
// the masks of groups 2b (bits 0-3) and 2b + 1 (bits 4-7), bit i of byte b being column 8b + i.
// Columns from live_cols on (the padding beyond K) get no lane: whatever the values hold there
// never meets x. Returns false on an invalid nibble.
inline bool s24_lane_masks(const uint8_t* meta, int64_t nbytes, int64_t live_cols, uint8_t* mk) {
  static const __m512i lut = [] {
    alignas(64) uint8_t t[64];
    for (int i = 0; i < 64; ++i) t[i] = s24_nibble_entry(i & 15);
    return _mm512_load_si512(t);
  }();
  const __mmask64 live = nbytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << nbytes) - 1;
  const __m512i b = _mm512_maskz_loadu_epi8(live, meta);
  const __m512i nib_mask = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(b, nib_mask));
  const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(b, 4), nib_mask));
  const __m512i m = _mm512_or_si512(_mm512_and_si512(lo, nib_mask), _mm512_slli_epi16(_mm512_and_si512(hi, nib_mask), 4));
  _mm512_storeu_si512(mk, m);
  for (int64_t b = live_cols / 8; b < nbytes; ++b) {  // the row's last slab only
    const int64_t keep = live_cols - 8 * b;  // < 8
    mk[b] &= keep <= 0 ? 0 : uint8_t((1u << keep) - 1);
  }
  return _mm512_mask_test_epi8_mask(live, _mm512_or_si512(lo, hi), _mm512_set1_epi8(0x10)) == 0;
}

// One step of the weight in 16-bit lanes: 32 columns from 16 values (or 16 columns from 8 values
// at the end of a row, the upper lanes zero).
inline __m512i s24_expand16(const uint16_t* v, const uint8_t* mk, bool half) {
  if (half) {
    uint16_t k;
    std::memcpy(&k, mk, 2);
    return _mm512_maskz_expand_epi16(k, _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(0xFF, v)));
  }
  uint32_t k;
  std::memcpy(&k, mk, 4);
  return _mm512_maskz_expand_epi16(k, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))));
}

// 16 columns of a float32 weight from 8 values.
inline __m512 s24_expand32(const float* v, const uint8_t* mk) {
  uint16_t k;
  std::memcpy(&k, mk, 2);
  return _mm512_maskz_expand_ps(k, _mm512_castps256_ps512(_mm256_loadu_ps(v)));
}

}  // namespace
}  // namespace torchslim::cpu
