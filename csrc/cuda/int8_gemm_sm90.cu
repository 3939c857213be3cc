// CUDA implementation of torchslim::_int8_gemm_sm90 (schema in csrc/ops.cpp): the Hopper (sm_90a)
// W8A8 GEMM behind torchslim::int8_linear for M >= 64, opt-in (TORCHSLIM_CUDA_OPT_IN=int8_sm90, see
// python/torchslim/_cuda_registration.py) until it has been tested and timed on an H100/H200.
//
// a_q (M, K) int8, a_scale (M,) float32, b_q (N, K) int8, b_scale (N,) float32,
// bias (N,) float32|bfloat16|float16 or None, out_dtype float32|bfloat16|float16  ->  out (M, N):
//   out[m, n] = round_to_out_dtype(fmaf(float(acc[m, n]), a_scale[m] * b_scale[n], float(bias[n])))
// with acc the exact int32 sum of a_q[m, k] * b_q[n, k] (exact for K <= 132104). The same semantics
// as int8_matmul_dequant in triton_kernels/int8_linear.py (read its epilogue), including:
//   - a NaN a_scale (a row of x with NaN/Inf; quantize_per_token gives it q = 0) makes its row NaN;
//   - where a_scale[m] * b_scale[n] overflows to Inf, or underflows below FLT_MIN while both are
//     non-zero, the element is computed in float64 (acc * (double(a) * double(b)) + bias, exact
//     product of the scales, one fma) and rounded to float32, then to out_dtype.
//   Difference from the Triton kernel: Triton switches a whole tile (up to 128 x 256 elements) to
//   float64 when any element of it needs it; here only the elements that need it take float64.
//   The other elements of such a tile keep the float32 result (float(acc), the float32 scale
//   product, one fmaf), which can differ from Triton's float64 result for them by about one float32
//   ulp of |acc * scales| + |bias|; both are within the rounding bound of tests/conftest.py.
//   Only inputs with such extreme scales (|a_scale * b_scale| > FLT_MAX or < FLT_MIN; real
//   activations and weights never have them) see the difference; checking for them in Python
//   would need a device sync, so the dispatch does not try.
//
// The kernel: CUTLASS 3.x (4.2) for sm_90a, built with the CollectiveBuilders:
//   - mainloop: TMA loads of 128 x 128 (A) and 128 x 128 (B) int8 K-major tiles into a multi-stage
//     shared-memory pipeline, warp-specialized (one producer warp group, two consumer warp groups
//     sharing a 128 x 128 output tile: KernelTmaWarpSpecializedCooperative), s8 x s8 -> s32 wgmma;
//     persistent CTAs (one per SM) walking the output tiles.
//   - epilogue: an epilogue visitor tree (EVT) on the int32 accumulator: a_scale column-broadcast
//     (one value per row m), b_scale and bias row-broadcast (one per column n, the bias in its own
//     dtype, widened to float32 exactly), combined by the custom node DequantNode below; TMA store
//     of the out_dtype tile. The int32 accumulator never goes to memory.
// TMA needs 16-byte aligned global addresses and row strides: K % 16 == 0, N * sizeof(out) % 16 == 0,
// and a_q, b_q 16-byte aligned (the op checks; int8_linear only dispatches shapes that satisfy it).
//
// Architectures: cmake/cuda.cmake compiles this file for sm_90a only (wgmma and TMA need the
// arch-specific target). Compiled for another architecture, CUTLASS itself compiles the kernel body
// out (without __CUDA_ARCH_FEAT_SM90_ALL its sm90 kernels only print an error), and the host side
// refuses devices other than compute capability 9.0 before any launch; nvcc older than 12.0 stops
// at the #error below.
//
// The op layer on the LibTorch Stable ABI (cuda/stable_cuda.h), as every op file.
#include "cuda/stable_cuda.h"

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <mutex>
#include <optional>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#if !defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)
#error "int8_gemm_sm90.cu needs CUDA >= 12.0 (CUTLASS's SM90 support); cmake/cuda.cmake adds it only then"
#endif

namespace torchslim {
namespace {

using namespace cute;

constexpr const char* kOp = "_int8_gemm_sm90";
// Largest K for which sum_k q_a * q_b cannot leave int32 (|q_a| <= 127, q_b may be -128): the
// bound of the Triton kernel (MAX_K); int8_linear itself stops at 65536.
constexpr int64_t kMaxK = (int64_t(2147483647)) / (127 * 128);
constexpr int kAlignBytes = 16;  // TMA: 16-byte aligned base addresses and row strides

// ---------------------------------------------------------------------------------------------
// The epilogue's combining node: out = fma(float(acc), a_s * b_s, bias) with the float64 branch.
// Its three children are the broadcasts (a_scale per row, b_scale per column, bias per column);
// the accumulator fragment itself is the first argument of every node's visit (int32 here, so
// the float64 branch gets the exact sum, not its float32 rounding).
// ---------------------------------------------------------------------------------------------
template <class ElementOut>
struct DequantNode : cutlass::epilogue::fusion::Sm90VisitorImpl<> {
  using cutlass::epilogue::fusion::Sm90VisitorImpl<>::Sm90VisitorImpl;

  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<ElementOut, FragmentSize>
    visit(cutlass::Array<ElementAccumulator, FragmentSize> const& frg_acc, int /*epi_v*/, int /*epi_m*/,
          int /*epi_n*/, cutlass::Array<float, FragmentSize> const& a_s,
          cutlass::Array<float, FragmentSize> const& b_s, cutlass::Array<float, FragmentSize> const& bias) {
      static_assert(cute::is_same_v<ElementAccumulator, int32_t>, "the accumulator is the exact int32 sum");
      cutlass::Array<float, FragmentSize> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        const float as = a_s[i];
        const float bs = b_s[i];
        const float s = __fmul_rn(as, bs);
        const float mag = fabsf(s);
        // NaN as (a NaN row) fails both tests and stays on the float32 path: fma(.., NaN, ..) = NaN.
        const bool wide = mag == __int_as_float(0x7f800000) || (as != 0.f && bs != 0.f && mag < FLT_MIN);
        if (wide) {
          // The product of two float32 values is exact in float64; acc is exact too.
          const double s64 = double(as) * double(bs);
          out[i] = __double2float_rn(fma(double(frg_acc[i]), s64, double(bias[i])));
        } else {
          // One rounding for the product and the bias, as the CPU kernels' fma.
          out[i] = __fmaf_rn(__int2float_rn(frg_acc[i]), s, bias[i]);
        }
      }
      // float32 -> out dtype, round to nearest even (identity for float32), as torch's .to().
      cutlass::NumericArrayConverter<ElementOut, float, FragmentSize, cutlass::FloatRoundStyle::round_to_nearest> cvt;
      return cvt(out);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const&) {
    return ConsumerStoreCallbacks();
  }
};

// ---------------------------------------------------------------------------------------------
// The GEMM type for one (out dtype, bias dtype).
// ---------------------------------------------------------------------------------------------
template <class ElementOut, class ElementBias>
struct Sm90Int8Gemm {
  using ElementA = int8_t;
  using ElementB = int8_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;     // a_q (M, K), K contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // b_q (N, K) = B (K, N) column-major: K contiguous
  using LayoutD = cutlass::layout::RowMajor;     // out (M, N)
  static constexpr int kAlignA = kAlignBytes / sizeof(ElementA);
  static constexpr int kAlignB = kAlignBytes / sizeof(ElementB);
  static constexpr int kAlignD = kAlignBytes / sizeof(ElementOut);

  // 128 x 128 output tile split between two consumer warp groups (64 rows each), 128-byte K steps
  // (one 128B-swizzled row of int8 per K step); no clusters (no multicast): simplest correct start.
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

  // Broadcast leaves: no smem pipelining (Stages 0); alignment 1 (scalar loads, predicated by the
  // tile residue): a_scale, b_scale and bias need no alignment and M, N any value.
  using AScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>, 1>;
  using BScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>, 1>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementBias, float, Stride<_0, _1, _0>, 1>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<DequantNode<ElementOut>, AScale, BScale, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutD, kAlignD,  // no source tensor C
      ElementOut, LayoutD, kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignA, ElementB, LayoutB, kAlignB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

// (rows, 1, batch) strides of a row-major matrix with leading dimension ld and a single batch:
// a_q (M, K), b_q (N, K) (K-major B) and out (M, N) all take this form.
template <class Stride>
Stride row_major_stride(int64_t ld) {
  Stride s{};
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(cute::get<1>(s))>, cute::Int<1>>,
                "expected a unit inner stride");
  cute::get<0>(s) = ld;
  cute::get<2>(s) = 0;
  return s;
}

// Per device, queried once (also outside any CUDA-graph capture that later calls run in): the SM
// count (the persistent scheduler sizes its grid with it) and the compute capability.
struct DeviceInfo {
  int sm_count = 0;
  int major = 0;
  int minor = 0;
};

const DeviceInfo& device_info(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo infos[kMaxDevices];
  // A mutex, not std::call_once: that binds pthread_once@GLIBC_2.34 and would tie the wheel to
  // manylinux_2_34 (see Makefile: wheel-cuda).
  static std::mutex mutex;
  TORCHSLIM_CHECK(device >= 0 && device < kMaxDevices, kOp, ": device index ", device, " out of range");
  const std::lock_guard<std::mutex> lock(mutex);
  DeviceInfo& d = infos[device];
  if (d.sm_count == 0) {  // a CUDA error leaves it 0: asked again next time
    DeviceInfo q;
    TORCHSLIM_CUDA_CHECK(cudaDeviceGetAttribute(&q.major, cudaDevAttrComputeCapabilityMajor, device));
    TORCHSLIM_CUDA_CHECK(cudaDeviceGetAttribute(&q.minor, cudaDevAttrComputeCapabilityMinor, device));
    TORCHSLIM_CUDA_CHECK(cudaDeviceGetAttribute(&q.sm_count, cudaDevAttrMultiProcessorCount, device));
    d = q;
  }
  return d;
}

template <class ElementOut, class ElementBias>
void run_gemm(const Tensor& a_q, const Tensor& a_scale, const Tensor& b_q, const Tensor& b_scale, const void* bias,
              Tensor& out, int device, cudaStream_t stream) {
  using G = Sm90Int8Gemm<ElementOut, ElementBias>;
  using Gemm = typename G::Gemm;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;

  const int M = static_cast<int>(a_q.size(0));
  const int K = static_cast<int>(a_q.size(1));
  const int N = static_cast<int>(b_q.size(0));

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const int8_t*>(a_q.const_data_ptr()), row_major_stride<StrideA>(K),
       static_cast<const int8_t*>(b_q.const_data_ptr()), row_major_stride<StrideB>(K)},
      {{},  // the fusion's arguments, set below
       nullptr, row_major_stride<StrideC>(N),
       static_cast<ElementOut*>(out.mutable_data_ptr()), row_major_stride<StrideD>(N)},
  };
  args.hw_info.device_id = device;
  args.hw_info.sm_count = device_info(device).sm_count;
  // EVT arguments nest as the tree: {child 0, child 1, child 2, node}. A null bias pointer makes
  // the row broadcast read its null_default (0) instead: acc * s + 0, as the Triton kernel's zeros.
  args.epilogue.thread = {
      {static_cast<const float*>(a_scale.const_data_ptr()), 0.f, {}},
      {static_cast<const float*>(b_scale.const_data_ptr()), 0.f, {}},
      {static_cast<const ElementBias*>(bias), ElementBias(0), {}},
      {},
  };

  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  TORCHSLIM_CHECK(status == cutlass::Status::kSuccess, kOp, ": CUTLASS cannot run this problem (M=", M, ", N=", N,
              ", K=", K, "): ", cutlassGetStatusString(status));
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  Tensor workspace;
  if (workspace_bytes > 0) {
    // From torch's caching allocator, on the current stream: no cudaMalloc per call, graph-safe.
    workspace = empty({static_cast<int64_t>(workspace_bytes)}, ScalarType::Byte, a_q.device());
  }
  status = gemm.initialize(args, workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, stream);
  TORCHSLIM_CHECK(status == cutlass::Status::kSuccess, kOp, ": CUTLASS initialize failed: ",
              cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCHSLIM_CHECK(status == cutlass::Status::kSuccess, kOp, ": CUTLASS launch failed: ", cutlassGetStatusString(status));
  check_launch(kOp);
}

template <class ElementOut>
void dispatch_bias(const Tensor& a_q, const Tensor& a_scale, const Tensor& b_q, const Tensor& b_scale,
                   const std::optional<Tensor>& bias, Tensor& out, int device, cudaStream_t stream) {
  if (!bias.has_value()) {
    run_gemm<ElementOut, float>(a_q, a_scale, b_q, b_scale, nullptr, out, device, stream);
    return;
  }
  const void* p = bias->const_data_ptr();
  switch (bias->scalar_type()) {
    case ScalarType::Float: run_gemm<ElementOut, float>(a_q, a_scale, b_q, b_scale, p, out, device, stream); break;
    case ScalarType::BFloat16:
      run_gemm<ElementOut, cutlass::bfloat16_t>(a_q, a_scale, b_q, b_scale, p, out, device, stream);
      break;
    case ScalarType::Half: run_gemm<ElementOut, cutlass::half_t>(a_q, a_scale, b_q, b_scale, p, out, device, stream); break;
    default: fail(kOp, ": unreachable bias dtype");  // checked before
  }
}

Tensor int8_gemm_sm90(Tensor a_q, Tensor a_scale, Tensor b_q, Tensor b_scale, std::optional<Tensor> bias,
                      ScalarType out_dtype) {
  // Shapes and dtypes first (they are meaningful on any device), then devices, then alignment.
  TORCHSLIM_CHECK(a_q.dim() == 2 && a_q.scalar_type() == ScalarType::Char, kOp, ": a_q must be a 2-D int8 tensor, got ",
              a_q.scalar_type(), " of shape ", shape(a_q));
  TORCHSLIM_CHECK(b_q.dim() == 2 && b_q.scalar_type() == ScalarType::Char, kOp, ": b_q must be a 2-D int8 tensor, got ",
              b_q.scalar_type(), " of shape ", shape(b_q));
  const int64_t M = a_q.size(0), K = a_q.size(1), N = b_q.size(0);
  TORCHSLIM_CHECK(b_q.size(1) == K, kOp, ": a_q has K=", K, " but b_q has K=", b_q.size(1));
  TORCHSLIM_CHECK(K <= kMaxK, kOp, ": K=", K, " exceeds ", kMaxK, ", beyond which the int32 accumulator can overflow");
  TORCHSLIM_CHECK(a_scale.scalar_type() == ScalarType::Float && a_scale.dim() == 1 && a_scale.size(0) == M &&
                  a_scale.is_contiguous(),
              kOp, ": a_scale must be a contiguous float32 tensor of shape (", M, ",), got ", a_scale.scalar_type(),
              " of shape ", shape(a_scale));
  TORCHSLIM_CHECK(b_scale.scalar_type() == ScalarType::Float && b_scale.dim() == 1 && b_scale.size(0) == N &&
                  b_scale.is_contiguous(),
              kOp, ": b_scale must be a contiguous float32 tensor of shape (", N, ",), got ", b_scale.scalar_type(),
              " of shape ", shape(b_scale));
  if (bias.has_value()) {
    TORCHSLIM_CHECK(is_float(bias->scalar_type()) && bias->dim() == 1 && bias->size(0) == N &&
                    bias->is_contiguous(),
                kOp, ": bias must be a contiguous float32, bfloat16 or float16 tensor of shape (", N, ",), got ",
                bias->scalar_type(), " of shape ", shape(*bias));
  }
  TORCHSLIM_CHECK(is_float(out_dtype), kOp, ": out_dtype must be float32, bfloat16 or float16, got ", out_dtype);

  TORCHSLIM_CHECK(a_q.is_cuda(), kOp, ": a_q must be a CUDA tensor, got device ", a_q.device());
  const auto check_device = [&](const Tensor& t, const char* name) {
    TORCHSLIM_CHECK(t.device() == a_q.device(), kOp, ": ", name, " is on ", t.device(), " but a_q is on ", a_q.device());
  };
  check_device(a_scale, "a_scale");
  check_device(b_q, "b_q");
  check_device(b_scale, "b_scale");
  if (bias.has_value()) check_device(*bias, "bias");

  TORCHSLIM_CHECK(a_q.is_contiguous() && b_q.is_contiguous(), kOp,
              ": a_q and b_q must be contiguous (row-major, K innermost), got strides ", strides(a_q), " and ",
              strides(b_q));
  TORCHSLIM_CHECK(M <= INT32_MAX && N <= INT32_MAX, kOp, ": M=", M, " and N=", N, " must fit in int32");
  // K == 0 (an empty sum) is left to the caller: int8_linear never sends it here.
  TORCHSLIM_CHECK(K > 0, kOp, ": K must be positive, got K=0");
  const int64_t out_bytes = out_dtype == ScalarType::Float ? 4 : 2;
  TORCHSLIM_CHECK(K % kAlignBytes == 0, kOp, ": K=", K, " must be a multiple of 16: TMA needs 16-byte aligned row ",
              "strides of a_q and b_q (int8_linear uses its Triton kernel for other K)");
  TORCHSLIM_CHECK((N * out_bytes) % kAlignBytes == 0, kOp, ": N=", N, " times ", out_bytes, " bytes of ", out_dtype,
              " must be a multiple of 16: TMA needs 16-byte aligned row strides of the output (N % ",
              kAlignBytes / out_bytes, " == 0)");
  TORCHSLIM_CHECK(reinterpret_cast<uintptr_t>(a_q.const_data_ptr()) % kAlignBytes == 0 &&
                  reinterpret_cast<uintptr_t>(b_q.const_data_ptr()) % kAlignBytes == 0,
              kOp, ": a_q and b_q must start at 16-byte aligned addresses (TMA), e.g. not a view at an odd offset");

  const DeviceGuard guard(a_q.get_device_index());
  const int device = a_q.get_device_index();
  Tensor out = empty({M, N}, out_dtype, a_q.device());
  if (M == 0 || N == 0) return out;

  const DeviceInfo& info = device_info(device);
  TORCHSLIM_CHECK(info.major == 9 && info.minor == 0, kOp, ": this kernel is built for sm_90a (H100/H200) only, but ",
              a_q.device(), " has compute capability ", info.major, ".", info.minor);

  const cudaStream_t stream = current_stream(device);
  switch (out_dtype) {
    case ScalarType::Float: dispatch_bias<float>(a_q, a_scale, b_q, b_scale, bias, out, device, stream); break;
    case ScalarType::BFloat16:
      dispatch_bias<cutlass::bfloat16_t>(a_q, a_scale, b_q, b_scale, bias, out, device, stream);
      break;
    case ScalarType::Half: dispatch_bias<cutlass::half_t>(a_q, a_scale, b_q, b_scale, bias, out, device, stream); break;
    default: fail(kOp, ": unreachable out dtype");
  }
  return out;
}

}  // namespace
}  // namespace torchslim

STABLE_TORCH_LIBRARY_IMPL(torchslim, CUDA, m) {
  m.impl("_int8_gemm_sm90", TORCH_BOX(&torchslim::int8_gemm_sm90));
}
