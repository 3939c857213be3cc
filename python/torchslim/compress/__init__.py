"""How compressed weights are produced: quantization, 2:4 and unstructured pruning (magnitude, Wanda)
and, later, SVD."""
from .prune import InputNorms, prune_24, prune_unstructured
from .quantize import quantize_weight_per_channel

__all__ = ["InputNorms", "prune_24", "prune_unstructured", "quantize_weight_per_channel"]
