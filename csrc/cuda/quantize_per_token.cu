// CUDA implementation of torchslim::quantize_per_token (schema in csrc/ops.cpp).
//
// x (M, K) float32|bfloat16|float16, contiguous, on a CUDA device
//   -> q (M, K) int8 in [-127, 127], scale (M,) float32.
// Bit-exact with reference.quantize_per_token and the CPU kernel (quantize_rows_scalar):
//   scale = absmax / 127 (IEEE division), inv = 127 / absmax,
//   q = round_half_even(x * inv) (one IEEE multiply, never contracted into an FMA), clamped;
//   a row of zeros, or with absmax below 127 / FLT_MAX (127 / absmax overflows) -> scale 0, q 0;
//   a row holding NaN or +-Inf -> scale NaN, q 0.
//
// One group of TPR threads per row (a warp for short rows, 4 or 8 warps for long ones), 256 threads
// per block. Pass 1 reduces |x| with warp shuffles (then shared memory across the row's warps);
// pass 2 reads the row again (it is in L1/L2 by then) and writes q. Loads are 16 bytes per thread
// when the row pointers allow it, one element otherwise.
//
#include "cuda/stable_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>
#include <cstring>

#include "quantize_row.cuh"

// The bit-exact contract needs IEEE division and multiplication with denormals kept: nvcc defines
// no macro for -ftz / --use_fast_math, so cmake/cuda.cmake compiles this file with -ftz=false
// -prec-div=true after any global flags.

namespace torchslim {
namespace {

constexpr int kThreads = 256;

// The per-element rounding and the absmax -> scale rule live in quantize_row.cuh (shared with
// int8_decode.cu, which quantizes x inside its GEMV).
using quantize_row::abs_or_inf;
using quantize_row::quantize_one;
using quantize_row::row_scale;
using quantize_row::to_float;

// VEC consecutive elements of row storage as floats: one 16-byte load when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T e[VEC];
    static_assert(sizeof(e) == sizeof(raw), "");
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(e[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void store_vec(int8_t* __restrict__ p, const int8_t (&q)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = q[0];
  } else if constexpr (VEC == 4) {
    uint32_t w;
    memcpy(&w, q, 4);
    *reinterpret_cast<uint32_t*>(p) = w;
  } else {
    static_assert(VEC == 8, "");
    uint2 w;
    memcpy(&w, q, 8);
    *reinterpret_cast<uint2*>(p) = w;
  }
}

// TPR threads (a multiple of 32 dividing kThreads) quantize one row; VEC elements per load.
// Requires K % VEC == 0 and 16-byte aligned rows of x (VEC-byte aligned rows of q) when VEC > 1.
template <typename T, int VEC, int TPR>
__global__ void __launch_bounds__(kThreads)
quantize_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                          int64_t M, int64_t K) {
  static_assert(TPR % 32 == 0 && kThreads % TPR == 0, "a row takes whole warps");
  constexpr int kRowsPerBlock = kThreads / TPR;
  constexpr int kWarpsPerRow = TPR / 32;
  const int t = threadIdx.x % TPR;
  const int group = threadIdx.x / TPR;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + group;
  const bool active = row < M;
  const int64_t nvec = K / VEC;
  const T* xr = x + row * K;

  float amax = 0.f;
  if (active) {
    for (int64_t i = t; i < nvec; i += TPR) {
      float v[VEC];
      load_vec<T, VEC>(xr + i * VEC, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) amax = fmaxf(amax, abs_or_inf(v[j]));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if constexpr (kWarpsPerRow > 1) {
    __shared__ float partial[kThreads / 32];
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = amax;
    __syncthreads();  // every thread of the block gets here: inactive rows are not returned early
#pragma unroll
    for (int w = 0; w < kWarpsPerRow; ++w) amax = fmaxf(amax, partial[group * kWarpsPerRow + w]);
  }
  if (!active) return;

  const quantize_row::RowScale rs = row_scale(amax);
  const float inv = rs.inv;
  if (t == 0) scale[row] = rs.scale;
  int8_t* qr = q + row * K;
  if (rs.zero_q) {
    const int8_t zeros[VEC] = {};
    for (int64_t i = t; i < nvec; i += TPR) store_vec<VEC>(qr + i * VEC, zeros);
    return;
  }
  for (int64_t i = t; i < nvec; i += TPR) {
    float v[VEC];
    load_vec<T, VEC>(xr + i * VEC, v);
    int8_t out[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = quantize_one(v[j], inv);
    store_vec<VEC>(qr + i * VEC, out);
  }
}

template <typename T, int VEC>
void launch_vec(const T* x, int8_t* q, float* scale, int64_t M, int64_t K, cudaStream_t stream) {
  // Threads per row from the number of loads in a row: a warp up to 8 loads per lane.
  const int64_t nvec = K / VEC;
  auto grid = [M](int rows_per_block) {
    const int64_t blocks = (M + rows_per_block - 1) / rows_per_block;
    TORCHSLIM_CHECK(blocks <= 2147483647, "quantize_per_token: too many rows (", M, ")");
    return dim3(static_cast<unsigned>(blocks));
  };
  if (nvec <= 32 * 8) {
    quantize_per_token_kernel<T, VEC, 32><<<grid(kThreads / 32), kThreads, 0, stream>>>(x, q, scale, M, K);
  } else if (nvec <= 128 * 8) {
    quantize_per_token_kernel<T, VEC, 128><<<grid(kThreads / 128), kThreads, 0, stream>>>(x, q, scale, M, K);
  } else {
    quantize_per_token_kernel<T, VEC, 256><<<grid(1), kThreads, 0, stream>>>(x, q, scale, M, K);
  }
  check_launch("quantize_per_token");
}

template <typename T>
void launch(const Tensor& x, Tensor& q, Tensor& scale, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  // Rows start 16-byte aligned (x) and kVec-byte aligned (q) when the bases are and K % kVec == 0.
  const bool vec_ok = K % kVec == 0 && reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(qp) % kVec == 0;
  if (vec_ok)
    launch_vec<T, kVec>(xp, qp, sp, M, K, stream);
  else
    launch_vec<T, 1>(xp, qp, sp, M, K, stream);
}

std::tuple<Tensor, Tensor> quantize_per_token_cuda(Tensor x) {
  const char* op = "quantize_per_token";
  TORCHSLIM_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCHSLIM_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", shape(x));
  const ScalarType dtype = x.scalar_type();
  TORCHSLIM_CHECK(is_float(dtype), op, ": x must be float32, bfloat16 or float16, got ", dtype);
  TORCHSLIM_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t M = x.size(0), K = x.size(1);

  const DeviceGuard guard(x.get_device_index());
  Tensor q = empty({M, K}, ScalarType::Char, x.device());
  Tensor scale = empty({M}, ScalarType::Float, x.device());
  if (M == 0) return {q, scale};
  const cudaStream_t stream = current_stream(x.get_device_index());
  switch (dtype) {
    case ScalarType::Float: launch<float>(x, q, scale, stream); break;
    case ScalarType::BFloat16: launch<__nv_bfloat16>(x, q, scale, stream); break;
    default: launch<__half>(x, q, scale, stream); break;
  }
  return {q, scale};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchslim, CUDA, m) {
  m.impl("quantize_per_token", TORCH_BOX(&quantize_per_token_cuda));
}

}  // namespace torchslim
