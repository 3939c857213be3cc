// Interface of the INT8 W8A8 CPU kernels. Deliberately free of torch headers: the kernel files are
// compiled once per instruction set with different -m flags, and everything they share is here.
#pragma once
#include <cstdint>

namespace torchslim::cpu {

enum class Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };
// Ordered from slowest to fastest.
enum class Isa : int { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3, Amx = 4 };

// Packed weight layout (documented for users in python/torchslim/formats/int8.py):
// N is padded to a multiple of 16 (one "block" = 16 output channels), K to a multiple of 64.
// Block b is one row of block_bytes(K_pad) bytes: K_pad/4 groups of [16 channels][4 k] int8
// (the VNNI / AMX B-operand order), followed by the 16 int32 sums over k of those channels
// (used to undo the +128 offset of unsigned activations on the AVX-512 VNNI path).
constexpr int64_t kBlockN = 16;
constexpr int64_t kPadK = 64;
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t block_bytes(int64_t K_pad) { return K_pad * kBlockN + kBlockN * 4; }

// Writes the packed layout of w (N, K) row-major int8 into packed (ceil(N/16) * block_bytes).
void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* packed);
// Inverse of pack_weight.
void unpack_weight(const int8_t* packed, int64_t N, int64_t K, int8_t* w);

// Per-token symmetric quantization of rows [m0, m1) of x (ldx elements apart, dtype in):
// scale = absmax / 127, q = round_half_even(x * (127 / absmax)) in [-127, 127]; q is written with
// K_pad - K zero columns after it. A row of zeros (or of magnitudes so small, below 127 / FLT_MAX
// ~ 3.7e-37, that 127 / absmax overflows) gets scale 0 and q 0; a row holding NaN or Inf
// gets scale NaN (so its output row is NaN, as a float GEMM would give). offset128 stores
// q + 128 as uint8 (== q ^ 0x80), the unsigned operand of vpdpbusd.
struct QuantizeArgs {
  const void* x; int64_t ldx; Dtype dtype;
  int64_t K, K_pad;
  int8_t* q; int64_t ldq;
  float* scale;
  bool offset128;
};
void quantize_rows_scalar(const QuantizeArgs& a, int64_t m0, int64_t m1);
void quantize_rows_avx2(const QuantizeArgs& a, int64_t m0, int64_t m1);
void quantize_rows_avx512(const QuantizeArgs& a, int64_t m0, int64_t m1);

// out[m, n] = (sum_k q[m, k] * w[n, k]) * a_scale[m] * b_scale[n] + bias[n], in out_dtype.
struct GemmArgs {
  const int8_t* a; int64_t lda;  // quantized activations, M rows of K_pad (offset128 for the vpdpbusd paths)
  const float* a_scale;          // (M,)
  const int8_t* b;               // packed weight
  const float* b_scale;          // (N,)
  const float* bias;             // (N,) float32, or nullptr
  void* out; int64_t ldo; Dtype out_dtype;
  int64_t M, N, K_pad;
};
// Each computes rows [m0, m1) and weight blocks [nb0, nb1) of out.
void gemm_tile_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_avxvnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);

// The best instruction set this CPU and OS support (cpu_features.cpp), and the one the ops use:
// the best by default, lowered with set_active_isa (tests run every path on one machine) or the
// environment variable TORCHSLIM_CPU_ISA=scalar|avx2|avx_vnni|avx512_vnni|amx read at first use.
bool isa_supported(Isa isa);
Isa best_isa();
Isa active_isa();
// Returns false (and changes nothing) for an unknown name or an ISA this CPU lacks.
bool set_active_isa(const char* name);
const char* isa_name(Isa isa);

}  // namespace torchslim::cpu
