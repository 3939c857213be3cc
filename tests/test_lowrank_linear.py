"""torchslim::lowrank_linear on the CPU, every kernel path this CPU runs (scalar, AVX-512 register
blocks, AMX tiles for bfloat16), against the float64 reference: random shapes and ranks (r = 1, odd
r), every dtype, the token chunks and tile tails, non-finite inputs, autograd (x, V, U, bias),
opcheck, compile, bad inputs."""
import pytest
import torch
from conftest import (FLOAT_DTYPES, UNIT_ROUNDOFF, assert_within, examples, lowrank_linear_bad_inputs)
from hypothesis import given
from hypothesis import strategies as st

from torchslim import ops, reference

SETTINGS = examples(30)
# Around the kernels' boundaries: one row (register gemv), AMX from 2 rows, token tiles of 16, pairs of
# tiles, chunks of 128 tokens; widths around the 16 / 32-element steps and 32-row weight blocks.
rows = st.one_of(st.integers(1, 20), st.sampled_from([31, 32, 33, 47, 48, 64, 65, 127, 128, 129, 257]))
sizes = st.one_of(st.integers(1, 40), st.sampled_from([31, 32, 33, 63, 64, 65, 100, 129]))
ranks = st.one_of(st.integers(1, 9), st.sampled_from([15, 16, 17, 31, 32, 33, 64, 65]))


def make_case(M, N, K, r, dtype, bias_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    V = (torch.randn(r, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    U = (torch.randn(N, r, generator=g) / max(r, 1) ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return x, V, U, bias


def error_bound(x, V, U, bias):
    """What the op may differ from reference.lowrank_linear by: float32 sums of K products (t) and of r
    products plus the bias (out), each at most (terms) roundings relative to the sum of the terms'
    magnitudes; t's rounding to x.dtype, which the float32 and float64 sums may resolve one ulp apart
    (2 u(dtype) |t| through |U|); the final rounding to x.dtype."""
    u, u32 = UNIT_ROUNDOFF[x.dtype], UNIT_ROUNDOFF[torch.float32]
    K, r = x.shape[1], V.shape[0]
    xv = x.double().abs() @ V.double().abs().T
    t = (x.double() @ V.double().T).to(x.dtype).double().abs()
    Ua = U.double().abs().T
    b = bias.to(x.dtype).double().abs() if bias is not None else 0.0
    ref = reference.lowrank_linear(x, V, U, bias)
    flips = 2 * u * (t @ Ua) if x.dtype != torch.float32 else 0.0
    return ref, (u * ref.abs() + flips + 2 * (K + 1) * u32 * (xv @ Ua) + 2 * (r + 1) * u32 * (t @ Ua + b))


def check_against_reference(x, V, U, bias):
    out = ops.lowrank_linear(x, V, U, bias)
    ref, bound = error_bound(x, V, U, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_within(out, ref, bound)
    return out


@given(M=rows, N=sizes, K=sizes, r=ranks, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       seed=st.integers(0, 2**31))
@SETTINGS
def test_matches_reference(lowrank_isa, M, N, K, r, dtype, bias_dtype, seed):
    check_against_reference(*make_case(M, N, K, r, dtype, bias_dtype, seed))


@pytest.mark.parametrize("M", [1, 2, 15, 16, 17, 33, 96, 97, 128, 129, 300])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_path_on_a_model_shape(lowrank_isa, M, dtype):
    # several token chunks (128), odd tiles, r not a multiple of 32, N not a multiple of 32
    check_against_reference(*make_case(M, 200, 384, 48 if M < 100 else 40, dtype, torch.float32, M))


@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rank_one_and_single_columns(lowrank_isa, M, dtype):
    for N, K, r in ((1, 1, 1), (7, 1, 1), (1, 9, 1), (5, 33, 3), (3, 2, 2)):
        check_against_reference(*make_case(M, N, K, r, dtype, dtype, N + K + r))


@pytest.mark.parametrize("shape", [(0, 5, 7, 3), (4, 0, 7, 3), (4, 5, 0, 3), (4, 5, 7, 0), (0, 0, 0, 0)])
def test_empty_dimensions(lowrank_isa, shape):
    M, N, K, r = shape
    x, V, U, bias = make_case(M, N, K, r, torch.bfloat16, torch.float32, 1)
    for b in (bias, None):
        out = ops.lowrank_linear(x, V, U, b)
        assert out.shape == (M, N) and out.dtype == torch.bfloat16
        expected = b.to(torch.bfloat16).expand(M, N) if b is not None else torch.zeros(M, N, dtype=torch.bfloat16)
        assert torch.equal(out, expected)  # an empty sum (K = 0 or r = 0) gives the bias


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 3, 40, 70, 130])
def test_nonfinite_inputs_give_the_references_nonfinites(lowrank_isa, dtype, M):
    x, V, U, bias = make_case(M, 50, 70, 9, dtype, dtype, 3)
    x[0, 5] = float("inf")
    x[M - 1, 69] = float("nan")
    V2 = V.clone()
    V2[2, 0] = float("-inf")
    for args in ((x, V, U, bias), (x.nan_to_num(0.0, 0.0, 0.0), V2, U, bias)):
        check_against_reference(*args)


def test_intermediate_is_rounded_to_the_dtype():
    # t = 1 + 2^-9 is not a bfloat16: the op rounds it (to 1) before the second product, as two
    # F.linear calls do, so out = 1 exactly instead of 1 + 2^-9.
    x = torch.ones(2, 2, dtype=torch.bfloat16)
    V = torch.tensor([[1.0, 2.0**-9]], dtype=torch.bfloat16)
    U = torch.ones(3, 1, dtype=torch.bfloat16)
    assert torch.equal(ops.lowrank_linear(x, V, U).float(), torch.ones(2, 3))


@pytest.mark.parametrize("name,args,message", list(lowrank_linear_bad_inputs()),
                         ids=[c[0] for c in lowrank_linear_bad_inputs()])
def test_bad_inputs_get_a_clear_error(name, args, message):
    with pytest.raises(RuntimeError, match="lowrank_linear: " + message):
        ops.lowrank_linear(*args)
    # the fake (torch.compile, meta tensors) checks alike: every tensor on meta
    meta_args = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                 if isinstance(a, torch.Tensor) else a for a in args]
    if "on meta" not in name:
        with pytest.raises(RuntimeError, match="lowrank_linear: " + message.replace("cpu", "meta")):
            ops.lowrank_linear(*meta_args)


def test_fake_gives_the_shape():
    x, V, U, bias = make_case(5, 7, 33, 4, torch.bfloat16, torch.bfloat16, 0)
    out = ops.lowrank_linear(*(t.to("meta") for t in (x, V, U, bias)))
    assert out.shape == (5, 7) and out.dtype == torch.bfloat16 and out.is_meta


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 6, 70])
def test_gradients_are_those_of_two_linears(dtype, M):
    # every input's gradient, against autograd through F.linear(F.linear(x, V), U, bias)
    base = make_case(M, 12, 37, 5, dtype, torch.float32, 4)
    leaves1 = [t.clone().requires_grad_() for t in base]
    ops.lowrank_linear(*leaves1).float().square().sum().backward()
    leaves2 = [t.clone().requires_grad_() for t in base]
    x, V, U, b = leaves2
    torch.nn.functional.linear(torch.nn.functional.linear(x, V), U, b.to(dtype)).float().square().sum().backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for a, e in zip(leaves1, leaves2):
        assert a.grad.dtype == e.grad.dtype
        torch.testing.assert_close(a.grad, e.grad, rtol=tol, atol=tol * e.grad.abs().max().item())


def test_gradient_of_x_alone_skips_the_factors():
    x, V, U, _ = make_case(3, 8, 16, 4, torch.float32, None, 7)
    x.requires_grad_()
    ops.lowrank_linear(x, V, U).sum().backward()
    assert x.grad is not None and V.grad is None and U.grad is None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype):
    for M, bias in ((3, True), (9, False)):
        x, V, U, b = make_case(M, 8, 40, 5, dtype, dtype if bias else None, M)
        torch.library.opcheck(torch.ops.torchslim.lowrank_linear.default,
                              (x.requires_grad_(), V.requires_grad_(), U, b))


def test_compiles_fullgraph_with_dynamic_rows():
    x, V, U, bias = make_case(5, 8, 40, 6, torch.float32, torch.float32, 6)
    fn = torch.compile(lambda x: ops.lowrank_linear(x, V, U, bias).relu(), fullgraph=True, dynamic=True)
    for M in (5, 9):
        xm = torch.randn(M, 40)
        torch.testing.assert_close(fn(xm), ops.lowrank_linear(xm, V, U, bias).relu())
