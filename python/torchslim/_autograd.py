"""Autograd of the torchslim ops (torch.library.register_autograd), for every device.

The formulas live here, in Python, because the LibTorch Stable ABI that the compiled ops are built
on has no autograd API: a C++ autograd kernel would tie the extension to one torch release.

Cost, measured on torch 2.13 with one thread (tiny inputs): the Python autograd kernel adds ~3.7 us
to a call made with grad mode on when nothing needs a gradient (it checks, then redispatches) and
~16 us when something does. `call` below keeps the first case at ~0.8 us: where no input needs a
gradient it runs the op below the autograd keys (as the C++ kernels used to), and the wrappers in
ops.py and the nn modules call the ops through it.

Gradients:
  int8_linear(x, w_q, w_scale, bias), int8_linear_packed:  dx = (dy * w_scale) @ w_q in x's dtype
    (float32 for float16 x, whose range dy * w_scale underflows), straight through the activation
    quantization; dbias = sum_m dy. w_q is int8; a w_scale that requires grad is an error at backward.
    The packed weight is unpacked for the backward only (nothing is kept between calls).
  quantize_per_token(x) -> (q, scale):  d scale / dx of absmax / 127, shared by tied maxima, 0 on the
    rows whose scale is a constant (0 or NaN); q is integer (not differentiable).
  sparse24_linear(x, values, meta, bias), csr_linear(x, crow, col, values, bias):  dx = dy @ W in x's
    dtype, with the dense W rebuilt for this backward only; dbias = sum_m dy. The compressed weight is
    a frozen buffer: values that require grad are an error at backward, never a silent None.
  lowrank_linear(x, V, U, bias):  with t = x V^T and g = dy: dx = (g U) V, dV = (g U)^T x,
    dU = g^T t, dbias = sum_m g, in x's dtype (t is recomputed, not kept). The factors are ordinary
    dense tensors, so they can be fine-tuned.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import csr as csr_format
from .formats import sparse24 as sparse24_format

_below_autograd = torch._C._AutoDispatchBelowAutograd
_is_compiling = torch.compiler.is_compiling
_is_inference = torch.is_inference_mode_enabled
_grad_enabled = torch.is_grad_enabled


def call(op, *args):
    """op(*args), below the autograd keys where no tensor argument needs a gradient (or grad mode
    is off); through the registered autograd otherwise, and as it is under inference mode (which
    already skips autograd) and while torch.compile traces."""
    if _is_compiling() or _is_inference():
        return op(*args)
    if _grad_enabled():
        for a in args:
            if isinstance(a, Tensor) and a.requires_grad:
                return op(*args)
    with _below_autograd():
        return op(*args)


def _grad_bias(ctx, grad: Tensor, index: int) -> Tensor | None:
    """sum_m dy in the bias's dtype where the bias (input `index`) needs a gradient."""
    if ctx.bias_dtype is None or not ctx.needs_input_grad[index]:
        return None
    return grad.float().sum(0).to(ctx.bias_dtype)


def _frozen(ctx, index: int, op: str, name: str, what: str) -> None:
    if ctx.needs_input_grad[index]:
        raise RuntimeError(f"{op}: {name} requires grad, but {what}: this op has no gradient for it "
                           f"(call {name}.requires_grad_(False))")


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------
def _int8_setup(ctx, inputs, output) -> None:
    x, weight, w_scale, bias = inputs
    ctx.save_for_backward(weight, w_scale)
    ctx.x_dtype, ctx.K = x.dtype, x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int8_backward(ctx, grad: Tensor, packed: bool):
    op = "int8_linear_packed" if packed else "int8_linear"
    _frozen(ctx, 2, op, "w_scale", "int8 weights and their scales are frozen")
    weight, w_scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        compute = torch.float32 if ctx.x_dtype == torch.float16 else ctx.x_dtype
        w_q = torch.ops.torchslim.int8_unpack_weight.default(weight, w_scale.shape[0], ctx.K) if packed else weight
        grad_x = torch.mm((grad.float() * w_scale).to(compute), w_q.to(compute)).to(ctx.x_dtype)
    return grad_x, None, None, _grad_bias(ctx, grad, 3)


torch.library.register_autograd("torchslim::int8_linear", lambda ctx, g: _int8_backward(ctx, g, False),
                                setup_context=_int8_setup)
torch.library.register_autograd("torchslim::int8_linear_packed", lambda ctx, g: _int8_backward(ctx, g, True),
                                setup_context=_int8_setup)


def _quantize_setup(ctx, inputs, output) -> None:
    (x,) = inputs
    q, scale = output
    ctx.mark_non_differentiable(q)
    ctx.save_for_backward(x, scale)


def _quantize_backward(ctx, grad_q: Tensor, grad_scale: Tensor):
    x, scale = ctx.saved_tensors
    if x.shape[1] == 0:  # no elements, scale 0: nothing depends on x
        return torch.zeros_like(x)
    xf = x.float()
    a = xf.abs()
    ties = (a == a.amax(1, keepdim=True)).float()
    share = ties / ties.sum(1, keepdim=True).clamp_min(1)
    live = (scale > 0).unsqueeze(1)  # zero and NaN scales are constants of x
    g = grad_scale.unsqueeze(1) / 127 * xf.sign() * share
    return torch.where(live, g, torch.zeros_like(g)).to(x.dtype)


torch.library.register_autograd("torchslim::quantize_per_token", _quantize_backward, setup_context=_quantize_setup)


# ---------------------------------------------------------------------------------------------
# sparse24 and csr: dx = dy @ W with W rebuilt for the backward only
# ---------------------------------------------------------------------------------------------
def _sparse24_setup(ctx, inputs, output) -> None:
    x, values, meta, bias = inputs
    ctx.save_for_backward(values, meta)
    ctx.K = x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sparse24_backward(ctx, grad: Tensor):
    _frozen(ctx, 1, "sparse24_linear", "values", "the 2:4 weight is a frozen buffer")
    values, meta = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:  # as dense nn.Linear's backward: one GEMM in x's dtype
        grad_x = torch.mm(grad, sparse24_format.unpack(values, meta, ctx.K, validate=False))
    return grad_x, None, None, _grad_bias(ctx, grad, 3)


torch.library.register_autograd("torchslim::sparse24_linear", _sparse24_backward, setup_context=_sparse24_setup)


def _csr_setup(ctx, inputs, output) -> None:
    x, crow, col, values, bias = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.K = x.shape[1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _csr_backward(ctx, grad: Tensor):
    _frozen(ctx, 3, "csr_linear", "values", "the CSR weight is a frozen buffer")
    crow, col, values = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:  # the forward checked the CSR (CPU); index_put bounds every index
        grad_x = torch.mm(grad, csr_format.unpack(crow, col, values, ctx.K, validate=False))
    return grad_x, None, None, None, _grad_bias(ctx, grad, 4)


torch.library.register_autograd("torchslim::csr_linear", _csr_backward, setup_context=_csr_setup)


# ---------------------------------------------------------------------------------------------
# lowrank
# ---------------------------------------------------------------------------------------------
def _lowrank_setup(ctx, inputs, output) -> None:
    x, V, U, bias = inputs
    ctx.save_for_backward(x, V, U)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lowrank_backward(ctx, grad: Tensor):
    x, V, U = ctx.saved_tensors
    g = grad.to(x.dtype)
    grad_x = grad_v = grad_u = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        gu = torch.mm(g, U)  # (M, r)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(gu, V)
        if ctx.needs_input_grad[1]:
            grad_v = torch.mm(gu.t(), x)
    if ctx.needs_input_grad[2]:
        grad_u = torch.mm(g.t(), torch.mm(x, V.t()))
    return grad_x, grad_v, grad_u, _grad_bias(ctx, grad, 3)


torch.library.register_autograd("torchslim::lowrank_linear", _lowrank_backward, setup_context=_lowrank_setup)
