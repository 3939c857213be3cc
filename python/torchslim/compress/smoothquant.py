"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", 2023): migrate the quantization difficulty of outlier input channels from the
activations to the weight.

A layer y = x W^T (W: (N, K)) is rewritten as y = (x / s) (W * s)^T with a per-input-channel scale s (K,):
an input channel j whose activations reach far beyond the others (an outlier channel, which makes every
token's int8 step large) is divided down, and its weight column multiplied up by the same factor, so the
product is unchanged and both sides quantize with smaller relative error. The scale is

    s_j = max|X_j| ** alpha / max_i |W_ij| ** (1 - alpha)

with max|X_j| the absolute maximum of input channel j over calibration activations. alpha = 0 leaves the
activations as they are and flattens the weight's columns; alpha = 1 flattens the activations; 0.5 (the
paper's default for most models) splits the difficulty evenly. Int8Linear.from_linear(linear,
smooth_scale=s) folds s into the weight and divides it out of x in the kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .calibration import _LinearInputHooks

_F32 = torch.finfo(torch.float32)


def smooth_scales(act_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's migration scale s (K,) float32 for a layer of weight (N, K) whose input channels
    reach act_absmax (K,) (non-negative; compress.InputAbsMax collects it):
    s_j = act_absmax[j] ** alpha / max_i |weight[i, j]| ** (1 - alpha), computed in float64 and clamped to
    positive normal float32 values (what Int8Linear accepts). A channel whose activations or weights are
    all zero gets s_j = 1: there is nothing to migrate. alpha: a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"smooth_scales: alpha must be a number in [0, 1], got {alpha!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"smooth_scales: weight must be a 2-D float tensor (N, K), got {weight.dtype} of "
                         f"shape {tuple(weight.shape)}")
    K = weight.shape[1]
    if not isinstance(act_absmax, Tensor) or act_absmax.shape != (K,) or not act_absmax.is_floating_point():
        what = (f"{act_absmax.dtype} of shape {tuple(act_absmax.shape)}" if isinstance(act_absmax, Tensor)
                else type(act_absmax).__name__)
        raise ValueError(f"smooth_scales: act_absmax must be a float tensor of shape ({K},), got {what}")
    a = act_absmax.detach().double().to(weight.device)
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError("smooth_scales: act_absmax must be finite and non-negative (an absolute maximum per "
                         "input channel)")
    w = weight.detach().double().abs().amax(dim=0) if weight.shape[0] else torch.zeros_like(a)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("smooth_scales: weight holds NaN or Inf")
    s = a.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((a == 0) | (w == 0), torch.ones_like(s), s)
    return s.clamp(_F32.tiny, _F32.max).float()


class InputAbsMax(_LinearInputHooks):
    """Collects the absolute maximum of every input channel of the given nn.Linear layers over the
    batches run while it is active: ``with InputAbsMax(model) as amax: model(batch) ...``, then
    ``amax.result()`` maps each layer's name to its (in_features,) float32 maxima (smooth_scales'
    act_absmax). filter_fn(module, fqn) chooses the layers (default: every nn.Linear)."""

    def _update(self, state: Tensor | None, x: Tensor) -> Tensor | None:
        if x.shape[0] == 0:
            return state
        m = x.abs().amax(dim=0).float()
        return m if state is None else torch.maximum(state, m)

    def _finish(self, state: Tensor) -> Tensor:
        return state
