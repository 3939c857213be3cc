"""The Hopper CUTLASS GEMM torchslim::_int8_gemm_sm90 (csrc/cuda/int8_gemm_sm90.cu) against the float64
reference, and int8_linear's opt-in dispatch to it (TORCHSLIM_CUDA_OPT_IN=int8_sm90, M >= 64).

Every test needs an sm_90 GPU (H100/H200) and a build with the kernel (cmake/cuda.cmake:
TORCHSLIM_CUTLASS, headers from nvidia-cutlass); elsewhere they are skipped.

The kernel's epilogue is the Triton kernel's (triton_kernels/int8_linear.py): fmaf(float(acc),
a_scale * b_scale, float(bias)) in float32, then one rounding to the output dtype; so on ordinary
inputs both give the same bits, and the helpers of test_int8_linear_triton.py apply unchanged. One
documented difference: the float64 branch for scale products beyond float32's normal range is taken
per element here, per tile there (the other elements of such a tile may differ by ~1 float32 ulp;
both stay within the bound of conftest.py).
"""
import pytest
import torch
from conftest import FLOAT_DTYPES, assert_close_to_reference

# Helpers only (no test functions: pytest would collect them here too).
from test_int8_linear_triton import (
    assert_matches_reference,
    epilogue_magnitude,
    extreme_scale_case,
    make_case,
    reference_from_quantized,
)
from torchslim import _cuda_registration, ops, reference


def _why_skipped():
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs compute capability 9.0 (H100/H200), got {torch.cuda.get_device_capability()}"
    try:
        registered = _cuda_registration.has_cuda_kernel("_int8_gemm_sm90")
    except RuntimeError:  # a torchslim._C built before the op's schema existed
        registered = False
    if not registered:
        return "this build has no _int8_gemm_sm90 (built without CUTLASS headers or without 90a)"
    return None


_SKIP = _why_skipped()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

OPT_IN = "TORCHSLIM_CUDA_OPT_IN"
BIAS_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]


def gemm(q, s, w_q, w_scale, bias, out_dtype):
    return torch.ops.torchslim._int8_gemm_sm90.default(q, s, w_q, w_scale, bias, out_dtype)


def check_against_reference(M, N, K, dtype, bias_dtype, seed):
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, bias_dtype, seed, device="cuda")
    q, s = reference.quantize_per_token(x)
    out = gemm(q, s, w_q, w_scale, bias, dtype)
    out32 = gemm(q, s, w_q, w_scale, bias, torch.float32)
    assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous() and out.device == x.device
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_matches_reference(out, out32, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


# ---------------------------------------------------------------------------------------------
# the op against the float64 reference
# ---------------------------------------------------------------------------------------------
# N and K: one partial tile, odd multiples of the alignment (N % 8, K % 16), several tiles with
# ragged edges, and a Llama-7B-sized layer.
@pytest.mark.parametrize("bias_dtype", BIAS_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(24, 16), (40, 48), (136, 208), (264, 1040)])
@pytest.mark.parametrize("M", [64, 65, 128, 257, 1000])
def test_matches_reference(M, N, K, dtype, bias_dtype):
    check_against_reference(M, N, K, dtype, bias_dtype, seed=M * 7919 + N * 31 + K)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("M", [64, 257, 1000])
def test_model_shapes(M, dtype):
    check_against_reference(M, 4096, 4096, dtype, dtype, seed=M)
    check_against_reference(M, 11008, 4096, dtype, None, seed=M + 1)  # Llama-7B MLP up


def test_int32_accumulation_is_exact():
    # Unit scales, no bias, float32 out: the output is the integer sum itself (|acc| <= 127 * 128 * 1024
    # < 2**24, exact in float32), at the extremes of every product.
    M, N, K = 129, 136, 1024
    g = torch.Generator().manual_seed(0)
    a_q = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    b_q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    a_q[0], b_q[0] = 127, -128
    a_q[1], b_q[1] = -127, -128
    out = gemm(a_q.cuda(), torch.ones(M, device="cuda"), b_q.cuda(), torch.ones(N, device="cuda"), None,
               torch.float32)
    exact = reference.int8_accumulate(a_q, b_q)
    assert torch.equal(out.cpu().double(), exact.double())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_zero_and_nonfinite_rows(dtype):
    x, w_q, w_scale, bias = make_case(130, 40, 64, dtype, dtype, 3, device="cuda")
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 7] = float("-inf")
    x[129, 0] = float("inf")  # in the second row tile
    q, s = reference.quantize_per_token(x)
    out = gemm(q, s, w_q, w_scale, bias, dtype)
    assert torch.equal(out[1], bias)  # scale 0: exactly the bias
    assert out[[2, 3, 129]].isnan().all()  # NaN scale: NaN rows, as the reference
    assert torch.isfinite(out[[0, *range(4, 129)]]).all()
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


def test_epilogue_scale_products_beyond_float32():
    # As test_int8_linear_triton's test of the same name, on a 64-row problem: an overflowing scale
    # product must not turn a zero sum into NaN (0 * Inf), a tiny one must keep its precision.
    x, w_q, bias, w_scales = extreme_scale_case(64, 48, 24)
    q, s = reference.quantize_per_token(x)
    for w_scale in w_scales:
        args = [t.cuda() for t in (q, s, w_q, w_scale, bias)]
        out = gemm(*args, torch.float32).cpu()
        ref = reference_from_quantized(q, s, w_q, w_scale, bias)
        assert torch.equal(out[0], bias)
        assert_close_to_reference(out[1:], ref[1:], epilogue_magnitude(q, s, w_q, w_scale, bias)[1:])


def test_epilogue_adds_the_bias_in_one_rounding():
    # acc * s = 1.5 FLT_MAX is beyond float32, acc * s + bias = 5e37 is not: an fma gives it.
    M, K, N = 64, 64, 8
    q = torch.zeros(M, K, dtype=torch.int8)
    q[:, 0] = 127
    w_q = torch.zeros(N, K, dtype=torch.int8)
    w_q[:, 0] = 127
    w_scale = torch.full((N,), 3.5e38 / 16129)
    bias = torch.full((N,), -3e38)
    s = torch.ones(M)
    out = gemm(*(t.cuda() for t in (q, s, w_q, w_scale, bias)), torch.float32)
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# int8_linear's dispatch (opt-in)
# ---------------------------------------------------------------------------------------------
def ran_sm90(fn):
    """fn()'s result and whether it called torchslim::_int8_gemm_sm90 (the dispatcher records ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == "torchslim::_int8_gemm_sm90" for e in prof.events())


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(64, 136, 208), (257, 264, 1040), (1000, 4096, 4096)])
def test_dispatch_equals_the_triton_path(monkeypatch, M, N, K, dtype, bias_dtype):
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, bias_dtype, M + N + K, device="cuda")
    monkeypatch.setenv(OPT_IN, "int8_sm90")
    out, used = ran_sm90(lambda: ops.int8_linear(x, w_q, w_scale, bias))
    assert used, "int8_linear did not call _int8_gemm_sm90 although opted in"
    monkeypatch.setenv(OPT_IN, "")
    triton_out, used = ran_sm90(lambda: ops.int8_linear(x, w_q, w_scale, bias))
    assert not used
    # The same float32 epilogue, the same rounding to dtype: the same bits on ordinary inputs.
    torch.testing.assert_close(out, triton_out, rtol=0, atol=0, equal_nan=True)
    q, s = reference.quantize_per_token(x)
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


@pytest.mark.parametrize("M,N,K,dtype,why", [
    (63, 136, 208, torch.bfloat16, "M < 64"),
    (128, 136, 200, torch.bfloat16, "K % 16 != 0"),
    (128, 132, 208, torch.bfloat16, "N * 2 bytes % 16 != 0"),
    (128, 130, 208, torch.float32, "N * 4 bytes % 16 != 0"),
])
def test_dispatch_keeps_the_triton_path_where_the_kernel_does_not_apply(monkeypatch, M, N, K, dtype, why):
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, dtype, 1, device="cuda")
    monkeypatch.setenv(OPT_IN, "int8_sm90")
    out, used = ran_sm90(lambda: ops.int8_linear(x, w_q, w_scale, bias))
    assert not used, why
    q, s = reference.quantize_per_token(x)
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))


def test_dispatch_needs_the_opt_in(monkeypatch):
    x, w_q, w_scale, bias = make_case(128, 136, 208, torch.bfloat16, None, 2, device="cuda")
    monkeypatch.delenv(OPT_IN, raising=False)
    assert not ran_sm90(lambda: ops.int8_linear(x, w_q, w_scale, bias))[1]
    monkeypatch.setenv(OPT_IN, "all")
    assert ran_sm90(lambda: ops.int8_linear(x, w_q, w_scale, bias))[1]


def test_dispatch_keeps_autograd(monkeypatch):
    # The opt-in changes the forward kernel only; the backward is int8_linear's.
    monkeypatch.setenv(OPT_IN, "int8_sm90")
    x, w_q, w_scale, bias = make_case(96, 136, 208, torch.float32, torch.float32, 4, device="cuda")
    x.requires_grad_()
    out = ops.int8_linear(x, w_q, w_scale, bias)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# bad inputs: clear errors before any launch
# ---------------------------------------------------------------------------------------------
def bad_calls():
    dev = "cuda"
    a, s_a = torch.zeros(64, 32, dtype=torch.int8, device=dev), torch.ones(64, device=dev)
    b, s_b = torch.zeros(16, 32, dtype=torch.int8, device=dev), torch.ones(16, device=dev)
    f32, bf16 = torch.float32, torch.bfloat16
    yield "a float", (a.float(), s_a, b, s_b, None, f32), "a_q must be a 2-D int8"
    yield "b 1-D", (a, s_a, b[0], s_b, None, f32), "b_q must be a 2-D int8"
    yield "K mismatch", (a, s_a, b[:, :16], s_b, None, f32), "a_q has K=32 but b_q has K=16"
    yield "a_scale shape", (a, torch.ones(65, device=dev), b, s_b, None, f32), r"a_scale .* shape \(64,\)"
    yield "a_scale dtype", (a, s_a.double(), b, s_b, None, f32), "a_scale must be a contiguous float32"
    yield "b_scale dtype", (a, s_a, b, s_b.half(), None, f32), "b_scale must be a contiguous float32"
    yield "b_scale strided", (a, s_a, b, torch.ones(32, device=dev)[::2], None, f32), "b_scale must be a contiguous"
    yield "bias dtype", (a, s_a, b, s_b, torch.ones(16, dtype=torch.int32, device=dev), f32), "bias must be"
    yield "bias float64", (a, s_a, b, s_b, torch.ones(16, dtype=torch.float64, device=dev), f32), "bias must be"
    yield "bias shape", (a, s_a, b, s_b, torch.ones(17, device=dev), f32), r"bias .* shape \(16,\)"
    yield "out dtype", (a, s_a, b, s_b, None, torch.int32), "out_dtype must be float32, bfloat16 or float16"
    a40, b40 = torch.zeros(64, 40, dtype=torch.int8, device=dev), torch.zeros(16, 40, dtype=torch.int8, device=dev)
    yield "K % 16", (a40, s_a, b40, s_b, None, f32), "K=40 must be a multiple of 16: TMA"
    b12, s12 = torch.zeros(12, 32, dtype=torch.int8, device=dev), torch.ones(12, device=dev)
    yield "N * 2 % 16", (a, s_a, b12, s12, None, bf16), r"N=12 times 2 bytes .* multiple of 16"
    b6, s6 = torch.zeros(6, 32, dtype=torch.int8, device=dev), torch.ones(6, device=dev)
    yield "N * 4 % 16", (a, s_a, b6, s6, None, f32), r"N=6 times 4 bytes .* multiple of 16"
    yield "non-contiguous a", (torch.zeros(32, 64, dtype=torch.int8, device=dev).T, s_a, b, s_b, None, f32), \
        "must be contiguous"
    storage = torch.zeros(16 * 32 + 8, dtype=torch.int8, device=dev)
    yield "misaligned b", (a, s_a, storage[8:].view(16, 32), s_b, None, f32), "16-byte aligned"
    a0, b0 = torch.zeros(64, 0, dtype=torch.int8, device=dev), torch.zeros(16, 0, dtype=torch.int8, device=dev)
    yield "K = 0", (a0, s_a, b0, s_b, None, f32), "K must be positive"
    yield "b on cpu", (a, s_a, b.cpu(), s_b, None, f32), "b_q is on cpu but a_q is on cuda"
    yield "b_scale on cpu", (a, s_a, b, s_b.cpu(), None, f32), "b_scale is on cpu but a_q is on cuda"
    yield "bias on cpu", (a, s_a, b, s_b, torch.ones(16), f32), "bias is on cpu but a_q is on cuda"


@pytest.mark.parametrize("name,args,message", list(bad_calls()) if _SKIP is None else [],
                         ids=[c[0] for c in bad_calls()] if _SKIP is None else [])
def test_rejects_bad_arguments(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        gemm(*args)


def test_cpu_tensors_have_no_kernel():
    # All-CPU arguments dispatch to the CPU key, where the op has no kernel: torch says so.
    a, b = torch.zeros(64, 32, dtype=torch.int8), torch.zeros(16, 32, dtype=torch.int8)
    with pytest.raises(NotImplementedError, match="_int8_gemm_sm90.*CPU"):
        gemm(a, torch.ones(64), b, torch.ones(16), None, torch.float32)


def test_empty_dimensions():
    out = gemm(torch.zeros(0, 32, dtype=torch.int8, device="cuda"), torch.ones(0, device="cuda"),
               torch.zeros(16, 32, dtype=torch.int8, device="cuda"), torch.ones(16, device="cuda"), None,
               torch.bfloat16)
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16
    out = gemm(torch.zeros(64, 32, dtype=torch.int8, device="cuda"), torch.ones(64, device="cuda"),
               torch.zeros(0, 32, dtype=torch.int8, device="cuda"), torch.ones(0, device="cuda"), None,
               torch.float32)
    assert out.shape == (64, 0)


# ---------------------------------------------------------------------------------------------
# CUDA graphs: the launch takes the current stream, the workspace comes from torch's allocator
# ---------------------------------------------------------------------------------------------
def test_cuda_graph_capture_of_the_op():
    M, N, K, dtype = 200, 264, 1040, torch.bfloat16
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, dtype, 11, device="cuda")
    q, s = reference.quantize_per_token(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gemm(q, s, w_q, w_scale, bias, dtype)  # warm-up off the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm(q, s, w_q, w_scale, bias, dtype)
    x2, *_ = make_case(M, N, K, dtype, dtype, 12, device="cuda")
    q2, s2 = reference.quantize_per_token(x2)
    q.copy_(q2)
    s.copy_(s2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, gemm(q2, s2, w_q, w_scale, bias, dtype), rtol=0, atol=0)


def test_cuda_graph_capture_of_int8_linear(monkeypatch):
    monkeypatch.setenv(OPT_IN, "int8_sm90")
    M, N, K, dtype = 128, 264, 1040, torch.float16
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, dtype, 13, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.int8_linear(x, w_q, w_scale, bias)  # warm-up: also does the one-time w_scale check
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.int8_linear(x, w_q, w_scale, bias)
    x2, *_ = make_case(M, N, K, dtype, dtype, 14, device="cuda")
    x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ops.int8_linear(x2, w_q, w_scale, bias), rtol=0, atol=0)
