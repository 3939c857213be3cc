"""Pruning: 2:4 (keep the two highest-scoring weights of every group of four along K) and
unstructured (keep the highest-scoring fraction of every output row).

Scores: magnitude |W|, or Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models", 2023): |W[n, k]| * ||X[:, k]||_2, the weight's size times the L2 norm of its input
feature over calibration activations, compared within each output row's groups.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .calibration import _LinearInputHooks


def prune_24(w: Tensor, importance: Tensor | None = None) -> Tensor:
    """The 2:4 pruned copy of w (N, K): in every group of four consecutive columns of a row, the two
    weights with the largest score stay and the others become zero. Score = |w| * importance[k]
    (Wanda) when importance (K,) is given, |w| (magnitude) otherwise. Ties keep the lower column.
    A trailing group of fewer than four columns keeps its two best. NaN/Inf weights or importances
    and negative importances are refused."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"prune_24: w must be a 2-D floating point tensor, got {w.dtype} of shape {tuple(w.shape)}")
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("prune_24: w holds NaN or Inf")
    score = w.abs().double()
    if importance is not None:
        score = score * check_importance(importance, w.shape[1], "prune_24", need_values=True).to(w.device)[None, :]
    N, K = w.shape
    if w.numel() == 0:
        return w.clone()
    k_pad = -(-K // 4) * 4
    # Padded columns score -1, below every real weight; a stable sort keeps the lower column on ties.
    groups = nn.functional.pad(score, (0, k_pad - K), value=-1.0).reshape(N, k_pad // 4, 4)
    order = groups.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return torch.where(keep.reshape(N, k_pad)[:, :K], w, torch.zeros_like(w))


def prune_unstructured(w: Tensor, sparsity: float, importance: Tensor | None = None) -> Tensor:
    """The pruned copy of w (N, K) in which every output row keeps its round((1 - sparsity) * K)
    highest-scoring weights and the others become zero (per row, as Wanda compares: every row keeps
    the same count, which also balances the CSR kernels' work). Score = |w| * importance[k] (Wanda)
    when importance (K,) is given, |w| (magnitude) otherwise; ties keep the lower column. Weights
    that are zero already stay zero, so the result may be sparser than asked. sparsity in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"prune_unstructured: sparsity must be a number in [0, 1), got {sparsity!r}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"prune_unstructured: w must be a 2-D floating point tensor, got {w.dtype} of shape {tuple(w.shape)}")
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("prune_unstructured: w holds NaN or Inf")
    N, K = w.shape
    keep_count = K - round(sparsity * K)
    if w.numel() == 0 or keep_count == K:
        return w.clone()
    score = w.abs().double()
    if importance is not None:
        score = score * check_importance(importance, K, "prune_unstructured", need_values=True).to(w.device)[None, :]
    order = score.argsort(dim=1, descending=True, stable=True)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, :keep_count], True)
    return torch.where(keep, w, torch.zeros_like(w))


def check_importance(importance, K: int, caller: str, need_values: bool = False) -> Tensor:
    """importance as a float64 tensor of shape (K,), or a ValueError saying what is wrong with it.
    Values are checked (finite, non-negative) unless it is on the meta device, which need_values
    (pruning a real weight) refuses."""
    if not isinstance(importance, Tensor):
        raise ValueError(f"{caller}: importance must be a tensor of shape ({K},), got {type(importance).__name__}")
    if importance.shape != (K,) or not importance.is_floating_point():
        raise ValueError(f"{caller}: importance must be a float tensor of shape ({K},), "
                         f"got {importance.dtype} of shape {tuple(importance.shape)}")
    if need_values and importance.is_meta:
        raise ValueError(f"{caller}: importance is on the meta device and has no values to prune by")
    importance = importance.detach().double()
    if not importance.is_meta and (not bool(torch.isfinite(importance).all()) or bool((importance < 0).any())):
        raise ValueError(f"{caller}: importance must be finite and non-negative (an L2 norm per input feature)")
    return importance


class InputNorms(_LinearInputHooks):
    """Collects the L2 norm of every input feature of the given nn.Linear layers over the batches
    run while it is active: ``with InputNorms(model) as norms: model(batch) ...``, then
    ``norms.result()`` maps each layer's name to its (in_features,) float64 norms (Wanda's importance;
    float64, as the sums are kept, so large activations do not overflow).
    filter_fn(module, fqn) chooses the layers (default: every nn.Linear)."""

    def _update(self, state: Tensor | None, x: Tensor) -> Tensor:
        sq = x.double().square().sum(0)  # (in_features,) sum of squares
        return sq if state is None else state + sq

    def _finish(self, state: Tensor) -> Tensor:
        return state.sqrt()
