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

#include "amx_tiles.h"
#include "avx512_io.h"
#include "sparse24.h"
#include "sparse24_simd.h"

namespace torchslim::cpu {
namespace {

constexpr int kGroup = s24_amx_group_tiles;  // C tiles 2..7: activation rows per pass over a weight tile

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
  vnni_tiles_bf16(x, ldx, M, (K_pad + 31) / 32, xv, mt0, mt1);
}

namespace {

// The weight rows [nb, nb + rows) of one kernel call: their values, and lane masks for k steps
// [ks0, ks1) (masks[r] + 4 (ks - ks0) is step ks of row r).
struct WeightBlock {
  const uint16_t* v[16];
  uint8_t* masks[16];
  int rows;
  int64_t nb;
};

bool prepare_block(const S24Args& a, WeightBlock& w, int64_t nb, int rows, int64_t ks0, int64_t ks1) {
  const int64_t words = a.K_pad / kS24ColsPerWord, row_values = a.K_pad / 2;
  bool ok = true;
  w.rows = rows;
  w.nb = nb;
  for (int r = 0; r < rows; ++r) {
    w.v[r] = static_cast<const uint16_t*>(a.values) + (nb + r) * row_values;
    const uint8_t* meta = reinterpret_cast<const uint8_t*>(a.meta + (nb + r) * words);
    for (int64_t c0 = ks0 * 32; c0 < std::min(a.K_pad, ks1 * 32); c0 += kSlab)
      ok &= s24_lane_masks(meta + c0 / 8, std::min<int64_t>(64, (a.K_pad - c0) / 8), a.K - c0,
                            w.masks[r] + (c0 / 8 - ks0 * 4));
  }
  return ok;
}

// The A tile of k step ks (16 rows of 32 expanded columns; rows beyond the block zero).
inline void expand_tile(const S24Args& a, const WeightBlock& w, int64_t ks, int64_t ks0, __m512i* tile) {
  const bool half = ks * 32 + 32 > a.K_pad;
  for (int r = 0; r < w.rows; ++r) tile[r] = s24_expand16(w.v[r] + ks * 16, w.masks[r] + (ks - ks0) * 4, half);
  for (int r = w.rows; r < 16; ++r) tile[r] = _mm512_setzero_si512();
}

// Output of one C tile (16 weight rows of w x activation rows m0..m0+15, float32 at c): transpose,
// bias, cast, store the rows that exist.
inline void store_tile(const S24Args& a, const WeightBlock& w, const float* c, int64_t m0) {
  if (w.rows == 0 || m0 >= a.M) return;
  const __mmask16 nmask = __mmask16((1u << w.rows) - 1);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(nmask, a.bias + w.nb) : _mm512_setzero_ps();
  __m512 tile[16];  // C rows = weight rows n, columns = activation rows m
  for (int i = 0; i < 16; ++i) tile[i] = _mm512_load_ps(c + i * 16);
  transpose16(tile);
  const int64_t live = std::min<int64_t>(16, a.M - m0);
  for (int j = 0; j < live; ++j) store16(a.out, a.out_dtype, (m0 + j) * a.ldo + w.nb, _mm512_add_ps(tile[j], bias), nmask);
}

// Up to 96 activation rows (one group): no chunks; each A tile is expanded into the same 1 KiB
// just before its multiplies, so the vector and tile units overlap (measured 2x faster at M = 16
// than expanding a chunk into a buffer first).
bool rows_one_group(const S24Args& a, const uint16_t* xv, int64_t n0, int64_t n1, uint8_t* const* masks) {
  const int64_t steps = (a.K_pad + 31) / 32;
  const int g = int((a.M + 15) / 16);
  alignas(64) __m512i abuf[16];
  alignas(64) float c[kGroup * 256];
  WeightBlock w;
  std::copy(masks, masks + 16, w.masks);
  bool ok = true;
  for (int64_t nb = n0; nb < n1; nb += 16) {
    ok &= prepare_block(a, w, nb, int(std::min<int64_t>(16, n1 - nb)), 0, steps);
    zero_group(g);
    for (int64_t ks = 0; ks < steps; ++ks) {
      expand_tile(a, w, ks, 0, abuf);
      _tile_loadd(0, abuf, 64);
      multiply_group(g, xv + ks * 512, steps * 512);
    }
    store_group(g, c);
    for (int t = 0; t < g; ++t) store_tile(a, w, c + t * 256, t * 16);
  }
  return ok;
}

// More rows: 2 weight blocks x 2 activation tiles per register block (C tiles 4-7, A tiles 0-1,
// B tiles 2-3), so every tile loaded serves two multiplies: the B tiles come from L2, and with one
// weight block per B (the one-group order) their loads alone saturated it (~0.5x dense at M = 1024).
// k-chunks outermost: the chunk's B tiles for every activation row (<= 1 MiB) stay in L2 while this
// thread's weight rows stream past; each weight block's chunk is expanded once into abuf (L1) and
// serves every activation tile; partial sums wait in acc between chunks.
bool rows_blocked(const S24Args& a, const uint16_t* xv, float* acc, int64_t n0, int64_t n1, uint8_t* const* masks0,
                  uint8_t* const* masks1) {
  const int64_t steps = (a.K_pad + 31) / 32, mtiles = (a.M + 15) / 16;
  const int64_t chunk = s24_amx_chunk_steps(a.M);  // at most 2 x 16 KiB of A tiles
  std::vector<__m512i> abuf(2 * 16 * chunk);
  alignas(64) float c[4 * 256];
  WeightBlock w[2];
  std::copy(masks0, masks0 + 16, w[0].masks);
  std::copy(masks1, masks1 + 16, w[1].masks);
  bool ok = true;
  for (int64_t ks0 = 0; ks0 < steps; ks0 += chunk) {
    const int64_t ks1 = std::min(steps, ks0 + chunk);
    const bool first = ks0 == 0, last = ks1 == steps;
    for (int64_t nb = n0; nb < n1; nb += 32) {
      for (int i = 0; i < 2; ++i) {
        const int64_t start = nb + 16 * i;
        const int rows = int(std::max<int64_t>(0, std::min<int64_t>(16, n1 - start)));
        ok &= prepare_block(a, w[i], start, rows, ks0, ks1);
      }
      for (int64_t mt = 0; mt < mtiles; mt += 2) {
        const int64_t mt1 = std::min(mt + 1, mtiles - 1);  // an odd last tile is multiplied twice, stored once
        float* part[4] = {nullptr, nullptr, nullptr, nullptr};
        if (acc) {
          for (int i = 0; i < 2; ++i) {  // a missing second weight block points at the first's (never stored)
            const int64_t blk = (w[i].rows ? nb / 16 + i : nb / 16) * mtiles;
            part[2 * i] = acc + (blk + mt) * 256;
            part[2 * i + 1] = acc + (blk + mt1) * 256;
          }
        }
        if (first) {
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
        } else {
          _tile_loadd(4, part[0], 64);
          _tile_loadd(5, part[1], 64);
          _tile_loadd(6, part[2], 64);
          _tile_loadd(7, part[3], 64);
        }
        for (int64_t ks = ks0; ks < ks1; ++ks) {
          __m512i* a0 = abuf.data() + (ks - ks0) * 16;
          __m512i* a1 = abuf.data() + (chunk + ks - ks0) * 16;
          if (mt == 0) {  // expanded right before the first use (overlapping the tile unit), kept for the rest
            expand_tile(a, w[0], ks, ks0, a0);
            expand_tile(a, w[1], ks, ks0, a1);
          }
          _tile_loadd(0, a0, 64);
          _tile_loadd(1, a1, 64);
          _tile_loadd(2, xv + (mt * steps + ks) * 512, 64);
          _tile_loadd(3, xv + (mt1 * steps + ks) * 512, 64);
          _tile_dpbf16ps(4, 0, 2);
          _tile_dpbf16ps(5, 0, 3);
          _tile_dpbf16ps(6, 1, 2);
          _tile_dpbf16ps(7, 1, 3);
        }
        if (!last) {
          _tile_stored(4, part[0], 64);
          if (mt1 != mt) _tile_stored(5, part[1], 64);
          if (w[1].rows) {
            _tile_stored(6, part[2], 64);
            if (mt1 != mt) _tile_stored(7, part[3], 64);
          }
          continue;
        }
        _tile_stored(4, c, 64);
        _tile_stored(5, c + 256, 64);
        _tile_stored(6, c + 512, 64);
        _tile_stored(7, c + 768, 64);
        store_tile(a, w[0], c, mt * 16);
        store_tile(a, w[1], c + 512, mt * 16);
        if (mt1 != mt) {
          store_tile(a, w[0], c + 256, mt1 * 16);
          store_tile(a, w[1], c + 768, mt1 * 16);
        }
      }
    }
  }
  return ok;
}

}  // namespace

bool s24_linear_rows_amx(const S24Args& a, const uint16_t* xv, float* acc, int64_t n0, int64_t n1) {
  configure_tiles();
  const int64_t mtiles = (a.M + 15) / 16;
  const bool one_group = mtiles <= kGroup;
  // Lane masks of two weight blocks: K_pad / 8 bytes per row without chunks, 64 per 16-step chunk,
  // plus the 64 a slab's store may write past.
  const int64_t mask_ld = (one_group ? a.K_pad / 8 : 64) + 64;
  std::vector<uint8_t> mask_buf(32 * mask_ld);
  uint8_t* masks[32];
  for (int r = 0; r < 32; ++r) masks[r] = mask_buf.data() + r * mask_ld;
  const bool ok = one_group ? rows_one_group(a, xv, n0, n1, masks) : rows_blocked(a, xv, acc, n0, n1, masks, masks + 16);
  _tile_release();
  return ok;
}

}  // namespace torchslim::cpu
