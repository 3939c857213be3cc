// CPU implementation of torchslim::sparse24_linear: argument checks, activation buffers and threads
// (stable_tensor.h); the arithmetic in cpu/kernels/sparse24_*.cpp. Three strategies:
//  - bfloat16 with AMX, from 2 rows: the AMX kernel expands 16 x 32 weight tiles from the compressed
//    form into tile multiplies (the weight is read compressed: 1.125 bytes per weight instead of 2);
//  - otherwise, below 64 rows (and float16 at any M): the AVX-512 (or portable) kernels expand the
//    compressed weight in registers, or a few rows at a time into L1;
//  - float32 and non-AMX bfloat16 from 64 rows, where compute dominates: blocks of weight rows
//    are expanded into a dense buffer and multiplied by ATen's GEMM (oneDNN).
#include <atomic>

#include "cpu/kernels/sparse24.h"
#include "cpu/float_dtype.h"
#include "cpu/parallel_tasks.h"
#include "cpu/thread_scratch.h"

namespace torchslim {
namespace {

using cpu::Dtype;
using cpu::round_up;

// The checks of sparse24_linear, in the words and order of ops.check_sparse24_linear_args.
void check_args(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias,
                const char* op) {
  TORCHSLIM_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", shape(x));
  const ScalarType dt = x.scalar_type();
  TORCHSLIM_CHECK(is_float(dt), op, ": x must be float32, bfloat16 or float16, got ", dt);
  TORCHSLIM_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCHSLIM_CHECK(values.device() == x.device(), op, ": values must be on ", x.device(), " like x, got ", values.device());
  TORCHSLIM_CHECK(meta.device() == x.device(), op, ": meta must be on ", x.device(), " like x, got ", meta.device());
  TORCHSLIM_CHECK(values.dim() == 2, op, ": values must be 2-D (N, K_pad / 2), got shape ", shape(values));
  TORCHSLIM_CHECK(values.scalar_type() == dt, op, ": values must have x's dtype ", dt, ", got ", values.scalar_type());
  TORCHSLIM_CHECK(values.is_contiguous(), op, ": values must be contiguous");
  TORCHSLIM_CHECK(meta.scalar_type() == ScalarType::Short, op, ": meta must be int16, got ", meta.scalar_type());
  TORCHSLIM_CHECK(meta.is_contiguous(), op, ": meta must be contiguous");
  const int64_t N = values.size(0), K = x.size(1), K_pad = round_up(K, cpu::kS24ColsPerWord);
  TORCHSLIM_CHECK(values.size(1) == K_pad / 2, op, ": values must have shape (", N, ", ", K_pad / 2, ") for K=", K,
              ", got ", shape(values));
  TORCHSLIM_CHECK(meta.dim() == 2 && meta.size(0) == N && meta.size(1) == K_pad / cpu::kS24ColsPerWord, op,
              ": meta must have shape (", N, ", ", K_pad / cpu::kS24ColsPerWord, ") for K=", K, ", got ", shape(meta));
  if (bias.has_value()) {
    TORCHSLIM_CHECK(bias->device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ", bias->device());
    TORCHSLIM_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ", shape(*bias));
    TORCHSLIM_CHECK(is_floating_point(bias->scalar_type()), op, ": bias must be floating point, got ", bias->scalar_type());
  }
}

// The first invalid nibble, described as formats.sparse24.meta_problem does (the kernels only say
// that there is one).
[[noreturn]] void raise_bad_meta(const Tensor& meta, const char* op) {
  const int64_t N = meta.size(0), W = meta.size(1);
  const int16_t* p = meta.const_data_ptr<int16_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t w = 0; w < W; ++w)
      for (int j = 0; j < 4; ++j) {
        const int nib = (uint16_t(p[n * W + w]) >> (4 * j)) & 0xF;
        if (cpu::s24_nibble_entry(nib) & 0x10) {
          const int64_t g = 4 * w + j;
          TORCHSLIM_CHECK(false, op, ": meta row ", n, ", group ", g, " (columns ", 4 * g, "..", 4 * g + 3,
                      ") holds positions (", nib & 3, ", ", nib >> 2,
                      "); each group needs two distinct increasing positions in 0..3");
        }
      }
  TORCHSLIM_CHECK(false, op, ": meta holds an invalid group");  // unreachable: a kernel found one
}

bool use_avx512() {
  return cpu::s24_avx512_supported() && cpu::active_isa() >= cpu::Isa::Avx512Vnni;
}

// Rows of x zero-padded to `cols` columns in `dtype` (x itself where nothing changes).
Tensor padded_x(const Tensor& x, int64_t cols, ScalarType dtype) {
  if (x.size(1) == cols && x.scalar_type() == dtype) return x;
  Tensor buf = empty({x.size(0), cols}, dtype, x.device());
  copy_into(narrowed(buf, 1, 0, x.size(1)), x);
  zero(narrowed(buf, 1, x.size(1), cols - x.size(1)));
  return buf;
}

bool expand_rows(const cpu::S24Expand& e, int64_t n0, int64_t n1, bool avx512) {
  return avx512 ? cpu::s24_expand_rows_avx512(e, n0, n1) : cpu::s24_expand_rows_scalar(e, n0, n1);
}

// Many rows: weight blocks expanded into a scratch buffer (thread_scratch.h), then the dense GEMM
// (with the bias in x's dtype, as F.linear takes it). Returns false on invalid metadata.
bool dense_blocks(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias_x,
                  Tensor& out, bool avx512) {
  const int64_t N = values.size(0), K = x.size(1), K_pad = values.size(1) * 2;
  // ~8 MiB of dense weight per block, at least 64 rows: each GEMM call has a fixed cost (oneDNN
  // reorders its weight operand per call), which blocks of 1 MiB paid 32 times per 4096 x 4096
  // bfloat16 weight (measured at M = 128: blocks of 128 rows 2.2x dense's time, of 1024 rows 1.14x).
  // And never the whole weight: a layer smaller than a block is done in two halves.
  const int64_t rows = std::min(round_up((N + 1) / 2, 16),
                                std::max<int64_t>(64, round_up((8 << 20) / (K_pad * x.element_size()), 16)));
  const Tensor buf = thread_scratch(Scratch::Sparse24Blocks, {rows, K_pad}, x.scalar_type());
  // x with zero columns up to K_pad: the GEMM then sees a multiple of 16 columns (oneDNN's bf16 GEMM
  // on this machine let an Inf of one row reach other rows' outputs at odd K).
  const Tensor xp = padded_x(x, K_pad, x.scalar_type());
  const cpu::S24Expand base{values.const_data_ptr(), float_dtype(x.scalar_type()), meta.const_data_ptr<int16_t>(), K,
                            K_pad, nullptr, K_pad};
  std::atomic<bool> ok{true};
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nb = std::min(rows, N - n0);
    parallel_for(nb, 8, [&](int64_t b, int64_t e) {
      cpu::S24Expand ex = base;
      ex.dst = static_cast<char*>(buf.mutable_data_ptr()) + b * K_pad * x.element_size();
      if (!expand_rows(ex, n0 + b, n0 + e, avx512)) ok = false;
    });
    const Tensor w = narrowed(buf, 0, 0, nb);  // K_pad columns, zero from K on
    // Straight into out's columns (a strided view: the GEMM writes it with ldc = N, no copy).
    Tensor o = narrowed(out, 1, n0, nb);
    linear_out(o, xp, w, bias_x ? std::optional(narrowed(*bias_x, 0, n0, nb)) : std::nullopt);
  }
  return ok;
}

Tensor sparse24_linear_cpu(Tensor x, Tensor values, Tensor meta, std::optional<Tensor> bias) {
  const char* op = "sparse24_linear";
  check_args(x, values, meta, bias, op);
  const int64_t M = x.size(0), N = values.size(0), K = x.size(1), K_pad = values.size(1) * 2;
  Tensor out = empty({M, N}, x.scalar_type(), x.device());
  // The bias as F.linear adds it in x's dtype (so rounded to it once), then float32 for the kernels.
  const std::optional<Tensor> bias_x =
      bias.has_value() ? std::optional(contiguous_as(*bias, x.scalar_type())) : std::nullopt;
  const bool avx512 = use_avx512();
  if (M == 0 || N == 0 || K == 0) {
    // Nothing to multiply: the metadata is still checked, as every call checks it.
    if (N > 0 && K_pad > 0) {
      Tensor scratch = empty({1, K_pad}, x.scalar_type(), x.device());
      const cpu::S24Expand e{values.const_data_ptr(), float_dtype(x.scalar_type()), meta.const_data_ptr<int16_t>(), K,
                             K_pad, scratch.mutable_data_ptr(), 0};
      if (!expand_rows(e, 0, N, false)) raise_bad_meta(meta, op);
    }
    if (bias_x) copy_into(out, *bias_x);  // broadcast over the rows
    else zero(out);
    return out;
  }

  const Dtype dt = float_dtype(x.scalar_type());
  Tensor bias_keep;
  const float* bias_ptr = bias_as_floats(bias, x.scalar_type(), bias_keep);

  // bfloat16 with AMX, from 2 rows: the AMX kernel, which expands one 16 x 32 weight tile at a time
  // into the tile multiply. (Measured, 4096 x 4096: at M = 2..4 1.5x bf16 dense against ~1.0x for the
  // register kernel, whose vdpbf16ps runs at ~1 per 2 cycles on this CPU; at M = 1 both stream the
  // weight at the same speed on large layers, and the register kernel is faster on small ones.)
  constexpr int64_t kAmxMinRows = 2;
  if (dt == Dtype::BF16 && M >= kAmxMinRows && avx512 && cpu::active_isa() == cpu::Isa::Amx &&
      cpu::s24_amx_supported()) {
    const Tensor xk = padded_x(x, round_up(K_pad, cpu::kS24XPad), ScalarType::BFloat16);
    const int64_t mtiles = (M + 15) / 16, steps = round_up(K_pad, 32) / 32;
    const Tensor xv = thread_scratch(Scratch::Sparse24XTiles, {mtiles * steps * 512}, x.scalar_type());
    auto* xv_ptr = static_cast<uint16_t*>(xv.mutable_data_ptr());
    parallel_for(mtiles, 1, [&](int64_t b, int64_t e) {
      cpu::s24_prepare_x_amx(static_cast<const uint16_t*>(xk.const_data_ptr()), xk.size(1), M, K_pad, xv_ptr, b, e);
    });
    const cpu::S24Args args{nullptr, 0, Dtype::BF16, values.const_data_ptr(), dt, meta.const_data_ptr<int16_t>(), K,
                            K_pad, bias_ptr, out.mutable_data_ptr(), N, dt, M};
    Tensor acc;  // partial sums between k-chunks
    if (cpu::s24_amx_needs_acc(M, K_pad))
      acc = thread_scratch(Scratch::Sparse24Acc, {(N + 15) / 16 * mtiles * 256}, ScalarType::Float);
    float* acc_ptr = acc.defined() ? acc.mutable_data_ptr<float>() : nullptr;
    // Tasks of 64 weight rows; with more than one activation group, ~2 per thread: each task streams
    // all of x's tiles (from L3 beyond 96 rows), so more tasks re-read them (64-row tasks made M = 512
    // on 4096 x 4096 0.6x dense instead of ~1x; 2 per thread measured up to ~10% faster than 4 on the
    // narrow BERT layers at M = 512, and leaves some room to balance a slowed thread).
    const int64_t task_rows = mtiles <= cpu::s24_amx_group_tiles
                                  ? 64 : std::max<int64_t>(64, round_up((N + 2 * num_threads() - 1) / (2 * num_threads()), 32));
    std::atomic<bool> ok{true};
    parallel_tasks((N + task_rows - 1) / task_rows, [&](int64_t t) {
      if (!cpu::s24_linear_rows_amx(args, xv_ptr, acc_ptr, t * task_rows, std::min(N, (t + 1) * task_rows))) ok = false;
    });
    if (!ok) raise_bad_meta(meta, op);
    return out;
  }

  // Many rows of bfloat16 (without AMX) or float32: compute dominates, the dense GEMM on expanded
  // blocks. Crossover measured for float32 on 4096 x 4096 (Sapphire Rapids, 2 threads): at M = 40
  // the register kernel is 0.93x dense and the blocks 0.63x; they meet near 64 (both ~0.8x).
  // bfloat16 without AMX (Zen4) takes the same one, unmeasured: there the register kernel's
  // vdpbf16ps and oneDNN's run on the same units.
  const int64_t dense_min_rows = 64;
  // The scalar kernel multiplies only the kept weights; a dense product also meets every Inf / NaN of
  // x with the zeros (0 * Inf = NaN). A call whose x holds one takes the expanded dense product, as
  // the vector kernels (which multiply the expanded zeros) do: every path gives F.linear's non-finites.
  const bool nonfinite_x = !avx512 && !all_finite(x);
  if ((M >= dense_min_rows && dt != Dtype::F16) || nonfinite_x) {
    if (dt == Dtype::BF16 && (nonfinite_x || !all_finite(x))) {
      // An Inf or NaN in bfloat16 x: the float32 GEMM instead, the same float32 sums rounded once.
      // torch 2.11's bfloat16 GEMM (oneDNN) let one row's Inf reach other rows' outputs (measured with
      // the wheel built for 2.11; 2.13's keeps it in its row).
      const std::optional<Tensor> bias32 =
          bias_x ? std::optional(contiguous_as(*bias_x, ScalarType::Float)) : std::nullopt;
      Tensor out32 = empty({M, N}, ScalarType::Float, x.device());
      if (!dense_blocks(contiguous_as(x, ScalarType::Float), contiguous_as(values, ScalarType::Float), meta, bias32,
                        out32, avx512))
        raise_bad_meta(meta, op);
      copy_into(out, out32);
      return out;
    }
    if (!dense_blocks(x, values, meta, bias_x, out, avx512)) raise_bad_meta(meta, op);
    return out;
  }

  // Few rows: the compressed kernels. Activations as the kernel reads them: bfloat16 for the AVX-512
  // bfloat16 kernel (vdpbf16ps), float32 otherwise; padded with zero columns to whole steps.
  const ScalarType xt = avx512 && dt == Dtype::BF16 ? ScalarType::BFloat16 : ScalarType::Float;
  const Tensor xk = padded_x(x, round_up(K_pad, cpu::kS24XPad), xt);
  const cpu::S24Args args{xk.const_data_ptr(), xk.size(1), float_dtype(xt), values.const_data_ptr(), dt,
                          meta.const_data_ptr<int16_t>(), K, K_pad, bias_ptr, out.mutable_data_ptr(), N, dt, M};
  auto* rows_fn = avx512 ? cpu::s24_linear_rows_avx512 : cpu::s24_linear_rows_scalar;
  // Tasks of whole 4-row blocks with at least ~64K kept values times rows of x each, and at least ~4
  // per thread where the layer has the rows: a small layer in 5 tasks on 2 threads left one thread a
  // fifth of the work idle (float32 M = 1, 384 x 1536: 1.07x -> 1.22x dense).
  const int64_t min_rows = round_up((1 << 16) / std::max<int64_t>(1, K_pad / 2 * M), 4);
  const int64_t rows = std::max<int64_t>(4, std::min(min_rows, round_up(N / (4 * num_threads()), 4)));
  std::atomic<bool> ok{true};
  parallel_tasks((N + rows - 1) / rows, [&](int64_t t) {
    if (!rows_fn(args, t * rows, std::min(N, (t + 1) * rows))) ok = false;
  });
  if (!ok) raise_bad_meta(meta, op);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchslim, CPU, m) {
  m.impl("sparse24_linear", TORCH_BOX(&sparse24_linear_cpu));
}

}  // namespace torchslim
