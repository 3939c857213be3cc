"""Shared test setup: the Triton interpreter switch, the ISA fixture and the tolerance table."""
import os

import torch

# Triton kernels run through the interpreter where no GPU is present; the variable must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import torchslim  # noqa: E402

# Hypothesis budgets: TORCHSLIM_TEST_PROFILE=long multiplies every property test's examples by 20
# (minutes instead of seconds; for a hostile-input hunt before a release, not for CI); =quick keeps
# a quarter of them (at least one), for the time-limited GPU run (bench/gpu/run.sh).
_PROFILES = {"quick": 0.25, "fast": 1, "long": 20}
_profile = os.environ.get("TORCHSLIM_TEST_PROFILE", "fast").strip().lower()
if _profile not in _PROFILES:
    raise ValueError(f"TORCHSLIM_TEST_PROFILE={_profile!r}: known profiles are {sorted(_PROFILES)}")


def examples(n: int) -> settings:
    """Hypothesis settings with n examples in the fast profile (scaled by the profile)."""
    return settings(max_examples=max(1, round(n * _PROFILES[_profile])), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Unit roundoff (the largest relative error of one rounding) of each dtype. The int8 kernels
# accumulate exactly in int32; what remains is the float32 epilogue (int32 -> float32, the scale
# product, the fma with the bias: ROUNDINGS roundings, each relative to the size of its terms)
# and one final rounding to the output dtype, so outputs are compared with
#   |out - ref| <= u(dtype) * |ref| + 2 * ROUNDINGS * u(float32) * mag,
# where mag = |acc * scales| + |bias| (the terms' size; the 2 covers the float32 error being
# rounded once more by the final cast).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ROUNDINGS = 3
# Below the normal range a rounding is absolute: half the spacing of the dtype's subnormals.
HALF_SUBNORMAL_SPACING = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}

ALL_ISAS = ["scalar", "avx2", "avx_vnni", "avx512_vnni", "amx"]
# The 2:4 kernel paths: scalar (what "avx2" and "avx_vnni" also run), AVX-512 and AMX.
SPARSE24_ISAS = ["scalar", "avx512_vnni", "amx"]
# The CSR kernel paths: scalar (also under "avx2" and "avx_vnni") and AVX-512 (also under "amx").
CSR_ISAS = ["scalar", "avx512_vnni"]
# The low-rank kernel paths: scalar, AVX-512 and AMX (bfloat16; its other dtypes run the AVX-512 ones).
LOWRANK_ISAS = ["scalar", "avx512_vnni", "amx"]


def available_isas():
    return list(torchslim._C.supported_cpu_isas())


def _run_on_isa(isa):
    if isa not in available_isas():
        pytest.skip(f"this CPU lacks {isa}")
    before = torchslim._C.cpu_isa()
    torchslim.set_cpu_isa(isa)
    try:
        yield isa
    finally:
        torchslim.set_cpu_isa(before)


@pytest.fixture(params=ALL_ISAS)
def cpu_isa(request):
    """Runs a test once per CPU kernel path this machine can execute; restores the default."""
    yield from _run_on_isa(request.param)


@pytest.fixture(params=SPARSE24_ISAS)
def sparse24_isa(request):
    """Runs a test once per 2:4 kernel path this machine can execute (avx512_vnni: the AVX-512
    kernels where the CPU also has AVX512_BF16 and VBMI2, else the scalar ones)."""
    yield from _run_on_isa(request.param)


@pytest.fixture(params=CSR_ISAS)
def csr_isa(request):
    """Runs a test once per CSR kernel path this machine can execute."""
    yield from _run_on_isa(request.param)


@pytest.fixture(params=LOWRANK_ISAS)
def lowrank_isa(request):
    """Runs a test once per low-rank kernel path this machine can execute."""
    yield from _run_on_isa(request.param)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, scale_mag: torch.Tensor | None = None,
                              float32_roundings: int = ROUNDINGS):
    """out (any float dtype) against a float64 reference, with the bound above. A float32 sum of n
    terms (a float GEMM's accumulator) makes at most n roundings, each relative to partial sums no
    larger than mag = sum |terms|: pass float32_roundings = n and scale_mag = that sum."""
    u = UNIT_ROUNDOFF[out.dtype]
    mag = ref.abs() if scale_mag is None else scale_mag
    assert_within(out, ref, u * ref.abs() + 2 * float32_roundings * UNIT_ROUNDOFF[torch.float32] * mag)


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor):
    """|out - ref| <= bound elementwise (plus half the subnormal spacing of out's dtype: below the
    normal range a rounding is absolute); where ref is NaN or infinite, out is the same."""
    bound = bound + HALF_SUBNORMAL_SPACING[out.dtype]
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if out.numel() == 0:
        return
    finite = torch.isfinite(ref)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN where the reference has none, or none where it has"
    assert torch.equal(out.double()[~finite & ~ref.isnan()], ref[~finite & ~ref.isnan()]), "infinities differ"
    err = torch.where(finite, (out.double() - ref).abs(), torch.zeros_like(ref))
    excess = (err - bound).flatten()
    worst = int(excess.argmax())
    assert not bool((excess > 0).any()), (
        f"{int((excess > 0).sum())} of {out.numel()} elements beyond the rounding bound; worst at flat "
        f"index {worst}: out={float(out.flatten()[worst])}, ref={float(ref.flatten()[worst])}, "
        f"bound={float(bound.flatten()[worst])}")


def int8_linear_bad_inputs():
    """(name, args, message regex): bad arguments of int8_linear; every device's op rejects them alike."""
    x = torch.randn(4, 32)
    w_q = torch.zeros(8, 32, dtype=torch.int8)
    s = torch.ones(8)
    yield "K", (torch.randn(4, 31), w_q, s, None), "K"
    yield "float weight", (x, torch.zeros(8, 32), s, None), "int8"
    yield "int x", (torch.ones(4, 32, dtype=torch.int32), w_q, s, None), "float32, bfloat16 or float16"
    yield "3-D x", (torch.randn(2, 4, 32), w_q, s, None), "2-D"
    yield "non-contiguous x", (torch.randn(32, 4).T, w_q, s, None), "contiguous"
    yield "non-contiguous w", (x, torch.zeros(32, 8, dtype=torch.int8).T, s, None), "contiguous"
    yield "scale shape", (x, w_q, torch.ones(7), None), "w_scale"
    yield "scale dtype", (x, w_q, torch.ones(8, dtype=torch.float64), None), "float32"
    yield "0-D scale", (x, w_q, torch.tensor(1.0), None), r"w_scale must have shape \(8,\), got \[\]"
    yield "NaN scale", (x, w_q, torch.tensor([1.0] * 7 + [float("nan")]), None), r"w_scale\[7\] is nan.*finite"
    yield "Inf scale", (x, w_q, torch.tensor([float("inf")] + [1.0] * 7), None), "finite"
    yield "bias shape", (x, w_q, s, torch.ones(9)), "bias must have shape"
    yield "int bias", (x, w_q, s, torch.ones(8, dtype=torch.int64)), "bias must be floating point"
    yield "K too large", (torch.randn(1, 65537), torch.zeros(1, 65537, dtype=torch.int8), torch.ones(1), None), \
        "K=65537 exceeds 65536"
    for name, arg in (("w_q", 1), ("w_scale", 2), ("bias", 3)):
        args = [x, w_q, s, torch.ones(8)]
        args[arg] = args[arg].to("meta")
        yield f"{name} on meta", tuple(args), f"{name} must be on cpu like x, got meta"


def sparse24_linear_bad_inputs():
    """(name, args, message regex): bad arguments of sparse24_linear; every device's op rejects them alike."""
    from torchslim.compress import prune_24
    from torchslim.formats import sparse24 as f

    x = torch.randn(4, 40)
    values, meta = f.pack(prune_24(torch.randn(6, 40)))
    yield "3-D x", (x[None], values, meta, None), "x must be 2-D"
    yield "int x", (x.int(), values, meta, None), "x must be float32, bfloat16 or float16"
    yield "strided x", (torch.randn(40, 4).T, values, meta, None), "x must be contiguous"
    yield "values dtype", (x, values.bfloat16(), meta, None), "values must have x's dtype"
    yield "values 1-D", (x, values.flatten(), meta, None), "values must be 2-D"
    yield "values strided", (x, torch.randn(48, 6).T, meta, None), "values must be contiguous"
    yield "meta dtype", (x, values, meta.int(), None), "meta must be int16"
    yield "meta strided", (x, values, torch.zeros(3, 6, dtype=torch.int16).T, None), "meta must be contiguous"
    yield "values width", (x, values[:, :20].contiguous(), meta, None), r"values must have shape \(6, 24\) for K=40"
    yield "K of x", (torch.randn(4, 56), values, meta, None), r"values must have shape \(6, 32\) for K=56"
    yield "meta rows", (x, values, meta[:5].contiguous(), None), r"meta must have shape \(6, 3\)"
    yield "meta width", (x, values, meta[:, :2].contiguous(), None), r"meta must have shape \(6, 3\)"
    yield "bias shape", (x, values, meta, torch.ones(7)), r"bias must have shape \(6,\)"
    yield "int bias", (x, values, meta, torch.ones(6, dtype=torch.int64)), "bias must be floating point"
    for i, name in ((1, "values"), (2, "meta"), (3, "bias")):
        args = [x, values, meta, torch.ones(6)]
        args[i] = args[i].to("meta")
        yield f"{name} on meta", tuple(args), f"{name} must be on cpu like x, got meta"


def csr_linear_bad_inputs():
    """(name, args, message regex): bad arguments of csr_linear; every device's op rejects them alike
    (the row pointers' and columns' values are checked by the CPU op only: see test_csr_linear)."""
    from torchslim.formats import csr

    x = torch.randn(4, 40)
    crow, col, values = csr.pack(torch.randn(6, 40) * (torch.rand(6, 40) < 0.3))
    nnz = values.shape[0]
    yield "3-D x", (x[None], crow, col, values, None), "x must be 2-D"
    yield "int x", (x.int(), crow, col, values, None), "x must be float32, bfloat16 or float16"
    yield "strided x", (torch.randn(40, 4).T, crow, col, values, None), "x must be contiguous"
    yield "crow 2-D", (x, crow[None], col, values, None), "crow must be 1-D"
    yield "col 2-D", (x, crow, col[None], values, None), "col must be 1-D"
    yield "values 2-D", (x, crow, col, values[None], None), "values must be 1-D"
    yield "col strided", (x, crow, torch.zeros(2 * nnz, dtype=torch.int16)[::2], values, None), "col must be contiguous"
    yield "values strided", (x, crow, col, torch.zeros(2 * nnz)[::2], None), "values must be contiguous"
    yield "crow int64", (x, crow.long(), col, values, None), "crow must be int32"
    yield "col int64", (x, crow, col.long(), values, None), "col must be int16 or int32"
    yield "col float", (x, crow, col.float(), values, None), "col must be int16 or int32"
    yield "values dtype", (x, crow, col, values.bfloat16(), None), "values must have x's dtype"
    yield "empty crow", (x, crow[:0], col, values, None), "crow must have N \\+ 1 >= 1 entries"
    yield "col and values", (x, crow, col[:-1].contiguous(), values, None), "one entry per stored value"
    yield "bias shape", (x, crow, col, values, torch.ones(7)), r"bias must have shape \(6,\)"
    yield "int bias", (x, crow, col, values, torch.ones(6, dtype=torch.int64)), "bias must be floating point"
    for i, name in ((1, "crow"), (2, "col"), (3, "values"), (4, "bias")):
        args = [x, crow, col, values, torch.ones(6)]
        args[i] = args[i].to("meta")
        yield f"{name} on meta", tuple(args), f"{name} must be on cpu like x, got meta"


def lowrank_linear_bad_inputs():
    """(name, args, message regex): bad arguments of lowrank_linear; every device's op rejects them alike."""
    x, V, U, b = torch.randn(4, 40), torch.randn(6, 40), torch.randn(7, 6), torch.randn(7)
    yield "3-D x", (x[None], V, U, b), "x must be 2-D"
    yield "int x", (x.int(), V, U, b), "x must be float32, bfloat16 or float16"
    yield "strided x", (torch.randn(40, 4).T, V, U, b), "x must be contiguous"
    yield "V 1-D", (x, V.flatten(), U, b), "V must be 2-D"
    yield "U 3-D", (x, V, U[None], b), "U must be 2-D"
    yield "V dtype", (x, V.bfloat16(), U, b), "V must have x's dtype"
    yield "U dtype", (x, V, U.half(), b), "U must have x's dtype"
    yield "V strided", (x, torch.randn(40, 6).T, U, b), "V must be contiguous"
    yield "U strided", (x, V, torch.randn(6, 7).T, b), "U must be contiguous"
    yield "K of V", (x, torch.randn(6, 41), U, b), r"V must have shape \(r, 40\) for x of shape \[4, 40\], got \[6, 41\]"
    yield "r of U", (x, V, torch.randn(7, 5), b), r"U must have shape \(N, 6\) for V of shape \[6, 40\], got \[7, 5\]"
    yield "bias shape", (x, V, U, torch.ones(6)), r"bias must have shape \(7,\)"
    yield "int bias", (x, V, U, torch.ones(7, dtype=torch.int64)), "bias must be floating point"
    for i, name in ((1, "V"), (2, "U"), (3, "bias")):
        args = [x, V, U, b]
        args[i] = args[i].to("meta")
        yield f"{name} on meta", tuple(args), f"{name} must be on cpu like x, got meta"


def compile_for_sm90(script: str, cases: dict) -> dict:
    """Runs a Triton ahead-of-time compile script (argv[1]: the JSON cases; its last stdout line: the
    JSON result) in a child process, without a GPU: under TRITON_INTERPRET=1 (set above where no GPU is
    present) triton.language is patched for the interpreter and cannot build IR. Skips the test where
    this Triton cannot compile ahead of time."""
    import json
    import subprocess
    import sys

    import triton

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, cwd="/",
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        if "ImportError" in tail or "AttributeError" in tail or "TypeError" in tail:
            pytest.skip(f"Triton {triton.__version__} cannot compile ahead of time here: {tail}")
        raise AssertionError(r.stderr[-4000:])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"Triton {triton.__version__} has no ASTSource: {result['skip']}")
    return result


def capture_cuda_graph(fn, static_x: torch.Tensor, warmup: int = 2):
    """(graph, static output) of fn(static_x) captured in a CUDA graph, after `warmup` calls on a side
    stream (as torch.cuda.graphs documents: compiles, autotunes and one-off checks happen there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x)
    return graph, static_out
