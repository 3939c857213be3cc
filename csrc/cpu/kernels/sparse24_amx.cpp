// AMX bfloat16 2:4 kernel (Sapphire Rapids and newer), for bfloat16 activations with more than a
// few rows. The weight is the A operand: 16 weight rows x 32 columns are expanded from the
// compressed form (vpexpandw, as in the AVX-512 kernel) into a 1 KiB tile in L1 and multiplied by
// tdpbf16ps against B tiles of x^T (x transposed once per call into the VNNI pair order), so the
// weight is read compressed and never expanded beyond one tile. C tiles are (16 weight rows x 16
// activation rows) float32; the epilogue transposes them (gathers), adds the bias and stores.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "avx512_io.h"
#include "sparse24.h"
#include "sparse24_simd.h"

namespace torchslim::cpu {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // every tile: 16 rows of 64 bytes
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

constexpr int kGroup = 6;  // C tiles 2..7: up to 96 activation rows per pass over the weight tile

// GCC's tile intrinsics paste their tile number into the instruction text: every tile needs its
// own literal, hence the macros. Tile 2 + t accumulates activation tile t of the group.
#define S24_MULTIPLY(T, C)      \
  case T + 1:                   \
    _tile_loadd(1, b + T * stride, 64); \
    _tile_dpbf16ps(C, 0, 1);    \
    [[fallthrough]];
// C tiles t < g += A (tile 0) x the group's B tiles of this k step (each loaded into tile 1).
inline void multiply_group(int g, const uint16_t* b, int64_t stride) {
  switch (g) {
    S24_MULTIPLY(5, 7)
    S24_MULTIPLY(4, 6)
    S24_MULTIPLY(3, 5)
    S24_MULTIPLY(2, 4)
    S24_MULTIPLY(1, 3)
    S24_MULTIPLY(0, 2)
    default: break;
  }
}
#undef S24_MULTIPLY

#define S24_ZERO(T, C) case T + 1: _tile_zero(C); [[fallthrough]];
#define S24_STORE(T, C) case T + 1: _tile_stored(C, c + T * 256, 64); [[fallthrough]];
inline void zero_group(int g) {
  switch (g) { S24_ZERO(5, 7) S24_ZERO(4, 6) S24_ZERO(3, 5) S24_ZERO(2, 4) S24_ZERO(1, 3) S24_ZERO(0, 2) default: break; }
}
inline void store_group(int g, float* c) {
  switch (g) { S24_STORE(5, 7) S24_STORE(4, 6) S24_STORE(3, 5) S24_STORE(2, 4) S24_STORE(1, 3) S24_STORE(0, 2) default: break; }
}
#undef S24_ZERO
#undef S24_STORE

}  // namespace

void s24_prepare_x_amx(const uint16_t* x, int64_t ldx, int64_t M, int64_t K_pad, uint16_t* xv, int64_t mt0, int64_t mt1) {
  const int64_t steps = (K_pad + 31) / 32;
  for (int64_t mt = mt0; mt < mt1; ++mt)
    for (int64_t ks = 0; ks < steps; ++ks) {
      uint32_t* tile = reinterpret_cast<uint32_t*>(xv + (mt * steps + ks) * 512);
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t m = mt * 16 + j;
        if (m >= M) {
          for (int kk = 0; kk < 16; ++kk) tile[kk * 16 + j] = 0;
          continue;
        }
        uint32_t pairs[16];
        std::memcpy(pairs, x + m * ldx + ks * 32, 64);
        for (int kk = 0; kk < 16; ++kk) tile[kk * 16 + j] = pairs[kk];
      }
    }
}

bool s24_linear_rows_amx(const S24Args& a, const uint16_t* xv, int64_t n0, int64_t n1) {
  configure_tiles();
  const int64_t words = a.K_pad / kS24ColsPerWord, row_values = a.K_pad / 2, steps = (a.K_pad + 31) / 32;
  const int64_t mtiles = (a.M + 15) / 16;
  bool ok = true;
  // Lane masks of 16 rows (each row's K_pad / 8 bytes, plus the 64 a slab store may write past).
  const int64_t mask_ld = a.K_pad / 8 + 64;
  std::vector<uint8_t> masks(16 * mask_ld);
  alignas(64) uint16_t abuf[16 * 32];
  alignas(64) float c[kGroup * 256];
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
  // Activation groups outermost: a group's B tiles (96 rows x K_pad, 768 KiB at K = 4096) stay in L2
  // while this thread's weight rows stream past them once per group (in the other order every
  // 16 weight rows re-read all of x from L3: 0.4x dense's speed at M = 512 instead of ~1x).
  for (int64_t mg = 0; mg < mtiles; mg += kGroup) {
    const int g = int(std::min<int64_t>(kGroup, mtiles - mg));
    for (int64_t nb = n0; nb < n1; nb += 16) {
      const int rows = int(std::min<int64_t>(16, n1 - nb));
      const uint16_t* vrow[16];
      for (int r = 0; r < rows; ++r) {
        vrow[r] = static_cast<const uint16_t*>(a.values) + (nb + r) * row_values;
        const uint8_t* meta = reinterpret_cast<const uint8_t*>(a.meta + (nb + r) * words);
        for (int64_t c0 = 0; c0 < a.K_pad; c0 += kSlab)
          ok &= s24_lane_masks(meta + c0 / 8, std::min<int64_t>(64, (a.K_pad - c0) / 8), masks.data() + r * mask_ld + c0 / 8);
      }
      if (rows < 16) std::memset(abuf + rows * 32, 0, (16 - rows) * 64);
      const __mmask16 nmask = __mmask16((1u << rows) - 1);
      const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(nmask, a.bias + nb) : _mm512_setzero_ps();
      zero_group(g);
      for (int64_t ks = 0; ks < steps; ++ks) {
        const bool half = ks * 32 + 32 > a.K_pad;
        for (int r = 0; r < rows; ++r)
          _mm512_store_si512(abuf + r * 32, s24_expand16(vrow[r] + ks * 16, masks.data() + r * mask_ld + ks * 4, half));
        _tile_loadd(0, abuf, 64);
        multiply_group(g, xv + (mg * steps + ks) * 512, steps * 512);
      }
      store_group(g, c);
      for (int t = 0; t < g; ++t)
        for (int j = 0; j < 16; ++j) {
          const int64_t m = (mg + t) * 16 + j;
          if (m >= a.M) break;
          const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(column, c + t * 256 + j, 4), bias);
          store16(a.out, a.out_dtype, m * a.ldo + nb, v, nmask);
        }
    }
  }
  _tile_release();
  return ok;
}

}  // namespace torchslim::cpu
