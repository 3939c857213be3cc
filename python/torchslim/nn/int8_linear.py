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

    All buffers are frozen: gradients flow to x (and to the layers below), not to the int8 weight.
    Every method that changes the module (``.to()`` and the other conversions, ``load_state_dict``)
    either succeeds or raises leaving the module as it was.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, smooth: bool = False,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        if not dtype.is_floating_point:
            raise TypeError(f"Int8Linear: dtype is the float dtype of the replaced layer, got {dtype}")
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
        """Quantizes linear's weight per output channel. smooth_scale (in_features,): the SmoothQuant
        migration scale, positive normal float32 values, folded into the weight (W * s) and divided
        out of x. A linear on the meta device gives an Int8Linear on the meta device (shapes only:
        load a checkpoint into it with ``load_state_dict(..., assign=True)``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        _check_features(linear.in_features, linear.out_features)
        w = linear.weight.detach()
        if not w.is_floating_point():
            raise TypeError(f"Int8Linear.from_linear: the weight must be floating point, got {w.dtype}")
        if smooth_scale is not None:
            smooth_scale = _checked_smooth_scale(smooth_scale.detach().to(w.device), linear.in_features)
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  smooth=smooth_scale is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:
            return mod
        w = w.float()
        if smooth_scale is not None:
            w = w * smooth_scale[None, :]
            if not torch.isfinite(w).all() and torch.isfinite(linear.weight).all():
                raise ValueError("Int8Linear.from_linear: weight * smooth_scale overflows float32; "
                                 "the smooth scale is too large for this weight")
        w_q, w_scale = quantize_weight_per_channel(w)
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
        # Buffers straight from _buffers and the ops as torch.ops handles: nn.Module.__getattr__
        # and the wrapper calls cost microseconds, which show at decode (one token, small layers).
        K, buffers = self.in_features, self._buffers
        if x.dim() == 0 or x.shape[-1] != K:
            raise RuntimeError(f"Int8Linear(in_features={K}): x must have {K} features in its last dimension, "
                               f"got shape {list(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(lead.numel(), K)  # not -1: K = 0 leaves it ambiguous
        smooth = buffers["smooth_scale"]
        if smooth is not None:
            x2 = x2 / smooth.to(x2.dtype)
        w = buffers["weight"]
        op = _INT8_LINEAR_PACKED if w.is_cpu else _INT8_LINEAR
        y = op(x2.contiguous(), w, buffers["weight_scale"], buffers["bias"])
        return y.reshape(*lead, self.out_features)

    # ---- one weight copy per device layout -------------------------------------------------
    def _device_layout(self, w: Tensor) -> Tensor:
        """The (N, K) int8 weight w in the layout its device's kernel reads."""
        return ops.int8_pack_weight(w) if w.device.type == "cpu" else w

    def canonical_weight(self) -> Tensor:
        """The (N, K) int8 weight, whatever layout the module holds now."""
        if self.weight.device.type == "cpu":
            return ops.int8_unpack_weight(self.weight, self.out_features, self.in_features)
        return self.weight

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .cpu() / share_memory() / to_empty() ...: where the weight's layout
        # stays (CPU to CPU, or between other devices), fn is applied to the weight as it is (so
        # an in-place fn like share_memory_ reaches the packed tensor); where it changes, the
        # canonical weight is moved and laid out anew. An empty int8 probe tells which, before
        # anything changes. A dtype cast (.half(), .to(torch.bfloat16)) converts the bias with
        # the model but not the float32 scales: they follow the device only, with exact values.
        probe = fn(torch.empty(0, dtype=torch.int8, device=self.weight.device))
        if probe.dtype != torch.int8:
            raise TypeError(f"Int8Linear: this conversion would turn the int8 weight into {probe.dtype}; "
                            "use to_linear() for a float layer")
        here_cpu, there_cpu = self.weight.device.type == "cpu", probe.device.type == "cpu"
        before = dict(self._buffers)
        try:
            if here_cpu and not there_cpu:
                self._buffers["weight"] = self.canonical_weight()
            super()._apply(fn, recurse)
            for name in ("weight_scale", "smooth_scale"):
                after = self._buffers[name]
                if after is not None and after.dtype != torch.float32:
                    self._buffers[name] = before[name].to(after.device)
            if there_cpu and not here_cpu:
                self._buffers["weight"] = ops.int8_pack_weight(self._buffers["weight"])
        except BaseException:
            self._buffers.clear()
            self._buffers.update(before)
            raise
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.canonical_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Everything incoming is checked before anything is written: a bad checkpoint is reported
        # (load_state_dict raises with all messages) and leaves the module as it was.
        incoming = {name: state_dict[prefix + name] for name in _BUFFERS
                    if prefix + name in state_dict and self._buffers[name] is not None}
        problems = int8_format.checkpoint_problems(incoming, self.out_features, self.in_features)
        if problems:
            error_msgs.extend(f"{prefix}{problem}" for problem in problems)
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        old_weight = self._buffers["weight"]
        if "weight" in incoming:
            w = incoming["weight"]
            # The new weight in its device layout, made before any write (it may fail: memory).
            new_weight = self._device_layout(w if assign else w.to(old_weight.device))
            # The base loader then sees an (N, K) weight and copies the checkpoint onto itself
            # (or assigns it); the layout made above replaces it afterwards.
            self._buffers["weight"] = w.detach()
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        except BaseException:
            self._buffers["weight"] = old_weight
            raise
        self._buffers["weight"] = new_weight if "weight" in incoming else old_weight

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features * torch.finfo(self.orig_dtype).bits // 8
        stored = self.in_features * self.out_features + 4 * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, smooth={self.smooth_scale is not None}, "
                f"weight=int8 per-channel, saves {dense - stored} bytes vs {self.orig_dtype}")


_BUFFERS = ("weight", "weight_scale", "bias", "smooth_scale")
_INT8_LINEAR = torch.ops.torchslim.int8_linear.default
_INT8_LINEAR_PACKED = torch.ops.torchslim.int8_linear_packed.default


def _check_features(in_features, out_features) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"Int8Linear: {name} must be a non-negative int, got {v!r}")
    if in_features > ops.MAX_K:
        raise ValueError(f"Int8Linear: in_features={in_features} exceeds {ops.MAX_K}, beyond which the int8 "
                         "kernels' int32 accumulator can overflow; keep this layer dense")


def _checked_smooth_scale(s: Tensor, K: int) -> Tensor:
    if s.shape != (K,) or not s.is_floating_point():
        raise ValueError(f"Int8Linear.from_linear: smooth_scale must be a float tensor of shape ({K},), "
                         f"got {s.dtype} of shape {tuple(s.shape)}")
    s = s.float()
    problem = int8_format.smooth_scale_problem(s)
    if problem:
        raise ValueError(f"Int8Linear.from_linear: smooth_scale{problem}")
    return s
