"""The CUDA path of int8_linear: the Triton kernel (triton_kernels/int8_linear.py) against the
float64 reference, and the registered CUDA op torchslim::int8_linear.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 there), on tiny shapes: the interpreter costs ~3 ms per program per K step.
With a GPU the same kernel tests run compiled on CUDA tensors, and the `gpu` tests run the op.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import FLOAT_DTYPES, assert_close_to_reference, int8_linear_bad_inputs  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from torchslim import _cuda_registration, ops, reference  # noqa: E402
from torchslim.triton_kernels import int8_linear as kernels  # noqa: E402
from torchslim.triton_kernels.int8_linear import int8_matmul_dequant  # noqa: E402

INTERPRETED = kernels._interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernel_device = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="neither the Triton interpreter (TRITON_INTERPRET=1) nor a CUDA device")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

SETTINGS = settings(max_examples=50, deadline=None)
# Fixed 16x16x32 tiles (the interpreter's default, passed explicitly so that the GPU also runs them
# instead of autotuning each new shape): sizes straddle one and several tiles and K steps.
TILES = kernels.INTERPRETER_CONFIG
small = st.one_of(st.integers(1, 40), st.sampled_from([1, 3, 16, 17, 33]))
small_k = st.one_of(st.integers(1, 70), st.sampled_from([1, 3, 17, 32, 33, 129]))


def make_case(M, N, K, dtype, bias_dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    w_q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return tuple(t.to(device) if t is not None else None for t in (x, w_q, w_scale, bias))


def epilogue_magnitude(q, s, w_q, w_scale, bias):
    """|acc| * a_scale * w_scale + |bias|: the size of the terms the float32 epilogue rounds."""
    acc = q.double() @ w_q.double().T  # exact: integer partial sums stay far below 2**53
    mag = acc.abs() * (s.double()[:, None] * w_scale.double()[None, :])
    return mag + (bias.double().abs() if bias is not None else 0)


def reference_from_quantized(q, s, w_q, w_scale, bias):
    """reference.int8_linear from an already quantized x, in float64 on q's device."""
    out = (q.double() @ w_q.double().T) * (s.double()[:, None] * w_scale.double()[None, :])
    return out + bias.double() if bias is not None else out


def assert_is_cast_of(out, out32):
    """out (bf16/fp16) is the float32 result rounded once, to nearest even as torch's .to() does.

    The interpreter rounds float32 -> bfloat16 by truncation (its cast passes no rounding mode);
    compiled Triton rounds to nearest even. Either way the cast is the only step after float32.
    """
    if INTERPRETED and out.dtype == torch.bfloat16:
        expected = (out32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    else:
        expected = out32.to(out.dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


def assert_matches_reference(out, out32, ref, mag):
    """The whole chain within the rounding bound of conftest.py; truncated bf16 in two steps."""
    assert_close_to_reference(out32, ref, mag)
    if out.dtype == torch.float32:
        return
    assert_is_cast_of(out, out32)
    if not (INTERPRETED and out.dtype == torch.bfloat16):
        assert_close_to_reference(out, ref, mag)


# ---------------------------------------------------------------------------------------------
# the kernel, through the interpreter (CPU) or compiled (GPU)
# ---------------------------------------------------------------------------------------------
@needs_kernel_device
@given(M=small, N=small, K=small_k, seed=st.integers(0, 2**31))
@SETTINGS
def test_int32_accumulation_is_exact(M, N, K, seed):
    # Unit scales, no bias, float32 out: the output is the integer dot product itself, which
    # float32 holds exactly below 2**24 (here |acc| <= 127 * 128 * 129).
    g = torch.Generator().manual_seed(seed)
    a_q = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    b_q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    a_q[0] = 127  # extremes: the largest |product| in every position of a row / channel
    b_q[0] = -128
    out = int8_matmul_dequant(a_q.to(DEVICE), torch.ones(M, device=DEVICE), b_q.to(DEVICE),
                              torch.ones(N, device=DEVICE), None, torch.float32, config=TILES)
    exact = reference.int8_accumulate(a_q, b_q)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert torch.equal(out.cpu().long(), exact) and torch.equal(out.cpu().double(), exact.double())


@needs_kernel_device
@given(M=small, N=small, K=small_k, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, *FLOAT_DTYPES]), seed=st.integers(0, 2**31))
@SETTINGS
def test_matches_reference(M, N, K, dtype, bias_dtype, seed):
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, bias_dtype, seed)
    q, s = reference.quantize_per_token(x)
    ref = reference.int8_linear(x, w_q, w_scale, bias)
    mag = epilogue_magnitude(q, s, w_q, w_scale, bias)
    args = [t.to(DEVICE) if t is not None else None for t in (q, s, w_q, w_scale, bias)]
    out = int8_matmul_dequant(*args, dtype, config=TILES)
    out32 = int8_matmul_dequant(*args, torch.float32, config=TILES)
    assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous()
    assert_matches_reference(out.cpu(), out32.cpu(), ref, mag)


CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1),
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=2),   # tiles wider in M than in N
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),   # group taller than the grid
]


@needs_kernel_device
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(str(v) for v in c.values()))
@pytest.mark.parametrize("M,N,K", [(50, 37, 64), (50, 37, 65), (1, 70, 96), (70, 1, 31)])
def test_block_configs(config, M, N, K):
    # K in {64, 96} takes the EVEN_K loop for these BLOCK_K, 31 and 65 the masked one.
    x, w_q, w_scale, bias = make_case(M, N, K, torch.float32, torch.float32, M * N + K)
    q, s = reference.quantize_per_token(x)
    ref = reference.int8_linear(x, w_q, w_scale, bias)
    out = int8_matmul_dequant(*(t.to(DEVICE) for t in (q, s, w_q, w_scale, bias)), torch.float32, config=config)
    assert_close_to_reference(out.cpu(), ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


@needs_kernel_device
def test_strided_operands():
    # The launcher passes strides through: a column-major a_q and a b_q with padded rows.
    M, N, K = 19, 23, 45
    x, w_q, w_scale, bias = make_case(M, N, K, torch.float16, torch.float16, 5)
    q, s = reference.quantize_per_token(x)
    ref = reference.int8_linear(x, w_q, w_scale, bias)
    a_cm = q.to(DEVICE).T.contiguous().T
    b_pad = torch.zeros(N, K + 13, dtype=torch.int8)
    b_pad[:, :K] = w_q
    b_view = b_pad.to(DEVICE)[:, :K]
    assert not a_cm.is_contiguous() and not b_view.is_contiguous()
    args = (a_cm, s.to(DEVICE), b_view, w_scale.to(DEVICE))
    out = int8_matmul_dequant(*args, bias.to(DEVICE), torch.float16, config=TILES)
    out32 = int8_matmul_dequant(*args, bias.to(DEVICE), torch.float32, config=TILES)
    assert_matches_reference(out.cpu(), out32.cpu(), ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_and_nonfinite_rows(dtype):
    x, w_q, w_scale, bias = make_case(5, 20, 40, dtype, dtype, 3)
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 7] = float("-inf")
    q, s = reference.quantize_per_token(x)
    out = int8_matmul_dequant(*(t.to(DEVICE) for t in (q, s, w_q, w_scale, bias)), dtype, config=TILES).cpu()
    assert torch.equal(out[1], bias)  # scale 0: exactly the bias
    assert out[2].isnan().all() and out[3].isnan().all()  # NaN scale: NaN rows, as the reference
    assert torch.isfinite(out[[0, 4]]).all()


@needs_kernel_device
def test_empty_dimensions():
    i8 = dict(dtype=torch.int8, device=DEVICE)
    ones = dict(device=DEVICE)
    out = int8_matmul_dequant(torch.zeros(0, 8, **i8), torch.ones(0, **ones), torch.zeros(5, 8, **i8),
                              torch.ones(5, **ones), None, torch.bfloat16)
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16
    out = int8_matmul_dequant(torch.zeros(3, 8, **i8), torch.ones(3, **ones), torch.zeros(0, 8, **i8),
                              torch.ones(0, **ones), None, torch.float16)
    assert out.shape == (3, 0)
    # K = 0: an empty sum, so every row is the bias.
    bias = torch.randn(5, device=DEVICE)
    out = int8_matmul_dequant(torch.zeros(3, 0, **i8), torch.zeros(3, **ones), torch.zeros(5, 0, **i8),
                              torch.ones(5, **ones), bias, torch.float32)
    assert torch.equal(out, bias.expand(3, 5))


def bad_launches():
    a, s_a = torch.zeros(4, 32, dtype=torch.int8), torch.ones(4)
    b, s_b = torch.zeros(8, 32, dtype=torch.int8), torch.ones(8)
    yield "a dtype", (a.float(), s_a, b, s_b, None, torch.float32), "a_q must be a 2-D int8"
    yield "b 1-D", (a, s_a, b[0], s_b, None, torch.float32), "b_q must be a 2-D int8"
    yield "K", (a, s_a, b[:, :31], s_b, None, torch.float32), "K=32 but b_q has K=31"
    yield "a_scale shape", (a, torch.ones(5), b, s_b, None, torch.float32), r"a_scale .* shape \(4,\)"
    yield "b_scale dtype", (a, s_a, b, s_b.double(), None, torch.float32), "b_scale must be a contiguous float32"
    yield "b_scale strided", (a, s_a, b, torch.ones(16)[::2], None, torch.float32), "b_scale must be a contiguous"
    yield "bias shape", (a, s_a, b, s_b, torch.ones(9), torch.float32), r"bias .* shape \(8,\)"
    yield "bias dtype", (a, s_a, b, s_b, torch.ones(8, dtype=torch.int32), torch.float32), "bias must be"
    yield "out dtype", (a, s_a, b, s_b, None, torch.int32), "out_dtype"
    wide = torch.zeros(1, kernels.MAX_K + 1, dtype=torch.int8)
    yield "huge K", (wide, torch.ones(1), wide, torch.ones(1), None, torch.float32), "overflow"


@pytest.mark.parametrize("name,args,message", list(bad_launches()), ids=[b[0] for b in bad_launches()])
def test_launcher_rejects_bad_arguments(name, args, message):
    with pytest.raises(ValueError, match=message):
        int8_matmul_dequant(*args)


@needs_cuda
def test_launcher_rejects_mixed_devices():
    a, s = torch.zeros(4, 32, dtype=torch.int8, device="cuda"), torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="b_q is on cpu but a_q is on cuda"):
        int8_matmul_dequant(a, s, torch.zeros(8, 32, dtype=torch.int8), torch.ones(8, device="cuda"),
                            None, torch.float32)


def test_quick_autotuning_times_one_config(monkeypatch):
    # TORCHSLIM_TRITON_AUTOTUNE=0 (the GPU run's tests): the first config that fits the call, alone.
    monkeypatch.delenv("TORCHSLIM_TRITON_AUTOTUNE", raising=False)
    full = kernels._prune_configs(kernels._CONFIGS, {"M_BUCKET": 1024})
    monkeypatch.setenv("TORCHSLIM_TRITON_AUTOTUNE", "0")
    assert len(full) > 1 and kernels._prune_configs(kernels._CONFIGS, {"M_BUCKET": 1024}) == full[:1]


def test_autotune_pruning_separates_decode_tiles(monkeypatch):
    monkeypatch.delenv("TORCHSLIM_TRITON_AUTOTUNE", raising=False)  # the full tables, as in use
    def kept(m):
        return {c.kwargs["BLOCK_M"] for c in kernels._prune_configs(kernels._CONFIGS, {"M_BUCKET": m})}

    assert kept(1) == kept(16) == {16}
    assert min(kept(32)) > kernels.SMALL_M and kept(32) == kept(4096)
    for c in kernels._CONFIGS:
        # int8 MMA needs K steps of 32 and 16-row tiles; Hopper's opt-in limit is 227 KiB.
        assert c.kwargs["BLOCK_K"] % 32 == 0 and c.kwargs["BLOCK_M"] % 16 == 0
        assert (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * c.num_stages <= 227 * 1024


# ---------------------------------------------------------------------------------------------
# the CUDA op's registration and argument checks (run anywhere: the checks are plain Python)
# ---------------------------------------------------------------------------------------------
def test_cuda_kernel_is_registered_where_triton_is_installed():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchslim::int8_linear", "CUDA")


# The cases of the CPU op's checks: the CUDA op says the same things (its checks run before any
# launch, so CPU tensors exercise them anywhere).
@pytest.mark.parametrize("name,args,message", list(int8_linear_bad_inputs()), ids=[b[0] for b in int8_linear_bad_inputs()])
def test_cuda_op_argument_checks(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        _cuda_registration._int8_linear_cuda(*args)


def test_finite_scale_check_is_redone_after_an_inplace_change():
    s = torch.ones(8)
    _cuda_registration._check_finite_scale(s, "int8_linear")  # checked and remembered
    s[3] = float("inf")
    with pytest.raises(RuntimeError, match=r"w_scale\[3\] is inf"):
        _cuda_registration._check_finite_scale(s, "int8_linear")


def test_packed_op_on_cuda_arguments_says_what_to_use():
    # Registered for CUDA so that a mixed-device call is named, not a missing-kernel error.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchslim::int8_linear_packed", "CUDA")
    x, w_q = torch.randn(2, 32), torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="on cuda call int8_linear"):
        _cuda_registration._int8_linear_packed_cuda(x, ops.int8_pack_weight(w_q), torch.ones(8), None)


# ---------------------------------------------------------------------------------------------
# edge numerics of the epilogue (as the CPU kernels)
# ---------------------------------------------------------------------------------------------
@needs_kernel_device
def extreme_scale_case(M, K, N):
    """x (M >= 3, K) float32, w_q (N, K), bias (N,) and three w_scale choices whose products with the
    row scales of x leave float32's normal range: row 0 is 3e38 in column 0 alone, where every weight
    is 0 (a zero sum: times an overflowing scale product it must give the bias, not 0 * Inf); row 1 is
    tiny (1e-28: times 1e-11 channel scales below FLT_MIN, precision); row 2's scale times 606686.1
    lands within one float32 ulp of FLT_MAX. Rows from 3 on are ordinary."""
    x = torch.randn(M, K)
    x[0] = 0
    x[0, 0] = 3e38
    x[1] = torch.randn(K) * 1e-28
    x[2, 0] = 7.123265e34
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_q[:, 0] = 0
    bias = torch.randn(N)
    w_scales = (torch.full((N,), 1e3), torch.rand(N) * 1e-11 + 1e-12, torch.tensor([606686.1] * N))
    return x, w_q, bias, w_scales


def test_epilogue_never_makes_nan_from_an_overflowing_scale_product():
    # Row scale 3e38 / 127 times channel scale 1e3 overflows float32; a zero sum must give the
    # bias, a tiny scale product must keep its precision (the float64 branch of the kernel).
    x, w_q, bias, w_scales = extreme_scale_case(3, 40, 20)
    q, s = reference.quantize_per_token(x)
    for w_scale in w_scales:
        out = int8_matmul_dequant(*(t.to(DEVICE) for t in (q, s, w_q, w_scale, bias)), torch.float32, config=TILES).cpu()
        ref = reference_from_quantized(q, s, w_q, w_scale, bias)
        assert torch.equal(out[0], bias)
        assert_close_to_reference(out[1:], ref[1:], epilogue_magnitude(q, s, w_q, w_scale, bias)[1:])


# ---------------------------------------------------------------------------------------------
# GPU: the op as users call it
# ---------------------------------------------------------------------------------------------
sizes = st.one_of(st.integers(1, 300), st.sampled_from([1, 3, 16, 17, 129, 1000]))


@pytest.mark.gpu
@needs_cuda
@given(M=sizes, N=sizes, K=sizes, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**31))
@settings(max_examples=25, deadline=None)
def test_cuda_op_matches_reference(M, N, K, dtype, bias_dtype, seed):
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, bias_dtype, seed, device="cuda")
    out = ops.int8_linear(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (M, N) and out.device == x.device
    q, s = reference.quantize_per_token(x)
    # The op's own quantization must be the reference's, bit for bit.
    q_op, s_op = ops.quantize_per_token(x)
    assert torch.equal(q_op, q) and torch.equal(s_op, s)
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("N,K", [(384, 1536), (4096, 4096)])
def test_cuda_op_model_shapes(M, N, K, dtype):
    # Real layer sizes under the autotuned configs (decode tiles at M <= 16).
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, dtype, M + N + K, device="cuda")
    out = ops.int8_linear(x, w_q, w_scale, bias)
    q, s = reference.quantize_per_token(x)
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 5, 16, 17, 300])
def test_cuda_autotuned_kernel_alone(M):
    # The Triton GEMM with the reference's quantization: independent of the CUDA quantize kernel.
    x, w_q, w_scale, bias = make_case(M, 1000, 777, torch.bfloat16, torch.bfloat16, M, device="cuda")
    q, s = reference.quantize_per_token(x)
    out = int8_matmul_dequant(q, s, w_q, w_scale, bias, torch.bfloat16)
    out32 = int8_matmul_dequant(q, s, w_q, w_scale, bias, torch.float32)
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_matches_reference(out, out32, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_opcheck(dtype):
    x, w_q, w_scale, bias = make_case(5, 24, 70, dtype, dtype, 4, device="cuda")
    x.requires_grad_()  # the autograd tests run too
    torch.library.opcheck(torch.ops.torchslim.int8_linear.default, (x, w_q, w_scale, bias))
    torch.library.opcheck(torch.ops.torchslim.int8_linear.default, (x, w_q, w_scale, None))


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_checks_devices_and_scales():
    x, w_q, w_scale, bias = make_case(4, 8, 32, torch.bfloat16, None, 0, device="cuda")
    with pytest.raises(RuntimeError, match="w_q must be on cuda"):
        ops.int8_linear(x, w_q.cpu(), w_scale)
    with pytest.raises(RuntimeError, match="w_scale must be on cuda"):
        ops.int8_linear(x, w_q, w_scale.cpu())
    ops.int8_linear(x, w_q, w_scale)
    w_scale[2] = float("nan")  # an in-place change after a checked call is checked again
    with pytest.raises(RuntimeError, match=r"w_scale\[2\] is nan"):
        ops.int8_linear(x, w_q, w_scale)


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_under_torch_compile():
    x, w_q, w_scale, bias = make_case(33, 64, 96, torch.bfloat16, torch.bfloat16, 6, device="cuda")

    def f(x):
        return torch.relu(ops.int8_linear(x, w_q, w_scale, bias)) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


_TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


@needs_kernel_device
@pytest.mark.skipif(INTERPRETED and _TRITON_VERSION < (3, 9),
                    reason="the Triton interpreter before 3.9 evaluates tl.fma as a multiply, then an add (two roundings)")
def test_epilogue_adds_the_bias_in_one_rounding():
    # acc * s = 1.5 FLT_MAX is beyond float32, acc * s + bias = 5e37 is not: an fma gives it.
    q = torch.zeros(1, 64, dtype=torch.int8)
    q[0, 0] = 127
    w_q = torch.zeros(1, 64, dtype=torch.int8)
    w_q[0, 0] = 127
    w_scale = torch.tensor([3.5e38 / 16129])
    bias = torch.tensor([-3e38])
    out = int8_matmul_dequant(*(t.to(DEVICE) for t in (q, torch.ones(1), w_q, w_scale, bias)), torch.float32, config=TILES)
    ref = reference_from_quantized(q, torch.ones(1), w_q, w_scale, bias)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-6, atol=0)
