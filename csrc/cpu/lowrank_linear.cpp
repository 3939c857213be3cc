// CPU implementation of torchslim::lowrank_linear: argument checks, buffers and threads (ATen); the
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
#include <ATen/ATen.h>
#include <torch/library.h>

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
void check_args(const at::Tensor& x, const at::Tensor& V, const at::Tensor& U, const std::optional<at::Tensor>& bias,
                const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"V", V}, {"U", U}}) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ", t.device());
    TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have x's dtype ", dt, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  const int64_t K = x.size(1), r = V.size(0), N = U.size(0);
  TORCH_CHECK(V.size(1) == K, op, ": V must have shape (r, ", K, ") for x of shape ", x.sizes(), ", got ", V.sizes());
  TORCH_CHECK(U.size(1) == r, op, ": U must have shape (N, ", r, ") for V of shape ", V.sizes(), ", got ", U.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point, got ", bias->scalar_type());
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
  const int64_t per = (rows + 8 * at::get_num_threads() - 1) / (8 * at::get_num_threads());
  return round_up(std::max({per, min_rows, int64_t(1)}), align);
}

template <class F>
void over_rows(int64_t rows, int64_t step, const F& fn) {
  parallel_tasks((rows + step - 1) / step, [&](int64_t t) { fn(t * step, std::min(rows, (t + 1) * step)); });
}

// AMX: chunks of tokens as B tiles; t stays in the tile layout between the products.
void lowrank_amx(const at::Tensor& x, const at::Tensor& V, const at::Tensor& U, const float* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), r = V.size(0), N = U.size(0);
  const int64_t ksteps = round_up(K, 32) / 32, rsteps = round_up(r, 32) / 32;
  // The tiles read whole steps of 32 columns: x padded with zero columns where K is not a multiple.
  at::Tensor xk = x;
  if (K % 32) {
    xk = at::zeros({M, ksteps * 32}, x.options());
    xk.narrow(1, 0, K).copy_(x);
  }
  const int64_t chunk = std::min(M, kChunkTokens), mtiles_max = (chunk + 15) / 16;
  const at::Tensor x_tiles = thread_scratch(Scratch::LowrankXTiles, {mtiles_max * ksteps * 512}, x.options());
  const at::Tensor t_tiles = thread_scratch(Scratch::LowrankTTiles, {mtiles_max * rsteps * 512}, x.options());
  auto* xt = reinterpret_cast<uint16_t*>(x_tiles.data_ptr());
  auto* tt = reinterpret_cast<uint16_t*>(t_tiles.data_ptr());
  const auto* xp = reinterpret_cast<const uint16_t*>(xk.data_ptr());
  const auto* v = reinterpret_cast<const uint16_t*>(V.data_ptr());
  const auto* u = reinterpret_cast<const uint16_t*>(U.data_ptr());
  const int64_t v_step = task_rows(r, 32, 32), u_step = task_rows(N, 32, 32);
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t mc = std::min(chunk, M - m0), mtiles = (mc + 15) / 16;
    over_rows(mtiles, 1, [&](int64_t b, int64_t e) {
      cpu::lr_amx_tiles(xp + m0 * xk.size(1), xk.size(1), mc, K, xt, b, e);
    });
    const cpu::LrAmxProduct first{xt, mtiles, v, K, K, nullptr, nullptr, 0, Dtype::BF16, mc, tt, rsteps};
    over_rows(r, v_step, [&](int64_t b, int64_t e) { cpu::lr_amx_product(first, b, e); });
    void* o = static_cast<char*>(out.data_ptr()) + m0 * N * out.element_size();
    const cpu::LrAmxProduct second{tt, mtiles, u, r, r, bias, o, N, float_dtype(out.scalar_type()), mc, nullptr, 0};
    over_rows(N, u_step, [&](int64_t b, int64_t e) { cpu::lr_amx_product(second, b, e); });
  }
}

// Register kernels: t row-major (chunk x r) in x's dtype.
void lowrank_rows(const at::Tensor& x, const at::Tensor& V, const at::Tensor& U, const float* bias, at::Tensor& out,
                  bool avx512) {
  const int64_t M = x.size(0), K = x.size(1), r = V.size(0), N = U.size(0);
  const Dtype dt = float_dtype(x.scalar_type());
  auto* fn = avx512 ? cpu::lr_product_avx512 : cpu::lr_product_scalar;
  const int64_t chunk = std::min(M, kChunkTokens);
  const at::Tensor t = thread_scratch(Scratch::LowrankT, {chunk, r}, x.options());
  // At least ~64K multiply-adds per task (a task's fixed cost is small next to that).
  const int64_t v_step = task_rows(r, 8, (1 << 16) / std::max<int64_t>(1, K * chunk));
  const int64_t u_step = task_rows(N, 8, (1 << 16) / std::max<int64_t>(1, r * chunk));
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t mc = std::min(chunk, M - m0), es = x.element_size();
    const cpu::LrProduct first{static_cast<const char*>(x.data_ptr()) + m0 * K * es, K, V.data_ptr(), K, dt, mc, K,
                               nullptr, t.data_ptr(), r, dt};
    over_rows(r, v_step, [&](int64_t b, int64_t e) { fn(first, b, e); });
    const cpu::LrProduct second{t.data_ptr(), r, U.data_ptr(), r, dt, mc, r,
                                bias, static_cast<char*>(out.data_ptr()) + m0 * N * es, N, dt};
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

void lowrank_gemm(const at::Tensor& x, const at::Tensor& V, const at::Tensor& U, const at::Tensor& bias_x,
                  at::Tensor& out) {
  const int64_t M = x.size(0);
  const at::Tensor t = thread_scratch(Scratch::LowrankT, {std::min(M, kGemmChunkTokens), V.size(0)}, x.options());
  for (int64_t m0 = 0; m0 < M; m0 += kGemmChunkTokens) {
    const int64_t mc = std::min(kGemmChunkTokens, M - m0);
    at::Tensor tc = t.narrow(0, 0, mc), oc = out.narrow(0, m0, mc);
    at::mm_out(tc, x.narrow(0, m0, mc), V.t());
    if (bias_x.defined()) at::addmm_out(oc, bias_x, tc, U.t());
    else at::mm_out(oc, tc, U.t());
  }
}

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& V, const at::Tensor& U,
                              const std::optional<at::Tensor>& bias) {
  const char* op = "lowrank_linear";
  check_args(x, V, U, bias, op);
  const int64_t M = x.size(0), K = x.size(1), r = V.size(0), N = U.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  // The bias as F.linear adds it in x's dtype (so rounded to it once), then float32 for the kernels.
  const at::Tensor bias_x = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
  if (r == 0 || K == 0) {  // an empty sum: every row is the bias
    if (bias_x.defined()) out.copy_(bias_x.expand({M, N}));
    else out.zero_();
    return out;
  }
  const at::Tensor bias_f = bias_x.defined() ? bias_x.to(at::kFloat) : at::Tensor();
  const float* bias_ptr = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const bool avx512 = cpu::lr_avx512_supported() && cpu::active_isa() >= cpu::Isa::Avx512Vnni;
  if (x.scalar_type() == at::kBFloat16 && M >= kAmxMinRows && cpu::active_isa() == cpu::Isa::Amx &&
      cpu::lr_amx_supported())
    lowrank_amx(x, V, U, bias_ptr, out);
  else if (x.scalar_type() != at::kBFloat16 && M >= kGemmMinRows)
    lowrank_gemm(x, V, U, bias_x, out);
  else
    lowrank_rows(x, V, U, bias_ptr, out, avx512);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("lowrank_linear", &lowrank_linear_cpu);
}

}  // namespace torchslim
