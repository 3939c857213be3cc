"""Int8Linear: W8A8 replacement for nn.Linear (int8 weight, per-token int8 activations)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..compress.quantize import quantize_weight_per_channel
from ..formats import int8 as int8_format


class Int8Linear(nn.Module):
    """y = dequant(quant_per_token(x / smooth_scale) @ weight.T) + bias, one fused kernel per call.

    Buffers (all ordinary tensors, so state_dict / safetensors / deepcopy / torch.compile work):
    ``weight`` (N, K) int8, ``weight_scale`` (N,) float32, ``bias`` (N,) or None and
    ``smooth_scale`` (K,) float32 or None (SmoothQuant: x is divided by it, the weight was
    multiplied by it). While the module is on the CPU, ``weight`` holds the packed CPU layout
    instead (formats/int8.py); state_dict() always gives and load_state_dict() always takes the
    canonical (N, K) form, so checkpoints move between devices.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, smooth: bool = False,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.orig_dtype = dtype  # the float dtype of the layer this replaces (for the size report)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("smooth_scale", torch.ones(in_features, device=device) if smooth else None)
        self.weight = self._device_layout(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth_scale: Tensor | None = None) -> "Int8Linear":
        """Quantizes linear's weight per output channel. smooth_scale (in_features,) positive: the
        SmoothQuant migration scale, folded into the weight (W * s) and divided out of x."""
        w = linear.weight.detach().float()
        if smooth_scale is not None:
            smooth_scale = smooth_scale.detach().float().to(w.device)
            ok = smooth_scale.shape == (linear.in_features,) and bool(
                ((smooth_scale > 0) & torch.isfinite(smooth_scale)).all())
            if not ok:
                raise ValueError(f"smooth_scale must be ({linear.in_features},), positive and finite")
            w = w * smooth_scale[None, :]
        w_q, w_scale = quantize_weight_per_channel(w)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  smooth=smooth_scale is not None, device=w.device, dtype=linear.weight.dtype)
        mod.weight = mod._device_layout(w_q)
        mod.weight_scale.copy_(w_scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        if smooth_scale is not None:
            mod.smooth_scale.copy_(smooth_scale)
        return mod

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the dequantized weight (with the smooth scale divided back out)."""
        w = self.canonical_weight().float() * self.weight_scale[:, None]
        if self.smooth_scale is not None:
            w = w / self.smooth_scale[None, :]
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=self.orig_dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) float32|bfloat16|float16 -> (..., out_features) in x.dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.smooth_scale is not None:
            x2 = x2 / self.smooth_scale.to(x2.dtype)
        x2 = x2.contiguous()
        if self.weight.device.type == "cpu":
            y = ops.int8_linear_packed(x2, self.weight, self.weight_scale, self.bias)
        else:
            y = ops.int8_linear(x2, self.weight, self.weight_scale, self.bias)
        return y.reshape(*lead, self.out_features)

    # ---- one weight copy per device layout -------------------------------------------------
    def _device_layout(self, w: Tensor) -> Tensor:
        return ops.int8_pack_weight(w) if w.device.type == "cpu" else w

    def canonical_weight(self) -> Tensor:
        """The (N, K) int8 weight, whatever layout the module holds now."""
        if self.weight.device.type == "cpu":
            return ops.int8_unpack_weight(self.weight, self.out_features, self.in_features)
        return self.weight

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .cpu(): move the canonical weight, then lay it out for the new device.
        # A dtype cast (.half(), .to(torch.bfloat16)) converts the bias with the model but not the
        # float32 scales: they follow the device only, with their exact values.
        scales = {name: getattr(self, name) for name in ("weight_scale", "smooth_scale")
                  if getattr(self, name) is not None}
        self.weight = self.canonical_weight()
        super()._apply(fn, recurse)
        for name, before in scales.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                setattr(self, name, before.to(after.device))
        self.weight = self._device_layout(self.weight)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.canonical_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.weight = self.canonical_weight()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        int8_format.validate(self.weight, self.weight_scale)
        self.weight = self._device_layout(self.weight)

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features * torch.finfo(self.orig_dtype).bits // 8
        packed = self.in_features * self.out_features + 4 * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, smooth={self.smooth_scale is not None}, "
                f"weight=int8 per-channel, saves {dense - packed} bytes vs {self.orig_dtype}")
