// AMX tile configuration shared by the AMX kernels (int8_gemm_amx.cpp, sparse24_amx.cpp): every one
// of the 8 tiles is 16 rows of 64 bytes. Only included by files compiled with -mamx-tile.
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

}  // namespace
}  // namespace torchslim::cpu
