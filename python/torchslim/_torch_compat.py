"""Which torch a build of torchslim can run with, decided before its extension is loaded.

The compiled extension links torch's C++ API (at::Tensor, TORCH_LIBRARY, ...), whose symbols and
layouts change between torch releases: a build runs with the torch release (major.minor) it was built
against, and with no other. Loading it under another one fails on an undefined symbol at best and
misbehaves at worst, so torchslim refuses it with a message that says what to do.
"""
from __future__ import annotations

import re

MIN_TORCH = (2, 11)  # the oldest torch torchslim supports (pyproject: torch>=2.11)
ALLOW_MISMATCH_ENV = "TORCHSLIM_ALLOW_TORCH_MISMATCH"


def major_minor(version: str) -> tuple[int, int]:
    """(2, 13) for '2.13.0+cpu', '2.13.1', '2.13.0a0+git1234'."""
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(m.group(1)), int(m.group(2))


def torch_problem(running: str, built_with: str | None) -> str | None:
    """Why a torchslim built against torch `built_with` (None: unknown) cannot run with torch `running`,
    or None when it can."""
    if major_minor(running) < MIN_TORCH:
        return (f"torchslim needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]} or newer; this is torch {running}. "
                f"Upgrade torch (pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'), then reinstall torchslim.")
    if built_with is not None and major_minor(built_with) != major_minor(running):
        return (f"this torchslim was built against torch {built_with}, and this is torch {running}: its compiled "
                "extension links torch's C++ API, which changes between torch releases, so it runs only with "
                "the torch release it was built against. Rebuild it against this torch "
                "(pip install --no-build-isolation --force-reinstall --no-deps <torchslim source>; see the README), "
                f"or set {ALLOW_MISMATCH_ENV}=1 to try anyway.")
    return None


def check_torch() -> None:
    """Raises ImportError where torch_problem finds one (a warning instead, for a release mismatch,
    where ALLOW_MISMATCH_ENV is set)."""
    import os
    import warnings

    import torch

    try:
        from ._build_config import BUILT_WITH_TORCH
    except ImportError:  # a source tree without a build: nothing to compare
        BUILT_WITH_TORCH = None
    problem = torch_problem(torch.__version__, BUILT_WITH_TORCH)
    if problem is None:
        return
    too_old = major_minor(torch.__version__) < MIN_TORCH
    if not too_old and os.environ.get(ALLOW_MISMATCH_ENV, "").strip() not in ("", "0"):
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
        return
    raise ImportError(problem)
