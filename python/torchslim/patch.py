"""patch_model / unpatch_model: swap nn.Linear layers for torchslim modules and back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .nn import Int8Linear

FilterFn = Callable[[nn.Module, str], bool]

# Modules patch_model creates, so unpatch_model knows what to turn back into nn.Linear.
_PATCHED_TYPES = (Int8Linear,)


@dataclass
class Int8Config:
    """W8A8: per-channel int8 weights, per-token int8 activations (Int8Linear).

    filter_fn(module, fqn) -> bool chooses the nn.Linear layers to swap (default: all).
    smooth_scales maps a layer's fully qualified name to its SmoothQuant scale (in_features,).
    """

    filter_fn: FilterFn | None = None
    smooth_scales: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def convert(self, linear: nn.Linear, fqn: str) -> nn.Module:
        return Int8Linear.from_linear(linear, smooth_scale=self.smooth_scales.get(fqn))


_SHORTCUTS = {"int8": Int8Config}


@dataclass
class PatchedLayer:
    name: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int


@dataclass
class PatchReport:
    """What patch_model swapped, with weight bytes before and after."""

    method: str
    layers: list[PatchedLayer] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def __str__(self) -> str:
        lines = [f"torchslim {self.method}: {len(self.layers)} layers swapped, "
                 f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"]
        lines += [f"  {layer.name}: {layer.in_features} -> {layer.out_features}" for layer in self.layers]
        return "\n".join(lines)


def _module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def patch_model(model: nn.Module, config: str | Int8Config, filter_fn: FilterFn | None = None) -> PatchReport:
    """Swaps, in place, every nn.Linear of model that the filter accepts for the module of config.

    config: a config dataclass or a shortcut string ("int8"). filter_fn(module, fqn), if given,
    overrides config.filter_fn. Returns a PatchReport; unpatch_model(model) swaps back.
    """
    if isinstance(config, str):
        if config not in _SHORTCUTS:
            raise ValueError(f"unknown method {config!r}; known: {sorted(_SHORTCUTS)}")
        config = _SHORTCUTS[config]()
    keep = filter_fn or config.filter_fn or (lambda module, fqn: True)
    report = PatchReport(method=type(config).__name__)
    targets = [(fqn, m) for fqn, m in model.named_modules()
               if type(m) is nn.Linear and keep(m, fqn)]
    for fqn, linear in targets:
        new = config.convert(linear, fqn)
        _set_submodule(model, fqn, new)
        report.layers.append(PatchedLayer(fqn, linear.in_features, linear.out_features,
                                          _module_bytes(linear), _module_bytes(new)))
    return report


def unpatch_model(model: nn.Module) -> nn.Module:
    """Swaps every torchslim module in model back to nn.Linear (holding the dequantized weights)."""
    targets = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, _PATCHED_TYPES)]
    for fqn, module in targets:
        _set_submodule(model, fqn, module.to_linear())
    return model


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
