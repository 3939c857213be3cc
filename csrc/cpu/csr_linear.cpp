// CPU implementation of torchslim::csr_linear: argument and row pointer checks, the activation
// layout, and threads (stable_tensor.h); the arithmetic in cpu/kernels/csr_*.cpp. Two ways, by M:
//  - up to kGatherMaxRows rows of x: 16 stored entries at a time gather their activations (AVX-512);
//  - more rows: x transposed into tiles of 4 to 64 tokens, each entry one broadcast multiply-add per
//    tile row of up to 16 tokens, or with bfloat16 two entries per vdpbf16ps (AVX-512);
// and a portable kernel where the active ISA has no AVX-512. Rows are split into tasks of equal work
// (stored entries plus a per-row cost), whatever the spread of row lengths.
#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/kernels/csr.h"
#include "cpu/kernels/scalar_convert.h"
#include "csr_linear_checks.h"
#include "cpu/float_dtype.h"
#include "cpu/parallel_tasks.h"
#include "cpu/thread_scratch.h"

namespace torchslim {
namespace {

using cpu::Dtype;

// The row pointers, before any kernel trusts them (words of formats.csr.structure_problem).
void check_crow(const int32_t* crow, int64_t N, int64_t nnz, const char* op) {
  TORCHSLIM_CHECK(crow[0] == 0, op, ": crow[0] must be 0, got ", crow[0]);
  for (int64_t n = 0; n < N; ++n)
    TORCHSLIM_CHECK(crow[n + 1] >= crow[n], op, ": crow must never decrease: crow[", n + 1, "] = ", crow[n + 1], " < crow[",
                n, "] = ", crow[n]);
  TORCHSLIM_CHECK(crow[N] == nnz, op, ": crow[N] must equal the number of stored values ", nnz, ", got ", crow[N]);
}

// The first bad column, described as formats.csr.structure_problem does (the kernels only say that
// there is one).
[[noreturn]] void raise_bad_col(const cpu::CsrArgs& a, int64_t N, const char* op) {
  for (int64_t n = 0; n < N; ++n) {
    int64_t prev = -1;
    for (int64_t j = a.crow[n]; j < a.crow[n + 1]; ++j) {
      const int64_t c = a.col16 ? static_cast<const int16_t*>(a.col)[j] : static_cast<const int32_t*>(a.col)[j];
      TORCHSLIM_CHECK(c >= 0 && c < a.K, op, ": col[", j, "] = ", c, " (row ", n, ") is outside [0, ", a.K, ")");
      TORCHSLIM_CHECK(c > prev, op, ": col must increase strictly within a row: row ", n, " has col[", j - 1, "] = ", prev,
                  " then col[", j, "] = ", c);
      prev = c;
    }
  }
  TORCHSLIM_CHECK(false, op, ": col holds an invalid column");  // unreachable: a kernel found one
}

// Task boundaries over rows [0, N): each task about the same work, counted as its stored entries
// plus row_cost per row (a row's fixed work: its reduction and stores).
std::vector<int64_t> balanced_rows(const int32_t* crow, int64_t N, int64_t tasks, int64_t row_cost) {
  const auto work = [&](int64_t n) { return int64_t(crow[n]) + n * row_cost; };
  const int64_t total = work(N);
  std::vector<int64_t> bounds{0};
  for (int64_t t = 1; t < tasks; ++t) {
    // The first row whose work before it reaches t / tasks of the total (work is non-decreasing).
    int64_t lo = bounds.back(), hi = N;
    const int64_t goal = total * t / tasks;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (work(mid) < goal) lo = mid + 1;
      else hi = mid;
    }
    if (lo > bounds.back()) bounds.push_back(lo);
  }
  if (N > bounds.back()) bounds.push_back(N);
  return bounds;
}

// Tiles [t0, t1) of x (M, K) in the token kernel's layout: x[t T + i, k] at [t][k][i], column K and the
// tokens beyond M zero; float32, or bfloat16 bits copied as they are. A loop of ours rather than strided
// copies through the stable dispatcher: those took ~6 calls of 1.5-3 us each, a fifth of a call at
// M = 12 on MiniLM's layers. Blocks of 64 columns keep the T source rows' pieces in L1.
template <class Out, class In, class Convert>
void fill_tiles(const In* x, Convert convert, int64_t M, int64_t K, int64_t T, int64_t t0, int64_t t1, Out* tiles) {
  constexpr int64_t kBlock = 64;
  for (int64_t t = t0; t < t1; ++t) {
    Out* tile = tiles + t * (K + 1) * T;
    for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
      const int64_t k1 = std::min(K, k0 + kBlock);
      for (int64_t i = 0; i < T; ++i) {
        const int64_t m = t * T + i;
        if (m >= M) {
          for (int64_t k = k0; k < k1; ++k) tile[k * T + i] = Out(0);
          continue;
        }
        const In* row = x + m * K;
        for (int64_t k = k0; k < k1; ++k) tile[k * T + i] = convert(row[k]);
      }
    }
    for (int64_t i = 0; i < T; ++i) tile[K * T + i] = Out(0);
  }
}

// fill_tiles for x of dtype dt: bfloat16 tiles (x bfloat16: the bits as they are) or float32 tiles.
void fill_tiles(const void* x, Dtype dt, bool bf16_tiles, int64_t M, int64_t K, int64_t T, int64_t t0, int64_t t1,
                void* tiles) {
  const auto* x16 = static_cast<const uint16_t*>(x);
  if (bf16_tiles)
    fill_tiles(x16, [](uint16_t v) { return v; }, M, K, T, t0, t1, static_cast<uint16_t*>(tiles));
  else if (dt == Dtype::BF16)
    fill_tiles(x16, cpu::bf16_to_float, M, K, T, t0, t1, static_cast<float*>(tiles));
  else if (dt == Dtype::F16)
    fill_tiles(x16, cpu::f16_to_float, M, K, T, t0, t1, static_cast<float*>(tiles));
  else
    fill_tiles(static_cast<const float*>(x), [](float v) { return v; }, M, K, T, t0, t1, static_cast<float*>(tiles));
}

// Up to this many rows of x, the gather kernel (one vgatherdps per row of x per 16 entries); beyond,
// the token tiles (one FMA per entry per 4, 8 or 16 tokens). Measured on 4096 x 4096 at 90% sparsity,
// one thread, bf16: the tiles cost ~0.7 ns per entry for up to 8 tokens (instruction-bound), the
// gather 0.49 / 0.76 / 1.14 / 1.88 ms at M = 1 / 2 / 3 / 4 against the tiles' 1.2 ms.
constexpr int64_t kGatherMaxRows = 3;

Tensor csr_linear_cpu(Tensor x, Tensor crow, Tensor col, Tensor values, std::optional<Tensor> bias) {
  const char* op = "csr_linear";
  check_csr_linear_args(x, crow, col, values, bias);
  const int64_t M = x.size(0), N = crow.size(0) - 1, K = x.size(1), nnz = values.size(0);
  check_crow(crow.const_data_ptr<int32_t>(), N, nnz, op);
  Tensor out = empty({M, N}, x.scalar_type(), x.device());
  // The bias as F.linear adds it in x's dtype (so rounded to it once), then float32 for the kernels.
  Tensor bias_keep;
  const float* bias_f = bias_as_floats(bias, x.scalar_type(), bias_keep);
  const Dtype dt = float_dtype(x.scalar_type());
  cpu::CsrArgs args{crow.const_data_ptr<int32_t>(), col.const_data_ptr(), col.scalar_type() == ScalarType::Short,
                    values.const_data_ptr(), dt, K, nullptr, false, M, 0,
                    bias_f, out.mutable_data_ptr(), N, dt};
  const bool avx512 = cpu::csr_avx512_active();
  Tensor xf;  // the activations in the kernel's layout and dtype (CsrArgs::x)
  auto* rows_fn = cpu::csr_rows_scalar;
  if (M == 0) {
    // Nothing to multiply: the columns are still checked, as every call checks them.
  } else if (avx512 && M > kGatherMaxRows) {
    // Token tiles with K + 1 columns (the last zero): bfloat16 where x is, beyond 16 rows (a 32-token
    // bfloat16 tile half empty measured slower than a float32 one of 16) and where the CPU has AVX512_BF16.
    args.x_bf16 = dt == Dtype::BF16 && M > 16 && cpu::csr_avx512_bf16_supported();
    const ScalarType tile_dtype = args.x_bf16 ? ScalarType::BFloat16 : ScalarType::Float;
    args.T = M <= 4 ? 4 : M <= 8 ? 8 : M <= 16 ? 16 : M <= 32 ? 32 : 64;
    const int64_t T = args.T;
    const int64_t tiles = (M + T - 1) / T;
    xf = thread_scratch(Scratch::CsrTiles, {tiles, K + 1, T}, tile_dtype);
    const void* xp = x.const_data_ptr();
    void* tp = xf.mutable_data_ptr();
    parallel_for(tiles, 1, [&](int64_t t0, int64_t t1) { fill_tiles(xp, dt, args.x_bf16, M, K, T, t0, t1, tp); });
    rows_fn = cpu::csr_rows_tokens_avx512;
  } else {
    xf = contiguous_as(x, ScalarType::Float);
    if (avx512) rows_fn = cpu::csr_rows_gather_avx512;
  }
  if (xf.defined()) args.x = xf.const_data_ptr();
  // ~8 tasks per thread (room to balance a slowed thread), each at least ~16K entries x rows of x.
  const int64_t threads = num_threads();
  const int64_t work = nnz * std::max<int64_t>(M, 1);
  const int64_t tasks = std::clamp<int64_t>(work / (1 << 14), 1, 8 * threads);
  const std::vector<int64_t> bounds = balanced_rows(args.crow, N, tasks, 16);
  std::atomic<bool> ok{true};
  parallel_tasks(int64_t(bounds.size()) - 1, [&](int64_t t) {
    if (!rows_fn(args, bounds[t], bounds[t + 1])) ok = false;
  });
  if (!ok) raise_bad_col(args, N, op);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("csr_linear", TORCH_BOX(&csr_linear_cpu));
}

}  // namespace torchslim
