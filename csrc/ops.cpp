// Every torchslim op schema, defined once. Implementations register per dispatch key in
// csrc/cpu/*.cpp, csrc/cuda/*.cu, or from Python (Triton); the fakes live in torchslim/ops.py and the
// autograd formulas in torchslim/_autograd.py (torchslim/__init__.py imports both right after this).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(torchslim, m) {
  // x (M, K) float32|bfloat16|float16 -> (q (M, K) int8, scale (M,) float32), symmetric per row.
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");

  // w_q (N, K) int8 -> the CPU kernels' packed layout (formats/int8.py documents it).
  m.def("int8_pack_weight(Tensor w_q) -> Tensor");
  // Inverse of int8_pack_weight; N and K are those of the original (N, K) weight.
  m.def("int8_unpack_weight(Tensor w_packed, SymInt N, SymInt K) -> Tensor");

  // W8A8 linear: x (M, K) float, w_q (N, K) int8, w_scale (N,) float32, bias (N,) -> (M, N) x.dtype.
  m.def("int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None) -> Tensor");
  // The same with the weight from int8_pack_weight (CPU): what Int8Linear calls on CPU.
  m.def("int8_linear_packed(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias=None) -> Tensor");
  // Internal: the CUDA-only sm_90a (CUTLASS) GEMM behind int8_linear for M >= 64, opt-in
  // (csrc/cuda/int8_gemm_sm90.cu): a_q (M, K) int8, a_scale (M,) float32, b_q (N, K) int8,
  // b_scale (N,) float32, bias (N,) float -> (M, N) out_dtype. Registered only where built.
  m.def("_int8_gemm_sm90(Tensor a_q, Tensor a_scale, Tensor b_q, Tensor b_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Internal: int8_linear for decode (M <= 16) in one launch, CUDA only, opt-in (csrc/cuda/int8_decode.cu).
  m.def("_int8_linear_decode(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor");

  // 2:4 sparse linear: x (M, K) float, values (N, K_pad / 2) x.dtype, meta (N, K_pad / 16) int16 (the
  // format of formats/sparse24.py, K_pad = round_up(K, 16)), bias (N,) -> (M, N) x.dtype.
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");

  // CSR sparse linear: x (M, K) float, the weight (N, K) as crow (N + 1,) int32, col (nnz,) int16|int32,
  // values (nnz,) x.dtype (the format of formats/csr.py), bias (N,) -> (M, N) x.dtype.
  m.def("csr_linear(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias=None) -> Tensor");

  // Low-rank linear in one kernel: (x V^T) U^T + bias, x (M, K) float, V (r, K) and U (N, r) x.dtype,
  // bias (N,) -> (M, N) x.dtype; the (tokens, r) intermediate never leaves the kernel.
  m.def("lowrank_linear(Tensor x, Tensor V, Tensor U, Tensor? bias=None) -> Tensor");
}
