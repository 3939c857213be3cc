"""The compiled module is on the LibTorch Stable ABI only: no undefined symbol from libtorch's C++ API.

Such a symbol (at::, c10::, torch:: other than the C shim) would tie the module to the torch release it
was built against; with none, one build loads under every torch from 2.11 on (csrc/stable_tensor.h).
"""
import os
import re
import shutil
import subprocess

import pytest

import torchslim

# Demangled C++ names of torch's C++ API. The stable C shim (aoti_torch_*, torch_*) is plain C.
_CXX_API = re.compile(r"\b(at|c10|torch|caffe2)::")


def _undefined_symbols(path: str) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        if os.environ.get("CI"):
            pytest.fail("nm (binutils) is needed to check the module's symbols in CI")
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", "-C", "--undefined-only", path], capture_output=True, text=True, check=True)
    return [line.split(None, 1)[1] for line in out.stdout.splitlines() if line.strip()]


def test_the_module_uses_no_torch_cxx_api():
    symbols = _undefined_symbols(torchslim._C.__file__)
    assert symbols, "nm listed no undefined symbol at all: not the module it should be"
    cxx = [s for s in symbols if _CXX_API.search(s)]
    assert not cxx, f"{len(cxx)} undefined symbols from torch's C++ API, e.g. {cxx[:5]}"
    # What it does use of torch: the stable C shim.
    assert any(s.startswith(("aoti_torch_", "torch_")) for s in symbols)
