"""The INT8 W8A8 ops on the CPU, every kernel path (scalar, AVX2, AVX-512 VNNI, AMX) this CPU runs,
against the float64 reference in torchslim.reference."""
import pytest
import torch
from conftest import FLOAT_DTYPES, assert_close_to_reference, int8_linear_bad_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchslim import ops, reference

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Sizes around the kernels' steps: rows (1, 4, 6, 32), channels (16, 64), k (4, 64).
sizes = st.one_of(st.integers(1, 70), st.sampled_from([1, 3, 17, 31, 33, 64, 65, 129, 193]))


def make_case(M, N, K, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    w_q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    return x, w_q, w_scale, bias


def epilogue_magnitude(x, w_q, w_scale, bias):
    q, s = reference.quantize_per_token(x)
    mag = reference.int8_accumulate(q, w_q).abs().double() * (s.double()[:, None] * w_scale.double()[None, :])
    return mag + (bias.double().abs() if bias is not None else 0)


@given(M=sizes, K=sizes, dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31))
@SETTINGS
def test_quantize_per_token_is_bit_exact(cpu_isa, M, K, dtype, seed):
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype)
    x[0] = 0  # a row of zeros
    if M > 2:
        x[1, K // 2] = float("nan")
        x[2, 0] = float("-inf")
    if M > 4:
        x[3] = x[3].float() * 1e-38  # subnormal-sized: 127 / absmax overflows, a zero row
        x[4] = x[4].float() * 1e-36  # tiny but quantizable
    q, s = ops.quantize_per_token(x)
    q_ref, s_ref = reference.quantize_per_token(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref) or torch.allclose(s, s_ref, rtol=0, atol=0, equal_nan=True)


@given(M=sizes, N=sizes, K=sizes, dtype=st.sampled_from(FLOAT_DTYPES), with_bias=st.booleans(),
       seed=st.integers(0, 2**31))
@SETTINGS
def test_int8_linear_matches_reference(cpu_isa, M, N, K, dtype, with_bias, seed):
    x, w_q, w_scale, bias = make_case(M, N, K, dtype, with_bias, seed)
    out = ops.int8_linear(x, w_q, w_scale, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    ref = reference.int8_linear(x, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(x, w_q, w_scale, bias))


@pytest.mark.parametrize("M,N,K", [(300, 600, 700), (1, 1000, 130), (200, 40, 2000), (97, 257, 513)])
def test_larger_shapes_cross_every_loop(cpu_isa, M, N, K):
    # Beyond the property test's sizes: several row tasks, more than 16 channel blocks (the AMX
    # pair groups), several 512-wide k chunks, and both schedules (rows-outer when M >= N / 4).
    x, w_q, w_scale, bias = make_case(M, N, K, torch.bfloat16, True, M + N + K)
    out = ops.int8_linear(x, w_q, w_scale, bias)
    assert_close_to_reference(out, reference.int8_linear(x, w_q, w_scale, bias),
                              epilogue_magnitude(x, w_q, w_scale, bias))


@pytest.mark.parametrize("K", [1, 63, 64, 300, 1030])
def test_int32_accumulator_is_exact(cpu_isa, K):
    # Integer activations whose rows reach +-127 quantize to themselves with scale 1, and with
    # w_scale = 1 the float32 output is the integer dot product (exact below 2**24).
    M, N = 37, 45
    g = torch.Generator().manual_seed(K)
    x = torch.randint(-127, 128, (M, K), generator=g).float()
    x[:, 0] = 127
    w_q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    w_q[0] = -128  # the extreme weight value on every path (AVX2 saturation, VNNI offset)
    out = ops.int8_linear(x, w_q, torch.ones(N))
    exact = x.long() @ w_q.long().T
    assert torch.equal(out.long(), exact) and torch.equal(out, exact.float())


def test_packed_op_equals_plain_op(cpu_isa):
    x, w_q, w_scale, bias = make_case(50, 77, 130, torch.bfloat16, True, 0)
    packed = ops.int8_pack_weight(w_q)
    assert torch.equal(ops.int8_linear_packed(x, packed, w_scale, bias), ops.int8_linear(x, w_q, w_scale, bias))


def test_kernel_paths_agree():
    # Every ISA computes the same integers and the same epilogue: outputs agree to the bit.
    import torchslim
    from conftest import available_isas

    x, w_q, w_scale, bias = make_case(70, 100, 333, torch.float32, True, 1)
    before = torchslim.cpu_isa()
    outs = {}
    try:
        for isa in available_isas():
            torchslim.set_cpu_isa(isa)
            outs[isa] = ops.int8_linear(x, w_q, w_scale, bias)
    finally:
        torchslim.set_cpu_isa(before)
    first = outs["scalar"]
    for isa, out in outs.items():
        assert torch.equal(out, first), isa


def test_quantization_error_is_within_half_a_step():
    # Against the unquantized float64 product with the dequantized weight: per-token rounding
    # moves each x by at most half a step s_x / 2, so |err[m, n]| <= s_x[m] / 2 * sum_k |w[n, k]|.
    x, w_q, w_scale, bias = make_case(33, 40, 257, torch.float32, True, 2)
    w = w_q.double() * w_scale.double()[:, None]
    exact = x.double() @ w.T + bias.double()
    _, s_x = reference.quantize_per_token(x)
    bound = s_x.double()[:, None] / 2 * w.abs().sum(1)[None, :] * (1 + 1e-5) + 1e-6 * exact.abs()
    assert ((ops.int8_linear(x, w_q, w_scale, bias).double() - exact).abs() <= bound).all()


def test_nonfinite_and_zero_rows():
    x, w_q, w_scale, bias = make_case(6, 20, 40, torch.float32, True, 3)
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    out = ops.int8_linear(x, w_q, w_scale, bias)
    assert torch.equal(out[1], bias)  # scale 0: the output is the bias
    assert out[2].isnan().all() and out[3].isnan().all()  # like a float GEMM, NaN rows
    assert torch.isfinite(out[[0, 4, 5]]).all()


def test_zero_size():
    x = torch.randn(0, 32)
    w_q = torch.zeros(8, 32, dtype=torch.int8)
    assert ops.int8_linear(x, w_q, torch.ones(8)).shape == (0, 8)
    q, s = ops.quantize_per_token(x)
    assert q.shape == (0, 32) and s.shape == (0,)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype):
    x, w_q, w_scale, bias = make_case(5, 24, 70, dtype, True, 4)
    torch.library.opcheck(torch.ops.torchslim.quantize_per_token.default, (x,))
    torch.library.opcheck(torch.ops.torchslim.int8_pack_weight.default, (w_q,))
    packed = ops.int8_pack_weight(w_q)
    torch.library.opcheck(torch.ops.torchslim.int8_unpack_weight.default, (packed, 24, 70))
    torch.library.opcheck(torch.ops.torchslim.int8_linear.default, (x, w_q, w_scale, bias))
    torch.library.opcheck(torch.ops.torchslim.int8_linear.default, (x, w_q, w_scale, None))
    torch.library.opcheck(torch.ops.torchslim.int8_linear_packed.default, (x, packed, w_scale, bias))


@pytest.mark.parametrize("name,args,message", list(int8_linear_bad_inputs()), ids=[b[0] for b in int8_linear_bad_inputs()])
def test_bad_input_raises_clearly(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.int8_linear(*args)


def test_bad_packed_weight_raises():
    x = torch.randn(4, 32)
    packed = ops.int8_pack_weight(torch.zeros(8, 32, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="packed"):
        ops.int8_linear_packed(x, packed, torch.ones(40))  # N=40 needs 3 blocks, packed has 1
    with pytest.raises(RuntimeError, match="packed"):
        ops.int8_linear_packed(torch.randn(4, 200), packed, torch.ones(8))  # K=200 needs wider rows
    with pytest.raises(RuntimeError, match="packed"):
        ops.int8_unpack_weight(packed[:, :-1].contiguous(), 8, 32)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_is_loaded():
    # The kernels parallelize with at::parallel_for compiled with -fopenmp and linked to torch's
    # libgomp; a second OpenMP runtime would fight torch's over the cores.
    x, w_q, w_scale, bias = make_case(64, 64, 64, torch.float32, False, 5)
    ops.int8_linear(x, w_q, w_scale, bias)
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes
