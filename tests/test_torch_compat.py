"""The torch-version guard that runs before the extension loads (torchslim/_torch_compat.py)."""
import os
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
    msg = tc.torch_problem(running, None)
    assert msg is not None and "2.11 or newer" in msg and running in msg


@pytest.mark.parametrize("running, built", [("2.13.0+cpu", "2.13.0+cpu"), ("2.13.1", "2.13.0+cpu"),
                                            ("2.11.0+cu130", "2.11.0"), ("2.14.1", None)])
def test_same_release_runs(running, built):
    assert tc.torch_problem(running, built) is None


@pytest.mark.parametrize("running, built", [("2.14.1", "2.13.0+cpu"), ("2.11.0", "2.13.0")])
def test_other_release_is_refused_with_what_to_do(running, built):
    msg = tc.torch_problem(running, built)
    assert msg is not None and running in msg and built in msg
    assert "--no-build-isolation" in msg and tc.ALLOW_MISMATCH_ENV in msg


def test_installed_build_records_this_torch():
    from torchslim._build_config import BUILT_WITH_TORCH

    assert BUILT_WITH_TORCH == torch.__version__ == torchslim.info()["built_with_torch"]


def _import_with_fake_torch_version(version: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    # torch.__version__ patched before torchslim is imported: the guard must act before _C loads.
    code = f"import torch; torch.__version__ = {version!r}; import torchslim; print('imported')"
    env = {k: v for k, v in os.environ.items() if k != tc.ALLOW_MISMATCH_ENV}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_under_old_torch_fails_clearly():
    r = _import_with_fake_torch_version("2.10.0")
    assert r.returncode != 0 and "ImportError" in r.stderr and "2.11 or newer" in r.stderr


def test_import_under_other_release_fails_clearly_unless_allowed():
    other = "2.99.0"
    r = _import_with_fake_torch_version(other)
    assert r.returncode != 0 and "ImportError" in r.stderr and f"built against torch {torch.__version__}" in r.stderr
    r = _import_with_fake_torch_version(other, {tc.ALLOW_MISMATCH_ENV: "1"})
    assert r.returncode == 0 and "imported" in r.stdout and "RuntimeWarning" in r.stderr
