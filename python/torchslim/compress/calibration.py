"""Calibration hooks: statistics of the inputs of a model's nn.Linear layers, gathered while
calibration batches run through the model (compress.InputNorms for Wanda, compress.InputCovariance
for whitened SVD)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


class _LinearInputHooks:
    """The shared part of the collectors: a context manager that puts a forward pre-hook on each
    chosen nn.Linear of a model (filter_fn(module, fqn) -> bool chooses; default: every nn.Linear)
    and hands every input it sees, as a 2-D (tokens, in_features) tensor, to the subclass's _update.

    A module reachable under several names is hooked once, under the first name named_modules()
    gives, and its statistics gather the inputs of every call site. Inputs whose last dimension is
    not in_features are skipped: the layer's forward refuses them, so they are no calibration data."""

    def __init__(self, model: nn.Module, filter_fn=None) -> None:
        keep = filter_fn or (lambda module, fqn: True)
        self._layers = {fqn: m for fqn, m in model.named_modules() if type(m) is nn.Linear and keep(m, fqn)}
        self._stats: dict[str, Any] = {}
        self._handles = []

    def _update(self, state: Any, x: Tensor) -> Any:
        """The layer's statistics after one more input x (tokens, in_features), in x's dtype; state is
        None before its first input. Returning None records nothing (the layer stays unreached)."""
        raise NotImplementedError

    def _finish(self, state: Any) -> Tensor:
        """What result() gives for one layer's statistics."""
        raise NotImplementedError

    def _update_for(self, fqn: str, state: Any, x: Tensor) -> Any:
        """_update for the layer named fqn (a collector whose statistics differ per layer overrides it)."""
        return self._update(state, x)

    def _hook(self, fqn: str):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()  # nn.Linear.forward(input)
            if x.dim() == 0 or x.shape[-1] != module.in_features:
                return  # the layer's forward refuses this input; it is no calibration data
            # flatten, not reshape(-1, K): ambiguous for in_features = 0 (a layer that gives its bias).
            rows = x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)
            state = self._update_for(fqn, self._stats.get(fqn), rows)
            if state is not None:
                self._stats[fqn] = state
        return hook

    def __enter__(self):
        self._handles = [m.register_forward_pre_hook(self._hook(fqn), with_kwargs=True)
                         for fqn, m in self._layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self, require_all: bool = True) -> dict[str, Tensor]:
        """fqn -> the layer's statistics. A layer no batch reached is an error, or (with
        require_all=False) left out."""
        missing = sorted(set(self._layers) - set(self._stats))
        if missing and require_all:
            raise RuntimeError(f"{type(self).__name__}: no batch reached {', '.join(missing)}; "
                               "run the model inside the with block")
        return {fqn: self._finish(s) for fqn, s in self._stats.items()}


# --------------------------------------------------------------------------------------------------
# One pass for every statistic: what patch_model(..., calib_data=...) runs.

# The statistics a layer may need: "absmax" (SmoothQuant), "norms" (Wanda), "covariance" (whitened SVD),
# "sample" (a bounded sample of the layer's input rows: the report's output error, AutoConfig's choice).
STATISTICS = ("absmax", "norms", "covariance", "sample")


@dataclass
class LayerStats:
    """What one calibration pass gathered for one nn.Linear (each None where it was not asked for):
    absmax (K,) float32, the absolute maximum of every input channel; norms (K,) float64, every input
    feature's L2 norm; covariance (K, K) float64, sum(x^T x) / tokens; sample (n, K), the first n <=
    max_tokens input rows the layer saw, in their dtype; tokens, the number of input rows seen."""

    absmax: Tensor | None = None
    norms: Tensor | None = None
    covariance: Tensor | None = None
    sample: Tensor | None = None
    tokens: int = 0


class CalibrationStats(_LinearInputHooks):
    """The combined collector: ``needs`` maps each layer's name (the first name named_modules() gives a
    shared layer) to the statistics it needs (a subset of STATISTICS); one pass over the calibration
    batches gathers all of them, each layer only what it needs (the (K, K) covariance only where asked).
    result() maps each reached layer's name to its LayerStats. max_tokens bounds the sample kept per
    layer (its first rows)."""

    def __init__(self, model: nn.Module, needs: dict[str, set[str]], max_tokens: int = 512) -> None:
        unknown = sorted({s for wanted in needs.values() for s in wanted} - set(STATISTICS))
        if unknown:
            raise ValueError(f"CalibrationStats: unknown statistics {unknown}; known: {list(STATISTICS)}")
        self._needs = {fqn: set(wanted) for fqn, wanted in needs.items() if wanted}
        self._max_tokens = max_tokens
        super().__init__(model, filter_fn=lambda module, fqn: fqn in self._needs)

    def _update_for(self, fqn: str, state: dict | None, x: Tensor) -> dict | None:
        if x.shape[0] == 0:
            return state
        wanted = self._needs[fqn]
        state = state if state is not None else {"tokens": 0, "sample": []}
        state["tokens"] += x.shape[0]
        if "absmax" in wanted:
            m = x.abs().amax(dim=0).float()
            state["absmax"] = m if "absmax" not in state else torch.maximum(state["absmax"], m)
        if "norms" in wanted or "covariance" in wanted:
            xd = x.double()
            if "norms" in wanted:
                sq = xd.square().sum(0)
                state["sumsq"] = sq if "sumsq" not in state else state["sumsq"] + sq
            if "covariance" in wanted:
                gram = xd.T @ xd
                state["gram"] = gram if "gram" not in state else state["gram"] + gram
        if "sample" in wanted:
            have = sum(t.shape[0] for t in state["sample"])
            if have < self._max_tokens:
                state["sample"].append(x[: self._max_tokens - have].clone())
        return state

    def _finish(self, state: dict) -> LayerStats:
        return LayerStats(absmax=state.get("absmax"),
                          norms=state["sumsq"].sqrt() if "sumsq" in state else None,
                          covariance=state["gram"] / state["tokens"] if "gram" in state else None,
                          sample=torch.cat(state["sample"]) if state["sample"] else None,
                          tokens=state["tokens"])


def call_model(model: nn.Module, batch: Any) -> Any:
    """Runs one calibration batch: a mapping (a dict, a tokenizer's BatchEncoding) as model(**batch), a
    tuple or list as model(*batch), anything else (a tensor) as model(batch)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def check_calib_data(calib_data: Any, caller: str) -> None:
    """Refuses a calib_data that is one batch rather than an iterable of batches: a tensor iterates over
    its rows, a mapping (a dict, a tokenizer's BatchEncoding) over its keys, and a tuple of tensors
    ((ids, mask): one model(*batch) input) over its tensors; none of them is what was meant."""
    single = (isinstance(calib_data, (Tensor, Mapping))
              or (isinstance(calib_data, tuple) and len(calib_data) > 0
                  and all(isinstance(t, Tensor) for t in calib_data)))
    if single or isinstance(calib_data, (str, bytes)) or not isinstance(calib_data, Iterable):
        got = ("a tuple of tensors (one batch for model(*batch))" if isinstance(calib_data, tuple)
               else type(calib_data).__name__)
        raise TypeError(f"{caller}: calib_data must be an iterable of model inputs (a list or DataLoader of "
                        "tensors, dicts for model(**batch) or tuples for model(*batch)), got "
                        f"{got}" + ("; wrap a single batch in a list: [batch]" if single else ""))


def collect(model: nn.Module, calib_data: Iterable, needs: dict[str, set[str]], max_tokens: int = 512,
            progress=None, caller: str = "collect") -> dict[str, LayerStats]:
    """One pass of model over calib_data (see call_model) with the combined collector's hooks on the
    layers named in needs, in torch.no_grad() and with every module in eval mode (each module's own
    mode is restored afterwards, also when a batch raises). progress(iterable) may wrap the batches
    (a progress bar). Returns each reached layer's LayerStats; an empty calib_data is an error."""
    check_calib_data(calib_data, caller)
    modes = [(m, m.training) for m in model.modules()]
    batches = 0
    try:
        model.eval()
        with torch.no_grad(), CalibrationStats(model, needs, max_tokens) as stats:
            for batch in (progress(calib_data) if progress else calib_data):
                call_model(model, batch)
                batches += 1
    finally:
        for m, training in modes:
            m.training = training
    if batches == 0:
        raise ValueError(f"{caller}: calib_data holds no batch")
    return stats.result(require_all=False)
