"""GPU benchmark: torchslim::lowrank_linear (Triton kernel, the (tokens, r) intermediate kept on chip)
against what a user would otherwise run, side by side in one process on the same inputs.

  ours       torch.ops.torchslim.lowrank_linear(x, V, U, bias)             bfloat16, one launch
  two_gemms  F.linear(F.linear(x, V), U, bias) in bfloat16                 two cuBLAS GEMMs
  dense      F.linear(x, W, bias) in bfloat16, W = U V (the same layer)    one cuBLAS GEMM

The factors are random, V (r, K) and U (N, r), r in {K/8, K/4, K/2}; a rank above the kernel's
MAX_R is listed as skipped (the op raises there). Times are per-call GPU times from CUDA events,
medians (20th / 80th percentiles in the JSON), measured after a warm-up while a sleep kernel holds the
GPU so that the host queues every timed call ahead of it (bench_csr_linear_gpu.gpu_times_us). Each
method cycles through copies of its weights that together exceed twice the L2, so small-M cases
stream the weights from HBM as they would in a model. `b2b` is ours called back to back, wall clock,
host overhead included. The first call of ours autotunes (outside the timing); the chosen tiles and
column split (SPLIT_N, the kernel's main knob) go in the JSON as `ours_config`.
Ratios are speedups t(baseline) / t(ours): > 1 means ours is faster.

    python bench/gpu/bench_lowrank_linear_gpu.py               # all shapes
    python bench/gpu/bench_lowrank_linear_gpu.py --quick       # two shapes, two ranks, two M
    python bench/gpu/bench_lowrank_linear_gpu.py --cpu-dry-run # the script itself, without a GPU
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_csr_linear_gpu import (  # noqa: E402
    Rotating, add_common_args, back_to_back_us, copies_for, fmt, max_rel_err, pick_device, sync, text_table,
)
from bench_int8_linear_gpu import CUBES, print_table, write_result  # noqa: E402

# bench_sparse24_linear_gpu.py's shapes (N, K) and M, a small layer second so that a --budget-s cut
# still leaves a large and a small one: a 4096 square (Llama-7B attention), MiniLM's MLP up
# projection, Llama-7B's MLP up/gate and down projections, then the other MiniLM / BERT-base layers.
SHAPES = [(4096, 4096), (384, 1536), (11008, 4096), (4096, 11008), (1536, 384), (768, 3072)]
MS = [1, 16, 128, 512, 2048]
RANK_DIVISORS = [8, 4, 2]  # r = K / d
QUICK_SHAPES = [(4096, 4096), (384, 1536)]
QUICK_MS = [1, 512]
QUICK_RANK_DIVISORS = [8, 4]
METHODS = ["ours", "two_gemms", "dense"]


def bench_case(N: int, K: int, r: int, M: int, rep_ms: float, dev: torch.device, timer) -> dict:
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

    def two_gemms():
        Vc, Uc = V.clone(), U.clone()
        return lambda: F.linear(F.linear(x, Vc), Uc, bias)

    def dense():
        Wc = W.clone()
        return lambda: F.linear(x, Wc, bias)

    builders = {"ours": (ours, lowrank_bytes), "two_gemms": (two_gemms, lowrank_bytes), "dense": (dense, dense_bytes)}
    # Float64 references: of the factored layer (t rounded to bfloat16 as both factored methods round
    # it), and of the dense product for dense (its W is U V rounded to bfloat16).
    ref = reference.lowrank_linear(x, V, U, bias)
    refs = {"ours": ref, "two_gemms": ref, "dense": x.double() @ W.double().T + bias.double()}
    fns = {}
    for name, (build, nbytes) in builders.items():
        try:
            copies = copies_for(nbytes, dev)
            case["weight_copies"][name] = copies
            fn = Rotating([build() for _ in range(copies)])
            y = fn()  # ours: compiles and autotunes outside the timing
            sync(dev)
            case["rel_err"][name] = max_rel_err(y, refs[name])
            if name == "ours" and dev.type == "cuda":
                from torchslim.triton_kernels import lowrank_linear as kernels

                best = getattr(kernels._kernel_autotuned, "best_config", None)
                case["ours_config"] = None if best is None else {**best.kwargs, "num_warps": best.num_warps,
                                                                  "num_stages": best.num_stages}
            med, p20, p80 = timer(fn, rep_ms)
            case["us"][name] = med
            case.setdefault("us_p20_p80", {})[name] = [p20, p80]
            fns[name] = fn
        except Exception as e:  # noqa: BLE001  (a failing method must not hide the other numbers)
            case["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if "ours" in fns:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours"], dev, calls=100 if dev.type == "cuda" else 2)
    return case


def table(cases: list[dict]) -> str:
    head = ["N", "K", "r", "M", "ours", "two gemms", "dense", "two/ours", "dense/ours", "split", "b2b us", "err ours"]
    rows = []
    for c in cases:
        us = c["us"]
        o = us.get("ours")
        ratio = lambda b: fmt(us[b] / o if o and b in us else None, 2)  # noqa: E731
        split = (c.get("ours_config") or {}).get("SPLIT_N")
        rows.append([str(c["N"]), str(c["K"]), str(c["r"]), str(c["M"]), fmt(o), fmt(us.get("two_gemms")),
                     fmt(us.get("dense")), ratio("two_gemms"), ratio("dense"), "-" if split is None else str(split),
                     fmt(c.get("ours_back_to_back_us")),
                     f"{c['rel_err']['ours']:.1e}" if "ours" in c["rel_err"] else "-"])
    return text_table(head, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, "lowrank_linear", "two shapes, two ranks, two M", 25)
    args = p.parse_args(argv)
    picked = pick_device(args, "lowrank_linear")
    if picked is None:
        return 2
    dev, timer = picked

    import triton

    import torchslim
    from torchslim.triton_kernels.lowrank_linear import MAX_R

    max_r = MAX_R[torch.bfloat16]
    shapes, ms, divisors = (QUICK_SHAPES, QUICK_MS, QUICK_RANK_DIVISORS) if args.quick else (SHAPES, MS, RANK_DIVISORS)
    if args.cpu_dry_run:
        shapes, ms = [(40, 72), (24, 33)], [1, 17]
    # The cubes (M = N = K) at r = K/4 first, then every shape at every rank and M.
    cubes = [] if args.cpu_dry_run else [(n, n, n // 4, n) for n in (CUBES[:1] if args.quick else CUBES)]
    todo = cubes + [(N, K, max(1, K // d), M) for N, K in shapes for d in divisors for M in ms]
    t0 = time.time()
    cases, skipped, over_max_rank = [], [], []
    for N, K, r, M in todo:
        if r > max_r:
            if [N, K, r] not in over_max_rank:
                over_max_rank.append([N, K, r])
            continue
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            skipped.append([N, K, r, M])
            continue
        try:
            cases.append(bench_case(N, K, r, M, args.rep_ms, dev, timer))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            cases.append({"N": N, "K": K, "r": r, "M": M, "us": {}, "rel_err": {},
                          "errors": {"case": traceback.format_exc(limit=1)}})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  N={N} K={K} r={r} M={M}: " + ", ".join(f"{k}={v:.1f}us" for k, v in cases[-1]["us"].items())
              + "".join(f"  [{k}: {v}]" for k, v in cases[-1]["errors"].items()), flush=True)

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        device = {"device": props.name, "sm_count": props.multi_processor_count,
                  "capability": f"{props.major}.{props.minor}", "l2_bytes": getattr(props, "L2_cache_size", None)}
    else:
        device = {"device": "cpu (dry run)"}
    result = {
        "benchmark": "lowrank_linear_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "torchslim": torchslim.__version__, "python": platform.python_version(),
        "info": torchslim.info(),
        "timing": "per-call GPU time from CUDA events (median; host queue filled behind a sleep kernel) over "
                  "rotating weight copies exceeding twice the L2; x, V, U, W bfloat16",
        "methods": METHODS, "max_rank": max_r, "runtime_s": round(time.time() - t0, 1), "cases": cases,
        "skipped_over_budget": skipped, "skipped_over_max_rank": over_max_rank,
    }
    write_result(result, args.out)

    print(f"\nlowrank_linear on {device['device']} (torch {torch.__version__}, triton {triton.__version__}), "
          f"times in us (GPU, CUDA events); ratios = t(baseline) / t(ours), > 1: ours faster")
    print("two gemms: F.linear(F.linear(x, V), U, b), cuBLAS bf16; dense: F.linear(x, U V, b); split: the "
          "autotuned SPLIT_N; b2b: ours back to back incl. host overhead")
    print_table(table(cases), cases)
    if over_max_rank:
        print(f"not run (r above the kernel's {max_r}): " + ", ".join(f"N={n} K={k} r={r}" for n, k, r in over_max_rank))
    if skipped:
        print(f"not run (past --budget-s {args.budget_s:g}): "
              + ", ".join(f"N={n} K={k} r={r} M={m}" for n, k, r, m in skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
