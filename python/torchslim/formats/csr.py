"""CSR (compressed sparse row) weight format: the one place that defines it.

A weight W (N, K) with nnz stored entries is three 1-D tensors:

- ``crow`` (N + 1,) int32: row n's entries are positions ``crow[n] .. crow[n + 1] - 1`` of col and
  values; ``crow[0] == 0``, never decreasing, ``crow[N] == nnz`` (so nnz < 2**31).
- ``col`` (nnz,): the column of each entry, in ``[0, K)``, strictly increasing within a row (sorted,
  no duplicates). int16 when K <= 32768 (columns up to 32767: half the index bytes, which at M = 1
  are half of what a kernel reads besides the values), int32 otherwise: ``index_dtype(K)``.
- ``values`` (nnz,) in the compute dtype (float32, bfloat16 or float16).

Entries not stored are zero. Stored zeros are allowed (``pack`` stores only non-zeros). The kernels
multiply stored entries only, as ``torch.sparse`` does: an Inf or NaN in x reaches the outputs of the
rows that store a value in its column, not every output as in a dense product (0 * Inf = NaN).

``check`` lists what is wrong with an untrusted triple (a checkpoint, a hand-built CSR); the CPU op
checks the same invariants as it reads them, so a malformed CSR raises rather than reading out of
bounds.
"""
from __future__ import annotations

import torch
from torch import Tensor

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int16, torch.int32)
# The widest K whose columns an int16 holds (0 .. 32767).
INT16_MAX_K = 32768
MAX_NNZ = 2**31 - 1


def index_dtype(K: int) -> torch.dtype:
    """The column index dtype of an (N, K) weight: int16 when K <= 32768, else int32."""
    return torch.int16 if K <= INT16_MAX_K else torch.int32


def pack(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The CSR (crow, col, values) of w (N, K) float32|bfloat16|float16: its non-zeros, row by
    row, columns increasing; col in index_dtype(K), values in w.dtype.
    unpack(*pack(w), K) == w."""
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"csr.pack: w must be a 2-D tensor (N, K), got {getattr(w, 'shape', type(w).__name__)}")
    if w.dtype not in VALUE_DTYPES:
        raise ValueError(f"csr.pack: w must be float32, bfloat16 or float16, got {w.dtype}")
    if w.is_meta:
        raise ValueError("csr.pack: w is on the meta device and has no values to compress")
    N, K = w.shape
    if K > 2**31 - 1:
        raise ValueError(f"csr.pack: K={K} exceeds the int32 column index")
    w = w.detach()
    nonzero = w != 0
    counts = nonzero.sum(1, dtype=torch.int64)
    nnz = int(counts.sum())
    if nnz > MAX_NNZ:
        raise ValueError(f"csr.pack: w has {nnz} non-zeros; the int32 row pointers hold at most {MAX_NNZ}")
    crow = torch.zeros(N + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(counts, 0, out=crow[1:])
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major order: rows, then increasing columns
    return crow.to(torch.int32), cols.to(index_dtype(K)), w[rows, cols].contiguous()


def row_indices(crow: Tensor, nnz: int) -> Tensor:
    """The row of every entry, (nnz,) int64, from well-formed row pointers (no data-dependent shape:
    traceable)."""
    return torch.searchsorted(crow.to(torch.int64), torch.arange(nnz, device=crow.device), right=True) - 1


def unpack(crow: Tensor, col: Tensor, values: Tensor, K: int, validate: bool = True) -> Tensor:
    """The dense (N, K) weight of a CSR triple, N = crow.numel() - 1, in values' dtype. The triple is
    validated first unless validate=False (for triples checked before; then traceable)."""
    if validate:
        problems = check(crow, col, values, K)
        if problems:
            raise ValueError("csr.unpack: " + "; ".join(problems))
    N = crow.shape[0] - 1
    dense = values.new_zeros(N, K)
    dense.index_put_((row_indices(crow, values.shape[0]), col.to(torch.int64)), values, accumulate=True)
    return dense


def check(crow: Tensor, col: Tensor, values: Tensor, K: int, N: int | None = None) -> list[str]:
    """What is wrong with (crow, col, values) as the CSR of an (N, K) weight (N = crow.numel() - 1
    unless given): dtypes, shapes, row pointers, column range and order. Empty when valid."""
    if not all(isinstance(t, Tensor) for t in (crow, col, values)):
        return ["crow, col and values must be tensors"]
    problems = []
    if crow.dtype != torch.int32:
        problems.append(f"crow must be int32, got {crow.dtype}")
    if col.dtype not in INDEX_DTYPES:
        problems.append(f"col must be int16 or int32, got {col.dtype}")
    if values.dtype not in VALUE_DTYPES:
        problems.append(f"values must be float32, bfloat16 or float16, got {values.dtype}")
    for name, t in (("crow", crow), ("col", col), ("values", values)):
        if t.dim() != 1:
            problems.append(f"{name} must be 1-D, got shape {list(t.shape)}")
    if problems:
        return problems
    if N is not None and crow.shape[0] != N + 1:
        problems.append(f"crow must have {N + 1} entries (N + 1, N={N}), got {crow.shape[0]}")
    if crow.shape[0] == 0:
        problems.append("crow must have N + 1 >= 1 entries, got 0")
    if col.shape[0] != values.shape[0]:
        problems.append(f"col and values must have one entry per stored value, got {col.shape[0]} and {values.shape[0]}")
    if problems or crow.is_meta or col.is_meta:
        return problems
    bad = structure_problem(crow, col, K)
    return [bad] if bad else []


def structure_problem(crow: Tensor, col: Tensor, K: int) -> str | None:
    """The first violation of the row pointer and column invariants, described, or None. The words
    are those of the CPU op's checks."""
    nnz = col.shape[0]
    c = crow.to(torch.int64)
    if int(c[0]) != 0:
        return f"crow[0] must be 0, got {int(c[0])}"
    drop = (c[1:] < c[:-1]).nonzero()
    if drop.numel():
        n = int(drop[0])
        return f"crow must never decrease: crow[{n + 1}] = {int(c[n + 1])} < crow[{n}] = {int(c[n])}"
    if int(c[-1]) != nnz:
        return f"crow[N] must equal the number of stored values {nnz}, got {int(c[-1])}"
    # The first bad entry in storage order (the CPU op's order), out of range or out of order.
    cols = col.to(torch.int64)
    bad = (cols < 0) | (cols >= K)
    if nnz > 1:
        starts = torch.zeros(nnz, dtype=torch.bool, device=col.device)
        first = c[:-1]
        starts[first[first < nnz]] = True  # the first entry of every non-empty row
        bad[1:] |= (cols[1:] <= cols[:-1]) & ~starts[1:]
    where = bad.nonzero()
    if where.numel():
        j = int(where[0])
        row = int(row_indices(crow, nnz)[j])
        if not 0 <= int(cols[j]) < K:
            return f"col[{j}] = {int(cols[j])} (row {row}) is outside [0, {K})"
        return (f"col must increase strictly within a row: row {row} has col[{j - 1}] = {int(cols[j - 1])} then "
                f"col[{j}] = {int(cols[j])}")
    return None
