"""Drop-in replacements for nn.Linear, each with from_linear(...) and to_linear()."""
from .csr_linear import CSRLinear
from .int8_linear import Int8Linear
from .lowrank_linear import LowRankLinear
from .sparse24_linear import Sparse24Linear

__all__ = ["CSRLinear", "Int8Linear", "LowRankLinear", "Sparse24Linear"]
