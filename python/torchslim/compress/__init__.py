"""How compressed weights are produced: quantization, 2:4 and unstructured pruning (magnitude, Wanda),
low rank (truncated and activation-aware whitened SVD), and the calibration hooks that collect the
input statistics Wanda and whitened SVD need."""
from .lowrank import InputCovariance, choose_rank, max_useful_rank, svd_factors
from .prune import InputNorms, prune_24, prune_unstructured
from .quantize import quantize_weight_per_channel

__all__ = ["InputCovariance", "InputNorms", "choose_rank", "max_useful_rank", "prune_24", "prune_unstructured",
           "quantize_weight_per_channel", "svd_factors"]
