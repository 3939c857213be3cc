// AVX-512 CSR kernels (F/BW/VL/DQ). Two ways to use 16 lanes:
//  - gather (few rows of x): 16 stored entries at a time; their columns index x's row, which stays
//    in L1/L2, with one vgatherdps per row of x. At M = 1 the time is the bytes of the weight:
//    values + columns, 4 bytes per entry with bfloat16 values and int16 columns.
//  - tokens (many rows of x): x transposed into tiles of T tokens; each entry is one broadcast value
//    times T consecutive activations (one L1/L2 line per 16 tokens) into T float32 accumulators.
// Every column is checked (in [0, K), strictly increasing within its row) before it is an index.
#include <immintrin.h>

#include <algorithm>
#include <new>
#include <vector>

#include "csr.h"
#include "scalar_convert.h"

namespace torchslim::cpu {
namespace {

// 64-byte aligned storage for aligned vector loads and stores.
template <class V>
struct AlignedAllocator {
  using value_type = V;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  V* allocate(size_t n) { return static_cast<V*>(::operator new(n * sizeof(V), std::align_val_t(64))); }
  void deallocate(V* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const AlignedAllocator&) const { return true; }
};

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

// Row n against rows m0 .. m0 + MB - 1 of x (float32, (M, K)).
template <Dtype W, bool C16, int MB>
void gather_row(const CsrArgs& a, int64_t n, int64_t m0, bool& ok) {
  const int64_t s = a.crow[n], e = a.crow[n + 1];
  const float* xr[MB];
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) {
    xr[i] = a.x + (m0 + i) * a.K;
    acc[i] = _mm512_setzero_ps();
  }
  const __m512i k = _mm512_set1_epi32(int32_t(a.K));
  __m512i prev = _mm512_set1_epi32(-1);
  for (int64_t j = s; j < e; j += 16) {
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
  constexpr int kMB = 4;
  bool ok = true;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + kMB <= a.M; m += kMB) gather_row<W, C16, kMB>(a, n, m, ok);
    switch (a.M - m) {
      case 3: gather_row<W, C16, 3>(a, n, m, ok); break;
      case 2: gather_row<W, C16, 2>(a, n, m, ok); break;
      case 1: gather_row<W, C16, 1>(a, n, m, ok); break;
      default: break;
    }
  }
  return ok;
}

// Entries [j0, j1) of a row (columns in cols, float32 values in vals) times the tile xt (x[:, k] at
// xt + k T) into the R vectors at acc: U sets of accumulators take turns, U R independent FMA chains.
template <int R>
inline void row_block(const int32_t* cols, const float* vals, int64_t j0, int64_t j1, const float* xt, float* acc) {
  constexpr int64_t T = 16 * R;
  constexpr int U = R == 1 ? 4 : 2;
  __m512 s[U][R];
  for (int r = 0; r < R; ++r) s[0][r] = _mm512_load_ps(acc + 16 * r);
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < R; ++r) s[u][r] = _mm512_setzero_ps();
  int64_t j = j0;
  for (; j + U <= j1; j += U)
    for (int u = 0; u < U; ++u) {
      const float* p = xt + int64_t(cols[j + u]) * T;
      const __m512 v = _mm512_set1_ps(vals[j + u]);
      for (int r = 0; r < R; ++r) s[u][r] = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16 * r), s[u][r]);
    }
  for (; j < j1; ++j) {
    const float* p = xt + int64_t(cols[j]) * T;
    const __m512 v = _mm512_set1_ps(vals[j]);
    for (int r = 0; r < R; ++r) s[0][r] = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16 * r), s[0][r]);
  }
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < R; ++r) s[0][r] = _mm512_add_ps(s[0][r], s[u][r]);
  for (int r = 0; r < R; ++r) _mm512_store_ps(acc + 16 * r, s[0][r]);
}

// Rows [n0, n1) against every tile of T = 16 R tokens. An entry reads T activations of one column:
// read from L2 at random, that line rate limited the kernel (~10 cycles per entry at T = 64), so the
// columns go in blocks of kc whose activations (kc x T floats, 16 KiB) stay in L1 while every row of
// a chunk runs over its entries in the block, its T sums kept in acc between blocks. A chunk (rows
// with ~16K entries) has its columns checked, its values converted to float32 and its rows' block
// boundaries found once, then runs over every tile.
template <Dtype W, bool C16, int R>
bool token_rows(const CsrArgs& a, int64_t n0, int64_t n1) {
  constexpr int64_t T = 16 * R, kc = 256 / R, kChunkEntries = 16384;
  const int64_t tiles = (a.M + T - 1) / T, blocks = (a.K + kc - 1) / kc;
  const __m512i k = _mm512_set1_epi32(int32_t(a.K));
  std::vector<int32_t> cols, bounds;
  std::vector<float> vals;
  std::vector<float, AlignedAllocator<float>> acc;
  bool ok = true;
  for (int64_t c0 = n0; c0 < n1;) {
    int64_t c1 = c0 + 1;  // the chunk: rows c0 .. c1 - 1, at least one
    while (c1 < n1 && a.crow[c1 + 1] - a.crow[c0] <= kChunkEntries) ++c1;
    const int64_t base = a.crow[c0], entries = a.crow[c1] - base, rows = c1 - c0;
    cols.resize(entries + 16);
    vals.resize(entries + 16);
    bool chunk_ok = true;
    for (int64_t n = c0; n < c1; ++n) {
      const int64_t s = a.crow[n], e = a.crow[n + 1];
      __m512i prev = _mm512_set1_epi32(-1);
      for (int64_t j = s; j < e; j += 16) {
        const __mmask16 lm = lanes(e - j);
        const __m512i idx = load_cols<C16>(a.col, j, lm);
        check_cols(idx, prev, lm, k, chunk_ok);
        prev = idx;
        _mm512_mask_storeu_epi32(cols.data() + (j - base), lm, idx);
        _mm512_mask_storeu_ps(vals.data() + (j - base), lm, load_values<W>(a.values, j, lm));
      }
    }
    if (!chunk_ok) {  // no column of this chunk is used; the call raises
      ok = false;
      c0 = c1;
      continue;
    }
    // bounds[r (blocks + 1) + b]: the first entry (chunk offset) of row c0 + r at or beyond column b kc.
    bounds.resize(rows * (blocks + 1));
    for (int64_t r = 0; r < rows; ++r) {
      int64_t j = a.crow[c0 + r] - base;
      const int64_t e = a.crow[c0 + r + 1] - base;
      for (int64_t b = 0; b < blocks; ++b) {
        while (j < e && cols[j] < b * kc) ++j;
        bounds[r * (blocks + 1) + b] = int32_t(j);
      }
      bounds[r * (blocks + 1) + blocks] = int32_t(e);
    }
    acc.resize(rows * T);
    for (int64_t t = 0; t < tiles; ++t) {
      const float* xt = a.x + t * a.K * T;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t* br = bounds.data() + r * (blocks + 1) + b;
          if (br[1] > br[0]) row_block<R>(cols.data(), vals.data(), br[0], br[1], xt, acc.data() + r * T);
        }
      const int64_t mt = std::min(T, a.M - t * T);
      for (int64_t r = 0; r < rows; ++r) {
        const float bias = a.bias ? a.bias[c0 + r] : 0.f;
        for (int64_t i = 0; i < mt; ++i)
          store_from_float(a.out, a.out_dtype, (t * T + i) * a.ldo + c0 + r, acc[r * T + i] + bias);
      }
    }
    c0 = c1;
  }
  return ok;
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
      case 16: return token_rows<W, C16, 1>(a, n0, n1);
      case 32: return token_rows<W, C16, 2>(a, n0, n1);
      default: return token_rows<W, C16, 4>(a, n0, n1);
    }
  }
};

}  // namespace

bool csr_rows_gather_avx512(const CsrArgs& a, int64_t n0, int64_t n1) { return dispatch<Gather>(a, n0, n1); }

bool csr_rows_tokens_avx512(const CsrArgs& a, int64_t n0, int64_t n1) { return dispatch<Tokens>(a, n0, n1); }

}  // namespace torchslim::cpu
