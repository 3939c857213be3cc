"""Typed wrappers of the ``torch.ops.torchslim`` ops, each with its fake (meta) implementation
right under it. The schemas live in csrc/ops.cpp; the reference of every op is in reference.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_x(x: Tensor, op: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row INT8 quantization.

    x: (M, K) float32|bfloat16|float16, contiguous.
    Returns q: (M, K) int8 in [-127, 127] and scale: (M,) float32 with
    scale = absmax / 127 and q = round_half_even(x * (127 / absmax)). A row of zeros gets scale 0
    (so does a row whose absmax is below 127 / FLT_MAX ~ 3.7e-37, where 127 / absmax overflows);
    a row holding NaN or Inf gets scale NaN and q = 0.
    """
    return torch.ops.torchslim.quantize_per_token.default(x)


@torch.library.register_fake("torchslim::quantize_per_token")
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_x(x, "quantize_per_token")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


def int8_pack_weight(w_q: Tensor) -> Tensor:
    """Packs w_q: (N, K) int8 into the CPU kernels' layout (see formats/int8.py): an int8 tensor of
    shape (ceil(N / 16), 16 * round_up(K, 64) + 64)."""
    return torch.ops.torchslim.int8_pack_weight.default(w_q)


@torch.library.register_fake("torchslim::int8_pack_weight")
def _(w_q: Tensor) -> Tensor:
    from .formats.int8 import packed_shape

    torch._check(w_q.dim() == 2 and w_q.dtype == torch.int8, lambda: "int8_pack_weight: w_q must be (N, K) int8")
    return w_q.new_empty(packed_shape(w_q.shape[0], w_q.shape[1]))


def int8_unpack_weight(w_packed: Tensor, N: int, K: int) -> Tensor:
    """Inverse of int8_pack_weight: returns the (N, K) int8 weight."""
    return torch.ops.torchslim.int8_unpack_weight.default(w_packed, N, K)


@torch.library.register_fake("torchslim::int8_unpack_weight")
def _(w_packed: Tensor, N: int, K: int) -> Tensor:
    return w_packed.new_empty((N, K))


def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """W8A8 linear: ``quantize_per_token(x) @ w_q.T`` accumulated in int32, then scaled by the
    activation and weight scales, plus bias, cast to x.dtype -- all fused in one kernel.

    x: (M, K) float32|bfloat16|float16, contiguous; w_q: (N, K) int8; w_scale: (N,) float32
    (finite); bias: (N,) floating point or None. Returns (M, N) in x.dtype.
    On CPU this packs w_q on every call: modules use int8_linear_packed with a weight packed once.
    """
    return torch.ops.torchslim.int8_linear.default(x, w_q, w_scale, bias)


@torch.library.register_fake("torchslim::int8_linear")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    _check_x(x, "int8_linear")
    torch._check(w_q.dim() == 2 and w_q.dtype == torch.int8, lambda: "int8_linear: w_q must be (N, K) int8")
    torch._check(w_q.shape[1] == x.shape[1], lambda: f"int8_linear: x has K={x.shape[1]}, w_q has K={w_q.shape[1]}")
    return x.new_empty((x.shape[0], w_q.shape[0]))


def int8_linear_packed(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """int8_linear with the weight from int8_pack_weight (CPU). N is w_scale's length.

    x: (M, K) float32|bfloat16|float16; w_packed: int8 of shape packed_shape(N, K);
    w_scale: (N,) float32; bias: (N,) or None. Returns (M, N) in x.dtype.
    """
    return torch.ops.torchslim.int8_linear_packed.default(x, w_packed, w_scale, bias)


@torch.library.register_fake("torchslim::int8_linear_packed")
def _(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    _check_x(x, "int8_linear_packed")
    torch._check(w_scale.dim() == 1, lambda: "int8_linear_packed: w_scale must be 1-D (N,)")
    return x.new_empty((x.shape[0], w_scale.shape[0]))
