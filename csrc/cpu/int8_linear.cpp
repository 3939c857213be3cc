// CPU implementations of the INT8 W8A8 ops: argument checks, buffers and threading (stable_tensor.h), the
// arithmetic in the per-ISA kernels under cpu/kernels/.
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/float_dtype.h"
#include "cpu/kernels/int8_gemm.h"
#include "cpu/parallel_tasks.h"
#include "cpu/thread_scratch.h"

namespace torchslim {
namespace {

using cpu::Dtype;
using cpu::Isa;

// The largest K whose int32 sums cannot overflow: |q| <= 127 times the u8 weights (w + 128 <= 255)
// gives at most 32385 per k, and 65536 * 32385 < 2**31. Int8Linear refuses wider layers up front.
constexpr int64_t kMaxK = 65536;

Dtype float_dtype(const Tensor& t, const char* op) {
  TORCHSLIM_CHECK(is_float(t.scalar_type()), op, ": x must be float32, bfloat16 or float16, got ", t.scalar_type());
  return torchslim::float_dtype(t.scalar_type());
}

void check_x(const Tensor& x, const char* op) {
  TORCHSLIM_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", shape(x));
  float_dtype(x, op);
  TORCHSLIM_CHECK(x.is_contiguous(), op, ": x must be contiguous");
}

// One pass over the weight scales, as the bit patterns of |s| (for non-negative floats the integer
// order is the numeric order, and Inf / NaN lie above every finite value): the largest, and the
// smallest non-zero. Branch-free, so it vectorizes; it runs on every call.
struct ScaleRange {
  uint32_t largest = 0, smallest_nonzero = UINT32_MAX;
  bool finite() const { return largest < 0x7F800000u; }
  static float value(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

ScaleRange scan_scales(const float* s, int64_t N) {
  ScaleRange r;
  for (int64_t n = 0; n < N; ++n) {
    uint32_t b;
    std::memcpy(&b, s + n, 4);
    b &= 0x7FFFFFFFu;
    r.largest = b > r.largest ? b : r.largest;
    const uint32_t nz = b == 0 ? UINT32_MAX : b;
    r.smallest_nonzero = nz < r.smallest_nonzero ? nz : r.smallest_nonzero;
  }
  return r;
}

// Checks w_scale (finite) and bias against N; returns the range of w_scale's magnitudes.
ScaleRange check_scale_and_bias(const Tensor& w_scale, const std::optional<Tensor>& bias, int64_t N, const char* op) {
  TORCHSLIM_CHECK(w_scale.is_cpu(), op, ": w_scale must be on cpu like x, got ", w_scale.device());
  TORCHSLIM_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, op, ": w_scale must have shape (", N,
              ",), got ", shape(w_scale));
  TORCHSLIM_CHECK(w_scale.scalar_type() == ScalarType::Float, op, ": w_scale must be float32, got ",
              w_scale.scalar_type());
  TORCHSLIM_CHECK(w_scale.is_contiguous(), op, ": w_scale must be contiguous");
  const float* s = w_scale.const_data_ptr<float>();
  const ScaleRange range = scan_scales(s, N);
  if (!range.finite()) {
    for (int64_t n = 0; n < N; ++n)
      TORCHSLIM_CHECK(std::isfinite(s[n]), op, ": w_scale[", n, "] is ", s[n], "; scales must be finite");
  }
  if (!bias.has_value()) return range;
  const Tensor& b = *bias;
  TORCHSLIM_CHECK(b.is_cpu(), op, ": bias must be on cpu like x, got ", b.device());
  TORCHSLIM_CHECK(b.dim() == 1 && b.size(0) == N, op, ": bias must have shape (", N, ",), got ", shape(b));
  TORCHSLIM_CHECK(is_floating_point(b.scalar_type()), op, ": bias must be floating point, got ", b.scalar_type());
  return range;
}

void check_weight_q(const Tensor& w_q, const char* op) {
  TORCHSLIM_CHECK(w_q.is_cpu(), op, ": w_q must be on cpu like x, got ", w_q.device());
  TORCHSLIM_CHECK(w_q.dim() == 2, op, ": w_q must be 2-D (N, K), got shape ", shape(w_q));
  TORCHSLIM_CHECK(w_q.scalar_type() == ScalarType::Char, op, ": w_q must be int8, got ", w_q.scalar_type());
  TORCHSLIM_CHECK(w_q.is_contiguous(), op, ": w_q must be contiguous");
}

cpu::QuantizeArgs quantize_args(const Tensor& x, int64_t K_pad, Tensor& q, float* scale, int32_t* row_offset) {
  return {x.const_data_ptr(), x.size(1), float_dtype(x, "quantize"), x.size(1), K_pad,
          q.mutable_data_ptr<int8_t>(), q.size(1), scale, row_offset};
}

void quantize_chunk(const cpu::QuantizeArgs& qa, int64_t m0, int64_t m1, Isa isa) {
  if (isa >= Isa::Avx512Vnni)
    cpu::quantize_rows_avx512(qa, m0, m1);
  else if (isa >= Isa::Avx2)
    cpu::quantize_rows_avx2(qa, m0, m1);
  else
    cpu::quantize_rows_scalar(qa, m0, m1);
}

void quantize_rows(const cpu::QuantizeArgs& qa, int64_t M, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(qa.K, 1));
  parallel_for(M, grain, [&](int64_t b, int64_t e) { quantize_chunk(qa, b, e, isa); });
}

std::tuple<Tensor, Tensor> quantize_per_token_cpu(Tensor x) {
  check_x(x, "quantize_per_token");
  const int64_t M = x.size(0), K = x.size(1);
  Tensor q = empty({M, K}, ScalarType::Char, x.device());
  Tensor scale = empty({M}, ScalarType::Float, x.device());
  if (M > 0) quantize_rows(quantize_args(x, K, q, scale.mutable_data_ptr<float>(), nullptr), M, cpu::active_isa());
  return {q, scale};
}

Tensor pack_weight_cpu(Tensor w_q) {
  check_weight_q(w_q, "int8_pack_weight");
  const int64_t N = w_q.size(0), K = w_q.size(1);
  Tensor packed = empty({cpu::packed_bytes(N, K)}, ScalarType::Char, w_q.device());
  cpu::pack_weight(w_q.const_data_ptr<int8_t>(), N, K, packed.mutable_data_ptr<int8_t>());
  return packed;
}

// The packed layout is self-describing: its header must name exactly this N and K (so a weight
// packed for another shape, or bytes that never came from int8_pack_weight, are refused), and its
// size must be the one they imply (so no kernel can read past it).
void check_packed(const Tensor& w_packed, int64_t N, int64_t K, const char* op) {
  TORCHSLIM_CHECK(w_packed.is_cpu(), op, ": w_packed must be on cpu like x, got ", w_packed.device());
  TORCHSLIM_CHECK(w_packed.scalar_type() == ScalarType::Char && w_packed.dim() == 1 && w_packed.is_contiguous(), op,
              ": w_packed must be the contiguous 1-D int8 tensor int8_pack_weight returns, got ",
              w_packed.scalar_type(), " of shape ", shape(w_packed));
  // Below 2**31 each, the byte count below cannot overflow (and no real weight comes near).
  TORCHSLIM_CHECK(N >= 0 && K >= 0 && N < (int64_t(1) << 31) && K < (int64_t(1) << 31), op,
              ": N and K must be in [0, 2**31), got N=", N, ", K=", K);
  const int64_t expected = cpu::packed_bytes(N, K);
  TORCHSLIM_CHECK(w_packed.numel() >= cpu::kHeaderBytes, op, ": w_packed holds ", w_packed.numel(),
              " bytes, less than its ", cpu::kHeaderBytes, "-byte header");
  cpu::PackedHeader h;
  std::memcpy(&h, w_packed.const_data_ptr<int8_t>(), sizeof(h));
  TORCHSLIM_CHECK(std::memcmp(h.magic, cpu::kPackedMagic, sizeof(h.magic)) == 0 && h.version == cpu::kPackedVersion &&
                  h.block_n == cpu::kBlockN, op,
              ": w_packed has no valid header (not made by int8_pack_weight of this torchslim version)");
  TORCHSLIM_CHECK(h.N == N && h.K == K, op, ": w_packed was packed for a (N=", h.N, ", K=", h.K,
              ") weight, but the call needs (N=", N, ", K=", K, ")");
  TORCHSLIM_CHECK(w_packed.numel() == expected, op, ": w_packed holds ", w_packed.numel(),
              " bytes, but a packed (N=", N, ", K=", K, ") weight holds ", expected);
}

Tensor unpack_weight_cpu(Tensor w_packed, int64_t N, int64_t K) {
  const char* op = "int8_unpack_weight";
  check_packed(w_packed, N, K, op);
  Tensor w = empty({N, K}, ScalarType::Char, w_packed.device());
  cpu::unpack_weight(w_packed.const_data_ptr<int8_t>(), N, K, w.mutable_data_ptr<int8_t>());
  return w;
}

// The range of row scales whose product with every non-zero |w_scale[n]| is a normal float32
// (GemmArgs::a_scale_lo/hi): rows outside it take the double-precision epilogue.
std::pair<double, double> safe_row_scales(const ScaleRange& r) {
  if (r.largest == 0) return {0.0, std::numeric_limits<double>::infinity()};
  return {double(std::numeric_limits<float>::min()) / ScaleRange::value(r.smallest_nonzero),
          double(std::numeric_limits<float>::max()) / ScaleRange::value(r.largest)};
}

Tensor int8_linear_packed_impl(const Tensor& x, const Tensor& w_packed, const Tensor& w_scale,
                               const std::optional<Tensor>& bias, const char* op) {
  check_x(x, op);
  TORCHSLIM_CHECK(w_scale.dim() == 1, op, ": w_scale must be 1-D (N,), got shape ", shape(w_scale));
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.size(0);
  const ScaleRange scale_range = check_scale_and_bias(w_scale, bias, N, op);
  check_packed(w_packed, N, K, op);
  TORCHSLIM_CHECK(K <= kMaxK, op, ": K=", K, " exceeds ", kMaxK, ", beyond which the int32 accumulator can overflow");
  if (K == 0) {  // an empty sum: every row is the bias (the kernels assume at least one k step)
    Tensor out = empty({M, N}, x.scalar_type(), x.device());
    if (bias) copy_into(out, contiguous_as(*bias, ScalarType::Float));  // broadcast over the rows
    else zero(out);
    return out;
  }
  Tensor out = empty({M, N}, x.scalar_type(), x.device());
  if (M == 0 || N == 0) return out;
  // The bias in float32, added in the exact epilogue (not first rounded to x's dtype).
  Tensor bias_keep;
  const float* bias_f32 = bias_as_floats(bias, std::nullopt, bias_keep);

  // Below 16 rows an AMX tile is mostly padding and its setup costs more than it saves: the
  // AVX-512 VNNI kernel streams the weight as fast (measured: M=1, 1536x384: 7 us vs 17 us).
  constexpr int64_t kAmxMinRows = 16;
  const Isa isa = cpu::active_isa() == Isa::Amx && M < kAmxMinRows ? Isa::Avx512Vnni : cpu::active_isa();
  const int64_t K_pad = cpu::round_up(K, cpu::kPadK);
  // AMX loads activation tiles of 32 rows: pad with rows of zeros (their outputs are not written).
  const int64_t M_pad = isa == Isa::Amx ? cpu::round_up(M, 32) : M;
  Tensor q = thread_scratch(Scratch::Int8Q, {M_pad, K_pad}, ScalarType::Char);
  // Per row: the scale (float32) and 128 * the sum of q (int32), in one allocation (this runs per call).
  Tensor row_info = empty({2 * M}, ScalarType::Float, x.device());
  float* a_scale = row_info.mutable_data_ptr<float>();
  int32_t* a_offset = reinterpret_cast<int32_t*>(a_scale + M);
  if (M_pad > M) std::memset(q.mutable_data_ptr<int8_t>() + M * K_pad, 0, (M_pad - M) * K_pad);
  const cpu::QuantizeArgs qa = quantize_args(x, K_pad, q, a_scale, a_offset);

  const auto [lo, hi] = safe_row_scales(scale_range);
  const cpu::GemmArgs g{q.const_data_ptr<int8_t>(), K_pad, a_scale, a_offset,
                        w_packed.const_data_ptr<int8_t>() + cpu::kHeaderBytes, w_scale.const_data_ptr<float>(),
                        bias_f32,
                        out.mutable_data_ptr(), N, float_dtype(x, op), M, N, K_pad, lo, hi};
  auto* tile = isa == Isa::Amx ? cpu::gemm_tile_amx
             : isa == Isa::Avx512Vnni ? cpu::gemm_tile_avx512
             : isa == Isa::AvxVnni ? cpu::gemm_tile_avxvnni
             : isa == Isa::Avx2 ? cpu::gemm_tile_avx2 : cpu::gemm_tile_scalar;
  const int64_t NB = cpu::round_up(N, cpu::kBlockN) / cpu::kBlockN;

  constexpr int64_t kCachedWeightBytes = 4 << 20;
  if (M * x.element_size() >= N && w_packed.numel() <= kCachedWeightBytes) {
    // Activations outweigh a weight that stays in cache (many tokens through small layers:
    // BERT-style encoders). Each task takes 96 rows (a multiple of every kernel's row step) and
    // all channels: it quantizes its rows and multiplies them while they are still in L1/L2, and
    // every task re-reads the weight from cache. (A large weight would be re-read from DRAM.)
    constexpr int64_t kRows = 96;
    parallel_for((M + kRows - 1) / kRows, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t m0 = t * kRows, m1 = std::min(M, m0 + kRows);
        quantize_chunk(qa, m0, m1, isa);
        tile(g, m0, m1, 0, NB);
      }
    });
    return out;
  }

  // The weight outweighs the activations (decode, large layers): quantize all rows first, then
  // tasks of 64 or 128 channels x 192 rows, so each thread streams its part of the weight once.
  // Beyond 128 rows, 128-channel tasks re-read the activations half as often (measured, 4096x4096,
  // M = 1024: 4.2 TOP/s against 3.1 with 64 channels); up to 128 rows 64 channels measured ~10%
  // faster. Narrower still where that would leave fewer than 4 tasks per thread.
  quantize_rows(qa, M, isa);
  constexpr int64_t kRows = 192;
  const int64_t MT = (M + kRows - 1) / kRows;
  int64_t blocks = M <= 128 ? 4 : 8;
  while (blocks > 2 && (NB + blocks - 1) / blocks * MT < 4 * num_threads()) blocks /= 2;
  const int64_t NG = (NB + blocks - 1) / blocks;
  parallel_for(NG * MT, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t nb0 = (t / MT) * blocks, m0 = (t % MT) * kRows;
      tile(g, m0, std::min(M, m0 + kRows), nb0, std::min(NB, nb0 + blocks));
    }
  });
  return out;
}

Tensor int8_linear_packed_cpu(Tensor x, Tensor w_packed, Tensor w_scale, std::optional<Tensor> bias) {
  return int8_linear_packed_impl(x, w_packed, w_scale, bias, "int8_linear_packed");
}

Tensor int8_linear_cpu(Tensor x, Tensor w_q, Tensor w_scale, std::optional<Tensor> bias) {
  const char* op = "int8_linear";
  check_x(x, op);
  check_weight_q(w_q, op);
  TORCHSLIM_CHECK(w_q.size(1) == x.size(1), op, ": x has K=", x.size(1), " but w_q has K=", w_q.size(1));
  check_scale_and_bias(w_scale, bias, w_q.size(0), op);
  return int8_linear_packed_impl(x, pack_weight_cpu(w_q), w_scale, bias, op);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("quantize_per_token", TORCH_BOX(&quantize_per_token_cpu));
  m.impl("int8_pack_weight", TORCH_BOX(&pack_weight_cpu));
  m.impl("int8_unpack_weight", TORCH_BOX(&unpack_weight_cpu));
  m.impl("int8_linear", TORCH_BOX(&int8_linear_cpu));
  m.impl("int8_linear_packed", TORCH_BOX(&int8_linear_packed_cpu));
}

}  // namespace torchslim
