// 256-bit INT8 W8A8 for CPUs without AVX-512 VNNI, in two builds of this one file:
// - AVX2 (this file, -mavx2): the packed bytes (w + 128) are turned back into signed w with one
//   XOR; vpmaddubsw multiplies unsigned by signed bytes and saturates pairs to int16, so it is fed
//   |w| and q * sign(w): each product is at most 128 * 127 and a pair at most 32512 < 32767, which
//   keeps the int32 result exact; vpmaddwd with ones then adds pairs into int32.
// - AVX-VNNI (int8_gemm_avxvnni.cpp includes this file with -mavxvnni, Alder Lake and newer):
//   vpdpbusd on 256 bits of the unsigned packed bytes times signed q; the +128 is undone with the
//   row sums of q, as in the AVX-512 VNNI kernel.
// A 16-channel block is two 256-bit halves: channels 0-7 in the first 32 bytes of each 64-byte
// group, 8-15 in the second.
#include <immintrin.h>

#include <cstring>

#include "int8_gemm.h"
#include "quantize_row.h"
#include "scalar_convert.h"

#ifdef TORCHSLIM_AVX_VNNI
#define TORCHSLIM_GEMM_TILE gemm_tile_avxvnni
#else
#define TORCHSLIM_GEMM_TILE gemm_tile_avx2
#endif

namespace torchslim::cpu {
namespace {

constexpr int kMR = 4;

// acc += the four products of a4's bytes with each channel's four weights in b (the packed u8
// bytes for AVX-VNNI, the signed weights for AVX2).
inline __m256i dot4(__m256i acc, __m256i a4, __m256i b, [[maybe_unused]] __m256i b_abs) {
#ifdef TORCHSLIM_AVX_VNNI
  return _mm256_dpbusd_avx_epi32(acc, b, a4);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(b_abs, _mm256_sign_epi8(a4, b)), ones));
#endif
}

template <int MR>
void micro(const GemmArgs& g, int64_t m, int64_t nb) {
  const int8_t* bp = g.b + nb * block_bytes(g.K_pad);
  const int8_t* ap = g.a + m * g.lda;
  __m256i acc[MR][2];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();

  for (int64_t k4 = 0; k4 < g.K_pad / 4; ++k4) {
#ifdef TORCHSLIM_AVX_VNNI
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + k4 * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + k4 * 64 + 32));
    const __m256i abs0 = b0, abs1 = b1;  // unused
#else
    const __m256i sign_bit = _mm256_set1_epi8(char(0x80));
    const __m256i b0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + k4 * 64)), sign_bit);
    const __m256i b1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + k4 * 64 + 32)), sign_bit);
    const __m256i abs0 = _mm256_abs_epi8(b0), abs1 = _mm256_abs_epi8(b1);
#endif
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, ap + i * g.lda + k4 * 4, 4);
      const __m256i av = _mm256_set1_epi32(a4);
      acc[i][0] = dot4(acc[i][0], av, b0, abs0);
      acc[i][1] = dot4(acc[i][1], av, b1, abs1);
    }
  }
  // Store all accumulators first (constant indices), so none lives in memory inside the k loop.
  alignas(32) int32_t c[MR][kBlockN];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#ifdef TORCHSLIM_AVX_VNNI
    // sum_k q * (w + 128) - 128 * sum_k q  ==  sum_k q * w, exactly in int32.
    const __m256i off = _mm256_set1_epi32(g.a_offset[m + i]);
#else
    const __m256i off = _mm256_setzero_si256();
#endif
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[i]), _mm256_sub_epi32(acc[i][0], off));
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[i] + 8), _mm256_sub_epi32(acc[i][1], off));
  }
  for (int i = 0; i < MR; ++i) epilogue_block_scalar(g, c[i], m + i, nb);
}

#ifndef TORCHSLIM_AVX_VNNI
// Quantization, shared by both 256-bit builds (compiled once, in the AVX2 one).

// Largest |x| of a row as the bits of a non-negative value of x's dtype, compared as unsigned
// integers (the integer order of non-negative IEEE values is their numeric order; NaN and Inf
// come out above every finite value), as in the AVX-512 kernel.
template <Dtype DT>
float row_absmax(const void* row, int64_t K) {
  uint32_t best = 0;
  int64_t k = 0;
  if constexpr (DT == Dtype::F32) {
    const uint32_t* p = static_cast<const uint32_t*>(row);
    __m256i vmax = _mm256_setzero_si256();
    for (; k + 8 <= K; k += 8)
      vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)),
                                                     _mm256_set1_epi32(0x7FFFFFFF)));
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
    for (uint32_t v : lanes) best = v > best ? v : best;
    for (; k < K; ++k) best = (p[k] & 0x7FFFFFFFu) > best ? (p[k] & 0x7FFFFFFFu) : best;
    float f;
    std::memcpy(&f, &best, 4);
    return f;
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row);
    __m256i vmax = _mm256_setzero_si256();
    for (; k + 16 <= K; k += 16)
      vmax = _mm256_max_epu16(vmax, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)),
                                                     _mm256_set1_epi16(0x7FFF)));
    alignas(32) uint16_t lanes[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
    for (uint16_t v : lanes) best = v > best ? v : best;
    for (; k < K; ++k) best = (p[k] & 0x7FFFu) > best ? (p[k] & 0x7FFFu) : best;
    const uint16_t bits16 = uint16_t(best);
    return load_as_float(&bits16, DT, 0);
  }
}

template <Dtype DT>
__m256 load8(const void* x, int64_t i) {
  if constexpr (DT == Dtype::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
    if constexpr (DT == Dtype::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <Dtype DT>
void quantize_rows_t(const QuantizeArgs& a, int64_t m0, int64_t m1) {
  constexpr int64_t kElem = DT == Dtype::F32 ? 4 : 2;
  quantize_rows_with(
      a, m0, m1, [&](int64_t m) { return row_absmax<DT>(static_cast<const char*>(a.x) + m * a.ldx * kElem, a.K); },
      [&](int64_t m, float inv_s, int8_t* q) {
        const __m256 inv = _mm256_set1_ps(inv_s);
        // vpackssdw / vpacksswb interleave the 128-bit lanes: this puts the dwords back in order.
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        // Locals, not a.x / a.K: the int8 stores may alias the arguments struct (see the AVX-512 file).
        const void* row = static_cast<const char*>(a.x) + m * a.ldx * kElem;
        const int64_t K = a.K;
        __m256i vsum = _mm256_setzero_si256();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
          // cvtps rounds half to even (the default MXCSR mode); |x * inv| < 127.5, no clamp.
          __m256i r[4];
          for (int j = 0; j < 4; ++j) r[j] = _mm256_cvtps_epi32(_mm256_mul_ps(load8<DT>(row, k + 8 * j), inv));
          vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3])));
          const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(bytes, order));
        }
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vsum);
        int32_t sum = 0;
        for (int32_t v : lanes) sum += v;
        for (; k < K; ++k) {
          q[k] = quantize_one(load_as_float(row, DT, k), inv_s);
          sum += q[k];
        }
        return sum;
      });
}
#endif

}  // namespace

#ifndef TORCHSLIM_AVX_VNNI
void quantize_rows_avx2(const QuantizeArgs& a, int64_t m0, int64_t m1) {
  switch (a.dtype) {
    case Dtype::BF16: quantize_rows_t<Dtype::BF16>(a, m0, m1); break;
    case Dtype::F16: quantize_rows_t<Dtype::F16>(a, m0, m1); break;
    default: quantize_rows_t<Dtype::F32>(a, m0, m1);
  }
}
#endif

void TORCHSLIM_GEMM_TILE(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
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
