"""Low rank: W (N, K) ~= U (N, r) @ V (r, K), by truncated SVD or by activation-aware (whitened) SVD.

Whitened SVD (SVD-LLM: Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for
Large Language Model Compression", 2024) truncates W S instead of W, where C = S S^T is the
Cholesky factorization of the layer's input covariance C = X^T X / n over calibration activations
X (n, K). Since ||(W - W') X^T||_F^2 = n ||(W - W') S||_F^2, the best rank-r W S gives the W' that
changes the layer's outputs least on those activations, rather than the W' nearest to W.

A rank-r factorization stores r (N + K) numbers instead of N K, so it saves parameters only for
r < N K / (N + K): max_useful_rank gives the limit and choose_rank refuses ranks at or above it.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from .calibration import _LinearInputHooks

# Cholesky retries: where C + damping * scale * I is still not positive definite in float64 (an
# indefinite covariance, or a damping too small to outweigh rounding), the damping grows 10x, at
# most this many times, before svd_factors gives up.
_DAMPING_RETRIES = 3


def max_useful_rank(N: int, K: int) -> int:
    """The largest rank r with r (N + K) < N K, the largest at which U (N, r) and V (r, K) hold fewer
    numbers than W (N, K); 0 where even rank 1 saves nothing (N or K is 1) or W is empty."""
    _check_dims(N, K, "max_useful_rank")
    if N * K == 0:
        return 0
    return (N * K - 1) // (N + K)


def choose_rank(N: int, K: int, *, rank: int | None = None, param_ratio: float | None = None,
                energy: float | None = None, singular_values: Tensor | None = None,
                allow_full: bool = False, caller: str = "choose_rank") -> int:
    """The rank for a W (N, K), from exactly one of:
      rank: that rank, an int in [1, min(N, K)];
      param_ratio: in (0, 1), the fraction of W's N K parameters that U and V may hold:
        r = floor(param_ratio * N K / (N + K)), at least 1, computed exactly for the decimal
        param_ratio prints as;
      energy: in (0, 1], the smallest r whose squared singular values (singular_values: the
        (min(N, K),) descending singular values of the matrix being truncated) add up to at least
        energy times their total; 1 where they are all zero.
    A rank at which low rank saves nothing (r >= N K / (N + K), i.e. r > max_useful_rank(N, K)) is
    refused unless allow_full=True. Errors are ValueErrors starting with f"{caller}: "."""
    given = [name for name, v in (("rank", rank), ("param_ratio", param_ratio), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"{caller}: give exactly one of rank, param_ratio or energy, got "
                         f"{' and '.join(given) if given else 'none'}")
    _check_dims(N, K, caller, nonempty=True)
    limit = max_useful_rank(N, K)

    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{caller}: rank must be an int >= 1, got {rank!r}")
        if rank > min(N, K):
            raise ValueError(f"{caller}: rank {rank} exceeds min(N, K) = {min(N, K)} for a {N}x{K} weight")
        r, why = rank, f"rank {rank}"
    elif param_ratio is not None:
        if isinstance(param_ratio, bool) or not isinstance(param_ratio, (int, float)) or not 0 < param_ratio < 1:
            raise ValueError(f"{caller}: param_ratio must be a number in (0, 1), got {param_ratio!r}")
        # Exact arithmetic on the decimal the user wrote (repr: the shortest one that round-trips; float()
        # first, as numpy's float64 reprs as np.float64(...)), so
        # that a ratio landing on a whole rank (0.3 of 10) gives that rank, not one below it.
        r = max(1, math.floor(Fraction(repr(float(param_ratio))) * N * K / (N + K)))
        why = f"param_ratio {param_ratio} gives rank {r}"
    else:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise ValueError(f"{caller}: energy must be a number in (0, 1], got {energy!r}")
        s = _check_singular_values(singular_values, min(N, K), caller)
        cum = s.square().cumsum(0)
        # The total is cum[-1] (not a separate sum) so that energy=1 reaches the last index exactly.
        r = 1 if cum[-1] == 0 else int((cum < energy * cum[-1]).sum()) + 1
        why = f"retaining energy {energy} needs rank {r}"
    if r > limit and not allow_full:
        # integers only: a rounded N*K/(N+K) could print as the limit itself
        raise ValueError(f"{caller}: {why}, but low rank saves nothing for a {N}x{K} weight at rank >= "
                         f"N*K/(N+K) ({r}*{N + K} >= {N * K}); the largest useful rank is {limit}")
    return r


def _check_dims(N: int, K: int, caller: str, nonempty: bool = False) -> None:
    for name, v in (("N", N), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{caller}: {name} must be an int >= 0, got {v!r}")
    if nonempty and min(N, K) == 0:
        raise ValueError(f"{caller}: a {N}x{K} weight is empty; there is nothing to factor")


def _check_singular_values(s, n: int, caller: str) -> Tensor:
    """s as a float64 (n,) tensor, or a ValueError: finite, non-negative, descending."""
    if not isinstance(s, Tensor):
        raise ValueError(f"{caller}: energy needs singular_values, a ({n},) tensor, got {type(s).__name__}")
    if s.shape != (n,) or not s.is_floating_point() or s.is_meta:
        raise ValueError(f"{caller}: singular_values must be a float tensor of shape ({n},) with values, "
                         f"got {s.dtype} of shape {tuple(s.shape)} on {s.device}")
    s = s.detach().double()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((s[1:] > s[:-1]).any()):
        raise ValueError(f"{caller}: singular_values must be finite, non-negative and in descending order")
    return s


def svd_factors(w: Tensor, *, rank: int | None = None, param_ratio: float | None = None,
                energy: float | None = None, covariance: Tensor | None = None, damping: float = 1e-6,
                allow_full: bool = False, caller: str = "svd_factors") -> tuple[Tensor, Tensor]:
    """U (N, r), V (r, K) with U @ V ~= w (N, K) float32|bfloat16|float16|float64, in w's dtype and on
    w's device. The rank comes from exactly one of rank / param_ratio / energy (see choose_rank;
    allow_full=True also permits ranks that save nothing, up to min(N, K)). The singular values are
    split evenly, U = U_r sqrt(S_r) and V = sqrt(S_r) Vh_r, so neither factor's range outgrows the
    other's (bf16/fp16). The arithmetic is float64, on w's device where it is CPU or CUDA, else on CPU.

    covariance None: truncated SVD of w, the rank-r matrix nearest to w (Frobenius).
    covariance (K, K) float, the layer's input covariance X^T X / n (InputCovariance gives it):
    whitened SVD, the rank-r matrix that changes the outputs X w^T least. C is symmetrized and
    damped, C + damping * mean(diag(C)) * I (damping * I where the diagonal is all zero), so a
    singular C (fewer tokens than K, a feature that is always zero) still factors; an all-zero C
    (no signal) whitens by a multiple of I, which gives the plain truncated SVD. Where Cholesky still
    fails the damping grows 10x, at most 3 times, then a ValueError says so. With energy=, the energy
    is that of the singular values of w S, the ones truncated.

    Refused (ValueError): w not a 2-D floating point tensor, empty, on the meta device or holding
    NaN/Inf; a covariance not (K, K) floating point, with NaN/Inf or a negative diagonal; a damping
    not a finite number > 0; factors that overflow w's dtype. Errors start with f"{caller}: " (the
    name of the function the user called)."""
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{caller}: w must be a 2-D floating point tensor, got {got}")
    if w.is_meta:
        raise ValueError(f"{caller}: w is on the meta device and has no values to factor")
    N, K = w.shape
    _check_dims(N, K, caller, nonempty=True)
    if energy is None:  # the rank is known before the SVD: refuse a bad one before the work
        choose_rank(N, K, rank=rank, param_ratio=param_ratio, allow_full=allow_full, caller=caller)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 < damping < math.inf:
        raise ValueError(f"{caller}: damping must be a finite number > 0, got {damping!r}")
    w = w.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{caller}: w holds NaN or Inf")

    # float64 SVD runs on CPU and CUDA; other devices (MPS has no float64) compute on CPU.
    device = w.device if w.device.type in ("cpu", "cuda") else torch.device("cpu")
    w64 = w.to(device, torch.float64)
    if covariance is None:
        u, s, vh = torch.linalg.svd(w64, full_matrices=False)
        chol = None
    else:
        chol = _whitening_factor(covariance, K, damping, device, caller)
        u, s, vh = torch.linalg.svd(w64 @ chol, full_matrices=False)
    r = choose_rank(N, K, rank=rank, param_ratio=param_ratio, energy=energy, singular_values=s,
                    allow_full=allow_full, caller=caller)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if chol is not None:
        # W ~= U_r S_r (Vh_r chol^-1): a triangular solve X chol = Vh_r, no explicit inverse.
        vh = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)
    root = s.sqrt()
    U = (u * root[None, :]).to(w.device, w.dtype)
    V = (root[:, None] * vh).to(w.device, w.dtype)
    if not (bool(torch.isfinite(U).all()) and bool(torch.isfinite(V).all())):
        raise ValueError(f"{caller}: the factors overflow {w.dtype}; factor a wider dtype")
    return U, V


def _whitening_factor(covariance, K: int, damping: float, device: torch.device, caller: str) -> Tensor:
    """The lower Cholesky factor L (K, K) float64 of the symmetrized, damped covariance."""
    check_covariance(covariance, K, caller)
    if covariance.is_meta:
        raise ValueError(f"{caller}: covariance is on the meta device and has no values")
    c = covariance.detach().to(device, torch.float64)
    diag = c.diagonal()
    c = (c + c.T) / 2  # rounding in a sum of x^T x can leave it slightly asymmetric
    # The ridge is relative to the average feature energy, so damping means the same at any scale.
    scale = float(diag.mean()) or 1.0
    eye = torch.eye(K, dtype=torch.float64, device=device)
    for attempt in range(_DAMPING_RETRIES + 1):
        d = damping * 10**attempt
        chol, info = torch.linalg.cholesky_ex(c + (d * scale) * eye)
        if int(info) == 0:
            return chol
    raise ValueError(f"{caller}: covariance + {d:g} * mean(diag) * I is still not positive definite; "
                     "is it a covariance X^T X / n? (a larger damping= may help)")


def check_covariance(covariance, K: int, caller: str) -> None:
    """A ValueError starting with f"{caller}: " unless covariance is a (K, K) floating point tensor
    whose values, where it has them (not on the meta device), are finite with a non-negative diagonal."""
    if not isinstance(covariance, Tensor) or covariance.shape != (K, K) or not covariance.is_floating_point():
        got = (f"{covariance.dtype} of shape {tuple(covariance.shape)}" if isinstance(covariance, Tensor)
               else type(covariance).__name__)
        raise ValueError(f"{caller}: covariance must be a ({K}, {K}) floating point tensor, got {got}")
    if covariance.is_meta:
        return
    if not bool(torch.isfinite(covariance).all()):
        raise ValueError(f"{caller}: covariance holds NaN or Inf")
    if bool((covariance.diagonal() < 0).any()):
        raise ValueError(f"{caller}: covariance has a negative diagonal entry; it is no covariance X^T X / n")


class InputCovariance(_LinearInputHooks):
    """Collects the uncentered covariance of the inputs of the given nn.Linear layers over the batches
    run while it is active: ``with InputCovariance(model) as cov: model(batch) ...``, then
    ``cov.result()`` maps each layer's name to its (in_features, in_features) float64 matrix
    sum(x^T x) / tokens over every token seen, on the inputs' device (svd_factors' covariance=).
    The sums are float64, so large activations neither overflow nor lose the small features.
    filter_fn(module, fqn) chooses the layers (default: every nn.Linear). Inputs with no tokens
    count as no batch."""

    def _update(self, state: tuple[Tensor, int] | None, x: Tensor) -> tuple[Tensor, int] | None:
        if x.shape[0] == 0:
            return state  # no tokens: a layer that only ever sees these stays unreached (no 0 / 0)
        x = x.double()
        gram = x.T @ x  # (in_features, in_features)
        return (gram, x.shape[0]) if state is None else (state[0] + gram, state[1] + x.shape[0])

    def _finish(self, state: tuple[Tensor, int]) -> Tensor:
        return state[0] / state[1]
