"""How compressed weights are produced: quantization (and, later, pruning and SVD)."""
from .quantize import quantize_weight_per_channel

__all__ = ["quantize_weight_per_channel"]
