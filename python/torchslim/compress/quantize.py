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
    absmax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    # float64 for the division: no overflow or precision loss for any float32 absmax, tiny ones included.
    step = absmax.double()[:, None] / 127
    w_q = torch.where(step > 0, torch.round(w.double() / step.clamp_min(torch.finfo(torch.float64).tiny)), 0.0)
    return w_q.clamp(-127, 127).to(torch.int8), (absmax / 127).contiguous()
