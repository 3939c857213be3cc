// Interface of the 2:4 sparse CPU kernels. The format (values + 4-bit position metadata, the
// mma.sp order) is defined in python/torchslim/formats/sparse24.py. Free of torch headers: the
// kernel files are compiled once per instruction set.
#pragma once
#include <cstdint>

#include "int8_gemm.h"  // Dtype, Isa

namespace torchslim::cpu {

// One int16 meta word covers 16 columns (four groups of four); rows of values hold K_pad / 2
// elements and rows of meta K_pad / 16 words, K_pad = round_up(K, 16).
constexpr int64_t kS24ColsPerWord = 16;
// The activation buffer the kernels read has round_up(K_pad, 32) columns, zero beyond K: a kernel
// step covers 32 columns (16 for float32) and never reads a column it was not given.
constexpr int64_t kS24XPad = 32;

// A nibble's entry: the 4-bit mask of the two positions it names, or 0x10 for an invalid nibble
// (a repeated or decreasing position; its mask is 0, so it contributes nothing). Shared by every
// kernel so that all of them accept exactly the nibbles formats/sparse24.py calls valid.
constexpr uint8_t s24_nibble_entry(int nibble) {
  const int i0 = nibble & 3, i1 = nibble >> 2;
  return i0 < i1 ? uint8_t((1 << i0) | (1 << i1)) : uint8_t(0x10);
}

// out[m, n] = sum_k x[m, k] * W[n, k] + bias[n], W the dense weight of (values, meta), accumulated
// in float32 and rounded once to out_dtype.
struct S24Args {
  const void* x; int64_t ldx;   // M rows of round_up(K_pad, 32) readable columns, zero beyond K;
  Dtype x_dtype;                // bfloat16 (only with bfloat16 values, AVX-512) or float32
  const void* values; Dtype w_dtype;
  const int16_t* meta;
  int64_t K, K_pad;             // columns K .. K_pad - 1 (padding) never reach an output
  const float* bias;            // (N,) already rounded to out_dtype, or nullptr
  void* out; int64_t ldo; Dtype out_dtype;
  int64_t M;
};
// Rows [n0, n1) of the weight (output columns n0..n1 - 1) for all M rows of x. Returns false when
// some meta nibble of those rows is invalid (the outputs are then meaningless; the caller raises).
bool s24_linear_rows_scalar(const S24Args& a, int64_t n0, int64_t n1);
bool s24_linear_rows_avx512(const S24Args& a, int64_t n0, int64_t n1);

// The dense rows [n0, n1) (K_pad columns each, in w_dtype, zero from K on) of (values, meta) into dst, row r at
// dst + (r - n0) * ld elements. Returns false when some meta nibble of those rows is invalid.
struct S24Expand {
  const void* values; Dtype w_dtype;
  const int16_t* meta;
  int64_t K, K_pad;  // columns K .. K_pad - 1 are written as zeros
  void* dst; int64_t ld;
};
bool s24_expand_rows_scalar(const S24Expand& e, int64_t n0, int64_t n1);
bool s24_expand_rows_avx512(const S24Expand& e, int64_t n0, int64_t n1);

// AMX (bfloat16 only): x (M rows of round_up(K_pad, 32) bfloat16, zero beyond K) transposed into
// B tiles, 16 rows x 32 columns each in the VNNI pair order: tile (mt, ks) at xv + (mt * steps + ks)
// * 512, steps = round_up(K_pad, 32) / 32, rows beyond M zero. Prepares m-tiles [mt0, mt1).
void s24_prepare_x_amx(const uint16_t* x, int64_t ldx, int64_t M, int64_t K_pad, uint16_t* xv, int64_t mt0, int64_t mt1);
// As s24_linear_rows_avx512, reading x from the tiles of s24_prepare_x_amx (a.x is unused). With
// more than s24_amx_group_tiles activation tiles (96 rows) the kernel works in k-chunks of
// s24_amx_chunk_steps(M) steps of 32 columns; where there are several, acc holds the float32 partial
// sums between them: (N / 16 rounded up) x (M / 16 rounded up) tiles of 256 floats. Else acc may be null.
bool s24_linear_rows_amx(const S24Args& a, const uint16_t* xv, float* acc, int64_t n0, int64_t n1);
constexpr int s24_amx_group_tiles = 6;
// A chunk's B tiles (every activation row x the chunk's columns) are sized to stay in L2 (1 MiB),
// between 256 and 512 columns (the expanded A tiles of two weight blocks, 32 KiB at most, in L1).
inline int64_t s24_amx_chunk_steps(int64_t M) {
  const int64_t steps = (int64_t(1) << 20) / (((M + 15) / 16) * 16 * 2 * 32);
  return steps < 8 ? 8 : steps > 16 ? 16 : steps;
}
inline bool s24_amx_needs_acc(int64_t M, int64_t K_pad) {
  return (M + 15) / 16 > s24_amx_group_tiles && (K_pad + 31) / 32 > s24_amx_chunk_steps(M);
}

// Whether this CPU runs the AVX-512 2:4 kernels (AVX-512 F/BW/VL/DQ + BF16 + VBMI2: Zen4,
// Sapphire Rapids and newer); they are used when also the active ISA is avx512_vnni or amx.
bool s24_avx512_supported();
// Whether it runs the AMX one too (AMX-TILE + AMX-BF16 usable, and the above); used when the active
// ISA is amx.
bool s24_amx_supported();

}  // namespace torchslim::cpu
