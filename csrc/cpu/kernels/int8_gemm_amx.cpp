// AMX INT8 W8A8 (Sapphire Rapids and newer): tdpbssd multiplies a 16x64 int8 activation tile by a
// 16(k/4)x64 weight tile in the packed VNNI order, accumulating 16x16 int32, signed x signed (no
// offset needed). Register tile: 32 rows x 32 channels in four accumulator tiles; the activation
// buffer is padded to a multiple of 32 rows by the caller so tile loads never leave it.
#include <immintrin.h>

#include "avx512_io.h"
#include "int8_gemm.h"

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

// NBT weight blocks (1 or 2) x 32 rows starting at row m, block nb.
template <int NBT>
void micro(const GemmArgs& g, int64_t m, int64_t nb, int64_t m1) {
  const int64_t bb = block_bytes(g.K_pad);
  const int8_t* a0 = g.a + m * g.lda;
  const int8_t* a1 = a0 + 16 * g.lda;
  const int8_t* b0 = g.b + nb * bb;
  const int8_t* b1 = b0 + bb;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < g.K_pad; k += 64) {
    _tile_loadd(4, a0 + k, g.lda);
    _tile_loadd(5, a1 + k, g.lda);
    _tile_loadd(6, b0 + k * kBlockN, 64);  // 16 groups of [16 channels][4 k]
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(2, 5, 6);
    if constexpr (NBT == 2) {
      _tile_loadd(7, b1 + k * kBlockN, 64);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  }
  alignas(64) int32_t c[32][32];
  _tile_stored(0, &c[0][0], 128);
  _tile_stored(2, &c[16][0], 128);
  if constexpr (NBT == 2) {
    _tile_stored(1, &c[0][16], 128);
    _tile_stored(3, &c[16][16], 128);
  }
  const int64_t rows = m1 - m < 32 ? m1 - m : 32;
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < NBT; ++j)
      epilogue16(g, _mm512_load_si512(&c[r][16 * j]), m + r, (nb + j) * kBlockN);
}

}  // namespace

void gemm_tile_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  configure_tiles();
  for (int64_t nb = nb0; nb < nb1; nb += 2) {
    for (int64_t m = m0; m < m1; m += 32) {
      if (nb1 - nb >= 2)
        micro<2>(g, m, nb, m1);
      else
        micro<1>(g, m, nb, m1);
    }
  }
  _tile_release();
}

}  // namespace torchslim::cpu
