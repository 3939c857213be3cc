// Interface of the INT8 W8A8 CPU kernels. Deliberately free of torch headers: the kernel files are
// compiled once per instruction set with different -m flags, and everything they share is here.
#pragma once
#include <cstdint>

namespace torchslim::cpu {

enum class Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };
// Ordered from slowest to fastest.
enum class Isa : int { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3, Amx = 4 };
constexpr Isa kAllIsas[] = {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Amx};

// Packed weight layout (documented for users in python/torchslim/formats/int8.py): a 64-byte
// header that records N and K, then ceil(N / 16) blocks of 16 output channels. Block b holds
// K_pad / 4 groups of [16 channels][4 k] bytes (the VNNI / AMX B-operand order), K padded to a
// multiple of 64. Each byte is the weight plus 128 (w ^ 0x80, unsigned): the u8 operand of
// vpdpbusd / tdpbsud, whose +128 is undone with the row sums of the activations, which the kernel
// computes itself. So the kernels read nothing but the header (validated) and the weights: the
// padding bytes meet zero activations and never reach an output.
constexpr int64_t kBlockN = 16;
constexpr int64_t kPadK = 64;
constexpr int64_t kHeaderBytes = 64;
constexpr char kPackedMagic[8] = {'T', 'S', 'L', 'M', 'I', '8', 'P', 'K'};
constexpr uint32_t kPackedVersion = 2;
struct PackedHeader {
  char magic[8];
  uint32_t version;
  uint32_t block_n;
  int64_t N, K;
};
static_assert(sizeof(PackedHeader) <= kHeaderBytes, "the header fits its 64 bytes");

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t block_bytes(int64_t K_pad) { return K_pad * kBlockN; }
inline int64_t packed_bytes(int64_t N, int64_t K) {
  return kHeaderBytes + round_up(N, kBlockN) / kBlockN * block_bytes(round_up(K, kPadK));
}

// Writes the header and the packed layout of w (N, K) row-major int8 into packed_bytes(N, K).
void pack_weight(const int8_t* w, int64_t N, int64_t K, int8_t* packed);
// Inverse of pack_weight (the header is checked by the caller).
void unpack_weight(const int8_t* packed, int64_t N, int64_t K, int8_t* w);

// Per-token symmetric quantization of rows [m0, m1) of x (ldx elements apart, dtype in):
// scale = absmax / 127, q = round_half_even(x * (127 / absmax)) in [-127, 127]; q is written with
// K_pad - K zero columns after it, and row_offset (if not null) gets 128 * sum_k q, what the u8
// weights (w + 128) add to the row's sums. A row of zeros (or of magnitudes so small, below
// 127 / FLT_MAX ~ 3.7e-37, that 127 / absmax overflows) gets scale 0 and q 0; a row holding NaN
// or Inf gets scale NaN (so its output row is NaN, as a float GEMM would give) and q 0.
struct QuantizeArgs {
  const void* x; int64_t ldx; Dtype dtype;
  int64_t K, K_pad;
  int8_t* q; int64_t ldq;
  float* scale;
  int32_t* row_offset;
};
void quantize_rows_scalar(const QuantizeArgs& a, int64_t m0, int64_t m1);
void quantize_rows_avx2(const QuantizeArgs& a, int64_t m0, int64_t m1);
void quantize_rows_avx512(const QuantizeArgs& a, int64_t m0, int64_t m1);

// out[m, n] = (sum_k q[m, k] * w[n, k]) * a_scale[m] * b_scale[n] + bias[n], in out_dtype.
struct GemmArgs {
  const int8_t* a; int64_t lda;  // quantized activations, M rows of K_pad
  const float* a_scale;          // (M,)
  const int32_t* a_offset;       // (M,) 128 * sum_k q[m, k]: subtracted, it undoes the +128 of the u8 weights
  const int8_t* b;               // packed weight blocks (after the header)
  const float* b_scale;          // (N,)
  const float* bias;             // (N,) float32, or nullptr
  void* out; int64_t ldo; Dtype out_dtype;
  int64_t M, N, K_pad;
  // Row scales in [a_scale_lo, a_scale_hi] times every non-zero |b_scale[n]| give a normal
  // float32; rows outside take the epilogue in double (float_epilogue_is_exact, scalar_convert.h).
  double a_scale_lo, a_scale_hi;
};
// Each computes rows [m0, m1) and weight blocks [nb0, nb1) of out.
void gemm_tile_scalar(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_avx2(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_avxvnni(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_avx512(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
void gemm_tile_amx(const GemmArgs& g, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);

// The best instruction set this CPU and OS support (cpu_features.cpp), and the one the ops use:
// the best by default, lowered with set_active_isa (tests run every path on one machine; the
// Python package applies the environment variable TORCHSLIM_CPU_ISA through it at import).
bool isa_supported(Isa isa);
Isa best_isa();
Isa active_isa();
enum class SetIsa : int { Ok = 0, Unknown = 1, Unsupported = 2 };
// Names are case-insensitive; an unknown name or an ISA this CPU lacks changes nothing.
SetIsa set_active_isa(const char* name);
const char* isa_name(Isa isa);

}  // namespace torchslim::cpu
