// CUDA implementation of torchslim::_int8_linear_decode (schema in csrc/ops.cpp): int8_linear for
// decode (M <= 16) in ONE launch, per-token quantization of x fused into a split-K int8 GEMV.
//
// x (M, K) float32|bfloat16|float16 with unit stride along K (any row stride), M <= 16;
// w_q (N, K) int8 contiguous; w_scale (N,) float32; bias (N,) float32|bfloat16|float16 or None
//   -> (M, N) x.dtype, contiguous.
// Same result as quantize_per_token + triton_kernels/int8_linear.py's int8_matmul_dequant:
//   q, a_scale = the per-row quantization of quantize_row.cuh (the same device functions);
//   acc = sum_k q[m, k] * w_q[n, k], exact in int32 (K <= kMaxK);
//   out = round_to_out_dtype(fma(float(acc), a_scale * b_scale, float(bias))), and in float64 where
//   a_scale * b_scale overflows to Inf or falls below FLT_MIN while both are non-zero.
// One difference: that float64 choice is made per output element here, per (BLOCK_M x BLOCK_N)
// tile in the Triton kernel (whose result then depends on its autotuned tile). Both agree wherever
// no element needs float64, which real activations never do.
//
// Grid (tiles of BN output channels) x (splits of K). Every CTA:
//   0. asks L2 to prefetch its weight block (prefetch.global.L2, up to kPrefetchBytes), so the
//      DRAM stream of the weight runs while the CTA does 1 and 2;
//   1. reduces |x| over every whole row of x (x is small and read from L2): each CTA needs each
//      row's scale, computed exactly as quantize_per_token does (max is order-independent);
//   2. quantizes its K slice of x into shared memory (MB x slice bytes, dynamic: one CTA per SM,
//      so up to the device's opt-in limit; a longer K takes more splits) with
//      quantize_row::quantize_one;
//   3. streams its (BN, slice) block of w_q with 16-byte loads, int8 dot products with __dp4a
//      (exact int32); a warp owns NR channels, each lane 16-byte columns of the slice, so a q
//      vector read from shared memory serves NR weight rows;
//   4. adds its int32 partial sums into a workspace with atomics (int32 addition is associative:
//      the result does not depend on the order, it is deterministic);
//   5. the last CTA of a tile (threadfence + atomic counter) reads the sums back (atomicExch, which
//      also zeroes them), applies the epilogue, and resets the tile's counter: the workspace is
//      zero again for the next call, so the op is one launch and CUDA-graph capturable.
// The workspace is one persistent buffer per (device, stream), zeroed once when it is allocated or
// grown: calls on one stream are ordered, calls on different streams never share counters. Under
// CUDA-graph capture each call takes a fresh zeroed buffer from the caching allocator (the graph's
// pool), so a captured graph never shares its workspace with eager calls.
//
// Fast paths and their conditions (checked per call; otherwise a slower, equally exact path):
//   w_q: 16-byte loads when K % 16 == 0 and w_q's data pointer is 16-byte aligned; else byte loads.
//   x:   16-byte loads when x's data pointer and row stride (in bytes) are multiples of 16; else
//        element loads.
//
// Only light headers, as quantize_per_token.cu.
#include "cuda/stable_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "quantize_row.cuh"

// Compiled with -ftz=false -prec-div=true (cmake/cuda.cmake), as quantize_per_token.cu: it quantizes.

namespace torchslim {
namespace {

using quantize_row::abs_or_inf;
using quantize_row::quantize_one;
using quantize_row::to_float;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = 16;
// Largest K whose int32 sums cannot overflow for any int8 weight: |q| <= 127, |w| <= 128.
// (The Triton kernel's MAX_K is the same bound; int8_linear itself stops at 65536.)
constexpr int64_t kMaxK = (int64_t(2147483647)) / (127 * 128);
// Weight bytes per CTA asked of L2 ahead of use: enough to cover phases 1 and 2, small enough that
// a wave of CTAs (132 x 192 KiB = 25 MiB on an H100/H200) stays well inside L2.
constexpr int64_t kPrefetchBytes = 192 * 1024;
// Shared memory of the kernel besides q (amax partials, scales, flags), with room to spare.
constexpr int kStaticSmem = 1024;

// Weight channels per warp: a q vector read from shared memory serves NR weight rows; the
// accumulators (NR x MB int32 per lane) and the NR weight vectors in flight fit 128 registers
// (512 threads per SM) without spilling.
template <int MB>
constexpr int channels_per_warp() { return MB >= 8 ? 4 : 8; }

// Shared-memory layout of q: column-major in 16-byte columns, q[c][m] (the MB rows of column c
// together), so a lane's MB row reads of column c sit at compile-time offsets; each column is padded
// by 16 bytes (for MB > 1) so the 8 lanes of a quarter-warp reading columns c .. c + 7 of one row
// hit 8 different 16-byte bank groups.
template <int MB>
constexpr int q_pitch() { return MB * 16 + (MB > 1 ? 16 : 0); }

// ---------------------------------------------------------------------------------------------
// loads
// ---------------------------------------------------------------------------------------------
// 8 consecutive elements of x in their own dtype, packed (16 or 32 bytes of registers).
template <typename T>
struct Raw8 {
  uint4 r[sizeof(T) / 2];
};

// x[k .. k + 8), 0 beyond K. VEC: 16-byte loads allowed (the row pointer is 16-byte aligned and
// k % 8 == 0, so x + k is too).
template <typename T>
__device__ __forceinline__ Raw8<T> load8_raw(const T* __restrict__ row, int64_t k, int64_t K, bool vec) {
  Raw8<T> out;
  if (vec && k + 8 <= K) {
#pragma unroll
    for (int i = 0; i < int(sizeof(T)) / 2; ++i) out.r[i] = __ldg(reinterpret_cast<const uint4*>(row + k) + i);
  } else {
    T e[8];
    static_assert(sizeof(e) == sizeof(out.r), "");
    memset(e, 0, sizeof(e));  // +0 in every dtype
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (k + i < K) e[i] = row[k + i];
    memcpy(out.r, e, sizeof(e));
  }
  return out;
}

template <typename T>
__device__ __forceinline__ void to_floats(const Raw8<T>& raw, float (&v)[8]) {
  T e[8];
  memcpy(e, raw.r, sizeof(e));
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}


// 16 weight bytes w[k .. k + 16) of one row, 0 beyond K. VEC: K % 16 == 0 and a 16-byte aligned
// base, so the chunk is whole and aligned.
__device__ __forceinline__ uint4 load_w16(const int8_t* __restrict__ row, int64_t k, int64_t K, bool vec) {
  if (vec) return __ldg(reinterpret_cast<const uint4*>(row + k));
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t kk = k + 4 * i + j;
      const uint32_t b = kk < K ? static_cast<uint32_t>(static_cast<uint8_t>(__ldg(row + kk))) : 0u;
      word |= b << (8 * j);
    }
    w[i] = word;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Rows n0 .. n0 + rows (those below N), bytes [kb, ke) of w into L2, one 128-byte line at a time.
__device__ __forceinline__ void prefetch_block(const int8_t* w, int64_t N, int64_t K, int64_t n0, int rows,
                                               int64_t kb, int64_t ke, int tid) {
  if (ke <= kb) return;
  const int lines = int((ke - kb + 127) / 128);
  for (int i = tid; i < rows * lines; i += kThreads) {
    const int64_t n = n0 + i / lines;
    if (n < N) prefetch_l2(w + n * K + kb + int64_t(i % lines) * 128);
  }
}

__device__ __forceinline__ float load_bias(const void* bias, int kind, int64_t n) {
  switch (kind) {
    case 1: return static_cast<const float*>(bias)[n];
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[n]);
    case 3: return __half2float(static_cast<const __half*>(bias)[n]);
    default: return 0.f;
  }
}

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Params {
  const void* x;
  int64_t ldx;  // row stride of x, in elements
  const int8_t* w;
  const float* w_scale;
  const void* bias;
  int bias_kind;  // 0 none, 1 float32, 2 bfloat16, 3 float16
  void* out;
  int* acc;       // (M, N) int32 workspace, zero between calls
  int* counters;  // (tiles,) int32, zero between calls
  int M;
  int64_t N, K;
  int chunks_per_split;  // 16-byte columns of K per CTA
  int splits;
  bool x_vec, w_vec;
};

// MB: rows padded to 1, 2, 4, 8 or 16 (rows M..MB-1 are zeros in shared memory and never stored).
template <typename T, int MB>
__global__ void __launch_bounds__(kThreads, 1) int8_decode_kernel(const Params p) {
  constexpr int NR = channels_per_warp<MB>();
  constexpr int BN = kWarps * NR;
  // 16-byte columns per lane per step; NR x U weight loads in flight per thread (4 or 8: the block
  // was prefetched into L2, whose latency this covers).
  constexpr int U = 1;
  constexpr int P = q_pitch<MB>();
  extern __shared__ __align__(16) int8_t q_s[];  // q of this CTA's slice, q_s[c * P + m * 16 + j]
  __shared__ float amax_part[kWarps];
  __shared__ float inv_s[kMaxM], scale_s[kMaxM];
  __shared__ bool zero_s[kMaxM];
  __shared__ bool last_s;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int M = p.M;
  const int64_t N = p.N, K = p.K;
  const int64_t tile = blockIdx.x;
  const int64_t n0 = tile * BN;
  const int64_t k0 = int64_t(blockIdx.y) * p.chunks_per_split * 16;
  const int64_t k_end = std::min<int64_t>(K, k0 + int64_t(p.chunks_per_split) * 16);
  const int nch = k_end > k0 ? int((k_end - k0 + 15) / 16) : 0;  // 16-byte columns of this slice
  const T* x = static_cast<const T*>(p.x);

  // 0. the weight block (rows n0 .. n0 + BN, bytes k0 .. k_end) into L2, one 128-byte line at a time.
  prefetch_block(p.w, N, K, n0, BN, k0, std::min<int64_t>(k_end, k0 + kPrefetchBytes / BN), tid);

  // 1. absmax of every row: warps_per_row warps per row (one row per warp group).
  {
    const int wpr = kWarps / M >= 1 ? kWarps / M : 1;
    const int group = warp / wpr;
    const int tpr = 32 * wpr;
    const int t = tid - group * tpr;
    float amax = 0.f;
    if (group < M) {
      const T* row = x + int64_t(group) * p.ldx;
      const int64_t n8 = (K + 7) / 8;
      constexpr int kUnroll = 32 / sizeof(T);  // 8 (16-bit) or 4 (float) loads of 8 in flight: 32 registers
      for (int64_t j0 = t; j0 < n8; j0 += int64_t(kUnroll) * tpr) {
        Raw8<T> raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t j = j0 + int64_t(u) * tpr;
          if (j < n8) raw[u] = load8_raw<T>(row, 8 * j, K, p.x_vec);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (j0 + int64_t(u) * tpr < n8) {
            float v[8];
            to_floats<T>(raw[u], v);
#pragma unroll
            for (int i = 0; i < 8; ++i) amax = fmaxf(amax, abs_or_inf(v[i]));
          }
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) amax_part[warp] = amax;
    __syncthreads();
    if (tid < M) {
      float a = 0.f;
      for (int w = tid * wpr; w < (tid + 1) * wpr; ++w) a = fmaxf(a, amax_part[w]);
      const quantize_row::RowScale rs = quantize_row::row_scale(a);
      inv_s[tid] = rs.inv;
      scale_s[tid] = rs.scale;
      zero_s[tid] = rs.zero_q;
    }
    __syncthreads();
  }

  const int64_t nw = n0 + int64_t(warp) * NR;
  {
    // 2. q of this slice, rows 0 .. MB, columns 0 .. nch * 16 (zeros beyond K and in rows >= M).
    const int per_row = nch * 2;  // groups of 8 columns
    const int items = MB * per_row;
    // Loads first (kept packed in x's dtype), then the rounding.
    constexpr int kUnroll = 4;
    for (int i0 = tid; i0 < items; i0 += kUnroll * kThreads) {
      Raw8<T> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * kThreads;
        const int m = per_row > 0 ? i / per_row : 0;
        const int c = per_row > 0 ? i % per_row : 0;
        if (i < items && m < M && !zero_s[m]) raw[u] = load8_raw<T>(x + int64_t(m) * p.ldx, k0 + 8 * c, K, p.x_vec);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = i0 + u * kThreads;
        if (i < items) {
          const int m = i / per_row, c = i % per_row;
          int8_t q[8] = {};
          if (m < M && !zero_s[m]) {
            const float inv = inv_s[m];
            float v[8];
            to_floats<T>(raw[u], v);
#pragma unroll
            for (int e = 0; e < 8; ++e) q[e] = quantize_one(v[e], inv);  // 0 * inv = 0 beyond K
          }
          uint2 word;
          memcpy(&word, q, 8);
          *reinterpret_cast<uint2*>(q_s + (c >> 1) * P + m * 16 + (c & 1) * 8) = word;
        }
      }
    }
    __syncthreads();

    // 3. int32 dot products: warp `warp` owns channels n0 + warp * NR + r, lane the columns lane + 32 i.
    int acc[NR][MB];
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int m = 0; m < MB; ++m) acc[r][m] = 0;
    for (int c0 = lane; c0 < nch; c0 += 32 * U) {
      uint4 wv[U][NR];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          const int64_t n = nw + r;
          wv[u][r] = (c < nch && n < N) ? load_w16(p.w + n * K, k0 + 16 * int64_t(c), K, p.w_vec)
                                        : make_uint4(0u, 0u, 0u, 0u);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + 32 * u;
        if (c < nch) {
#pragma unroll
          for (int m = 0; m < MB; ++m) {
            const uint4 q = *reinterpret_cast<const uint4*>(q_s + c * P + m * 16);
#pragma unroll
            for (int r = 0; r < NR; ++r) {
              int a = acc[r][m];
              a = __dp4a(int(wv[u][r].x), int(q.x), a);
              a = __dp4a(int(wv[u][r].y), int(q.y), a);
              a = __dp4a(int(wv[u][r].z), int(q.z), a);
              a = __dp4a(int(wv[u][r].w), int(q.w), a);
              acc[r][m] = a;
            }
          }
        }
      }
    }

    // 4. partial sums of the warp into the workspace: one atomic per (channel, row), spread over lanes.
#pragma unroll
    for (int r = 0; r < NR; ++r) {
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        const int v = warp_sum(acc[r][m]);
        const int64_t n = nw + r;
        if (lane == ((r * MB + m) & 31) && m < M && n < N && v != 0) atomicAdd(p.acc + int64_t(m) * N + n, v);
      }
    }
  }

  // 5. the last CTA of the tile applies the epilogue and leaves the workspace zeroed.
  __threadfence();
  __syncthreads();
  if (tid == 0) last_s = atomicAdd(p.counters + tile, 1) == p.splits - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  T* out = static_cast<T*>(p.out);
  for (int i = tid; i < M * BN; i += kThreads) {
    const int m = i / BN;
    const int64_t n = n0 + i % BN;
    if (n >= N) continue;
    const int a = atomicExch(p.acc + int64_t(m) * N + n, 0);  // read at L2 and reset for the next call
    const float a_s = scale_s[m];
    const float b_s = p.w_scale[n];
    const float bias = load_bias(p.bias, p.bias_kind, n);
    const float s = __fmul_rn(a_s, b_s);
    const float s_mag = fabsf(s);
    // As the Triton epilogue: NaN a_s (a NaN row) stays on the float32 path and gives NaN.
    const bool wide = s_mag == __int_as_float(0x7f800000) || (a_s != 0.f && b_s != 0.f && s_mag < FLT_MIN);
    float o;
    if (wide) {
      const double s64 = __dmul_rn(double(a_s), double(b_s));  // exact
      o = __double2float_rn(__fma_rn(double(a), s64, double(bias)));
    } else {
      o = __fmaf_rn(__int2float_rn(a), s, bias);
    }
    store_out(out + int64_t(m) * N + n, o);
  }
  if (tid == 0) atomicExch(p.counters + tile, 0);
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
constexpr int kMaxDevices = 64;

struct DeviceLimits {
  int sms = 0;       // streaming multiprocessors
  int max_smem = 0;  // shared memory per block with the opt-in (bytes)
};

const DeviceLimits& device_limits(int device) {
  TORCHSLIM_CHECK(device >= 0 && device < kMaxDevices, "_int8_linear_decode: device index ", device, " out of range");
  static DeviceLimits cached[kMaxDevices];
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  DeviceLimits& d = cached[device];
  if (d.sms == 0) {
    TORCHSLIM_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCHSLIM_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  }
  return d;
}

// A zeroed int32 workspace of at least `ints` elements for this call (see the header comment).
Tensor workspace(const Tensor& like, int64_t ints, cudaStream_t stream, int device) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TORCHSLIM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    return torch::stable::new_zeros(like, {ints}, ScalarType::Int);  // captured with the kernel: zeroed at every replay
  }
  // Never destroyed: freeing CUDA memory from a static destructor at exit is not safe.
  static auto* buffers = new std::map<std::pair<int, uintptr_t>, Tensor>();
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& buf = (*buffers)[{device, reinterpret_cast<uintptr_t>(stream)}];
  if (!buf.defined() || buf.numel() < ints) {
    // Zeroed on the current stream (x's device, the stream of the launch), ordered before it.
    buf = torch::stable::new_zeros(like, {std::max<int64_t>(ints, buf.defined() ? 2 * buf.numel() : 0)}, ScalarType::Int);
  }
  return buf;  // a reference: the storage stays alive until the launch is enqueued
}

// Splits of K: few enough that each CTA streams a useful block of weight, enough to fill the
// SMs (one CTA of kThreads per SM). Cost of a choice ~ waves x (x bytes each CTA reads from L2,
// counted at half, + weight bytes per CTA).
// max_chunks: the most 16-byte columns of q one CTA can hold in shared memory.
int choose_splits(int64_t tiles, int64_t chunks, int64_t bn, int64_t x_bytes, int sms, int64_t max_chunks) {
  if (chunks <= 0) return 1;
  const int64_t s_min = (chunks + max_chunks - 1) / max_chunks;
  const int64_t s_max = std::max<int64_t>(s_min, std::min<int64_t>(chunks, (2 * sms + tiles - 1) / tiles));
  int64_t best = s_min;
  double best_cost = -1;
  for (int64_t s = s_min; s <= s_max; ++s) {
    const int64_t cps = (chunks + s - 1) / s;
    const int64_t ctas = tiles * ((chunks + cps - 1) / cps);
    const int64_t waves = (ctas + sms - 1) / sms;
    const double cost = double(waves) * (0.5 * double(x_bytes) + double(bn * cps * 16));
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return int(best);
}

template <typename T, int MB>
void launch(Params p, int64_t x_elem_bytes, Tensor& ws, cudaStream_t stream, int device) {
  constexpr int BN = kWarps * channels_per_warp<MB>();
  const int64_t tiles = (p.N + BN - 1) / BN;
  TORCHSLIM_CHECK(tiles <= 2147483647, "_int8_linear_decode: N=", p.N, " is too large");
  const int64_t chunks = (p.K + 15) / 16;
  const DeviceLimits& lim = device_limits(device);
  const int64_t max_chunks = (lim.max_smem - kStaticSmem) / q_pitch<MB>();
  const int splits = choose_splits(tiles, chunks, BN, int64_t(p.M) * p.K * x_elem_bytes, lim.sms, max_chunks);
  int64_t cps = chunks > 0 ? (chunks + splits - 1) / splits : 1;
  p.chunks_per_split = int(cps);
  p.splits = chunks > 0 ? int((chunks + cps - 1) / cps) : 1;
  TORCHSLIM_CHECK(p.splits <= 65535, "_int8_linear_decode: K=", p.K, " needs too many splits");
  const int smem = int(cps * q_pitch<MB>());
  auto kernel = int8_decode_kernel<T, MB>;
  if (smem > 48 * 1024) {
    // Above 48 KiB a kernel must opt in, once per device (the limit is the device's, set once).
    static bool opted[kMaxDevices] = {};
    if (!opted[device]) {
      TORCHSLIM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          lim.max_smem - kStaticSmem));
      opted[device] = true;
    }
  }
  const int64_t ints = int64_t(p.M) * p.N + tiles;
  ws = workspace(ws, ints, stream, device);
  p.acc = ws.mutable_data_ptr<int>();
  p.counters = p.acc + int64_t(p.M) * p.N;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.splits));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  check_launch("_int8_linear_decode");
}

template <typename T>
void launch_m(Params p, Tensor& ws, cudaStream_t stream, int device) {
  const int64_t e = sizeof(T);
  if (p.M <= 1) launch<T, 1>(p, e, ws, stream, device);
  else if (p.M <= 2) launch<T, 2>(p, e, ws, stream, device);
  else if (p.M <= 4) launch<T, 4>(p, e, ws, stream, device);
  else if (p.M <= 8) launch<T, 8>(p, e, ws, stream, device);
  else launch<T, 16>(p, e, ws, stream, device);
}

Tensor int8_linear_decode_cuda(Tensor x, Tensor w_q, Tensor w_scale, std::optional<Tensor> bias_opt) {
  const char* op = "_int8_linear_decode";
  TORCHSLIM_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCHSLIM_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", shape(x));
  TORCHSLIM_CHECK(is_float(x.scalar_type()), op, ": x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCHSLIM_CHECK(M <= kMaxM, op, ": x has M=", M, " rows; this kernel is for decode, M <= ", kMaxM,
              " (int8_linear takes larger M)");
  TORCHSLIM_CHECK(K <= 1 || x.stride(1) == 1, op, ": x must have unit stride along K (rows may be strided), got strides ",
              strides(x));
  TORCHSLIM_CHECK(w_q.device() == x.device(), op, ": w_q must be on ", x.device(), " like x, got ", w_q.device());
  TORCHSLIM_CHECK(w_q.dim() == 2, op, ": w_q must be 2-D (N, K), got shape ", shape(w_q));
  TORCHSLIM_CHECK(w_q.scalar_type() == ScalarType::Char, op, ": w_q must be int8, got ", w_q.scalar_type());
  TORCHSLIM_CHECK(w_q.is_contiguous(), op, ": w_q must be contiguous");
  TORCHSLIM_CHECK(w_q.size(1) == K, op, ": x has K=", K, " but w_q has K=", w_q.size(1));
  TORCHSLIM_CHECK(K <= kMaxK, op, ": K=", K, " exceeds ", kMaxK, ", beyond which the int32 accumulator can overflow");
  const int64_t N = w_q.size(0);
  TORCHSLIM_CHECK(w_scale.device() == x.device(), op, ": w_scale must be on ", x.device(), " like x, got ",
              w_scale.device());
  TORCHSLIM_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, op, ": w_scale must have shape (", N, ",), got ",
              shape(w_scale));
  TORCHSLIM_CHECK(w_scale.scalar_type() == ScalarType::Float, op, ": w_scale must be float32, got ", w_scale.scalar_type());
  TORCHSLIM_CHECK(w_scale.is_contiguous(), op, ": w_scale must be contiguous");
  int bias_kind = 0;
  const void* bias_ptr = nullptr;
  if (bias_opt.has_value() && bias_opt->defined()) {
    const Tensor& b = *bias_opt;
    TORCHSLIM_CHECK(b.device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ", b.device());
    TORCHSLIM_CHECK(b.dim() == 1 && b.size(0) == N, op, ": bias must have shape (", N, ",), got ", shape(b));
    TORCHSLIM_CHECK(is_float(b.scalar_type()), op, ": bias must be float32, bfloat16 or float16, got ",
                b.scalar_type());
    TORCHSLIM_CHECK(b.is_contiguous(), op, ": bias must be contiguous");
    bias_kind = b.scalar_type() == ScalarType::Float ? 1 : (b.scalar_type() == ScalarType::BFloat16 ? 2 : 3);
    bias_ptr = b.const_data_ptr();
  }

  const DeviceGuard guard(x.get_device_index());
  Tensor out = empty({M, N}, x.scalar_type(), x.device());
  if (M == 0 || N == 0) return out;
  const int device = x.get_device_index();
  const cudaStream_t stream = current_stream(device);

  Params p{};
  p.x = x.const_data_ptr();
  p.ldx = M > 1 ? x.stride(0) : 0;
  p.w = w_q.const_data_ptr<int8_t>();
  p.w_scale = w_scale.const_data_ptr<float>();
  p.bias = bias_ptr;
  p.bias_kind = bias_kind;
  p.out = out.mutable_data_ptr();
  p.M = int(M);
  p.N = N;
  p.K = K;
  const int64_t esize = x.element_size();
  p.x_vec = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && (p.ldx * esize) % 16 == 0;
  p.w_vec = reinterpret_cast<uintptr_t>(p.w) % 16 == 0 && K % 16 == 0;

  Tensor ws = out;  // only its device is used to allocate the workspace
  switch (x.scalar_type()) {
    case ScalarType::Float: launch_m<float>(p, ws, stream, device); break;
    case ScalarType::BFloat16: launch_m<__nv_bfloat16>(p, ws, stream, device); break;
    default: launch_m<__half>(p, ws, stream, device); break;
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(torchslim, CUDA, m) {
  m.impl("_int8_linear_decode", TORCH_BOX(&int8_linear_decode_cuda));
}

}  // namespace torchslim
