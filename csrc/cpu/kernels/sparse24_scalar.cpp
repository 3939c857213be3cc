// Portable 2:4 kernels (any x86-64): decode each group's two positions, two multiply-adds per group.
#include <cstring>

#include "scalar_convert.h"
#include "sparse24.h"

namespace torchslim::cpu {

bool s24_linear_rows_scalar(const S24Args& a, int64_t n0, int64_t n1) {
  const int64_t words = a.K_pad / kS24ColsPerWord, row_values = a.K_pad / 2;
  const float* x = static_cast<const float*>(a.x);  // this path always gets float32 activations
  bool ok = true;
  for (int64_t n = n0; n < n1; ++n) {
    const int16_t* meta = a.meta + n * words;
    const int64_t v0 = n * row_values;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* xr = x + m * a.ldx;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};  // one partial sum per group of a word: 4x shorter chains
      for (int64_t w = 0; w < words; ++w) {
        const uint16_t word = uint16_t(meta[w]);
        for (int j = 0; j < 4; ++j) {
          const int nib = (word >> (4 * j)) & 0xF;
          const int64_t col = w * kS24ColsPerWord + 4 * j, v = v0 + w * 8 + 2 * j;
          if (s24_nibble_entry(nib) & 0x10) {
            ok = false;
            continue;
          }
          const int64_t c0 = col + (nib & 3), c1 = col + (nib >> 2);
          if (c0 < a.K) acc[j] += load_as_float(a.values, a.w_dtype, v) * xr[c0];  // padding never counts
          if (c1 < a.K) acc[j] += load_as_float(a.values, a.w_dtype, v + 1) * xr[c1];
        }
      }
      float sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      if (a.bias) sum += a.bias[n];
      store_from_float(a.out, a.out_dtype, m * a.ldo + n, sum);
    }
  }
  return ok;
}

bool s24_expand_rows_scalar(const S24Expand& e, int64_t n0, int64_t n1) {
  const int64_t words = e.K_pad / kS24ColsPerWord, row_values = e.K_pad / 2;
  const int64_t esize = e.w_dtype == Dtype::F32 ? 4 : 2;
  bool ok = true;
  for (int64_t n = n0; n < n1; ++n) {
    char* dst = static_cast<char*>(e.dst) + (n - n0) * e.ld * esize;
    const char* src = static_cast<const char*>(e.values) + n * row_values * esize;
    std::memset(dst, 0, e.K_pad * esize);
    for (int64_t w = 0; w < words; ++w) {
      const uint16_t word = uint16_t(e.meta[n * words + w]);
      for (int j = 0; j < 4; ++j) {
        const int nib = (word >> (4 * j)) & 0xF;
        if (s24_nibble_entry(nib) & 0x10) {
          ok = false;
          continue;
        }
        const int64_t col = w * kS24ColsPerWord + 4 * j, v = w * 8 + 2 * j;
        const int64_t c0 = col + (nib & 3), c1 = col + (nib >> 2);
        if (c0 < e.K) std::memcpy(dst + c0 * esize, src + v * esize, esize);
        if (c1 < e.K) std::memcpy(dst + c1 * esize, src + (v + 1) * esize, esize);
      }
    }
  }
  return ok;
}

}  // namespace torchslim::cpu
