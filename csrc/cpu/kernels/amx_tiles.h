// What the AMX kernels share (int8_gemm_amx.cpp, sparse24_amx.cpp, lowrank_amx.cpp): the tile
// configuration (every one of the 8 tiles is 16 rows of 64 bytes) and, for the bfloat16 ones, the
// transposes between rows of activations and tiles. Only included by files compiled with -mamx-tile
// and AVX-512.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace torchslim::cpu {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void configure_tiles() {
  TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

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

// bfloat16 activations x (M rows of ldx elements, readable and zero up to 32 * steps columns) as B
// tiles of 16 rows x 32 columns in the VNNI pair order: tile (mt, ks) at xv + (mt * steps + ks) * 512,
// its row kk, column j = the pair (x[16 mt + j, 32 ks + 2 kk], x[.., + 1]) (the transpose of 16 rows
// x 16 pairs, as 32-bit lanes); rows beyond M zero. Prepares tiles mt0 <= mt < mt1.
inline void vnni_tiles_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t steps, uint16_t* xv, int64_t mt0,
                            int64_t mt1) {
  for (int64_t mt = mt0; mt < mt1; ++mt)
    for (int64_t ks = 0; ks < steps; ++ks) {
      __m512 rows[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t m = mt * 16 + j;
        rows[j] = m < M ? _mm512_loadu_ps(x + m * ldx + ks * 32) : _mm512_setzero_ps();
      }
      transpose16(rows);
      float* tile = reinterpret_cast<float*>(xv + (mt * steps + ks) * 512);
      for (int kk = 0; kk < 16; ++kk) _mm512_store_ps(tile + kk * 16, rows[kk]);
    }
}

}  // namespace
}  // namespace torchslim::cpu
