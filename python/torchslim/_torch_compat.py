"""Which torch a build of torchslim can run with, decided before its extension is loaded.

The compiled extension uses only the LibTorch Stable ABI (torch's C shim and header-only types,
csrc/stable_tensor.h), built for the stable ABI of torch 2.11 (TORCH_TARGET_VERSION): one build runs
under every torch from 2.11 on, whichever torch it was compiled against. Under an older torch the
shim functions it calls do not exist, so the import is refused first, with a message naming the range.
"""
from __future__ import annotations

import re

MIN_TORCH = (2, 11)  # the oldest torch torchslim supports (pyproject: torch>=2.11; CMake's TORCH_TARGET_VERSION)


def major_minor(version: str) -> tuple[int, int]:
    """(2, 13) for '2.13.0+cpu', '2.13.1', '2.13.0a0+git1234'."""
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def torch_problem(running: str) -> str | None:
    """Why torchslim cannot run with torch `running`, or None when it can."""
    if major_minor(running) < MIN_TORCH:
        return (f"torchslim needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer (it supports torch >= "
                f"{MIN_TORCH[0]}.{MIN_TORCH[1]}); this is torch {running}. Upgrade torch "
                f"(pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}').")
    return None


def check_torch() -> None:
    """Raises ImportError where torch_problem finds one."""
    import torch

    problem = torch_problem(torch.__version__)
    if problem is not None:
        raise ImportError(problem)
