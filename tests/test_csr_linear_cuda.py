"""The CUDA op torchslim::csr_linear (csrc/cuda/csr_linear.cu) against the float64 reference.

Every test here needs a GPU (marked `gpu`, skipped without one); .ci/cuda_smoke.py checks that a CUDA
build registers the kernel.

Error bound: the kernels sum a row's n stored products in float32 (products of two bfloat16 or
float16 values are exact in float32; float32 products are fused into the sum), in an order of their
choosing (lanes, shuffles, parts of a split row), then add the bias once: n float32 roundings, each
relative to partial sums no larger than S = |x| @ |W|.T + |bias in x's dtype|, then one rounding to
x's dtype. conftest's bound with float32_roundings = longest row + 1 and scale_mag = S covers it.

Which kernel runs (csr_linear.cu): M <= 8 the row-group kernel (8 lanes per row below 128 / 64
stored entries per row on average for 16- / 32-bit dtypes, a warp above), M > 8 the token kernel on
transposed x; rows longer than max(4096, 2 * mean) entries are split into parts (K > 4096 with
uneven rows below). The cases are chosen to reach every one of these paths.
"""
import pytest
import torch

from conftest import FLOAT_DTYPES, assert_close_to_reference, csr_linear_bad_inputs

from torchslim import ops, reference
from torchslim.formats import csr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

OP = torch.ops.torchslim.csr_linear.default
MS = [1, 3, 17, 130]


def random_weight(N, K, density, g, pattern="random"):
    """An (N, K) float32 weight with the given fraction of non-zeros, in one of several row patterns."""
    w = torch.randn(N, K, generator=g)
    if pattern == "random":
        keep = torch.rand(N, K, generator=g) < density
    elif pattern == "empty_rows":  # every other row empty, the rest random
        keep = torch.rand(N, K, generator=g) < density
        keep[::2] = False
    elif pattern == "full_row":  # one full row among sparse ones
        keep = torch.rand(N, K, generator=g) < density
        keep[N // 2] = True
    elif pattern == "uneven":  # one full row, a few long ones, the others nearly or entirely empty
        keep = torch.rand(N, K, generator=g) < 0.002
        keep[0] = True
        keep[N - 1, : K // 2] = True
        keep[1:N:7] = torch.rand(len(range(1, N, 7)), K, generator=g) < 0.5
    elif pattern == "zeros":
        keep = torch.zeros(N, K, dtype=torch.bool)
    elif pattern == "one_column":
        keep = torch.zeros(N, K, dtype=torch.bool)
        keep[:, K // 3] = True
    else:
        raise ValueError(pattern)
    return w * keep


def make_case(M, N, K, dtype, bias_dtype, seed, density=0.3, pattern="random", col_dtype=None):
    """x (M, K) on CUDA, the CSR of a random (N, K) weight on CUDA, a bias (or None), the dense weight."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 2).to(dtype)
    w = random_weight(N, K, density, g, pattern).to(dtype)
    crow, col, values = csr.pack(w)
    if col_dtype is not None:
        col = col.to(col_dtype)
    bias = torch.randn(N, generator=g).to(bias_dtype) if bias_dtype is not None else None
    cuda = tuple(t.cuda() if t is not None else None for t in (x, crow, col, values, bias))
    return (*cuda, w)


def assert_accurate(out, x, crow, col, values, bias, w):
    ref = reference.csr_linear(x.cpu(), crow.cpu(), col.cpu(), values.cpu(), None if bias is None else bias.cpu())
    s = x.cpu().double().abs() @ w.double().abs().T
    if bias is not None:
        s = s + bias.cpu().to(x.dtype).double().abs()
    longest = int((crow[1:] - crow[:-1]).max()) if crow.numel() > 1 else 0
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    assert_close_to_reference(out.cpu(), ref, s, float32_roundings=longest + 1)


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("pattern", ["random", "empty_rows", "full_row", "zeros", "one_column"])
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32])
def test_patterns(M, dtype, pattern, col_dtype, bias_dtype):
    case = make_case(M, 37, 300, dtype, bias_dtype, M * 131 + len(pattern), pattern=pattern, col_dtype=col_dtype)
    x, crow, col, values, bias, w = case
    assert_accurate(ops.csr_linear(x, crow, col, values, bias), *case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bias_dtype", [None, torch.float64])
@pytest.mark.parametrize("N,K,density", [(5, 1, 0.7), (1, 1, 1.0), (64, 2000, 0.6), (129, 777, 0.05), (3, 17, 0.5)])
def test_shapes(M, N, K, density, dtype, bias_dtype):
    # K = 1; long rows (a warp per row at M <= 8) and short ones (eight lanes per row).
    case = make_case(M, N, K, dtype, bias_dtype, N * 7 + K + M, density=density)
    assert_accurate(ops.csr_linear(*case[:5]), *case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_uneven_rows_split(M, dtype, col_dtype):
    # K = 9000 with one full row and mostly empty ones: the full row is cut into parts whose float32
    # partial sums the finalize kernel adds (both the row-group and the token kernels).
    case = make_case(M, 64, 9000, dtype, dtype, 5 + M, pattern="uneven", col_dtype=col_dtype)
    assert_accurate(ops.csr_linear(*case[:5]), *case)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 5, 40])
def test_unaligned_views(M, dtype):
    # col, values and x starting off 16-byte alignment (contiguous views with a storage offset):
    # element loads instead of vector loads.
    x, crow, col, values, bias, w = make_case(M, 50, 1100, dtype, dtype, 11, density=0.5)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        buf[1:] = t.flatten()
        return buf[1:].view(t.shape)

    xs, cs, vs = shifted(x), shifted(col), shifted(values)
    assert xs.data_ptr() % 16 and cs.data_ptr() % 16 and vs.data_ptr() % 16
    out = ops.csr_linear(xs, crow, cs, vs, bias)
    assert_accurate(out, x, crow, col, values, bias, w)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [0, 2, 20])
@pytest.mark.parametrize("bias_dtype", [None, torch.float64])
def test_empty(M, dtype, bias_dtype):
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(6, generator=g).to(bias_dtype).cuda() if bias_dtype is not None else None
    expected = (bias.to(dtype) if bias is not None else torch.zeros(6, dtype=dtype, device="cuda")).expand(M, 6)
    # nnz = 0 (K > 0), and K = 0: the bias (or zeros).
    for K in (9, 0):
        x = torch.randn(M, K, generator=g).to(dtype).cuda()
        crow = torch.zeros(7, dtype=torch.int32, device="cuda")
        col = torch.zeros(0, dtype=torch.int16, device="cuda")
        values = torch.zeros(0, dtype=dtype, device="cuda")
        out = ops.csr_linear(x, crow, col, values, bias)
        assert out.shape == (M, 6) and out.dtype == dtype
        assert torch.equal(out, expected)
    # N = 0.
    x = torch.randn(M, 5).to(dtype).cuda()
    out = ops.csr_linear(x, torch.zeros(1, dtype=torch.int32, device="cuda"), torch.zeros(0, dtype=torch.int32,
                         device="cuda"), torch.zeros(0, dtype=dtype, device="cuda"))
    assert out.shape == (M, 0) and out.dtype == dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 4, 33])
def test_non_finite_x_reaches_only_rows_storing_its_column(M, dtype):
    x, crow, col, values, bias, w = make_case(M, 40, 64, dtype, None, 3, density=0.3)
    x[:, 10] = float("inf")
    x[0, 20] = float("nan")
    out = ops.csr_linear(x, crow, col, values).cpu()
    ref = reference.csr_linear(x.cpu(), crow.cpu(), col.cpu(), values.cpu())
    assert torch.equal(out.isfinite(), ref.isfinite())
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ref.isfinite()
    stores = (w[:, 10] != 0) | (w[:, 20] != 0)
    assert bool(finite[:, ~stores].all())  # rows storing neither column stay finite
    s = x.cpu().double().abs().nan_to_num(posinf=0) @ w.double().abs().T
    assert_close_to_reference(out.where(finite, 0), ref.where(finite, 0), s.where(finite, 0),
                              float32_roundings=int((crow[1:] - crow[:-1]).max()) + 1)


@pytest.mark.parametrize("M", [1, 130])
def test_model_shape(M):
    # A Llama-size layer at 90 % sparsity in bfloat16 (K = 4096: int16 columns).
    case = make_case(M, 4096, 4096, torch.bfloat16, torch.bfloat16, M, density=0.1)
    assert_accurate(ops.csr_linear(*case[:5]), *case)


def test_side_stream():
    x, crow, col, values, bias, w = make_case(9, 30, 100, torch.float32, torch.float32, 2)
    expected = ops.csr_linear(x, crow, col, values, bias)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        out = ops.csr_linear(x, crow, col, values, bias)
    stream.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("M", [1, 6, 70])
def test_deterministic(M):
    case = make_case(M, 64, 9000, torch.bfloat16, torch.float32, 1, pattern="uneven")
    first = ops.csr_linear(*case[:5])
    for _ in range(3):
        assert torch.equal(ops.csr_linear(*case[:5]), first)


# ---------------------------------------------------------------------------------------------
# malformed CSR: never a crash or a CUDA error (the outputs are unspecified)
# ---------------------------------------------------------------------------------------------
def corrupted_cases(K, nnz, N, g):
    crow_ok = torch.sort(torch.randint(0, nnz + 1, (N + 1,), generator=g)).values.int()
    crow_ok[0], crow_ok[-1] = 0, nnz
    col_ok = torch.randint(0, K, (nnz,), generator=g)
    big = 2**31 - 1
    yield "crow negative", torch.full((N + 1,), -5, dtype=torch.int32), col_ok
    yield "crow beyond nnz", torch.arange(N + 1, dtype=torch.int32) * (nnz + 1000), col_ok
    yield "crow decreasing", torch.arange(N, -1, -1, dtype=torch.int32) * 37, col_ok
    yield "crow extreme", torch.tensor([big, -big - 1] * ((N + 2) // 2), dtype=torch.int32)[: N + 1], col_ok
    yield "crow random", torch.randint(-big - 1, big, (N + 1,), generator=g, dtype=torch.int32), col_ok
    yield "crow all nnz", torch.full((N + 1,), nnz, dtype=torch.int32), col_ok
    yield "col negative", crow_ok, -col_ok - 1
    yield "col beyond K", crow_ok, col_ok + K
    yield "col extreme", crow_ok, torch.randint(-big - 1, big, (nnz,), generator=g, dtype=torch.int64)
    yield "col unsorted", crow_ok, col_ok.flip(0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_corrupted_csr_is_memory_safe(M, dtype, col_dtype):
    g = torch.Generator().manual_seed(M)
    N, K, nnz = 33, 70, 500
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    values = torch.randn(nnz, generator=g).to(dtype).cuda()
    for name, crow, col in corrupted_cases(K, nnz, N, g):
        col = col.to(col_dtype)  # int16 wraps the extreme values: still malformed
        out = ops.csr_linear(x, crow.cuda(), col.cuda(), values, torch.randn(N).cuda())
        torch.cuda.synchronize()  # a CUDA error (illegal address) would surface here
        assert out.shape == (M, N) and out.dtype == dtype, name
    # Corrupted rows longer than K on a K > 4096 weight (64 rows, mean 313 entries): the split path.
    x = torch.randn(M, 9000, generator=g).to(dtype).cuda()
    values = torch.randn(20000, generator=g).to(dtype).cuda()
    col = torch.randint(-40000, 40000, (20000,), generator=g).to(col_dtype)
    crow = torch.full((65,), 20000, dtype=torch.int32)
    crow[0], crow[2], crow[3], crow[4] = 0, 0, 5, 60000
    ops.csr_linear(x, crow.cuda(), col.cuda(), values)
    torch.cuda.synchronize()
    # The context is still healthy: a valid call after them is correct.
    case = make_case(M, 20, 50, dtype, dtype, 1)
    assert_accurate(ops.csr_linear(*case[:5]), *case)


# ---------------------------------------------------------------------------------------------
# argument checks: the CUDA op raises what the fake (ops.check_csr_linear_args) raises
# ---------------------------------------------------------------------------------------------
def on_cuda(a):
    """a on the GPU with its strides (a strided view stays strided; meta tensors stay meta)."""
    if not isinstance(a, torch.Tensor) or a.is_meta:
        return a
    return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda").copy_(a)


def test_bad_inputs():
    # conftest's list (every device's op rejects them alike), moved to the GPU
    for name, args, message in csr_linear_bad_inputs():
        args = tuple(on_cuda(a) for a in args)
        message = message.replace("on cpu", "on cuda:0")
        with pytest.raises(RuntimeError, match=message):
            OP(*args)
            pytest.fail(f"the CUDA op accepted {name}")
        # The Python checks (the fake's) say the same.
        with pytest.raises(RuntimeError, match=message):
            ops.check_csr_linear_args(*args)
            pytest.fail(f"check_csr_linear_args accepted {name}")


def test_cpu_x_with_cuda_weight_raises():
    x, crow, col, values, bias, w = make_case(3, 8, 16, torch.float32, torch.float32, 0)
    with pytest.raises(RuntimeError, match="crow must be on cpu like x, got cuda"):
        ops.csr_linear(x.cpu(), crow, col.cpu(), values.cpu())
    with pytest.raises(RuntimeError, match="bias must be on cpu like x, got cuda"):
        OP(x.cpu(), crow.cpu(), col.cpu(), values.cpu(), bias)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 20])
def test_opcheck(M, dtype):
    x, crow, col, values, bias, _ = make_case(M, 24, 70, dtype, dtype, 4)
    torch.library.opcheck(OP, (x, crow, col, values, bias))
    torch.library.opcheck(OP, (x, crow, col.int(), values, None))
    # With an autograd kernel registered (csr_linear's autograd is a separate file), its test runs too.
    if torch._C._dispatch_has_kernel_for_dispatch_key("torchslim::csr_linear", "AutogradCUDA"):
        torch.library.opcheck(OP, (x.clone().requires_grad_(), crow, col, values, bias))
