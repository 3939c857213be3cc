"""GPU benchmark: torchslim::int8_linear (per-token quantization + Triton int8 GEMM with fused
dequant) against what a user would otherwise run, side by side in one process on the same inputs.

  ours       torch.ops.torchslim.int8_linear(x, w_q, w_scale, bias)     quantization included
  gemm       the Triton GEMM alone on pre-quantized x (int8_matmul_dequant): ours minus quantization
  bf16       F.linear(x, W, b) in bfloat16                               cuBLAS
  intmm      per-token quantization in torch ops, torch._int_mm, dequant + bias in torch ops
  sm90       the opt-in CUTLASS sm_90a GEMM (quantize_per_token + _int8_gemm_sm90), M >= 64, where built
  decode     the opt-in one-launch decode kernel (_int8_linear_decode), M <= 16, where built

x is bfloat16 throughout. Times are per-call GPU (device) times from CUDA events, medians (20th /
80th percentiles in the JSON), measured after a warm-up while a sleep kernel holds the GPU so that
the host queues every timed call ahead of it (gpu_bench_common.gpu_times_us): each time spans the
call's kernels only, not the host's dispatch of the call, which at small M takes longer than the
kernels. Each method cycles through copies of its weight (ours, gemm, intmm: one int8 weight copy +
scale per call; bf16: one bf16 weight copy per call), as many as exceed twice the L2 in int8 bytes
(capped at MAX_COPIES), so small-M cases stream the weight from HBM as they would in a model.
`b2b` is ours called back to back over the same copies, wall clock, host overhead included: at M=1
it shows the per-call cost of the Python dispatch, which CUDA graphs would remove.
Ratios are speedups t(baseline) / t(ours): > 1 means ours is faster.

    python bench/gpu/bench_int8_linear_gpu.py            # all shapes (~1-2 min on an H200)
    python bench/gpu/bench_int8_linear_gpu.py --quick    # two shapes, two M
    python bench/gpu/bench_int8_linear_gpu.py --cpu-dry-run  # the script itself, without a GPU (TRITON_INTERPRET=1)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench_common import (  # noqa: E402
    Rotating, back_to_back_us, case_list, copies_for, device_info, err_cell, finish, fmt, result_header,
    run_cases, start, text_table, time_method,
)

SHAPES = [(384, 1536), (1536, 384), (768, 3072), (4096, 4096), (11008, 4096)]  # (N, K)
MS = [1, 16, 128, 512, 2048]
QUICK_SHAPES = [(384, 1536), (4096, 4096)]
QUICK_MS = [1, 512]
METHODS = ["ours", "gemm", "bf16", "intmm", "sm90", "decode"]
# Enough copies that even the smallest shape's (384 x 1536 int8 + scales, 0.6 MB) exceed twice a 60 MiB L2
# (an H100 / H200 has 50 MB).
MAX_COPIES = 256


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8, the format Int8Linear stores."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def intmm_linear(x: torch.Tensor, w_q_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor,
                 pad_to: int) -> torch.Tensor:
    """What a user writes with stock torch: quantize per token, torch._int_mm, dequantize."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(xf / s.clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
    M = q.shape[0]
    if pad_to > M:  # torch._int_mm rejects small M on CUDA; padding rows is the usual workaround
        q = F.pad(q, (0, 0, 0, pad_to - M))
    acc = torch._int_mm(q, w_q_t)[:M]
    return (acc.float() * s * w_scale + bias.float()).to(x.dtype)


def intmm_pad_rows(M: int, K: int, N: int, device) -> int:
    """0 when torch._int_mm takes M rows as they are, else the padded row count that it takes."""
    for rows in (M, 17, 32):
        if rows < M:
            continue
        try:
            torch._int_mm(torch.zeros(rows, K, dtype=torch.int8, device=device),
                          torch.zeros(N, K, dtype=torch.int8, device=device).t())
            return 0 if rows == M else rows
        except RuntimeError:
            continue
    raise RuntimeError(f"torch._int_mm accepts no padding of M={M} for K={K}, N={N}")


def bench_case(N: int, K: int, M: int, rep_ms: float, dev: torch.device, timer) -> dict:
    from torchslim import reference
    from torchslim.triton_kernels.int8_linear import int8_matmul_dequant

    g = torch.Generator(device=dev).manual_seed(N * 7 + K * 3 + M)
    x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(torch.bfloat16)
    bias = (torch.randn(N, device=dev, generator=g) * 0.1).to(torch.bfloat16)
    w_q, w_scale = quantize_weight(w)
    q_ref, s_ref = reference.quantize_per_token(x)
    # One int8 weight copy + scale per call (bf16: one bf16 weight copy per call), as many as exceed
    # twice the L2 in int8 bytes.
    copies = copies_for(w_q.numel() * w_q.element_size() + w_scale.numel() * w_scale.element_size(), dev,
                        MAX_COPIES)

    case: dict = {"N": N, "K": K, "M": M, "weight_copies": copies, "us": {}, "errors": {}, "rel_err": {}}
    pad = 0
    try:
        pad = intmm_pad_rows(M, K, N, dev)
    except RuntimeError as e:
        case["errors"]["intmm"] = str(e)
    case["intmm_padded_rows"] = pad

    op = torch.ops.torchslim.int8_linear.default
    builders = {
        "ours": lambda: (lambda wq=w_q.clone(), ws=w_scale.clone(): op(x, wq, ws, bias)),
        "gemm": lambda: (lambda wq=w_q.clone(), ws=w_scale.clone():
                         int8_matmul_dequant(q_ref, s_ref, wq, ws, bias, torch.bfloat16)),
        "bf16": lambda: (lambda wc=w.clone(): F.linear(x, wc, bias)),
        "intmm": lambda: (lambda wq=w_q.clone(), ws=w_scale.clone(): intmm_linear(x, wq.t(), ws, bias, pad)),
    }
    # The opt-in CUDA kernels, called directly (the op takes them only when TORCHSLIM_CUDA_OPT_IN names them).
    from torchslim._cuda_registration import INT8_SM90_MIN_M, has_cuda_kernel

    if dev.type == "cuda" and M >= INT8_SM90_MIN_M and has_cuda_kernel("_int8_gemm_sm90"):
        quant, gemm = torch.ops.torchslim.quantize_per_token.default, torch.ops.torchslim._int8_gemm_sm90.default
        builders["sm90"] = lambda: (lambda wq=w_q.clone(), ws=w_scale.clone():
                                    gemm(*quant(x), wq, ws, bias, torch.bfloat16))
    if dev.type == "cuda" and M <= 16 and has_cuda_kernel("_int8_linear_decode"):
        decode = torch.ops.torchslim._int8_linear_decode.default
        builders["decode"] = lambda: (lambda wq=w_q.clone(), ws=w_scale.clone(): decode(x, wq, ws, bias))
    # Float64 references: the quantized model's exact output (ours, gemm, intmm approximate it)
    # and the unquantized bf16 layer's (what bf16 approximates).
    ref_q = (q_ref.double() @ w_q.double().T) * (s_ref.double()[:, None] * w_scale.double()[None, :]) + bias.double()
    ref_dense = x.double() @ w.double().T + bias.double()
    fns = {}
    for name, build in builders.items():
        if name in case["errors"]:
            continue
        fns[name] = time_method(case, name, lambda: Rotating([build() for _ in range(copies)]),
                                ref_dense if name == "bf16" else ref_q, rep_ms, dev, timer)
    if fns.get("ours") is not None:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours"], dev)
    return case


def table(cases: list[dict]) -> str:
    head = ["N", "K", "M", "ours us", "gemm us", "bf16 us", "intmm us", "bf16/ours", "intmm/ours",
            "opt-in us", "bf16/opt-in", "b2b us", "err ours"]
    rows = []
    for c in cases:
        us = c["us"]
        o = us.get("ours")
        r = lambda b: (us[b] / o) if (o and b in us) else None  # noqa: E731
        intmm = fmt(us.get("intmm")) + ("*" if c.get("intmm_padded_rows") else "")
        opt = us.get("sm90", us.get("decode"))  # the opt-in kernel of this M, if built
        rows.append([str(c["N"]), str(c["K"]), str(c["M"]), fmt(o), fmt(us.get("gemm")), fmt(us.get("bf16")),
                     intmm, fmt(r("bf16"), 2), fmt(r("intmm"), 2), fmt(opt),
                     fmt(us["bf16"] / opt if opt and "bf16" in us else None, 2), fmt(c.get("ours_back_to_back_us")),
                     err_cell(c, "ours")])
    return text_table(head, rows)


def main(argv=None) -> int:
    started = start(__doc__, "int8_linear", "two shapes, two M", 30, argv,
                    dry_run_help="check this script without a GPU: tiny shapes on CPU tensors through the Triton "
                                 "interpreter (set TRITON_INTERPRET=1); timings are meaningless and ours is the CPU "
                                 "op there")
    if started is None:
        return 2
    args, dev, timer = started

    run = run_cases(case_list(args, SHAPES, MS, QUICK_SHAPES, QUICK_MS), ("N", "K", "M"),
                    lambda N, K, M: bench_case(N, K, M, args.rep_ms, dev, timer), args.budget_s, dev)
    device = device_info(dev, dry_run="cpu (dry run through the Triton interpreter)")
    result = {
        **result_header("int8_linear_gpu", device),
        "timing": "per-call GPU (device) time from CUDA events (median; p20/p80 in us_p20_p80), host queued ahead "
                  "behind a sleep kernel, rotating int8 weight + scale copies (bf16: bf16 weight copies; count in "
                  "weight_copies) beyond twice the L2; ours_back_to_back_us: wall time per call back to back, host "
                  "overhead included; x bfloat16",
        "methods": METHODS, **run,
    }
    return finish(result, args,
                  f"int8_linear on {device['device']} (torch {result['torch']}, triton {result['triton']}), "
                  f"bf16 activations, times in us (GPU device time, weight from HBM); ratios = t(baseline) / t(ours), "
                  f"> 1: ours faster",
                  "gemm: the Triton GEMM alone on pre-quantized x; opt-in: the CUTLASS sm_90a GEMM (M >= 64) or the "
                  "decode kernel (M <= 16) where built; b2b: ours back to back incl. host overhead; "
                  "*: torch._int_mm needed padded rows", table(run["cases"]))


if __name__ == "__main__":
    sys.exit(main())
