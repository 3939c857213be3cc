"""GPU benchmark: torchslim::lowrank_linear (on CUDA: two cuBLAS GEMMs by default; the fused Triton
kernel, the (tokens, r) intermediate kept on chip, is opt-in) against what a user would otherwise run,
side by side in one process on the same inputs.

  ours       torch.ops.torchslim.lowrank_linear(x, V, U, bias)             bfloat16, the op's default path
  fused      the fused Triton kernel (lowrank_matmul), opt-in in the op    bfloat16, one launch
  two_gemms  F.linear(F.linear(x, V), U, bias) in bfloat16                 two cuBLAS GEMMs
  dense      F.linear(x, W, bias) in bfloat16, W = U V (the same layer)    one cuBLAS GEMM

The factors are random, V (r, K) and U (N, r), r in {K/8, K/4, K/2}; a rank above the kernel's
MAX_R is not run for fused (the kernel refuses it). Times are per-call GPU times from CUDA events,
medians (20th / 80th percentiles in the JSON), measured after a warm-up while a sleep kernel holds the
GPU so that the host queues every timed call ahead of it (gpu_bench_common.gpu_times_us). Each
method cycles through copies of its weights that together exceed twice the L2, so small-M cases
stream the weights from HBM as they would in a model. `b2b` is ours called back to back, wall clock,
host overhead included. The first call of fused autotunes (outside the timing); the chosen tiles and
column split (SPLIT_N, the kernel's main knob) go in the JSON as `fused_config`.
Ratios are speedups t(baseline) / t(ours): > 1 means ours is faster.

    python bench/gpu/bench_lowrank_linear_gpu.py               # all shapes
    python bench/gpu/bench_lowrank_linear_gpu.py --quick       # two shapes, two ranks, two M
    python bench/gpu/bench_lowrank_linear_gpu.py --cpu-dry-run # the script itself, without a GPU
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench_common import (  # noqa: E402
    CUBES, DRY_RUN_MS, DRY_RUN_SHAPES, Rotating, back_to_back_us, copies_for, device_info, err_cell, finish,
    fmt, result_header, run_cases, start, text_table, time_method,
)

# bench_sparse24_linear_gpu.py's shapes (N, K) and M, a small layer second so that a --budget-s cut
# still leaves a large and a small one: a 4096 square (Llama-7B attention), MiniLM's MLP up
# projection, Llama-7B's MLP up/gate and down projections, then the other MiniLM / BERT-base layers.
SHAPES = [(4096, 4096), (384, 1536), (11008, 4096), (4096, 11008), (1536, 384), (768, 3072)]
MS = [1, 16, 128, 512, 2048]
RANK_DIVISORS = [8, 4, 2]  # r = K / d
QUICK_SHAPES = [(4096, 4096), (384, 1536)]
QUICK_MS = [1, 512]
QUICK_RANK_DIVISORS = [8, 4]
METHODS = ["ours", "fused", "two_gemms", "dense"]


def bench_case(N: int, K: int, r: int, M: int, rep_ms: float, dev: torch.device, timer, max_r: int) -> dict:
    from torchslim import reference

    op = torch.ops.torchslim.lowrank_linear.default
    g = torch.Generator(device=dev).manual_seed(N * 7 + K * 3 + r * 5 + M)
    x = torch.randn(M, K, device=dev, generator=g).bfloat16()
    V = (torch.randn(r, K, device=dev, generator=g) * K**-0.5).bfloat16()
    U = (torch.randn(N, r, device=dev, generator=g) * r**-0.5).bfloat16()
    bias = (torch.randn(N, device=dev, generator=g) * 0.1).bfloat16()
    W = (U.float() @ V.float()).bfloat16()
    lowrank_bytes, dense_bytes = (N + K) * r * 2, N * K * 2
    case: dict = {"N": N, "K": K, "r": r, "M": M, "weight_fraction": lowrank_bytes / dense_bytes,
                  "us": {}, "errors": {}, "rel_err": {}, "weight_copies": {}}

    def ours():
        Vc, Uc = V.clone(), U.clone()
        return lambda: op(x, Vc, Uc, bias)

    def fused():
        from torchslim.triton_kernels.lowrank_linear import lowrank_matmul

        Vc, Uc = V.clone(), U.clone()
        return lambda: lowrank_matmul(x, Vc, Uc, bias)

    def two_gemms():
        Vc, Uc = V.clone(), U.clone()
        return lambda: F.linear(F.linear(x, Vc), Uc, bias)

    def dense():
        Wc = W.clone()
        return lambda: F.linear(x, Wc, bias)

    builders = {"ours": (ours, lowrank_bytes), "fused": (fused, lowrank_bytes), "two_gemms": (two_gemms, lowrank_bytes),
                "dense": (dense, dense_bytes)}
    if r > max_r:
        del builders["fused"]  # beyond the fused kernel's largest rank
    # Float64 references: of the factored layer (t rounded to bfloat16 as both factored methods round
    # it), and of the dense product for dense (its W is U V rounded to bfloat16).
    ref = reference.lowrank_linear(x, V, U, bias)
    refs = {"ours": ref, "fused": ref, "two_gemms": ref, "dense": x.double() @ W.double().T + bias.double()}

    def rotating(build, nbytes: int, name: str):
        copies = copies_for(nbytes, dev)
        case["weight_copies"][name] = copies
        return Rotating([build() for _ in range(copies)])

    def fused_config():
        # fused's first call autotuned: the chosen tiles and SPLIT_N go in the JSON.
        from torchslim.triton_kernels import lowrank_linear as kernels

        best = getattr(kernels._kernel_autotuned, "best_config", None)
        case["fused_config"] = None if best is None else {**best.kwargs, "num_warps": best.num_warps,
                                                          "num_stages": best.num_stages}

    fns = {}
    for name, (build, nbytes) in builders.items():
        fns[name] = time_method(case, name, lambda: rotating(build, nbytes, name), refs[name], rep_ms, dev, timer,
                                after_first=fused_config if name == "fused" and dev.type == "cuda" else None)
    if fns.get("ours") is not None:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours"], dev)
    return case


def table(cases: list[dict]) -> str:
    head = ["N", "K", "r", "M", "ours", "fused", "two gemms", "dense", "two/ours", "dense/ours", "two/fused", "split",
            "b2b us", "err ours"]
    rows = []
    for c in cases:
        us = c["us"]
        o = us.get("ours")
        ratio = lambda b: fmt(us[b] / o if o and b in us else None, 2)  # noqa: E731
        split = (c.get("fused_config") or {}).get("SPLIT_N")
        f = us.get("fused")
        rows.append([str(c["N"]), str(c["K"]), str(c["r"]), str(c["M"]), fmt(o), fmt(f), fmt(us.get("two_gemms")),
                     fmt(us.get("dense")), ratio("two_gemms"), ratio("dense"),
                     fmt(us["two_gemms"] / f if f and "two_gemms" in us else None, 2), "-" if split is None else str(split),
                     fmt(c.get("ours_back_to_back_us")), err_cell(c, "ours")])
    return text_table(head, rows)


def main(argv=None) -> int:
    started = start(__doc__, "lowrank_linear", "two shapes, two ranks, two M", 25, argv)
    if started is None:
        return 2
    args, dev, timer = started

    from torchslim.triton_kernels.lowrank_linear import MAX_R

    max_r = MAX_R[torch.bfloat16]
    shapes, ms, divisors = (QUICK_SHAPES, QUICK_MS, QUICK_RANK_DIVISORS) if args.quick else (SHAPES, MS, RANK_DIVISORS)
    if args.cpu_dry_run:
        shapes, ms = DRY_RUN_SHAPES, DRY_RUN_MS
    # The cubes (M = N = K) at r = K/4 first, then every shape at every rank and M.
    cubes = [] if args.cpu_dry_run else [(n, n, n // 4, n) for n in (CUBES[:1] if args.quick else CUBES)]
    todo = cubes + [(N, K, max(1, K // d), M) for N, K in shapes for d in divisors for M in ms]
    over_max_rank = []
    for N, K, r, _ in todo:
        if r > max_r and [N, K, r] not in over_max_rank:
            over_max_rank.append([N, K, r])
    run = run_cases(todo, ("N", "K", "r", "M"),
                    lambda N, K, r, M: bench_case(N, K, r, M, args.rep_ms, dev, timer, max_r), args.budget_s, dev)
    device = device_info(dev)
    result = {
        **result_header("lowrank_linear_gpu", device),
        "timing": "per-call GPU time from CUDA events (median; host queue filled behind a sleep kernel) over "
                  "rotating weight copies exceeding twice the L2; x, V, U, W bfloat16",
        "methods": METHODS, "max_rank": max_r, **run, "skipped_over_max_rank": over_max_rank,
    }
    notes = [f"fused not run (r above its {max_r}): " + ", ".join(f"N={n} K={k} r={r}" for n, k, r in over_max_rank)
             ] if over_max_rank else []
    return finish(result, args,
                  f"lowrank_linear on {device['device']} (torch {result['torch']}, triton {result['triton']}), "
                  f"times in us (GPU, CUDA events); ratios = t(baseline) / t(ours), > 1: ours faster",
                  "ours: the op (two cuBLAS GEMMs unless TORCHSLIM_CUDA_OPT_IN=lowrank_fused); fused: the Triton "
                  "kernel; two gemms: F.linear(F.linear(x, V), U, b), cuBLAS bf16; dense: F.linear(x, U V, b); split: "
                  "fused's autotuned SPLIT_N; b2b: ours back to back incl. host overhead", table(run["cases"]),
                  skip_keys=("N", "K", "r", "M"), notes=notes)


if __name__ == "__main__":
    sys.exit(main())
