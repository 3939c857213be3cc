"""Weight quantization."""
from __future__ import annotations

import torch
from torch import Tensor


def quantize_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel INT8: w (N, K) float -> (w_q (N, K) int8 in [-127, 127],
    w_scale (N,) float32) with w ~= w_q * w_scale[:, None]. A channel of zeros gets scale 0."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D floating point weight, got {tuple(w.shape)} {w.dtype}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight holds NaN or Inf; it cannot be quantized")
    absmax = w.abs().amax(dim=1)
    scale = absmax / 127
    w_q = torch.where(scale[:, None] > 0, torch.round(w / scale.clamp_min(1e-30)[:, None]), 0.0)
    return w_q.clamp(-127, 127).to(torch.int8), scale.contiguous()
