"""CSRLinear: unstructured sparse (CSR) replacement for nn.Linear."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._autograd import call
from ._compressed import FLOATS as _FLOATS
from ._compressed import (assign_problems, bias_problems, checked_apply, copy_bias, dense_linear, flat_input,
                          float_problems, checked_load, tensor_problems)
from ._compressed import dtype_name, layer_spec, spec_dtype, spec_int, spec_shapes
from ..compress.prune import check_importance, prune_unstructured
from ..formats import csr as csr_format


class CSRLinear(nn.Module):
    """y = x @ W.T + bias with W stored as CSR (formats/csr.py) and never expanded in memory.

    Buffers (ordinary tensors: state_dict / safetensors / deepcopy / torch.compile work, and the
    same form on every device): ``crow`` (out_features + 1,) int32, ``col`` (nnz,) int16 when
    in_features <= 32768 else int32, ``values`` (nnz,) in the layer's float dtype, ``bias``
    (out_features,) or None. The number of stored values nnz is the checkpoint's: load_state_dict
    takes any nnz. ``weight`` is the dense weight, made on each access, for code that reads a
    Linear's weight (its dtype, device).

    The weight is frozen: gradients flow to x (and the layers below) and to nothing here.
    ``load_state_dict`` checks the incoming CSR as a whole (dtypes, shapes, row pointers, columns in
    range and strictly increasing per row, finite values in the layer's dtype) before writing any.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"CSRLinear: {name} must be a non-negative int, got {v!r}")
        if dtype not in _FLOATS:
            raise TypeError(f"CSRLinear: dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        # An all-zero weight: no stored values.
        self.register_buffer("crow", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("col", torch.zeros(0, dtype=csr_format.index_dtype(in_features), device=device))
        self.register_buffer("values", torch.zeros(0, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparsity: float | None = None,
                    importance: Tensor | None = None) -> "CSRLinear":
        """The CSR of linear's weight. With sparsity (in [0, 1)), every output row is pruned first to
        keep its round((1 - sparsity) * in_features) highest-scoring weights: Wanda (|W| x
        importance[k]) when the per-input-feature importance (in_features,) is given -- the L2 norms
        of the inputs over calibration data, compress.InputNorms collects them -- magnitude (|W|)
        otherwise. Without sparsity the weight's own zeros are dropped and nothing else. The layer's
        dtype (float32, bfloat16, float16) is kept. A meta-device linear gives a meta module (no
        stored values until a checkpoint is loaded)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"CSRLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.dtype not in _FLOATS:
            raise TypeError(f"CSRLinear.from_linear: the layer is {w.dtype}; CSRLinear computes in "
                            "float32, bfloat16 or float16: convert the model first")
        if importance is not None:
            if sparsity is None:
                raise ValueError("CSRLinear.from_linear: importance (Wanda) chooses what to prune, so it needs a "
                                 "sparsity")
            check_importance(importance, linear.in_features, "CSRLinear.from_linear")
        if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                     or not 0 <= sparsity < 1):
            raise ValueError(f"CSRLinear.from_linear: sparsity must be a number in [0, 1), got {sparsity!r}")
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:
            return mod
        if not bool(torch.isfinite(w).all()):
            raise ValueError("CSRLinear.from_linear: the layer's weight holds NaN or Inf")
        if sparsity is not None:
            w = prune_unstructured(w, sparsity, importance)
        crow, col, values = csr_format.pack(w)
        mod.crow.copy_(crow)
        mod._buffers["col"] = col
        mod._buffers["values"] = values
        copy_bias(mod, linear, "CSRLinear.from_linear")
        return mod

    def to_linear(self) -> nn.Linear:
        """The dense nn.Linear of the stored weight (same dtype and device)."""
        return dense_linear(self)

    def _layer_spec(self) -> dict:
        """The facts that rebuild this layer empty (torchslim.save_compressed records them per layer):
        in/out features, bias, float dtype, and "nnz" and "index_dtype" (the col dtype): the empty layer
        takes the checkpoint's nnz on load; these record what it must turn out to be."""
        return layer_spec(self, self.values.dtype, nnz=self.nnz, index_dtype=dtype_name(self.col.dtype))

    @classmethod
    def _spec_shapes(cls, spec: dict) -> dict:
        """The shapes of the tensors a layer of spec stores (from its numbers; nothing allocated)."""
        N, nnz = (spec_int(spec, key, cls.__name__) for key in ("out_features", "nnz"))
        spec_int(spec, "in_features", cls.__name__)
        return spec_shapes(spec, cls.__name__, crow=(N + 1,), col=(nnz,), values=(nnz,))

    @classmethod
    def _from_layer_spec(cls, spec: dict, device=None) -> "CSRLinear":
        """An empty layer of spec (as _layer_spec gives it), for load_state_dict to fill
        (torchslim.load_compressed)."""
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], device=device,
                   dtype=spec_dtype(spec, "CSRLinear"))

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) weight, expanded (a new tensor); the CSR is checked first."""
        return csr_format.unpack(self.crow, self.col, self.values, self.in_features)

    @property
    def weight(self) -> Tensor:
        """The dense weight (out_features, in_features), expanded anew on each access: what code
        written for nn.Linear reads. The layer itself never expands it. Traceable (no check of the
        CSR here: it was checked when the layer was built or loaded)."""
        return csr_format.unpack(self.crow, self.col, self.values, self.in_features, validate=False)

    @property
    def nnz(self) -> int:
        """The number of stored values."""
        return self.values.shape[0]

    @property
    def sparsity(self) -> float:
        """The fraction of the weight's entries not stored."""
        total = self.in_features * self.out_features
        return 1.0 - self.nnz / total if total else 0.0

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) in the layer's dtype -> (..., out_features)."""
        buffers = self._buffers
        x2, lead = flat_input(type(self).__name__, x, self.in_features, buffers["values"].dtype)
        y = call(_CSR_LINEAR, x2, buffers["crow"], buffers["col"], buffers["values"], buffers["bias"])
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        return checked_apply(self, fn, recurse, super()._apply, (self.crow, self.col), "integer CSR indices")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # col and values take the checkpoint's nnz (nn.Module's loader refuses a shape change).
        def shapes(incoming):
            nnz = incoming["values"].shape[0] if "values" in incoming else self.nnz
            return {"col": (nnz,), "values": (nnz,)}

        checked_load(self, _BUFFERS, state_dict, prefix, local_metadata, error_msgs,
                     lambda incoming, assign: _checkpoint_problems(incoming, self, assign),
                     lambda: super(CSRLinear, self)._load_from_state_dict(
                         state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs),
                     shapes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=CSR {self.values.dtype}, nnz={self.nnz} "
                f"({100 * self.sparsity:.1f}% sparse)")


_BUFFERS = ("crow", "col", "values", "bias")
_CSR_LINEAR = torch.ops.torchslim.csr_linear.default


def _checkpoint_problems(incoming: dict, module: CSRLinear, assign: bool) -> list[str]:
    problems = tensor_problems(incoming)
    if problems:
        return problems
    if assign:
        problems = assign_problems(incoming)
    N, K = module.out_features, module.in_features
    weight = [incoming.get(name) for name in ("crow", "col", "values")]
    if any(t is None for t in weight) and any(t is not None for t in weight):
        return ["crow, col and values are one weight: a checkpoint must hold all three or none"]
    if weight[0] is not None:
        crow, col, values = weight
        if crow.is_meta or col.is_meta:
            problems.append("crow and col of a checkpoint must hold values (they are on the meta device)")
        else:
            problems += csr_format.check(crow, col, values, K, N=N)
        if assign and col.dtype != module.col.dtype:
            problems.append(f"col: assign=True takes the checkpoint's tensor as it is, but its dtype {col.dtype} is "
                            f"not the layer's {module.col.dtype} (load without assign)")
    problems += bias_problems(incoming, module)
    if problems:
        return problems
    return float_problems(incoming, module, assign)
