"""INT8 weight format.

Canonical form (what state_dicts hold, on every device): ``weight`` (N, K) int8 and
``weight_scale`` (N,) float32, the dequantized weight being ``weight * weight_scale[:, None]``.

CPU packed form (what the CPU kernels read; Int8Linear keeps only this copy while on the CPU): a
1-D int8 tensor of ``packed_shape(N, K)`` bytes,
- a 64-byte header: the magic ``b"TSLMI8PK"``, the format version (uint32, 2), the block width
  (uint32, 16), then N and K (int64, little-endian), then zeros;
- ``ceil(N / 16)`` blocks of ``16 * K_pad`` bytes, ``K_pad = round_up(K, 64)``. Block ``b`` holds
  output channels ``16 b .. 16 b + 15``: ``K_pad / 4`` groups of 64 bytes, group ``g`` being
  ``[channel 0..15][k = 4 g .. 4 g + 3]`` (the B-operand order of AVX-512 VNNI ``vpdpbusd`` and of
  AMX ``tdpbsud``). Each byte is ``w + 128`` as uint8 (``w ^ 0x80``), the unsigned operand of those
  instructions; the kernels undo the +128 with the row sums of the quantized activations.

The ops check the header against the call (N from w_scale, K from x) and the size against N and
K, so a weight packed for another shape is refused. The padding bytes (channels beyond N, k beyond
K) are never read into an output: activations are zero there and extra channels are not stored.
"""
from __future__ import annotations

import struct

import torch
from torch import Tensor

BLOCK_N = 16
PAD_K = 64
HEADER_BYTES = 64


def packed_shape(N: int, K: int) -> tuple[int]:
    """The shape of the packed (N, K) weight: (header + blocks,) bytes."""
    k_pad = -(-K // PAD_K) * PAD_K
    return (HEADER_BYTES + -(-N // BLOCK_N) * BLOCK_N * k_pad,)


_MAGIC = b"TSLMI8PK"
_VERSION = 2


def has_header(packed: Tensor, N: int, K: int) -> bool:
    """Whether a CPU tensor is a packed (N, K) weight by its size and header (meta and fake
    tensors: by size)."""
    if packed.dtype != torch.int8 or packed.dim() != 1 or packed.numel() != packed_shape(N, K)[0]:
        return False
    if packed.is_meta or type(packed) is not torch.Tensor:  # no bytes to read (meta, fake tensors)
        return True
    return packed[:32].numpy().tobytes() == _MAGIC + struct.pack("<IIqq", _VERSION, BLOCK_N, N, K)


# The smallest positive normal float32: a smooth scale below it has an infinite reciprocal (x / s
# overflows) or loses precision, and the folded weight w * s underflows.
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def smooth_scale_problem(s: Tensor) -> str | None:
    """What is wrong with a SmoothQuant scale (K,) float32, or None: it must hold positive, normal,
    finite values (x is divided by it, the weight multiplied by it)."""
    if s.is_meta or s.numel() == 0:
        return None
    bad = ~(torch.isfinite(s) & (s >= _FLOAT32_TINY))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        return (f"[{k}] is {s[k].item()!r}: smooth scales must be finite and at least "
                f"{_FLOAT32_TINY:.3g} (positive normal float32)")
    return None


def checkpoint_problems(tensors: dict, N: int, K: int) -> list[str]:
    """What is wrong with the incoming tensors of an Int8Linear checkpoint ({"weight": ..., ...},
    the keys present), as messages naming the key; empty when they can be loaded as they are.
    Nothing is cast: an int8 weight must come as int8 and the scales as float32."""
    problems = []

    def expect(name, t, shape, dtypes, what):
        if not isinstance(t, Tensor):
            problems.append(f"{name}: expected a tensor, got {type(t).__name__}")
            return False
        if t.dtype not in dtypes or tuple(t.shape) != shape:
            problems.append(f"{name}: expected {what} of shape {shape}, got {t.dtype} of shape {tuple(t.shape)}"
                            + (" (loading it would cast the values)" if t.dtype not in dtypes else ""))
            return False
        return not t.is_meta  # meta tensors have shapes but no values to check

    def finite(name, t):
        if t.numel() and not bool(torch.isfinite(t).all()):
            k = int((~torch.isfinite(t)).flatten().nonzero()[0, 0])
            problems.append(f"{name}: element {k} is {t.flatten()[k].item()!r}; it must be finite")

    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    if "weight" in tensors:
        expect("weight", tensors["weight"], (N, K), (torch.int8,), "int8")
    if "weight_scale" in tensors and expect("weight_scale", tensors["weight_scale"], (N,), (torch.float32,), "float32"):
        finite("weight_scale", tensors["weight_scale"])
    if "bias" in tensors and expect("bias", tensors["bias"], (N,), floats, "a float tensor"):
        finite("bias", tensors["bias"])
    if "smooth_scale" in tensors and expect("smooth_scale", tensors["smooth_scale"], (K,), (torch.float32,), "float32"):
        problem = smooth_scale_problem(tensors["smooth_scale"])
        if problem:
            problems.append(f"smooth_scale{problem}")
    return problems
