"""Sparse24Linear: 2:4 semi-structured sparse replacement for nn.Linear."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._autograd import call
from ._compressed import FLOATS as _FLOATS
from ._compressed import (assign_problems, bias_problems, checked_apply, copy_bias, dense_linear, flat_input,
                          float_problems, checked_load, tensor_problems)
from ._compressed import layer_spec, spec_dtype, spec_int, spec_shapes
from ..compress.prune import check_importance, prune_24
from ..formats import sparse24 as sparse24_format


class Sparse24Linear(nn.Module):
    """y = x @ W.T + bias with W 2:4 sparse, stored compressed and never expanded in memory.

    Buffers (ordinary tensors: state_dict / safetensors / deepcopy / torch.compile work, and the
    same form on every device): ``values`` (N, K_pad / 2) in the layer's float dtype, ``metadata``
    (N, K_pad / 16) int16 (the op's ``meta``, formats/sparse24.py), ``bias`` (N,) or None. (Not
    ``meta``: torch.export's GraphModule has an attribute of that name.) ``weight`` is the dense
    pruned weight, made on each access, for code that reads a Linear's weight (its dtype, device).

    The weight is frozen: gradients flow to x (and the layers below) and to nothing here.
    ``load_state_dict`` checks the incoming tensors (dtypes, shapes, every metadata group, finite
    values in the layer's dtype) before writing any.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Sparse24Linear: {name} must be a non-negative int, got {v!r}")
        if dtype not in _FLOATS:
            raise TypeError(f"Sparse24Linear: dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        (vs, ms) = sparse24_format.shapes(out_features, in_features)
        values = torch.zeros(vs, dtype=dtype, device=device)
        # An all-zero weight with valid metadata (positions 0 and 1 in every group).
        meta = torch.full(ms, 0x4444, dtype=torch.int16, device=device)
        self.register_buffer("values", values)
        self.register_buffer("metadata", meta)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, importance: Tensor | None = None) -> "Sparse24Linear":
        """Prunes linear's weight to 2:4 and compresses it: Wanda (|W| x importance[k]) when the
        per-input-feature importance (in_features,) is given -- the L2 norms of the inputs over
        calibration data, compress.InputNorms collects them -- magnitude (|W|) otherwise. The
        layer's dtype (float32, bfloat16, float16) is kept. A meta-device linear gives a meta module."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Sparse24Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.dtype not in _FLOATS:
            raise TypeError(f"Sparse24Linear.from_linear: the layer is {w.dtype}; Sparse24Linear computes in "
                            "float32, bfloat16 or float16: convert the model first")
        if importance is not None:
            check_importance(importance, linear.in_features, "Sparse24Linear.from_linear")
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:
            return mod
        values, meta = sparse24_format.pack(prune_24(w, importance))
        mod.values.copy_(values)
        mod.metadata.copy_(meta)
        copy_bias(mod, linear, "Sparse24Linear.from_linear")
        return mod

    def to_linear(self) -> nn.Linear:
        """The dense nn.Linear of the pruned weight (same dtype and device)."""
        return dense_linear(self)

    def _layer_spec(self) -> dict:
        """The facts that rebuild this layer empty (torchslim.save_compressed records them per layer):
        in/out features, bias, float dtype; nothing more (the shapes of values and metadata follow)."""
        return layer_spec(self, self.values.dtype)

    @classmethod
    def _spec_shapes(cls, spec: dict) -> dict:
        """The shapes of the tensors a layer of spec stores (from its numbers; nothing allocated)."""
        K, N = (spec_int(spec, key, cls.__name__) for key in ("in_features", "out_features"))
        values, metadata = sparse24_format.shapes(N, K)
        return spec_shapes(spec, cls.__name__, values=tuple(values), metadata=tuple(metadata))

    @classmethod
    def _from_layer_spec(cls, spec: dict, device=None) -> "Sparse24Linear":
        """An empty layer of spec (as _layer_spec gives it), for load_state_dict to fill
        (torchslim.load_compressed)."""
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], device=device,
                   dtype=spec_dtype(spec, "Sparse24Linear"))

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) pruned weight, expanded (a new tensor); the metadata is
        checked first."""
        return sparse24_format.unpack(self.values, self.metadata, self.in_features)

    @property
    def weight(self) -> Tensor:
        """The dense pruned weight (out_features, in_features), expanded anew on each access: what
        code written for nn.Linear reads (T5 reads ``.weight.dtype``, PyTorch's fused
        TransformerEncoderLayer path the whole tensor). The layer itself never expands it. Traceable
        (no check of the metadata here: it was checked when the layer was built or loaded)."""
        return sparse24_format.unpack(self.values, self.metadata, self.in_features, validate=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) in the layer's dtype -> (..., out_features)."""
        buffers = self._buffers
        x2, lead = flat_input(type(self).__name__, x, self.in_features, buffers["values"].dtype)
        y = call(_SPARSE24_LINEAR, x2, buffers["values"], buffers["metadata"], buffers["bias"])
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        return checked_apply(self, fn, recurse, super()._apply, (self.metadata,), "int16 metadata")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A corrupt checkpoint (bad metadata, wrong shapes or dtypes, non-finite values) is refused whole.
        def problems(incoming, assign):
            found = _checkpoint_problems(incoming, self, assign)
            if "metadata" not in incoming and prefix + "meta" in state_dict:
                found.append("the 2:4 metadata is stored under 'metadata' (this checkpoint has 'meta': rename the key)")
            return found

        checked_load(self, _BUFFERS, state_dict, prefix, local_metadata, error_msgs, problems,
                     lambda: super(Sparse24Linear, self)._load_from_state_dict(
                         state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=2:4 {self.values.dtype}")


_BUFFERS = ("values", "metadata", "bias")
_SPARSE24_LINEAR = torch.ops.torchslim.sparse24_linear.default


def _checkpoint_problems(incoming: dict, module: Sparse24Linear, assign: bool) -> list[str]:
    problems = tensor_problems(incoming)
    if problems:
        return problems
    if assign:
        problems = assign_problems(incoming)
    N, K = module.out_features, module.in_features
    values, meta = incoming.get("values"), incoming.get("metadata")
    if (values is None) != (meta is None):
        return ["values and metadata are one weight: a checkpoint must hold both or neither"]
    if values is not None:
        if values.dim() == 2 and values.shape[0] != N:
            problems.append(f"values must have shape {list(sparse24_format.shapes(N, K)[0])}, got {list(values.shape)}")
        else:
            problems += [p.replace("meta ", "metadata ", 1) for p in sparse24_format.check(values, meta, K)]
    problems += bias_problems(incoming, module)
    if problems:
        return problems
    return float_problems(incoming, module, assign)
