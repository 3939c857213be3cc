"""Fused low-rank GEMM for the CUDA path of ``torchslim::lowrank_linear``.

``lowrank_matmul`` computes ``(x @ V.T) @ U.T + bias`` for a rank-r factorization of an (N, K)
weight, V (r, K) and U (N, r), with the numerics of two F.linear calls: the intermediate
t = x V^T is accumulated in float32 and rounded to x's dtype, then out = t U^T is accumulated in
float32, the bias (already in x's dtype) added in float32, and the sum rounded once to the output
dtype. float32 x multiplies with IEEE-exact float32 products (no TF32).

Design. Program (i, s) of the grid (cdiv(M, BLOCK_M), S) owns the BLOCK_M rows i of x and the s-th
of S contiguous ranges of BLOCK_N-wide output column blocks.
  phase 1: t (BLOCK_M, BLOCK_R) = x_tile V^T, a tl.dot per BLOCK_K step over all of K, float32
           accumulator, then rounded to x's dtype. BLOCK_R = next_power_of_2(r) (>= 16, the
           smallest MMA dimension); t's padding ranks r .. BLOCK_R are set to zero.
  phase 2: for each column block of its range: out = tl.dot(t, U_block^T) + bias, stored.
t never leaves the chip: accumulated in registers, then (rounded) staged once in shared memory, from
where every phase 2 dot reads it as its A operand, as a flash-attention kernel keeps its P tile
(Triton 3.9's TTGIR for sm_90; the kernel's only global store is the output's, which the tests check).
t needs the whole K reduction before it can be rounded, so no two programs can share the work of one
t tile without a round trip through global memory: every program of a row block computes its own t.

SPLIT_N (S) is the main tuning knob. A program costs about BLOCK_M r (K + N / S) multiply-adds,
and streams r K + r N / S weight elements (V from L2 after the first reader). So
  - S = 1: no recomputation, but only cdiv(M, BLOCK_M) programs: at M = 512 and BLOCK_M = 64 that
    is 8 busy SMs of 132;
  - larger S: S times as many programs, each shorter, but the grid as a whole computes t S times
    (total work M r (S K + N) instead of M r (K + N)) and reads V S times per row block from L2.
The launcher never picks S by a formula: the autotuner times S in {1, 4, 16} (capped at the number
of column blocks) per (M bucket, N, K, r). At decode (one row block) a program's phase 1 streams all
of V through one SM, which bounds the kernel below by r K * 2 bytes / (one SM's bandwidth) whatever
S is: the fused kernel saves a launch and the t round trip, and wins only where those matter (small
layers, small M); on large layers two cuBLAS GEMMs can be faster. bench/gpu/bench_lowrank_linear_gpu.py
measures both.

Registers and shared memory bound the rank. The phase 1 accumulator is BLOCK_M x BLOCK_R float32
values spread over the program's threads, and BLOCK_M >= 16 (mma.sync's row tile): at BLOCK_R = 2048
that is 128 registers a thread with 16 warps, and V's (2048, 16) and U's (16, 2048) tiles take 64 KiB
each per pipeline stage; ptxas then reports 8 bytes of spill stores. So MAX_R = 2048 for 16-bit x: a
larger rank would spill the accumulator itself. float32 x (FMA dots, operands in registers, 4-byte
tiles) stops at 1024: at 2048 V's and U's tiles alone exceed Hopper's 227 KiB of shared memory. A
larger rank is an error, not a slow path. r >= N K / (N + K) (2048 for a 4096 x 4096 layer) stores
more weight than the dense layer anyway: no compression. The tiles (_PREFILL, _DECODE, _F32) shrink
as r grows: BLOCK_M to bound the accumulator, BLOCK_K and BLOCK_N to bound the pipeline stages.

Under the Triton interpreter (CPU tensors, tests) bfloat16 tiles are multiplied in float32 (its
bfloat16 dot is wrong; float32 products of bfloat16 values are exact, the tensor cores' numerics) and
float32 -> bfloat16 roundings are done by hand to nearest even (its cast truncates), so interpreted
bfloat16 results are rounded as compiled ones are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._configs import to_time

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Rows at or below this count are decode-style: they get 16-row tiles (see _DECODE).
SMALL_M = 16
# Column-range counts the autotuner tries (see the module docstring's SPLIT_N paragraph).
SPLITS = (1, 4, 16)


def block_r(r: int) -> int:
    """The padded rank the kernel computes with: a power of two, >= 16 (tl.dot's smallest size)."""
    return max(16, triton.next_power_of_2(r))


# The autotuner's tiles, per padded rank BLOCK_R and kind of call, as (BLOCK_M, BLOCK_N, BLOCK_K,
# num_warps, num_stages); each is tried with every SPLITS value. At most two tiles per case on
# purpose: every one is benchmarked for each new (M bucket, N, K, r). After each tile: the registers a
# thread uses (ptxas for sm_90a via Triton 3.9, bfloat16 x, float32 in _F32; no spills but where noted).
#   - The phase 1 accumulator, BLOCK_M * BLOCK_R float32 values, takes <= 64 registers a thread in
#     most tiles and <= 128 in all; the rest is for operand tiles and the phase 2 accumulator.
#   - A pipeline stage holds V's (BLOCK_R, BLOCK_K) and x's tiles in phase 1 and U's (BLOCK_N,
#     BLOCK_R) tile in phase 2: ~32-64 KiB in 16 bits, so the stages fit Hopper's 227 KiB.
#   - prefill (M > 16): the tallest tiles the accumulator allows, wgmma (64-row multiples) up to
#     BLOCK_R = 512, mma.sync beyond; decode (M <= 16): 16-row tiles (anything taller is wasted) and
#     deep pipelines, as phase 1 streams all of V through one SM.
_PREFILL = {
    128: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3)],   # 189, 218 (BLOCK_R = 16 .. 64 too: 128-132)
    256: [(128, 64, 64, 8, 3), (64, 32, 32, 8, 3)],     # 187, 104
    512: [(64, 32, 32, 8, 3), (32, 32, 32, 8, 3)],      # 169, 136
    1024: [(32, 16, 16, 16, 2), (16, 32, 32, 8, 3)],    # 124, 193
    2048: [(16, 16, 16, 16, 2), (16, 16, 16, 8, 2)],    # 128, 255 (both 8 bytes of spill stores)
}
_DECODE = {
    128: [(16, 128, 128, 4, 4), (16, 64, 64, 4, 3)],    # 167, 96 (BLOCK_R = 16 .. 64 too: fewer)
    256: [(16, 64, 64, 4, 4), (16, 32, 64, 4, 3)],      # 168, 108
    512: [(16, 32, 32, 4, 4), (16, 16, 32, 4, 3)],      # 182, 150
    1024: [(16, 16, 16, 8, 3), (16, 32, 32, 8, 3)],     # 137, 193
    2048: _PREFILL[2048],
}
# float32 x: IEEE products have no tensor-core instruction, so tl.dot runs on FMAs with both operand
# tiles in registers: smaller tiles, 16-wide K steps. At BLOCK_R = 2048 V's and U's tiles alone take
# 2 x 128 KiB of shared memory, more than Hopper has: hence the lower MAX_R of float32.
_F32 = {
    128: [(64, 64, 16, 8, 2), (16, 32, 16, 4, 2)],      # 208, 80 (BLOCK_R = 16 .. 64 too: fewer)
    256: [(32, 64, 16, 8, 2), (16, 16, 16, 4, 2)],      # 234, 162
    512: [(16, 16, 16, 8, 2), (32, 16, 16, 8, 2)],      # 161, 254
    1024: [(16, 16, 16, 8, 1)],                         # 254
}
_TABLES = {"prefill": _PREFILL, "decode": _DECODE, "f32": _F32}
# The largest rank per x dtype: beyond it the tiles above would spill their accumulator or overflow
# shared memory (see the module docstring).
MAX_R = {torch.bfloat16: 2048, torch.float16: 2048, torch.float32: 1024}
_CONFIGS = {
    (kind, 2**p): [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_N": s},
                                 num_warps=w, num_stages=st)
                   for bm, bn, bk, w, st in table[max(128, 2**p)] for s in SPLITS]
    for kind, table in _TABLES.items() for p in range(4, 12) if 2**p <= max(table)
}


def _kind(dtype: torch.dtype, m_bucket: int) -> str:
    return "f32" if dtype == torch.float32 else ("decode" if m_bucket <= SMALL_M else "prefill")


def _ranges(N: int, block_n: int, split: int) -> int:
    """How many column ranges a split asks for becomes: ceil-divide the blocks, then count the
    ranges, so that none is empty."""
    n_blocks = triton.cdiv(N, block_n)
    return triton.cdiv(n_blocks, triton.cdiv(n_blocks, min(split, n_blocks)))


def _prune_configs(configs, named_args, **kwargs):
    # Only the tiles made for this rank and kind of call, and each grid once: splits beyond the
    # column blocks launch the same ranges as a smaller one.
    kept = _CONFIGS[(_kind(named_args["x_ptr"].dtype, named_args["M_BUCKET"]), block_r(named_args["R"]))]
    out, seen = [], set()
    for c in kept:
        kw = c.kwargs
        key = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages,
               _ranges(named_args["N"], kw["BLOCK_N"], kw["SPLIT_N"]))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return to_time(out)


@triton.jit
def _to_bf16_rne(v):
    # float32 -> bfloat16 rounded to nearest even with integer operations (the interpreter's own
    # cast truncates): add half an ulp (minus one on an even tie) and keep the high 16 bits; the
    # carry is what rounds up, into the exponent too (max float -> inf, as the cast does). NaN is
    # passed through untouched (the add could turn a NaN payload into an infinity).
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(v != v, bits, bits + 0x7FFF + ((bits >> 16) & 1))
    return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round(v, dtype: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    if RNE_BY_HAND:
        return _to_bf16_rne(v)
    return v.to(dtype)


@triton.jit(do_not_specialize=["M_BUCKET", "SPLIT_N"])
def _lowrank_linear_kernel(
    x_ptr, v_ptr, u_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    M_BUCKET,  # only read by the autotuner's key: tuning per power-of-two M, not per exact M
    stride_xm, stride_xk, stride_vr, stride_vk, stride_un, stride_ur, stride_cm, stride_cn,
    SPLIT_N,  # a config value read only by the grid: the kernel takes its range from tl.num_programs(1)
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    # int64 row offsets: M * K, r * K or N * r beyond 2**31 elements would wrap an int32 offset.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = v_ptr + offs_r.to(tl.int64)[:, None] * stride_vr + offs_k[None, :] * stride_vk

    # Phase 1: t = x_tile V^T over all of K.
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:  # K is a multiple of BLOCK_K: only rows (of x) and ranks (of V) are masked
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=mask_r[:, None], other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            v = tl.load(v_ptrs, mask=mask_r[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if DOT_F32:
            # The interpreter's bfloat16 dot is wrong; float32 products of bfloat16 values are exact.
            t = tl.dot(a.to(tl.float32), tl.trans(v.to(tl.float32)), t, input_precision="ieee")
        elif IEEE:
            t = tl.dot(a, tl.trans(v), t, input_precision="ieee")  # float32 x: no TF32 rounding
        else:
            t = tl.dot(a, tl.trans(v), t)
        x_ptrs += BLOCK_K * stride_xk
        v_ptrs += BLOCK_K * stride_vk
    # Ranks r .. BLOCK_R are padding: V's rows there read as zero, but Inf in x times those zeros is
    # NaN, which would reach every output of the row through the phase 2 dot. Zero them for good.
    t = tl.where(mask_r[None, :], t, 0.0)
    # As the first of two F.linear calls returns it: in x's dtype (a no-op for float32).
    t = _round(t, x_ptr.dtype.element_ty, RNE_BY_HAND)
    if DOT_F32:
        t = t.to(tl.float32)  # exact: the values are bfloat16 already

    # Phase 2: this program's range of output column blocks, each out = t U_block^T + bias.
    n_blocks = tl.cdiv(N, BLOCK_N)
    per_program = tl.cdiv(n_blocks, tl.num_programs(1))
    first = pid_s * per_program
    last = tl.minimum(first + per_program, n_blocks)
    offs_c = tl.arange(0, BLOCK_N)
    c_rows = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm
    for nb in range(first, last):
        offs_n = nb * BLOCK_N + offs_c
        mask_n = offs_n < N
        u_ptrs = u_ptr + offs_n.to(tl.int64)[:, None] * stride_un + offs_r[None, :] * stride_ur
        # Ranks r .. BLOCK_R of U read as zero (the memory past r columns may hold anything, NaN too).
        u = tl.load(u_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(t, tl.trans(u.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            acc = tl.dot(t, tl.trans(u), input_precision="ieee")
        else:
            acc = tl.dot(t, tl.trans(u))
        # The bias (already rounded to x's dtype by the caller, as F.linear adds it) in float32,
        # then one rounding to the output dtype.
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_rows + offs_n[None, :] * stride_cn
        out = _round(acc, c_ptr.dtype.element_ty, RNE_BY_HAND and c_ptr.dtype.element_ty == tl.bfloat16)
        tl.store(c_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


# EVEN_K drops the K masks from phase 1; it depends on the config's BLOCK_K, so it is computed per
# launch, under the autotuner. BLOCK_R follows from r alone.
_kernel = triton.heuristics({
    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
    "BLOCK_R": lambda args: block_r(args["R"]),
})(_lowrank_linear_kernel)
_kernel_autotuned = triton.autotune(
    configs=[c for cs in _CONFIGS.values() for c in cs], key=["M_BUCKET", "N", "K", "R"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_kernel)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lowrank_linear_kernel, InterpretedFunction)


# What runs where there is nothing to tune: the Triton interpreter (CPU tensors, tests). Small blocks
# keep an interpreter program cheap; SPLIT_N = 2 makes tiny shapes exercise the column ranges.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_N": 2}


def _grid(M, N):
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), _ranges(N, meta["BLOCK_N"], meta["SPLIT_N"]))
    return grid


def _describe(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def lowrank_matmul(
    x: torch.Tensor,
    V: torch.Tensor,
    U: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``(x @ V.T) @ U.T + bias`` in out_dtype (default x.dtype), t = x @ V.T rounded to x's dtype.

    x: (M, K) float32|bfloat16|float16; V: (r, K) and U: (N, r) of x's dtype, r <= MAX_R[x.dtype]
    (2048 for bfloat16 and float16, 1024 for float32);
    bias: (N,) of x's dtype (round it first, as F.linear adds it), contiguous, or None; out_dtype:
    x's dtype or float32 (the float32 result before the final rounding, for tests). Returns a new
    contiguous (M, N) tensor on x's device. r = 0 or K = 0 gives the bias (or zeros) in every row.

    x, V and U may have any strides. Tensors are CUDA tensors, or CPU tensors under the Triton
    interpreter (TRITON_INTERPRET=1). ``config`` fixes the blocks (the keys of INTERPRETER_CONFIG:
    BLOCK_M, BLOCK_N, BLOCK_K powers of two >= 16, SPLIT_N >= 1; optionally num_warps/num_stages)
    instead of autotuning; BLOCK_R always follows from r.
    """
    op = "lowrank_matmul"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x must be a 2-D float32, bfloat16 or float16 tensor, got {_describe(x)}")
    M, K = x.shape
    if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.dtype != x.dtype or V.shape[1] != K:
        raise ValueError(f"{op}: V must be a 2-D (r, {K}) tensor of x's dtype {x.dtype}, got {_describe(V)}")
    r = V.shape[0]
    if not isinstance(U, torch.Tensor) or U.dim() != 2 or U.dtype != x.dtype or U.shape[1] != r:
        raise ValueError(f"{op}: U must be a 2-D (N, {r}) tensor of x's dtype {x.dtype}, got {_describe(U)}")
    N = U.shape[0]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype or bias.shape != (N,)
                             or not bias.is_contiguous()):
        raise ValueError(f"{op}: bias must be a contiguous tensor of x's dtype {x.dtype} and shape ({N},), "
                         f"got {_describe(bias)}")
    if r > MAX_R[x.dtype]:
        raise ValueError(f"{op}: r={r} exceeds {MAX_R[x.dtype]}, the largest rank this kernel supports for "
                         f"{x.dtype} x (its (rows, r) float32 intermediate must stay on chip)")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{op}: out_dtype must be x's dtype {x.dtype} or float32, got {out_dtype}")
    device = x.device
    for name, t in [("V", V), ("U", U)] + ([("bias", bias)] if bias is not None else []):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")
    if device.type == "cpu":
        if not _interpreted():
            raise ValueError(f"{op}: CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 "
                             "before triton is imported); on CPU use torch.ops.torchslim.lowrank_linear")
    elif device.type != "cuda":
        raise ValueError(f"{op}: tensors must be on a CUDA device, got {device}")
    if config is not None:
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            b = config.get(key, 0)
            if not isinstance(b, int) or b < 16 or b & (b - 1):
                raise ValueError(f"{op}: config {key} must be a power of two >= 16, got {b}")
        split = config.get("SPLIT_N", 0)
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"{op}: config SPLIT_N must be an integer >= 1, got {split}")

    out = torch.empty((M, N), dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return out
    if K == 0 or r == 0:  # t is empty or zero: every row is the bias
        if bias is not None:
            out.copy_(bias.expand(M, N))
        else:
            out.zero_()
        return out
    # Triton never dereferences the pointer of a disabled branch; any tensor fills the slot.
    bias_arg = bias if bias is not None else U
    args = (x, V, U, bias_arg, out, M, N, K, r, triton.next_power_of_2(M),
            x.stride(0), x.stride(1), V.stride(0), V.stride(1), U.stride(0), U.stride(1),
            out.stride(0), out.stride(1))
    bf16_interpreted = x.dtype == torch.bfloat16 and device.type == "cpu"
    flags = dict(HAS_BIAS=bias is not None, DOT_F32=bf16_interpreted, IEEE=x.dtype == torch.float32,
                 RNE_BY_HAND=bf16_interpreted)
    if config is None and device.type == "cpu":
        config = INTERPRETER_CONFIG
    if config is None:
        # Triton launches on the current device's current stream: make that x's device.
        with torch.cuda.device(device):
            _kernel_autotuned[_grid(M, N)](*args, **flags)
        return out
    if device.type == "cuda":
        with torch.cuda.device(device):
            _kernel[_grid(M, N)](*args, **flags, **config)
    else:
        _kernel[_grid(M, N)](*args, **flags, **config)
    return out
