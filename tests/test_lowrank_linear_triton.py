"""The CUDA path of lowrank_linear: the Triton kernel (triton_kernels/lowrank_linear.py) against the
float64 reference, and the registered CUDA op torchslim::lowrank_linear.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 there), on tiny shapes: the interpreter costs ~3 ms per program per K step. Its
bfloat16 tl.dot is wrong and its float32 -> bfloat16 cast truncates, so the launcher has it multiply
bfloat16 tiles in float32 (exact products, float32 sums: the tensor cores' numerics) and round to
bfloat16 by hand (to nearest even, as compiled code does): every dtype is checked the same way.
With a GPU the same kernel tests run compiled on CUDA tensors, and the `gpu` tests run the op.

Accuracy, two ways:
  - error_bound: what float32 sums may differ from the float64 reference by (the bound of
    tests/test_lowrank_linear.py for the CPU op: K + 1 float32 roundings in t, r + 1 in out, t's
    rounding to x's dtype resolved one ulp apart, the final rounding), elementwise;
  - in bfloat16 and float16, like PyTorch: the largest error is at most twice that of
    F.linear(F.linear(x, V), U, bias) in the same dtype (PyTorch's own error, as flash-attention's
    tests judge low precision), plus one rounding of the largest output (where PyTorch happens to be
    exact). Measured: equal errors in 1500 random interpreted cases of up to 4 x 4 outputs.
And exactly, where the arithmetic is exact: integer data whose intermediate needs rounding in 16 bits.
"""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from conftest import (  # noqa: E402
    FLOAT_DTYPES, HALF_SUBNORMAL_SPACING, UNIT_ROUNDOFF, assert_within, compile_for_sm90, examples,
    lowrank_linear_bad_inputs,
)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from torchslim import _cuda_registration, ops, reference  # noqa: E402
from torchslim.triton_kernels import lowrank_linear as kernels  # noqa: E402
from torchslim.triton_kernels.lowrank_linear import MAX_R, lowrank_matmul  # noqa: E402

INTERPRETED = kernels._interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernel_device = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="neither the Triton interpreter (TRITON_INTERPRET=1) nor a CUDA device")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

# Fixed 16x16x32 tiles in 2 column ranges (the interpreter's default, passed explicitly so that the
# GPU also runs them instead of autotuning each new shape): sizes straddle one and several tiles.
TILES = kernels.INTERPRETER_CONFIG
small = st.one_of(st.integers(1, 40), st.sampled_from([1, 3, 16, 17, 33]))
small_k = st.one_of(st.integers(1, 70), st.sampled_from([1, 3, 16, 17, 32, 33, 64, 65]))
ranks = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64]))


def make_case(M, N, K, r, dtype, bias_dtype, seed, device="cpu"):
    """x (M, K), factors V (r, K) and U (N, r) scaled so that t and out stay O(1), a bias (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    V = (torch.randn(r, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    U = (torch.randn(N, r, generator=g) / max(r, 1) ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(bias_dtype) if bias_dtype is not None else None
    return tuple(t.to(device) if t is not None else None for t in (x, V, U, bias))


def error_bound(x, V, U, bias):
    """(reference, elementwise bound): float32 sums of K products (t) and of r products plus the bias
    (out), each at most (terms + 1) roundings relative to the sum of the terms' magnitudes; t's rounding
    to x's dtype, which float32 and float64 sums may resolve one ulp apart (2 u |t| through |U|); the
    final rounding to the output dtype (added by assert_within's callers through u * |ref|)."""
    x, V, U = x.cpu(), V.cpu(), U.cpu()
    bias = bias.cpu() if bias is not None else None
    u, u32 = UNIT_ROUNDOFF[x.dtype], UNIT_ROUNDOFF[torch.float32]
    K, r = x.shape[1], V.shape[0]
    ref = reference.lowrank_linear(x, V, U, bias)
    t = (x.double() @ V.double().T).to(x.dtype).double().abs()
    Ua = U.double().abs().T
    b = bias.to(x.dtype).double().abs() if bias is not None else 0.0
    flips = 2 * u * (t @ Ua) if x.dtype != torch.float32 else 0.0
    bound = flips + 2 * (K + 1) * u32 * ((x.double().abs() @ V.double().abs().T) @ Ua) + 2 * (r + 1) * u32 * (t @ Ua + b)
    return ref, bound


def assert_accurate(out, x, V, U, bias):
    """out (x's dtype or float32) within error_bound of the reference; in bfloat16 / float16, also like
    PyTorch's error (in float32 both errors are a few float32 roundings of luck, which the bound covers)."""
    ref, bound = error_bound(x, V, U, bias)
    out = out.cpu()
    assert_within(out, ref, bound + UNIT_ROUNDOFF[out.dtype] * ref.abs())
    if out.dtype == x.dtype != torch.float32 and out.numel() and bool(torch.isfinite(ref).all()):
        # PyTorch on the operands' device: the CPU's GEMM under the interpreter, cuBLAS on a GPU.
        b = bias.to(x.dtype) if bias is not None else None
        ours = float((out.double() - ref).abs().max())
        pytorch = float((F.linear(F.linear(x, V), U, b).cpu().double() - ref).abs().max())
        floor = UNIT_ROUNDOFF[x.dtype] * float(ref.abs().max()) + HALF_SUBNORMAL_SPACING[x.dtype]
        assert ours <= 2 * pytorch + floor, (ours, pytorch, floor)


def assert_same_sum(out, expected):
    """Two runs of the same tiles that only read their operands differently (strides, masked memory).
    The interpreter does the same arithmetic: bit for bit. Compiled, another specialization may order
    the float32 sums differently: within a few float32 ulps."""
    if INTERPRETED:
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected)


def run_and_check(x, V, U, bias, config=TILES):
    """The kernel in x's dtype and in float32 against the reference (bias rounded to x's dtype as the
    op does; the reference rounds it itself). With fixed tiles the x-dtype result is the float32 one
    rounded once (autotuned, config=None, each call may pick other tiles that sum in another order)."""
    M, N = x.shape[0], U.shape[0]
    bias_x = bias.to(x.dtype) if bias is not None else None
    args = [t.to(DEVICE) if t is not None else None for t in (x, V, U, bias_x)]
    out = lowrank_matmul(*args, config=config)
    out32 = lowrank_matmul(*args, out_dtype=torch.float32, config=config)
    assert out.dtype == x.dtype and out.shape == (M, N) and out.is_contiguous() and out.device == args[0].device
    assert out32.dtype == torch.float32
    out, out32 = out.cpu(), out32.cpu()
    if config is not None:
        torch.testing.assert_close(out, out32.to(x.dtype), rtol=0, atol=0, equal_nan=True)
    assert_accurate(out32, x, V, U, bias)
    assert_accurate(out, x, V, U, bias)
    return out


# ---------------------------------------------------------------------------------------------
# the kernel, through the interpreter (CPU) or compiled (GPU)
# ---------------------------------------------------------------------------------------------
@needs_kernel_device
@given(M=small, N=small, K=small_k, r=ranks, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, *FLOAT_DTYPES, torch.float64]), seed=st.integers(0, 2**31))
@examples(40)
def test_matches_reference(M, N, K, r, dtype, bias_dtype, seed):
    run_and_check(*make_case(M, N, K, r, dtype, bias_dtype, seed))


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_intermediate_is_rounded_like_two_linears(dtype):
    # Integers: t = x V^T is exact in float32, but mostly beyond the integers bfloat16 (256) and
    # float16 (2048) hold, so the kernel must round it, to nearest even, as the reference does;
    # everything after (|U| <= 1, small bias, sums below 2^24 and float16's largest value) is exact, so
    # the results are equal bit for bit. A kernel that kept t in float32, or truncated it, fails here.
    M, N, K, r = 21, 19, 40, 5
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-32, 33, (M, K), generator=g).to(dtype)
    V = torch.randint(-32, 33, (r, K), generator=g).to(dtype)
    U = torch.randint(-1, 2, (N, r), generator=g).to(dtype)
    bias = torch.randint(-8, 9, (N,), generator=g).to(dtype)
    t = x.double() @ V.double().T
    ref = reference.lowrank_linear(x, V, U, bias)
    assert ref.abs().max() < 65504
    if dtype != torch.float32:
        assert (t.to(dtype).double() != t).float().mean() > 0.1  # the data does need rounding (ties too)
    out = lowrank_matmul(*(a.to(DEVICE) for a in (x, V, U, bias)), config=TILES).cpu()
    assert torch.equal(out, ref.to(dtype))
    # ... and the same as two F.linear calls in that dtype
    assert torch.equal(out, F.linear(F.linear(x, V), U, bias))


CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_N=1),   # one range: phase 2 walks every column block
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, SPLIT_N=3),   # 3 ranges that do not divide the blocks evenly
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_N=64),  # more ranges asked for than column blocks
]


@needs_kernel_device
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(str(v) for v in c.values()))
@pytest.mark.parametrize("M,N,K,r", [(50, 70, 64, 20), (33, 37, 65, 33), (1, 100, 48, 5)])
def test_block_configs(config, M, N, K, r):
    # K = 64 and 48 take the EVEN_K loop for some BLOCK_K, 65 the masked one; r = 33 pads to 64.
    run_and_check(*make_case(M, N, K, r, torch.float16, torch.float16, M * N + K + r), config=config)


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rank_limit_itself(dtype):
    # r = MAX_R (BLOCK_R = 2048, or 1024 for float32) runs, and r just above a power of two pads.
    # Compiled, the interpreter's tiles would not fit in shared memory at these ranks: autotuned there.
    for r in (MAX_R[dtype], MAX_R[dtype] // 2 + 1):
        run_and_check(*make_case(3, 20, 24, r, dtype, dtype, r), config=TILES if INTERPRETED else None)


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_padding_reads_nothing(dtype):
    # NaN in the memory just past every operand's logical extent: x's columns beyond K, V's rows
    # beyond r (a row slice of a taller tensor), U's columns beyond r (a column slice of a wider one).
    # The kernel masks them all: the result is finite and equals the run on clean contiguous copies.
    M, N, K, r = 5, 40, 33, 7
    x, V, U, bias = make_case(M, N, K, r, dtype, dtype, 9)
    clean = lowrank_matmul(*(t.to(DEVICE) for t in (x, V, U, bias)), config=TILES).cpu()
    nan = float("nan")
    wide_x = torch.full((M, K + 9), nan, dtype=dtype)
    wide_x[:, :K] = x
    tall_v = torch.full((r + 9, K), nan, dtype=dtype)
    tall_v[:r] = V
    wide_u = torch.full((N, r + 9), nan, dtype=dtype)
    wide_u[:, :r] = U
    args = (wide_x.to(DEVICE)[:, :K], tall_v.to(DEVICE)[:r], wide_u.to(DEVICE)[:, :r], bias.to(DEVICE))
    assert not args[0].is_contiguous() and not args[2].is_contiguous()
    out = lowrank_matmul(*args, config=TILES).cpu()
    assert torch.isfinite(out).all()
    assert_same_sum(out, clean)


@needs_kernel_device
def test_any_strides():
    # Transposed (column-major) operands give the contiguous operands' result.
    M, N, K, r = 18, 21, 35, 6
    x, V, U, bias = make_case(M, N, K, r, torch.float32, torch.float32, 4, device=DEVICE)
    expected = lowrank_matmul(x, V, U, bias, config=TILES)
    cm = [t.T.contiguous().T for t in (x, V, U)]
    assert not any(t.is_contiguous() for t in cm)
    assert_same_sum(lowrank_matmul(*cm, bias, config=TILES).cpu(), expected.cpu())


@needs_kernel_device
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's, for Inf - Inf
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_inputs_give_the_references_nonfinites(dtype):
    # Inf and NaN in x and V: the rows they reach are NaN or infinite exactly where the reference's are
    # (IEEE: which of NaN / +-Inf a sum gives does not depend on the order of its terms). r = 5 pads
    # to 16 ranks: Inf in x times V's zero padding must not make every output of the row NaN.
    M, N, K, r = 20, 30, 40, 5
    x, V, U, bias = make_case(M, N, K, r, dtype, dtype, 3)
    x[0, 5] = float("inf")
    x[7, 39] = float("nan")
    x[11, 3] = float("-inf")
    V2 = V.clone()
    V2[2, 0] = float("-inf")
    for args in ((x, V, U, bias), (x.nan_to_num(0.0, 0.0, 0.0), V2, U, bias)):
        out = lowrank_matmul(*(t.to(DEVICE) for t in args), config=TILES).cpu()
        ref = reference.lowrank_linear(*args)
        assert not bool(torch.isfinite(ref).all())
        assert_within(out, ref, error_bound(*args)[1].nan_to_num(0.0, 0.0, 0.0) + UNIT_ROUNDOFF[dtype] * ref.abs())


@needs_kernel_device
@pytest.mark.parametrize("shape", [(0, 5, 7, 3), (4, 0, 7, 3), (4, 5, 0, 3), (4, 5, 7, 0), (0, 0, 0, 0)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_dimensions(shape, dtype):
    # An empty sum (K = 0 or r = 0) gives the bias in every row; M = 0 or N = 0 an empty result.
    M, N, K, r = shape
    x, V, U, bias = make_case(M, N, K, r, dtype, dtype, 1, device=DEVICE)
    for b in (bias, None):
        for out_dtype in (dtype, torch.float32):
            out = lowrank_matmul(x, V, U, b, out_dtype=out_dtype)
            assert out.shape == (M, N) and out.dtype == out_dtype and out.device == x.device
            expected = b.expand(M, N) if b is not None else torch.zeros(M, N, dtype=dtype, device=DEVICE)
            assert torch.equal(out, expected.to(out_dtype))


def bad_launches():
    x = torch.zeros(4, 40, dtype=torch.float16)
    V, U, b = torch.zeros(6, 40, dtype=torch.float16), torch.zeros(8, 6, dtype=torch.float16), torch.zeros(8, dtype=torch.float16)
    yield "x dtype", (x.int(), V, U, None), {}, "x must be a 2-D float32, bfloat16 or float16"
    yield "x 1-D", (x[0], V, U, None), {}, "x must be a 2-D"
    yield "x not a tensor", (x.tolist(), V, U, None), {}, "x must be .* got list"
    yield "V dtype", (x, V.float(), U, None), {}, r"V must be a 2-D \(r, 40\) tensor of x's dtype"
    yield "V width", (x, V[:, :39], U, None), {}, r"V must be a 2-D \(r, 40\) tensor"
    yield "V 3-D", (x, V[None], U, None), {}, "V must be a 2-D"
    yield "U dtype", (x, V, U.bfloat16(), None), {}, r"U must be a 2-D \(N, 6\) tensor of x's dtype"
    yield "U width", (x, V, U[:, :5], None), {}, r"U must be a 2-D \(N, 6\) tensor"
    yield "bias dtype", (x, V, U, b.float()), {}, "bias must be a contiguous tensor of x's dtype"
    yield "bias shape", (x, V, U, b[:7]), {}, r"bias .* shape \(8,\)"
    yield "bias strided", (x, V, U, torch.zeros(16, dtype=torch.float16)[::2]), {}, "bias must be a contiguous"
    yield "out dtype", (x, V, U, None), {"out_dtype": torch.bfloat16}, "out_dtype must be x's dtype"
    yield "BLOCK_K 8", (x, V, U, None), {"config": dict(TILES, BLOCK_K=8)}, "BLOCK_K must be a power of two >= 16"
    yield "BLOCK_M 48", (x, V, U, None), {"config": dict(TILES, BLOCK_M=48)}, "BLOCK_M must be a power of two"
    yield "BLOCK_N missing", (x, V, U, None), {"config": {"BLOCK_M": 16, "BLOCK_K": 32, "SPLIT_N": 1}}, \
        "BLOCK_N must be a power of two >= 16, got 0"
    yield "SPLIT_N 0", (x, V, U, None), {"config": dict(TILES, SPLIT_N=0)}, "SPLIT_N must be an integer >= 1"
    yield "meta device", (x, V.to("meta"), U, None), {}, "V is on meta but x is on cpu"
    if not INTERPRETED:
        yield "cpu", (x, V, U, None), {}, "run only under the Triton interpreter"


@pytest.mark.parametrize("name,args,kwargs,message", list(bad_launches()), ids=[b[0] for b in bad_launches()])
def test_launcher_rejects_bad_arguments(name, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lowrank_matmul(*args, **kwargs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rank_limit_is_a_clear_error(dtype, monkeypatch):
    # Checked before anything runs, whatever the other sizes (an empty batch included): a layer whose
    # rank the kernel cannot hold fails on its first call, not on its first non-empty one.
    monkeypatch.setenv("TORCHSLIM_CUDA_OPT_IN", "lowrank_fused")
    r = MAX_R[dtype] + 1
    for M in (3, 0):
        x, V, U = torch.zeros(M, 2, dtype=dtype), torch.zeros(r, 2, dtype=dtype), torch.zeros(4, r, dtype=dtype)
        with pytest.raises(ValueError, match=f"lowrank_matmul: r={r} exceeds {MAX_R[dtype]}, the largest rank"):
            lowrank_matmul(x, V, U, None)
        with pytest.raises(RuntimeError, match=f"lowrank_linear: r={r} exceeds {MAX_R[dtype]}, the largest rank "
                                               "of the fused CUDA kernel"):
            _cuda_registration._lowrank_linear_cuda(x, V, U, None)


@needs_cuda
def test_launcher_rejects_mixed_devices():
    x, V, U, _ = make_case(4, 8, 32, 3, torch.float16, None, 0, device="cuda")
    with pytest.raises(ValueError, match="U is on cpu but x is on cuda"):
        lowrank_matmul(x, V, U.cpu(), None)


def test_autotune_configs(monkeypatch):
    monkeypatch.delenv("TORCHSLIM_TRITON_AUTOTUNE", raising=False)  # the full tables, as in use
    def kept(M, N, r, dtype):
        x = torch.empty(0, dtype=dtype)
        return kernels._prune_configs(None, {"x_ptr": x, "M_BUCKET": triton.next_power_of_2(M), "N": N, "R": r})

    for dtype in FLOAT_DTYPES:
        for r in (1, 16, 17, 100, 128, 129, 512, MAX_R[dtype]):
            br = kernels.block_r(r)
            assert br >= max(16, r) and br & (br - 1) == 0
            small, large = kept(1, 4096, r, dtype), kept(2048, 4096, r, dtype)
            assert small and large
            if dtype != torch.float32:
                # decode tiles are 16 rows; prefill ones are as tall as the accumulator allows
                assert all(c.kwargs["BLOCK_M"] == 16 for c in small)
                assert max(c.kwargs["BLOCK_M"] for c in large) == min(128, max(16, 32768 // br))
            # every split is tried at N = 4096; at N = 16 (one column block) only one range exists
            assert {c.kwargs["SPLIT_N"] for c in large} == set(kernels.SPLITS)
            assert {kernels._ranges(16, c.kwargs["BLOCK_N"], c.kwargs["SPLIT_N"]) for c in kept(2048, 16, r, dtype)} == {1}
    for (kind, br), configs in kernels._CONFIGS.items():
        for c in configs:
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            assert all(b >= 16 and b & (b - 1) == 0 for b in (bm, bn, bk))
            # the phase 1 accumulator: <= 128 float32 registers a thread
            assert bm * br <= 128 * 32 * c.num_warps
            # Hopper's 227 KiB for the pipelined tiles of the larger phase (4 bytes per element for
            # float32, 2 otherwise)
            size = 4 if kind == "f32" else 2
            per_stage = max((bm + br) * bk, bn * br) * size
            assert per_stage * c.num_stages <= 227 * 1024, (kind, br, c)


@pytest.mark.parametrize("N,block_n", [(1, 16), (16, 16), (17, 16), (100, 16), (4096, 64), (11008, 32)])
def test_column_ranges_cover_every_block_once(N, block_n):
    # What the grid launches and what each program takes (as the kernel computes it): contiguous ranges
    # of ceil(blocks / ranges) blocks, none empty, together every block exactly once.
    n_blocks = triton.cdiv(N, block_n)
    for split in (1, 2, 3, 4, 16, 64, 1000):
        ranges = kernels._ranges(N, block_n, split)
        assert 1 <= ranges <= min(split, n_blocks)
        per = triton.cdiv(n_blocks, ranges)
        covered = [b for s in range(ranges) for b in range(s * per, min(s * per + per, n_blocks))]
        assert covered == list(range(n_blocks))
        assert all(s * per < n_blocks for s in range(ranges))


# ---------------------------------------------------------------------------------------------
# compiled for Hopper ahead of time (no GPU needed): what tl.dot becomes
# ---------------------------------------------------------------------------------------------
# Run by conftest.compile_for_sm90 in a child process (the interpreter's triton cannot build IR).
_AOT_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchslim.triton_kernels import lowrank_linear as kernels

def compile_for_sm90(dtype, block_m, block_n, block_k, block_r, warps, stages):
    fn = kernels._lowrank_linear_kernel
    sig = {name: f"*{dtype}" for name in ("x_ptr", "v_ptr", "u_ptr", "bias_ptr", "c_ptr")}
    for name in ("M", "N", "K", "R", "M_BUCKET", "stride_xm", "stride_vr", "stride_un", "stride_cm", "SPLIT_N"):
        sig[name] = "i32"
    constants = dict(stride_xk=1, stride_vk=1, stride_ur=1, stride_cn=1, HAS_BIAS=True, EVEN_K=True,
                     DOT_F32=False, IEEE=dtype == "fp32", RNE_BY_HAND=False, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_K=block_k, BLOCK_R=block_r)
    sig.update({name: "constexpr" for name in constants})
    index = {name: (fn.arg_names.index(name),) for name in sig}
    # Pointers 16-byte aligned, row strides, sizes and the rank multiples of 16: as Triton specializes
    # them (a rank that is no multiple of 16 loads U's tiles without cp.async).
    aligned = ["x_ptr", "v_ptr", "u_ptr", "bias_ptr", "c_ptr", "N", "K", "R",
               "stride_xm", "stride_vr", "stride_un", "stride_cm"]
    src = ASTSource(fn, sig, constexprs={index[n]: v for n, v in constants.items()},
                    attrs={index[n]: [["tt.divisibility", 16]] for n in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    phase2 = ttgir.split("scf.for")[-1]  # the phase 2 loop is the kernel's last scf.for
    return {"mma": sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ptx))),
            "cp_async_16": "cp.async.cg.shared.global" in ptx, "tf32": "tf32" in ptx, "fma": "fma.rn.f32" in ptx,
            "phase2_async": "async_copy_global_to_local" in phase2,
            "global_writes": len(re.findall(r"\btt\.(store|atomic_\w+)\b", ttgir)),
            "phase2_stores": len(re.findall(r"\btt\.store\b", phase2)), "shared": k.metadata.shared}

try:
    from triton.compiler import ASTSource  # noqa: F811
except ImportError as e:
    print(json.dumps({"skip": str(e)}))
    sys.exit(0)
cases = json.loads(sys.argv[1])
print(json.dumps({name: compile_for_sm90(*args) for name, args in cases.items()}))
"""
AOT_CASES = {
    # (dtype, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, warps, stages): tiles of kernels._PREFILL / _DECODE / _F32
    "bf16_prefill": ["bf16", 64, 32, 32, 512, 8, 3], "bf16_decode": ["bf16", 16, 32, 32, 512, 4, 4],
    "fp16_prefill": ["fp16", 128, 128, 64, 128, 8, 3], "fp16_decode": ["fp16", 16, 64, 64, 256, 4, 4],
    "bf16_max_rank": ["bf16", 16, 16, 16, 2048, 16, 2],
    "fp32": ["fp32", 16, 16, 16, 512, 8, 2],
}


@pytest.fixture(scope="module")
def sm90():
    """What the kernel compiles to for sm_90 (PTX facts per AOT_CASES entry), without a GPU."""
    return compile_for_sm90(_AOT_SCRIPT, AOT_CASES)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compiles_for_sm90_to_tensor_core_instructions(sm90, dtype):
    # Prefill tiles (64-row multiples) become Hopper's wgmma, decode tiles (BLOCK_M = 16) mma.sync
    # m16n8k16, both with float32 accumulators; V's and U's tiles arrive by 16-byte cp.async, in phase 2
    # too (software-pipelined against the previous column block's dot).
    prefill, decode = sm90[f"{dtype}_prefill"], sm90[f"{dtype}_decode"]
    t = {"bf16": "bf16", "fp16": "f16"}[dtype]  # PTX's name of the type
    assert any(i.startswith("wgmma.mma_async") and i.endswith(f"f32.{t}.{t}") for i in prefill["mma"]), prefill
    assert any(i.startswith("mma.sync.aligned.m16n8k16") and f".f32.{t}.{t}.f32" in i for i in decode["mma"]), decode
    for case in (prefill, decode):
        assert case["cp_async_16"] and case["phase2_async"], case
        assert case["shared"] <= 227 * 1024


def test_largest_rank_compiles_within_shared_memory(sm90):
    case = sm90["bf16_max_rank"]
    assert any(i.startswith("mma.sync") for i in case["mma"]) and case["shared"] <= 227 * 1024, case


def test_float32_compiles_without_tf32(sm90):
    # float32 x: IEEE products on FMAs, never TF32 tensor-core instructions.
    f32 = sm90["fp32"]
    assert not f32["mma"] and not f32["tf32"] and f32["fma"], f32


def test_intermediate_is_never_stored(sm90):
    # The kernel's only write to global memory is the output tile's store in the phase 2 loop: t stays
    # in registers and shared memory.
    for name, case in sm90.items():
        assert case["global_writes"] == 1 and case["phase2_stores"] == 1, (name, case)


# ---------------------------------------------------------------------------------------------
# the CUDA op's registration and argument checks (run anywhere: the checks are plain Python)
# ---------------------------------------------------------------------------------------------
def test_cuda_kernel_is_registered_where_triton_is_installed():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchslim::lowrank_linear", "CUDA")


# The cases of the CPU op's checks (tests/test_lowrank_linear.py): the CUDA op says the same things
# (its checks run before any launch, so CPU tensors exercise them anywhere).
@pytest.mark.parametrize("name,args,message", list(lowrank_linear_bad_inputs()),
                         ids=[b[0] for b in lowrank_linear_bad_inputs()])
def test_cuda_op_argument_checks(name, args, message):
    with pytest.raises(RuntimeError, match="lowrank_linear: " + message):
        _cuda_registration._lowrank_linear_cuda(*args)


@needs_kernel_device
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float64, torch.bfloat16])
def test_cuda_op_function_end_to_end(dtype, bias_dtype, fused, monkeypatch):
    # The registered function itself (on CPU tensors under the interpreter), on its default path (two
    # GEMMs) and the opt-in fused kernel: bias of any float dtype rounded to x's dtype first, as
    # F.linear adds it; empty shapes.
    monkeypatch.setenv("TORCHSLIM_CUDA_OPT_IN", "lowrank_fused" if fused else "")
    x, V, U, bias = make_case(6, 18, 23, 5, dtype, bias_dtype, 11, device=DEVICE)
    out = _cuda_registration._lowrank_linear_cuda(x, V, U, bias)
    assert out.dtype == dtype and out.shape == (6, 18)
    b = bias.to(dtype) if bias is not None else None
    if fused and INTERPRETED:  # the interpreter runs the fixed tiles either way
        assert torch.equal(out, lowrank_matmul(x, V, U, b, config=TILES))
    if not fused:  # exactly two F.linear calls
        assert torch.equal(out, torch.nn.functional.linear(torch.nn.functional.linear(x, V), U, b))
    assert_accurate(out, x, V, U, bias)
    for M, N, K, r in ((0, 18, 23, 5), (6, 0, 23, 5), (6, 18, 0, 5), (6, 18, 23, 0)):
        x, V, U, bias = make_case(M, N, K, r, dtype, bias_dtype, 12, device=DEVICE)
        out = _cuda_registration._lowrank_linear_cuda(x, V, U, bias)
        assert out.shape == (M, N) and out.dtype == dtype
        expected = bias.to(dtype).expand(M, N) if bias is not None else torch.zeros(M, N, dtype=dtype)
        assert torch.equal(out.cpu(), expected.cpu())


# ---------------------------------------------------------------------------------------------
# GPU: the op as users call it
# ---------------------------------------------------------------------------------------------
# Every new (M bucket, N, K, r, dtypes) autotunes (up to 6 configs, a compilation for each new tile), so
# the GPU cases are few: they share run.sh's time limit with every other GPU test.
sizes = st.one_of(st.integers(1, 300), st.sampled_from([1, 3, 16, 17, 129, 1000]))
gpu_ranks = st.one_of(st.integers(1, 300), st.sampled_from([1, 7, 16, 17, 64, 100, 511, 1024]))


@pytest.mark.gpu
@needs_cuda
@given(M=sizes, N=sizes, K=sizes, r=gpu_ranks, dtype=st.sampled_from(FLOAT_DTYPES),
       bias_dtype=st.sampled_from([None, torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**31))
@examples(8)
@pytest.mark.parametrize("path", ["", "lowrank_fused"])  # the default two GEMMs; the opt-in fused kernel
def test_cuda_op_matches_reference(M, N, K, r, dtype, bias_dtype, seed, path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CUDA_OPT_IN", path)
    x, V, U, bias = make_case(M, N, K, r, dtype, bias_dtype, seed, device="cuda")
    out = ops.lowrank_linear(x, V, U, bias)
    assert out.dtype == dtype and out.shape == (M, N) and out.device == x.device
    assert_accurate(out, x, V, U, bias)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,M,N,K,r", [
    # MiniLM's MLP up projection at r = K/8, decode and prefill; Llama-7B's 4096 square at r = K/8 and
    # at the largest rank (wgmma tiles up to r = 512, mma.sync beyond); float16 and float32 once each.
    (torch.bfloat16, 1, 1536, 384, 48), (torch.bfloat16, 128, 1536, 384, 48),
    (torch.bfloat16, 16, 4096, 4096, 512), (torch.bfloat16, 512, 4096, 4096, 512),
    (torch.bfloat16, 128, 4096, 4096, 2048), (torch.float16, 128, 4096, 4096, 512),
    (torch.float32, 16, 4096, 4096, 1024),
])
def test_cuda_op_model_shapes(dtype, M, N, K, r):
    # Real layer sizes under the autotuned configs (decode tiles at M <= 16), up to the largest rank.
    x, V, U, bias = make_case(M, N, K, r, dtype, dtype, M + N + K + r, device="cuda")
    assert_accurate(ops.lowrank_linear(x, V, U, bias), x, V, U, bias)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 300])
def test_cuda_autotuned_kernel_alone(M):
    # The autotuned launcher in x's dtype and in float32 (each call picks its own best tiles and split).
    x, V, U, bias = make_case(M, 1000, 777, 100, torch.bfloat16, torch.bfloat16, M, device="cuda")
    assert_accurate(lowrank_matmul(x, V, U, bias), x, V, U, bias)
    assert_accurate(lowrank_matmul(x, V, U, bias, out_dtype=torch.float32), x, V, U, bias)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_opcheck(dtype):
    for M, with_bias in ((5, True), (9, False)):
        x, V, U, bias = make_case(M, 24, 70, 6, dtype, dtype if with_bias else None, M, device="cuda")
        x.requires_grad_()  # the autograd tests run too
        torch.library.opcheck(torch.ops.torchslim.lowrank_linear.default, (x, V, U, bias))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_op_gradient(dtype):
    # The C++ autograd is device-agnostic: the gradients of F.linear(F.linear(x, V), U, bias), within
    # the tolerances of tests/test_lowrank_linear.py (the products may associate differently).
    base = make_case(9, 40, 50, 7, dtype, dtype, 8, device="cuda")
    leaves = [t.clone().requires_grad_() for t in base]
    dense = [t.clone().requires_grad_() for t in base]
    dy = torch.randn(9, 40, device="cuda").to(dtype)
    ops.lowrank_linear(*leaves).backward(dy)
    x, V, U, b = dense
    F.linear(F.linear(x, V), U, b).backward(dy)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for a, e in zip(leaves, dense):
        assert a.grad.dtype == e.grad.dtype
        torch.testing.assert_close(a.grad, e.grad, rtol=tol, atol=tol * e.grad.abs().max().item())


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_checks_devices():
    x, V, U, bias = make_case(4, 8, 32, 3, torch.bfloat16, torch.bfloat16, 0, device="cuda")
    with pytest.raises(RuntimeError, match="V must be on cuda"):
        ops.lowrank_linear(x, V.cpu(), U)
    with pytest.raises(RuntimeError, match="U must be on cuda"):
        ops.lowrank_linear(x, V, U.cpu())
    with pytest.raises(RuntimeError, match="bias must be on cuda"):
        ops.lowrank_linear(x, V, U, bias.cpu())
    with pytest.raises(RuntimeError, match="V must be on cpu"):
        ops.lowrank_linear(x.cpu(), V, U.cpu())


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_rank_limit(monkeypatch):
    # Only the opt-in fused kernel bounds the rank; the default two GEMMs take any.
    r = MAX_R[torch.bfloat16] + 1
    x, V, U, _ = make_case(2, 8, 16, r, torch.bfloat16, None, 0, device="cuda")
    assert_accurate(ops.lowrank_linear(x, V, U), x, V, U, None)
    monkeypatch.setenv("TORCHSLIM_CUDA_OPT_IN", "lowrank_fused")
    with pytest.raises(RuntimeError, match=f"r={r} exceeds 2048"):
        ops.lowrank_linear(x, V, U)


@pytest.mark.gpu
@needs_cuda
def test_cuda_op_under_torch_compile():
    x, V, U, bias = make_case(33, 64, 96, 12, torch.bfloat16, torch.bfloat16, 6, device="cuda")

    def f(x):
        return torch.relu(ops.lowrank_linear(x, V, U, bias)) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
