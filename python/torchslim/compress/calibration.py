"""Calibration hooks: statistics of the inputs of a model's nn.Linear layers, gathered while
calibration batches run through the model (compress.InputNorms for Wanda, compress.InputCovariance
for whitened SVD)."""
from __future__ import annotations

from typing import Any

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

    def _hook(self, fqn: str):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()  # nn.Linear.forward(input)
            if x.dim() == 0 or x.shape[-1] != module.in_features:
                return  # the layer's forward refuses this input; it is no calibration data
            state = self._update(self._stats.get(fqn), x.reshape(-1, x.shape[-1]))
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
