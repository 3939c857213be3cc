"""2:4 semi-structured sparse weight format: the one place that defines it.

A weight W (N, K) is 2:4 when every group of four consecutive elements of a row (columns
4g .. 4g + 3) holds at most two non-zeros. Its compressed form is two tensors:

- ``values`` (N, K_pad / 2), in the compute dtype (float32, bfloat16 or float16): the two kept
  elements of each group, in column order. A group with fewer than two non-zeros keeps zeros.
- ``meta`` (N, K_pad / 16) int16: 4 bits per group, four groups per int16 word, group ``4w + j``
  in bits ``4j .. 4j + 3`` of word ``w`` (little-endian nibbles). Each nibble holds the in-group
  positions of the two kept values: bits 0-1 the first (``i0``), bits 2-3 the second (``i1``),
  with ``i0 < i1``. So a nibble is one of 0x4 (0, 1), 0x8 (0, 2), 0xC (0, 3), 0x9 (1, 2),
  0xD (1, 3), 0xE (2, 3); every other nibble is invalid (a repeated or decreasing position).

``K_pad = round_up(K, 16)``: one meta word covers 16 columns. A K that is not a multiple of 16 is
padded with zero columns, whose groups are ordinary groups (zero values, valid positions); the
kernels treat x as zero beyond its K columns, so what the padding holds never reaches an output.

Why this order: it is the metadata of the PTX sparse tensor-core instruction ``mma.sp`` for 16-bit
types (two 2-bit indices per group of four, increasing, the first in the low bits; the six valid
nibbles above are the ones PTX allows) and the row-major metadata that CUTLASS's sm80/sm90 sparse
GEMMs (and torch's ``to_sparse_semi_structured``) build before they interleave it: the
tensor-core layout is a permutation of these int16 words, which a GPU kernel applies once when it
lays the weight out, like the CPU int8 packing. The CPU and Triton kernels read this form as it is.
"""
from __future__ import annotations

import torch
from torch import Tensor

GROUP = 4               # elements per group, of which at most two are non-zero
KEPT = 2                # values stored per group
GROUPS_PER_WORD = 4     # 4-bit nibbles per int16 meta word
COLUMNS_PER_WORD = GROUP * GROUPS_PER_WORD  # 16
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The six valid nibbles, (i0, i1) -> i0 | i1 << 2.
VALID_NIBBLES = tuple(i0 | i1 << 2 for i0 in range(4) for i1 in range(i0 + 1, 4))


def padded_k(K: int) -> int:
    """The number of columns the compressed form covers: K rounded up to a multiple of 16."""
    return -(-K // COLUMNS_PER_WORD) * COLUMNS_PER_WORD


def shapes(N: int, K: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of (values, meta) for an (N, K) weight."""
    k_pad = padded_k(K)
    return (N, k_pad // 2), (N, k_pad // COLUMNS_PER_WORD)


def _groups(w: Tensor) -> Tensor:
    """w (N, K) zero-padded to K_pad columns, as (N, K_pad / 4, 4) groups."""
    N, K = w.shape
    k_pad = padded_k(K)
    return torch.nn.functional.pad(w, (0, k_pad - K)).reshape(N, k_pad // GROUP, GROUP)


def is_24(w: Tensor) -> bool:
    """Whether every group of four along K of w (N, K) holds at most two non-zeros."""
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"sparse24.is_24: w must be a 2-D tensor (N, K), got {getattr(w, 'shape', type(w).__name__)}")
    return bool(((_groups(w) != 0).sum(-1) <= KEPT).all())


def pack(w: Tensor) -> tuple[Tensor, Tensor]:
    """Compresses a 2:4 weight w (N, K) float32|bfloat16|float16 into (values, meta).

    Raises ValueError naming the first group with more than two non-zeros (prune first:
    compress.prune_24). A group with fewer keeps its non-zeros and the lowest zero positions.
    pack(unpack(values, meta, K)) == (values, meta) for every canonical pair, and
    unpack(*pack(w), K) == w.
    """
    if w.dim() != 2:
        raise ValueError(f"sparse24.pack: w must be 2-D (N, K), got shape {tuple(w.shape)}")
    if w.dtype not in VALUE_DTYPES:
        raise ValueError(f"sparse24.pack: w must be float32, bfloat16 or float16, got {w.dtype}")
    if w.is_meta:
        raise ValueError("sparse24.pack: w is on the meta device and has no values to compress")
    N, K = w.shape
    g = _groups(w.detach())
    nonzero = g != 0
    over = nonzero.sum(-1) > KEPT
    if bool(over.any()):
        n, grp = (int(i) for i in over.nonzero()[0])
        raise ValueError(f"sparse24.pack: w is not 2:4: row {n}, columns {4 * grp}..{4 * grp + 3} hold "
                         f"{int(nonzero[n, grp].sum())} non-zeros (at most 2 per group of 4); prune it first")
    # Keep the non-zeros, then the lowest positions: sort positions by (zero, index) and take two.
    pos = torch.arange(GROUP, device=w.device)
    order_key = (~nonzero).to(torch.int64) * GROUP + pos
    kept = order_key.argsort(-1)[..., :KEPT].sort(-1).values  # (N, G, 2), increasing
    values = g.gather(-1, kept).reshape(N, g.shape[1] * KEPT).contiguous()
    nibbles = kept[..., 0] | (kept[..., 1] << 2)  # (N, G)
    return values, _nibbles_to_meta(nibbles)


def _nibbles_to_meta(nibbles: Tensor) -> Tensor:
    N = nibbles.shape[0]
    shifts = torch.arange(0, 16, 4, device=nibbles.device)
    words = (nibbles.reshape(N, nibbles.shape[1] // GROUPS_PER_WORD, GROUPS_PER_WORD).to(torch.int32) << shifts).sum(-1)
    return torch.where(words >= 2**15, words - 2**16, words).to(torch.int16).contiguous()


def nibbles(meta: Tensor) -> Tensor:
    """meta (N, W) int16 -> its (N, 4 W) nibbles (int64), group by group."""
    shifts = torch.arange(0, 16, 4, device=meta.device)
    return ((meta.to(torch.int64) & 0xFFFF)[..., None] >> shifts & 0xF).reshape(meta.shape[0], meta.shape[1] * 4)


def positions(meta: Tensor) -> Tensor:
    """meta (N, W) int16 -> the column of every kept value, (N, 8 W) int64 (values' layout)."""
    nib = nibbles(meta)
    within = torch.stack((nib & 3, nib >> 2), dim=-1)  # (N, G, 2)
    base = torch.arange(nib.shape[1], device=meta.device)[:, None] * GROUP
    return (base + within).reshape(meta.shape[0], nib.shape[1] * KEPT)


def unpack(values: Tensor, meta: Tensor, K: int, validate: bool = True) -> Tensor:
    """The dense (N, K) weight of a compressed pair (values' dtype). The pair is validated first,
    unless validate=False (for pairs checked before: no data-dependent branch, so torch.compile and
    torch.export can trace it; an invalid nibble then yields some in-group positions, never an
    out-of-range index)."""
    if validate:
        problems = check(values, meta, K)
        if problems:
            raise ValueError("sparse24.unpack: " + "; ".join(problems))
    N = values.shape[0]
    dense = values.new_zeros(N, padded_k(K))
    dense.scatter_(1, positions(meta), values)
    return dense[:, :K]


def check(values: Tensor, meta: Tensor, K: int) -> list[str]:
    """What is wrong with (values, meta) as the compressed form of an (N, K) weight (N from
    values): dtypes, shapes, and every metadata nibble. Empty when the pair is valid."""
    problems = []
    if not isinstance(values, Tensor) or not isinstance(meta, Tensor):
        return ["values and meta must be tensors"]
    if values.dtype not in VALUE_DTYPES:
        problems.append(f"values must be float32, bfloat16 or float16, got {values.dtype}")
    if meta.dtype != torch.int16:
        problems.append(f"meta must be int16, got {meta.dtype}")
    if values.dim() != 2:
        return problems + [f"values must be 2-D (N, K_pad / 2), got shape {list(values.shape)}"]
    v_shape, m_shape = shapes(values.shape[0], K)
    if tuple(values.shape) != v_shape:
        problems.append(f"values must have shape {list(v_shape)} for K={K}, got {list(values.shape)}")
    if tuple(meta.shape) != m_shape:
        problems.append(f"meta must have shape {list(m_shape)} for K={K}, got {list(meta.shape)}")
    if problems or meta.is_meta:
        return problems
    bad = meta_problem(meta)
    return [bad] if bad else []


def meta_problem(meta: Tensor) -> str | None:
    """The first invalid nibble of a (N, W) int16 meta, described, or None."""
    nib = nibbles(meta)
    valid = torch.zeros(16, dtype=torch.bool, device=meta.device)
    valid[list(VALID_NIBBLES)] = True
    bad = ~valid[nib]
    if not bool(bad.any()):
        return None
    n, grp = (int(i) for i in bad.nonzero()[0])
    v = int(nib[n, grp])
    return (f"meta row {n}, group {grp} (columns {4 * grp}..{4 * grp + 3}) holds positions "
            f"({v & 3}, {v >> 2}); each group needs two distinct increasing positions in 0..3")
