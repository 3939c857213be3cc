"""GPU benchmark: torchslim::sparse24_linear (Triton kernel that expands the compressed 2:4 weight in
registers) against what a user would otherwise run, side by side in one process on the same inputs.

  ours_bf16   torch.ops.torchslim.sparse24_linear(x, values, meta, bias)     bfloat16
  ours_fp16   the same in float16
  ours_cslt   ours on cuSPARSELt (the opt-in sparse24_cusparselt path; M >= 128 only), bfloat16
  dense       F.linear(x, W, b) in bfloat16, W the same pruned weight       cuBLAS
  cutlass     F.linear(x, to_sparse_semi_structured(W), b), CUTLASS backend (_FORCE_CUTLASS)
  cusparselt  the same with the cuSPARSELt backend, where torch has it

Every method multiplies the same 2:4-pruned weight (compress.prune_24 of a random matrix). Times are
per-call GPU (device) times from CUDA events, medians (20th / 80th percentiles in the JSON), measured
after a warm-up while a sleep kernel holds the GPU so that the host queues every timed call ahead of
it (gpu_bench_common.gpu_times_us): each time spans the call's kernels only, not the host's dispatch
of the call, which at small M takes longer than the kernels. Each method cycles through copies of its
weight, as many as make the compressed weights (values + metadata) exceed twice the L2 (capped at
MAX_COPIES), so small-M cases stream the weight from HBM as they would in a model. `b2b` is ours_bf16
called back to back over the same rotating copies, wall clock, host overhead included.
Ratios are speedups t(baseline) / t(ours_bf16): > 1 means ours is faster; `semi/ours` takes the
faster of the two semi-structured backends.

    python bench/gpu/bench_sparse24_linear_gpu.py            # all shapes
    python bench/gpu/bench_sparse24_linear_gpu.py --quick    # two shapes, two M
    python bench/gpu/bench_sparse24_linear_gpu.py --cpu-dry-run  # the script itself, without a GPU
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

# (N, K): a 4096 square (Llama-7B's attention projections), Llama-7B's MLP up/gate and down
# projections, then MiniLM / BERT-base layers. Large shapes first: a --budget-s cut drops the small ones.
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (384, 1536), (1536, 384), (768, 3072)]
MS = [1, 16, 128, 512, 2048]
QUICK_SHAPES = [(4096, 4096), (384, 1536)]
QUICK_MS = [1, 512]
METHODS = ["ours_bf16", "ours_fp16", "ours_cslt", "dense", "cutlass", "cusparselt"]
# Enough copies that even the smallest shape's compressed weight (384 x 1536: 0.66 MB) exceeds twice a
# 60 MiB L2 (an H100 / H200 has 50 MB).
MAX_COPIES = 256


def semi_structured(w: torch.Tensor, cutlass: bool):
    """to_sparse_semi_structured(w) with the chosen backend (the class flag restored afterwards)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if not cutlass and not torch.backends.cusparselt.is_available():
        raise RuntimeError("torch has no cuSPARSELt here (torch.backends.cusparselt.is_available() is False)")
    before = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        return to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = before


def cusparselt_path(x, values, meta, bias):
    """The opt-in cuSPARSELt path of the op, called directly (the op takes it only when opted in)."""
    from torchslim import _sparse24_cusparselt

    y = _sparse24_cusparselt.sparse24_linear(x, values, meta, bias)
    if y is None:
        raise RuntimeError("the cuSPARSELt path does not take this call (shape, dtype or no cuSPARSELt)")
    return y


def bench_case(N: int, K: int, M: int, rep_ms: float, dev: torch.device, timer) -> dict:
    from torchslim.compress import prune_24
    from torchslim.formats import sparse24

    op = torch.ops.torchslim.sparse24_linear.default
    g = torch.Generator(device=dev).manual_seed(N * 7 + K * 3 + M)
    x32 = torch.randn(M, K, device=dev, generator=g)
    w32 = prune_24(torch.randn(N, K, device=dev, generator=g) * K**-0.5)
    b32 = torch.randn(N, device=dev, generator=g) * 0.1
    x, w, bias = x32.bfloat16(), w32.bfloat16(), b32.bfloat16()
    x16, w16, bias16 = x32.half(), w32.half(), b32.half()
    values, meta = sparse24.pack(w)
    values16, meta16 = sparse24.pack(w16)
    # Sized on the compressed weight, the smallest that any method streams (dense's is ~1.8x larger).
    copies = copies_for(values.numel() * values.element_size() + meta.numel() * meta.element_size(), dev,
                        MAX_COPIES)

    case: dict = {"N": N, "K": K, "M": M, "weight_copies": copies, "us": {}, "errors": {}, "rel_err": {}}
    builders = {
        "ours_bf16": lambda: (lambda v=values.clone(), m=meta.clone(): op(x, v, m, bias)),
        "ours_fp16": lambda: (lambda v=values16.clone(), m=meta16.clone(): op(x16, v, m, bias16)),
        "ours_cslt": lambda: (lambda v=values.clone(), m=meta.clone(): cusparselt_path(x, v, m, bias)),
        "dense": lambda: (lambda wc=w.clone(): F.linear(x, wc, bias)),
        "cutlass": lambda: (lambda ws=semi_structured(w.clone(), cutlass=True): F.linear(x, ws, bias)),
        "cusparselt": lambda: (lambda ws=semi_structured(w.clone(), cutlass=False): F.linear(x, ws, bias)),
    }
    # Float64 references of the same pruned layer, from the inputs each method sees.
    ref = x.double() @ w.double().T + bias.double()
    ref16 = x16.double() @ w16.double().T + bias16.double()
    if M < 128:
        del builders["ours_cslt"]  # the path is for compute-bound M (SPARSE24_TENSOR_CORE_MIN_M)
    fns = {}
    for name, build in builders.items():
        fns[name] = time_method(case, name, lambda: Rotating([build() for _ in range(copies)]),
                                ref16 if name == "ours_fp16" else ref, rep_ms, dev, timer)
    if fns.get("ours_bf16") is not None:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours_bf16"], dev)
    return case


def table(cases: list[dict]) -> str:
    head = ["N", "K", "M", "ours bf16", "ours fp16", "ours cslt", "dense", "cutlass", "cusparselt", "dense/ours",
            "semi/ours", "dense/cslt", "b2b us", "err ours"]
    rows = []
    for c in cases:
        us = c["us"]
        o = us.get("ours_bf16")
        semi = min((us[k] for k in ("cutlass", "cusparselt") if k in us), default=None)
        cslt = us.get("ours_cslt")
        rows.append([str(c["N"]), str(c["K"]), str(c["M"]), fmt(o), fmt(us.get("ours_fp16")), fmt(cslt),
                     fmt(us.get("dense")), fmt(us.get("cutlass")), fmt(us.get("cusparselt")),
                     fmt(us["dense"] / o if o and "dense" in us else None, 2),
                     fmt(semi / o if o and semi else None, 2),
                     fmt(us["dense"] / cslt if cslt and "dense" in us else None, 2), fmt(c.get("ours_back_to_back_us")),
                     err_cell(c, "ours_bf16")])
    return text_table(head, rows)


def main(argv=None) -> int:
    started = start(__doc__, "sparse24_linear", "two shapes, two M", 25, argv,
                    dry_run_help="check this script without a GPU: tiny shapes on CPU tensors; timings are "
                                 "meaningless, ours is the CPU op there and the semi-structured backends fail "
                                 "(CUDA only)")
    if started is None:
        return 2
    args, dev, timer = started

    run = run_cases(case_list(args, SHAPES, MS, QUICK_SHAPES, QUICK_MS), ("N", "K", "M"),
                    lambda N, K, M: bench_case(N, K, M, args.rep_ms, dev, timer), args.budget_s, dev)
    device = device_info(dev)
    if dev.type == "cuda":
        device["cusparselt"] = torch.backends.cusparselt.is_available()
    result = {
        **result_header("sparse24_linear_gpu", device),
        "timing": "per-call GPU (device) time from CUDA events (median; p20/p80 in us_p20_p80), host queued ahead "
                  "behind a sleep kernel, rotating weight copies (count in weight_copies) beyond twice the L2 in "
                  "compressed bytes; ours_back_to_back_us: wall time per call back to back, host overhead "
                  "included; x bfloat16 (float16 for ours_fp16)",
        "methods": METHODS, **run,
    }
    return finish(result, args,
                  f"sparse24_linear on {device['device']} (torch {result['torch']}, triton {result['triton']}), "
                  f"times in us (GPU device time, weight from HBM); ratios = t(baseline) / t(ours bf16), "
                  f"> 1: ours faster",
                  "dense: cuBLAS bf16 on the pruned weight; cutlass / cusparselt: to_sparse_semi_structured backends; "
                  "semi/ours: the faster of the two; b2b: ours bf16 back to back incl. host overhead", table(run["cases"]))


if __name__ == "__main__":
    sys.exit(main())
