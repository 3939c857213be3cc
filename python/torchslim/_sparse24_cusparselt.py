"""2:4 on the GPU's sparse tensor cores for large M: cuSPARSELt through torch (sparse24_linear on CUDA takes
it from M = SPARSE24_CUSPARSELT_MIN_M rows, where the H200 run measured it faster than the Triton kernel).

Why cuSPARSELt and not a CUTLASS sm90 sparse GEMM: torch's CUDA wheels already link cuSPARSELt (the
registry package nvidia-cusparselt-cu13) and expose it as torch._cslt_compress / torch._cslt_sparse_mm,
so it needs no build dependency, no template instantiation in CI and no kernel of our own that has never
run; it picks its own tiles per shape. Its compressed layout is private to the library, so the weight is
converted once per (values, meta) pair and cached, as the int8 path caches its scale checks: the
canonical (values, meta) stay what the module stores and saves.

Semantics as the Triton kernel: float32 accumulation of the 16-bit products, the bias (already rounded to
x's dtype by the caller) added in float32, one rounding to x's dtype. float32 x never comes here: the
library multiplies float32 through TF32, which is not the op's contract.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .formats import sparse24

# Shape rules of cuSPARSELt's 16-bit 2:4 matrices as torch states them for its semi-structured tensors
# (torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS): the sparse weight's
# rows a multiple of 32 and columns of 64; the dense operand's columns (x's rows, M) a multiple of 8.
_ROWS, _COLS, _M_MULTIPLE = 32, 64, 8

# values tensor -> (stamp, the library's compressed weight). The stamp (versions and storage addresses
# of values and meta) makes an in-place change of either rebuild the compressed copy.
_compressed: WeakIdKeyDictionary = WeakIdKeyDictionary()


def usable(x: Tensor, values: Tensor) -> bool:
    """Whether this path takes the call: a 16-bit x on a GPU with cuSPARSELt, and a weight whose shape
    the library accepts as it is (N % 32 == 0, K % 64 == 0)."""
    N, K = values.shape[0], x.shape[1]
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and N % _ROWS == 0 and K % _COLS == 0
            and torch.backends.cusparselt.is_available())


def _stamp(values: Tensor, meta: Tensor) -> tuple:
    def one(t):
        return (None if t.is_inference() else t._version, t.data_ptr())
    return one(values) + one(meta)


def compressed_weight(values: Tensor, meta: Tensor, K: int) -> Tensor | None:
    """The library's compressed copy of the (N, K) weight, built once per weight; None while a CUDA
    graph is being captured and no copy exists yet (building one reads the metadata on the host)."""
    stamp = _stamp(values, meta)
    hit = _compressed.get(values)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if torch.cuda.is_current_stream_capturing():
        return None
    dense = sparse24.unpack(values, meta, K)  # validates the pair: a malformed one raises here
    packed = torch._cslt_compress(dense)
    _compressed[values] = (stamp, packed)
    return packed


def sparse24_linear(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor | None:
    """y = x W^T + bias on cuSPARSELt, or None where this path cannot take the call (the caller then
    runs the Triton kernel). Arguments are checked by the caller; bias has x's dtype."""
    if not usable(x, values):
        return None
    packed = compressed_weight(values, meta, x.shape[1])
    if packed is None:
        return None
    M = x.shape[0]
    pad = (-M) % _M_MULTIPLE
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    # The library computes W @ x^T (N, M); transpose_result writes it as (M, N) directly.
    y = torch._cslt_sparse_mm(packed, xp.t(), bias=bias, transpose_result=True)
    return y[:M] if pad else y
