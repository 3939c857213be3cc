"""The one-launch INT8 decode kernel (csrc/cuda/int8_decode.cu, torchslim::_int8_linear_decode):
per-token quantization fused into a split-K GEMV for M <= 16.

Against the float64 reference, and bit for bit against the two-launch path it replaces
(quantize_per_token + the Triton GEMM int8_matmul_dequant): the same q, the same scales, an exact
int32 sum and the same float32 epilogue give the same bits. The one documented difference is the
float64 epilogue branch (scale products beyond float32's normal range): per element here, per tile
in the Triton kernel, so those cases are compared with the reference only.

Every test needs an NVIDIA GPU and a build with the CUDA kernels (skipped otherwise).
"""
import pytest
import torch

pytest.importorskip("triton")

from conftest import FLOAT_DTYPES, assert_close_to_reference, capture_cuda_graph, examples
from hypothesis import given
from hypothesis import strategies as st
from test_int8_linear_triton import (
    epilogue_magnitude,
    extreme_scale_case,
    make_case,
    reference_from_quantized,
)
from torchslim import _cuda_registration, ops, reference

try:
    HAS_KERNEL = _cuda_registration.has_cuda_kernel("_int8_linear_decode")
except RuntimeError:  # an installed build older than the op's schema
    HAS_KERNEL = False
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not HAS_KERNEL, reason="this build has no CUDA kernel for _int8_linear_decode"),
]

MAX_M = 16
BIAS_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]


def decode(x, w_q, w_scale, bias=None):
    return torch.ops.torchslim._int8_linear_decode.default(x, w_q, w_scale, bias)


def two_launch(x, w_q, w_scale, bias=None):
    """What int8_linear runs without the opt-in: quantize_per_token, then the Triton GEMM."""
    from torchslim.triton_kernels.int8_linear import int8_matmul_dequant

    q, s = torch.ops.torchslim.quantize_per_token.default(x)
    return int8_matmul_dequant(q, s, w_q, w_scale, bias, x.dtype)


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check(x, w_q, w_scale, bias, out=None, same_as_two_launch=True):
    """out (computed here when None) against the float64 reference and the two-launch path."""
    if out is None:
        out = decode(x, w_q, w_scale, bias)
    M, N = x.shape[0], w_q.shape[0]
    assert out.dtype == x.dtype and out.shape == (M, N) and out.device == x.device and out.is_contiguous()
    q, s = reference.quantize_per_token(x)
    ref = reference_from_quantized(q, s, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(q, s, w_q, w_scale, bias))
    if same_as_two_launch:
        assert_bits_equal(out, two_launch(x, w_q, w_scale, bias))
    return out


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(1, 1), (3, 17), (17, 3), (33, 100), (129, 16), (5, 2049), (70, 4100)])
@pytest.mark.parametrize("M", [1, 2, 7, 16])
def test_matches_reference_and_two_launch_path(M, N, K, dtype):
    # K = 16 / 4100 take the 16-byte weight loads; K = 1, 3, 17, 100, 2049 the byte loads and tails;
    # K = 2049, 4100 split K over several CTAs; M = 7 pads to 8 rows, M = 2 to 2.
    check(*make_case(M, N, K, dtype, dtype, M * 1000 + N + K, device="cuda"))


@pytest.mark.parametrize("bias_dtype", BIAS_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bias_dtypes(dtype, bias_dtype):
    # The bias is read in its own dtype (no cast kernel) and widened to float32 exactly.
    check(*make_case(5, 300, 520, dtype, bias_dtype, 7, device="cuda"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(384, 1536), (4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("M", [1, 16])
def test_model_shapes(M, N, K, dtype):
    # Llama-7B / MiniLM layer sizes: N = 384 must still spread over every SM (many K splits).
    check(*make_case(M, N, K, dtype, dtype, M + N + K, device="cuda"))


@pytest.mark.parametrize("M,N,K", [(16, 50, 20000), (2, 3, 70001)])
def test_long_k(M, N, K):
    # Beyond one CTA's shared memory at M = 16 (K > ~13600 on an H100): more splits are forced.
    check(*make_case(M, N, K, torch.bfloat16, torch.bfloat16, K, device="cuda"))


def test_largest_k_is_exact():
    # K = 132104: 127 * (-128) * K = -(2**31 - 1024) is the most negative sum; it must not wrap.
    K = 2**31 // (127 * 128)
    x = torch.full((1, K), 127.0, device="cuda")  # scale 1, q = 127
    w_q = torch.full((3, K), -128, dtype=torch.int8, device="cuda")
    w_q[1] = 127
    w_q[2, ::2] = 0
    out = decode(x, w_q, torch.ones(3, device="cuda"))
    exact = torch.tensor([[-127 * 128 * K, 127 * 127 * K, -127 * 128 * (K // 2)]], dtype=torch.float64)
    assert torch.equal(out.cpu().double(), exact.float().double())


@given(M=st.integers(1, MAX_M), N=st.one_of(st.integers(1, 300), st.sampled_from([1, 64, 127, 128, 129])),
       K=st.one_of(st.integers(0, 600), st.sampled_from([1, 15, 16, 2048, 2064, 4097])),
       dtype=st.sampled_from(FLOAT_DTYPES), bias_dtype=st.sampled_from(BIAS_DTYPES), seed=st.integers(0, 2**31))
@examples(25)
def test_random_shapes(M, N, K, dtype, bias_dtype, seed):
    check(*make_case(M, N, K, dtype, bias_dtype, seed, device="cuda"))


def test_empty_dimensions():
    x, w_q, w_scale, bias = make_case(3, 5, 8, torch.bfloat16, torch.float32, 0, device="cuda")
    assert decode(x[:0], w_q, w_scale, bias).shape == (0, 5)
    assert decode(x, w_q[:0], w_scale[:0], bias[:0]).shape == (3, 0)
    # K = 0: an empty sum (row scale 0), so every row is the bias in x's dtype.
    out = decode(x[:, :0], w_q[:, :0].contiguous(), w_scale, bias)
    assert_bits_equal(out, bias.to(torch.bfloat16).expand(3, 5))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_zero_and_nonfinite_rows(dtype):
    x, w_q, w_scale, bias = make_case(7, 300, 1000, dtype, torch.float32, 3, device="cuda")
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 999] = float("inf")
    x[4, 0] = float("-inf")
    x[5] = 0
    x[5, 17] = 1e-38 if dtype != torch.float16 else 0  # absmax below 127 / FLT_MAX: counts as zeros
    out = check(x, w_q, w_scale, bias)
    assert_bits_equal(out[1], bias.to(dtype))  # scale 0: exactly the bias
    assert_bits_equal(out[5], bias.to(dtype))
    assert out[2:5].isnan().all()  # NaN scale, q = 0: NaN rows, as quantize_per_token + the GEMM
    assert torch.isfinite(out[[0, 6]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_scales_take_the_float64_path(dtype):
    # Row scale 3e38 / 127 times channel scale 1e3 overflows float32 (a zero sum must give the
    # bias, not 0 * Inf); 1e-28 rows times 1e-11 channel scales fall below FLT_MIN (precision).
    # Row 3 is an ordinary row next to them: the per-element choice keeps it on float32.
    x, w_q, bias, w_scales = extreme_scale_case(4, 300, 200)
    x, w_q, bias = x.to(dtype).cuda(), w_q.cuda(), bias.cuda()
    for w_scale in w_scales:
        w_scale = w_scale.cuda()
        out = check(x, w_q, w_scale, bias, same_as_two_launch=False)
        assert_bits_equal(out[0], bias.to(dtype))
        assert torch.isfinite(out).all()


def test_strided_rows_and_misaligned_pointers():
    # Rows of x with a padded stride (16-byte loads: aligned and not), x and w_q starting one
    # element past a 16-byte boundary (element / byte loads): all give the contiguous result.
    M, N, K = 9, 200, 1040
    x, w_q, w_scale, bias = make_case(M, N, K, torch.bfloat16, torch.bfloat16, 11, device="cuda")
    expected = check(x, w_q, w_scale, bias)
    for pad in (8, 3):
        big = torch.zeros(M, K + pad, dtype=x.dtype, device="cuda")
        big[:, :K] = x
        assert not big[:, :K].is_contiguous()
        assert_bits_equal(decode(big[:, :K], w_q, w_scale, bias), expected)
    shifted = torch.zeros(M * K + 1, dtype=x.dtype, device="cuda")
    shifted[1:] = x.flatten()
    x1 = shifted[1:].view(M, K)
    assert x1.data_ptr() % 16 != 0
    assert_bits_equal(decode(x1, w_q, w_scale, bias), expected)
    wbuf = torch.zeros(N * K + 1, dtype=torch.int8, device="cuda")
    wbuf[1:] = w_q.flatten()
    w1 = wbuf[1:].view(N, K)
    assert w1.is_contiguous() and w1.data_ptr() % 16 != 0
    assert_bits_equal(decode(x, w1, w_scale, bias), expected)
    # A single row: its stride is never read.
    assert_bits_equal(decode(big[:1, :K], w_q, w_scale, bias), expected[:1])


# ---------------------------------------------------------------------------------------------
# one launch, reusable: determinism, workspace reset, streams, CUDA graphs
# ---------------------------------------------------------------------------------------------
def test_repeated_calls_are_bit_identical_and_leave_the_workspace_clean():
    a = make_case(16, 4096, 4096, torch.bfloat16, torch.bfloat16, 1, device="cuda")
    b = make_case(3, 11008, 1000, torch.float16, None, 2, device="cuda")
    c = make_case(1, 384, 4096, torch.float32, torch.float32, 3, device="cuda")
    first = [check(*a), check(*b), check(*c)]
    for _ in range(5):  # interleaved shapes reuse one workspace: each call must leave it zeroed
        for case, out in zip((a, b, c), first):
            assert_bits_equal(decode(*case), out)
    # A larger N than any before grows the workspace; the smaller calls still match afterwards.
    check(*make_case(16, 30000, 64, torch.bfloat16, None, 4, device="cuda"))
    assert_bits_equal(decode(*a), first[0])


def test_concurrent_streams_do_not_share_counters():
    cases = [make_case(8, 4096, 2048, torch.bfloat16, torch.bfloat16, s, device="cuda") for s in range(2)]
    expected = [decode(*case) for case in cases]
    streams = [torch.cuda.Stream() for _ in cases]
    outs = [[], []]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(decode(*cases[i]))
    torch.cuda.synchronize()
    for i in range(2):
        for out in outs[i]:
            assert_bits_equal(out, expected[i])


@pytest.mark.parametrize("through", ["op", "int8_linear"])
def test_cuda_graph_capture_and_replay(through, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CUDA_OPT_IN", "int8_decode")
    x, w_q, w_scale, bias = make_case(4, 1000, 2048, torch.bfloat16, torch.bfloat16, 5, device="cuda")
    if through == "op":
        def fn(t):
            return decode(t, w_q, w_scale, bias)
    else:
        def fn(t):
            return ops.int8_linear(t, w_q, w_scale, bias)
    static_x = x.clone()
    g, static_out = capture_cuda_graph(fn, static_x)
    for seed in range(3):
        new_x = make_case(4, 1000, 2048, torch.bfloat16, None, 100 + seed, device="cuda")[0]
        static_x.copy_(new_x)
        for _ in range(2):  # replays are repeatable: the graph leaves its workspace zeroed
            g.replay()
            torch.cuda.synchronize()
            assert_bits_equal(static_out, decode(new_x, w_q, w_scale, bias))
    # Eager calls after the capture are unaffected by it.
    check(x, w_q, w_scale, bias)


# ---------------------------------------------------------------------------------------------
# the route through int8_linear (opt-in)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 16, 17])
def test_int8_linear_takes_the_kernel_when_opted_in(M, monkeypatch):
    x, w_q, w_scale, bias = make_case(M, 384, 1536, torch.bfloat16, torch.float64, M, device="cuda")
    monkeypatch.delenv("TORCHSLIM_CUDA_OPT_IN", raising=False)
    default = ops.int8_linear(x, w_q, w_scale, bias)
    asked = []
    real = _cuda_registration.has_cuda_kernel

    def spy(op):
        asked.append(op)
        return real(op)

    monkeypatch.setattr(_cuda_registration, "has_cuda_kernel", spy)
    monkeypatch.setenv("TORCHSLIM_CUDA_OPT_IN", "int8_decode")
    out = ops.int8_linear(x, w_q, w_scale, bias)
    # M <= 16 asks for the decode kernel; M = 17 keeps the two-launch path (not an error).
    assert ("_int8_linear_decode" in asked) == (M <= MAX_M)
    assert_bits_equal(out, default)  # float64 bias: converted to float32 first on both paths
    if M <= MAX_M:
        assert_bits_equal(out, decode(x, w_q, w_scale, bias.float()))


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def bad_inputs(device="cuda"):
    """(name, args, message regex); device="meta" only names them (collection needs no GPU)."""
    x, w_q, w_scale, bias = make_case(4, 8, 32, torch.bfloat16, torch.float32, 0, device=device)

    def cpu(t):  # a meta tensor has no data to copy
        return t.cpu() if device == "cuda" else t

    yield "M=17", (torch.randn(17, 32, device=device), w_q, w_scale, None), "M=17 rows.*M <= 16"
    yield "int x", (x.to(torch.int32), w_q, w_scale, None), "x must be float32, bfloat16 or float16"
    yield "3-D x", (x[None], w_q, w_scale, None), "x must be 2-D"
    yield "column-strided x", (torch.randn(32, 4, device=device).T, w_q, w_scale, None), "unit stride along K"
    yield "K", (x[:, :31], w_q, w_scale, None), "x has K=31 but w_q has K=32"
    yield "float weight", (x, w_q.float(), w_scale, None), "w_q must be int8"
    yield "non-contiguous w_q", (x, torch.zeros(32, 8, dtype=torch.int8, device=device).T, w_scale, None), \
        "w_q must be contiguous"
    yield "w_scale dtype", (x, w_q, w_scale.double(), None), "w_scale must be float32"
    yield "w_scale shape", (x, w_q, w_scale[:7], None), r"w_scale must have shape \(8,\)"
    yield "bias dtype", (x, w_q, w_scale, bias.double()), "bias must be float32, bfloat16 or float16"
    yield "bias shape", (x, w_q, w_scale, bias[:5]), r"bias must have shape \(8,\)"
    yield "CPU x", (cpu(x), w_q, w_scale, None), "x must be a CUDA tensor"
    yield "CPU w_q", (x, cpu(w_q), w_scale, None), "w_q must be on cuda"
    yield "CPU w_scale", (x, w_q, cpu(w_scale), None), "w_scale must be on cuda"
    yield "CPU bias", (x, w_q, w_scale, cpu(bias)), "bias must be on cuda"
    big_k = 2**31 // (127 * 128) + 1
    yield "huge K", (torch.zeros(1, big_k, device=device), torch.zeros(1, big_k, dtype=torch.int8, device=device),
                     torch.ones(1, device=device), None), f"K={big_k} exceeds"


@pytest.mark.parametrize("name", [b[0] for b in bad_inputs("meta")])
def test_bad_inputs_raise_clearly(name):
    _, args, message = next(b for b in bad_inputs() if b[0] == name)
    with pytest.raises(RuntimeError, match=message):
        decode(*args)


def test_all_cpu_arguments_name_the_missing_kernel():
    # No CPU kernel on purpose (int8_linear is the public op): torch's dispatcher says so.
    x, w_q, w_scale, _ = make_case(2, 8, 32, torch.float32, None, 0)
    with pytest.raises(NotImplementedError, match="_int8_linear_decode"):
        decode(x, w_q, w_scale, None)
