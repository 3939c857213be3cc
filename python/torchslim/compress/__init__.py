"""How compressed weights are produced: quantization, 2:4 and unstructured pruning (magnitude, Wanda,
SparseGPT with weight reconstruction), low rank (truncated and activation-aware whitened SVD), and the
calibration hooks that collect the input statistics Wanda, SparseGPT, whitened SVD and SmoothQuant need."""
from .calibration import CalibrationStats, LayerStats
from .lowrank import InputCovariance, choose_rank, max_useful_rank, svd_factors
from .prune import InputNorms, prune_24, prune_unstructured
from .quantize import quantize_weight_per_channel
from .smoothquant import InputAbsMax, smooth_scales
from .sparsegpt import sparsegpt_prune

__all__ = ["CalibrationStats", "InputAbsMax", "InputCovariance", "InputNorms", "LayerStats", "choose_rank",
           "max_useful_rank", "prune_24", "prune_unstructured", "quantize_weight_per_channel", "smooth_scales",
           "sparsegpt_prune", "svd_factors"]
