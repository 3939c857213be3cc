"""The configs of patch_model, one per method (Int8Config, Sparse24Config, CSRConfig, LowRankConfig):
what each method needs from calibration, and how it converts one nn.Linear. AutoConfig is in auto.py."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .compress.calibration import LayerStats
from .compress.smoothquant import smooth_scales as _smooth_scales
from .nn import CSRLinear, Int8Linear, LowRankLinear, Sparse24Linear

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class Int8Config:
    """W8A8: per-channel int8 weights, per-token int8 activations (Int8Linear).

    filter_fn(module, fqn) -> bool chooses the nn.Linear layers to swap (default: patch_model's).
    smooth_scales maps a layer's fully qualified name (any of them, for a shared layer) to its
    SmoothQuant scale (in_features,). smooth_alpha (a number in [0, 1], e.g. 0.5): SmoothQuant for
    every other layer, its scale s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
    (compress.smooth_scales) from the input channels' absolute maxima over patch_model's calib_data
    (required then); None: no smoothing (or only the given smooth_scales).
    """

    filter_fn: FilterFn | None = None
    smooth_scales: dict = field(default_factory=dict)
    smooth_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")
        if not isinstance(self.smooth_scales, dict):
            raise TypeError("Int8Config: smooth_scales must be a dict {layer name: (in_features,) tensor}, got "
                            f"{type(self.smooth_scales).__name__}")
        not_tensors = sorted(str(name) for name, v in self.smooth_scales.items() if not isinstance(v, torch.Tensor))
        if not_tensors:
            raise TypeError(f"Int8Config: smooth_scales values must be tensors (in_features,); not for "
                            f"{', '.join(not_tensors)}")
        a = self.smooth_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1):
            raise ValueError(f"Int8Config: smooth_alpha must be a number in [0, 1] or None, got {self.smooth_alpha!r}")

    def calib_needs(self, names: tuple[str, ...]) -> dict[str, str]:
        """The calibration statistics the layer reachable under names needs, each with the refusal
        patch_model gives when it has no calib_data."""
        if self.smooth_alpha is None or any(name in self.smooth_scales for name in names):
            return {}
        return {"absmax": f"Int8Config(smooth_alpha={self.smooth_alpha}) computes {names[0]}'s SmoothQuant scale "
                          "from its input channels' maxima: pass calib_data= to patch_model (or give "
                          "smooth_scales=)"}

    def unused_names(self, converted: list[str]) -> set[str]:
        """Per-layer settings given for names that patch_model does not convert (a typo, or a
        filtered-out layer): refused rather than silently ignored."""
        return set(self.smooth_scales) - set(converted)

    def convert(self, linear: nn.Linear, names: tuple[str, ...], stats: LayerStats | None = None) -> nn.Module:
        """The compressed module of linear, reachable in the model under names (stats: its calibration
        statistics, where patch_model collected them)."""
        given = [name for name in names if name in self.smooth_scales]
        first = self.smooth_scales[given[0]] if given else None
        if any(not _same_value(self.smooth_scales[n], first) for n in given[1:]):
            raise ValueError(f"Int8Config.smooth_scales gives the shared layer {names[0]} several scales "
                             f"(under {', '.join(given)})")
        scale = first
        if scale is None and self.smooth_alpha is not None:
            absmax = _stat(stats, "absmax", self.calib_needs(names))
            with _naming(self, linear, names):
                scale = _smooth_scales(absmax, linear.weight, self.smooth_alpha)
        with _naming(self, linear, names):
            return Int8Linear.from_linear(linear, smooth_scale=scale)


class _PruneConfig:
    """What Sparse24Config and CSRConfig share: the pruning method and its statistics (Wanda's importance
    or calibration norms, SparseGPT's covariance). A subclass gives _sparsegpt_target() (the keyword of
    sparsegpt_prune) and _from_linear(linear, importance, pruned) (its module; pruned: linear's weight is
    already pruned to the target, so its zeros are kept as they are)."""

    def _check_prune_fields(self) -> None:
        name = type(self).__name__
        if self.method not in _PRUNE_METHODS:
            raise ValueError(f"{name}: method must be one of {', '.join(map(repr, _PRUNE_METHODS))}, "
                             f"got {self.method!r}")
        _check_importance_dict(self.importance, self.method, name)
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Importances given for layers patch_model does not convert: refused, not ignored."""
        return set(self.importance) - set(converted)

    def calib_needs(self, names: tuple[str, ...]) -> dict[str, str]:
        """The calibration statistics the layer needs (Wanda's input norms, SparseGPT's covariance), with
        patch_model's refusal."""
        return _prune_needs(self.importance, self.method, names, type(self).__name__)

    def convert(self, linear: nn.Linear, names: tuple[str, ...], stats: LayerStats | None = None) -> nn.Module:
        """The compressed module of linear, reachable in the model under names (stats: its calibration
        statistics, where patch_model collected them)."""
        name = type(self).__name__
        with _naming(self, linear, names):
            if self.method == "sparsegpt":
                return self._from_linear(_sparsegpt_linear(linear, names, stats, name, **self._sparsegpt_target()),
                                         None, pruned=True)
            importance = _layer_importance(self.importance, self.method, names, name, stats)
            return self._from_linear(linear, importance, pruned=False)


@dataclass
class Sparse24Config(_PruneConfig):
    """2:4 semi-structured sparsity (Sparse24Linear): in every group of four weights along K the two
    with the largest score stay.

    method: "magnitude" (score |W|), "wanda" (|W| x the L2 norm of the input feature over
    calibration data; Sun et al. 2023) or "sparsegpt" (Frantar & Alistarh 2023: pruned with the input
    Hessian from patch_model's calib_data, the kept weights updated to compensate; the most accurate,
    seconds per layer). For "wanda", importance maps converted layers' fully qualified names (any of
    them, for a shared layer) to their (in_features,) norms (compress.InputNorms collects them); the
    other layers' norms come from patch_model's calib_data.
    filter_fn(module, fqn) -> bool chooses the layers (default: patch_model's).
    """

    method: str = "magnitude"
    importance: dict = field(default_factory=dict)
    filter_fn: FilterFn | None = None

    def __post_init__(self) -> None:
        self._check_prune_fields()

    def _sparsegpt_target(self) -> dict:
        return {"pattern": "2:4"}

    def _from_linear(self, linear: nn.Linear, importance: Tensor | None, pruned: bool) -> nn.Module:
        # A weight already 2:4 passes the magnitude rule unchanged: it keeps exactly its non-zeros.
        return Sparse24Linear.from_linear(linear, importance=importance)


@dataclass
class CSRConfig(_PruneConfig):
    """Unstructured sparsity stored as CSR (CSRLinear).

    sparsity: the fraction of every output row's weights pruned (in [0, 1)); None keeps each
    weight's own zeros and prunes nothing (for a model pruned elsewhere). method: "magnitude"
    (score |W|), "wanda" (|W| x the L2 norm of the input feature over calibration data, compared
    per output row; Sun et al. 2023) or "sparsegpt" (pruned with the input Hessian from patch_model's
    calib_data, the same count per row, the kept weights updated to compensate; Frantar & Alistarh
    2023). For "wanda", importance maps converted layers' fully
    qualified names (any of them, for a shared layer) to their (in_features,) norms
    (compress.InputNorms collects them); the other layers' norms come from patch_model's calib_data.
    filter_fn(module, fqn) -> bool chooses the layers (default: patch_model's).
    """

    sparsity: float | None = None
    method: str = "magnitude"
    importance: dict = field(default_factory=dict)
    filter_fn: FilterFn | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                          or not 0 <= self.sparsity < 1):
            raise ValueError(f"CSRConfig: sparsity must be a number in [0, 1) or None, got {self.sparsity!r}")
        self._check_prune_fields()
        if self.method != "magnitude" and self.sparsity is None:
            raise ValueError(f"CSRConfig: method={self.method!r} prunes to a sparsity; give one")

    def _sparsegpt_target(self) -> dict:
        return {"sparsity": self.sparsity}

    def _from_linear(self, linear: nn.Linear, importance: Tensor | None, pruned: bool) -> nn.Module:
        # Already pruned: no sparsity, so CSRLinear keeps the weight's zeros as they are.
        return CSRLinear.from_linear(linear, sparsity=None if pruned else self.sparsity, importance=importance)


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
    output error on such inputs far below plain SVD's. whiten=True whitens every other layer too, with
    the covariance of its inputs over patch_model's calib_data (required then). filter_fn(module, fqn)
    -> bool chooses the layers (default: patch_model's).
    """

    rank: int | None = None
    param_ratio: float | None = None
    energy: float | None = None
    whitening: dict = field(default_factory=dict)
    filter_fn: FilterFn | None = None
    whiten: bool = False

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
        if not isinstance(self.whiten, bool):
            raise TypeError(f"LowRankConfig: whiten must be a bool, got {self.whiten!r}")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Covariances given for layers patch_model does not convert: refused, not ignored."""
        return set(self.whitening) - set(converted)

    def calib_needs(self, names: tuple[str, ...]) -> dict[str, str]:
        """The calibration statistics the layer needs (its input covariance, with whiten=True), with
        patch_model's refusal."""
        if not self.whiten or any(name in self.whitening for name in names):
            return {}
        return {"covariance": f"LowRankConfig(whiten=True) whitens {names[0]} by its input covariance: pass "
                              "calib_data= to patch_model (or give whitening=)"}

    def convert(self, linear: nn.Linear, names: tuple[str, ...], stats: LayerStats | None = None) -> nn.Module:
        """The LowRankLinear of linear, reachable in the model under names (stats: its calibration
        statistics, where patch_model collected them)."""
        given = [name for name in names if name in self.whitening]
        first = self.whitening[given[0]] if given else None
        if any(self.whitening[n].device != first.device or not torch.equal(self.whitening[n], first) for n in given[1:]):
            raise ValueError(f"LowRankConfig.whitening gives the shared layer {names[0]} several covariances "
                             f"(under {', '.join(given)})")
        if first is None and self.whiten:
            first = _stat(stats, "covariance", self.calib_needs(names))
        default = self.rank is None and self.param_ratio is None and self.energy is None
        with _naming(self, linear, names, hint=" (patch_model's filter_fn can leave the layer dense)"):
            return LowRankLinear.from_linear(linear, rank=self.rank, energy=self.energy,
                                             param_ratio=0.5 if default else self.param_ratio, whitening=first)


@contextmanager
def _naming(config, linear: nn.Linear, names: tuple[str, ...], hint: str = ""):
    """Names the layer in any error its conversion raises: "Int8Config, layer <name> (N x K): <error>"."""
    try:
        yield
    except (ValueError, TypeError, RuntimeError) as e:
        where = f"{type(config).__name__}, layer {names[0]} ({linear.out_features} x {linear.in_features})"
        if type(e) in (ValueError, TypeError, RuntimeError):
            raise type(e)(f"{where}: {e}{hint}") from e
        e.add_note(f"(while converting {where})")  # a subclass (an out-of-memory error, ...): kept as it is
        raise


def _same_value(a, b) -> bool:
    """Whether two config values are equal: tensors by value (same dtype, shape and device), dicts,
    lists, tuples and dataclasses (configs) item by item, the rest by ==."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device) or a.is_meta:
            return False
        return bool(torch.equal(a, b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return (type(a) is type(b) and
                all(_same_value(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.compare))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


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
    if method != "wanda" and importance:
        raise ValueError(f"{config}: importance is Wanda's input; with method={method!r} it would be ignored")


# The pruning scores of Sparse24Config and CSRConfig.
_PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
# SparseGPT's Hessian damping, relative to mean(diag(H)): 0.1 measured best on all-MiniLM-L6-v2 with ~900
# calibration tokens (0.001 / 0.01 / 0.1 / 1: 2:4 mean cosine 0.81 / 0.84 / 0.86 / 0.84), where layers
# with 1536 inputs see fewer tokens than features; the paper's 0.01 assumes far more tokens.
SPARSEGPT_DAMPING = 0.1


def _prune_needs(importance: dict, method: str, names: tuple[str, ...], config: str) -> dict[str, str]:
    if method == "sparsegpt":
        return {"covariance": f"{config}(method='sparsegpt') prunes with the input Hessian of {names[0]}: pass "
                              "calib_data= to patch_model (one pass collects it)"}
    return _wanda_needs(importance, method, names, config)


def _sparsegpt_linear(linear: nn.Linear, names: tuple[str, ...], stats: LayerStats | None, config: str,
                      **target) -> nn.Linear:
    """A copy of linear whose weight SparseGPT pruned (and updated) with the layer's input covariance."""
    from .compress.sparsegpt import sparsegpt_prune

    covariance = _stat(stats, "covariance", _prune_needs({}, "sparsegpt", names, config))
    pruned = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       device="meta")  # shapes only: the tensors below replace its parameters
    pruned.weight = nn.Parameter(sparsegpt_prune(linear.weight.detach(), covariance, damping=SPARSEGPT_DAMPING,
                                                 **target), requires_grad=False)
    if linear.bias is not None:
        pruned.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return pruned


def _wanda_needs(importance: dict, method: str, names: tuple[str, ...], config: str) -> dict[str, str]:
    if method == "magnitude" or any(name in importance for name in names):
        return {}
    return {"norms": f"{config}(method='wanda') has no importance for {names[0]}: pass calib_data= to "
                     "patch_model (one pass collects the input norms), or importance= (collected with "
                     "torchslim.compress.InputNorms over calibration batches)"}


def _stat(stats: LayerStats | None, what: str, needs: dict[str, str]):
    """The calibration statistic `what` of a layer, or the config's refusal (needs[what]) without it."""
    value = getattr(stats, what, None) if stats is not None else None
    if value is None:
        raise ValueError(needs[what])
    return value


def _layer_importance(importance: dict, method: str, names: tuple[str, ...], config: str,
                      stats: LayerStats | None = None):
    """The Wanda importance of the layer reachable under names (None for magnitude): the given one, else
    the input norms patch_model collected from calib_data."""
    if method == "magnitude":
        return None
    given = [name for name in names if name in importance]
    if not given:
        return _stat(stats, "norms", _wanda_needs(importance, method, names, config))
    first = importance[given[0]]
    if any(not torch.equal(importance[n], first) for n in given[1:]):
        raise ValueError(f"{config}.importance gives the shared layer {names[0]} several importances "
                         f"(under {', '.join(given)})")
    return first


_SHORTCUTS = {"int8": Int8Config, "2:4": Sparse24Config, "csr": CSRConfig, "lowrank": LowRankConfig}
_CONFIG_TYPES = (Int8Config, Sparse24Config, CSRConfig, LowRankConfig)
# The method name of each config, as the report and AutoConfig's `methods` spell it.
METHOD_NAMES = {Int8Config: "int8", Sparse24Config: "2:4", CSRConfig: "csr", LowRankConfig: "lowrank"}
