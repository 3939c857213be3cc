"""The CUDA path of sparse24_linear: the Triton kernel (triton_kernels/sparse24_linear.py) against the
float64 reference, and the registered CUDA op torchslim::sparse24_linear.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 there), on tiny shapes: the interpreter costs ~3 ms per program per K step.
The interpreter's bfloat16 tl.dot is wrong, so the launcher has it multiply bfloat16 tiles in float32
there (exact products, float32 sums: the tensor cores' numerics); its float32 -> bfloat16 cast
truncates, so bfloat16 outputs are checked as the cast of the float32 result (assert_is_cast_of).
With a GPU the same kernel tests run compiled on CUDA tensors, and the `gpu` tests run the op.

Error bound (as tests/test_sparse24_linear.py states it for the CPU kernels): the kernel sums at
most n = K_pad / 2 kept products in float32 and adds the bias once, each rounding relative to partial
sums no larger than S = |x| @ |W|.T + |bias in x's dtype|; conftest's bound with
float32_roundings = n + 1 and scale_mag = S allows 2 (n + 1) u32 S, which also covers float32
inputs' rounded products and a tensor core that truncates instead of rounding.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import (FLOAT_DTYPES, assert_close_to_reference, compile_for_sm90, examples,  # noqa: E402
                      sparse24_linear_bad_inputs)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from torchslim import _cuda_registration, ops, reference  # noqa: E402
from torchslim.compress import prune_24  # noqa: E402
from torchslim.formats import sparse24  # noqa: E402
from torchslim.triton_kernels import sparse24_linear as kernels  # noqa: E402
from torchslim.triton_kernels.sparse24_linear import sparse24_matmul  # noqa: E402

INTERPRETED = kernels._interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernel_device = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="neither the Triton interpreter (TRITON_INTERPRET=1) nor a CUDA device")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

SETTINGS = examples(40)
# Fixed 16x16x32 tiles (the interpreter's default, passed explicitly so that the GPU also runs them
# instead of autotuning each new shape): sizes straddle one and several tiles and K steps.
TILES = kernels.INTERPRETER_CONFIG
small = st.one_of(st.integers(1, 40), st.sampled_from([1, 3, 16, 17, 33]))
small_k = st.one_of(st.integers(1, 70), st.sampled_from([1, 3, 7, 16, 17, 32, 33, 129]))


def make_case(M, N, K, dtype, bias_dtype, seed, device="cpu"):
    """x (M, K), the packed pair of a 2:4-pruned random (N, K) weight (with some groups of one or no
    non-zero too), and a bias (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 3).to(dtype)
    w = prune_24(torch.randn(N, K, generator=g)) * (torch.rand(N, K, generator=g) > 0.25)
    values, meta = sparse24.pack(w.to(dtype))
    bias = torch.randn(N, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return tuple(t.to(device) if t is not None else None for t in (x, values, meta, bias))


def dense_weight(values, meta, K):
    return sparse24.unpack(values.cpu(), meta.cpu(), K)


def assert_accurate(out, ref, x, w, bias):
    """out within the module docstring's bound of ref: S = |x| @ |w|.T + |bias in x's dtype|, and
    K_pad / 2 + 1 float32 roundings."""
    s = x.double().cpu().abs() @ w.double().abs().T
    if bias is not None:
        s = s + bias.cpu().to(x.dtype).double().abs()
    assert_close_to_reference(out.cpu(), ref.cpu(), s, float32_roundings=sparse24.padded_k(x.shape[1]) // 2 + 1)


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


def assert_same_sum(out, expected):
    """Two runs of the same tiles that only read their operands differently (strides, masked
    memory). The interpreter does the same arithmetic: bit for bit. Compiled, a different
    specialization may schedule the float32 sums differently: within a few float32 ulps."""
    if INTERPRETED:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected)


def run_and_check(x, values, meta, bias, config=TILES, dense=None):
    """The kernel in x's dtype and in float32 against the reference (bias rounded to x's dtype as the
    op does; the reference rounds it itself)."""
    M, K = x.shape
    bias_x = bias.to(x.dtype) if bias is not None else None
    args = [t.to(DEVICE) if t is not None else None for t in (x, values, meta, bias_x)]
    out = sparse24_matmul(*args, config=config)
    out32 = sparse24_matmul(*args, out_dtype=torch.float32, config=config)
    assert out.dtype == x.dtype and out.shape == (M, values.shape[0]) and out.is_contiguous()
    assert out32.dtype == torch.float32
    out, out32 = out.cpu(), out32.cpu()
    w = dense_weight(values, meta, K) if dense is None else dense
    ref = x.cpu().double() @ w.double().T + (bias_x.cpu().double() if bias is not None else 0)
    assert_accurate(out32, ref, x, w, bias)
    if x.dtype != torch.float32:
        assert_is_cast_of(out, out32)
        if not (INTERPRETED and x.dtype == torch.bfloat16):
            assert_accurate(out, ref, x, w, bias)
    else:
        assert torch.equal(out, out32)
    return out


# ---------------------------------------------------------------------------------------------
# the kernel, through the interpreter (CPU) or compiled (GPU)
# ---------------------------------------------------------------------------------------------
@needs_kernel_device
@given(M=small, N=small, K=small_k, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, *FLOAT_DTYPES, torch.float64]), seed=st.integers(0, 2**31))
@SETTINGS
def test_matches_reference(M, N, K, dtype, bias_dtype, seed):
    x, values, meta, bias = make_case(M, N, K, dtype, bias_dtype, seed)
    out = run_and_check(x, values, meta, bias)
    # The op's own reference agrees (it rounds the bias to x's dtype the same way).
    ref = reference.sparse24_linear(x, values, meta, bias)
    if not (INTERPRETED and dtype == torch.bfloat16):
        assert_accurate(out, ref, x, dense_weight(values, meta, K), bias)


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_exact_on_integer_data(dtype):
    # Small integers: every product and partial sum is exact in float32 and the result fits the
    # output dtype, so the kernel must equal the reference bit for bit (any misplaced value shows).
    M, N, K = 5, 19, 77
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-4, 5, (M, K), generator=g).to(dtype)
    w = prune_24(torch.randint(-4, 5, (N, K), generator=g).float()).to(dtype)
    values, meta = sparse24.pack(w)
    bias = torch.randint(-8, 9, (N,), generator=g).to(dtype)
    out = sparse24_matmul(*(t.to(DEVICE) for t in (x, values, meta, bias)), config=TILES).cpu()
    assert torch.equal(out.double(), reference.sparse24_linear(x, values, meta, bias))


CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1),
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, GROUP_M=2),   # tiles wider in M than in N
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=4),  # group taller than the grid, long K steps
]


@needs_kernel_device
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(str(v) for v in c.values()))
@pytest.mark.parametrize("M,N,K", [(50, 37, 128), (50, 37, 65), (1, 70, 96), (20, 1, 31)])
def test_block_configs(config, M, N, K):
    # K = 128 takes the EVEN_K loop for every BLOCK_K here, 96 for BLOCK_K = 32, 31 and 65 the
    # masked one (K_pad = 32 and 80: value and meta tiles that pass K_pad too).
    x, values, meta, bias = make_case(M, N, K, torch.float16, torch.float16, M * N + K)
    run_and_check(x, values, meta, bias, config=config)


@needs_kernel_device
@pytest.mark.parametrize("K", [7, 33])
def test_padding_columns_contribute_nothing(K):
    # NaN in the weight's padding columns (K .. K_pad, kept positions there) and in x's memory just
    # past K (a strided view of a wider tensor): neither may reach the output.
    M, N = 3, 20
    x, values, meta, bias = make_case(M, N, K, torch.float32, torch.float32, K)
    clean = sparse24_matmul(*(t.to(DEVICE) for t in (x, values, meta, bias)), config=TILES).cpu()
    dirty_values = values.clone()
    beyond = sparse24.positions(meta) >= K
    assert bool(beyond.any())
    dirty_values[beyond] = float("nan")
    wide = torch.full((M, K + 9), float("nan"))
    wide[:, :K] = x
    x_view = wide.to(DEVICE)[:, :K]
    assert not x_view.is_contiguous()
    out = sparse24_matmul(x_view, dirty_values.to(DEVICE), meta.to(DEVICE), bias.to(DEVICE), config=TILES).cpu()
    assert torch.isfinite(out).all()
    assert_same_sum(out, clean)


def expand_any_meta(values, meta, K):
    """The dense weight the kernel builds for ANY meta bits: column 4g + p takes the group's first
    value where i0 == p, else its second where i1 == p, else 0 (formats/sparse24.py's unpack
    for valid metadata)."""
    N = values.shape[0]
    nib = sparse24.nibbles(meta)
    i0, i1 = nib & 3, nib >> 2
    v = values.reshape(N, -1, 2)
    pos = torch.arange(4)
    dense = torch.where(i0[..., None] == pos, v[..., :1],
                        torch.where(i1[..., None] == pos, v[..., 1:], torch.zeros((), dtype=values.dtype)))
    return dense.reshape(N, -1)[:, :K]


@needs_kernel_device
def test_any_meta_bits_give_the_documented_weight():
    # Meta is not validated on CUDA: any int16 bits must stay in bounds (addresses never depend on
    # them) and give the documented expansion, invalid nibbles included.
    M, N, K = 4, 21, 45
    x, values, valid_meta, _ = make_case(M, N, K, torch.float32, None, 7)
    assert torch.equal(expand_any_meta(values, valid_meta, K), dense_weight(values, valid_meta, K))  # unpack's
    meta = torch.randint(-2**15, 2**15, valid_meta.shape, generator=torch.Generator().manual_seed(3),
                         dtype=torch.int16)
    assert sparse24.meta_problem(meta) is not None  # random bits are invalid somewhere
    run_and_check(x, values, meta, None, dense=expand_any_meta(values, meta, K))


@needs_kernel_device
def test_strided_operands():
    # The launcher passes strides through: a column-major x, values and meta rows with padding.
    M, N, K = 19, 23, 45
    x, values, meta, bias = make_case(M, N, K, torch.float16, torch.float16, 5)
    x_cm = x.to(DEVICE).T.contiguous().T
    v_pad = torch.zeros(N, values.shape[1] + 5, dtype=values.dtype)
    v_pad[:, :values.shape[1]] = values
    m_pad = torch.zeros(N, meta.shape[1] + 3, dtype=meta.dtype)
    m_pad[:, :meta.shape[1]] = meta
    v_view, m_view = v_pad.to(DEVICE)[:, :values.shape[1]], m_pad.to(DEVICE)[:, :meta.shape[1]]
    assert not x_cm.is_contiguous() and not v_view.is_contiguous() and not m_view.is_contiguous()
    out = sparse24_matmul(x_cm, v_view, m_view, bias.to(DEVICE), config=TILES).cpu()
    assert_same_sum(out, sparse24_matmul(*(t.to(DEVICE) for t in (x, values, meta, bias)), config=TILES).cpu())


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_activations(dtype):
    x, values, meta, bias = make_case(4, 20, 40, dtype, dtype, 3)
    x[1] = 0
    x[2, 5] = float("nan")
    out = sparse24_matmul(*(t.to(DEVICE) for t in (x, values, meta, bias)), config=TILES).cpu()
    assert torch.equal(out[1], bias)  # an all-zero row: exactly the bias
    assert out[2].isnan().all()  # NaN * 0 is NaN: the whole row, as in dense F.linear and the reference
    assert torch.isfinite(out[[0, 3]]).all()


@needs_kernel_device
def test_empty_dimensions():
    def case(M, N, K, dtype, bias):
        x, values, meta, _ = make_case(M, N, K, dtype, None, 0, device=DEVICE)
        return sparse24_matmul(x, values, meta, bias.to(DEVICE) if bias is not None else None)

    out = case(0, 5, 8, torch.bfloat16, None)
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16
    assert case(3, 0, 8, torch.float16, None).shape == (3, 0)
    # K = 0: an empty sum, so every row is the bias (or zero).
    bias = torch.randn(5)
    assert torch.equal(case(3, 5, 0, torch.float32, bias).cpu(), bias.expand(3, 5))
    out = case(3, 5, 0, torch.float16, None)
    assert out.dtype == torch.float16 and torch.equal(out.cpu(), torch.zeros(3, 5, dtype=torch.float16))


def bad_launches():
    x = torch.zeros(4, 40, dtype=torch.float16)
    v, m = torch.zeros(8, 24, dtype=torch.float16), torch.zeros(8, 3, dtype=torch.int16)
    b = torch.zeros(8, dtype=torch.float16)
    yield "x dtype", (x.int(), v, m, None), {}, "x must be a 2-D float32, bfloat16 or float16"
    yield "x 1-D", (x[0], v, m, None), {}, "x must be a 2-D"
    yield "values dtype", (x, v.float(), m, None), {}, "values must be a 2-D tensor of x's dtype"
    yield "values shape", (x, v[:, :16], m, None), {}, r"values must have shape \(8, 24\) for K=40"
    yield "meta dtype", (x, v, m.int(), None), {}, "meta must be an int16"
    yield "meta shape", (x, v, m[:, :2], None), {}, r"meta must be an int16 tensor of shape \(8, 3\)"
    yield "meta rows", (x, v, m[:7], None), {}, r"shape \(8, 3\)"
    yield "bias dtype", (x, v, m, b.float()), {}, "bias must be a contiguous tensor of x's dtype"
    yield "bias shape", (x, v, m, b[:7]), {}, r"bias .* shape \(8,\)"
    yield "bias strided", (x, v, m, torch.zeros(16, dtype=torch.float16)[::2]), {}, "bias must be a contiguous"
    yield "out dtype", (x, v, m, None), {"out_dtype": torch.bfloat16}, "out_dtype must be x's dtype"
    yield "BLOCK_K 16", (x, v, m, None), {"config": dict(TILES, BLOCK_K=16)}, "BLOCK_K must be a power of two >= 32"
    yield "BLOCK_K 48", (x, v, m, None), {"config": dict(TILES, BLOCK_K=48)}, "BLOCK_K must be a power of two"
    if not INTERPRETED:
        yield "cpu", (x, v, m, None), {}, "run only under the Triton interpreter"


@pytest.mark.parametrize("name,args,kwargs,message", list(bad_launches()), ids=[b[0] for b in bad_launches()])
def test_launcher_rejects_bad_arguments(name, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparse24_matmul(*args, **kwargs)


@needs_cuda
def test_launcher_rejects_mixed_devices():
    x, values, meta, _ = make_case(4, 8, 32, torch.float16, None, 0, device="cuda")
    with pytest.raises(ValueError, match="meta is on cpu but x is on cuda"):
        sparse24_matmul(x, values, meta.cpu(), None)


def test_autotune_configs(monkeypatch):
    monkeypatch.delenv("TORCHSLIM_TRITON_AUTOTUNE", raising=False)  # the full tables, as in use
    def kept(m, dtype):
        x = torch.empty(0, dtype=dtype)
        return kernels._prune_configs(kernels._CONFIGS + kernels._CONFIGS_F32, {"M_BUCKET": m, "x_ptr": x})

    for dtype in (torch.bfloat16, torch.float16):
        assert {c.kwargs["BLOCK_M"] for c in kept(1, dtype)} == {16}
        assert kept(1, dtype) == kept(16, dtype) and all(c in kernels._CONFIGS for c in kept(1, dtype))
        assert min(c.kwargs["BLOCK_M"] for c in kept(32, dtype)) > kernels.SMALL_M
        assert kept(32, dtype) == kept(4096, dtype)
    assert kept(1, torch.float32) and all(c in kernels._CONFIGS_F32 for c in kept(1, torch.float32))
    assert kept(4096, torch.float32) and all(c in kernels._CONFIGS_F32 for c in kept(4096, torch.float32))
    assert not any(c in kernels._CONFIGS for c in kernels._CONFIGS_F32)
    for c in kernels._CONFIGS + kernels._CONFIGS_F32:
        bk = c.kwargs["BLOCK_K"]
        # Whole meta words (two or more per row), MMA-sized tiles, and Hopper's 227 KiB opt-in limit
        # for the pipelined x tile plus the compressed weight tile (2 bytes per element, worst case).
        assert bk >= 32 and bk & (bk - 1) == 0 and c.kwargs["BLOCK_M"] % 16 == 0
        per_stage = (c.kwargs["BLOCK_M"] * bk + c.kwargs["BLOCK_N"] * (bk // 2 + bk // 16)) * 4
        assert per_stage * c.num_stages <= 227 * 1024


# ---------------------------------------------------------------------------------------------
# compiled for Hopper ahead of time (no GPU needed): what tl.dot becomes
# ---------------------------------------------------------------------------------------------
# Run by conftest.compile_for_sm90 in a child process (the interpreter's triton cannot build IR).
_AOT_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchslim.triton_kernels import sparse24_linear as kernels

def compile_for_sm90(dtype, block_m, block_n, block_k, warps, stages):
    fn = kernels._sparse24_matmul_kernel
    sig = {"x_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "m_ptr": "*i16", "bias_ptr": f"*{dtype}", "c_ptr": f"*{dtype}"}
    for name in ("M", "N", "K", "HALF", "WORDS", "M_BUCKET", "stride_xm", "stride_vn", "stride_mn", "stride_cm"):
        sig[name] = "i32"
    constants = dict(stride_xk=1, stride_vk=1, stride_mk=1, stride_cn=1, HAS_BIAS=True, EVEN_K=True,
                     DOT_F32=False, IEEE=dtype == "fp32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                     GROUP_M=8)
    sig.update({name: "constexpr" for name in constants})
    index = {name: (fn.arg_names.index(name),) for name in sig}
    # Pointers 16-byte aligned, row strides and sizes multiples of 16: as Triton specializes them.
    aligned = ["x_ptr", "v_ptr", "m_ptr", "bias_ptr", "c_ptr", "N", "K", "HALF", "WORDS",
               "stride_xm", "stride_vn", "stride_mn", "stride_cm"]
    src = ASTSource(fn, sig, constexprs={index[n]: v for n, v in constants.items()},
                    attrs={index[n]: [["tt.divisibility", 16]] for n in aligned})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]
    return {"mma": sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ptx))),
            "cp_async_16": "cp.async.cg.shared.global" in ptx, "tf32": "tf32" in ptx, "fma": "fma.rn.f32" in ptx}

try:
    from triton.compiler import ASTSource  # noqa: F811
except ImportError as e:
    print(json.dumps({"skip": str(e)}))
    sys.exit(0)
cases = json.loads(sys.argv[1])
print(json.dumps({name: compile_for_sm90(*args) for name, args in cases.items()}))
"""
AOT_CASES = {
    "bf16_prefill": ["bf16", 128, 128, 64, 8, 3], "bf16_decode": ["bf16", 16, 32, 256, 4, 4],
    "fp16_prefill": ["fp16", 128, 128, 64, 8, 3], "fp16_decode": ["fp16", 16, 32, 256, 4, 4],
    "fp32_decode": ["fp32", 16, 32, 64, 4, 3],
}


@pytest.fixture(scope="module")
def sm90():
    """What the kernel compiles to for sm_90 (PTX facts per AOT_CASES entry), without a GPU."""
    return compile_for_sm90(_AOT_SCRIPT, AOT_CASES)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compiles_for_sm90_to_tensor_core_instructions(sm90, dtype):
    # Prefill tiles become Hopper's wgmma, decode tiles (BLOCK_M = 16) mma.sync m16n8k16, both with
    # float32 accumulators; the compressed tiles arrive by 16-byte cp.async (pipelined, vectorized).
    prefill, decode = sm90[f"{dtype}_prefill"], sm90[f"{dtype}_decode"]
    t = {"bf16": "bf16", "fp16": "f16"}[dtype]  # PTX's name of the type
    assert any(i.startswith("wgmma.mma_async") and i.endswith(f"f32.{t}.{t}") for i in prefill["mma"]), prefill
    assert any(i.startswith("mma.sync.aligned.m16n8k16") and f".f32.{t}.{t}.f32" in i for i in decode["mma"]), decode
    assert prefill["cp_async_16"] and decode["cp_async_16"]


def test_float32_compiles_without_tf32(sm90):
    # float32 x: IEEE products on FMAs, never TF32 tensor-core instructions.
    f32 = sm90["fp32_decode"]
    assert not f32["mma"] and not f32["tf32"] and f32["fma"], f32


# ---------------------------------------------------------------------------------------------
# the CUDA op's registration and argument checks (run anywhere: the checks are plain Python)
# ---------------------------------------------------------------------------------------------
def test_cuda_kernel_is_registered_where_triton_is_installed():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchslim::sparse24_linear", "CUDA")


# The cases of the CPU op's checks (tests/test_sparse24_linear.py): the CUDA op says the same things
# (its checks run before any launch, so CPU tensors exercise them anywhere).
@pytest.mark.parametrize("name,args,message", list(sparse24_linear_bad_inputs()),
                         ids=[b[0] for b in sparse24_linear_bad_inputs()])
def test_cuda_op_argument_checks(name, args, message):
    with pytest.raises(RuntimeError, match=message):
        _cuda_registration._sparse24_linear_cuda(*args)


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float64, torch.bfloat16])
def test_cuda_op_function_end_to_end(dtype, bias_dtype):
    # The registered function itself (on CPU tensors under the interpreter): bias of any float dtype
    # rounded to x's dtype first, as F.linear adds it; empty shapes; K not a multiple of 16.
    x, values, meta, bias = make_case(6, 18, 23, dtype, bias_dtype, 11, device=DEVICE)
    out = _cuda_registration._sparse24_linear_cuda(x, values, meta, bias)
    assert out.dtype == dtype and out.shape == (6, 18)
    expected = sparse24_matmul(x, values, meta, bias.to(dtype) if bias is not None else None, config=TILES)
    if INTERPRETED:
        assert torch.equal(out, expected)  # the interpreter runs the fixed tiles either way
    else:
        assert_accurate(out, reference.sparse24_linear(x, values, meta, bias), x, dense_weight(values, meta, 23), bias)
    for M, N, K in ((0, 18, 23), (6, 0, 23), (6, 18, 0)):
        x, values, meta, bias = make_case(M, N, K, dtype, bias_dtype, 12, device=DEVICE)
        out = _cuda_registration._sparse24_linear_cuda(x, values, meta, bias)
        assert out.shape == (M, N) and out.dtype == dtype
        expected = bias.to(dtype).expand(M, N) if bias is not None else torch.zeros(M, N, dtype=dtype)
        assert torch.equal(out.cpu(), expected.cpu())


# ---------------------------------------------------------------------------------------------
# GPU: the op as users call it
# ---------------------------------------------------------------------------------------------
sizes = st.one_of(st.integers(1, 300), st.sampled_from([1, 3, 16, 17, 129, 1000]))


@pytest.mark.gpu
@needs_cuda
@given(M=sizes, N=sizes, K=sizes, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**31))
@examples(15)
def test_cuda_op_matches_reference(M, N, K, dtype, bias_dtype, seed):
    x, values, meta, bias = make_case(M, N, K, dtype, bias_dtype, seed, device="cuda")
    out = ops.sparse24_linear(x, values, meta, bias)
    assert out.dtype == dtype and out.shape == (M, N) and out.device == x.device
    assert_accurate(out, reference.sparse24_linear(x, values, meta, bias), x, dense_weight(values, meta, K), bias)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("N,K", [(384, 1536), (4096, 4096)])
def test_cuda_op_model_shapes(M, N, K, dtype):
    # Real layer sizes under the autotuned configs (decode tiles at M <= 16).
    x, values, meta, bias = make_case(M, N, K, dtype, dtype, M + N + K, device="cuda")
    out = ops.sparse24_linear(x, values, meta, bias)
    assert_accurate(out, reference.sparse24_linear(x, values, meta, bias), x, dense_weight(values, meta, K), bias)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 5, 16, 17, 300])
def test_cuda_autotuned_kernel_alone(M):
    # The autotuned launcher in x's dtype and in float32 (each call picks its own best tiles: the
    # two may sum in different orders, so each is checked against the reference by itself).
    x, values, meta, bias = make_case(M, 1000, 777, torch.bfloat16, torch.bfloat16, M, device="cuda")
    ref, w = reference.sparse24_linear(x, values, meta, bias), dense_weight(values, meta, 777)
    assert_accurate(sparse24_matmul(x, values, meta, bias), ref, x, w, bias)
    assert_accurate(sparse24_matmul(x, values, meta, bias, out_dtype=torch.float32), ref, x, w, bias)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_opcheck(dtype):
    x, values, meta, bias = make_case(5, 24, 70, dtype, dtype, 4, device="cuda")
    x.requires_grad_()  # the autograd tests run too
    torch.library.opcheck(torch.ops.torchslim.sparse24_linear.default, (x, values, meta, bias))
    torch.library.opcheck(torch.ops.torchslim.sparse24_linear.default, (x, values, meta, None))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_op_gradient(dtype):
    # The autograd (_autograd.py) is device-agnostic: dx = dy @ W, dbias = sum dy, as dense F.linear gives them.
    x, values, meta, bias = make_case(9, 40, 50, dtype, dtype, 8, device="cuda")
    w = sparse24.unpack(values, meta, 50)
    x.requires_grad_()
    bias.requires_grad_()
    x_d, b_d = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    dy = torch.randn(9, 40, device="cuda").to(dtype)
    ops.sparse24_linear(x, values, meta, bias).backward(dy)
    torch.nn.functional.linear(x_d, w, b_d).backward(dy)
    # The same GEMM, though on a column slice of the rebuilt (N, K_pad) weight: cuBLAS may pick
    # another kernel for its row stride, so equal within the dtype's tolerance, not bit for bit.
    torch.testing.assert_close(x.grad, x_d.grad)
    torch.testing.assert_close(bias.grad, b_d.grad)


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_checks_devices():
    x, values, meta, bias = make_case(4, 8, 32, torch.bfloat16, torch.bfloat16, 0, device="cuda")
    with pytest.raises(RuntimeError, match="values must be on cuda"):
        ops.sparse24_linear(x, values.cpu(), meta)
    with pytest.raises(RuntimeError, match="meta must be on cuda"):
        ops.sparse24_linear(x, values, meta.cpu())
    with pytest.raises(RuntimeError, match="bias must be on cuda"):
        ops.sparse24_linear(x, values, meta, bias.cpu())
    with pytest.raises(RuntimeError, match="values must be on cpu"):
        ops.sparse24_linear(x.cpu(), values, meta.cpu())


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_under_torch_compile():
    x, values, meta, bias = make_case(33, 64, 96, torch.bfloat16, torch.bfloat16, 6, device="cuda")

    def f(x):
        return torch.relu(ops.sparse24_linear(x, values, meta, bias)) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
