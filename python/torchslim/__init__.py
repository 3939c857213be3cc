"""torchslim: compression kernels for PyTorch (INT8 W8A8, 2:4 and CSR sparsity, fused low rank).

Importing torchslim loads the native module, which registers the ``torch.ops.torchslim`` ops.
A failed load raises: torchslim never falls back to slow paths silently.
"""
import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C  # registers the op schemas and the CPU (and CUDA) kernels
from . import ops  # the typed wrappers and fakes
from . import _cuda_registration  # registers the Triton kernels for CUDA where Triton is installed
from ._info import info
from .nn import Int8Linear
from .patch import Int8Config, PatchReport, patch_model, unpatch_model

__version__ = _C.__version__
set_cpu_isa = _C.set_cpu_isa
cpu_isa = _C.cpu_isa

__all__ = [
    "Int8Config",
    "Int8Linear",
    "PatchReport",
    "cpu_isa",
    "info",
    "ops",
    "patch_model",
    "set_cpu_isa",
    "unpatch_model",
]
