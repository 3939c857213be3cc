"""INT8 W8A8 GEMM for the CUDA path of ``torchslim::int8_linear``.

``int8_matmul_dequant`` computes ``(a_q @ b_q.T) * a_scale[:, None] * b_scale[None, :] + bias`` with
the product accumulated exactly in int32 and the dequantization, bias and cast to the output dtype
fused into the GEMM epilogue, so the int32 accumulator never goes to memory.

Shapes: a_q (M, K) int8 (quantized activations, one scale per row), b_q (N, K) int8 (the weight in
nn.Linear's layout, one scale per output channel). The exact int32 sum needs
127 * 128 * K < 2**31 (activations in [-127, 127]; a weight may hold -128), i.e. K <= 132_104.

Quantization itself is not done here: the op quantizes x with ``torchslim::quantize_per_token``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._configs import tile_config, to_time

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Largest K for which sum_k q_a * q_b cannot leave int32 (|q_a| <= 127; q_b may be -128).
MAX_K = (2**31 - 1) // (127 * 128)
# Rows at or below this count are decode-style GEMVs: they get their own tiles (see _CONFIGS).
SMALL_M = 16


# Few configs on purpose: every one is benchmarked for each new (M bucket, N, K).
# Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K bytes; a config that does not fit the
# device (e.g. the 144 KiB Hopper tile on a 100 KiB consumer Ampere part) fails to compile and
# the autotuner scores it as infinitely slow, so listing it is harmless there.
_CONFIGS = [
    # Hopper (wgmma wants BLOCK_M >= 64 and 4-warp groups; 228 KiB smem allows deep 128-wide K).
    tile_config(128, 256, 128, 3, 8),
    tile_config(128, 128, 128, 4, 8),
    # Ampere (A100: 164 KiB smem, mma.sync m16n8k32) and the fallback that fits everywhere.
    tile_config(128, 128, 64, 4, 4),
    # Mid-size M or narrow N: twice the CTAs of the 128x128 tile so small grids still fill the SMs.
    tile_config(64, 128, 128, 4, 4),
    # Decode (M <= 16): the weight stream is the whole cost, so long K steps and narrow N tiles
    # that give enough CTAs to keep every SM loading (N=4096 / 32 = 128 CTAs on 132 SMs).
    tile_config(16, 32, 256, 5, 4),
    tile_config(16, 64, 256, 4, 4),
]


def _prune_configs(configs, named_args, **kwargs):
    # Decode tiles waste 7/8 of a 128-row tile's work at M <= 16, and 16-row tiles re-read the
    # weight M / 16 times at large M: never spend autotuning time on either mismatch.
    small = named_args["M_BUCKET"] <= SMALL_M
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] <= SMALL_M) == small]
    return to_time(kept or configs)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _int8_matmul_dequant_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
    M, N, K,
    M_BUCKET,  # only read by the autotuner's key: tuning per power-of-two M, not per exact M
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M consecutive programs share one weight column block, so the
    # weight tile they all read is still in L2 for the later ones.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: M * K or N * K beyond 2**31 bytes would wrap an int32 offset.
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    # The weight tile is loaded as (BLOCK_K, BLOCK_N) straight from the (N, K) layout: K stays the
    # contiguous axis of both operands, which is what 8-bit MMA instructions require.
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Out-of-range rows, channels and the K tail load as 0, which adds nothing to the sum.
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue, in float32 in the same order as the CPU kernels: acc * (a_scale * b_scale) + bias.
    # A NaN activation scale (a row with NaN/Inf) has q = 0 and turns its whole row into NaN.
    # Where a row scale times a channel scale leaves float32's normal range (overflow: 0 * Inf would
    # turn a true 0 into NaN; underflow to a subnormal or 0: precision), the tile takes the
    # epilogue in float64, where the product of two float32 values is exact (as the CPU kernels
    # do). The test reads the products themselves, so it needs nothing from the host; the branch is
    # taken per tile at run time, and real activations never take it.
    a_s = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    b_s = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        # Bias is read in its own dtype and widened here: no separate cast kernel per call.
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s = a_s[:, None] * b_s[None, :]
    s_mag = tl.abs(s)
    lost = (a_s[:, None] != 0) & (b_s[None, :] != 0) & (s_mag < 1.1754943508222875e-38)  # FLT_MIN
    wide = (s_mag == float("inf")) | lost  # NaN a_s (NaN rows) stays on the float32 path: NaN out
    if tl.max(tl.max(wide.to(tl.int32), axis=1), axis=0) > 0:
        s64 = a_s.to(tl.float64)[:, None] * b_s.to(tl.float64)[None, :]
        out = (acc.to(tl.float64) * s64 + bias.to(tl.float64)[None, :]).to(tl.float32)
    else:
        # One rounding for the product and the bias, as the CPU kernels' fma.
        out = tl.fma(acc.to(tl.float32), s, bias[None, :])
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# EVEN_K drops the K mask from the inner loop; it depends on the config's BLOCK_K, so it is
# computed per launch, under the autotuner.
_kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
    _int8_matmul_dequant_kernel)
_kernel_autotuned = triton.autotune(
    configs=_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs},
)(_kernel)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_int8_matmul_dequant_kernel, InterpretedFunction)


# What runs where there is nothing to tune: the Triton interpreter (CPU tensors, tests).
# Small blocks keep an interpreter program cheap and give tiny shapes several programs and K steps.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}


def int8_matmul_dequant(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``(a_q @ b_q.T) * a_scale[:, None] * b_scale[None, :] + bias`` in out_dtype, int32-exact GEMM.

    a_q: (M, K) int8; a_scale: (M,) float32; b_q: (N, K) int8; b_scale: (N,) float32;
    bias: (N,) float32|bfloat16|float16, or None; out_dtype: float32|bfloat16|float16.
    Returns a new contiguous (M, N) tensor of out_dtype on a_q's device.

    a_q and b_q may have any strides; scales and bias must be contiguous. Tensors are CUDA tensors,
    or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1). ``config`` fixes the block
    sizes (keys of INTERPRETER_CONFIG plus optionally num_warps/num_stages) instead of autotuning.
    """
    op = "int8_matmul_dequant"
    for name, t in (("a_q", a_q), ("b_q", b_q)):
        if t.dim() != 2 or t.dtype != torch.int8:
            raise ValueError(f"{op}: {name} must be a 2-D int8 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    M, K = a_q.shape
    N = b_q.shape[0]
    if b_q.shape[1] != K:
        raise ValueError(f"{op}: a_q has K={K} but b_q has K={b_q.shape[1]}")
    if K > MAX_K:
        raise ValueError(f"{op}: K={K} exceeds {MAX_K}, beyond which the int32 accumulator can overflow")
    for name, t, n in (("a_scale", a_scale, M), ("b_scale", b_scale, N)):
        if t.dtype != torch.float32 or t.shape != (n,) or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous float32 tensor of shape ({n},), "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    if bias is not None and (bias.dtype not in _FLOATS or bias.shape != (N,) or not bias.is_contiguous()):
        raise ValueError(f"{op}: bias must be a contiguous float32, bfloat16 or float16 tensor of shape "
                         f"({N},), got {bias.dtype} of shape {tuple(bias.shape)}")
    if out_dtype not in _FLOATS:
        raise ValueError(f"{op}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    device = a_q.device
    others = [("a_scale", a_scale), ("b_q", b_q), ("b_scale", b_scale)] + ([("bias", bias)] if bias is not None else [])
    for name, t in others:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but a_q is on {device}")
    if device.type == "cpu":
        if not _interpreted():
            raise ValueError(f"{op}: CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 "
                             "before triton is imported); on CPU use torch.ops.torchslim.int8_linear")
    elif device.type != "cuda":
        raise ValueError(f"{op}: tensors must be on a CUDA device, got {device}")

    out = torch.empty((M, N), dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return out
    # Triton never dereferences the pointer of a disabled branch; any tensor fills the slot.
    bias_arg = bias if bias is not None else b_scale
    args = (a_q, b_q, a_scale, b_scale, bias_arg, out, M, N, K, triton.next_power_of_2(M),
            a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), out.stride(0), out.stride(1))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if config is None and device.type == "cpu":
        config = INTERPRETER_CONFIG
    if config is None:
        # Triton launches on the current device's current stream: make that a_q's device.
        with torch.cuda.device(device):
            _kernel_autotuned[grid](*args, HAS_BIAS=bias is not None)
    elif device.type == "cuda":
        with torch.cuda.device(device):
            _kernel[grid](*args, HAS_BIAS=bias is not None, **config)
    else:
        _kernel[grid](*args, HAS_BIAS=bias is not None, **config)
    return out
