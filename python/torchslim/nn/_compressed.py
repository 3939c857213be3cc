"""What the compressed Linear modules share: the input check of forward, the guarded _apply, and the
checks of a checkpoint's float tensors."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import _FLOATS as FLOATS


def flat_input(layer: str, x: Tensor, K: int, dtype: torch.dtype) -> tuple[Tensor, torch.Size]:
    """x (..., K) in the layer's dtype as a contiguous (M, K) matrix, with its leading shape."""
    if x.dim() == 0 or x.shape[-1] != K:
        raise RuntimeError(f"{layer}(in_features={K}): x must have {K} features in its last dimension, "
                           f"got shape {list(x.shape)}")
    if x.dtype != dtype:
        raise RuntimeError(f"{layer}: x is {x.dtype} but the layer is {dtype} (as nn.Linear, the input must "
                           "have the layer's dtype)")
    return (x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)).contiguous(), x.shape[:-1]


def copy_bias(module: nn.Module, linear: nn.Linear, caller: str) -> None:
    """linear's bias into module's (from_linear), refusing NaN or Inf."""
    if linear.bias is not None:
        if not bool(torch.isfinite(linear.bias).all()):
            raise ValueError(f"{caller}: the layer's bias holds NaN or Inf")
        module.bias.copy_(linear.bias.detach())


def dense_linear(module: nn.Module, weight: str = "values") -> nn.Linear:
    """The dense nn.Linear of a compressed layer (its dense_weight(), with the dtype and device of its
    float weight buffer `weight`)."""
    ref = getattr(module, weight)
    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                    device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        lin.weight.copy_(module.dense_weight())
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin


def checked_apply(module: nn.Module, fn, recurse: bool, apply, index_buffers: tuple[Tensor, ...], what: str,
                  weight: str = "values"):
    """module._apply(fn) (apply: nn.Module's, bound) for a compressed layer: device moves and float
    casts (.half(), .to(torch.bfloat16)) reach its float buffers and bias alike; a conversion that
    would change an integer index buffer (what names them), or make the float weight buffer `weight`
    a dtype the kernels lack, is refused before a buffer changes; a failure part-way restores every
    buffer."""
    name = type(module).__name__
    ref = getattr(module, weight)
    device = ref.device
    for t in index_buffers:
        if fn(torch.empty(0, dtype=t.dtype, device=device)).dtype != t.dtype:
            raise TypeError(f"{name}: this conversion would change the {what}; use to_linear() first")
    probe = fn(torch.empty(0, dtype=ref.dtype, device=device))
    if probe.dtype not in FLOATS:
        raise TypeError(f"{name}: this conversion would make the weight {probe.dtype}; {name} runs on "
                        "float32, bfloat16 or float16")
    before = dict(module._buffers)
    try:
        return apply(fn, recurse)
    except BaseException:
        module._buffers.clear()
        module._buffers.update(before)
        raise


def tensor_problems(incoming: dict) -> list[str]:
    """A checkpoint's entries for a compressed layer that are not (dense, strided) tensors: the later
    checks and the kernels read a sparse tensor's values as if it were dense."""
    return [f"{name}: expected a tensor, got {type(t).__name__}" if not isinstance(t, Tensor) else
            f"{name}: expected a dense (strided) tensor, got layout {t.layout}"
            for name, t in incoming.items() if not isinstance(t, Tensor) or t.layout != torch.strided]


def bias_problems(incoming: dict, module: nn.Module) -> list[str]:
    """A checkpoint's bias for a layer with one: a float tensor of shape (out_features,)."""
    bias, N = incoming.get("bias"), module.out_features
    if bias is not None and module.bias is not None and (bias.shape != (N,) or not bias.is_floating_point()):
        return [f"bias must be a float tensor of shape ({N},), got {bias.dtype} of shape {tuple(bias.shape)}"]
    return []


def checked_load(module: nn.Module, buffers, state_dict, prefix: str, local_metadata, error_msgs: list,
                 problems_of, load, shapes_of=None) -> None:
    """A compressed layer's _load_from_state_dict. The checkpoint's tensors for `buffers` are checked as
    a whole by problems_of(incoming, assign) before anything is written (problems go to error_msgs,
    named with the prefix); then load() (nn.Module's loader, bound to its arguments) runs into fresh
    buffers of the shapes shapes_of(incoming) gives ({name: shape}: a checkpoint's own nnz or rank;
    else the current shapes). nn.Module's loader copies into buffers in place and goes on past a copy
    that fails, so without fresh buffers a failure part-way would leave some of ours overwritten; here
    it restores them all. With assign=True the checkpoint's tensors are made contiguous (the kernels
    need it)."""
    incoming = {name: state_dict[prefix + name] for name in buffers if prefix + name in state_dict}
    assign = local_metadata.get("assign_to_params_buffers", False)
    problems = problems_of(incoming, assign)
    if problems:
        error_msgs.extend(f"{prefix}{p}" for p in problems)
        return
    shapes = shapes_of(incoming) if shapes_of else {}
    before, errors = dict(module._buffers), len(error_msgs)
    for name in incoming:
        current = module._buffers.get(name)
        if current is not None:
            module._buffers[name] = current.new_empty(shapes.get(name, current.shape))
    load()
    if len(error_msgs) > errors:
        module._buffers.clear()
        module._buffers.update(before)
    elif assign:
        make_contiguous(module, incoming)


def make_contiguous(module: nn.Module, names) -> None:
    """After load_state_dict(assign=True), which takes the checkpoint's tensors themselves: the kernels
    need them contiguous."""
    for name in names:
        if module._buffers.get(name) is not None:
            module._buffers[name] = module._buffers[name].contiguous()


def assign_problems(incoming: dict) -> list[str]:
    """With assign=True the checkpoint's tensors become the layer's buffers as they are: they must be
    on one device, and none may require grad (the compressed weight is a frozen buffer)."""
    problems = []
    devices = sorted({str(t.device) for t in incoming.values()})
    if len(devices) > 1:
        problems.append("assign=True takes the checkpoint's tensors as they are, but they are on several devices "
                        f"({', '.join(devices)})")
    grads = sorted(name for name, t in incoming.items() if t.requires_grad)
    if grads:
        problems.append(f"{', '.join(grads)}: assign=True takes the checkpoint's tensors as they are, but these "
                        "require grad, and the compressed weight is a frozen buffer (detach them)")
    return problems


def float_problems(incoming: dict, module: nn.Module, assign: bool, names=("values", "bias")) -> list[str]:
    """What is wrong with a checkpoint's float tensors for module: with assign, a dtype other than
    the layer's (the tensor is taken as it is); otherwise, NaN or Inf once cast to the layer's dtype."""
    problems = []
    for name in names:
        t, target = incoming.get(name), module._buffers.get(name)
        if t is None or target is None:
            continue
        if assign and t.dtype != target.dtype:
            problems.append(f"{name}: assign=True takes the checkpoint's tensor as it is, but its dtype {t.dtype} "
                            f"is not the layer's {target.dtype} (convert the module first, or load without assign)")
        elif not t.is_meta and not bool(torch.isfinite(t.to(target.dtype)).all()):
            problems.append(f"{name} hold NaN or Inf" + (f" once cast to the layer's {target.dtype}"
                                                           if t.dtype != target.dtype else ""))
    return problems


def layer_spec(module: nn.Module, dtype: torch.dtype, **facts) -> dict:
    """A compressed layer's constructor facts, as JSON values (torchslim.save_compressed records them
    per layer; _from_layer_spec rebuilds the empty layer from them): in/out features, whether it has
    a bias, its float dtype by name, and the class's own facts (facts: JSON values too)."""
    return {"in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "dtype": dtype_name(dtype), **facts}


def spec_int(spec: dict, key: str, layer: str) -> int:
    """A layer spec's count `key` (in/out features, rank, nnz): a non-negative int, else a ValueError."""
    v = spec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{layer}: {key} must be a non-negative int, got {v!r}")
    return v


def spec_shapes(spec: dict, layer: str, **shapes) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors a layer of spec stores (its state_dict): shapes plus the bias
    (out_features,) where spec has one. Computed from the spec's numbers alone, nothing allocated, so
    that a reader can check a file's record against its tensors before building the layer."""
    if spec.get("bias"):
        shapes["bias"] = (spec_int(spec, "out_features", layer),)
    return shapes


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def spec_dtype(spec: dict, layer: str) -> torch.dtype:
    """The float dtype a layer spec names (layer_spec's 'dtype'); another name is refused."""
    for dtype in FLOATS:
        if dtype_name(dtype) == spec["dtype"]:
            return dtype
    raise ValueError(f"{layer}: dtype must be one of {', '.join(dtype_name(d) for d in FLOATS)}, "
                     f"got {spec['dtype']!r}")
