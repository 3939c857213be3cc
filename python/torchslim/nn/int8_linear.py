"""Int8Linear: W8A8 replacement for nn.Linear (int8 weight, per-token int8 activations)."""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import Tensor, nn

from .._autograd import call
from .. import ops
from ..compress.quantize import quantize_weight_per_channel
from ..formats import int8 as int8_format
from ._compressed import layer_spec, spec_dtype, spec_int, spec_shapes


class Int8Linear(nn.Module):
    """y = dequant(quant_per_token(x / smooth_scale) @ weight.T) + bias, one fused kernel per call.

    Buffers (all ordinary tensors, so state_dict / safetensors / deepcopy / torch.compile work):
    ``weight`` (N, K) int8, ``weight_scale`` (N,) float32, ``bias`` (N,) or None and
    ``smooth_scale`` (K,) float32 or None (SmoothQuant: x is divided by it, the weight was
    multiplied by it). While the module is on the CPU, ``weight`` holds the packed CPU layout
    instead (formats/int8.py); state_dict() always gives and load_state_dict() always takes the
    canonical (N, K) form, so checkpoints move between devices.

    All buffers are frozen: gradients flow to x (and to the layers below), not to the int8 weight.
    The conversions (``.to()``, ``.cuda()``, ``share_memory()``, ...) either succeed or raise leaving
    the module as it was; ``load_state_dict`` checks the incoming int8-layer tensors before writing
    any of them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, smooth: bool = False,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        if dtype not in _FLOATS:
            raise TypeError(f"Int8Linear: dtype is the float dtype of the replaced layer: float32, bfloat16 or "
                            f"float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.orig_dtype = dtype  # the model's float dtype: the bias's, to_linear's and the size report's
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
        if w.dtype not in _FLOATS:
            raise TypeError(f"Int8Linear.from_linear: the layer is {w.dtype}, but Int8Linear computes with float32, "
                            "bfloat16 or float16 activations; convert the model (e.g. .float()) first")
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

    def _layer_spec(self) -> dict:
        """The facts that rebuild this layer empty (torchslim.save_compressed records them per layer):
        in/out features, bias, float dtype, and "smooth": whether a SmoothQuant scale is stored."""
        return layer_spec(self, self.orig_dtype, smooth=self.smooth_scale is not None)

    @classmethod
    def _spec_shapes(cls, spec: dict) -> dict:
        """The shapes of the tensors a layer of spec stores, the weight in its canonical (N, K) form
        (from its numbers; nothing allocated)."""
        K, N = (spec_int(spec, key, cls.__name__) for key in ("in_features", "out_features"))
        shapes = {"weight": (N, K), "weight_scale": (N,)}
        if spec.get("smooth"):
            shapes["smooth_scale"] = (K,)
        return spec_shapes(spec, cls.__name__, **shapes)

    @classmethod
    def _from_layer_spec(cls, spec: dict, device=None) -> "Int8Linear":
        """An empty layer of spec (as _layer_spec gives it), for load_state_dict to fill
        (torchslim.load_compressed)."""
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], smooth=spec["smooth"],
                   device=device, dtype=spec_dtype(spec, "Int8Linear"))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) float32|bfloat16|float16 -> (..., out_features) in x.dtype."""
        # Buffers straight from _buffers and the ops as torch.ops handles: nn.Module.__getattr__
        # and the wrapper calls cost microseconds, which show at decode (one token, small layers).
        K, buffers = self.in_features, self._buffers
        if x.dim() == 0 or x.shape[-1] != K:
            raise RuntimeError(f"Int8Linear(in_features={K}): x must have {K} features in its last dimension, "
                               f"got shape {list(x.shape)}")
        if x.dtype not in _FLOATS:
            raise RuntimeError(f"Int8Linear: x must be float32, bfloat16 or float16, got {x.dtype}")
        lead = x.shape[:-1]
        # flatten, not reshape(-1, K) (ambiguous for K = 0) nor reshape(lead.numel(), K) (which
        # torch.export specializes to the example's batch size).
        x2 = x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)
        smooth = buffers["smooth_scale"]
        w = buffers["weight"]
        op = _INT8_LINEAR_PACKED if w.is_cpu else _INT8_LINEAR
        if smooth is not None and x2.dtype == torch.float16:
            # x / s can leave float16's range (and s underflow in it): divide in float32, where
            # the op then runs, and round the output to float16 once.
            y = call(op, x2.float() / smooth, w, buffers["weight_scale"], buffers["bias"]).half()
        else:
            if smooth is not None:
                x2 = x2 / smooth.to(x2.dtype)
            y = call(op, x2.contiguous(), w, buffers["weight_scale"], buffers["bias"])
        return y.reshape(*lead, self.out_features)

    # ---- one weight copy per device layout -------------------------------------------------
    def _device_layout(self, w: Tensor) -> Tensor:
        """The (N, K) int8 weight w in the layout its device's kernel reads."""
        return ops.int8_pack_weight(w.contiguous()) if w.device.type == "cpu" else w.contiguous()

    def canonical_weight(self) -> Tensor:
        """The (N, K) int8 weight, whatever layout the module holds now."""
        if self.weight.device.type == "cpu":
            return ops.int8_unpack_weight(self.weight, self.out_features, self.in_features)
        return self.weight

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .cpu() / share_memory() / to_empty() ...: where the weight's layout
        # stays (CPU to CPU, or between other devices), fn is applied to the weight as it is (so
        # an in-place fn like share_memory_ reaches the packed tensor); where it changes, the
        # canonical weight is moved and laid out anew. Empty probes tell which, and refuse a
        # conversion of the int8 weight or of the float buffers to another kind of number, before
        # anything changes. A dtype cast (.half(), .to(torch.bfloat16)) converts the bias with
        # the model but not the float32 scales: they follow the device only, with exact values.
        device = self.weight.device
        probe = fn(torch.empty(0, dtype=torch.int8, device=device))
        if probe.dtype != torch.int8:
            raise TypeError(f"Int8Linear: this conversion would turn the int8 weight into {probe.dtype}; "
                            "use to_linear() for a float layer")
        float_probe = fn(torch.empty(0, dtype=self.orig_dtype, device=device))
        if float_probe.dtype not in _FLOATS:
            raise TypeError(f"Int8Linear: this conversion would turn the float buffers (bias) into "
                            f"{float_probe.dtype}; Int8Linear runs on float32, bfloat16 or float16")
        here_cpu, there_cpu = device.type == "cpu", probe.device.type == "cpu"
        before = dict(self._buffers)
        try:
            if here_cpu and not there_cpu:
                self._buffers["weight"] = self.canonical_weight()
            super()._apply(fn, recurse)
            for name in ("weight_scale", "smooth_scale"):
                after = self._buffers[name]
                if after is not None and after.dtype != torch.float32:
                    self._buffers[name] = before[name].to(after.device)
            w = self._buffers["weight"]
            if there_cpu and not here_cpu:
                self._buffers["weight"] = ops.int8_pack_weight(w)
            elif here_cpu and there_cpu and not int8_format.has_header(w, self.out_features, self.in_features):
                # fn made new bytes without copying them (to_empty): an uninitialized weight, but a
                # valid packed layout (zeros) rather than a tensor every later call would refuse.
                self._buffers["weight"] = ops.int8_pack_weight(
                    torch.zeros(self.out_features, self.in_features, dtype=torch.int8, device=w.device))
        except BaseException:
            self._buffers.clear()
            self._buffers.update(before)
            raise
        self.orig_dtype = float_probe.dtype  # the dtype the model now has (what to_linear rebuilds)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.canonical_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The base loader writes as it goes and reports problems after; for the four int8 buffers
        # this one checks the incoming tensors first and writes nothing when one is wrong, so a
        # checkpoint that fails here leaves them as they were. Everything else (a subclass's own
        # tensors, children's keys, extra state) goes through nn.Module's loader. Missing and
        # unexpected keys are reported as nn.Module does: the strict check is made by
        # load_state_dict after every module has loaded (strict arrives here always True).
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        ours = [name for name in _BUFFERS
                if self._buffers.get(name) is not None and name not in self._non_persistent_buffers_set]
        incoming = {name: state_dict[prefix + name] for name in ours if prefix + name in state_dict}
        assign = local_metadata.get("assign_to_params_buffers", False)
        problems = int8_format.checkpoint_problems(incoming, self.out_features, self.in_features)
        if not assign and not problems:  # (only tensors of the right dtypes and shapes get here)
            problems = _copy_problems(self._buffers, incoming)
        if problems:
            error_msgs.extend(f"{prefix}{problem}" for problem in problems)
            return
        self._load_rest(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs, ours)
        missing_keys.extend(prefix + name for name in ours if name not in incoming)
        incoming = {name: t.detach() for name, t in incoming.items()}
        # New tensors are made outside inference mode: a module loaded under it still trains.
        with torch.inference_mode(False):
            if assign:  # the checkpoint's tensors (contiguous, the weight laid out for its device)
                values = {name: t.contiguous() for name, t in incoming.items()}
                if "weight" in values:
                    values["weight"] = self._device_layout(values["weight"])
                self._buffers.update(values)
                return
            # In place (tied tensors, shared memory and CUDA graphs keep seeing these buffers). What
            # can fail is done first; the small buffers are copied back if a later copy fails.
            new_weight = (self._device_layout(incoming["weight"].to(self._buffers["weight"].device))
                          if "weight" in incoming else None)
        backup = {}
        try:
            with torch.no_grad():
                for name, t in incoming.items():
                    if name != "weight":
                        backup[name] = self._buffers[name].clone()
                        self._buffers[name].copy_(t)
                if new_weight is not None:
                    self._buffers["weight"].copy_(new_weight)
        except BaseException:
            with torch.no_grad():
                for name, old in backup.items():
                    self._buffers[name].copy_(old)
            raise

    def _load_rest(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
                   ours):
        """nn.Module's loader for everything but the int8 buffers (hidden from it meanwhile); the
        pre-hooks have run already."""
        hooks, hidden = self._load_state_dict_pre_hooks, set(ours) - self._non_persistent_buffers_set
        first_unexpected = len(unexpected_keys)
        self._load_state_dict_pre_hooks = OrderedDict()
        self._non_persistent_buffers_set |= hidden
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._load_state_dict_pre_hooks = hooks
            self._non_persistent_buffers_set -= hidden
        # It did not see the int8 buffers, so it called their keys unexpected: take those back.
        ours_keys = {prefix + name for name in ours}
        unexpected_keys[first_unexpected:] = [k for k in unexpected_keys[first_unexpected:] if k not in ours_keys]

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features * torch.finfo(self.orig_dtype).bits // 8
        stored = self.in_features * self.out_features + 4 * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, smooth={self.smooth_scale is not None}, "
                f"weight=int8 per-channel, saves {dense - stored} bytes vs {self.orig_dtype}")


_BUFFERS = ("weight", "weight_scale", "bias", "smooth_scale")
_FLOATS = ops._FLOATS
_INT8_LINEAR = torch.ops.torchslim.int8_linear.default
_INT8_LINEAR_PACKED = torch.ops.torchslim.int8_linear_packed.default


def _copy_problems(buffers: dict, incoming: dict) -> list[str]:
    """What would make copying the (checked) incoming tensors into the buffers fail midway, or
    change their values: a cast of the bias to a narrower float dtype must not overflow."""
    problems = []
    for name, t in incoming.items():
        target = buffers[name]
        if t.is_meta and not target.is_meta:
            problems.append(f"{name}: a meta tensor has no values to copy (load it with assign=True)")
            continue
        if target.is_meta and not t.is_meta:
            warnings.warn(f"{name}: copying a checkpoint tensor into a meta buffer does nothing; pass "
                          "assign=True to load_state_dict to take the checkpoint's tensors", stacklevel=4)
        if target.is_inference() and not torch.is_inference_mode_enabled():
            problems.append(f"{name}: the module's buffers are inference tensors, which can only be written "
                            "under torch.inference_mode() (or load with assign=True)")
        if not t.is_meta and t.dtype != target.dtype and not bool(torch.isfinite(t.to(target.dtype)).all()):
            problems.append(f"{name}: its values overflow the module's {target.dtype}")
    return problems


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
