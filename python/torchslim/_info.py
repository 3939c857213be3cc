"""torchslim.info(): what this build and this machine can run."""
from __future__ import annotations

import importlib.util

import torch

from . import _C, _cuda_registration


def info() -> dict:
    """Version, torch versions, and which kernel runs each op on each device."""
    triton = importlib.util.find_spec("triton") is not None
    cuda_ok = torch.cuda.is_available()
    return {
        "torchslim": _C.__version__,
        "torch": torch.__version__,
        "built_with_torch": _C.built_with_torch,
        "cpu_isa": _C.cpu_isa(),
        "best_cpu_isa": _C.best_cpu_isa(),
        "cuda_compiled": _C.cuda,
        "cuda_available": cuda_ok,
        "triton": triton,
        "kernels": {
            "quantize_per_token": {"cpu": f"C++ ({_C.cpu_isa()})",
                                    "cuda": "CUDA C++" if _C.cuda else "not built"},
            "int8_linear": {"cpu": f"C++ ({_C.cpu_isa()})",
                            "cuda": "Triton" if triton else "needs triton"},
            "sparse24_linear": {"cpu": f"C++ ({_C.sparse24_cpu_kernels()})",
                                "cuda": ("Triton" if triton else "needs triton")
                                + (f", cuSPARSELt from M = {_cuda_registration.SPARSE24_CUSPARSELT_MIN_M}"
                                   if torch.backends.cusparselt.is_available() else "")},
            "csr_linear": {"cpu": f"C++ ({_C.csr_cpu_kernels()})", "cuda": "CUDA C++" if _C.cuda else "not built"},
            "lowrank_linear": {"cpu": f"C++ ({_C.lowrank_cpu_kernels()})", "cuda": "two cuBLAS GEMMs"},
        },
        # CUDA kernels not yet tested on a GPU run: off unless TORCHSLIM_CUDA_OPT_IN names them.
        "cuda_opt_in": _cuda_registration.opt_in_status(),
    }


def format_info(d: dict) -> str:
    lines = [f"{k}: {v}" for k, v in d.items() if k not in ("kernels", "cuda_opt_in")]
    lines.append("kernels:")
    for op, per_device in d["kernels"].items():
        lines.append(f"  {op}: " + ", ".join(f"{dev}={impl}" for dev, impl in per_device.items()))
    lines.append("CUDA opt-in kernels (TORCHSLIM_CUDA_OPT_IN=name,...):")
    lines += [f"  {name}: {status}" for name, status in d["cuda_opt_in"].items()]
    return "\n".join(lines)
