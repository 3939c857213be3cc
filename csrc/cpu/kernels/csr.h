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
  // The activations in float32, laid out for the kernel: (M, K) row-major for the scalar and gather
  // kernels; for the token kernel, tiles of T tokens, tile t at x + t * K * T, x[m, k] at
  // [t][k][m - t T] (rows beyond M zero).
  const float* x; int64_t M; int64_t T;
  const float* bias;  // (N,) already rounded to out_dtype, or nullptr
  void* out; int64_t ldo; Dtype out_dtype;
};
// Rows [n0, n1) of the weight (output columns n0..n1 - 1) for all M rows of x. Return false when a
// column of those rows is out of range or out of order (the outputs are then meaningless; the
// caller raises).
bool csr_rows_scalar(const CsrArgs& a, int64_t n0, int64_t n1);
// AVX-512 (F/BW/VL/DQ): 16 entries at a time, x gathered by column; for few rows of x.
bool csr_rows_gather_avx512(const CsrArgs& a, int64_t n0, int64_t n1);
// AVX-512: T = 16, 32 or 64 tokens at a time (x in tiles), one broadcast value times one row of a tile
// per entry; for many rows of x.
bool csr_rows_tokens_avx512(const CsrArgs& a, int64_t n0, int64_t n1);

}  // namespace torchslim::cpu
