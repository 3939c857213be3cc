// AMX bfloat16 2:4 kernel (Sapphire Rapids and newer), for bfloat16 activations with more than a
// few rows. The weight is the A operand: 16 weight rows x 32 columns are expanded from the
// compressed form (vpexpandw, as in the AVX-512 kernel) into a 1 KiB tile in L1 and multiplied by
// tdpbf16ps against B tiles of x^T (x transposed once per call into the VNNI pair order), so the
// weight is read compressed and never expanded beyond one tile. C tiles are (16 weight rows x 16
// activation rows) float32; the epilogue transposes them in registers, adds the bias and stores.
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

constexpr int kGroup = s24_amx_group_tiles;  // C tiles 2..7: activation rows per pass over a weight tile
constexpr int64_t kChunkSteps = s24_amx_chunk_columns / 32;  // k steps of 32 columns per chunk

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
#define S24_LOAD(T, C) case T + 1: _tile_loadd(C, c + T * 256, 64); [[fallthrough]];
#define S24_STORE(T, C) case T + 1: _tile_stored(C, c + T * 256, 64); [[fallthrough]];
inline void zero_group(int g) {
  switch (g) { S24_ZERO(5, 7) S24_ZERO(4, 6) S24_ZERO(3, 5) S24_ZERO(2, 4) S24_ZERO(1, 3) S24_ZERO(0, 2) default: break; }
}
inline void load_group(int g, const float* c) {
  switch (g) { S24_LOAD(5, 7) S24_LOAD(4, 6) S24_LOAD(3, 5) S24_LOAD(2, 4) S24_LOAD(1, 3) S24_LOAD(0, 2) default: break; }
}
inline void store_group(int g, float* c) {
  switch (g) { S24_STORE(5, 7) S24_STORE(4, 6) S24_STORE(3, 5) S24_STORE(2, 4) S24_STORE(1, 3) S24_STORE(0, 2) default: break; }
}
#undef S24_ZERO
#undef S24_LOAD
#undef S24_STORE

// In-register transpose of a 16 x 16 float32 tile (rows r[0..15]) into its columns, in place:
// unpack pairs, shuffle quads, then two rounds of 128-bit lane shuffles (64 shuffles, against 16
// gathers of 16 scattered floats, which cost as much as the tile's multiplies at K = 384).
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // per lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  //           a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {  // rows i..i+3, per lane: element c of each, c = 0..3
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // u[4q + c] lane L: rows 4q..4q+3 of column 4L + c
    const __m512 v = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), w = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 x = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), y = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v, x, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v, x, 0xDD);
    r[4 + c] = _mm512_shuffle_f32x4(w, y, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(w, y, 0xDD);
  }
}

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

bool s24_linear_rows_amx(const S24Args& a, const uint16_t* xv, float* acc, int64_t n0, int64_t n1) {
  configure_tiles();
  const int64_t words = a.K_pad / kS24ColsPerWord, row_values = a.K_pad / 2, steps = (a.K_pad + 31) / 32;
  const int64_t mtiles = (a.M + 15) / 16;
  bool ok = true;
  // With one activation group, no chunks: each A tile is expanded into the same 1 KiB just before its
  // multiplies (the vector and tile units overlap; measured 2x faster at M = 16 than writing a
  // 32 KiB chunk buffer first). With several groups, a chunk of A tiles is kept for their reuse.
  const bool reuse = mtiles > kGroup;
  const int64_t chunk = reuse ? kChunkSteps : steps;
  std::vector<__m512i> abuf(16 * (reuse ? kChunkSteps : 1));
  const int64_t mask_ld = chunk * 4 + 64;  // a slab's lane masks are stored 64 bytes at a time
  std::vector<uint8_t> mask_buf(16 * mask_ld);
  uint8_t* masks[16];
  for (int r = 0; r < 16; ++r) masks[r] = mask_buf.data() + r * mask_ld;
  alignas(64) float c[kGroup * 256];
  // k-chunks outermost: the chunk's B tiles for every activation row (1 MiB at M = 512) stay in L2
  // while this thread's weight rows stream past them, each 16 x 1024 weight chunk is expanded once
  // and serves every activation group; partial sums wait in acc between chunks.
  for (int64_t ks0 = 0; ks0 < steps; ks0 += chunk) {
    const int64_t ks1 = std::min(steps, ks0 + chunk);
    const bool first = ks0 == 0, last = ks1 == steps;
    for (int64_t nb = n0; nb < n1; nb += 16) {
      const int rows = int(std::min<int64_t>(16, n1 - nb));
      const uint16_t* vrow[16];
      for (int r = 0; r < rows; ++r) {
        vrow[r] = static_cast<const uint16_t*>(a.values) + (nb + r) * row_values;
        const uint8_t* meta = reinterpret_cast<const uint8_t*>(a.meta + (nb + r) * words);
        for (int64_t c0 = ks0 * 32; c0 < std::min(a.K_pad, ks1 * 32); c0 += kSlab)
          ok &= s24_lane_masks(meta + c0 / 8, std::min<int64_t>(64, (a.K_pad - c0) / 8), masks[r] + (c0 / 8 - ks0 * 4));
      }
      const __mmask16 nmask = __mmask16((1u << rows) - 1);
      const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(nmask, a.bias + nb) : _mm512_setzero_ps();
      for (int64_t mg = 0; mg < mtiles; mg += kGroup) {
        const int g = int(std::min<int64_t>(kGroup, mtiles - mg));
        float* partial = acc ? acc + ((nb / 16) * mtiles + mg) * 256 : nullptr;
        if (first) zero_group(g);
        else load_group(g, partial);
        for (int64_t ks = ks0; ks < ks1; ++ks) {
          __m512i* tile = abuf.data() + (reuse ? (ks - ks0) * 16 : 0);
          if (mg == 0) {  // the first group expands each A tile just before its multiplies (the vector
                          // and tile units then overlap); the later groups reuse it from the buffer
            const bool half = ks * 32 + 32 > a.K_pad;
            for (int r = 0; r < rows; ++r) tile[r] = s24_expand16(vrow[r] + ks * 16, masks[r] + (ks - ks0) * 4, half);
            for (int r = rows; r < 16; ++r) tile[r] = _mm512_setzero_si512();
          }
          _tile_loadd(0, tile, 64);
          multiply_group(g, xv + (mg * steps + ks) * 512, steps * 512);
        }
        if (!last) {
          store_group(g, partial);
          continue;
        }
        store_group(g, c);
        for (int t = 0; t < g; ++t) {
          __m512 tile[16];  // C rows = weight rows n, columns = activation rows m
          for (int i = 0; i < 16; ++i) tile[i] = _mm512_load_ps(c + t * 256 + i * 16);
          transpose16(tile);
          const int64_t m0 = (mg + t) * 16, live = std::min<int64_t>(16, a.M - m0);
          for (int j = 0; j < live; ++j) store16(a.out, a.out_dtype, (m0 + j) * a.ldo + nb, _mm512_add_ps(tile[j], bias), nmask);
        }
      }
    }
  }
  _tile_release();
  return ok;
}

}  // namespace torchslim::cpu
