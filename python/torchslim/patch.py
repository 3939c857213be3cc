"""patch_model / unpatch_model: swap nn.Linear layers for torchslim modules and back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .nn import CSRLinear, Int8Linear, LowRankLinear, Sparse24Linear

FilterFn = Callable[[nn.Module, str], bool]

# Modules patch_model creates, so unpatch_model knows what to turn back into nn.Linear.
_PATCHED_TYPES = (Int8Linear, Sparse24Linear, CSRLinear, LowRankLinear)


@dataclass
class Int8Config:
    """W8A8: per-channel int8 weights, per-token int8 activations (Int8Linear).

    filter_fn(module, fqn) -> bool chooses the nn.Linear layers to swap (default: all).
    smooth_scales maps a layer's fully qualified name (any of them, for a shared layer) to its
    SmoothQuant scale (in_features,).
    """

    filter_fn: FilterFn | None = None
    smooth_scales: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Per-layer settings given for names that patch_model does not convert (a typo, or a
        filtered-out layer): refused rather than silently ignored."""
        return set(self.smooth_scales) - set(converted)

    def convert(self, linear: nn.Linear, names: tuple[str, ...]) -> nn.Module:
        """The compressed module of linear, reachable in the model under names."""
        given = [name for name in names if name in self.smooth_scales]
        first = self.smooth_scales[given[0]] if given else None
        if any(not torch.equal(torch.as_tensor(self.smooth_scales[n]), torch.as_tensor(first)) for n in given[1:]):
            raise ValueError(f"Int8Config.smooth_scales gives the shared layer {names[0]} several scales "
                             f"(under {', '.join(given)})")
        return Int8Linear.from_linear(linear, smooth_scale=self.smooth_scales[given[0]] if given else None)


@dataclass
class Sparse24Config:
    """2:4 semi-structured sparsity (Sparse24Linear): in every group of four weights along K the two
    with the largest score stay.

    method: "magnitude" (score |W|) or "wanda" (|W| x the L2 norm of the input feature over
    calibration data; Sun et al. 2023). For "wanda", importance maps every converted layer's fully
    qualified name (any of them, for a shared layer) to its (in_features,) norms:
    compress.InputNorms collects them. filter_fn(module, fqn) -> bool chooses the layers (default: all).
    """

    method: str = "magnitude"
    importance: dict = field(default_factory=dict)
    filter_fn: FilterFn | None = None

    def __post_init__(self) -> None:
        if self.method not in ("magnitude", "wanda"):
            raise ValueError(f"Sparse24Config: method must be 'magnitude' or 'wanda', got {self.method!r}")
        _check_importance_dict(self.importance, self.method, "Sparse24Config")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Importances given for layers patch_model does not convert: refused, not ignored."""
        return set(self.importance) - set(converted)

    def convert(self, linear: nn.Linear, names: tuple[str, ...]) -> nn.Module:
        """The Sparse24Linear of linear, reachable in the model under names."""
        return Sparse24Linear.from_linear(linear, importance=_layer_importance(self.importance, self.method, names,
                                                                               "Sparse24Config"))


@dataclass
class CSRConfig:
    """Unstructured sparsity stored as CSR (CSRLinear).

    sparsity: the fraction of every output row's weights pruned (in [0, 1)); None keeps each
    weight's own zeros and prunes nothing (for a model pruned elsewhere). method: "magnitude"
    (score |W|) or "wanda" (|W| x the L2 norm of the input feature over calibration data, compared
    per output row; Sun et al. 2023). For "wanda", importance maps every converted layer's fully
    qualified name (any of them, for a shared layer) to its (in_features,) norms:
    compress.InputNorms collects them. filter_fn(module, fqn) -> bool chooses the layers (default: all).
    """

    sparsity: float | None = None
    method: str = "magnitude"
    importance: dict = field(default_factory=dict)
    filter_fn: FilterFn | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                          or not 0 <= self.sparsity < 1):
            raise ValueError(f"CSRConfig: sparsity must be a number in [0, 1) or None, got {self.sparsity!r}")
        if self.method not in ("magnitude", "wanda"):
            raise ValueError(f"CSRConfig: method must be 'magnitude' or 'wanda', got {self.method!r}")
        if self.method == "wanda" and self.sparsity is None:
            raise ValueError("CSRConfig: method='wanda' prunes to a sparsity; give one")
        _check_importance_dict(self.importance, self.method, "CSRConfig")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Importances given for layers patch_model does not convert: refused, not ignored."""
        return set(self.importance) - set(converted)

    def convert(self, linear: nn.Linear, names: tuple[str, ...]) -> nn.Module:
        """The CSRLinear of linear, reachable in the model under names."""
        importance = _layer_importance(self.importance, self.method, names, "CSRConfig")
        return CSRLinear.from_linear(linear, sparsity=self.sparsity, importance=importance)


@dataclass
class LowRankConfig:
    """Low rank (LowRankLinear): W ~ U V by truncated SVD, one fused kernel for (x V^T) U^T + b.

    The rank of every layer comes from exactly one of: rank (the same r everywhere); param_ratio, the
    fraction of each layer's parameters kept (r = floor(param_ratio * N K / (N + K))); energy, the
    fraction of each weight's squared singular values kept. None of them: param_ratio=0.5. A layer at
    whose rank low rank saves nothing (r >= N K / (N + K)) is refused (leave it out with filter_fn).
    whitening maps converted layers' fully qualified names (any of them, for a shared layer) to their
    input covariance (in_features, in_features), collected by compress.InputCovariance over calibration
    batches: those layers get the activation-aware (whitened, SVD-LLM) decomposition, which keeps the
    output error on such inputs far below plain SVD's. filter_fn(module, fqn) -> bool chooses the layers
    (default: all).
    """

    rank: int | None = None
    param_ratio: float | None = None
    energy: float | None = None
    whitening: dict = field(default_factory=dict)
    filter_fn: FilterFn | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("rank", "param_ratio", "energy") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"LowRankConfig: give one of rank, param_ratio and energy, got {', '.join(given)}")
        # Checked here so that a bad value fails before any layer is decomposed (choose_rank checks
        # each layer's rank against its shape).
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"LowRankConfig: rank must be an int >= 1, got {self.rank!r}")
        if self.param_ratio is not None and not _number_in(self.param_ratio, 0, 1, closed=False):
            raise ValueError(f"LowRankConfig: param_ratio must be a number in (0, 1), got {self.param_ratio!r}")
        if self.energy is not None and not _number_in(self.energy, 0, 1, closed=True):
            raise ValueError(f"LowRankConfig: energy must be a number in (0, 1], got {self.energy!r}")
        if not isinstance(self.whitening, dict):
            raise TypeError("LowRankConfig: whitening must be a dict {layer name: (in_features, in_features) "
                            f"covariance}}, got {type(self.whitening).__name__}")
        not_tensors = sorted(name for name, v in self.whitening.items() if not isinstance(v, torch.Tensor))
        if not_tensors:
            raise TypeError(f"LowRankConfig: whitening values must be tensors; not for {', '.join(not_tensors)}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Covariances given for layers patch_model does not convert: refused, not ignored."""
        return set(self.whitening) - set(converted)

    def convert(self, linear: nn.Linear, names: tuple[str, ...]) -> nn.Module:
        """The LowRankLinear of linear, reachable in the model under names."""
        given = [name for name in names if name in self.whitening]
        first = self.whitening[given[0]] if given else None
        if any(self.whitening[n].device != first.device or not torch.equal(self.whitening[n], first) for n in given[1:]):
            raise ValueError(f"LowRankConfig.whitening gives the shared layer {names[0]} several covariances "
                             f"(under {', '.join(given)})")
        default = self.rank is None and self.param_ratio is None and self.energy is None
        try:
            return LowRankLinear.from_linear(linear, rank=self.rank, energy=self.energy,
                                             param_ratio=0.5 if default else self.param_ratio, whitening=first)
        except ValueError as e:
            raise ValueError(f"LowRankConfig, layer {names[0]} ({linear.out_features} x {linear.in_features}): {e} "
                             "(patch_model's filter_fn can leave the layer dense)") from e


def _number_in(v, lo: float, hi: float, closed: bool) -> bool:
    """Whether v is a (non-bool) number in (lo, hi), or (lo, hi] when closed."""
    return (not isinstance(v, bool) and isinstance(v, (int, float)) and lo < v and (v <= hi if closed else v < hi))


def _check_importance_dict(importance, method: str, config: str) -> None:
    if not isinstance(importance, dict):
        raise TypeError(f"{config}: importance must be a dict {{layer name: (in_features,) tensor}}, "
                        f"got {type(importance).__name__}")
    not_tensors = sorted(name for name, v in importance.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise TypeError(f"{config}: importance values must be tensors (in_features,); not for {', '.join(not_tensors)}")
    if method == "magnitude" and importance:
        raise ValueError(f"{config}: importance is Wanda's input; with method='magnitude' it would be ignored")


def _layer_importance(importance: dict, method: str, names: tuple[str, ...], config: str):
    """The Wanda importance of the layer reachable under names (None for magnitude)."""
    if method == "magnitude":
        return None
    given = [name for name in names if name in importance]
    if not given:
        raise ValueError(f"{config}(method='wanda') has no importance for {names[0]}; collect the input "
                         "norms with torchslim.compress.InputNorms over calibration batches")
    first = importance[given[0]]
    if any(not torch.equal(importance[n], first) for n in given[1:]):
        raise ValueError(f"{config}.importance gives the shared layer {names[0]} several importances "
                         f"(under {', '.join(given)})")
    return first


_SHORTCUTS = {"int8": Int8Config, "2:4": Sparse24Config, "csr": CSRConfig, "lowrank": LowRankConfig}
_CONFIG_TYPES = (Int8Config, Sparse24Config, CSRConfig, LowRankConfig)


@dataclass
class PatchedLayer:
    name: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int
    aliases: tuple[str, ...] = ()  # other names of the same (shared) layer, swapped alike


@dataclass
class PatchReport:
    """What patch_model swapped, with weight bytes before and after (a shared layer counts once)."""

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
        for layer in self.layers:
            shared = f" (also {', '.join(layer.aliases)})" if layer.aliases else ""
            lines.append(f"  {layer.name}: {layer.in_features} -> {layer.out_features}{shared}")
        return "\n".join(lines)


def _module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _resolve_config(config) -> Int8Config | Sparse24Config | CSRConfig | LowRankConfig:
    if isinstance(config, str):
        if config not in _SHORTCUTS:
            raise ValueError(f"unknown method {config!r}; known: {sorted(_SHORTCUTS)}")
        return _SHORTCUTS[config]()
    if not isinstance(config, _CONFIG_TYPES):
        raise TypeError(f"patch_model: config must be one of {sorted(_SHORTCUTS)} or a config "
                        f"({', '.join(t.__name__ for t in _CONFIG_TYPES)}), got {config!r}")
    return config


def _sites(model: nn.Module, wanted, caller: str) -> dict[int, tuple[nn.Module, list[str]]]:
    """Every module of model that wanted(module) accepts, with all the names it is reachable under
    (a layer shared by several parents, or twice by one, has several), in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    if wanted(model):
        raise ValueError(f"{caller} swaps the layers inside a model and cannot replace the model object "
                         f"itself ({type(model).__name__}); convert a single layer with from_linear / to_linear")
    sites: dict[int, tuple[nn.Module, list[str]]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if fqn and wanted(module):
            sites.setdefault(id(module), (module, []))[1].append(fqn)
    return sites


# The hooks that watch a layer's inputs, outputs and gradients, which the replacement has too: it
# takes over the very dicts, so the handles users hold still remove them.
_HOOK_ATTRS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks", "_is_full_backward_hook")


def _swap_all(model: nn.Module, swaps: list[tuple[list[str], nn.Module, nn.Module]]) -> None:
    """Puts each new module at every name of its old one, with its hooks; all or nothing."""
    done = []
    try:
        for names, old, new in swaps:
            for attr in _HOOK_ATTRS:
                if hasattr(old, attr):
                    setattr(new, attr, getattr(old, attr))
            for fqn in names:
                _set_submodule(model, fqn, new)
                done.append((fqn, old))
    except BaseException:
        for fqn, old in reversed(done):
            _set_submodule(model, fqn, old)
        raise


def patch_model(model: nn.Module, config: str | Int8Config | Sparse24Config | CSRConfig | LowRankConfig,
                filter_fn: FilterFn | None = None) -> PatchReport:
    """Swaps, in place, every nn.Linear of model that the filter accepts for the module of config.

    config: a config dataclass or a shortcut string ("int8", "2:4" = magnitude 2:4, "csr" = CSR of each
    weight's own zeros, no pruning: CSRConfig(sparsity=...) prunes; "lowrank" = plain SVD keeping half of
    each layer's parameters). filter_fn(module, fqn), if given,
    overrides config.filter_fn. A layer reachable under several names (shared) becomes one
    compressed module at every site; the filter must then accept all its names or none. Every
    layer is converted before any is swapped, so a failure leaves the model unchanged. A model
    on the meta device is patched too (shapes only; load a checkpoint with assign=True).
    Returns a PatchReport; unpatch_model(model) swaps back.
    """
    config = _resolve_config(config)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"patch_model: filter_fn must be callable(module, fqn) -> bool, got {filter_fn!r}")
    keep = filter_fn or config.filter_fn or (lambda module, fqn: True)
    sites = _sites(model, lambda m: type(m) is nn.Linear, "patch_model")
    report = PatchReport(method=type(config).__name__)
    swaps = []
    for linear, names in sites.values():
        accepted = [fqn for fqn in names if keep(linear, fqn)]
        if not accepted:
            continue
        if len(accepted) != len(names):
            raise ValueError(f"patch_model: the layer {names[0]} is shared (also reachable as "
                             f"{', '.join(names[1:])}) but the filter accepts only {', '.join(accepted)}; "
                             "compressing one site would break the tie")
        new = config.convert(linear, tuple(names))
        swaps.append((names, linear, new))
        report.layers.append(PatchedLayer(names[0], linear.in_features, linear.out_features,
                                          _module_bytes(linear), _module_bytes(new), tuple(names[1:])))
    unused = config.unused_names([name for names, _, _ in swaps for name in names])
    if unused:
        raise ValueError(f"patch_model: {type(config).__name__} names layers that are not converted: "
                         f"{', '.join(sorted(unused))}")
    _swap_all(model, swaps)
    return report


def unpatch_model(model: nn.Module) -> nn.Module:
    """Swaps every torchslim module in model back to nn.Linear (holding the dequantized or pruned weights);
    a shared module becomes one shared nn.Linear. All or nothing, like patch_model."""
    sites = _sites(model, lambda m: isinstance(m, _PATCHED_TYPES), "unpatch_model")
    _swap_all(model, [(names, module, module.to_linear()) for module, names in sites.values()])
    return model


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
