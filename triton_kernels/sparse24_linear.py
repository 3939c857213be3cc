"""2:4 sparse GEMM for the CUDA path of ``torchslim::sparse24_linear``.

``sparse24_matmul`` computes ``x @ W.T + bias``, W (N, K) the dense weight of a compressed 2:4 pair
(python/torchslim/formats/sparse24.py): ``values`` (N, K_pad / 2) holds the two kept values of each
group of four columns, ``meta`` (N, K_pad / 16) int16 their in-group positions, one 4-bit nibble per
group (``i0 | i1 << 2``), four groups per word, the first group in the low bits.

Each program reads a (BLOCK_N, BLOCK_K / 2) tile of values and a (BLOCK_N, BLOCK_K / 16) tile of
meta, expands them in registers into the dense (BLOCK_N, BLOCK_K) weight tile and feeds it to
``tl.dot`` with the (BLOCK_M, BLOCK_K) tile of x; the dense weight never exists in global memory.
So a 16-bit weight costs 1.125 bytes per element to read instead of 2: the gain at small M (decode),
where streaming the weight is the whole cost. The dot accumulates in float32 (float32 x with
IEEE-exact float32 products, not TF32); the epilogue adds the bias (already in x's dtype) in float32
and rounds once to the output dtype.

Metadata is not validated here (on CUDA that would need a device sync per call): the layer checks
it when it is built or loaded. Any bit pattern is memory-safe: addresses depend only on the tile
coordinates, never on the metadata, whose nibbles only select, inside their own group of four
columns, which of the group's two loaded values (or zero) each column gets. An invalid nibble
(i0 >= i1) only makes that group's weights wrong (column 4g + p gets the first value where
i0 == p, else the second where i1 == p, else 0), never an out-of-bounds read.

Compiled for sm_90 (Triton 3.9, checked ahead of time by the tests): tl.dot becomes wgmma
(m64n128k16, float32 accumulator) for the 128-row tiles and mma.sync m16n8k16 for the 16-row decode
tiles; the value, meta and x tiles arrive by 16-byte cp.async, software-pipelined. Under the Triton
interpreter bfloat16 tiles are multiplied in float32 (its bfloat16 dot is wrong), which is exact.

Columns K .. K_pad of the padded weight contribute nothing: x is read as zero there and the
expanded weight is zeroed there too, so even NaN/Inf in the padding never reaches an output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._configs import tile_config, to_time

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Rows at or below this count are decode-style GEMVs: they get their own tiles (see _CONFIGS).
SMALL_M = 16
# Columns covered by one int16 meta word (four groups of four).
COLUMNS_PER_WORD = 16


# Few configs on purpose: every one is benchmarked for each new (M bucket, N, K, dtype). BLOCK_K is
# a power of two >= 32 (whole meta words, two or more per row). A config that does not fit the
# device's shared memory fails to compile and the autotuner scores it as infinitely slow.
# Registers per thread (ptxas for sm_90a, Triton 3.9, noted to keep them under 255 without spills).
_CONFIGS = [
    # Prefill: tensor-core tiles (wgmma on Hopper wants BLOCK_M >= 64), the weight tile expanded once
    # per K step and shared by all BLOCK_M rows. 128x128x64 bf16: 142 registers.
    tile_config(128, 128, 64, 3, 8),
    tile_config(128, 64, 64, 4, 4),
    tile_config(64, 128, 64, 4, 4),
    # Decode (M <= 16): the weight stream is the whole cost, so long K steps and narrow N tiles that
    # give enough CTAs to keep every SM loading (N=4096 / 32 = 128 CTAs on 132 SMs). 178 registers.
    tile_config(16, 32, 256, 4, 4),
    tile_config(16, 64, 128, 4, 4),
    tile_config(16, 64, 256, 3, 4),
]
# float32 x: IEEE float32 products have no tensor-core instruction, so tl.dot runs on FMAs with both
# operand tiles in registers; the 16-bit tiles above spill there (or ptxas gives up at 32 registers
# and a large stack), these fit (228-255 registers, no or 16 bytes of spills).
_CONFIGS_F32 = [
    tile_config(64, 64, 32, 3, 8),
    tile_config(32, 64, 32, 3, 4),
    tile_config(16, 64, 32, 3, 4),
    tile_config(16, 32, 64, 3, 4),
]


def _prune_configs(configs, named_args, **kwargs):
    # float32 x takes its own tiles. Decode tiles waste most of a 64/128-row tile's work at M <= 16,
    # and 16-row tiles re-expand the weight M / 16 times at large M: never spend autotuning time on
    # either mismatch.
    f32 = named_args["x_ptr"].dtype == torch.float32
    small = named_args["M_BUCKET"] <= SMALL_M
    kept = [c for c in configs if (c in _CONFIGS_F32) == f32 and (c.kwargs["BLOCK_M"] <= SMALL_M) == small]
    return to_time(kept or [c for c in configs if (c in _CONFIGS_F32) == f32])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _sparse24_matmul_kernel(
    x_ptr, v_ptr, m_ptr, bias_ptr, c_ptr,
    M, N, K, HALF, WORDS,  # HALF = K_pad / 2 (values' columns), WORDS = K_pad / 16 (meta's columns)
    M_BUCKET,  # only read by the autotuner's key: tuning per power-of-two M, not per exact M
    stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_mk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M consecutive programs share one weight column block, so the
    # compressed tile they all read is still in L2 for the later ones.
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
    offs_h = tl.arange(0, BLOCK_K // 2)   # values' columns of one K step
    offs_w = tl.arange(0, BLOCK_K // 16)  # meta's columns of one K step
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: M * K or N * K beyond 2**31 elements would wrap an int32 offset.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = v_ptr + offs_n.to(tl.int64)[:, None] * stride_vn + offs_h[None, :] * stride_vk
    m_ptrs = m_ptr + offs_n.to(tl.int64)[:, None] * stride_mn + offs_w[None, :] * stride_mk

    G: tl.constexpr = BLOCK_K // 4  # groups of four columns per K step
    pos = tl.arange(0, 4)  # a column's position in its group
    zero = tl.zeros((BLOCK_N, G, 4), dtype=v_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K  # columns of x left from this step on (used by the masked steps)
        if EVEN_K:  # K is a multiple of BLOCK_K (so K = K_pad): only rows and channels are masked
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            vals = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
            words = tl.load(m_ptrs, mask=mask_n[:, None], other=0)
        else:
            # The last step may pass K (x reads 0 there) and K_pad (values and meta read 0 there).
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            vals = tl.load(v_ptrs, mask=mask_n[:, None] & (offs_h[None, :] < HALF - k * (BLOCK_K // 2)), other=0.0)
            words = tl.load(m_ptrs, mask=mask_n[:, None] & (offs_w[None, :] < WORDS - k * (BLOCK_K // 16)), other=0)
        # Expansion in registers: (BLOCK_N, BLOCK_K / 2) values + (BLOCK_N, BLOCK_K / 16) words ->
        # the dense (BLOCK_N, BLOCK_K) tile. Column 4g + p of group g takes the group's first value
        # where i0 == p, else its second where i1 == p, else 0: the metadata only drives selects.
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, G, 2)))  # first and second kept value per group
        w32 = words.to(tl.int32) & 0xFFFF
        nib = tl.reshape((w32[:, :, None] >> (pos * 4)[None, None, :]) & 0xF, (BLOCK_N, G))  # group order
        i0 = (nib & 3)[:, :, None]
        i1 = (nib >> 2)[:, :, None]
        dense = tl.where(i0 == pos[None, None, :], v0[:, :, None],
                         tl.where(i1 == pos[None, None, :], v1[:, :, None], zero))
        w = tl.reshape(dense, (BLOCK_N, BLOCK_K))
        if not EVEN_K:
            # The weight's own padding columns K .. K_pad multiply zeros of x; zeroing them too keeps
            # whatever they hold (even NaN or Inf) out of the sum.
            w = tl.where(offs_k[None, :] < k_left, w, tl.zeros_like(w))
        b = tl.trans(w)  # (BLOCK_K, BLOCK_N)
        if DOT_F32:
            # The Triton interpreter's bfloat16 dot is wrong; float32 products of bfloat16 inputs are
            # exact, so this gives the tensor cores' numerics (exact products, float32 sums).
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")  # float32 x: no TF32 rounding of the inputs
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        v_ptrs += (BLOCK_K // 2) * stride_vk
        m_ptrs += (BLOCK_K // 16) * stride_mk

    # Epilogue: the bias (already rounded to x's dtype by the caller, as F.linear adds it) in float32,
    # then one rounding to the output dtype.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# EVEN_K drops the K masks from the inner loop; it depends on the config's BLOCK_K, so it is
# computed per launch, under the autotuner.
_kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_sparse24_matmul_kernel)
_kernel_autotuned = triton.autotune(
    configs=_CONFIGS + _CONFIGS_F32, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune_configs},
)(_kernel)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sparse24_matmul_kernel, InterpretedFunction)


# What runs where there is nothing to tune: the Triton interpreter (CPU tensors, tests).
# Small blocks keep an interpreter program cheap and give tiny shapes several programs and K steps.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in out_dtype (default x.dtype), W the dense (N, K) weight of (values, meta).

    x: (M, K) float32|bfloat16|float16; values: (N, K_pad / 2) of x's dtype; meta: (N, K_pad / 16)
    int16, K_pad = round_up(K, 16); bias: (N,) of x's dtype (round it first, as F.linear adds it),
    contiguous, or None; out_dtype: x's dtype or float32 (the float32 result before the final
    rounding, for tests). Returns a new contiguous (M, N) tensor on x's device. K = 0 gives the bias
    (or zeros) in every row.

    x, values and meta may have any strides. Tensors are CUDA tensors, or CPU tensors under the
    Triton interpreter (TRITON_INTERPRET=1). meta's nibbles are not validated (see the module
    docstring: any bits are memory-safe, invalid ones give wrong numbers for their group).
    ``config`` fixes the block sizes (keys of INTERPRETER_CONFIG plus optionally
    num_warps/num_stages; BLOCK_K a power of two >= 32) instead of autotuning.
    """
    op = "sparse24_matmul"
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x must be a 2-D float32, bfloat16 or float16 tensor, got "
                         f"{getattr(x, 'dtype', type(x))} of shape {tuple(getattr(x, 'shape', ()))}")
    M, K = x.shape
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.dtype != x.dtype:
        raise ValueError(f"{op}: values must be a 2-D tensor of x's dtype {x.dtype}, got "
                         f"{getattr(values, 'dtype', type(values))} of shape {tuple(getattr(values, 'shape', ()))}")
    N = values.shape[0]
    k_pad = -(-K // COLUMNS_PER_WORD) * COLUMNS_PER_WORD
    if values.shape[1] != k_pad // 2:
        raise ValueError(f"{op}: values must have shape ({N}, {k_pad // 2}) for K={K}, got {tuple(values.shape)}")
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int16 or meta.shape != (N, k_pad // COLUMNS_PER_WORD):
        raise ValueError(f"{op}: meta must be an int16 tensor of shape ({N}, {k_pad // COLUMNS_PER_WORD}) for "
                         f"K={K}, got {getattr(meta, 'dtype', type(meta))} of shape {tuple(getattr(meta, 'shape', ()))}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype or bias.shape != (N,)
                             or not bias.is_contiguous()):
        raise ValueError(f"{op}: bias must be a contiguous tensor of x's dtype {x.dtype} and shape ({N},), got "
                         f"{getattr(bias, 'dtype', type(bias))} of shape {tuple(getattr(bias, 'shape', ()))}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{op}: out_dtype must be x's dtype {x.dtype} or float32, got {out_dtype}")
    device = x.device
    others = [("values", values), ("meta", meta)] + ([("bias", bias)] if bias is not None else [])
    for name, t in others:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")
    if device.type == "cpu":
        if not _interpreted():
            raise ValueError(f"{op}: CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 "
                             "before triton is imported); on CPU use torch.ops.torchslim.sparse24_linear")
    elif device.type != "cuda":
        raise ValueError(f"{op}: tensors must be on a CUDA device, got {device}")
    if config is not None:
        bk = config.get("BLOCK_K", 0)
        if bk < 32 or bk & (bk - 1):
            raise ValueError(f"{op}: config BLOCK_K must be a power of two >= 32, got {bk}")

    out = torch.empty((M, N), dtype=out_dtype, device=device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty sum: every row is the bias
        if bias is not None:
            out.copy_(bias.expand(M, N))
        else:
            out.zero_()
        return out
    # Triton never dereferences the pointer of a disabled branch; any tensor fills the slot.
    bias_arg = bias if bias is not None else values
    args = (x, values, meta, bias_arg, out, M, N, K, k_pad // 2, k_pad // COLUMNS_PER_WORD,
            triton.next_power_of_2(M),
            x.stride(0), x.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
            out.stride(0), out.stride(1))
    flags = dict(HAS_BIAS=bias is not None,
                 DOT_F32=x.dtype == torch.bfloat16 and device.type == "cpu",
                 IEEE=x.dtype == torch.float32)

    def grid(meta_):
        return (triton.cdiv(M, meta_["BLOCK_M"]) * triton.cdiv(N, meta_["BLOCK_N"]),)

    if config is None and device.type == "cpu":
        config = INTERPRETER_CONFIG
    if config is None:
        # Triton launches on the current device's current stream: make that x's device.
        with torch.cuda.device(device):
            _kernel_autotuned[grid](*args, **flags)
    elif device.type == "cuda":
        with torch.cuda.device(device):
            _kernel[grid](*args, **flags, **config)
    else:
        _kernel[grid](*args, **flags, **config)
    return out
