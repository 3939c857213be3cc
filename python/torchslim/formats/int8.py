"""INT8 weight format.

Canonical form (what state_dicts hold, on every device): ``weight`` (N, K) int8 and
``weight_scale`` (N,) float32, the dequantized weight being ``weight * weight_scale[:, None]``.

CPU packed form (what the CPU kernels read; Int8Linear keeps only this copy while on the CPU):
an int8 tensor of shape ``(ceil(N / 16), 16 * K_pad + 64)`` with ``K_pad = round_up(K, 64)``.
Row ``b`` holds output channels ``16 b .. 16 b + 15``: first ``K_pad / 4`` groups of 64 bytes,
group ``g`` being ``[channel 0..15][k = 4 g .. 4 g + 3]`` (the B-operand order of AVX-512 VNNI
``vpdpbusd`` and of AMX ``tdpbssd``), zero-padded; then the 16 int32 sums over k of those channels.
"""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK_N = 16
PAD_K = 64


def packed_shape(N: int, K: int) -> tuple[int, int]:
    k_pad = -(-K // PAD_K) * PAD_K
    return (-(-N // BLOCK_N), BLOCK_N * k_pad + 4 * BLOCK_N)


def validate(weight: Tensor, weight_scale: Tensor) -> None:
    """Raises ValueError unless (weight, weight_scale) is a canonical int8 weight."""
    if weight.dim() != 2 or weight.dtype != torch.int8:
        raise ValueError(f"int8 weight must be (N, K) int8, got {tuple(weight.shape)} {weight.dtype}")
    if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be ({weight.shape[0]},) float32, got "
                         f"{tuple(weight_scale.shape)} {weight_scale.dtype}")
    if not torch.isfinite(weight_scale).all():
        raise ValueError("weight_scale must be finite")
