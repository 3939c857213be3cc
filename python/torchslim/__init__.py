"""torchslim: compression kernels for PyTorch (INT8 W8A8, 2:4 and CSR sparsity, fused low rank).

Importing torchslim loads the native module, which registers the ``torch.ops.torchslim`` ops.
A failed load raises: torchslim never falls back to slow paths silently.
"""
import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from ._torch_compat import check_torch as _check_torch

_check_torch()  # a torch older than 2.11, or another release than the build's: a clear ImportError

from . import _C  # registers the op schemas and the CPU (and CUDA) kernels
from . import ops  # the typed wrappers and fakes
from . import _cuda_registration  # registers the Triton kernels for CUDA where Triton is installed
from ._info import info
from .nn import CSRLinear, Int8Linear, LowRankLinear, Sparse24Linear
from .configs import CSRConfig, Int8Config, LowRankConfig, Sparse24Config
from .patch import default_filter, patch_model, unpatch_model
from .report import PatchedLayer, PatchReport
from .auto import AutoConfig
from .checkpoint import load_compressed, save_compressed

__version__ = _C.__version__
set_cpu_isa = _C.set_cpu_isa
cpu_isa = _C.cpu_isa


def _apply_cpu_isa_env() -> None:
    # TORCHSLIM_CPU_ISA picks the CPU kernel path (tests, comparisons). A name that is not an ISA
    # is an error; an ISA this CPU lacks is reported and the best one is kept, so a run meant for
    # one kernel path never silently measures or tests another.
    import os
    import warnings

    wanted = os.environ.get("TORCHSLIM_CPU_ISA", "").strip()
    if not wanted:
        return
    known = _C.known_cpu_isas()
    if wanted.lower() not in known:
        raise ValueError(f"TORCHSLIM_CPU_ISA={wanted!r} is not an instruction set torchslim knows: "
                         f"{', '.join(known)} (case-insensitive)")
    if wanted.lower() not in _C.supported_cpu_isas():
        warnings.warn(f"TORCHSLIM_CPU_ISA={wanted!r}: this CPU does not support it; the int8 kernels use "
                      f"{_C.cpu_isa()!r} (supported: {', '.join(_C.supported_cpu_isas())})",
                      RuntimeWarning, stacklevel=3)
        return
    _C.set_cpu_isa(wanted)


_apply_cpu_isa_env()

__all__ = [
    "AutoConfig",
    "CSRConfig",
    "CSRLinear",
    "Int8Config",
    "Int8Linear",
    "LowRankConfig",
    "LowRankLinear",
    "PatchReport",
    "PatchedLayer",
    "Sparse24Config",
    "Sparse24Linear",
    "cpu_isa",
    "default_filter",
    "info",
    "load_compressed",
    "ops",
    "patch_model",
    "save_compressed",
    "set_cpu_isa",
    "unpatch_model",
]
