"""Registers the Triton kernels as the CUDA implementations of torchslim ops.

Done only where Triton is installed; without it a CUDA call raises NotImplementedError naming
the missing kernel (torch's dispatcher error), never a silent fallback.

Registration only needs to know that Triton exists (a file-system lookup): Triton itself and the
kernel module are imported on the first CUDA call, so ``import torchslim`` stays fast and works on
machines without a GPU. If Triton is installed but broken, that first call raises the ImportError.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .ops import (
    _FLOATS,
    check_int8_linear_args,
    check_int8_linear_packed_args,
    check_lowrank_linear_args,
    check_sparse24_linear_args,
)

# CUDA kernels that have not yet been tested and measured on a GPU are not the default (DESIGN): each
# runs only where its name is listed in TORCHSLIM_CUDA_OPT_IN (comma-separated), and only where this
# build has it. Once a GPU run has tested and timed one, it leaves this table and becomes the default
# in the shape range where it measured faster (the README's GPU table says where).
OPT_IN_KERNELS = {
    "int8_sm90": "INT8 GEMM for M >= 64 on sm_90a (CUTLASS, TMA + warp-specialized wgmma)",
    "int8_decode": "INT8 decode (M <= 16): quantization fused into a split-K GEMV, one launch",
    "lowrank_fused": "the fused low-rank Triton kernel (the H200 run measured it 1.7-30x slower than the "
                     "default two cuBLAS GEMMs; kept for its rework)",
}


def opted_in(name: str) -> bool:
    """Whether TORCHSLIM_CUDA_OPT_IN names this kernel (read at each call: tests and benchmarks flip it)."""
    if name not in OPT_IN_KERNELS:
        raise KeyError(f"unknown opt-in kernel {name!r}; known: {sorted(OPT_IN_KERNELS)}")
    listed = {n.strip() for n in os.environ.get("TORCHSLIM_CUDA_OPT_IN", "").split(",")}
    return name in listed or "all" in listed


def has_cuda_kernel(op: str) -> bool:
    """Whether this build registered a CUDA kernel for torchslim::<op> (C++ kernels are optional)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"torchslim::{op}", "CUDA")
    except RuntimeError:  # no such op in this build at all
        return False


def opt_in_status() -> dict[str, str]:
    """Per opt-in kernel: whether TORCHSLIM_CUDA_OPT_IN turns it on, and whether this build/torch has it."""
    present = {"int8_sm90": has_cuda_kernel("_int8_gemm_sm90"), "int8_decode": has_cuda_kernel("_int8_linear_decode"),
               "lowrank_fused": triton_available()}
    return {name: f"{'on' if opted_in(name) else 'off'}, {'present' if present[name] else 'absent'} here: {what}"
            for name, what in OPT_IN_KERNELS.items()}


# w_scale tensors already seen to be finite, with the (version, data_ptr) they had then. Checking
# finiteness reads the tensor back to the host, a device sync; weights do not change between
# calls, so the sync happens once per weight instead of once per forward (which would also stall
# the CPU behind the GPU and forbid CUDA-graph capture of every later call). Writes that bypass
# the version counter (through .data, or to an inference tensor in place) are not seen: a
# non-finite scale written so only makes its output column non-finite, as in a float GEMM.
_finite_scales: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_finite_scale(w_scale: Tensor, op: str) -> None:
    # Inference tensors have no version counter; their storage address is the stamp then.
    stamp = (None if w_scale.is_inference() else w_scale._version, w_scale.data_ptr())
    if _finite_scales.get(w_scale) == stamp:
        return
    if w_scale.is_cuda and torch.cuda.is_current_stream_capturing():
        # A host read is illegal during capture. This is a value check, not a memory-safety one:
        # a non-finite scale only makes its output column non-finite. Run the op once before
        # capturing (the usual warm-up) to have the check done.
        return
    bad = ~torch.isfinite(w_scale)
    if bool(bad.any()):
        n = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"{op}: w_scale[{n}] is {w_scale[n].item()}; scales must be finite")
    _finite_scales[w_scale] = stamp


# Rows from which the sm_90a CUTLASS GEMM (opt-in "int8_sm90") takes int8_linear: its 128 x 128
# tiles (two 64-row wgmma warp groups) waste most of their work below that.
INT8_SM90_MIN_M = 64


def _int8_sm90_fits(x: Tensor, w_q: Tensor) -> bool:
    """Whether _int8_gemm_sm90 can take this call: an sm_90 device and TMA's 16-byte alignment of the
    rows and bases (K % 16 == 0, N * sizeof(x.dtype) % 16 == 0). Host-side only: no device sync."""
    K, N = x.shape[1], w_q.shape[0]
    return (K > 0 and K % 16 == 0 and (N * x.element_size()) % 16 == 0 and w_q.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(x.device) == (9, 0))


def _int8_linear_cuda(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    # The same checks, in the same words, as the CPU op (csrc/cpu/int8_linear.cpp) and the fake.
    check_int8_linear_args(x, w_q, w_scale, bias)
    _check_finite_scale(w_scale, "int8_linear")
    M, N = x.shape[0], w_q.shape[0]
    if M == 0 or N == 0:
        return x.new_empty((M, N))
    if bias is not None and bias.dtype not in _FLOATS:
        bias = bias.to(torch.float32)  # float64: the kernel reads bias in 16 or 32 bits
    if bias is not None:
        bias = bias.contiguous()
    if M <= 16 and opted_in("int8_decode") and has_cuda_kernel("_int8_linear_decode"):
        # csrc/cuda/int8_decode.cu: quantization fused into a split-K GEMV, one launch. The same
        # q, scales and epilogue; its float64 branch is taken per element, not per tile.
        return torch.ops.torchslim._int8_linear_decode.default(x, w_q, w_scale, bias)
    if (M >= INT8_SM90_MIN_M and opted_in("int8_sm90") and has_cuda_kernel("_int8_gemm_sm90")
            and _int8_sm90_fits(x, w_q)):
        # csrc/cuda/int8_gemm_sm90.cu: the same epilogue as the Triton kernel, except that its float64
        # branch (scale products beyond float32's normal range) is taken per element, not per tile.
        q, x_scale = torch.ops.torchslim.quantize_per_token.default(x)
        return torch.ops.torchslim._int8_gemm_sm90.default(q, x_scale, w_q, w_scale, bias, x.dtype)
    q, x_scale = torch.ops.torchslim.quantize_per_token.default(x)
    from torchslim.triton_kernels.int8_linear import int8_matmul_dequant

    return int8_matmul_dequant(q, x_scale, w_q, w_scale, bias, x.dtype)


def triton_available() -> bool:
    """Whether Triton is installed (not imported: that is deferred to the first CUDA call)."""
    return importlib.util.find_spec("triton") is not None


if triton_available():
    # register_kernel accepts ops whose schema comes from C++ (TORCH_LIBRARY) and, unlike
    # torch.library.impl, wraps the kernel in torch._disable_dynamo: Dynamo keeps the op opaque
    # (it has a fake in ops.py) and never tries to trace the Triton launcher.
    torch.library.register_kernel("torchslim::int8_linear", "cuda", _int8_linear_cuda)


def _int8_linear_packed_cuda(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    # Reached when any argument is a CUDA tensor: name the mixed devices, or the missing kernel.
    check_int8_linear_packed_args(x, w_packed, w_scale, bias)
    raise RuntimeError("int8_linear_packed: the packed layout is the CPU kernels'; on cuda call int8_linear "
                       "with the (N, K) int8 weight (Int8Linear does this by itself)")


torch.library.register_kernel("torchslim::int8_linear_packed", "cuda", _int8_linear_packed_cuda)


# From this many rows on, 2:4 runs on the sparse tensor cores through cuSPARSELt
# (_sparse24_cusparselt.py). Measured on the H200 (bench/results/h200/sparse24_linear_gpu.json, bf16):
# cuSPARSELt through torch costs ~0.6 ms a call whatever M (its plan is built per call), so it loses
# to the Triton kernel up to M = 2048 (4096x4096: 650 vs 454 us) and wins from M = 4096 (4096^3:
# 370 vs 863 us; 8192^3: 1619 vs 6840 us). Both are still slower than dense cuBLAS there (see README).
SPARSE24_CUSPARSELT_MIN_M = 4096


def _sparse24_linear_cuda(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    # The same checks, in the same words, as the CPU op (csrc/cpu/sparse24_linear.cpp) and the fake.
    # The metadata's nibbles are not checked per call (a device sync): Sparse24Linear checks them when
    # it is built or loaded, and the kernel is memory-safe for any bits (triton_kernels/sparse24_linear.py).
    check_sparse24_linear_args(x, values, meta, bias)
    M, N = x.shape[0], values.shape[0]
    if M == 0 or N == 0:
        return x.new_empty((M, N))
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()  # as F.linear adds it: rounded to x's dtype first
    if M >= SPARSE24_CUSPARSELT_MIN_M:
        from . import _sparse24_cusparselt

        y = _sparse24_cusparselt.sparse24_linear(x, values, meta, bias)
        if y is not None:
            return y
    from torchslim.triton_kernels.sparse24_linear import sparse24_matmul

    return sparse24_matmul(x, values, meta, bias)


if triton_available():
    torch.library.register_kernel("torchslim::sparse24_linear", "cuda", _sparse24_linear_cuda)


def _lowrank_linear_cuda(x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
    # The same checks, in the same words, as the CPU op and the fake.
    check_lowrank_linear_args(x, V, U, bias)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()  # as F.linear adds it: rounded to x's dtype first
    if not opted_in("lowrank_fused"):
        # Two cuBLAS GEMMs, which are the op's semantics by definition (t rounded to x's dtype as
        # F.linear rounds it; the bias added in the second GEMM's float32 epilogue). On the H200 they
        # ran 1.7-30x faster than the fused Triton kernel at every measured shape (README, GPU).
        return F.linear(F.linear(x, V), U, bias)
    from torchslim.triton_kernels.lowrank_linear import MAX_R, lowrank_matmul

    # The kernel keeps the (rows, r) intermediate on chip, which bounds r (the CPU op has no bound).
    r, max_r = V.shape[0], MAX_R[x.dtype]
    torch._check(r <= max_r, lambda: f"lowrank_linear: r={r} exceeds {max_r}, the largest rank of the fused "
                                     f"CUDA kernel for {x.dtype} x (its intermediate must stay on chip)")
    return lowrank_matmul(x, V, U, bias)


# The default path needs no Triton (only the opt-in fused kernel does).
torch.library.register_kernel("torchslim::lowrank_linear", "cuda", _lowrank_linear_cuda)
