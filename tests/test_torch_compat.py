"""The torch-version guard that runs before the extension loads (torchslim/_torch_compat.py)."""
import subprocess
import sys

import pytest
import torch

import torchslim
from torchslim import _torch_compat as tc


@pytest.mark.parametrize("version, expected", [("2.13.0+cpu", (2, 13)), ("2.11.0", (2, 11)),
                                               ("2.14.1+cu130", (2, 14)), ("2.12.0a0+git5f3c1d2", (2, 12)),
                                               ("3.0.0", (3, 0))])
def test_major_minor(version, expected):
    assert tc.major_minor(version) == expected


def test_major_minor_refuses_garbage():
    with pytest.raises(ValueError, match="not a torch version"):
        tc.major_minor("nightly")


@pytest.mark.parametrize("running", ["2.10.0", "2.9.1+cpu", "1.13.1"])
def test_older_torch_is_refused_naming_the_range(running):
    msg = tc.torch_problem(running)
    assert msg is not None and "2.11 or newer" in msg and running in msg


@pytest.mark.parametrize("running", ["2.11.0", "2.11.0+cu130", "2.13.0+cpu", "2.14.1", "2.20.0", "3.0.0"])
def test_every_torch_from_the_minimum_on_runs(running):
    # One build for all: the extension is on the Stable ABI (checked by test_abi.py).
    assert tc.torch_problem(running) is None


def test_installed_build_records_the_torch_it_was_built_against():
    from torchslim._build_config import BUILT_WITH_TORCH

    info = torchslim.info()
    assert info["built_with_torch"] == BUILT_WITH_TORCH and info["torch"] == torch.__version__
    assert tc.major_minor(BUILT_WITH_TORCH) >= tc.MIN_TORCH


def _import_with_fake_torch_version(version: str) -> subprocess.CompletedProcess:
    # torch.__version__ patched before torchslim is imported: the guard must act before _C loads.
    code = f"import torch; torch.__version__ = {version!r}; import torchslim; print('imported')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_under_old_torch_fails_clearly():
    r = _import_with_fake_torch_version("2.10.0")
    assert r.returncode != 0 and "ImportError" in r.stderr and "2.11 or newer" in r.stderr
