// AVX-512 kernels of the low-rank products (lowrank.h): c[m, n] = sum_k a[m, k] * b[n, k], both
// operands contiguous along k, so each output is a dot product of two rows. Register blocks of up to
// 4 rows of a x 4 rows of b (16 zmm accumulators): per step every loaded vector serves 4 multiplies,
// and each row of b streams from memory once per 4 rows of a. Horizontal sums once per output.
// bfloat16 by vdpbf16ps (32 products per instruction) where the CPU has AVX512_BF16; float16 (and
// bfloat16 without it) through float32.
#include <immintrin.h>

#include <algorithm>

#include "avx512_io.h"
#include "lowrank.h"
#include "scalar_convert.h"

namespace torchslim::cpu {
namespace {

// How far ahead (bytes) each row of b is prefetched: at one row of a the kernel streams b, and the
// hardware prefetcher alone left the CSR kernel's weight stream at half speed on these machines.
constexpr int64_t kPrefetchBytes = 1024;

struct F32Step {  // float32 rows, 16 per step
  using Vec = __m512;
  static constexpr int kStep = 16;
  static Vec load(const void* p, int64_t k) { return _mm512_loadu_ps(static_cast<const float*>(p) + k); }
  static Vec load_tail(const void* p, int64_t k, int64_t n) {
    return _mm512_maskz_loadu_ps(tail_mask(n), static_cast<const float*>(p) + k);
  }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

struct Bf16DotStep {  // bfloat16 rows, 32 per step, pairs multiplied and summed by vdpbf16ps
  using Vec = __m512i;
  static constexpr int kStep = 32;
  static Vec load(const void* p, int64_t k) { return _mm512_loadu_si512(static_cast<const uint16_t*>(p) + k); }
  static Vec load_tail(const void* p, int64_t k, int64_t n) {
    return _mm512_maskz_loadu_epi16(n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1, static_cast<const uint16_t*>(p) + k);
  }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};

template <Dtype D>
struct ConvertStep {  // bfloat16 / float16 rows widened to float32, 16 per step
  using Vec = __m512;
  static constexpr int kStep = 16;
  static Vec load(const void* p, int64_t k) { return load16(p, D, k, __mmask16(0xFFFF)); }
  static Vec load_tail(const void* p, int64_t k, int64_t n) { return load16(p, D, k, tail_mask(n)); }
  static __m512 madd(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

// Rows m0..m0 + MR - 1 of a x rows n0..n0 + live - 1 of b (live <= NR; missing rows of b repeat the
// last one and are not stored).
template <class S, int MR, int NR>
void block(const LrProduct& p, int64_t m0, int64_t n0, int live, int64_t esize) {
  const char* a[MR];
  const char* b[NR];
  for (int i = 0; i < MR; ++i) a[i] = static_cast<const char*>(p.a) + (m0 + i) * p.lda * esize;
  for (int j = 0; j < NR; ++j) b[j] = static_cast<const char*>(p.b) + (n0 + std::min(j, live - 1)) * p.ldb * esize;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = p.K, ahead = kPrefetchBytes / esize;
  int64_t k = 0;
  for (; k + S::kStep <= K; k += S::kStep) {
    typename S::Vec bv[NR];
    for (int j = 0; j < NR; ++j) {
      if ((k * esize) % 64 == 0) _mm_prefetch(b[j] + (k + ahead) * esize, _MM_HINT_T0);
      bv[j] = S::load(b[j], k);
    }
    for (int i = 0; i < MR; ++i) {
      const typename S::Vec av = S::load(a[i], k);
      for (int j = 0; j < NR; ++j) acc[i][j] = S::madd(acc[i][j], av, bv[j]);
    }
  }
  if (k < K) {
    typename S::Vec bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = S::load_tail(b[j], k, K - k);
    for (int i = 0; i < MR; ++i) {
      const typename S::Vec av = S::load_tail(a[i], k, K - k);
      for (int j = 0; j < NR; ++j) acc[i][j] = S::madd(acc[i][j], av, bv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < live; ++j) {
      const float bias = p.bias ? p.bias[n0 + j] : 0.f;
      store_from_float(p.c, p.c_dtype, (m0 + i) * p.ldc + n0 + j, _mm512_reduce_add_ps(acc[i][j]) + bias);
    }
}

// With one row of a the weight stream is the whole cost: 8 rows of b at a time keep more loads in
// flight (and share each load of a across 8 products).
template <class S>
void product(const LrProduct& p, int64_t n0, int64_t n1, int64_t esize) {
  if (p.M == 1) {
    for (int64_t n = n0; n < n1; n += 8) block<S, 1, 8>(p, 0, n, int(std::min<int64_t>(8, n1 - n)), esize);
    return;
  }
  for (int64_t n = n0; n < n1; n += 4) {
    const int live = int(std::min<int64_t>(4, n1 - n));
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) block<S, 4, 4>(p, m, n, live, esize);
    switch (p.M - m) {
      case 3: block<S, 3, 4>(p, m, n, live, esize); break;
      case 2: block<S, 2, 4>(p, m, n, live, esize); break;
      case 1: block<S, 1, 4>(p, m, n, live, esize); break;
      default: break;
    }
  }
}

}  // namespace

void lr_product_avx512(const LrProduct& p, int64_t n0, int64_t n1) {
  switch (p.dtype) {
    case Dtype::F32: return product<F32Step>(p, n0, n1, 4);
    case Dtype::BF16:
      if (lr_avx512_bf16_supported()) return product<Bf16DotStep>(p, n0, n1, 2);
      return product<ConvertStep<Dtype::BF16>>(p, n0, n1, 2);
    case Dtype::F16: return product<ConvertStep<Dtype::F16>>(p, n0, n1, 2);
  }
}

}  // namespace torchslim::cpu
