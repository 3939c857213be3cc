"""PatchReport: what patch_model did to each layer (method, sizes, calibration error), as a table and a dict."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


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
