"""Typed wrappers of the ``torch.ops.torchslim`` ops, each with its fake (meta) implementation
right under it. The schemas live in csrc/ops.cpp; the reference of every
op is in reference.py.

The autograd formulas are in _autograd.py; the wrappers call the ops through _autograd.call, which
skips the autograd kernel where nothing needs a gradient. The argument checks here are the Python twin of
the C++ checks (csrc/cpu/int8_linear.cpp), in the same words. The fakes run them, so a call that
mixes devices (meta included) fails as it would on a real device instead of returning an
uninitialized tensor; the Triton (CUDA) implementations run them too, before their value checks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import call
from .formats import csr as csr_format
from .formats import sparse24 as sparse24_format
from .formats.int8 import packed_shape

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# The largest K of the int8 ops on every device: the CPU kernels' int32 sums of q * (w + 128)
# stay exact up to here (|q| <= 127, w + 128 <= 255: 65536 * 32385 < 2**31).
MAX_K = 65536


# ---------------------------------------------------------------------------------------------
# argument checks shared by the fakes and the Triton implementations
# ---------------------------------------------------------------------------------------------
# torch._check raises RuntimeError(message()) like TORCH_CHECK, and under symbolic shapes it
# records a runtime assertion instead of specializing the graph on the shape. It costs ~1.7 us a call
# even for a plain True, and the CUDA implementations run ~20 checks per op call on the host: a
# condition that is the plain bool True (every check that passes on real tensors) returns at once
# (~0.15 us); anything else (False, a SymBool under tracing) goes to torch._check.
def _check(cond, message) -> None:
    if cond is True:
        return
    torch._check(cond, message)


def check_x(x: Tensor, op: str) -> None:
    _check(x.dim() == 2, lambda: f"{op}: x must be 2-D (M, K), got shape {list(x.shape)}")
    _check(x.dtype in _FLOATS, lambda: f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    _check(x.is_contiguous(), lambda: f"{op}: x must be contiguous")


def _check_device(t: Tensor, name: str, x: Tensor, op: str) -> None:
    _check(t.device == x.device, lambda: f"{op}: {name} must be on {x.device} like x, got {t.device}")


def _check_scale_and_bias(x: Tensor, w_scale: Tensor, bias: Tensor | None, N, op: str) -> None:
    _check_device(w_scale, "w_scale", x, op)
    _check(w_scale.dim() == 1 and w_scale.shape[0] == N,
           lambda: f"{op}: w_scale must have shape ({N},), got {list(w_scale.shape)}")
    _check(w_scale.dtype == torch.float32, lambda: f"{op}: w_scale must be float32, got {w_scale.dtype}")
    _check(w_scale.is_contiguous(), lambda: f"{op}: w_scale must be contiguous")
    if bias is not None:
        _check_device(bias, "bias", x, op)
        _check(bias.dim() == 1 and bias.shape[0] == N, lambda: f"{op}: bias must have shape ({N},), got {list(bias.shape)}")
        _check(bias.is_floating_point(), lambda: f"{op}: bias must be floating point, got {bias.dtype}")


def _check_w_q(w_q: Tensor, op: str) -> None:
    _check(w_q.dim() == 2, lambda: f"{op}: w_q must be 2-D (N, K), got shape {list(w_q.shape)}")
    _check(w_q.dtype == torch.int8, lambda: f"{op}: w_q must be int8, got {w_q.dtype}")
    _check(w_q.is_contiguous(), lambda: f"{op}: w_q must be contiguous")


def _check_k(K, op: str) -> None:
    _check(K <= MAX_K, lambda: f"{op}: K={K} exceeds {MAX_K}, beyond which the int32 accumulator can overflow")


def check_int8_linear_args(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    """Shapes, dtypes, devices and layouts of int8_linear's arguments (not the scales' values)."""
    op = "int8_linear"
    check_x(x, op)
    _check_device(w_q, "w_q", x, op)
    _check_w_q(w_q, op)
    _check(w_q.shape[1] == x.shape[1], lambda: f"{op}: x has K={x.shape[1]} but w_q has K={w_q.shape[1]}")
    _check_scale_and_bias(x, w_scale, bias, w_q.shape[0], op)
    _check_k(x.shape[1], op)


def check_int8_linear_packed_args(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Tensor | None) -> None:
    """int8_linear_packed's arguments, as far as shapes tell: the C++ op also reads the header."""
    op = "int8_linear_packed"
    check_x(x, op)
    _check(w_scale.dim() == 1, lambda: f"{op}: w_scale must be 1-D (N,), got shape {list(w_scale.shape)}")
    N, K = w_scale.shape[0], x.shape[1]
    _check_scale_and_bias(x, w_scale, bias, N, op)
    _check_packed(w_packed, N, K, x, op)
    _check_k(K, op)


def _check_packed(w_packed: Tensor, N, K, x: Tensor | None, op: str) -> None:
    if x is not None:
        _check_device(w_packed, "w_packed", x, op)
    _check(w_packed.dtype == torch.int8 and w_packed.dim() == 1 and w_packed.is_contiguous(),
           lambda: f"{op}: w_packed must be the contiguous 1-D int8 tensor int8_pack_weight returns, "
                   f"got {w_packed.dtype} of shape {list(w_packed.shape)}")
    _check(0 <= N < 2**31 and 0 <= K < 2**31, lambda: f"{op}: N and K must be in [0, 2**31), got N={N}, K={K}")
    expected = packed_shape(N, K)[0]
    _check(w_packed.shape[0] == expected,
           lambda: f"{op}: w_packed holds {w_packed.shape[0]} bytes, but a packed (N={N}, K={K}) weight holds {expected}")


def check_sparse24_linear_args(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> None:
    """Shapes, dtypes, devices and layouts of sparse24_linear's arguments (not the metadata's
    nibbles: the CPU kernels check those as they read them)."""
    op = "sparse24_linear"
    check_x(x, op)
    _check_device(values, "values", x, op)
    _check_device(meta, "meta", x, op)
    _check(values.dim() == 2, lambda: f"{op}: values must be 2-D (N, K_pad / 2), got shape {list(values.shape)}")
    _check(values.dtype == x.dtype, lambda: f"{op}: values must have x's dtype {x.dtype}, got {values.dtype}")
    _check(values.is_contiguous(), lambda: f"{op}: values must be contiguous")
    _check(meta.dtype == torch.int16, lambda: f"{op}: meta must be int16, got {meta.dtype}")
    _check(meta.is_contiguous(), lambda: f"{op}: meta must be contiguous")
    N, K = values.shape[0], x.shape[1]
    (_, half), (_, words) = sparse24_format.shapes(N, K)
    _check(values.shape[1] == half,
           lambda: f"{op}: values must have shape ({N}, {half}) for K={K}, got {list(values.shape)}")
    _check(meta.dim() == 2 and meta.shape[0] == N and meta.shape[1] == words,
           lambda: f"{op}: meta must have shape ({N}, {words}) for K={K}, got {list(meta.shape)}")
    if bias is not None:
        _check_device(bias, "bias", x, op)
        _check(bias.dim() == 1 and bias.shape[0] == N, lambda: f"{op}: bias must have shape ({N},), got {list(bias.shape)}")
        _check(bias.is_floating_point(), lambda: f"{op}: bias must be floating point, got {bias.dtype}")


def check_csr_linear_args(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None) -> None:
    """Shapes, dtypes, devices and layouts of csr_linear's arguments (not the row pointers' and
    columns' values: the CPU op checks those as it reads them)."""
    op = "csr_linear"
    check_x(x, op)
    for name, t in (("crow", crow), ("col", col), ("values", values)):
        _check_device(t, name, x, op)
        _check(t.dim() == 1, lambda: f"{op}: {name} must be 1-D, got shape {list(t.shape)}")
        _check(t.is_contiguous(), lambda: f"{op}: {name} must be contiguous")
    _check(crow.dtype == torch.int32, lambda: f"{op}: crow must be int32, got {crow.dtype}")
    _check(col.dtype in csr_format.INDEX_DTYPES, lambda: f"{op}: col must be int16 or int32, got {col.dtype}")
    _check(values.dtype == x.dtype, lambda: f"{op}: values must have x's dtype {x.dtype}, got {values.dtype}")
    _check(crow.shape[0] >= 1, lambda: f"{op}: crow must have N + 1 >= 1 entries, got 0")
    _check(col.shape[0] == values.shape[0],
           lambda: f"{op}: col and values must have one entry per stored value, got {col.shape[0]} and {values.shape[0]}")
    N = crow.shape[0] - 1
    if bias is not None:
        _check_device(bias, "bias", x, op)
        _check(bias.dim() == 1 and bias.shape[0] == N, lambda: f"{op}: bias must have shape ({N},), got {list(bias.shape)}")
        _check(bias.is_floating_point(), lambda: f"{op}: bias must be floating point, got {bias.dtype}")
    _check(x.shape[1] < 2**31, lambda: f"{op}: K must be below 2**31, got {x.shape[1]}")


def check_lowrank_linear_args(x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None) -> None:
    """Shapes, dtypes, devices and layouts of lowrank_linear's arguments."""
    op = "lowrank_linear"
    check_x(x, op)
    for name, t in (("V", V), ("U", U)):
        _check_device(t, name, x, op)
        _check(t.dim() == 2, lambda: f"{op}: {name} must be 2-D, got shape {list(t.shape)}")
        _check(t.dtype == x.dtype, lambda: f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        _check(t.is_contiguous(), lambda: f"{op}: {name} must be contiguous")
    K, r, N = x.shape[1], V.shape[0], U.shape[0]
    _check(V.shape[1] == K, lambda: f"{op}: V must have shape (r, {K}) for x of shape {list(x.shape)}, got {list(V.shape)}")
    _check(U.shape[1] == r, lambda: f"{op}: U must have shape (N, {r}) for V of shape {list(V.shape)}, got {list(U.shape)}")
    if bias is not None:
        _check_device(bias, "bias", x, op)
        _check(bias.dim() == 1 and bias.shape[0] == N, lambda: f"{op}: bias must have shape ({N},), got {list(bias.shape)}")
        _check(bias.is_floating_point(), lambda: f"{op}: bias must be floating point, got {bias.dtype}")


# ---------------------------------------------------------------------------------------------
# quantize_per_token
# ---------------------------------------------------------------------------------------------
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row INT8 quantization.

    x: (M, K) float32|bfloat16|float16, contiguous.
    Returns q: (M, K) int8 in [-127, 127] and scale: (M,) float32 with
    scale = absmax / 127 and q = round_half_even(x * (127 / absmax)). A row of zeros gets scale 0
    (so does a row whose absmax is below 127 / FLT_MAX ~ 3.7e-37, where 127 / absmax overflows);
    a row holding NaN or Inf gets scale NaN and q = 0.
    Differentiable w.r.t. x through scale (q is integer): d scale / dx is that of absmax / 127,
    shared evenly between tied maxima, and 0 on the rows whose scale is fixed (0 or NaN).
    """
    return call(torch.ops.torchslim.quantize_per_token.default, x)


@torch.library.register_fake("torchslim::quantize_per_token")
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    check_x(x, "quantize_per_token")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# the CPU packed weight
# ---------------------------------------------------------------------------------------------
def int8_pack_weight(w_q: Tensor) -> Tensor:
    """Packs w_q: (N, K) int8 into the CPU kernels' layout (formats/int8.py): a 1-D int8 tensor of
    packed_shape(N, K) whose header records N and K."""
    return torch.ops.torchslim.int8_pack_weight.default(w_q)


@torch.library.register_fake("torchslim::int8_pack_weight")
def _(w_q: Tensor) -> Tensor:
    _check_w_q(w_q, "int8_pack_weight")
    return w_q.new_empty(packed_shape(w_q.shape[0], w_q.shape[1]))


def int8_unpack_weight(w_packed: Tensor, N: int, K: int) -> Tensor:
    """Inverse of int8_pack_weight: the (N, K) int8 weight. N and K must be those in the header."""
    return torch.ops.torchslim.int8_unpack_weight.default(w_packed, N, K)


@torch.library.register_fake("torchslim::int8_unpack_weight")
def _(w_packed: Tensor, N: int, K: int) -> Tensor:
    op = "int8_unpack_weight"
    _check_packed(w_packed, N, K, None, op)
    return w_packed.new_empty((N, K))


# ---------------------------------------------------------------------------------------------
# int8_linear and int8_linear_packed
# ---------------------------------------------------------------------------------------------
def int8_linear(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """W8A8 linear: ``quantize_per_token(x) @ w_q.T`` accumulated in int32, then scaled by the
    activation and weight scales, plus bias, cast to x.dtype -- all fused in one kernel.

    x: (M, K) float32|bfloat16|float16, contiguous, K <= 65536; w_q: (N, K) int8; w_scale: (N,)
    float32 (finite); bias: (N,) floating point or None; all on x's device. Returns (M, N) in x.dtype.
    On CPU this packs w_q on every call: modules use int8_linear_packed with a weight packed once.
    Differentiable w.r.t. x (straight through the activation quantization: the gradient of
    x @ (w_q * w_scale[:, None]).T) and bias; w_q and w_scale are frozen.
    """
    return call(torch.ops.torchslim.int8_linear.default, x, w_q, w_scale, bias)


@torch.library.register_fake("torchslim::int8_linear")
def _(x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    check_int8_linear_args(x, w_q, w_scale, bias)
    return x.new_empty((x.shape[0], w_q.shape[0]))


def int8_linear_packed(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """int8_linear with the weight from int8_pack_weight (CPU only). N is w_scale's length; the
    packed weight's header must say this N and x's K.

    x: (M, K) float32|bfloat16|float16; w_packed: int8 of shape packed_shape(N, K);
    w_scale: (N,) float32; bias: (N,) or None. Returns (M, N) in x.dtype. Differentiable as int8_linear.
    """
    return call(torch.ops.torchslim.int8_linear_packed.default, x, w_packed, w_scale, bias)


@torch.library.register_fake("torchslim::int8_linear_packed")
def _(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    check_int8_linear_packed_args(x, w_packed, w_scale, bias)
    return x.new_empty((x.shape[0], w_scale.shape[0]))


# ---------------------------------------------------------------------------------------------
# sparse24_linear
# ---------------------------------------------------------------------------------------------
def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """2:4 sparse linear: ``x @ W.T + bias``, W the dense weight of the compressed pair
    (formats/sparse24.py), accumulated in float32 and rounded once to x.dtype.

    x: (M, K) float32|bfloat16|float16, contiguous; values: (N, K_pad / 2) in x.dtype; meta:
    (N, K_pad / 16) int16, K_pad = round_up(K, 16); bias: (N,) floating point (added in x.dtype, as
    F.linear does) or None; all on x's device. Returns (M, N) in x.dtype.
    Invalid metadata (a group whose positions are not two distinct increasing indices) raises on
    the CPU; on CUDA it is not checked per call (Sparse24Linear checks it when it is built or loaded).
    Differentiable w.r.t. x and bias; values and meta are a frozen weight.
    """
    return call(torch.ops.torchslim.sparse24_linear.default, x, values, meta, bias)


@torch.library.register_fake("torchslim::sparse24_linear")
def _(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    check_sparse24_linear_args(x, values, meta, bias)
    return x.new_empty((x.shape[0], values.shape[0]))


# ---------------------------------------------------------------------------------------------
# csr_linear
# ---------------------------------------------------------------------------------------------
def csr_linear(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor:
    """CSR sparse linear: ``x @ W.T + bias``, W (N, K) the CSR weight (formats/csr.py), accumulated
    in float32 and rounded once to x.dtype. Only stored entries are multiplied (as torch.sparse does).

    x: (M, K) float32|bfloat16|float16, contiguous; crow: (N + 1,) int32; col: (nnz,) int16|int32;
    values: (nnz,) in x.dtype; bias: (N,) floating point (added in x.dtype, as F.linear does) or
    None; all contiguous, on x's device. Returns (M, N) in x.dtype.
    A malformed CSR (row pointers not starting at 0, decreasing, or not ending at nnz; a column
    outside [0, K); columns not strictly increasing within a row) raises on the CPU. On CUDA the
    kernel never reads out of bounds whatever the indices hold, but does not check them per call
    (that would need a device sync): CSRLinear checks them when it is built or loaded.
    Differentiable w.r.t. x and bias; crow, col and values are a frozen weight.
    """
    return call(torch.ops.torchslim.csr_linear.default, x, crow, col, values, bias)


@torch.library.register_fake("torchslim::csr_linear")
def _(x: Tensor, crow: Tensor, col: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor:
    check_csr_linear_args(x, crow, col, values, bias)
    return x.new_empty((x.shape[0], crow.shape[0] - 1))


# ---------------------------------------------------------------------------------------------
# lowrank_linear
# ---------------------------------------------------------------------------------------------
def lowrank_linear(x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
    """Low-rank linear in one kernel: ``(x @ V.T) @ U.T + bias``. The intermediate t = x @ V.T
    (M, r) is accumulated in float32 and rounded to x.dtype (as two F.linear calls round it), and
    stays in registers / cache / shared memory: it is never written to memory. The output is
    accumulated in float32 and rounded once to x.dtype.

    x: (M, K) float32|bfloat16|float16, contiguous; V: (r, K) and U: (N, r) in x.dtype, contiguous;
    bias: (N,) floating point (added in x.dtype, as F.linear does) or None; all on x's device.
    Returns (M, N) in x.dtype. Differentiable w.r.t. x, V, U and bias. The CPU's AVX-512 BF16 and AMX
    kernels, like oneDNN's bf16 GEMMs, treat bfloat16 subnormals (below 1.2e-38) as zero.
    """
    return call(torch.ops.torchslim.lowrank_linear.default, x, V, U, bias)


@torch.library.register_fake("torchslim::lowrank_linear")
def _(x: Tensor, V: Tensor, U: Tensor, bias: Tensor | None = None) -> Tensor:
    check_lowrank_linear_args(x, V, U, bias)
    return x.new_empty((x.shape[0], U.shape[0]))
