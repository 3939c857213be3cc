"""Plain-PyTorch references of every torchslim op: the tests' oracle.

They follow the kernels' definitions to the bit where the kernels are exact (quantized values,
int32 accumulators) and compute everything else in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import csr as csr_format
from .formats import sparse24 as sparse24_format


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Reference of ops.quantize_per_token (bit-exact). x: (M, K) float -> (q int8, scale float32)."""
    xf = x.float()
    absmax = xf.abs().amax(dim=1) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    finite = torch.isfinite(xf).all(dim=1)
    # Quotients in float64 then rounded once to float32 equal the correctly rounded float32
    # quotients the kernels compute (53 >= 2 * 24 + 2 bits, so the double rounding is harmless).
    a64 = absmax.double()
    scale = (a64 / 127).float()
    inv = (127 / a64).float()
    zero = torch.isinf(inv)  # absmax 0, or below 127 / FLT_MAX: the row counts as zeros
    q = torch.round(xf * inv[:, None]).clamp(-127, 127)
    ok = (finite & ~zero)[:, None]
    q = torch.where(ok, q, torch.zeros_like(q)).to(torch.int8)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    scale = torch.where(zero & finite, torch.zeros_like(scale), scale)
    return q, scale


def int8_accumulate(q: Tensor, w_q: Tensor) -> Tensor:
    """The exact integer product q (M, K) @ w_q (N, K).T as int64."""
    return q.long() @ w_q.long().T


def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference of ops.int8_linear in float64: (M, N)."""
    q, s = quantize_per_token(x)
    out = int8_accumulate(q, w_q).double() * (s.double()[:, None] * w_scale.double()[None, :])
    if bias is not None:
        out = out + bias.double()
    return out


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference of ops.sparse24_linear in float64: (M, N). The bias is rounded to x.dtype first,
    as the op (and F.linear) adds it."""
    w = sparse24_format.unpack(values, meta, x.shape[1]).double()
    out = x.double() @ w.T
    if bias is not None:
        out = out + bias.to(x.dtype).double()
    return out


def csr_linear(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference of ops.csr_linear in float64: (M, N), summing over the stored entries only (an
    Inf or NaN of x reaches only the outputs of rows that store a value in its column). The bias is
    rounded to x.dtype first, as the op (and F.linear) adds it."""
    problems = csr_format.check(crow, col, values, x.shape[1])
    if problems:
        raise ValueError("reference.csr_linear: " + "; ".join(problems))
    N, nnz = crow.shape[0] - 1, values.shape[0]
    out = torch.zeros(x.shape[0], N, dtype=torch.float64, device=x.device)
    out.index_add_(1, csr_format.row_indices(crow, nnz), x.double()[:, col.long()] * values.double()[None, :])
    if bias is not None:
        out = out + bias.to(x.dtype).double()
    return out


def lowrank_linear(x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference of ops.lowrank_linear in float64: (M, N). The intermediate x @ V.T is rounded to
    x.dtype, as the op rounds it; the bias is rounded to x.dtype first, as the op (and F.linear)
    adds it."""
    t = (x.double() @ V.double().T).to(x.dtype).double()
    out = t @ U.double().T
    if bias is not None:
        out = out + bias.to(x.dtype).double()
    return out
