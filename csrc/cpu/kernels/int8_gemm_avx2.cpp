// AVX2 INT8 W8A8 for CPUs without AVX-512 VNNI. vpmaddubsw multiplies unsigned by signed bytes and
// saturates pairs to int16, so it is fed |w| and q * sign(w): each product is at most 128 * 127 and
// a pair at most 32512 < 32767, which keeps the int32 result exact. vpmaddwd with ones then adds
// pairs into int32. Activations are signed (no +128 offset) on this path.
#include <immintrin.h>

#include <cstring>

#include "int8_gemm.h"
#include "scalar_convert.h"

namespace torchslim::cpu {
namespace {

constexpr int kMR = 4;

template <int MR>
void micro(const GemmArgs& g, int64_t m, int64_t nb) {
  const int8_t* bp = g.b + nb * block_bytes(g.K_pad);
  const int8_t* ap = g.a + m * g.lda;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();

  for (int64_t k4 = 0; k4 < g.K_pad / 4; ++k4) {
    // One 64-byte group: channels 0-7 in the first 32 bytes, 8-15 in the second, 4 k each.
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + k4 * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + k4 * 64 + 32));
    const __m256i abs0 = _mm256_abs_epi8(b0), abs1 = _mm256_abs_epi8(b1);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, ap + i * g.lda + k4 * 4, 4);
      const __m256i av = _mm256_set1_epi32(a4);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(abs0, _mm256_sign_epi8(av, b0)), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(abs1, _mm256_sign_epi8(av, b1)), ones));
    }
  }
  // Store all accumulators first (constant indices), so none lives in memory inside the k loop.
  alignas(32) int32_t c[MR][kBlockN];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[i]), acc[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[i] + 8), acc[i][1]);
  }
  for (int i = 0; i < MR; ++i) epilogue_block_scalar(g, c[i], m + i, nb);
}

}  // namespace

void gemm_tile_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    for (int64_t m = m0; m < m1; m += kMR) {
      switch (m1 - m < kMR ? m1 - m : kMR) {
        case 1: micro<1>(g, m, nb); break;
        case 2: micro<2>(g, m, nb); break;
        case 3: micro<3>(g, m, nb); break;
        default: micro<4>(g, m, nb); break;
      }
    }
  }
}

}  // namespace torchslim::cpu
