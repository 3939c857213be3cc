// AVX-512 VNNI INT8 W8A8: vpdpbusd multiplies the unsigned packed weights (w + 128) by signed
// activations q and adds groups of four into int32; the +128 is undone in the epilogue with the
// row sums of q. Register tile: MR rows x NBLK blocks of 16 channels (6 x 4 = 24 zmm accumulators).
#include <cmath>
#include <cstring>

#include "avx512_io.h"
#include "int8_gemm.h"
#include "quantize_row.h"
#include "scalar_convert.h"

namespace torchslim::cpu {
namespace {

constexpr int kMR = 6;
constexpr int kNBLK = 4;

// Four int8 activations as one int32, in every lane.
inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int MR, int NBLK>
void micro(const GemmArgs& g, int64_t m, int64_t nb) {
  const int64_t bb = block_bytes(g.K_pad);
  const int8_t* bp[NBLK];
#pragma GCC unroll 4
  for (int j = 0; j < NBLK; ++j) bp[j] = g.b + (nb + j) * bb;
  const int8_t* ap = g.a + m * g.lda;

  __m512i acc[MR][NBLK];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NBLK; ++j) acc[i][j] = _mm512_setzero_si512();

  for (int64_t k4 = 0; k4 < g.K_pad / 4; ++k4) {
    __m512i bv[NBLK];
#pragma GCC unroll 4
    for (int j = 0; j < NBLK; ++j) bv[j] = _mm512_loadu_si512(bp[j] + k4 * 64);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m512i av = broadcast4(ap + i * g.lda + k4 * 4);
#pragma GCC unroll 4
      for (int j = 0; j < NBLK; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], bv[j], av);
    }
  }

  // Spill the accumulators once, so the epilogue's loops cannot force them into memory inside
  // the k loop (GCC keeps an array that is indexed by a run-time value in memory).
  alignas(64) int32_t c[MR][NBLK][kBlockN];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NBLK; ++j) _mm512_store_si512(c[i][j], acc[i][j]);

  ChannelBlock cbs[NBLK];
  const int32_t* sums[NBLK];
  for (int j = 0; j < NBLK; ++j) {
    cbs[j] = channel_block(g, (nb + j) * kBlockN);
    sums[j] = c[0][j];
  }
  epilogue_tile(g, cbs, NBLK, m, MR, sums, NBLK * kBlockN);
}

// One row against one block: a single sequential weight stream (the DRAM-friendly order for
// decode), with four accumulators over interleaved k groups so the vpdpbusd latency is hidden.
void gemv_block(const GemmArgs& g, int64_t m, int64_t nb) {
  const int8_t* bp = g.b + nb * block_bytes(g.K_pad);
  const int8_t* ap = g.a + m * g.lda;
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const int64_t K4 = g.K_pad / 4;  // a multiple of 16
  for (int64_t k4 = 0; k4 < K4; k4 += 4) {
    // One 4-byte group of q per step, broadcast straight from memory (through one 16-byte load
    // and shifts, GCC added two register copies per accumulator and step).
    acc0 = _mm512_dpbusd_epi32(acc0, _mm512_loadu_si512(bp + k4 * 64), broadcast4(ap + k4 * 4));
    acc1 = _mm512_dpbusd_epi32(acc1, _mm512_loadu_si512(bp + k4 * 64 + 64), broadcast4(ap + k4 * 4 + 4));
    acc2 = _mm512_dpbusd_epi32(acc2, _mm512_loadu_si512(bp + k4 * 64 + 128), broadcast4(ap + k4 * 4 + 8));
    acc3 = _mm512_dpbusd_epi32(acc3, _mm512_loadu_si512(bp + k4 * 64 + 192), broadcast4(ap + k4 * 4 + 12));
  }
  const __m512i acc = _mm512_add_epi32(_mm512_add_epi32(acc0, acc1), _mm512_add_epi32(acc2, acc3));
  alignas(64) int32_t c[kBlockN];
  _mm512_store_si512(c, acc);
  const ChannelBlock cb = channel_block(g, nb * kBlockN);
  const int32_t* sums[1] = {c};
  epilogue_tile(g, &cb, 1, m, 1, sums, 0);
}

template <int NBLK>
void micro_rows(const GemmArgs& g, int64_t m, int64_t rows, int64_t nb) {
  switch (rows) {
    case 1: micro<1, NBLK>(g, m, nb); break;
    case 2: micro<2, NBLK>(g, m, nb); break;
    case 3: micro<3, NBLK>(g, m, nb); break;
    case 4: micro<4, NBLK>(g, m, nb); break;
    case 5: micro<5, NBLK>(g, m, nb); break;
    default: micro<6, NBLK>(g, m, nb); break;
  }
}

}  // namespace

void gemm_tile_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  if (m1 - m0 == 1) {
    for (int64_t nb = nb0; nb < nb1; ++nb) gemv_block(g, m0, nb);
    return;
  }
  for (int64_t nb = nb0; nb < nb1; nb += kNBLK) {
    const int64_t nblk = nb1 - nb < kNBLK ? nb1 - nb : kNBLK;
    for (int64_t m = m0; m < m1; m += kMR) {
      const int64_t rows = m1 - m < kMR ? m1 - m : kMR;
      switch (nblk) {
        case 1: micro_rows<1>(g, m, rows, nb); break;
        case 2: micro_rows<2>(g, m, rows, nb); break;
        case 3: micro_rows<3>(g, m, rows, nb); break;
        default: micro_rows<4>(g, m, rows, nb); break;
      }
    }
  }
}

namespace {

// Largest |x| of a row as the bit pattern of a non-negative float of x's dtype, compared as
// unsigned integers: for non-negative IEEE values the integer order is the numeric order, and
// NaN / Inf compare above every finite value. One AND and one integer max per 64 bytes.
template <Dtype DT>
uint32_t absmax_bits(const void* row, int64_t K) {
  if constexpr (DT == Dtype::F32) {
    const uint32_t* p = static_cast<const uint32_t*>(row);
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i vmax = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16)
      vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_maskz_loadu_epi32(tail_mask(K - k), p + k), abs_mask));
    return _mm512_reduce_max_epu32(vmax);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row);
    const __m512i abs_mask = _mm512_set1_epi16(0x7FFF);
    __m512i vmax = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : __mmask32((1u << (K - k)) - 1);
      vmax = _mm512_max_epu16(vmax, _mm512_and_si512(_mm512_maskz_loadu_epi16(mask, p + k), abs_mask));
    }
    // Horizontal max of 32 uint16: widen each half to 16 uint32.
    const __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(vmax));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(vmax, 1));
    return _mm512_reduce_max_epu32(_mm512_max_epu32(lo, hi));
  }
}

// The value of a non-negative bit pattern from absmax_bits, as float (Inf or NaN for non-finite).
template <Dtype DT>
float bits_to_float(uint32_t bits) {
  if constexpr (DT == Dtype::F32) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else if constexpr (DT == Dtype::BF16) {
    return bf16_to_float(uint16_t(bits));
  } else {
    return f16_to_float(uint16_t(bits));
  }
}

// The dtype is a template parameter so the inner loops carry no branch.
template <Dtype DT>
void quantize_rows(const QuantizeArgs& a, int64_t m0, int64_t m1) {
  const char* x = static_cast<const char*>(a.x);
  constexpr int64_t kElem = DT == Dtype::F32 ? 4 : 2;
  quantize_rows_with(
      a, m0, m1, [&](int64_t m) { return bits_to_float<DT>(absmax_bits<DT>(x + m * a.ldx * kElem, a.K)); },
      [&](int64_t m, float inv_s, int8_t* q) {
        // Locals, not a.x / a.K: the int8 stores may alias the arguments struct, which would make
        // the compiler reload its fields on every step.
        const void* row = x + m * a.ldx * kElem;
        const int64_t K = a.K;
        const __m512 inv = _mm512_set1_ps(inv_s);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 16) {
          const __mmask16 mask = tail_mask(K - k);
          const __m512 v = load16(row, DT, k, mask);
          // No clamp needed: |x| <= absmax and inv <= (127 / absmax)(1 + 2^-24), so |x * inv| < 127.5
          // rounds to at most 127 (the saturating vpmovsdb would catch anything else anyway).
          // Masked-off lanes load 0 and add 0 to the sum.
          const __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          sum = _mm512_add_epi32(sum, r);
          _mm_mask_storeu_epi8(q + k, mask, _mm512_cvtsepi32_epi8(r));
        }
        return _mm512_reduce_add_epi32(sum);
      });
}

}  // namespace

void quantize_rows_avx512(const QuantizeArgs& a, int64_t m0, int64_t m1) {
  switch (a.dtype) {
    case Dtype::BF16: quantize_rows<Dtype::BF16>(a, m0, m1); break;
    case Dtype::F16: quantize_rows<Dtype::F16>(a, m0, m1); break;
    default: quantize_rows<Dtype::F32>(a, m0, m1);
  }
}

}  // namespace torchslim::cpu
