"""patch_model / unpatch_model: swap nn.Linear layers for torchslim modules and back."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compress.calibration import LayerStats
from .compress.smoothquant import smooth_scales as _smooth_scales
from .nn import CSRLinear, Int8Linear, LowRankLinear, Sparse24Linear

FilterFn = Callable[[nn.Module, str], bool]

# Modules patch_model creates, so unpatch_model knows what to turn back into nn.Linear.
_PATCHED_TYPES = (Int8Linear, Sparse24Linear, CSRLinear, LowRankLinear)


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


@dataclass
class Sparse24Config:
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
        if self.method not in _PRUNE_METHODS:
            raise ValueError(f"Sparse24Config: method must be one of {', '.join(map(repr, _PRUNE_METHODS))}, "
                             f"got {self.method!r}")
        _check_importance_dict(self.importance, self.method, "Sparse24Config")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Importances given for layers patch_model does not convert: refused, not ignored."""
        return set(self.importance) - set(converted)

    def calib_needs(self, names: tuple[str, ...]) -> dict[str, str]:
        """The calibration statistics the layer needs (Wanda's input norms, SparseGPT's covariance), with
        patch_model's refusal."""
        return _prune_needs(self.importance, self.method, names, "Sparse24Config")

    def convert(self, linear: nn.Linear, names: tuple[str, ...], stats: LayerStats | None = None) -> nn.Module:
        """The Sparse24Linear of linear, reachable in the model under names (stats: its calibration
        statistics, where patch_model collected them)."""
        with _naming(self, linear, names):
            if self.method == "sparsegpt":  # already 2:4: the magnitude rule keeps exactly its non-zeros
                return Sparse24Linear.from_linear(_sparsegpt_linear(linear, names, stats, "Sparse24Config",
                                                                    pattern="2:4"))
            importance = _layer_importance(self.importance, self.method, names, "Sparse24Config", stats)
            return Sparse24Linear.from_linear(linear, importance=importance)


@dataclass
class CSRConfig:
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
        if self.method not in _PRUNE_METHODS:
            raise ValueError(f"CSRConfig: method must be one of {', '.join(map(repr, _PRUNE_METHODS))}, "
                             f"got {self.method!r}")
        if self.method != "magnitude" and self.sparsity is None:
            raise ValueError(f"CSRConfig: method={self.method!r} prunes to a sparsity; give one")
        _check_importance_dict(self.importance, self.method, "CSRConfig")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")

    def unused_names(self, converted: list[str]) -> set[str]:
        """Importances given for layers patch_model does not convert: refused, not ignored."""
        return set(self.importance) - set(converted)

    def calib_needs(self, names: tuple[str, ...]) -> dict[str, str]:
        """The calibration statistics the layer needs (Wanda's input norms, SparseGPT's covariance), with
        patch_model's refusal."""
        return _prune_needs(self.importance, self.method, names, "CSRConfig")

    def convert(self, linear: nn.Linear, names: tuple[str, ...], stats: LayerStats | None = None) -> nn.Module:
        """The CSRLinear of linear, reachable in the model under names (stats: its calibration
        statistics, where patch_model collected them)."""
        with _naming(self, linear, names):
            if self.method == "sparsegpt":  # already pruned: CSRLinear keeps its zeros
                return CSRLinear.from_linear(_sparsegpt_linear(linear, names, stats, "CSRConfig",
                                                               sparsity=self.sparsity))
            importance = _layer_importance(self.importance, self.method, names, "CSRConfig", stats)
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

# The names of output heads, which patch_model leaves dense unless a filter or an explicit pattern says
# otherwise: a layer whose fully qualified name has a component in OUTPUT_HEAD_NAMES (lm_head: causal LMs,
# RoBERTa's masked-LM lm_head.dense / lm_head.decoder; cls: BERT's masked-LM cls.predictions.*; classifier:
# BERT-style sequence/token classification, RoBERTa's classifier.dense / classifier.out_proj; pooler:
# BERT's pooler.dense; score: Llama-style sequence classification).
OUTPUT_HEAD_NAMES = ("lm_head", "cls", "classifier", "pooler", "score")


def is_output_head(fqn: str) -> bool:
    """Whether the layer named fqn is an output head patch_model leaves dense by default: a component of
    its name is one of OUTPUT_HEAD_NAMES. Heads are small next to the model (or, for a vocabulary
    projection, sensitive), and their error reaches the output unattenuated."""
    return any(part in OUTPUT_HEAD_NAMES for part in fqn.split("."))


def default_filter(module: nn.Module, fqn: str) -> bool:
    """patch_model's default filter_fn: every nn.Linear but the output heads (is_output_head)."""
    return not is_output_head(fqn)


@dataclass
class PatchedLayer:
    """One nn.Linear in a PatchReport. method: "int8", "2:4", "csr", "lowrank" (swapped) or "dense" (kept);
    params: the weight values the layer stores (the int8 weights, the kept non-zeros for 2:4 and CSR, U
    and V's for low rank) plus its bias; bytes: all its tensors; error: the relative output error
    ||y_c - y|| / ||y|| on (a sample of up to max_tokens rows of) the layer's inputs over calib_data, None
    without calibration; reason: why it stays dense, or why AutoConfig chose its method; candidates:
    AutoConfig's measurements, method -> {"error", "time_ms"} (and "note" where the method does not
    apply), "dense" included."""

    name: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int
    aliases: tuple[str, ...] = ()  # other names of the same (shared) layer, swapped alike
    method: str = ""
    params_before: int = 0
    params_after: int = 0
    error: float | None = None
    reason: str = ""
    candidates: dict | None = None


@dataclass
class PatchReport:
    """What patch_model swapped (layers), with weight bytes and parameters before and after (a shared
    layer counts once), each layer's method and relative output error on the calibration data; kept_dense
    lists the nn.Linear layers left dense, each with its reason (filter_fn, an output head, a pattern
    mapped to None, AutoConfig's choice). str(report) is a table; to_dict() is JSON-serialisable."""

    method: str
    layers: list[PatchedLayer] = field(default_factory=list)
    kept_dense: list[PatchedLayer] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    def to_dict(self) -> dict:
        """The report as plain dicts, lists, strings and numbers (json.dumps takes it); a NaN or infinite
        error or time (calibration data holding Inf) is None, so that strict JSON parsers accept it."""
        def layer(entry: PatchedLayer) -> dict:
            d = _finite_or_none(asdict(entry))
            d["aliases"] = list(entry.aliases)
            return d
        return {"method": self.method, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "layers": [layer(entry) for entry in self.layers],
                "kept_dense": [layer(entry) for entry in self.kept_dense]}

    def __str__(self) -> str:
        lines = [f"torchslim {self.method}: {len(self.layers)} layers swapped, "
                 f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"
                 + (f", {len(self.kept_dense)} kept dense" if self.kept_dense else "")]
        rows = [("layer", "shape", "method", "params", "KiB", "error", "why")]
        for entry in self.layers + self.kept_dense:
            shared = f" (also {', '.join(entry.aliases)})" if entry.aliases else ""
            swapped = entry.method != "dense"
            rows.append((entry.name + shared, f"{entry.in_features} -> {entry.out_features}", entry.method,
                         f"{entry.params_before} -> {entry.params_after}" if swapped else f"{entry.params_before}",
                         (f"{entry.bytes_before / 1024:.1f} -> {entry.bytes_after / 1024:.1f}" if swapped
                          else f"{entry.bytes_before / 1024:.1f}"),
                         "-" if entry.error is None else f"{entry.error:.2e}", entry.reason + _measured(entry.candidates)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        return "\n".join(line.rstrip() for line in lines)


def _finite_or_none(value):
    """value with every NaN or infinite float (in dicts and lists) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _measured(candidates: dict | None) -> str:
    """AutoConfig's measurements, compactly: " [dense 0.1 ms; int8 err 8e-03 0.05 ms; ...]"."""
    if not candidates:
        return ""
    parts = []
    for method, m in candidates.items():
        if m.get("time_ms") is None:
            parts.append(f"{method} n/a")
        else:
            err = "" if method == "dense" or m.get("error") is None else f" err {m['error']:.2g}"
            parts.append(f"{method}{err} {m['time_ms']:.3g} ms")
    return " [" + "; ".join(parts) + "]"


def _module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _param_count(module: nn.Module) -> int:
    """The weight values module stores (see PatchedLayer), plus its bias."""
    bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    if isinstance(module, LowRankLinear):
        return module.U.numel() + module.V.numel() + bias
    if isinstance(module, (Sparse24Linear, CSRLinear)):
        return module.values.numel() + bias
    return module.in_features * module.out_features + bias  # nn.Linear, Int8Linear (packed or not)


def _resolve_config(config, caller: str = "patch_model"):
    """config as a config object: a shortcut string resolved, an AutoConfig or config taken as is."""
    from .auto import AutoConfig

    if isinstance(config, str):
        if config == "auto":
            return AutoConfig()
        if config not in _SHORTCUTS:
            raise ValueError(f"unknown method {config!r}; known: {sorted(_SHORTCUTS) + ['auto']}")
        return _SHORTCUTS[config]()
    if not isinstance(config, _CONFIG_TYPES + (AutoConfig,)):
        raise TypeError(f"{caller}: config must be one of {sorted(_SHORTCUTS)} or a config "
                        f"({', '.join(t.__name__ for t in _CONFIG_TYPES)}), got {config!r}; or 'auto' / "
                        "AutoConfig, or a dict {module-name glob: config or None}")
    return config


def _config_name(config) -> str:
    return METHOD_NAMES.get(type(config), type(config).__name__)


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


@dataclass
class _Site:
    """One nn.Linear of the model and what patch_model does with it: config (None: kept dense, for reason).
    configs: every config object its names resolve to (equal ones, for a shared layer under several
    patterns), so that each counts the layer as converted."""

    linear: nn.Linear
    names: tuple[str, ...]
    config: object = None
    reason: str = ""
    configs: tuple = ()


# The reason of a layer that the default head filter keeps dense.
_HEAD_REASON = "output head (default filter)"


def _plan(model: nn.Module, config, filter_fn: FilterFn | None) -> list[_Site]:
    """Every nn.Linear of model with the config it gets (None where it stays dense, with the reason)."""
    is_dict = isinstance(config, dict)
    if is_dict:
        entries = []
        cache: dict[str, object] = {}
        for pattern, value in config.items():
            if not isinstance(pattern, str):
                raise TypeError(f"patch_model: a config dict maps module-name glob patterns (str) to configs, "
                                f"got the key {pattern!r}")
            if isinstance(value, str):
                value = cache.setdefault(value, _resolve_config(value))
            elif value is not None:
                value = _resolve_config(value)
            entries.append((pattern, value))
    else:
        entries = [("*", _resolve_config(config))]
    linears = [(linear, tuple(names)) for linear, names in
               _sites(model, lambda m: type(m) is nn.Linear, "patch_model").values()]
    if is_dict:  # a pattern that matches nothing is a typo (as a per-layer setting for a name the model lacks)
        every = [fqn for _, names in linears for fqn in names]
        unmatched = [p for p, _ in entries if p != "*" and not any(fnmatch.fnmatchcase(fqn, p) for fqn in every)]
        if unmatched:
            raise ValueError(f"patch_model: the config pattern{'s' if len(unmatched) > 1 else ''} "
                             f"{', '.join(map(repr, unmatched))} match{'' if len(unmatched) > 1 else 'es'} no "
                             "nn.Linear of the model (patterns are fnmatch globs on fully qualified names, e.g. "
                             f"{every[0] if every else 'encoder.layer.0.output.dense'!r})")

    plan = []
    for linear, names in linears:
        matched = [next(((p, c) for p, c in entries if fnmatch.fnmatchcase(fqn, p)), None) for fqn in names]
        cfgs = [m[1] if m else None for m in matched]  # None: a pattern -> None, or no pattern: dense alike
        if any(not _same_value(c, cfgs[0]) for c in cfgs[1:]):
            said = "; ".join(f"{fqn} -> " + (f"pattern {m[0]!r} ({_config_name(m[1]) if m[1] else None})" if m
                                             else "no pattern (dense)") for fqn, m in zip(names, matched))
            raise ValueError(f"patch_model: the layer {names[0]} is shared (one module under several names) but its "
                             f"names resolve to different configs: {said}; give them the same config")
        cfg = cfgs[0]
        if cfg is None:
            match = next((m for m in matched if m), None)
            plan.append(_Site(linear, names, None, f"pattern {match[0]!r} -> None" if match
                              else "no pattern matches"))
            continue
        # Each name: accepted or not, and whether by the default head filter. patch_model's filter_fn
        # decides (in a dict, with the config's own filter_fn); else the config's own filter_fn; else, in a
        # dict, a pattern that is the layer's very name compresses it; else the default head filter.
        by_user, by_default = [], []
        for fqn, (pattern, c) in zip(names, matched):
            own = c.filter_fn
            if filter_fn is not None:
                by_user.append((fqn, bool(filter_fn(linear, fqn)) and
                                (not is_dict or own is None or bool(own(linear, fqn)))))
            elif own is not None:
                by_user.append((fqn, bool(own(linear, fqn))))
            elif is_dict and pattern == fqn:
                by_user.append((fqn, True))
            else:
                by_default.append((fqn, default_filter(linear, fqn)))
        accepted = [fqn for fqn, ok in by_user + by_default if ok]
        refused_by_user = [fqn for fqn, ok in by_user if not ok]
        if refused_by_user and accepted:
            raise ValueError(f"patch_model: the layer {names[0]} is shared (also reachable as "
                             f"{', '.join(names[1:])}) but the filter accepts only {', '.join(accepted)}; "
                             "compressing one site would break the tie")
        if refused_by_user:
            plan.append(_Site(linear, names, None, "filter_fn"))
        elif not all(ok for _, ok in by_default):  # a name of the layer is an output head: all stay dense
            plan.append(_Site(linear, names, None, _HEAD_REASON))
        else:
            plan.append(_Site(linear, names, cfg, configs=tuple({id(c): c for c in cfgs}.values())))
    return plan


# A progress bar appears only for compressions that take longer than this (tqdm's delay).
_PROGRESS_DELAY_S = 1.0


def _progress(enabled: bool, desc: str, total: int | None = None, unit: str = "it"):
    """A function wrapping an iterable in a tqdm progress bar (on stderr), or None: progress off, or
    tqdm not installed (it is optional)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda iterable: tqdm(iterable, desc=desc, total=total if total is not None else _len(iterable),
                                 unit=unit, delay=_PROGRESS_DELAY_S, leave=False)


def _len(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def bare_forward(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The module's own computation, without its hooks (a user's forward hooks, or pre-hooks that would
    see the calibration sample a second time): F.linear for an nn.Linear, the forward method otherwise."""
    if type(module) is nn.Linear:
        return lambda x: F.linear(x, module.weight, module.bias)
    return type(module).forward.__get__(module)


def relative_error(reference: nn.Module, compressed: nn.Module, x: Tensor | None) -> float | None:
    """||compressed(x) - reference(x)|| / ||reference(x)|| (Frobenius, in float64) over the rows x (M, K),
    each module run bare (bare_forward: no hook fires); None without x (or on the meta device); 0 / 0
    counts as 0 and a non-zero error on a zero output as inf."""
    if x is None or x.is_meta or x.shape[0] == 0:
        return None
    with torch.no_grad():
        y = bare_forward(reference)(x).double()
        diff = (bare_forward(compressed)(x).double() - y).norm()
        ref = y.norm()
    if ref == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / ref)


def _dense_entry(site: _Site) -> PatchedLayer:
    """The report entry of a layer as it is (dense), with the site's reason."""
    linear = site.linear
    return PatchedLayer(site.names[0], linear.in_features, linear.out_features, _module_bytes(linear),
                        _module_bytes(linear), site.names[1:], "dense", _param_count(linear), _param_count(linear),
                        reason=site.reason)


def patch_model(model: nn.Module, config, *, filter_fn: FilterFn | None = None, calib_data=None,
                progress: bool = True, max_tokens: int = 512) -> PatchReport:
    """Swaps, in place, the nn.Linear layers of model for compressed modules and returns a PatchReport.

    config: a shortcut string ("int8"; "2:4" = magnitude 2:4; "csr" = CSR of each weight's own zeros, no
    pruning: CSRConfig(sparsity=...) prunes; "lowrank" = plain SVD keeping half of each layer's parameters;
    "auto" = AutoConfig()), a config (Int8Config, Sparse24Config, CSRConfig, LowRankConfig, AutoConfig),
    or a dict from module-name glob patterns (fnmatch on the fully qualified name, e.g. "*.attention.*")
    to a config, a shortcut or None: each layer takes the first pattern its name matches; None, or no
    matching pattern, leaves it dense. A pattern other than "*" that matches no nn.Linear of the model (a
    typo) is refused. A layer reachable under several names (shared) becomes one compressed module at
    every site, so all its names must resolve to the same config, or all to dense (equal configs count as
    the same; else a ValueError).

    filter_fn(module, fqn) -> bool chooses the layers (for a single config it overrides config.filter_fn;
    in a dict a config's own filter_fn must accept the layer too). Without filter_fn, a config's own
    filter_fn decides for the layers it gets; without either, the default, default_filter, leaves the
    output heads dense: a layer with a name component lm_head, cls, classifier, pooler or score (causal
    LM heads, BERT's cls.predictions.* and pooler.dense, RoBERTa's lm_head.* and classifier.*); the report
    gives them the reason "output head (default filter)". In a dict, a pattern that is the layer's very
    name ({"lm_head": "int8"}, not a glob that happens to match it) overrides the default filter; else
    pass filter_fn=lambda m, fqn: True to compress the heads. A user filter must accept all the names of
    a shared layer or none; with the default filter, a shared layer one of whose names is an output head
    stays dense at all of them.

    calib_data: an iterable of model inputs (a list, a DataLoader): a mapping (a dict, a tokenizer's
    BatchEncoding) runs as model(**batch), a tuple or list as model(*batch), a tensor as model(batch); one
    batch given bare (a tensor, a mapping, a tuple of tensors) is refused: wrap it in a list. One pass over
    it (in torch.no_grad(), with the model in eval mode and each module's mode restored afterwards)
    collects, with forward pre-hooks on the layers to compress, what the chosen methods need: the input
    channels' absolute maxima (SmoothQuant: Int8Config(smooth_alpha=...)), input norms (Wanda:
    method="wanda"), input covariance (whitened SVD: LowRankConfig(whiten=True)) and a sample of up to
    max_tokens input rows per layer, on which the report gives each layer's relative output error and
    AutoConfig measures error and speed (each layer and its replacement run bare: no forward hook of the
    model fires while measuring). Statistics given in a config (importance=, whitening=, smooth_scales=)
    take precedence. A method that needs calibration and has no calib_data is refused, naming the
    argument.

    progress: a tqdm progress bar (on stderr) over the calibration batches and the layers, shown once a
    step takes longer than a second, where tqdm is installed (optional); False: silent.

    An error converting a layer names it ("Int8Config, layer <name> (N x K): ...").

    Every layer is converted before any is swapped, so a failure leaves the model unchanged. A model on
    the meta device is patched too (shapes only; load a checkpoint with assign=True).
    unpatch_model(model) swaps back.
    """
    from .auto import AutoConfig
    from .compress.calibration import check_calib_data, collect

    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"patch_model: filter_fn must be callable(module, fqn) -> bool, got {filter_fn!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"patch_model: progress must be a bool, got {progress!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"patch_model: max_tokens must be an int >= 1, got {max_tokens!r}")
    if calib_data is not None:
        check_calib_data(calib_data, "patch_model")
    plan = _plan(model, config, filter_fn)
    todo = [site for site in plan if site.config is not None]

    # Settings given per layer name must name converted layers (a typo is refused, not ignored); equal
    # configs (under several patterns) count as one.
    by_config: list[tuple[object, list[str]]] = []
    for site in todo:
        for cfg in site.configs:
            group = next((g for g in by_config if _same_value(g[0], cfg)), None)
            if group is None:
                by_config.append(group := (cfg, []))
            group[1].extend(site.names)
    for cfg, converted in by_config:
        unused = cfg.unused_names(converted)
        if unused:
            raise ValueError(f"patch_model: {type(cfg).__name__} names layers that are not converted: "
                             f"{', '.join(sorted(unused))}")

    # What calibration each layer needs; refused up front without calib_data.
    needs = {site.names[0]: site.config.calib_needs(site.names) for site in todo}
    if calib_data is None or not todo:
        for wanted in needs.values():
            if wanted:
                raise ValueError(f"patch_model: {next(iter(wanted.values()))}")
        stats = {}
    else:
        stats = collect(model, calib_data, {fqn: set(wanted) | {"sample"} for fqn, wanted in needs.items()},
                        max_tokens=max_tokens, progress=_progress(progress, "torchslim calibration", unit="batch"),
                        caller="patch_model")
        unreached = [fqn for fqn, wanted in needs.items() if wanted and fqn not in stats]
        if unreached:
            raise ValueError(f"patch_model: no batch of calib_data reached {', '.join(unreached)}, whose "
                             "calibration statistics the config needs (leave them out with filter_fn)")

    report = PatchReport(method="per-pattern" if isinstance(config, dict) else type(_resolve_config(config)).__name__)
    entries: dict[int, PatchedLayer] = {}
    swaps = []
    wrap = _progress(progress, "torchslim", total=len(todo), unit="layer")
    for site in (wrap(todo) if wrap else todo):
        linear, names = site.linear, site.names
        layer_stats = stats.get(names[0])
        entry = _dense_entry(site)
        if isinstance(site.config, AutoConfig):
            new, entry.method, entry.error, entry.reason, entry.candidates = site.config.choose(linear, names,
                                                                                              layer_stats)
        else:
            new = site.config.convert(linear, names, layer_stats)
            entry.method = _config_name(site.config)
            entry.error = relative_error(linear, new, layer_stats.sample if layer_stats else None)
        if new is not None:
            entry.bytes_after, entry.params_after = _module_bytes(new), _param_count(new)
            swaps.append((list(names), linear, new))
        entries[id(site)] = entry
    for site in plan:  # in model order
        entry = entries.get(id(site)) or _dense_entry(site)
        (report.kept_dense if entry.method == "dense" else report.layers).append(entry)
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
