// Interface of the low-rank CPU kernels: out = (x V^T) U^T + bias in two products that share one
// kernel interface, the intermediate t = x V^T (tokens x r) kept in a small buffer that stays in
// L2 / L3 between them (the op layer, cpu/lowrank_linear.cpp, runs them on chunks of tokens). Free
// of torch headers: the kernel files are compiled once per instruction set.
#pragma once
#include <cstdint>

#include "int8_gemm.h"  // Dtype, Isa

namespace torchslim::cpu {

// One product in the "dot" form both halves have (weights row-major along the summed dimension):
// c[m, n] = sum_k a[m, k] * b[n, k] (+ bias[n]) for m < M, accumulated in float32 and rounded once to
// c_dtype; a and b have the same dtype. Phase 1: a = x, b = V, c = t (in x's dtype). Phase 2: a = t,
// b = U, c = out with the bias.
struct LrProduct {
  const void* a; int64_t lda;
  const void* b; int64_t ldb;
  Dtype dtype;         // of a and b
  int64_t M, K;
  const float* bias;   // indexed by n (already rounded to c_dtype), or nullptr
  void* c; int64_t ldc; Dtype c_dtype;
};
// Rows [n0, n1) of b (columns n0..n1 - 1 of c) for all M rows of a.
void lr_product_scalar(const LrProduct& p, int64_t n0, int64_t n1);
// AVX-512 F/BW/VL/DQ: register blocks of up to 4 rows of a x 4 rows of b; bfloat16 by vdpbf16ps
// where the CPU has AVX512_BF16 (lr_avx512_bf16_supported), else through float32.
void lr_product_avx512(const LrProduct& p, int64_t n0, int64_t n1);

// AMX (bfloat16): the activation operand in B tiles of 16 rows x 32 columns in the VNNI pair order
// (tile (mt, ks) at tiles + (mt * steps + ks) * 512, steps = round_up(K, 32) / 32; element
// [kk][2 j + i] = a[16 mt + j, 32 ks + 2 kk + i], zero beyond M and K), the weight b as A tiles read
// straight from its rows (a zero-padded copy at the row and column tails).
struct LrAmxProduct {
  const uint16_t* tiles; int64_t mtiles;
  const uint16_t* b; int64_t ldb;
  int64_t K;
  // Exactly one of: out (phase 2: c[m, n] + bias[n] rounded to out_dtype, row m at out + m * ldo),
  // or t_tiles (phase 1: c rounded to bfloat16 and written as the B tiles of the next product,
  // with steps_out = round_up(rows of b, 32) / 32 steps per token tile).
  const float* bias;
  void* out; int64_t ldo; Dtype out_dtype; int64_t M;
  uint16_t* t_tiles; int64_t steps_out;
};
// The B tiles of rows [mt0 * 16, mt1 * 16) of a (bfloat16, M rows of lda elements, K columns).
void lr_amx_tiles(const uint16_t* a, int64_t lda, int64_t M, int64_t K, uint16_t* tiles, int64_t mt0, int64_t mt1);
// Rows [n0, n1) of b, n0 a multiple of 32; every activation tile.
void lr_amx_product(const LrAmxProduct& p, int64_t n0, int64_t n1);

// Whether this CPU runs the AVX-512 kernels (F/BW/VL/DQ; used from the avx512_vnni level on), whether
// it has AVX512_BF16 for them, and whether it runs the AMX one (AMX-TILE + AMX-BF16; the amx level).
bool lr_avx512_supported();
bool lr_avx512_bf16_supported();
bool lr_amx_supported();

}  // namespace torchslim::cpu
