// CUDA implementation of torchslim::csr_linear (schema in csrc/ops.cpp, format in formats/csr.py).
//
// x (M, K) float32|bfloat16|float16 contiguous, crow (N + 1,) int32, col (nnz,) int16|int32,
// values (nnz,) x.dtype, bias (N,) any float dtype or None  ->  out (M, N) x.dtype:
//   out[m, n] = round(sum over row n's stored entries j of x[m, col[j]] * values[j]  (float32)
//                     + float(bias[n] rounded to x.dtype)),
// only stored entries multiplied (an Inf of x reaches only the rows storing its column).
//
// Memory safety without validation: the CSR values are NOT checked per call (that needs a device
// sync; CSRLinear checks them when built or loaded). Instead every read is bounded whatever crow and
// col hold: a row's [crow[n], crow[n+1]) is clamped into [0, nnz] with start <= end, and an entry
// whose column is outside [0, K) (compared as unsigned) contributes nothing. A malformed CSR gives
// unspecified outputs, never an out-of-bounds access.
//
// Kernels (all deterministic: fixed summation order, no atomics):
//  - M <= 8 (decode), csr_rows_kernel: G lanes per (row, part) (8 for rows under 16 * VEC entries
//    on average, else a warp); lanes take consecutive VEC-entry chunks of col/values (16-byte loads
//    where a chunk lies inside the part and the bases are aligned, element loads at the ends),
//    gather x[m, col] for the M tokens (x is small and stays in L1/L2), and reduce with shuffles.
//  - M > 8, csr_tokens_kernel: x is first transposed to xt (K, Mp) so that one column of x is
//    contiguous over tokens. A warp per (row, part, token tile): TL lanes along tokens (V tokens
//    each: one 16-byte load of xt per entry), 32 / TL lanes along entries; each batch of 32 entries
//    is loaded coalesced and broadcast with shuffles; the entry lanes reduce with shuffles.
//  - Balance: a row is split into parts of part_len entries (part_len >= 4096 and >= twice the mean
//    row length, so typical rows are one part); parts = ceil(min(K, nnz) / part_len) bounds any
//    valid row (at most K entries). With one part the kernels write out directly; with several,
//    each (row, part) writes its float32 partial sums to a workspace (parts, M, N), empty parts
//    write zeros, and csr_finalize_kernel adds them in part order plus the bias. So one full row
//    among empty ones is worked on by several warps instead of serializing the grid behind one.
//  - K == 0 or nnz == 0: csr_finalize_kernel with zero parts (out = bias, or zeros).
//
// The op layer on the LibTorch Stable ABI (cuda/stable_cuda.h), as every op file.
#include "csr_linear_checks.h"
#include "cuda/stable_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>

namespace torchslim {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;
// The smallest part a row is split into (entries), and the most workspace the split may take.
constexpr int64_t kMinPartLen = 4096;
constexpr int64_t kMaxWorkspaceBytes = int64_t(256) << 20;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// BYTES bytes from a BYTES-aligned (16-aligned when BYTES > 16) address into dst, via the read-only path.
template <int BYTES>
__device__ __forceinline__ void load_bytes(const void* __restrict__ p, void* dst) {
  if constexpr (BYTES == 4) {
    const unsigned v = __ldg(reinterpret_cast<const unsigned*>(p));
    memcpy(dst, &v, 4);
  } else if constexpr (BYTES == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(dst, &v, 8);
  } else {
    static_assert(BYTES % 16 == 0, "16-byte pieces");
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
      memcpy(static_cast<char*>(dst) + 16 * i, &v, 16);
    }
  }
}

// Row n's entries [start, end), clamped into [0, nnz] with start <= end, whatever crow holds.
__device__ __forceinline__ void row_range(const int32_t* __restrict__ crow, int64_t n, int64_t nnz,
                                          int64_t& start, int64_t& end) {
  int64_t s = __ldg(crow + n), e = __ldg(crow + n + 1);
  s = s < 0 ? 0 : (s > nnz ? nnz : s);
  e = e < s ? s : (e > nnz ? nnz : e);
  start = s;
  end = e;
}

// Part p of [start, end): [ps, pe), empty when the row is shorter.
__device__ __forceinline__ void part_range(int64_t start, int64_t end, int64_t p, int64_t part_len,
                                           int64_t& ps, int64_t& pe) {
  ps = start + p * part_len;
  ps = ps > end ? end : ps;
  pe = ps + part_len;
  pe = pe > end ? end : pe;
}

// Where a (row, part) result goes: out directly (one part) or the float32 workspace (parts, M, N).
template <typename T>
__device__ __forceinline__ void store_result(float acc, int64_t m, int64_t n, int64_t p, int64_t M, int64_t N,
                                             int parts, const float* __restrict__ bias, T* __restrict__ out,
                                             float* __restrict__ ws) {
  if (parts == 1)
    out[m * N + n] = from_float<T>(acc + (bias != nullptr ? bias[n] : 0.f));
  else
    ws[(p * M + m) * N + n] = acc;
}

// ---- M <= 8: G lanes per (row, part), lanes over entries, MT tokens per lane ----------------------
// Item i = n * parts + p. Chunks are VEC consecutive positions aligned to multiples of VEC, so a full
// chunk is one 16-byte load of values (VEC * sizeof(Idx) bytes of col) when vec_ok (bases aligned).
template <typename T, typename Idx, int MT, int G>
__global__ void __launch_bounds__(kThreads)
csr_rows_kernel(const T* __restrict__ x, const int32_t* __restrict__ crow, const Idx* __restrict__ col,
                const T* __restrict__ values, const float* __restrict__ bias, T* __restrict__ out,
                float* __restrict__ ws, int64_t M, int64_t N, int64_t K, int64_t nnz, int parts,
                int64_t part_len, bool vec_ok) {
  static_assert(G == 8 || G == 16 || G == 32, "a group is a power-of-two part of a warp");
  static_assert(MT <= G, "one lane writes each token's result");
  constexpr int VEC = 16 / sizeof(T);
  const int lane = threadIdx.x % G;
  const int64_t item = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / G;
  // Whole groups are active or not, and a group never leaves a warp: the shuffles below see all
  // the lanes they name.
  const bool active = item < N * parts;
  const int64_t n = item / parts, p = item % parts;

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  if (active) {
    int64_t start, end, ps, pe;
    row_range(crow, n, nnz, start, end);
    part_range(start, end, p, part_len, ps, pe);
    if (ps < pe) {
      const int64_t c_last = (pe - 1) / VEC;
      for (int64_t c = ps / VEC + lane; c <= c_last; c += G) {
        const int64_t j0 = c * VEC;
        Idx cols[VEC];
        T vals[VEC];
        if (vec_ok && j0 >= ps && j0 + VEC <= pe) {
          load_bytes<VEC * sizeof(Idx)>(col + j0, cols);
          load_bytes<16>(values + j0, vals);
        } else {  // the chunk holds a part boundary (or the bases are unaligned): element by element
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const int64_t j = j0 + i;
            const bool in = j >= ps && j < pe;
            cols[i] = in ? col[j] : Idx(-1);
            vals[i] = in ? values[j] : from_float<T>(0.f);
          }
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const uint32_t k = static_cast<uint32_t>(static_cast<int32_t>(cols[i]));
          if (static_cast<int64_t>(k) < K) {  // out-of-range (or masked) columns contribute nothing
            const float v = to_float(vals[i]);
#pragma unroll
            for (int m = 0; m < MT; ++m)
              if (MT == 1 || m < M) acc[m] = fmaf(to_float(__ldg(x + m * K + k)), v, acc[m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(kFull, acc[m], o, G);
  if (!active) return;
#pragma unroll
  for (int m = 0; m < MT; ++m)
    if (lane == m && m < M) store_result<T>(acc[m], m, n, p, M, N, parts, bias, out, ws);
}

// ---- M > 8: a warp per (row, part, token tile) over xt (K, Mp) ------------------------------------
// TL lanes along tokens, V = 16 / sizeof(T) tokens each (one 16-byte load of xt per entry: Mp is a
// multiple of V and xt 16-byte aligned); EL = 32 / TL lanes along entries.
// Warp w = tile * (N * parts) + n * parts + p: the warps of a block share a token tile (xt's slab).
template <typename T, typename Idx, int TL>
__global__ void __launch_bounds__(kThreads)
csr_tokens_kernel(const T* __restrict__ xt, const int32_t* __restrict__ crow, const Idx* __restrict__ col,
                  const T* __restrict__ values, const float* __restrict__ bias, T* __restrict__ out,
                  float* __restrict__ ws, int64_t M, int64_t Mp, int64_t N, int64_t K, int64_t nnz, int parts,
                  int64_t part_len, int64_t tiles) {
  constexpr int V = 16 / sizeof(T);
  constexpr int EL = 32 / TL;
  static_assert(TL * EL == 32, "TL divides a warp");
  const int lane = threadIdx.x % 32;
  const int tl = lane % TL, el = lane / TL;
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t items = N * parts;
  const bool active = warp < items * tiles;  // uniform over the warp
  const int64_t tile = warp / items, item = warp % items;
  const int64_t n = item / parts, p = item % parts;
  const int64_t m0 = tile * (TL * V) + int64_t(tl) * V;  // this lane's first token
  const bool tokens = m0 < M;                              // then m0 + V <= Mp

  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;

  if (active) {
    int64_t start, end, ps, pe;
    row_range(crow, n, nnz, start, end);
    part_range(start, end, p, part_len, ps, pe);
    for (int64_t b = ps; b < pe; b += 32) {
      // 32 entries, one per lane (coalesced), then each broadcast to the lanes that use it.
      const int64_t j = b + lane;
      int32_t kc = -1;
      float vj = 0.f;
      if (j < pe) {
        kc = static_cast<int32_t>(__ldg(col + j));
        vj = to_float(__ldg(values + j));
      }
      const int cnt = pe - b < 32 ? static_cast<int>(pe - b) : 32;  // uniform over the warp
#pragma unroll 4
      for (int e0 = 0; e0 < cnt; e0 += EL) {
        const int src = e0 + el;  // < 32; lanes past cnt hold kc = -1
        const uint32_t k = static_cast<uint32_t>(__shfl_sync(kFull, kc, src));
        const float v = __shfl_sync(kFull, vj, src);
        if (tokens && static_cast<int64_t>(k) < K) {
          T xv[V];
          load_bytes<16>(xt + static_cast<int64_t>(k) * Mp + m0, xv);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] = fmaf(to_float(xv[i]), v, acc[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
#pragma unroll
    for (int o = TL; o < 32; o <<= 1) acc[i] += __shfl_xor_sync(kFull, acc[i], o);
  if (!active || el != 0 || !tokens) return;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (m0 + i < M) store_result<T>(acc[i], m0 + i, n, p, M, N, parts, bias, out, ws);
}

// xt (K, Mp) = x (M, K) transposed, zero in the padding columns m >= M. 32 x 32 tiles through shared
// memory (reads and writes both coalesced); tiles numbered over one grid dimension.
template <typename T>
__global__ void __launch_bounds__(kThreads)
transpose_kernel(const T* __restrict__ x, T* __restrict__ xt, int64_t M, int64_t Mp, int64_t K, int64_t tiles_k) {
  __shared__ T tile[32][33];
  const int64_t tm = blockIdx.x / tiles_k, tk = blockIdx.x % tiles_k;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;  // 32 x 8 threads
  for (int r = ty; r < 32; r += kThreads / 32) {
    const int64_t m = tm * 32 + r, k = tk * 32 + tx;
    if (k < K) tile[r][tx] = m < M ? x[m * K + k] : from_float<T>(0.f);
  }
  __syncthreads();
  for (int r = ty; r < 32; r += kThreads / 32) {
    const int64_t k = tk * 32 + r, m = tm * 32 + tx;
    if (k < K && m < Mp) xt[k * Mp + m] = tile[tx][r];
  }
}

// out[m, n] = sum over p < parts of ws[p, m, n] (in order) + bias[n]; parts == 0: bias or zeros.
template <typename T>
__global__ void __launch_bounds__(kThreads)
csr_finalize_kernel(const float* __restrict__ ws, const float* __restrict__ bias, T* __restrict__ out,
                    int64_t M, int64_t N, int parts) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t n = i % N;
    float acc = 0.f;
    for (int p = 0; p < parts; ++p) acc += ws[p * total + i];
    out[i] = from_float<T>(acc + (bias != nullptr ? bias[n] : 0.f));
  }
}

unsigned blocks_for(int64_t threads, const char* what) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  TORCHSLIM_CHECK(blocks <= 2147483647, "csr_linear: the problem is too large for one launch (", what, ")");
  return static_cast<unsigned>(blocks);
}

template <typename T>
void launch_finalize(const float* ws, const float* bias, T* out, int64_t M, int64_t N, int parts, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((M * N + kThreads - 1) / kThreads, int64_t(1) << 20);
  csr_finalize_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ws, bias, out, M, N, parts);
  check_launch("csr_linear");
}

// Parts per row: rows are cut every part_len entries; part_len >= kMinPartLen and >= twice the mean
// row length (rounded to `step`); then every valid row (at most K entries) fits in `parts` parts.
// When the workspace (parts, M, N) would exceed kMaxWorkspaceBytes, longer parts are taken.
void plan_parts(int64_t M, int64_t N, int64_t K, int64_t nnz, int64_t step, int& parts, int64_t& part_len) {
  const int64_t mean = (nnz + N - 1) / N;
  part_len = std::max(kMinPartLen, (2 * mean + step - 1) / step * step);
  const int64_t longest = std::min(K, nnz);
  int64_t p = (longest + part_len - 1) / part_len;
  const int64_t max_parts = std::max<int64_t>(1, kMaxWorkspaceBytes / std::max<int64_t>(1, M * N * 4));
  if (p > max_parts) {
    p = max_parts;
    part_len = (longest + p - 1) / p;
  }
  parts = static_cast<int>(std::max<int64_t>(1, p));
}

template <typename T, typename Idx>
void launch_typed(const Tensor& x, const Tensor& crow, const Tensor& col, const Tensor& values, const float* bias,
                  Tensor& out, cudaStream_t stream) {
  const int64_t M = x.size(0), K = x.size(1), N = crow.size(0) - 1, nnz = values.size(0);
  constexpr int VEC = 16 / sizeof(T);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const int32_t* cp = crow.const_data_ptr<int32_t>();
  const Idx* colp = static_cast<const Idx*>(col.const_data_ptr());
  const T* vp = static_cast<const T*>(values.const_data_ptr());
  T* op = static_cast<T*>(out.mutable_data_ptr());

  int parts;
  int64_t part_len;
  Tensor ws;
  auto workspace = [&]() -> float* {
    if (parts == 1) return nullptr;
    ws = empty({parts, M, N}, ScalarType::Float, x.device());
    return ws.mutable_data_ptr<float>();
  };

  if (M <= 8) {
    // Eight lanes per row only when rows are short (under half a warp's pass of 32 * VEC entries):
    // a warp per row keeps more loads in flight (N rows make N warps instead of N / 4).
    const bool short_rows = (nnz + N - 1) / N < 16 * VEC;
    const int G = short_rows ? 8 : 32;
    plan_parts(M, N, K, nnz, int64_t(G) * VEC, parts, part_len);
    float* wsp = workspace();
    // Full chunks load VEC values (16 bytes) and VEC columns (16-byte pieces, or 8 / 4 bytes).
    const int col_align = std::min<int>(16, VEC * sizeof(Idx));
    const bool vec_ok = reinterpret_cast<uintptr_t>(vp) % 16 == 0 && reinterpret_cast<uintptr_t>(colp) % col_align == 0;
    const unsigned blocks = blocks_for(N * parts * G, "rows");
#define TORCHSLIM_CSR_ROWS(MT, GG) \
  csr_rows_kernel<T, Idx, MT, GG><<<blocks, kThreads, 0, stream>>>(xp, cp, colp, vp, bias, op, wsp, M, N, K, nnz, \
                                                                    parts, part_len, vec_ok)
    if (M == 1)
      short_rows ? TORCHSLIM_CSR_ROWS(1, 8) : TORCHSLIM_CSR_ROWS(1, 32);
    else
      short_rows ? TORCHSLIM_CSR_ROWS(8, 8) : TORCHSLIM_CSR_ROWS(8, 32);
#undef TORCHSLIM_CSR_ROWS
    check_launch("csr_linear");
    if (parts > 1) launch_finalize<T>(wsp, bias, op, M, N, parts, stream);
    return;
  }

  // xt (K, Mp): x transposed, tokens padded to a multiple of V = VEC.
  const int64_t Mp = (M + VEC - 1) / VEC * VEC;
  Tensor xt = empty({K, Mp}, x.scalar_type(), x.device());
  T* xtp = static_cast<T*>(xt.mutable_data_ptr());
  const int64_t tiles_k = (K + 31) / 32, tiles_m = (Mp + 31) / 32;
  TORCHSLIM_CHECK(tiles_k * tiles_m <= 2147483647, "csr_linear: x is too large for one launch (transpose)");
  transpose_kernel<T><<<static_cast<unsigned>(tiles_k * tiles_m), kThreads, 0, stream>>>(xp, xtp, M, Mp, K, tiles_k);
  check_launch("csr_linear");

  // Four token lanes (32 bf16 / 16 float32 tokens per tile) up to that many tokens, else sixteen.
  const int TL = M <= 4 * VEC ? 4 : 16;
  const int64_t tiles = (M + TL * VEC - 1) / (TL * VEC);
  plan_parts(M, N, K, nnz, 32, parts, part_len);
  float* wsp = workspace();
  const unsigned blocks = blocks_for(N * parts * tiles * 32, "tokens");
#define TORCHSLIM_CSR_TOKENS(TLL) \
  csr_tokens_kernel<T, Idx, TLL><<<blocks, kThreads, 0, stream>>>(xtp, cp, colp, vp, bias, op, wsp, M, Mp, N, K, nnz, \
                                                                  parts, part_len, tiles)
  if (TL == 4)
    TORCHSLIM_CSR_TOKENS(4);
  else
    TORCHSLIM_CSR_TOKENS(16);
#undef TORCHSLIM_CSR_TOKENS
  check_launch("csr_linear");
  if (parts > 1) launch_finalize<T>(wsp, bias, op, M, N, parts, stream);
}

template <typename T>
void launch(const Tensor& x, const Tensor& crow, const Tensor& col, const Tensor& values, const float* bias,
            Tensor& out, cudaStream_t stream) {
  if (col.scalar_type() == ScalarType::Short)
    launch_typed<T, int16_t>(x, crow, col, values, bias, out, stream);
  else
    launch_typed<T, int32_t>(x, crow, col, values, bias, out, stream);
}

Tensor csr_linear_cuda(Tensor x, Tensor crow, Tensor col, Tensor values, std::optional<Tensor> bias) {
  const char* op = "csr_linear";
  check_csr_linear_args(x, crow, col, values, bias);
  // Reached with every argument on x's device, so x is the CUDA tensor the dispatcher saw.
  TORCHSLIM_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  const int64_t M = x.size(0), K = x.size(1), N = crow.size(0) - 1, nnz = values.size(0);

  const DeviceGuard guard(x.get_device_index());
  Tensor out = empty({M, N}, x.scalar_type(), x.device());
  if (M == 0 || N == 0) return out;
  // The bias as F.linear adds it (rounded to x's dtype), then float32 for the kernels.
  Tensor bias_f;
  if (bias.has_value()) bias_f = contiguous_as(contiguous_as(*bias, x.scalar_type()), ScalarType::Float);
  const float* bp = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const cudaStream_t stream = current_stream(x.get_device_index());
  const ScalarType dt = x.scalar_type();
  if (K == 0 || nnz == 0) {  // nothing to multiply: out = bias (or zeros)
    switch (dt) {
      case ScalarType::Float: launch_finalize<float>(nullptr, bp, out.mutable_data_ptr<float>(), M, N, 0, stream); break;
      case ScalarType::BFloat16:
        launch_finalize<__nv_bfloat16>(nullptr, bp, static_cast<__nv_bfloat16*>(out.mutable_data_ptr()), M, N, 0, stream);
        break;
      default: launch_finalize<__half>(nullptr, bp, static_cast<__half*>(out.mutable_data_ptr()), M, N, 0, stream); break;
    }
    return out;
  }
  switch (dt) {
    case ScalarType::Float: launch<float>(x, crow, col, values, bp, out, stream); break;
    case ScalarType::BFloat16: launch<__nv_bfloat16>(x, crow, col, values, bp, out, stream); break;
    default: launch<__half>(x, crow, col, values, bp, out, stream); break;
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchslim, CUDA, m) {
  m.impl("csr_linear", TORCH_BOX(&csr_linear_cuda));
}

}  // namespace torchslim
