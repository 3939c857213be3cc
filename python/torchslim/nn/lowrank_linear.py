"""LowRankLinear: low-rank (U V) replacement for nn.Linear, computed by one fused kernel."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._autograd import call
from ._compressed import FLOATS as _FLOATS
from ._compressed import (assign_problems, bias_problems, checked_apply, copy_bias, dense_linear, flat_input,
                          float_problems, checked_load, tensor_problems)
from ._compressed import layer_spec, spec_dtype, spec_int, spec_shapes
from ..compress import lowrank as lowrank_compress


class LowRankLinear(nn.Module):
    """y = (x @ V.T) @ U.T + bias, W ~ U @ V of rank r, in one kernel (ops.lowrank_linear): the
    (tokens, r) intermediate never goes to memory.

    Buffers (ordinary tensors: state_dict / safetensors / deepcopy / torch.compile work): ``V``
    (rank, in_features) and ``U`` (out_features, rank) in the layer's float dtype, ``bias``
    (out_features,) or None. The rank is the checkpoint's: load_state_dict takes any rank whose V and U
    agree. ``weight`` is the dense U @ V, made on each access, for code that reads a Linear's weight.

    The factors are frozen buffers: gradients flow to x (and the layers below). The op itself also
    differentiates w.r.t. V and U, so a user who wants to fine-tune the factors can make them
    parameters. ``load_state_dict`` checks the incoming factors (shapes that agree with each other and
    the layer, finite values in the layer's dtype) before writing any.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"LowRankLinear: {name} must be a non-negative int, got {v!r}")
        if dtype not in _FLOATS:
            raise TypeError(f"LowRankLinear: dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        # Zero factors: the zero weight, until from_linear or a checkpoint fills them.
        self.register_buffer("V", torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.register_buffer("U", torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, param_ratio: float | None = None,
                    whitening: Tensor | None = None, energy: float | None = None) -> "LowRankLinear":
        """The truncated SVD of linear's weight (compress.svd_factors, in float64), of the rank given
        by exactly one of: rank; param_ratio, the fraction of the layer's parameters kept
        (r = floor(param_ratio * N K / (N + K))); energy, the fraction of the squared singular values
        kept. A rank at which low rank saves nothing (r >= N K / (N + K)) is refused.

        whitening: the layer's input covariance (in_features, in_features), sum x^T x / tokens over
        calibration data (compress.InputCovariance collects it), for the activation-aware SVD that
        minimizes the output error on those inputs rather than the weight error (SVD-LLM). The layer's
        dtype is kept. A meta-device linear gives a meta module (needs rank or param_ratio; a whitening
        given is checked, (in_features, in_features), though there are no values to whiten)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LowRankLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.dtype not in _FLOATS:
            raise TypeError(f"LowRankLinear.from_linear: the layer is {w.dtype}; LowRankLinear computes in "
                            "float32, bfloat16 or float16: convert the model first")
        N, K = w.shape
        caller = "LowRankLinear.from_linear"
        if w.is_meta:
            if whitening is not None:  # no values to whiten, but a covariance of another layer is a mistake
                lowrank_compress.check_covariance(whitening, K, caller)
            if energy is not None:
                raise ValueError("LowRankLinear.from_linear: energy needs the weight's singular values, and a "
                                 "meta-device layer has none; give rank or param_ratio")
            r = lowrank_compress.choose_rank(N, K, rank=rank, param_ratio=param_ratio, caller=caller)
            return cls(K, N, r, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("LowRankLinear.from_linear: the layer's weight holds NaN or Inf")
        U, V = lowrank_compress.svd_factors(w, rank=rank, param_ratio=param_ratio, energy=energy, covariance=whitening,
                                            caller=caller)
        mod = cls(K, N, V.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        mod.U.copy_(U)
        mod.V.copy_(V)
        copy_bias(mod, linear, "LowRankLinear.from_linear")
        return mod

    def to_linear(self) -> nn.Linear:
        """The dense nn.Linear of U @ V (same dtype and device)."""
        return dense_linear(self, weight="V")

    def _layer_spec(self) -> dict:
        """The facts that rebuild this layer empty (torchslim.save_compressed records them per layer):
        in/out features, bias, float dtype, and "rank"."""
        return layer_spec(self, self.V.dtype, rank=self.rank)

    @classmethod
    def _spec_shapes(cls, spec: dict) -> dict:
        """The shapes of the tensors a layer of spec stores (from its numbers; nothing allocated)."""
        K, N, r = (spec_int(spec, key, cls.__name__) for key in ("in_features", "out_features", "rank"))
        return spec_shapes(spec, cls.__name__, V=(r, K), U=(N, r))

    @classmethod
    def _from_layer_spec(cls, spec: dict, device=None) -> "LowRankLinear":
        """An empty layer of spec (as _layer_spec gives it), for load_state_dict to fill
        (torchslim.load_compressed)."""
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], device=device,
                   dtype=spec_dtype(spec, "LowRankLinear"))

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) weight U @ V (a new tensor), accumulated in float32."""
        return (self.U.float() @ self.V.float()).to(self.V.dtype)

    @property
    def weight(self) -> Tensor:
        """The dense weight U @ V, made anew on each access: what code written for nn.Linear reads.
        The layer itself never forms it."""
        return self.dense_weight()

    @property
    def rank(self) -> int:
        return self.V.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) in the layer's dtype -> (..., out_features)."""
        # Attribute reads, not self._buffers: a user who fine-tunes the factors makes them parameters.
        x2, lead = flat_input(type(self).__name__, x, self.in_features, self.V.dtype)
        return call(_LOWRANK_LINEAR, x2, self.V, self.U, self.bias).reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        return checked_apply(self, fn, recurse, super()._apply, (), "", weight="V")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # V and U take the checkpoint's rank (nn.Module's loader refuses a shape change).
        def shapes(incoming):
            r = incoming["V"].shape[0] if "V" in incoming else self.rank
            return {"V": (r, self.in_features), "U": (self.out_features, r)}

        checked_load(self, _BUFFERS, state_dict, prefix, local_metadata, error_msgs,
                     lambda incoming, assign: _checkpoint_problems(incoming, self, assign),
                     lambda: super(LowRankLinear, self)._load_from_state_dict(
                         state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs),
                     shapes)

    def extra_repr(self) -> str:
        N, K, r = self.out_features, self.in_features, self.rank
        kept = r * (N + K) / (N * K) if N * K else 0.0
        return (f"in_features={K}, out_features={N}, bias={self.bias is not None}, rank={r} "
                f"({100 * kept:.1f}% of the parameters), {self.V.dtype}")


_BUFFERS = ("V", "U", "bias")
_LOWRANK_LINEAR = torch.ops.torchslim.lowrank_linear.default


def _checkpoint_problems(incoming: dict, module: LowRankLinear, assign: bool) -> list[str]:
    problems = tensor_problems(incoming)
    if problems:
        return problems
    if assign:
        problems = assign_problems(incoming)
    N, K = module.out_features, module.in_features
    V, U = incoming.get("V"), incoming.get("U")
    if (V is None) != (U is None):
        return ["V and U are one weight: a checkpoint must hold both or neither"]
    if V is not None:
        if V.dim() != 2 or V.shape[1] != K or not V.is_floating_point():
            problems.append(f"V must be a float tensor of shape (rank, {K}), got {V.dtype} of shape {tuple(V.shape)}")
        elif U.dim() != 2 or tuple(U.shape) != (N, V.shape[0]) or not U.is_floating_point():
            problems.append(f"U must be a float tensor of shape ({N}, {V.shape[0]}) for V of rank {V.shape[0]}, "
                            f"got {U.dtype} of shape {tuple(U.shape)}")
    problems += bias_problems(incoming, module)
    if problems:
        return problems
    return float_problems(incoming, module, assign, names=("V", "U", "bias"))
