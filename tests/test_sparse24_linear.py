"""torchslim::sparse24_linear on the CPU, every kernel path this CPU runs (scalar, AVX-512, AMX),
against the float64 reference: every strategy (registers for few rows, the AMX tiles, the dense
GEMM on expanded blocks), dtypes, odd shapes, autograd, opcheck, compile, bad inputs."""
import pytest
import torch
from conftest import FLOAT_DTYPES, assert_close_to_reference, examples, sparse24_linear_bad_inputs
from hypothesis import given
from hypothesis import strategies as st

from torchslim import ops, reference
from torchslim.compress import prune_24
from torchslim.formats import sparse24 as f

SETTINGS = examples(25)
# Rows around every strategy's boundary (1-4 registers, 5+ AMX or buffered, 40+ / 64+ dense
# blocks, 16-row tiles and 96-row groups); widths around the 16/32-column steps and 512 slabs.
rows = st.one_of(st.integers(1, 20), st.sampled_from([33, 40, 63, 64, 97, 130]))
sizes = st.one_of(st.integers(1, 70), st.sampled_from([3, 15, 16, 17, 31, 33, 129, 500, 513, 530]))


def make_case(M, N, K, dtype, bias_dtype, seed, sparse_groups=True):
    g = torch.Generator().manual_seed(seed)
    w = prune_24(torch.randn(N, K, generator=g))
    if sparse_groups:  # groups with 0 and 1 non-zeros too
        w = w * (torch.rand(N, K, generator=g) > 0.25)
    values, meta = f.pack(w.to(dtype))
    x = (torch.randn(M, K, generator=g) * 2).to(dtype)
    bias = torch.randn(N, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return x, values, meta, bias


def check_against_reference(x, values, meta, bias):
    out = ops.sparse24_linear(x, values, meta, bias)
    ref = reference.sparse24_linear(x, values, meta, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    w = f.unpack(values, meta, x.shape[1]).double()
    mag = x.double().abs() @ w.abs().T
    if bias is not None:
        mag = mag + bias.to(x.dtype).double().abs()
    # a float32 sum of the kept products (at most K_pad / 2 of them) and the bias
    assert_close_to_reference(out, ref, mag, float32_roundings=values.shape[1] + 1)
    return out


@given(M=rows, N=sizes, K=sizes, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       seed=st.integers(0, 2**31))
@SETTINGS
def test_matches_reference(sparse24_isa, M, N, K, dtype, bias_dtype, seed):
    check_against_reference(*make_case(M, N, K, dtype, bias_dtype, seed))


@pytest.mark.parametrize("M", [1, 4, 5, 16, 39, 40, 64, 200])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_strategy_on_a_model_shape(sparse24_isa, M, dtype):
    check_against_reference(*make_case(M, 96, 1024 + 16, dtype, torch.float32, M))


@pytest.mark.parametrize("M,K", [(97, 1040), (200, 2100), (113, 3000), (1100, 600)])
def test_amx_k_chunks_with_partial_sums(sparse24_isa, M, K):
    # Beyond 96 rows the AMX kernel works in k-chunks of 256..1024 columns (partial sums in between).
    check_against_reference(*make_case(M, 37, K, torch.bfloat16, torch.bfloat16, K))


@pytest.mark.parametrize("M", [2047, 2100])
def test_bf16_many_rows(sparse24_isa, M):
    # A batch of sequences (e.g. 32 x 64 tokens): many activation tile groups, an odd last tile.
    check_against_reference(*make_case(M, 40, 200, torch.bfloat16, torch.bfloat16, M))


@pytest.mark.parametrize("M,N,K", [(0, 5, 16), (3, 0, 16), (3, 5, 0), (0, 0, 0)])
def test_empty_dimensions(sparse24_isa, M, N, K):
    x, values, meta, bias = make_case(M, N, K, torch.float32, torch.float32, 0)
    out = ops.sparse24_linear(x, values, meta, bias)
    assert out.shape == (M, N)
    torch.testing.assert_close(out, bias.expand(M, N) if K == 0 else reference.sparse24_linear(x, values, meta, bias).float())


def test_columns_beyond_k_never_reach_the_output(sparse24_isa):
    # K = 5: columns 5..15 are padding; whatever values sit there, x is zero there.
    x, values, meta, _ = make_case(3, 8, 5, torch.float32, None, 1, sparse_groups=False)
    values[:, 3:] = 1e30  # groups 1.. cover columns 4..15: group 1 holds column 4 (real) and padding
    w = f.unpack(values, meta, 5)
    out = ops.sparse24_linear(x, values, meta)
    torch.testing.assert_close(out, (x.double() @ w.double().T).float())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 5, 70])
def test_nonfinite_activations_propagate_like_a_dense_product(sparse24_isa, dtype, M):
    x, values, meta, _ = make_case(M, 4, 32, dtype, None, 2, sparse_groups=False)
    x[0, :] = float("nan")
    out = ops.sparse24_linear(x, values, meta)
    assert bool(out[0].isnan().all()) and bool(out[1:].isfinite().all())
    # Inf at a pruned column meets a zero weight: NaN, as in F.linear (every row of W has zeros there)
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0] * 4]).to(dtype)
    v, m = f.pack(w)
    xi = torch.ones(M, 16, dtype=dtype)
    xi[0, 1] = float("inf")
    out = ops.sparse24_linear(xi, v, m)
    assert bool(out[0].isnan().all()) and bool((out[1:] == 12).all())


@pytest.mark.parametrize("M", [1, 70])
def test_a_nonfinite_row_stays_in_its_row(sparse24_isa, M):
    # bf16 at odd K through the dense GEMM path once let one row's Inf reach the other rows
    x, values, meta, _ = make_case(M, 16, 33, torch.bfloat16, None, 3, sparse_groups=False)
    x[1:, 0] = float("inf")
    out = ops.sparse24_linear(x, values, meta)
    assert bool(out[0].isfinite().all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 5, 70])
def test_padding_values_never_reach_the_output(sparse24_isa, dtype, M):
    v, m = f.pack(torch.tensor([[1.0, 1.0, 0.0, 0.0]]).to(dtype))  # K = 4: groups 1..3 are padding
    v[0, 2:] = float("nan")
    assert torch.equal(ops.sparse24_linear(torch.ones(M, 4, dtype=dtype), v, m), torch.full((M, 1), 2.0, dtype=dtype))


@pytest.mark.parametrize("M", [1, 8, 70])
@pytest.mark.parametrize("nibble", [0x0, 0x5, 0x6, 0xB, 0xF, 0x1])
def test_invalid_metadata_is_refused_on_every_path(sparse24_isa, M, nibble):
    x, values, meta, _ = make_case(M, 10, 40, torch.bfloat16, None, 3)
    row = 7  # group 9: word 2, nibble 1
    word = ((int(meta[row, 2]) & 0xFFFF) & ~(0xF << 4)) | (nibble << 4)
    meta[row, 2] = word - (1 << 16) if word >= 1 << 15 else word
    msg = (rf"sparse24_linear: meta row 7, group 9 \(columns 36..39\) holds positions \({nibble & 3}, {nibble >> 2}\); "
           "each group needs two distinct increasing positions in 0..3")
    with pytest.raises(RuntimeError, match=msg):
        ops.sparse24_linear(x, values, meta)
    assert f.meta_problem(meta) is not None


@pytest.mark.parametrize("name,args,message", list(sparse24_linear_bad_inputs()), ids=[c[0] for c in sparse24_linear_bad_inputs()])
def test_bad_inputs_get_a_clear_error(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        ops.sparse24_linear(*args)
    # the fake (torch.compile, meta tensors) checks alike: every tensor on meta
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    if "on meta" not in name:
        with pytest.raises(RuntimeError, match=message.replace("cpu", "meta")):
            ops.sparse24_linear(*meta_args)


def test_fake_gives_the_shape():
    x, values, meta, bias = make_case(5, 7, 33, torch.bfloat16, torch.bfloat16, 0)
    out = ops.sparse24_linear(x.to("meta"), values.to("meta"), meta.to("meta"), bias.to("meta"))
    assert out.shape == (5, 7) and out.dtype == torch.bfloat16 and out.is_meta


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 6, 70])
def test_gradient_is_that_of_the_dense_pruned_layer(dtype, M):
    x, values, meta, bias = make_case(M, 12, 37, dtype, dtype, 4)
    w = f.unpack(values, meta, 37)
    x1 = x.clone().requires_grad_()
    b1 = bias.clone().requires_grad_()
    ops.sparse24_linear(x1, values, meta, b1).square().sum().backward()
    x2 = x.clone().requires_grad_()
    b2 = bias.clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol * x2.grad.abs().max().item())
    torch.testing.assert_close(b1.grad, b2.grad, rtol=tol, atol=tol * b2.grad.abs().max().item())


def test_values_that_require_grad_are_an_error_at_backward():
    x, values, meta, _ = make_case(2, 4, 16, torch.float32, None, 5)
    out = ops.sparse24_linear(x.requires_grad_(), values.requires_grad_(), meta)
    with pytest.raises(RuntimeError, match="frozen"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_opcheck(dtype):
    for M, bias in ((3, True), (9, False)):
        x, values, meta, b = make_case(M, 8, 40, dtype, dtype if bias else None, M)
        torch.library.opcheck(torch.ops.torchslim.sparse24_linear.default, (x.requires_grad_(), values, meta, b))


def test_compiles_fullgraph_with_dynamic_rows():
    x, values, meta, bias = make_case(5, 8, 40, torch.float32, torch.float32, 6)
    fn = torch.compile(lambda x: ops.sparse24_linear(x, values, meta, bias).relu(), fullgraph=True, dynamic=True)
    for M in (5, 9):
        xm = torch.randn(M, 40)
        torch.testing.assert_close(fn(xm), ops.sparse24_linear(xm, values, meta, bias).relu())
