"""patch_model / unpatch_model: swap nn.Linear layers for torchslim modules and back."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import _CONFIG_TYPES, _SHORTCUTS, METHOD_NAMES, FilterFn, _same_value
from .nn import CSRLinear, Int8Linear, LowRankLinear, Sparse24Linear
from .report import PatchedLayer, PatchReport

# Modules patch_model creates, so unpatch_model knows what to turn back into nn.Linear.
_PATCHED_TYPES = (Int8Linear, Sparse24Linear, CSRLinear, LowRankLinear)

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
