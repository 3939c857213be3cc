"""Registers the Triton kernels as the CUDA implementations of torchslim ops.

Done only where Triton is installed; without it a CUDA call raises NotImplementedError naming
the missing kernel (torch's dispatcher error), never a silent fallback.

Registration only needs to know that Triton exists (a file-system lookup): Triton itself and the
kernel module are imported on the first CUDA call, so ``import torchslim`` stays fast and works on
machines without a GPU. If Triton is installed but broken, that first call raises the ImportError.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .ops import _FLOATS

# Largest K whose int32 sum of products of values in [-127, 127] cannot overflow (the kernel
# module holds the same constant; repeated here so checking needs no Triton import).
_MAX_K = (2**31 - 1) // (127 * 127)

# w_scale tensors already seen to be finite, with the (version, data_ptr) they had then. Checking
# finiteness reads the tensor back to the host, a device sync; weights do not change between
# calls, so the sync happens once per weight instead of once per forward (which would also stall
# the CPU behind the GPU and forbid CUDA-graph capture of every later call).
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


def _check_int8_linear_args(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    # The same checks, in the same words, as the CPU op (csrc/cpu/int8_linear.cpp).
    op = "int8_linear"
    if x.dim() != 2:
        raise RuntimeError(f"{op}: x must be 2-D (M, K), got shape {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise RuntimeError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise RuntimeError(f"{op}: x must be contiguous")
    if w_q.device != x.device:
        raise RuntimeError(f"{op}: w_q must be on {x.device} like x, got {w_q.device}")
    if w_q.dim() != 2:
        raise RuntimeError(f"{op}: w_q must be 2-D (N, K), got shape {list(w_q.shape)}")
    if w_q.dtype != torch.int8:
        raise RuntimeError(f"{op}: w_q must be int8, got {w_q.dtype}")
    if not w_q.is_contiguous():
        raise RuntimeError(f"{op}: w_q must be contiguous")
    if w_q.shape[1] != x.shape[1]:
        raise RuntimeError(f"{op}: x has K={x.shape[1]} but w_q has K={w_q.shape[1]}")
    N = w_q.shape[0]
    if w_scale.device != x.device:
        raise RuntimeError(f"{op}: w_scale must be on {x.device} like x, got {w_scale.device}")
    if w_scale.dim() != 1 or w_scale.shape[0] != N:
        raise RuntimeError(f"{op}: w_scale must have shape ({N},), got {list(w_scale.shape)}")
    if w_scale.dtype != torch.float32:
        raise RuntimeError(f"{op}: w_scale must be float32, got {w_scale.dtype}")
    if not w_scale.is_contiguous():
        raise RuntimeError(f"{op}: w_scale must be contiguous")
    if bias is not None:
        if bias.device != x.device:
            raise RuntimeError(f"{op}: bias must be on {x.device} like x, got {bias.device}")
        if bias.dim() != 1 or bias.shape[0] != N:
            raise RuntimeError(f"{op}: bias must have shape ({N},), got {list(bias.shape)}")
        if not bias.is_floating_point():
            raise RuntimeError(f"{op}: bias must be floating point, got {bias.dtype}")
    if x.shape[1] > _MAX_K:
        raise RuntimeError(f"{op}: K={x.shape[1]} exceeds {_MAX_K}, beyond which the int32 accumulator "
                           "of the CUDA kernel can overflow")
    _check_finite_scale(w_scale, op)


def _int8_linear_cuda(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    _check_int8_linear_args(x, w_q, w_scale, bias)
    M, N = x.shape[0], w_q.shape[0]
    if M == 0 or N == 0:
        return x.new_empty((M, N))
    if bias is not None and bias.dtype not in _FLOATS:
        bias = bias.to(torch.float32)  # float64: the kernel reads bias in 16 or 32 bits
    if bias is not None:
        bias = bias.contiguous()
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
