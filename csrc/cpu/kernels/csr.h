// Interface of the CSR sparse CPU kernels. The format (int32 row pointers, int16 | int32 columns,
// values in the compute dtype) is defined in python/torchslim/formats/csr.py. Free of torch headers:
// the kernel files are compiled once per instruction set.
#pragma once
#include <cstdint>

#include "int8_gemm.h"  // Dtype, Isa

namespace torchslim::cpu {

// out[m, n] = sum over the stored entries j of row n of x[m, col[j]] * values[j] + bias[n],
// accumulated in float32 and rounded once to out_dtype. The row pointers are checked by the caller
// (crow[0] = 0, never decreasing, crow[N] = nnz); the kernels check every column they read (in
// [0, K), strictly increasing within its row) before using it as an index.
struct CsrArgs {
  const int32_t* crow;
  const void* col; bool col16;  // int16 or int32 columns
  const void* values; Dtype w_dtype;
  int64_t K;
  // The activations, laid out for the kernel: float32 (M, K) row-major for the scalar and gather
  // kernels; for the token kernel, tiles of T tokens with K + 1 columns, tile t at x + t (K + 1) T,
  // x[m, k] at [t][k][m - t T] (rows beyond M and column K zero), bfloat16 when the values are
  // and x_bf16 (T = 32 or 64: only where csr_avx512_bf16_supported()), float32 otherwise (T = 4, 8,
  // 16, 32 or 64).
  const void* x; bool x_bf16; int64_t M; int64_t T;
  const float* bias;  // (N,) already rounded to out_dtype, or nullptr
  void* out; int64_t ldo; Dtype out_dtype;
};
// Rows [n0, n1) of the weight (output columns n0..n1 - 1) for all M rows of x. Return false when a
// column of those rows is out of range or out of order (the outputs are then meaningless; the
// caller raises).
bool csr_rows_scalar(const CsrArgs& a, int64_t n0, int64_t n1);
// AVX-512 (F/BW/VL/DQ): 16 entries at a time, x gathered by column; for few rows of x.
bool csr_rows_gather_avx512(const CsrArgs& a, int64_t n0, int64_t n1);
// AVX-512: T tokens at a time (x in tiles), one broadcast value times one row of a tile per entry (two
// entries per vdpbf16ps with bfloat16); for many rows of x.
bool csr_rows_tokens_avx512(const CsrArgs& a, int64_t n0, int64_t n1);

// Whether the active ISA runs the AVX-512 CSR kernels (F/BW/VL/DQ: every level from avx512_vnni on).
inline bool csr_avx512_active() { return active_isa() >= Isa::Avx512Vnni; }
// Whether this CPU also has AVX512_BF16, for the bfloat16 token tiles (vdpbf16ps): Zen4, Sapphire Rapids
// and newer. Without it (Ice Lake, Cascade Lake) bfloat16 x goes through float32 tiles.
bool csr_avx512_bf16_supported();

}  // namespace torchslim::cpu
