"""AutoConfig: patch_model picks, per layer, the fastest compression method whose output error stays
within a budget, by measuring every candidate on the layer's own calibration inputs on this device."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .compress.calibration import LayerStats
from .configs import METHOD_NAMES, CSRConfig, FilterFn, Int8Config, LowRankConfig, Sparse24Config
from .patch import bare_forward, relative_error

# The candidate of each method unless AutoConfig(candidates=...) overrides it.
_CONFIG_OF = {"int8": Int8Config, "2:4": Sparse24Config, "csr": CSRConfig, "lowrank": LowRankConfig}
METHODS = tuple(_CONFIG_OF)


def default_candidates() -> dict:
    """AutoConfig's default candidate config of each method (fresh objects):
    int8: Int8Config() (W8A8, no smoothing); 2:4: Sparse24Config(method="wanda");
    csr: CSRConfig(sparsity=0.5, method="wanda"); lowrank: LowRankConfig(param_ratio=0.5, whiten=True)
    (activation-aware SVD keeping half the parameters). Wanda and whitening take their statistics from
    patch_model's calib_data, which AutoConfig needs anyway."""
    return {"int8": Int8Config(), "2:4": Sparse24Config(method="wanda"),
            "csr": CSRConfig(sparsity=0.5, method="wanda"), "lowrank": LowRankConfig(param_ratio=0.5, whiten=True)}


@dataclass
class AutoConfig:
    """patch_model(model, AutoConfig(...), calib_data=...) (or the shortcut "auto"): for each layer, every
    method in `methods` is converted with its candidate config and measured on the layer's own calibration
    inputs (a sample of up to max_tokens rows per layer, see patch_model): its relative output error
    ||y_c - y|| / ||y|| and its time on this device at that shape (the median of `repeats` runs after one
    warm-up, the dense layer timed alike; each runs bare, without the model's hooks). The layer gets the fastest method whose error is at most
    max_error; it stays dense where none is within the budget, or where the dense layer is faster than
    every method that is. The report gives, per layer, the chosen method, the reason, and each candidate's
    error and time (PatchedLayer.candidates).

    max_error: the relative output error budget per layer (default 0.02: int8 typically fits, pruning
    half the weights or half the parameters of a trained layer rarely does); 0 keeps every layer dense
    unless a method is exact on it. methods: the methods tried, a subset of ("int8", "2:4", "csr",
    "lowrank") (default: all). candidates: method -> config (or shortcut string) replacing that method's
    default candidate (default_candidates(): int8 plain, 2:4 Wanda, CSR Wanda at 0.5 sparsity, low rank
    whitened at param_ratio 0.5). A candidate that cannot convert a layer (a layer too small for low rank
    to save anything, an in_features int8 refuses) is skipped for it, with its reason in the report.
    repeats: timed runs per candidate. filter_fn(module, fqn) -> bool chooses the layers considered
    (default: patch_model's). Needs calib_data.

    Timing on the calibration shape is what decides: at few tokens (decoding) and at many (prefill) the
    fastest method may differ, so calibrate at the shape you serve.
    """

    max_error: float = 0.02
    methods: tuple[str, ...] = METHODS
    candidates: dict = field(default_factory=dict)
    repeats: int = 5
    filter_fn: FilterFn | None = None
    _configs: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) or not self.max_error >= 0:
            raise ValueError(f"AutoConfig: max_error must be a number >= 0, got {self.max_error!r}")
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in _CONFIG_OF]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"AutoConfig: methods must be distinct names among {list(METHODS)}, got {self.methods!r}")
        if not isinstance(self.candidates, dict):
            raise TypeError(f"AutoConfig: candidates must be a dict {{method: config}}, got "
                            f"{type(self.candidates).__name__}")
        extra = sorted(set(self.candidates) - set(self.methods))
        if extra:
            raise ValueError(f"AutoConfig: candidates given for methods not in methods {self.methods}: "
                             f"{', '.join(map(repr, extra))}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"AutoConfig: repeats must be an int >= 1, got {self.repeats!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("filter_fn must be callable(module, fqn) -> bool")
        defaults = default_candidates()
        configs = {}
        for method in self.methods:
            cfg = self.candidates.get(method, defaults[method])
            if isinstance(cfg, str):
                if cfg != method:
                    raise ValueError(f"AutoConfig: the candidate for {method!r} must be a {method!r} config, "
                                     f"got {cfg!r}")
                cfg = _CONFIG_OF[method]()
            if not isinstance(cfg, _CONFIG_OF[method]):
                raise TypeError(f"AutoConfig: the candidate for {method!r} must be a {_CONFIG_OF[method].__name__}, "
                                f"got {cfg!r}")
            configs[method] = cfg
        self._configs = configs

    def unused_names(self, converted: list[str]) -> set[str]:
        """Per-layer settings in the candidates for layers patch_model does not consider."""
        return set().union(*(cfg.unused_names(converted) for cfg in self._configs.values()))

    def calib_needs(self, names: tuple[str, ...]) -> dict[str, str]:
        """Every candidate's calibration needs, and the sample of inputs on which they are measured."""
        needs = {"sample": f"AutoConfig measures every method's error and speed on {names[0]}'s inputs: pass "
                           "calib_data= to patch_model"}
        for cfg in self._configs.values():
            needs.update(cfg.calib_needs(names))
        return needs

    def choose(self, linear: nn.Linear, names: tuple[str, ...], stats: LayerStats | None):
        """Measures the candidates on the layer's calibration sample: (the chosen module, or None to keep
        the layer dense; the method's name or "dense"; its error; the reason; every candidate's
        measurements)."""
        x = stats.sample if stats is not None else None
        if x is None:
            raise ValueError(f"patch_model: {self.calib_needs(names)['sample']}")
        measured = {"dense": {"error": 0.0, "time_ms": _median_ms(linear, x, self.repeats)}}
        fitting = []
        for method, cfg in self._configs.items():
            try:
                module = cfg.convert(linear, names, stats)
            except (ValueError, TypeError) as e:  # the method cannot take this layer (shape, dtype)
                measured[method] = {"error": None, "time_ms": None, "note": str(e)}
                continue
            error = relative_error(linear, module, x)
            measured[method] = {"error": error, "time_ms": _median_ms(module, x, self.repeats)}
            if error is not None and error <= self.max_error:
                fitting.append((measured[method]["time_ms"], method, module))
            del module
        dense_ms = measured["dense"]["time_ms"]
        if not fitting:
            tried = [(m["error"], name) for name, m in measured.items() if name != "dense" and m["error"] is not None]
            best = min(tried) if tried else None
            reason = (f"no method within max_error {self.max_error:g}" +
                      (f" (lowest: {best[1]} {best[0]:.3g})" if best else ""))
            return None, "dense", None, reason, measured
        fitting.sort(key=lambda item: item[0])
        time_ms, method, module = fitting[0]
        if dense_ms <= time_ms:
            return None, "dense", None, (f"dense is fastest: {dense_ms:.3g} ms vs {method} {time_ms:.3g} ms "
                                         f"(within max_error {self.max_error:g})"), measured
        return (module, method, measured[method]["error"],
                f"fastest within max_error {self.max_error:g}: {time_ms:.3g} ms vs dense {dense_ms:.3g} ms", measured)


def _median_ms(module: nn.Module, x: Tensor, repeats: int) -> float:
    """The median time of module's bare forward on x (bare_forward: without its hooks, which the
    replacement does not have yet) in milliseconds over repeats runs, after one warm-up run."""
    run = bare_forward(module)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        run(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            run(x)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


__all__ = ["METHODS", "METHOD_NAMES", "AutoConfig", "default_candidates"]
