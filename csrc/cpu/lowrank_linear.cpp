// CPU implementation of torchslim::lowrank_linear: argument checks, buffers and threads (stable_tensor.h); the
// arithmetic in cpu/kernels/lowrank_*.cpp. out = (x V^T) U^T + bias as two products per chunk of
// tokens, each split over threads by weight rows: t = x V^T for the chunk (all of V), then
// out = t U^T + bias (all of U). t, at most kChunkTokens x r, lives in a buffer that stays in L2 / L3
// between the two and is reused by every chunk: the whole (M, r) intermediate never exists. Three ways:
//  - bfloat16 with AMX, from kAmxMinRows rows: tile multiplies, t kept in the tile layout the second
//    product reads (kernels/lowrank_amx.cpp);
//  - float32 and float16 from kGemmMinRows rows, where compute dominates: ATen's GEMM (oneDNN) for both
//    products of each chunk, t in L2 between them;
//  - otherwise AVX-512 register blocks (vdpbf16ps for bfloat16 where the CPU has it), or the portable
//    kernel where the active ISA has no AVX-512.
#include <algorithm>

#include "cpu/float_dtype.h"
#include "cpu/kernels/lowrank.h"
#include "cpu/parallel_tasks.h"
#include "cpu/thread_scratch.h"

namespace torchslim {
namespace {

using cpu::Dtype;
using cpu::round_up;

// The checks of lowrank_linear, in the words and order of ops.check_lowrank_linear_args.
void check_args(const Tensor& x, const Tensor& V, const Tensor& U, const std::optional<Tensor>& bias, const char* op) {
  TORCHSLIM_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", shape(x));
  const ScalarType dt = x.scalar_type();
  TORCHSLIM_CHECK(is_float(dt), op, ": x must be float32, bfloat16 or float16, got ", dt);
  TORCHSLIM_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"V", V}, {"U", U}}) {
    TORCHSLIM_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ", t.device());
    TORCHSLIM_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", shape(t));
    TORCHSLIM_CHECK(t.scalar_type() == dt, op, ": ", name, " must have x's dtype ", dt, ", got ", t.scalar_type());
    TORCHSLIM_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  const int64_t K = x.size(1), r = V.size(0), N = U.size(0);
  TORCHSLIM_CHECK(V.size(1) == K, op, ": V must have shape (r, ", K, ") for x of shape ", shape(x), ", got ", shape(V));
  TORCHSLIM_CHECK(U.size(1) == r, op, ": U must have shape (N, ", r, ") for V of shape ", shape(V), ", got ", shape(U));
  if (bias.has_value()) {
    TORCHSLIM_CHECK(bias->device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ", bias->device());
    TORCHSLIM_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ", shape(*bias));
    TORCHSLIM_CHECK(is_floating_point(bias->scalar_type()), op, ": bias must be floating point, got ", bias->scalar_type());
  }
}

// Tokens per chunk: t (chunk x r) and, with AMX, the chunk's activation tiles (chunk x K bfloat16:
// 1 MiB at K = 4096) stay in L2 while the weights stream past; each chunk streams both weights once.
// (Measured at M = 512 on 4096 x 4096, r = 1024: 128 tokens ~10-20% faster than 256 in the first
// product, whose 2 MiB of tiles then spilled to L3; 64 re-streamed the weights too often.)
constexpr int64_t kChunkTokens = 128;
// AMX from this many rows of x; below, the register kernel (one row streams the weight as fast).
constexpr int64_t kAmxMinRows = 2;

// Tasks of whole `align`-row groups, about 8 per thread (dynamic balance on shared machines) and at
// least min_rows rows each.
int64_t task_rows(int64_t rows, int64_t align, int64_t min_rows) {
  const int64_t per = (rows + 8 * num_threads() - 1) / (8 * num_threads());
  return round_up(std::max({per, min_rows, int64_t(1)}), align);
}

template <class F>
void over_rows(int64_t rows, int64_t step, const F& fn) {
  parallel_tasks((rows + step - 1) / step, [&](int64_t t) { fn(t * step, std::min(rows, (t + 1) * step)); });
}

// AMX: chunks of tokens as B tiles; t stays in the tile layout between the products.
void lowrank_amx(const Tensor& x, const Tensor& V, const Tensor& U, const float* bias, Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), r = V.size(0), N = U.size(0);
  const int64_t ksteps = round_up(K, 32) / 32, rsteps = round_up(r, 32) / 32;
  // The tiles read whole steps of 32 columns: x padded with zero columns where K is not a multiple.
  Tensor xk = x;
  if (K % 32) {
    xk = torch::stable::new_zeros(x, {M, ksteps * 32});
    copy_into(narrowed(xk, 1, 0, K), x);
  }
  const int64_t chunk = std::min(M, kChunkTokens), mtiles_max = (chunk + 15) / 16;
  const Tensor x_tiles = thread_scratch(Scratch::LowrankXTiles, {mtiles_max * ksteps * 512}, x.scalar_type());
  const Tensor t_tiles = thread_scratch(Scratch::LowrankTTiles, {mtiles_max * rsteps * 512}, x.scalar_type());
  auto* xt = static_cast<uint16_t*>(x_tiles.mutable_data_ptr());
  auto* tt = static_cast<uint16_t*>(t_tiles.mutable_data_ptr());
  const auto* xp = static_cast<const uint16_t*>(xk.const_data_ptr());
  const auto* v = static_cast<const uint16_t*>(V.const_data_ptr());
  const auto* u = static_cast<const uint16_t*>(U.const_data_ptr());
  const int64_t v_step = task_rows(r, 32, 32), u_step = task_rows(N, 32, 32);
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t mc = std::min(chunk, M - m0), mtiles = (mc + 15) / 16;
    over_rows(mtiles, 1, [&](int64_t b, int64_t e) {
      cpu::lr_amx_tiles(xp + m0 * xk.size(1), xk.size(1), mc, K, xt, b, e);
    });
    const cpu::LrAmxProduct first{xt, mtiles, v, K, K, nullptr, nullptr, 0, Dtype::BF16, mc, tt, rsteps};
    over_rows(r, v_step, [&](int64_t b, int64_t e) { cpu::lr_amx_product(first, b, e); });
    void* o = static_cast<char*>(out.mutable_data_ptr()) + m0 * N * out.element_size();
    const cpu::LrAmxProduct second{tt, mtiles, u, r, r, bias, o, N, float_dtype(out.scalar_type()), mc, nullptr, 0};
    over_rows(N, u_step, [&](int64_t b, int64_t e) { cpu::lr_amx_product(second, b, e); });
  }
}

// Register kernels: t row-major (chunk x r) in x's dtype.
void lowrank_rows(const Tensor& x, const Tensor& V, const Tensor& U, const float* bias, Tensor& out, bool avx512) {
  const int64_t M = x.size(0), K = x.size(1), r = V.size(0), N = U.size(0);
  const Dtype dt = float_dtype(x.scalar_type());
  auto* fn = avx512 ? cpu::lr_product_avx512 : cpu::lr_product_scalar;
  const int64_t chunk = std::min(M, kChunkTokens);
  const Tensor t = thread_scratch(Scratch::LowrankT, {chunk, r}, x.scalar_type());
  // At least ~64K multiply-adds per task (a task's fixed cost is small next to that).
  const int64_t v_step = task_rows(r, 8, (1 << 16) / std::max<int64_t>(1, K * chunk));
  const int64_t u_step = task_rows(N, 8, (1 << 16) / std::max<int64_t>(1, r * chunk));
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t mc = std::min(chunk, M - m0), es = x.element_size();
    const cpu::LrProduct first{static_cast<const char*>(x.const_data_ptr()) + m0 * K * es, K, V.const_data_ptr(), K, dt,
                               mc, K, nullptr, t.mutable_data_ptr(), r, dt};
    over_rows(r, v_step, [&](int64_t b, int64_t e) { fn(first, b, e); });
    const cpu::LrProduct second{t.const_data_ptr(), r, U.const_data_ptr(), r, dt, mc, r,
                                bias, static_cast<char*>(out.mutable_data_ptr()) + m0 * N * es, N, dt};
    over_rows(N, u_step, [&](int64_t b, int64_t e) { fn(second, b, e); });
  }
}

// float32 and float16 from kGemmMinRows rows: ATen's GEMM (oneDNN) for both products of each chunk of
// kGemmChunkTokens tokens, t (in x's dtype, at most 1 MiB at r = 1024) staying in L2 between them.
// There compute dominates, and the register kernels reach only 0.6-0.8x of oneDNN's float32 GEMM
// (measured on 4096 x 4096, r = 1024: 0.77x two F.linear calls at M = 128, 0.61x at M = 512; this way
// 1.0x and 0.93x). bfloat16 has the AMX kernel, or (without AMX) the vdpbf16ps register kernel.
constexpr int64_t kGemmMinRows = 64;
constexpr int64_t kGemmChunkTokens = 256;

void lowrank_gemm(const Tensor& x, const Tensor& V, const Tensor& U, const std::optional<Tensor>& bias_x, Tensor& out) {
  const int64_t M = x.size(0);
  const Tensor t = thread_scratch(Scratch::LowrankT, {std::min(M, kGemmChunkTokens), V.size(0)}, x.scalar_type());
  for (int64_t m0 = 0; m0 < M; m0 += kGemmChunkTokens) {
    const int64_t mc = std::min(kGemmChunkTokens, M - m0);
    Tensor tc = narrowed(t, 0, 0, mc), oc = narrowed(out, 0, m0, mc);
    linear_out(tc, narrowed(x, 0, m0, mc), V, std::nullopt);
    linear_out(oc, tc, U, bias_x);
  }
}

Tensor lowrank_linear_cpu(Tensor x, Tensor V, Tensor U, std::optional<Tensor> bias) {
  const char* op = "lowrank_linear";
  check_args(x, V, U, bias, op);
  const int64_t M = x.size(0), K = x.size(1), r = V.size(0), N = U.size(0);
  Tensor out = empty({M, N}, x.scalar_type(), x.device());
  if (M == 0 || N == 0) return out;
  // The bias as F.linear adds it in x's dtype (so rounded to it once), then float32 for the kernels.
  const std::optional<Tensor> bias_x =
      bias.has_value() ? std::optional(contiguous_as(*bias, x.scalar_type())) : std::nullopt;
  if (r == 0 || K == 0) {  // an empty sum: every row is the bias
    if (bias_x) copy_into(out, *bias_x);  // broadcast over the rows
    else zero(out);
    return out;
  }
  Tensor bias_keep;
  const float* bias_ptr = bias_as_floats(bias, x.scalar_type(), bias_keep);
  const bool avx512 = cpu::lr_avx512_supported() && cpu::active_isa() >= cpu::Isa::Avx512Vnni;
  if (x.scalar_type() == ScalarType::BFloat16 && M >= kAmxMinRows && cpu::active_isa() == cpu::Isa::Amx &&
      cpu::lr_amx_supported())
    lowrank_amx(x, V, U, bias_ptr, out);
  else if (x.scalar_type() != ScalarType::BFloat16 && M >= kGemmMinRows)
    lowrank_gemm(x, V, U, bias_x, out);
  else
    lowrank_rows(x, V, U, bias_ptr, out, avx512);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("lowrank_linear", TORCH_BOX(&lowrank_linear_cpu));
}

}  // namespace torchslim
