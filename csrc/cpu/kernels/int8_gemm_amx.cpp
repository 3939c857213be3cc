// AMX INT8 W8A8 (Sapphire Rapids and newer): tdpbsud multiplies a 16x64 signed activation tile by
// a 16(k/4)x64 tile of the unsigned packed weights (w + 128) in the VNNI order, accumulating 16x16
// int32; the epilogue undoes the +128 with the row sums of the activations. Register tile: 32 rows
// x 32 channels in four accumulator tiles, blocked over k so one operand comes from L1; the activation buffer is padded to a multiple of 32 rows by the
// caller so tile loads never leave it.
#include <immintrin.h>

#include "amx_tiles.h"
#include "avx512_io.h"
#include "int8_gemm.h"

namespace torchslim::cpu {
namespace {

constexpr int64_t kRows = 32;   // two 16-row activation tiles
constexpr int64_t kChunkK = 512;  // 32 rows x 512 k of activations (16 KB) stay in L1 across pairs

// Accumulates k in [k0, k1) of rows [m, m + 32) x weight blocks (nb, nb + 1) into c (32 x 32
// int32, row stride 128 bytes): C tiles 0-3 = (rows 0-15, 16-31) x (block nb, nb + 1).
// With one block (NBT == 1) only tiles 0 and 2 are used.
template <int NBT>
void accumulate(const GemmArgs& g, int64_t m, int64_t nb, int64_t k0, int64_t k1, int32_t* c) {
  const int64_t bb = block_bytes(g.K_pad);
  const int8_t* a0 = g.a + m * g.lda;
  const int8_t* a1 = a0 + 16 * g.lda;
  const int8_t* b0 = g.b + nb * bb;
  const int8_t* b1 = b0 + bb;
  if (k0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, 128);
    _tile_loadd(2, c + 16 * 32, 128);
    if constexpr (NBT == 2) {
      _tile_loadd(1, c + 16, 128);
      _tile_loadd(3, c + 16 * 32 + 16, 128);
    }
  }
  for (int64_t k = k0; k < k1; k += 64) {
    _tile_loadd(4, a0 + k, g.lda);
    _tile_loadd(5, a1 + k, g.lda);
    _tile_loadd(6, b0 + k * kBlockN, 64);  // 16 groups of [16 channels][4 k]
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(2, 5, 6);
    if constexpr (NBT == 2) {
      _tile_loadd(7, b1 + k * kBlockN, 64);
      _tile_dpbsud(1, 4, 7);
      _tile_dpbsud(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(2, c + 16 * 32, 128);
  if constexpr (NBT == 2) {
    _tile_stored(1, c + 16, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

}  // namespace

void gemm_tile_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  configure_tiles();
  constexpr int64_t kMaxPairs = 8;
  // 32 KiB of accumulators: per thread, not on the stack (a thread with a small stack crashed).
  alignas(64) static thread_local int32_t c[kMaxPairs][kRows * 32];
  for (int64_t nbs = nb0; nbs < nb1; nbs += 2 * kMaxPairs) {
    const int64_t nbe = nb1 - nbs < 2 * kMaxPairs ? nb1 : nbs + 2 * kMaxPairs;
    ChannelBlock cbs[2 * kMaxPairs];
    const int32_t* sums[2 * kMaxPairs];  // block j: half j % 2 of accumulator pair j / 2, 32 int32 a row
    for (int64_t j = 0; j < nbe - nbs; ++j) {
      cbs[j] = channel_block(g, (nbs + j) * kBlockN);
      sums[j] = c[j / 2] + 16 * (j % 2);
    }
    for (int64_t m = m0; m < m1; m += kRows) {
      // k outermost within the row group: the activation chunk is loaded from L2 once and reused
      // from L1 by every weight pair; the accumulators round-trip through c (L1) per chunk.
      for (int64_t k0 = 0; k0 < g.K_pad; k0 += kChunkK) {
        const int64_t k1 = g.K_pad - k0 < kChunkK ? g.K_pad : k0 + kChunkK;
        for (int64_t nb = nbs; nb < nbe; nb += 2) {
          if (nbe - nb >= 2)
            accumulate<2>(g, m, nb, k0, k1, c[(nb - nbs) / 2]);
          else
            accumulate<1>(g, m, nb, k0, k1, c[(nb - nbs) / 2]);
        }
      }
      const int64_t rows = m1 - m < kRows ? m1 - m : kRows;
      epilogue_tile(g, cbs, nbe - nbs, m, rows, sums, 32);
    }
  }
  _tile_release();
}

}  // namespace torchslim::cpu
