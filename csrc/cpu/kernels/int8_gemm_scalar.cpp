// Portable INT8 W8A8 code: the weight packing (run once per weight), the reference-exact
// per-token quantization, and a GEMM that any x86-64 CPU runs. Compiled without ISA flags.
#include <cmath>
#include <cstring>

#include "int8_gemm.h"
#include "quantize_row.h"
#include "scalar_convert.h"

namespace torchslim::cpu {

void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* packed) {
  const int64_t K_pad = round_up(K, kPadK);
  const int64_t NB = round_up(N, kBlockN) / kBlockN;
  const int64_t bb = block_bytes(K_pad);
  std::memset(packed, 0, kHeaderBytes);
  PackedHeader header{};
  std::memcpy(header.magic, kPackedMagic, sizeof(header.magic));
  header.version = kPackedVersion;
  header.block_n = kBlockN;
  header.N = N;
  header.K = K;
  std::memcpy(packed, &header, sizeof(header));
  int8_t* blocks = packed + kHeaderBytes;
  // Padding holds 0x80 (a zero weight); the kernels never depend on it (see int8_gemm.h).
  std::memset(blocks, 0x80, NB * bb);
  for (int64_t n = 0; n < N; ++n) {
    int8_t* blk = blocks + (n / kBlockN) * bb + (n % kBlockN) * 4;
    const int8_t* row = w + n * K;
    for (int64_t k = 0; k < K; ++k) blk[(k / 4) * 64 + (k % 4)] = int8_t(row[k] ^ 0x80);
  }
}

void unpack_weight(const int8_t* packed, int64_t N, int64_t K, int8_t* w) {
  const int64_t bb = block_bytes(round_up(K, kPadK));
  const int8_t* blocks = packed + kHeaderBytes;
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* blk = blocks + (n / kBlockN) * bb + (n % kBlockN) * 4;
    for (int64_t k = 0; k < K; ++k) w[n * K + k] = int8_t(blk[(k / 4) * 64 + (k % 4)] ^ 0x80);
  }
}

void quantize_rows_scalar(const QuantizeArgs& a, int64_t m0, int64_t m1) {
  quantize_rows_with(
      a, m0, m1,
      [&](int64_t m) {
        float absmax = 0.f, nonfinite = 0.f;
        for (int64_t k = 0; k < a.K; ++k) {
          const float v = load_as_float(a.x, a.dtype, m * a.ldx + k);
          absmax = std::fmax(absmax, std::fabs(v));
          nonfinite += v * 0.f;  // NaN as soon as one v is NaN or +-Inf (fmax alone drops NaN)
        }
        return nonfinite == 0.f ? absmax : NAN;
      },
      [&](int64_t m, float inv, int8_t* q) {
        int32_t sum = 0;
        for (int64_t k = 0; k < a.K; ++k) {
          q[k] = quantize_one(load_as_float(a.x, a.dtype, m * a.ldx + k), inv);
          sum += q[k];
        }
        return sum;
      });
}

void gemm_tile_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  const int64_t bb = block_bytes(g.K_pad);
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const int8_t* blk = g.b + nb * bb;
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* a = g.a + m * g.lda;
      int32_t acc[kBlockN] = {};
      // Signed weights back from the u8 bytes (w = byte ^ 0x80): no row-sum correction needed.
      for (int64_t k4 = 0; k4 < g.K_pad / 4; ++k4)
        for (int64_t j = 0; j < kBlockN; ++j)
          for (int64_t t = 0; t < 4; ++t)
            acc[j] += int32_t(a[k4 * 4 + t]) * int8_t(blk[k4 * 64 + j * 4 + t] ^ 0x80);
      epilogue_block_scalar(g, acc, m, nb);
    }
  }
}

}  // namespace torchslim::cpu
