"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", 2023): prune a weight W (N, K) and update its remaining weights so that the layer's outputs
X W^T on the calibration activations X (n, K) change as little as possible.

Every output row is an independent least-squares problem with the same Hessian H = X^T X (any positive
scale: the covariance X^T X / n that InputCovariance collects will do). The columns are processed left
to right; when column j is fixed (some of its weights pruned), the error it makes is spread over the
columns not yet fixed by the Optimal Brain Surgeon update

    delta W[:, j:] = -((W[:, j] - Q[:, j]) / U[j, j]) U[j, j:]

where U is the upper Cholesky factor of H^-1 (H^-1 = U^T U): row j of U holds, up to the factor
U[j, j], the row of the inverse Hessian of the columns j.. that remain once columns < j are fixed, so one
factorization serves every step. The columns go in blocks of ``block``: the updates inside a block are
made column by column on the block only, and the block's accumulated errors reach the columns to its
right in one matrix product at the end of the block (the paper's lazy batch updates).

The mask is chosen as the columns are reached, by the OBS saliency w^2 / U[j, j]^2 of the weights as
they stand then (already updated for the columns before):
- pattern "2:4": at the first column of every aligned group of four columns (4g .. 4g + 3), every
  row keeps the two weights of the group with the largest saliency (a trailing group of three keeps
  two, of one or two keeps all, as compress.prune_24 does);
- sparsity s: at the first column of every block (the paper's adaptive mask selection), every row
  prunes its lowest-saliency weights of the block. The paper picks the block's pruned weights over all
  rows together, which leaves rows with different counts; here every row prunes its own share, so
  every row ends up with exactly the count compress.prune_unstructured keeps, K - round(s K). A row's
  pruned count is spread over the blocks in proportion to the number of non-zero weights each block
  holds for it (rounded on the running total, so the shares add up exactly).

Weights that are zero in w (and the weights of a dead input feature, H[k, k] == 0, which the paper
zeroes and whose H[k, k] it sets to 1) are pruned first and count towards the pruned weights: they stay
zero, and a row with more zeros than the count asks keeps only its non-zeros, as prune_unstructured does.

The arithmetic is float64 (on w's device when it is CPU or CUDA, else on CPU): the inverse Hessian of a
layer with correlated or nearly dead inputs is badly conditioned (the damping only bounds it at about
1 / damping relative to the mean), and float32 would lose digits in the K steps of updates. The cost
is O(N K^2 + K^3) per layer, a few seconds on a CPU for K of a few thousand.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .lowrank import check_covariance

# Where H + lambda I still does not factor in float64 (rounding on a nearly singular H), the damping
# grows 10x, at most this many times, before sparsegpt_prune gives up.
_DAMPING_RETRIES = 3
_CALLER = "sparsegpt_prune"


def sparsegpt_prune(w: Tensor, covariance: Tensor, *, sparsity: float | None = None, pattern: str | None = None,
                    block: int = 128, damping: float = 0.01) -> Tensor:
    """The pruned and updated copy of w (N, K) float32|bfloat16|float16|float64, in w's dtype and on
    w's device, by SparseGPT (see the module's docstring).

    covariance: the (K, K) input covariance of the layer, X^T X / n (InputCovariance gives it; any
    positive scale). Exactly one of:
      pattern="2:4": every aligned group of four columns of every row keeps at most two non-zeros
        (a trailing partial group too), the rule of formats.sparse24;
      sparsity=s in [0, 1): every row keeps K - round(s K) non-zeros (fewer where w holds more zeros),
        as compress.prune_unstructured does. sparsity=0 (or a 2:4 with K <= 2) prunes nothing and
        returns a copy of w.
    block: the columns updated together (lazy batch updates) and, for sparsity, the width over which
      each mask is chosen; for 2:4 it is rounded up to a multiple of 4.
    damping: lambda = damping * mean(diag(H)) is added to the diagonal of H (after dead features,
      H[k, k] == 0, get H[k, k] = 1 and their weights are zeroed).

    Refused (ValueError): w not a 2-D floating point tensor, on the meta device, or holding NaN/Inf; a
    covariance not (K, K) floating point, with NaN/Inf or a negative diagonal; neither or both of
    sparsity and pattern; sparsity outside [0, 1); a pattern other than "2:4"; block not an int >= 1;
    damping not a finite number > 0; a result that overflows w's dtype."""
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{_CALLER}: w must be a 2-D floating point tensor, got {got}")
    if w.is_meta:
        raise ValueError(f"{_CALLER}: w is on the meta device and has no values to prune")
    if (sparsity is None) == (pattern is None):
        raise ValueError(f"{_CALLER}: give exactly one of sparsity= or pattern=, got "
                         f"{'both' if sparsity is not None else 'neither'}")
    if pattern is not None and pattern != "2:4":
        raise ValueError(f"{_CALLER}: pattern must be '2:4', got {pattern!r}")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not 0 <= sparsity < 1):
        raise ValueError(f"{_CALLER}: sparsity must be a number in [0, 1), got {sparsity!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{_CALLER}: block must be an int >= 1, got {block!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < math.inf:
        raise ValueError(f"{_CALLER}: damping must be a finite number > 0, got {damping!r}")
    N, K = w.shape
    check_covariance(covariance, K, _CALLER)
    if covariance.is_meta:
        raise ValueError(f"{_CALLER}: covariance is on the meta device and has no values")
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{_CALLER}: w holds NaN or Inf")
    prune_count = round(sparsity * K) if sparsity is not None else None
    if w.numel() == 0 or prune_count == 0 or (pattern is not None and K <= 2):
        return w.clone()  # nothing to prune: no error to compensate either
    if pattern is not None:
        block = -(-block // 4) * 4  # a 2:4 group never straddles two blocks

    device = w.device if w.device.type in ("cpu", "cuda") else torch.device("cpu")
    W = w.to(device, torch.float64).clone()
    H = covariance.detach().to(device, torch.float64)
    H = (H + H.T) / 2  # rounding in a sum of x^T x can leave it slightly asymmetric
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    U = _inverse_hessian_factor(H, damping)

    # Weights that are zero now (in w, or of a dead feature) are pruned first, whatever their saliency.
    zero = W == 0
    if prune_count is not None:
        # Each row's pruned count beyond its zeros, spread over the blocks by their non-zero counts:
        # extra_until[:, b] = the row's extra prunes in blocks 0 .. b - 1 (round half up on the running total).
        extra = (prune_count - zero.sum(1)).clamp(min=0)  # (N,)
        ends = torch.tensor([min(s + block, K) for s in range(0, K, block)], device=device)
        nonzero_cum = (~zero).cumsum(1)[:, ends - 1]  # (N, blocks): non-zeros up to each block's end
        total = nonzero_cum[:, -1:].clamp(min=1)
        extra_until = torch.cat([torch.zeros_like(extra)[:, None],
                                 (2 * extra[:, None] * nonzero_cum + total) // (2 * total)], dim=1)
    pruned = torch.zeros_like(zero)

    for b, start in enumerate(range(0, K, block)):
        end = min(start + block, K)
        W1 = W[:, start:end]  # a view: the updates below go into W
        U1 = U[start:end, start:end]
        d = U1.diagonal()
        err = torch.empty_like(W1)
        if prune_count is not None:
            count = zero[:, start:end].sum(1) + extra_until[:, b + 1] - extra_until[:, b]
            pruned[:, start:end] = _lowest(W1, d, zero[:, start:end], count)
        for j in range(end - start):
            col = start + j
            if pattern is not None and col % 4 == 0:
                g = min(4, K - col)
                count = (zero[:, col:col + g].sum(1)).clamp(min=g - 2)
                pruned[:, col:col + g] = _lowest(W1[:, j:j + g], d[j:j + g], zero[:, col:col + g], count)
            q = torch.where(pruned[:, col], 0.0, W1[:, j])
            e = (W1[:, j] - q) / d[j]
            W1[:, j:] -= e[:, None] * U1[j, j:][None, :]  # column j becomes q (exactly 0 where pruned, below)
            W1[:, j] = q
            err[:, j] = e
        if end < K:
            W[:, end:] -= err @ U[start:end, end:]  # the block's errors reach the columns to its right

    W[pruned] = 0.0
    out = W.to(w.device, w.dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{_CALLER}: the updated weights overflow {w.dtype}; prune a wider dtype")
    return out


def _lowest(w: Tensor, d: Tensor, forced: Tensor, count: Tensor) -> Tensor:
    """The (N, g) mask of the count[n] weights of every row n with the lowest OBS saliency w^2 / d^2,
    the forced ones first; on ties the lower column stays (as in prune_24 and prune_unstructured)."""
    score = w.square() / d.square()[None, :]
    score = torch.where(forced, -1.0, score)  # below every saliency (>= 0)
    rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0: the most salient
    return rank >= (w.shape[1] - count)[:, None]


def _inverse_hessian_factor(H: Tensor, damping: float) -> Tensor:
    """The upper triangular U (K, K) float64 with U^T U = (H + lambda I)^-1, lambda = damping *
    mean(diag(H)). From one Cholesky factorization, of H with its order reversed: with J the reversal
    permutation, J H J = L L^T gives H^-1 = J L^-T L^-1 J = U^T U for U = J L^-1 J, which is upper
    triangular as L^-1 is lower."""
    K = H.shape[0]
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    scale = float(H.diagonal().mean())  # > 0: dead features have H[k, k] = 1 by now
    flipped = H.flip(0, 1)
    for attempt in range(_DAMPING_RETRIES + 1):
        lam = damping * 10**attempt * scale
        L, info = torch.linalg.cholesky_ex(flipped + lam * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    raise ValueError(f"{_CALLER}: the covariance + {damping * 10**_DAMPING_RETRIES:g} * mean(diag) * I is still not "
                     "positive definite; is it a covariance X^T X / n? (a larger damping= may help)")
