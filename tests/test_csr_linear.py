"""torchslim::csr_linear on the CPU, every kernel path this CPU runs (scalar, AVX-512 gather for few
rows of x, AVX-512 token tiles for more), against the float64 reference: random patterns, uneven
rows, every dtype, both column index dtypes, malformed CSR, autograd, opcheck, compile, bad inputs."""
import pytest
import torch
from conftest import FLOAT_DTYPES, assert_close_to_reference, csr_linear_bad_inputs, examples
from hypothesis import given
from hypothesis import strategies as st

from torchslim import ops, reference
from torchslim.formats import csr

SETTINGS = examples(30)
# Rows around the strategies' boundaries (gather up to 3, token tiles of 4 / 8 / 16 / 32 / 64 tokens
# beyond, bfloat16 tiles from 17, several tiles from 65); widths around the 16-entry steps.
rows = st.one_of(st.integers(1, 20), st.sampled_from([31, 32, 33, 63, 64, 65, 130]))
sizes = st.one_of(st.integers(1, 40), st.sampled_from([3, 16, 17, 63, 65, 129, 255, 257, 300, 520]))


def make_case(M, N, K, dtype, bias_dtype, seed, density=0.3, col_dtype=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (torch.rand(N, K, generator=g) < density)
    crow, col, values = csr.pack(w.to(dtype))
    if col_dtype is not None:
        col = col.to(col_dtype)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype)
    bias = torch.randn(N, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return x, crow, col, values, bias


def check_against_reference(x, crow, col, values, bias):
    out = ops.csr_linear(x, crow, col, values, bias)
    ref = reference.csr_linear(x, crow, col, values, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    w = csr.unpack(crow, col, values, x.shape[1]).double()
    mag = x.double().abs() @ w.abs().T
    if bias is not None:
        mag = mag + bias.to(x.dtype).double().abs()
    longest = int((crow[1:] - crow[:-1]).max()) if crow.numel() > 1 else 0
    # a float32 sum of a row's stored products and the bias
    assert_close_to_reference(out, ref, mag, float32_roundings=longest + 1)
    return out


@given(M=rows, N=sizes, K=sizes, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       density=st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]), col_dtype=st.sampled_from([None, torch.int32]),
       seed=st.integers(0, 2**31))
@SETTINGS
def test_matches_reference(csr_isa, M, N, K, dtype, bias_dtype, density, col_dtype, seed):
    check_against_reference(*make_case(M, N, K, dtype, bias_dtype, seed, density, col_dtype))


@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 9, 16, 17, 33, 64, 130])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_strategy_on_a_model_shape(csr_isa, M, dtype):
    check_against_reference(*make_case(M, 96, 768, dtype, torch.float32, M, density=0.1))


@pytest.mark.parametrize("M", [1, 3, 70])
def test_patterns(csr_isa, M):
    K = 300
    cases = {
        "all zero": torch.zeros(7, K),
        "one full row among empty ones": torch.zeros(9, K).index_fill_(0, torch.tensor([4]), 1.5),
        "single column": torch.zeros(5, K).index_fill_(1, torch.tensor([K - 1]), -2.0),
        "one entry per row": torch.eye(8, K),
        "dense": torch.randn(6, K),
    }
    for name, w in cases.items():
        x = torch.randn(M, K)
        crow, col, values = csr.pack(w)
        check_against_reference(x, crow, col, values, torch.randn(w.shape[0]))


@pytest.mark.parametrize("M", [1, 5, 70])
def test_k_of_one_and_int32_columns(csr_isa, M):
    check_against_reference(*make_case(M, 6, 1, torch.float32, None, 1, density=0.7))
    x, crow, col, values, bias = make_case(M, 3, 40000, torch.bfloat16, None, 2, density=0.002)
    assert col.dtype == torch.int32
    check_against_reference(x, crow, col, values, bias)


@pytest.mark.parametrize("M,N,K", [(0, 5, 16), (3, 0, 16), (3, 5, 0), (0, 0, 0)])
def test_empty_dimensions(csr_isa, M, N, K):
    x, crow, col, values, bias = make_case(M, N, K, torch.float32, torch.float32, 0)
    out = ops.csr_linear(x, crow, col, values, bias)
    assert out.shape == (M, N)
    torch.testing.assert_close(out, bias.expand(M, N) if K == 0 else reference.csr_linear(x, crow, col, values, bias).float())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 5, 70])
def test_nonfinite_activations_meet_stored_values_only(csr_isa, dtype, M):
    w = torch.zeros(3, 20)
    w[0, 2] = 1.0
    w[1, 5] = 2.0
    w[2, [2, 7]] = 0.5
    crow, col, values = csr.pack(w.to(dtype))
    x = torch.ones(M, 20, dtype=dtype)
    x[0, 2] = float("inf")
    x[0, 5] = float("nan")
    x[0, 9] = float("inf")  # no row stores column 9
    out = ops.csr_linear(x, crow, col, values)
    assert out[0, 0] == float("inf") and out[0, 1].isnan() and out[0, 2] == float("inf")
    assert torch.equal(out[1:], torch.tensor([1.0, 2.0, 1.0], dtype=dtype).expand(M - 1, 3))


def corrupted(kind, K=40):
    x, crow, col, values, _ = make_case(1, 10, K, torch.float32, None, 3, density=0.3)
    crow, col = crow.clone(), col.clone()
    j = int(crow[7])  # row 7's first entry
    assert crow[8] - crow[7] >= 2
    if kind == "crow[0]":
        crow[0] = -1
        return crow, col, values, r"crow\[0\] must be 0, got -1"
    if kind == "decreasing":
        crow[4] = crow[5] + 1
        return crow, col, values, rf"crow must never decrease: crow\[5\] = {int(crow[5])} < crow\[4\] = {int(crow[4])}"
    if kind == "end beyond nnz":
        crow[10] += 1
        return crow, col, values, rf"crow\[N\] must equal the number of stored values {values.numel()}, got {values.numel() + 1}"
    if kind == "huge pointer":
        crow[3:] = 2**31 - 1
        return crow, col, values, r"crow\[N\] must equal the number of stored values"
    if kind == "column K":
        col[j] = K
        return crow, col, values, rf"col\[{j}\] = {K} \(row 7\) is outside \[0, {K}\)"
    if kind == "negative column":
        col[j + 1] = -5
        return crow, col, values, rf"col\[{j + 1}\] = -5 \(row 7\) is outside \[0, {K}\)"
    if kind == "duplicate":
        col[j + 1] = col[j]
        return crow, col, values, rf"col must increase strictly within a row: row 7 has col\[{j}\] = {int(col[j])} then"
    if kind == "unsorted":
        col[j], col[j + 1] = col[j + 1].clone(), col[j].clone()
        return crow, col, values, rf"col must increase strictly within a row: row 7 has col\[{j}\]"
    raise AssertionError(kind)


KINDS = ["crow[0]", "decreasing", "end beyond nnz", "huge pointer", "column K", "negative column", "duplicate", "unsorted"]


@pytest.mark.parametrize("M", [0, 1, 3, 8, 70])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_malformed_csr_is_refused_on_every_path(csr_isa, M, kind, col_dtype):
    crow, col, values, message = corrupted(kind)
    x = torch.randn(M, 40)
    with pytest.raises(RuntimeError, match="csr_linear: " + message):
        ops.csr_linear(x, crow, col.to(col_dtype), values)
    assert csr.check(crow, col, values, 40)  # the format's check finds it too


def test_a_column_beyond_the_int16_range_of_a_wide_layer(csr_isa):
    # K > 32768 with int16 columns: every column an int16 holds is below K; negative ones are caught
    x, crow, col, values, _ = make_case(2, 3, 40000, torch.float32, None, 4, density=0.001)
    c16 = col.to(torch.int16)
    c16[0] = -32768
    with pytest.raises(RuntimeError, match=r"col\[0\] = -32768"):
        ops.csr_linear(x, crow, c16, values)


@pytest.mark.parametrize("name,args,message", list(csr_linear_bad_inputs()), ids=[c[0] for c in csr_linear_bad_inputs()])
def test_bad_inputs_get_a_clear_error(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.csr_linear(*args)
    # the fake (torch.compile, meta tensors) checks alike: every tensor on meta
    # (empty_strided keeps a 1-D tensor's stride, which .to("meta") would not)
    meta_args = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                 if isinstance(a, torch.Tensor) else a for a in args]
    if "on meta" not in name:
        with pytest.raises(RuntimeError, match=message.replace("cpu", "meta")):
            ops.csr_linear(*meta_args)


def test_fake_gives_the_shape():
    x, crow, col, values, bias = make_case(5, 7, 33, torch.bfloat16, torch.bfloat16, 0)
    out = ops.csr_linear(*(t.to("meta") for t in (x, crow, col, values, bias)))
    assert out.shape == (5, 7) and out.dtype == torch.bfloat16 and out.is_meta


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 6, 70])
def test_gradient_is_that_of_the_dense_layer(dtype, M):
    x, crow, col, values, bias = make_case(M, 12, 37, dtype, dtype, 4)
    w = csr.unpack(crow, col, values, 37)
    x1, b1 = x.clone().requires_grad_(), bias.clone().requires_grad_()
    ops.csr_linear(x1, crow, col, values, b1).square().sum().backward()
    x2, b2 = x.clone().requires_grad_(), bias.clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol * x2.grad.abs().max().item())
    torch.testing.assert_close(b1.grad, b2.grad, rtol=tol, atol=tol * b2.grad.abs().max().item())


def test_values_that_require_grad_are_an_error_at_backward():
    x, crow, col, values, _ = make_case(2, 4, 16, torch.float32, None, 5)
    out = ops.csr_linear(x.requires_grad_(), crow, col, values.requires_grad_())
    with pytest.raises(RuntimeError, match="frozen"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype):
    for M, bias in ((3, True), (9, False)):
        x, crow, col, values, b = make_case(M, 8, 40, dtype, dtype if bias else None, M)
        torch.library.opcheck(torch.ops.torchslim.csr_linear.default, (x.requires_grad_(), crow, col, values, b))


def test_compiles_fullgraph_with_dynamic_rows():
    x, crow, col, values, bias = make_case(5, 8, 40, torch.float32, torch.float32, 6)
    fn = torch.compile(lambda x: ops.csr_linear(x, crow, col, values, bias).relu(), fullgraph=True, dynamic=True)
    for M in (5, 9):
        xm = torch.randn(M, 40)
        torch.testing.assert_close(fn(xm), ops.csr_linear(xm, crow, col, values, bias).relu())
