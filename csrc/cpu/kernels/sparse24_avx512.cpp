// AVX-512 2:4 kernels (F/BW/VL/DQ + BF16 + VBMI2). Each group's 4-bit metadata becomes a 4-bit lane
// mask (a byte shuffle of 64 meta bytes at a time); vpexpandw / vexpandps then put the kept values
// in their lanes, so a step of 32 (bfloat16, float16) or 16 (float32) columns is one load of the
// compressed values, one expand and a dense multiply-add with x: the weight is read compressed
// (1.125 bytes per bfloat16 weight instead of 2) and never expanded in memory.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "scalar_convert.h"
#include "sparse24.h"
#include "sparse24_simd.h"

namespace torchslim::cpu {
namespace {

inline __m512 f16_low(__m512i w) { return _mm512_cvtph_ps(_mm512_castsi512_si256(w)); }
inline __m512 f16_high(__m512i w) { return _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1)); }

// NB weight rows from n x MB activation rows from m. Accumulators stay in registers for the whole
// row; every step re-expands the weight (cheap: it is in L1 after the first activation block).
template <int NB, int MB>
bool block(const S24Args& a, int64_t n, int64_t m) {
  const int64_t words = a.K_pad / kS24ColsPerWord, row_values = a.K_pad / 2;
  const int64_t esize = a.w_dtype == Dtype::F32 ? 4 : 2;
  const char* vrow[NB];
  const uint8_t* mrow[NB];
  for (int r = 0; r < NB; ++r) {
    vrow[r] = static_cast<const char*>(a.values) + (n + r) * row_values * esize;
    mrow[r] = reinterpret_cast<const uint8_t*>(a.meta + (n + r) * words);
  }
  const int64_t xsize = a.x_dtype == Dtype::F32 ? 4 : 2;
  const char* xrow[MB];
  for (int i = 0; i < MB; ++i) xrow[i] = static_cast<const char*>(a.x) + (m + i) * a.ldx * xsize;
  __m512 acc[NB][MB];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  bool ok = true;
  alignas(64) uint8_t mk[NB][64];
  const Dtype wdt = a.w_dtype;
  const bool prefetch_next = row_values * esize <= 4096;
  for (int64_t c0 = 0; c0 < a.K_pad; c0 += kSlab) {
    const int64_t cols = std::min(kSlab, a.K_pad - c0);
    for (int r = 0; r < NB; ++r) {
      ok &= s24_lane_masks(mrow[r] + c0 / 8, cols / 8, a.K - c0, mk[r]);
      // The same slab of the row NB further on (the next block's), into L2 ahead of use, where rows
      // are short. NB rows are streamed at once, each only 4 KiB (bfloat16, K = 4096): the hardware
      // prefetcher, which stops at page boundaries, restarted on every row and left M = 1 reading the
      // weight from memory at ~9 GB/s against dense's ~16 (rotated weights); prefetches beyond the
      // tensor are dropped. Rows of 6 KiB and more (float32 from K = 3072) stream faster without it
      // (float32 M = 1, 4096 x 4096 and 11008 x 4096: 1.40x -> 1.47x dense; 1536 x 384 needs it: 0.94x
      // without, 1.24x with).
      if (prefetch_next) {
        const char* next = vrow[r] + NB * row_values * esize + c0 / 2 * esize;
        for (int64_t b = 0; b < cols / 2 * esize; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(mrow[r] + NB * words) + c0 / 8, _MM_HINT_T1);
      }
    }
    if (wdt == Dtype::F32) {
      for (int64_t c = 0; c < cols; c += 16) {
        __m512 w[NB];
        for (int r = 0; r < NB; ++r) w[r] = s24_expand32(reinterpret_cast<const float*>(vrow[r]) + (c0 + c) / 2, mk[r] + c / 8);
        for (int i = 0; i < MB; ++i) {
          const __m512 xv = _mm512_loadu_ps(reinterpret_cast<const float*>(xrow[i]) + c0 + c);
          for (int r = 0; r < NB; ++r) acc[r][i] = _mm512_fmadd_ps(w[r], xv, acc[r][i]);
        }
      }
      continue;
    }
    for (int64_t c = 0; c < cols; c += 32) {
      const bool half = c + 32 > cols;
      __m512i w[NB];
      for (int r = 0; r < NB; ++r) w[r] = s24_expand16(reinterpret_cast<const uint16_t*>(vrow[r]) + (c0 + c) / 2, mk[r] + c / 8, half);
      for (int i = 0; i < MB; ++i) {
        if (wdt == Dtype::BF16) {
          const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(xrow[i]) + c0 + c);
          for (int r = 0; r < NB; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)w[r], (__m512bh)xv);
        } else {  // float16 weights, float32 activations
          const float* xf = reinterpret_cast<const float*>(xrow[i]) + c0 + c;
          const __m512 x0 = _mm512_loadu_ps(xf), x1 = _mm512_loadu_ps(xf + 16);
          for (int r = 0; r < NB; ++r)
            acc[r][i] = _mm512_fmadd_ps(f16_high(w[r]), x1, _mm512_fmadd_ps(f16_low(w[r]), x0, acc[r][i]));
        }
      }
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) {
      float s = _mm512_reduce_add_ps(acc[r][i]);
      if (a.bias) s += a.bias[n + r];
      store_from_float(a.out, a.out_dtype, (m + i) * a.ldo + n + r, s);
    }
  return ok;
}

template <int NB>
bool rows_block(const S24Args& a, int64_t n) {
  constexpr int kMB = 4;
  bool ok = true;
  int64_t m = 0;
  for (; m + kMB <= a.M; m += kMB) ok &= block<NB, kMB>(a, n, m);
  switch (a.M - m) {
    case 3: ok &= block<NB, 3>(a, n, m); break;
    case 2: ok &= block<NB, 2>(a, n, m); break;
    case 1: ok &= block<NB, 1>(a, n, m); break;
    default: break;
  }
  return ok;
}

// NB dense weight rows (w, ld elements apart, zero up to a whole 32-column step) x MB activation
// rows from m: the microkernel of the buffered path.
template <int NB, int MB>
void dense_block(const S24Args& a, const char* w, int64_t ld, int64_t n, int64_t m) {
  const int64_t xsize = a.x_dtype == Dtype::F32 ? 4 : 2, wsize = a.w_dtype == Dtype::F32 ? 4 : 2;
  const char* xrow[MB];
  for (int i = 0; i < MB; ++i) xrow[i] = static_cast<const char*>(a.x) + (m + i) * a.ldx * xsize;
  __m512 acc[NB][MB];
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  const int64_t step = a.w_dtype == Dtype::F32 ? 16 : 32;
  for (int64_t c = 0; c < a.K_pad; c += step) {
    if (a.w_dtype == Dtype::F32) {
      for (int i = 0; i < MB; ++i) {
        const __m512 xv = _mm512_loadu_ps(reinterpret_cast<const float*>(xrow[i]) + c);
        for (int r = 0; r < NB; ++r)
          acc[r][i] = _mm512_fmadd_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(w + r * ld * wsize) + c), xv, acc[r][i]);
      }
    } else if (a.w_dtype == Dtype::BF16) {
      __m512i wv[NB];
      for (int r = 0; r < NB; ++r) wv[r] = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(w + r * ld * wsize) + c);
      for (int i = 0; i < MB; ++i) {
        const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(xrow[i]) + c);
        for (int r = 0; r < NB; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], (__m512bh)wv[r], (__m512bh)xv);
      }
    } else {
      __m512 lo[NB], hi[NB];
      for (int r = 0; r < NB; ++r) {
        const __m512i wv = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(w + r * ld * wsize) + c);
        lo[r] = f16_low(wv);
        hi[r] = f16_high(wv);
      }
      for (int i = 0; i < MB; ++i) {
        const float* xf = reinterpret_cast<const float*>(xrow[i]) + c;
        const __m512 x0 = _mm512_loadu_ps(xf), x1 = _mm512_loadu_ps(xf + 16);
        for (int r = 0; r < NB; ++r) acc[r][i] = _mm512_fmadd_ps(hi[r], x1, _mm512_fmadd_ps(lo[r], x0, acc[r][i]));
      }
    }
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) {
      float s = _mm512_reduce_add_ps(acc[r][i]);
      if (a.bias) s += a.bias[n + r];
      store_from_float(a.out, a.out_dtype, (m + i) * a.ldo + n + r, s);
    }
}

template <int NB>
void dense_rows(const S24Args& a, const char* w, int64_t ld, int64_t n) {
  constexpr int kMB = 4;
  int64_t m = 0;
  for (; m + kMB <= a.M; m += kMB) dense_block<NB, kMB>(a, w, ld, n, m);
  switch (a.M - m) {
    case 3: dense_block<NB, 3>(a, w, ld, n, m); break;
    case 2: dense_block<NB, 2>(a, w, ld, n, m); break;
    case 1: dense_block<NB, 1>(a, w, ld, n, m); break;
    default: break;
  }
}

}  // namespace

bool s24_linear_rows_avx512(const S24Args& a, int64_t n0, int64_t n1) {
  constexpr int kNB = 4;
  bool ok = true;
  int64_t n = n0;
  if (a.M <= 4) {
    // One block of activation rows: expand in registers, straight from the compressed weight.
    for (; n + kNB <= n1; n += kNB) ok &= rows_block<kNB>(a, n);
    for (; n < n1; ++n) ok &= rows_block<1>(a, n);
    return ok;
  }
  // Several blocks of activation rows: expand kNB weight rows once into a buffer that stays in
  // L1/L2, and run every activation block over it (expanding per block would repeat the work).
  const int64_t wsize = a.w_dtype == Dtype::F32 ? 4 : 2, ld = (a.K_pad + 31) / 32 * 32;
  std::vector<char> buf(kNB * ld * wsize, 0);  // columns K_pad .. ld stay zero
  const S24Expand e{a.values, a.w_dtype, a.meta, a.K, a.K_pad, buf.data(), ld};
  for (; n + kNB <= n1; n += kNB) {
    ok &= s24_expand_rows_avx512(e, n, n + kNB);
    dense_rows<kNB>(a, buf.data(), ld, n);
  }
  for (; n < n1; ++n) {
    ok &= s24_expand_rows_avx512(e, n, n + 1);
    dense_rows<1>(a, buf.data(), ld, n);
  }
  return ok;
}

bool s24_expand_rows_avx512(const S24Expand& e, int64_t n0, int64_t n1) {
  const int64_t words = e.K_pad / kS24ColsPerWord, row_values = e.K_pad / 2;
  bool ok = true;
  alignas(64) uint8_t mk[64];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* meta = reinterpret_cast<const uint8_t*>(e.meta + n * words);
    for (int64_t c0 = 0; c0 < e.K_pad; c0 += kSlab) {
      const int64_t cols = std::min(kSlab, e.K_pad - c0);
      ok &= s24_lane_masks(meta + c0 / 8, cols / 8, e.K - c0, mk);
      if (e.w_dtype == Dtype::F32) {
        const float* v = static_cast<const float*>(e.values) + n * row_values + c0 / 2;
        float* d = static_cast<float*>(e.dst) + (n - n0) * e.ld + c0;
        for (int64_t c = 0; c < cols; c += 16) _mm512_storeu_ps(d + c, s24_expand32(v + c / 2, mk + c / 8));
        continue;
      }
      const uint16_t* v = static_cast<const uint16_t*>(e.values) + n * row_values + c0 / 2;
      uint16_t* d = static_cast<uint16_t*>(e.dst) + (n - n0) * e.ld + c0;
      for (int64_t c = 0; c < cols; c += 32) {
        const bool half = c + 32 > cols;
        _mm512_mask_storeu_epi16(d + c, half ? 0xFFFFu : ~0u, s24_expand16(v + c / 2, mk + c / 8, half));
      }
    }
  }
  return ok;
}

}  // namespace torchslim::cpu
