// AMX bfloat16 kernel of the low-rank products (lowrank.h), Sapphire Rapids and newer. The weight (V
// or U, row-major) is the A operand, its tiles loaded straight from its rows (16 rows x 32 columns);
// the activations are B tiles in the VNNI pair order, prepared once per chunk of tokens. C tiles are
// (16 weight rows x 16 tokens) float32. The first product's C tiles become, in registers, the B tiles
// of the second (rounded to bfloat16, pairs of its rows interleaved): the intermediate goes from the
// tile unit to a buffer in L2 and back, never through a row-major tensor.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "amx_tiles.h"
#include "avx512_io.h"
#include "lowrank.h"

namespace torchslim::cpu {
namespace {

// A tile: rows [nb, nb + rows) of b (rows <= 16) at columns [32 ks, 32 ks + 32). Loaded in place where
// the whole tile exists; at the row and column tails from a zero-padded copy in buf (so neither reads
// beyond the weight nor multiplies what lies past its last column).
inline void load_a(int tile_is_1, const LrAmxProduct& p, int64_t nb, int rows, int64_t ks, uint16_t* buf) {
  const uint16_t* src = p.b + nb * p.ldb + ks * 32;
  const int64_t cols = std::min<int64_t>(32, p.K - ks * 32);
  const void* base = src;
  int64_t stride = p.ldb * 2;
  if (rows < 16 || cols < 32) {
    std::memset(buf, 0, 1024);
    for (int r = 0; r < rows; ++r) std::memcpy(buf + r * 32, src + r * p.ldb, cols * 2);
    base = buf;
    stride = 64;
  }
  if (tile_is_1) _tile_loadd(1, base, stride);
  else _tile_loadd(0, base, stride);
}

// Phase 1's epilogue: C tile c (16 rows of V = intermediate columns 16 h .. 16 h + 15 of step js, x 16
// tokens) into rows 8 h .. 8 h + 7 of the intermediate's B tile: row i = the bfloat16 pairs of
// C rows 2 i and 2 i + 1, token by token. Rows from `rows` on (beyond V) are written as zeros, not
// taken from C: there the zero padding of V met x, and 0 * Inf would put NaN into every output.
inline void to_t_tile(const float* c, int rows, uint16_t* tile, int h) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int i = 0; i < 8; ++i) {
    const __m512 lo = 2 * i < rows ? _mm512_load_ps(c + 2 * i * 16) : _mm512_setzero_ps();
    const __m512 hi = 2 * i + 1 < rows ? _mm512_load_ps(c + (2 * i + 1) * 16) : _mm512_setzero_ps();
    const __m512i pairs = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    _mm512_store_si512(tile + (8 * h + i) * 32, pairs);
  }
}

// Phase 2's epilogue: C tile c (16 rows of U = outputs nb .. nb + rows - 1, x tokens m0 .. m0 + 15):
// transpose, bias, cast, store the tokens that exist.
inline void to_out(const LrAmxProduct& p, const float* c, int64_t nb, int rows, int64_t m0) {
  if (rows <= 0 || m0 >= p.M) return;
  const __mmask16 nmask = tail_mask(rows);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(nmask, p.bias + nb) : _mm512_setzero_ps();
  __m512 tile[16];
  for (int i = 0; i < 16; ++i) tile[i] = _mm512_load_ps(c + i * 16);
  transpose16(tile);
  const int64_t live = std::min<int64_t>(16, p.M - m0);
  for (int j = 0; j < live; ++j) store16(p.out, p.out_dtype, (m0 + j) * p.ldo + nb, _mm512_add_ps(tile[j], bias), nmask);
}

}  // namespace

void lr_amx_tiles(const uint16_t* a, int64_t lda, int64_t M, int64_t K, uint16_t* tiles, int64_t mt0, int64_t mt1) {
  vnni_tiles_bf16(a, lda, M, (K + 31) / 32, tiles, mt0, mt1);
}

// Register blocks of 2 weight blocks (A tiles 0, 1: 32 rows) x 2 token tiles (B tiles 2, 3), C tiles
// 4..7: every tile loaded serves two multiplies. The weight rows of a block stream from memory for
// the first token pair and come from L2 (32 rows x K) for the others.
void lr_amx_product(const LrAmxProduct& p, int64_t n0, int64_t n1) {
  configure_tiles();
  const int64_t steps = (p.K + 31) / 32;
  alignas(64) uint16_t abuf[2][512];
  alignas(64) float c[4 * 256];
  for (int64_t nb = n0; nb < n1; nb += 32) {
    const int rows0 = int(std::min<int64_t>(16, n1 - nb));
    const int rows1 = int(std::max<int64_t>(0, std::min<int64_t>(16, n1 - nb - 16)));
    for (int64_t mt = 0; mt < p.mtiles; mt += 2) {
      const int64_t mt1 = std::min(mt + 1, p.mtiles - 1);  // an odd last tile is multiplied twice, kept once
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t ks = 0; ks < steps; ++ks) {
        load_a(0, p, nb, rows0, ks, abuf[0]);
        if (rows1 > 0) load_a(1, p, nb + 16, rows1, ks, abuf[1]);
        else _tile_zero(1);
        _tile_loadd(2, p.tiles + (mt * steps + ks) * 512, 64);
        _tile_loadd(3, p.tiles + (mt1 * steps + ks) * 512, 64);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
      _tile_stored(4, c, 64);
      _tile_stored(5, c + 256, 64);
      _tile_stored(6, c + 512, 64);
      _tile_stored(7, c + 768, 64);
      if (p.t_tiles) {
        // Intermediate columns nb .. nb + 31 are step nb / 32 of the next product's B tiles.
        const int64_t js = nb / 32;
        for (int64_t t = mt; t <= mt1; ++t) {
          uint16_t* tile = p.t_tiles + (t * p.steps_out + js) * 512;
          const float* ct = c + (t - mt) * 256;
          to_t_tile(ct, rows0, tile, 0);
          to_t_tile(ct + 512, rows1, tile, 1);
        }
      } else {
        to_out(p, c, nb, rows0, mt * 16);
        to_out(p, c + 512, nb + 16, rows1, mt * 16);
        if (mt1 != mt) {
          to_out(p, c + 256, nb, rows0, mt1 * 16);
          to_out(p, c + 768, nb + 16, rows1, mt1 * 16);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace torchslim::cpu
