"""The INT8 W8A8 ops on the CPU, every kernel path (scalar, AVX2, AVX-512 VNNI, AMX) this CPU runs,
against the float64 reference in torchslim.reference."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import FLOAT_DTYPES, HALF_SUBNORMAL_SPACING, UNIT_ROUNDOFF, assert_close_to_reference, examples, int8_linear_bad_inputs
from hypothesis import given
from hypothesis import strategies as st

from torchslim import ops, reference

SETTINGS = examples(25)
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


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_kernel_paths_agree(dtype):
    # Every ISA computes the same integers and the same epilogue: outputs agree to the bit, NaNs
    # included (a NaN bias, and a row whose output overflows against an -Inf bias).
    import torchslim
    from conftest import available_isas

    x, w_q, w_scale, bias = make_case(70, 100, 333, dtype, True, 1)
    bias[3] = -float("nan")
    bias[5] = -float("inf")
    x[7] = x[7].float() * 1e30 if dtype != torch.float16 else x[7]
    before = torchslim.cpu_isa()
    outs = {}
    try:
        for isa in available_isas():
            torchslim.set_cpu_isa(isa)
            outs[isa] = ops.int8_linear(x, w_q, w_scale, bias)
    finally:
        torchslim.set_cpu_isa(before)
    first = outs["scalar"]
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    for isa, out in outs.items():
        assert torch.equal(out.view(bits), first.view(bits)), isa


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
    # x requires grad, so opcheck's autograd-registration and aot-dispatch tests run the backward.
    x, w_q, w_scale, bias = make_case(5, 24, 70, dtype, True, 4)
    x.requires_grad_()
    packed = ops.int8_pack_weight(w_q)
    quantize = torch.ops.torchslim.quantize_per_token.default
    torch.library.opcheck(quantize, (x.detach(),))
    # opcheck's aot-dispatch test sums every output into one accumulator and fails on an integer
    # first output (q) when x requires grad: the other tests, then the gradient test below.
    torch.library.opcheck(quantize, (x,), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.torchslim.int8_pack_weight.default, (w_q,))
    torch.library.opcheck(torch.ops.torchslim.int8_unpack_weight.default, (packed, 24, 70))
    torch.library.opcheck(torch.ops.torchslim.int8_linear.default, (x, w_q, w_scale, bias))
    torch.library.opcheck(torch.ops.torchslim.int8_linear.default, (x, w_q, w_scale, None))
    torch.library.opcheck(torch.ops.torchslim.int8_linear_packed.default, (x, packed, w_scale, bias))
    torch.library.opcheck(torch.ops.torchslim.int8_linear_packed.default, (x, packed, w_scale, bias.clone().requires_grad_()))


@pytest.mark.parametrize("name,args,message", list(int8_linear_bad_inputs()), ids=[b[0] for b in int8_linear_bad_inputs()])
def test_bad_input_raises_clearly(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.int8_linear(*args)


def test_bad_packed_weight_raises():
    x = torch.randn(4, 32)
    packed = ops.int8_pack_weight(torch.zeros(8, 32, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"int8_linear_packed: w_packed was packed for a \(N=8, K=32\) weight"):
        ops.int8_linear_packed(x, packed, torch.ones(40))
    with pytest.raises(RuntimeError, match=r"int8_linear_packed: w_packed was packed for .* \(N=8, K=200\)"):
        ops.int8_linear_packed(torch.randn(4, 200), packed, torch.ones(8))
    with pytest.raises(RuntimeError, match="int8_unpack_weight: w_packed holds"):
        ops.int8_unpack_weight(packed[:-1].contiguous(), 8, 32)


# ---------------------------------------------------------------------------------------------
# the packed layout is self-describing (issue: a weight packed for other N, K was accepted)
# ---------------------------------------------------------------------------------------------
def test_packed_weight_records_its_shape():
    # K = 60 and K = 64 pad to the same width, N = 17 and N = 32 to the same blocks: the sizes
    # agree, only the header tells them apart.
    w = torch.randint(-127, 128, (17, 64), dtype=torch.int8)
    packed = ops.int8_pack_weight(w)
    with pytest.raises(RuntimeError, match=r"int8_linear_packed: w_packed was packed for a \(N=17, K=64\) weight, "
                                           r"but the call needs \(N=17, K=60\)"):
        ops.int8_linear_packed(torch.randn(3, 60), packed, torch.ones(17))
    with pytest.raises(RuntimeError, match=r"packed for a \(N=17, K=64\) weight, but the call needs \(N=32, K=64\)"):
        ops.int8_linear_packed(torch.randn(3, 64), packed, torch.ones(32))
    with pytest.raises(RuntimeError, match=r"int8_unpack_weight: w_packed was packed for a \(N=17, K=64\)"):
        ops.int8_unpack_weight(packed, 17, 60)
    with pytest.raises(RuntimeError, match=r"int8_unpack_weight: N and K must be in \[0, 2\*\*31\), got N=-5"):
        ops.int8_unpack_weight(packed, -5, 64)
    with pytest.raises(RuntimeError, match=r"N and K must be in \[0, 2\*\*31\), got N=9223372036854775807"):
        ops.int8_unpack_weight(packed, 2**63 - 1, 64)
    corrupt = packed.clone()
    corrupt[0] ^= 1
    with pytest.raises(RuntimeError, match="w_packed has no valid header"):
        ops.int8_linear_packed(torch.randn(3, 64), corrupt, torch.ones(17))
    with pytest.raises(RuntimeError, match="less than its 64-byte header"):
        ops.int8_unpack_weight(packed[:10].clone(), 0, 0)


@given(N=st.integers(1, 40), K=st.integers(1, 150), M=st.integers(1, 40), seed=st.integers(0, 2**31))
@examples(15)
def test_padding_bytes_never_reach_the_output(N, K, M, seed):
    # Fill every byte of the packed weight that is not a weight (k >= K, channels >= N) with
    # random bytes: every kernel path must still give the result of the clean weight, bit for bit.
    import torchslim
    from conftest import available_isas

    x, w_q, w_scale, bias = make_case(M, N, K, torch.float32, True, seed)
    packed = ops.int8_pack_weight(w_q)
    k_pad, n_pad = -(-K // 64) * 64, -(-N // 16) * 16
    g = torch.Generator().manual_seed(seed)
    blocks = packed[64:].view(n_pad // 16, k_pad // 4, 16, 4)  # [block][k group][channel][k in group]
    k_idx = torch.arange(k_pad).view(k_pad // 4, 4)
    n_idx = torch.arange(n_pad).view(n_pad // 16, 1, 16, 1)
    junk = (k_idx.view(1, k_pad // 4, 1, 4) >= K) | (n_idx >= N)
    noise = torch.randint(-128, 128, blocks.shape, generator=g, dtype=torch.int8)
    dirty = packed.clone()
    dirty[64:].view(blocks.shape)[junk.expand(blocks.shape)] = noise[junk.expand(blocks.shape)]
    assert torch.equal(ops.int8_unpack_weight(dirty, N, K), w_q)
    before = torchslim.cpu_isa()
    try:
        for isa in available_isas():
            torchslim.set_cpu_isa(isa)
            assert torch.equal(ops.int8_linear_packed(x, dirty, w_scale, bias), ops.int8_linear(x, w_q, w_scale, bias)), isa
    finally:
        torchslim.set_cpu_isa(before)


# ---------------------------------------------------------------------------------------------
# edge numerics
# ---------------------------------------------------------------------------------------------
def test_scale_product_overflow_gives_the_float_result(cpu_isa):
    # x = [3e38, 0, ...] against a weight that is zero where x is not: the product of the two
    # scales (3e38 / 127 * 1e3) overflows float32, yet the true output is 0 (+ bias), not 0 * Inf.
    K, N = 40, 20
    x = torch.zeros(3, K)
    x[0, 0] = 3e38
    x[1, 0], x[1, 1] = 3e38, 1e36  # a non-zero sum: the true output overflows, as float math does
    x[2] = torch.randn(K)
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_q[:, 0] = 0
    w_scale = torch.full((N,), 1e3)
    bias = torch.randn(N)
    out = ops.int8_linear(x, w_q, w_scale, bias)
    assert torch.equal(out[0], bias)
    ref = reference.int8_linear(x, w_q, w_scale, bias)
    assert torch.equal(out[1], ref[1].float())  # +-Inf where the float64 result exceeds float32
    assert_close_to_reference(out[2:], ref[2:], epilogue_magnitude(x, w_q, w_scale, bias)[2:])


@pytest.mark.parametrize("x_mag,w_mag", [(1e-28, 1e-11), (1e-25, 1e-14), (1.0, 1e-40), (1e-36, 1.0), (1e36, 1e-36)])
def test_extreme_scales_keep_float32_accuracy(cpu_isa, x_mag, w_mag):
    # Scale products below float32's normal range take the double epilogue: outputs of normal
    # size stay within the usual rounding bound instead of losing precision in the product.
    x, w_q, _, bias = make_case(7, 33, 50, torch.float32, True, 7)
    x = x * x_mag
    w_scale = torch.rand(33) * w_mag + w_mag / 2
    bias = bias * 0
    out = ops.int8_linear(x, w_q, w_scale, bias)
    ref = reference.int8_linear(x, w_q, w_scale, bias)
    assert_close_to_reference(out, ref, epilogue_magnitude(x, w_q, w_scale, bias))


def test_empty_k_gives_the_bias():
    x = torch.randn(3, 0)
    out = ops.int8_linear(x, torch.zeros(5, 0, dtype=torch.int8), torch.ones(5), torch.arange(5.0))
    assert torch.equal(out, torch.arange(5.0).expand(3, 5))
    assert torch.equal(ops.int8_linear(x, torch.zeros(5, 0, dtype=torch.int8), torch.ones(5)), torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradient_is_that_of_the_dequantized_layer(packed, dtype):
    # Straight through the activation quantization: dx = dy @ (w_q * w_scale), dbias = sum dy.
    x, w_q, w_scale, bias = make_case(6, 24, 40, dtype, True, 8)
    x.requires_grad_()
    bias.requires_grad_()
    w = ops.int8_pack_weight(w_q) if packed else w_q
    op = ops.int8_linear_packed if packed else ops.int8_linear
    dy = torch.randn(6, 24).to(dtype)
    op(x, w, w_scale, bias).backward(dy)
    w_deq = w_q.double() * w_scale.double()[:, None]
    expected_dx = dy.double() @ w_deq
    # One rounding of dy * w_scale to the compute dtype (float32 for float16), a product over
    # N = 24 terms: the classical bound (N + 2) u |dy| |w| (Higham, Accuracy and Stability of
    # Numerical Algorithms, 3.5); then the rounding to x's dtype.
    u = UNIT_ROUNDOFF[torch.float32 if dtype == torch.float16 else dtype]
    bound = (24 + 2) * u * (dy.double().abs() @ w_deq.abs()) + 1e-30
    bound = bound + UNIT_ROUNDOFF[dtype] * expected_dx.abs() + HALF_SUBNORMAL_SPACING[dtype]
    assert x.grad.dtype == dtype and ((x.grad.double() - expected_dx).abs() <= bound).all()
    assert bias.grad.dtype == dtype
    # A sum over M = 6 rows in float32, rounded once to the dtype.
    bias_bound = 6 * UNIT_ROUNDOFF[torch.float32] * dy.double().abs().sum(0) + UNIT_ROUNDOFF[dtype] * dy.double().sum(0).abs()
    assert ((bias.grad.double() - dy.double().sum(0)).abs() <= bias_bound).all()


def test_float16_gradient_does_not_underflow():
    # dy * w_scale = 1e-8 is below float16's smallest subnormal: the product must not be formed there.
    w_q = torch.randint(-127, 128, (1024, 64), generator=torch.Generator().manual_seed(11), dtype=torch.int8)
    w_scale = torch.full((1024,), 1e-4)
    x = torch.randn(4, 64, dtype=torch.float16, requires_grad=True)
    y = ops.int8_linear(x, w_q, w_scale)
    dy = torch.full_like(y, 1e-4)
    (dx,) = torch.autograd.grad(y, x, dy)
    expected = dy.double() @ (w_q.double() * 1e-4)
    torch.testing.assert_close(dx.double(), expected, rtol=2e-3, atol=1e-7)


def test_quantize_per_token_gradient_with_no_columns():
    x = torch.randn(3, 0, requires_grad=True)
    (g,) = torch.autograd.grad(ops.quantize_per_token(x)[1].sum(), x)
    assert g.shape == (3, 0)


def test_gradient_through_a_residual_block_reaches_every_branch():
    x, w_q, w_scale, bias = make_case(4, 32, 32, torch.float32, True, 9)
    x.requires_grad_()
    y = x + ops.int8_linear(torch.relu(x), w_q, w_scale, bias)
    y.sum().backward()
    expected = 1 + (torch.ones(4, 32) @ (w_q.float() * w_scale[:, None])) * (x > 0)
    torch.testing.assert_close(x.grad, expected)


def test_gradient_for_a_frozen_scale_is_a_clear_error():
    x, w_q, w_scale, _ = make_case(4, 8, 16, torch.float32, False, 10)
    w_scale.requires_grad_()
    y = ops.int8_linear(x.requires_grad_(), w_q, w_scale)
    with pytest.raises(RuntimeError, match="int8_linear: w_scale requires grad, but int8 weights and their scales are frozen"):
        y.sum().backward()


def test_quantize_per_token_scale_gradient_matches_the_reference():
    x = torch.randn(6, 20)
    x[1, 3] = x[1, 7] = x[1].abs().max() + 1  # a tie: the gradient is shared
    x[2] = 0  # a zero row: scale is the constant 0
    x[3, 0] = float("nan")  # a NaN row: scale is the constant NaN
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    g = torch.randn(6)
    (ops.quantize_per_token(a)[1] * g).nansum().backward()
    (reference.quantize_per_token(b)[1] * g).nansum().backward()
    rows = [0, 1, 2, 4, 5]
    torch.testing.assert_close(a.grad[rows], b.grad[rows])
    # The NaN row's scale is the constant NaN: no gradient (torch's amax backward would give NaN).
    assert torch.equal(a.grad[3], torch.zeros(20))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_is_loaded():
    # The kernels parallelize with at::parallel_for compiled with -fopenmp and linked to torch's
    # libgomp; a second OpenMP runtime would fight torch's over the cores.
    x, w_q, w_scale, bias = make_case(64, 64, 64, torch.float32, False, 5)
    ops.int8_linear(x, w_q, w_scale, bias)
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


# ---------------------------------------------------------------------------------------------
# choosing the CPU kernel path
# ---------------------------------------------------------------------------------------------
def run_with_isa_env(value: str) -> subprocess.CompletedProcess:
    code = "import warnings; warnings.simplefilter('always'); import torchslim; print(torchslim.cpu_isa())"
    env = dict(os.environ, TORCHSLIM_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_isa_environment_variable_is_case_insensitive():
    import torchslim

    wanted = torchslim._C.supported_cpu_isas()[0]  # scalar: every CPU runs it
    done = run_with_isa_env(wanted.upper())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == wanted


def test_unknown_isa_in_the_environment_is_an_error():
    done = run_with_isa_env("bogus")
    assert done.returncode != 0
    assert "TORCHSLIM_CPU_ISA='bogus' is not an instruction set torchslim knows" in done.stderr


def test_isa_this_cpu_lacks_is_reported_not_ignored():
    import torchslim

    missing = [isa for isa in torchslim._C.known_cpu_isas() if isa not in torchslim._C.supported_cpu_isas()]
    if not missing:
        pytest.skip("this CPU runs every kernel path")
    done = run_with_isa_env(missing[0])
    assert done.returncode == 0, done.stderr
    assert f"TORCHSLIM_CPU_ISA='{missing[0]}': this CPU does not support it" in done.stderr
    assert done.stdout.strip() == torchslim._C.best_cpu_isa()


def test_set_cpu_isa_says_what_is_wrong():
    import torchslim

    with pytest.raises(ValueError, match="unknown instruction set 'avx9'; known: scalar, avx2, avx_vnni, avx512_vnni, amx"):
        torchslim.set_cpu_isa("avx9")
    before = torchslim.cpu_isa()
    try:
        torchslim.set_cpu_isa("SCALAR")
        assert torchslim.cpu_isa() == "scalar"
    finally:
        torchslim.set_cpu_isa(before)
