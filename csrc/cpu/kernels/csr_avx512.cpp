// AVX-512 CSR kernels (F/BW/VL/DQ; the bfloat16 tiles also AVX512_BF16). Two ways to use the lanes:
//  - gather (few rows of x): 16 stored entries at a time; their columns index x's row, which stays
//    in L1/L2, with one vgatherdps per row of x. At M = 1 the weight's bytes set the time: values +
//    columns, 4 bytes per entry with bfloat16 values and int16 columns (against 2 per weight dense).
//  - tokens (many rows of x): x transposed into tiles of T tokens; each entry is one broadcast value
//    times T consecutive activations (one line per 16 float32 tokens) into T float32 accumulators, or
//    with bfloat16 x, each pair of entries one vdpbf16ps per 16 tokens.
// Every column is checked (in [0, K), strictly increasing within its row) before it is an index.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "csr.h"
#include "scalar_convert.h"

namespace torchslim::cpu {
namespace {

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

template <bool C16>
inline __m512i load_cols(const void* col, int64_t j, __mmask16 lm) {
  if constexpr (C16) return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(lm, static_cast<const int16_t*>(col) + j));
  else return _mm512_maskz_loadu_epi32(lm, static_cast<const int32_t*>(col) + j);
}

template <Dtype W>
inline __m512 load_values(const void* v, int64_t j, __mmask16 lm) {
  if constexpr (W == Dtype::BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(lm, static_cast<const uint16_t*>(v) + j);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (W == Dtype::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, static_cast<const uint16_t*>(v) + j));
  } else {
    return _mm512_maskz_loadu_ps(lm, static_cast<const float*>(v) + j);
  }
}

// Lanes lm of idx hold columns j .. j + 15 of a row; prev's lane 15 is the column before j (-1 at
// the row's start). Returns the lanes whose column is in [0, K) (safe to read); clears ok when a
// lane is out of range or not above the column before it.
inline __mmask16 check_cols(__m512i idx, __m512i prev, __mmask16 lm, __m512i k, bool& ok) {
  const __mmask16 in = _mm512_mask_cmplt_epu32_mask(lm, idx, k);
  const __mmask16 up = _mm512_mask_cmpgt_epi32_mask(lm, idx, _mm512_alignr_epi32(idx, prev, 15));
  ok &= (in & up) == lm;
  return in;
}

// Entries ahead of use whose columns and values are prefetched. The hardware prefetchers left both
// kernels latency-bound on the weight stream (the gathers and the per-row loops keep few misses in
// flight): measured at M = 1, bfloat16, 90% sparse, alternating in one process, 4096 x 4096 went
// from 763 to 352-387 us with 1024-4096 entries ahead, 11008 x 4096 from 1490 to 813-842; at M = 4
// and 8 the token tiles gained ~25%.
constexpr int64_t kPrefetchAhead = 2048;

// Prefetches the columns and values of entries [j0, j1) (which may lie beyond the tensors: a
// prefetch never faults) into L1.
template <bool C16, Dtype W>
inline void prefetch_range(const CsrArgs& a, int64_t j0, int64_t j1) {
  constexpr int64_t col_size = C16 ? 2 : 4, value_size = W == Dtype::F32 ? 4 : 2;
  const char* c = static_cast<const char*>(a.col);
  const char* v = static_cast<const char*>(a.values);
  for (int64_t b = j0 * col_size; b < j1 * col_size; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
  for (int64_t b = j0 * value_size; b < j1 * value_size; b += 64) _mm_prefetch(v + b, _MM_HINT_T0);
}

// Row n against rows m0 .. m0 + MB - 1 of x (float32, (M, K)).
template <Dtype W, bool C16, int MB>
void gather_row(const CsrArgs& a, int64_t n, int64_t m0, bool& ok) {
  const int64_t s = a.crow[n], e = a.crow[n + 1];
  const float* xr[MB];
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) {
    xr[i] = static_cast<const float*>(a.x) + (m0 + i) * a.K;
    acc[i] = _mm512_setzero_ps();
  }
  const __m512i k = _mm512_set1_epi32(int32_t(a.K));
  __m512i prev = _mm512_set1_epi32(-1);
  for (int64_t j = s; j < e; j += 16) {
    prefetch_range<C16, W>(a, j + kPrefetchAhead, j + kPrefetchAhead + 16);
    const __mmask16 lm = lanes(e - j);
    const __m512i idx = load_cols<C16>(a.col, j, lm);
    const __mmask16 safe = check_cols(idx, prev, lm, k, ok);
    prev = idx;
    const __m512 v = load_values<W>(a.values, j, lm);
    for (int i = 0; i < MB; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), safe, idx, xr[i], 4), v, acc[i]);
  }
  const float b = a.bias ? a.bias[n] : 0.f;
  for (int i = 0; i < MB; ++i) store_from_float(a.out, a.out_dtype, (m0 + i) * a.ldo + n, _mm512_reduce_add_ps(acc[i]) + b);
}

template <Dtype W, bool C16>
bool gather_rows(const CsrArgs& a, int64_t n0, int64_t n1) {
  constexpr int kMB = 3;  // the op calls this kernel for up to 3 rows of x (kGatherMaxRows)
  bool ok = true;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + kMB <= a.M; m += kMB) gather_row<W, C16, kMB>(a, n, m, ok);
    switch (a.M - m) {
      case 2: gather_row<W, C16, 2>(a, n, m, ok); break;
      case 1: gather_row<W, C16, 1>(a, n, m, ok); break;
      default: break;
    }
  }
  return ok;
}

template <bool C16>
inline int64_t col_at(const void* col, int64_t j) {
  if constexpr (C16) return static_cast<const int16_t*>(col)[j];
  else return static_cast<const int32_t*>(col)[j];
}

template <Dtype W>
inline float value_at(const void* v, int64_t j) {
  if constexpr (W == Dtype::F16) return _cvtsh_ss(static_cast<const uint16_t*>(v)[j]);
  else if constexpr (W == Dtype::BF16) return bf16_to_float(static_cast<const uint16_t*>(v)[j]);
  else return static_cast<const float*>(v)[j];
}

// Entries ahead whose tile rows (the activations of their columns) the bfloat16 tiles prefetch into
// L1: the columns are random, so the hardware prefetchers cannot, and the kernel waited on L2.
// Measured alternating in one process, 4096 x 4096 at 90%: bf16 M = 128 6.15 -> 4.86 ms, M = 64
// 3.42 -> 2.66 (16 to 32 ahead alike); M = 512 (2 threads, rotated weights) 21.3 -> 19.5 ms today.
// The float32 tiles measured the other way once the weight stream was prefetched too (kPrefetchAhead):
// without the tile-row prefetch they are 5-20% faster (fp32 x, 2 threads, rotated weights, two rounds:
// M = 4 1.33-1.43 -> 1.19-1.24 ms, M = 8 1.41-1.43 -> 1.17-1.19, M = 16 1.52-1.76 -> 1.38-1.55, M = 64
// 3.27-3.86 -> 3.10-3.59, M = 128 6.29-7.13 -> 5.82-6.98), so they issue none: out-of-order execution
// overlaps the L2 reads of U R independent chains, and the prefetches only took load slots.
constexpr int64_t kTilePrefetchAhead = 32;

// Prefetches the T activations of the columns of entries [j, j + n) of a tile (elements of esize bytes).
template <bool C16, int64_t T, int64_t esize, class X>
inline void prefetch_tile_rows(const CsrArgs& a, const X* xt, int64_t j, int n) {
  for (int q = 0; q < n; ++q) {
    const char* row = reinterpret_cast<const char*>(xt + col_at<C16>(a.col, j + q) * T);
    for (int64_t b = 0; b < T * esize; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
  }
}

// Whether every column of rows [c0, c1) is in range and increasing within its row.
template <bool C16>
bool check_rows(const CsrArgs& a, int64_t c0, int64_t c1) {
  const __m512i k = _mm512_set1_epi32(int32_t(a.K));
  bool ok = true;
  for (int64_t n = c0; n < c1; ++n) {
    const int64_t s = a.crow[n], e = a.crow[n + 1];
    __m512i prev = _mm512_set1_epi32(-1);
    for (int64_t j = s; j < e; j += 16) {
      const __mmask16 lm = lanes(e - j);
      const __m512i idx = load_cols<C16>(a.col, j, lm);
      check_cols(idx, prev, lm, k, ok);
      prev = idx;
    }
  }
  return ok;
}

// V float32 lanes: __m128, __m256 or __m512 (tiles of 4 and 8 tokens use the narrow ones: per entry
// one load and one FMA of exactly the tokens there are).
template <int V>
struct F32Vec;
template <>
struct F32Vec<4> {
  using T = __m128;
  static T zero() { return _mm_setzero_ps(); }
  static T set1(float v) { return _mm_set1_ps(v); }
  static T load(const float* p) { return _mm_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm_add_ps(a, b); }
  static void store(float* p, T v) { _mm_storeu_ps(p, v); }
};
template <>
struct F32Vec<8> {
  using T = __m256;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
template <>
struct F32Vec<16> {
  using T = __m512;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};

// Row n (values of any dtype) times a float32 tile of T tokens (x[:, k] at xt + k T) into
// sums[0 .. T): per entry one broadcast value times the T activations of its column (R vectors of V
// lanes); U sets of accumulators take turns (U R independent FMA chains).
template <Dtype W, bool C16, int T>
inline void row_f32(const CsrArgs& a, int64_t n, const float* xt, float* sums) {
  constexpr int V = T < 16 ? T : 16, R = T / V, U = R == 1 ? 4 : 2;
  using Vec = F32Vec<V>;
  typename Vec::T s[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) s[u][r] = Vec::zero();
  const int64_t e = a.crow[n + 1];
  int64_t j = a.crow[n];
  for (; j + U <= e; j += U) {
    for (int u = 0; u < U; ++u) {
      const float* p = xt + col_at<C16>(a.col, j + u) * T;
      const auto v = Vec::set1(value_at<W>(a.values, j + u));
      for (int r = 0; r < R; ++r) s[u][r] = Vec::fma(v, Vec::load(p + V * r), s[u][r]);
    }
  }
  for (; j < e; ++j) {
    const float* p = xt + col_at<C16>(a.col, j) * T;
    const auto v = Vec::set1(value_at<W>(a.values, j));
    for (int r = 0; r < R; ++r) s[0][r] = Vec::fma(v, Vec::load(p + V * r), s[0][r]);
  }
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < R; ++r) s[0][r] = Vec::add(s[0][r], s[u][r]);
  for (int r = 0; r < R; ++r) Vec::store(sums + V * r, s[0][r]);
}

// Row n (bfloat16 values) times a bfloat16 tile of T = 32 or 64 tokens (x[:, k] at xt + k T, column K
// all zero) into sums[0 .. T): two entries at a time. Their two columns of x are interleaved
// (vpunpck{l,h}wd: token i's pair (x[i, c0], x[i, c1])) and one vdpbf16ps multiplies 16 tokens' pairs by
// the pair of values (the two consecutive bfloat16 values, one 32-bit word): 32 multiply-adds per
// instruction, twice an FMA's. An odd last entry is paired with the zero column K.
template <bool C16, int T>
inline void row_bf16(const CsrArgs& a, int64_t n, const uint16_t* xt, float* sums) {
  static_assert(T % 32 == 0, "bfloat16 tiles hold 32 tokens per vector");
  constexpr int R = T / 16, U = 2;
  __m512 s[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) s[u][r] = _mm512_setzero_ps();
  const auto* v16 = static_cast<const uint16_t*>(a.values);
  const auto step = [&](int u, int64_t c0, int64_t c1, uint32_t w) {
    const __m512i wv = _mm512_set1_epi32(int32_t(w));
    for (int q = 0; q < R / 2; ++q) {
      const __m512i x0 = _mm512_loadu_si512(xt + c0 * T + 32 * q), x1 = _mm512_loadu_si512(xt + c1 * T + 32 * q);
      s[u][2 * q] = _mm512_dpbf16_ps(s[u][2 * q], (__m512bh)_mm512_unpacklo_epi16(x0, x1), (__m512bh)wv);
      s[u][2 * q + 1] = _mm512_dpbf16_ps(s[u][2 * q + 1], (__m512bh)_mm512_unpackhi_epi16(x0, x1), (__m512bh)wv);
    }
  };
  const int64_t e = a.crow[n + 1];
  int64_t j = a.crow[n];
  for (; j + 2 * U <= e; j += 2 * U) {
    if (j + 2 * U + kTilePrefetchAhead <= e) prefetch_tile_rows<C16, T, 2>(a, xt, j + kTilePrefetchAhead, 2 * U);
    for (int u = 0; u < U; ++u) {
      uint32_t w;
      std::memcpy(&w, v16 + j + 2 * u, 4);
      step(u, col_at<C16>(a.col, j + 2 * u), col_at<C16>(a.col, j + 2 * u + 1), w);
    }
  }
  for (; j + 2 <= e; j += 2) {
    uint32_t w;
    std::memcpy(&w, v16 + j, 4);
    step(0, col_at<C16>(a.col, j), col_at<C16>(a.col, j + 1), w);
  }
  if (j < e) step(1, col_at<C16>(a.col, j), a.K, v16[j]);
  // Lane i of the low / high half of 32-token group q is token 32 q + 8 (i / 4) + i % 4 (+ 4).
  alignas(64) float lanes_out[R][16];
  for (int r = 0; r < R; ++r) _mm512_store_ps(lanes_out[r], _mm512_add_ps(s[0][r], s[1][r]));
  for (int q = 0; q < R / 2; ++q)
    for (int i = 0; i < 16; ++i) {
      sums[32 * q + 8 * (i / 4) + i % 4] = lanes_out[2 * q][i];
      sums[32 * q + 8 * (i / 4) + i % 4 + 4] = lanes_out[2 * q + 1][i];
    }
}

// Rows [n0, n1) against every tile of T tokens: the rows' columns are checked first (no column
// is an index before it is checked), then each tile (K x T values, in L2) multiplies every row, tile by
// tile. Reading a tile's rows at random from L2 is what bounds this kernel (~5 ns per 4 lines on this
// Sapphire Rapids vCPU, 2.7 from L1). Blocking K so that a tile slice stays in L1 measured slower: a
// row has only a few entries per block, and the per-(row, block) work ate the gain.
template <Dtype W, bool C16, int T>
bool token_rows(const CsrArgs& a, int64_t n0, int64_t n1) {
  if (!check_rows<C16>(a, n0, n1)) return false;  // the call raises
  const int64_t tiles = (a.M + T - 1) / T, tile_elems = (a.K + 1) * T;
  alignas(64) float sums[T];
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t mt = std::min<int64_t>(T, a.M - t * T);
    for (int64_t n = n0; n < n1; ++n) {
      prefetch_range<C16, W>(a, a.crow[n] + kPrefetchAhead, a.crow[n + 1] + kPrefetchAhead);
      if constexpr (W == Dtype::BF16 && T % 32 == 0) {
        if (a.x_bf16) row_bf16<C16, T>(a, n, static_cast<const uint16_t*>(a.x) + t * tile_elems, sums);
        else row_f32<W, C16, T>(a, n, static_cast<const float*>(a.x) + t * tile_elems, sums);
      } else {
        row_f32<W, C16, T>(a, n, static_cast<const float*>(a.x) + t * tile_elems, sums);
      }
      const float bias = a.bias ? a.bias[n] : 0.f;
      for (int64_t i = 0; i < mt; ++i) store_from_float(a.out, a.out_dtype, (t * T + i) * a.ldo + n, sums[i] + bias);
    }
  }
  return true;
}

template <template <Dtype, bool> class F, class... Args>
bool dispatch(const CsrArgs& a, Args... args) {
  const auto call = [&]<Dtype W>() { return a.col16 ? F<W, true>::run(a, args...) : F<W, false>::run(a, args...); };
  switch (a.w_dtype) {
    case Dtype::BF16: return call.template operator()<Dtype::BF16>();
    case Dtype::F16: return call.template operator()<Dtype::F16>();
    default: return call.template operator()<Dtype::F32>();
  }
}

template <Dtype W, bool C16>
struct Gather {
  static bool run(const CsrArgs& a, int64_t n0, int64_t n1) { return gather_rows<W, C16>(a, n0, n1); }
};

template <Dtype W, bool C16>
struct Tokens {
  static bool run(const CsrArgs& a, int64_t n0, int64_t n1) {
    switch (a.T) {
      case 4: return token_rows<W, C16, 4>(a, n0, n1);
      case 8: return token_rows<W, C16, 8>(a, n0, n1);
      case 16: return token_rows<W, C16, 16>(a, n0, n1);
      case 32: return token_rows<W, C16, 32>(a, n0, n1);
      default: return token_rows<W, C16, 64>(a, n0, n1);
    }
  }
};

}  // namespace

bool csr_rows_gather_avx512(const CsrArgs& a, int64_t n0, int64_t n1) { return dispatch<Gather>(a, n0, n1); }

bool csr_rows_tokens_avx512(const CsrArgs& a, int64_t n0, int64_t n1) { return dispatch<Tokens>(a, n0, n1); }

}  // namespace torchslim::cpu
