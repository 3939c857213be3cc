"""GPU benchmark: torchslim::csr_linear (CUDA C++ kernel, csrc/cuda/csr_linear.cu) against what a user
would otherwise run, side by side in one process on the same inputs.

  ours      torch.ops.torchslim.csr_linear(x, crow, col, values, bias)     bfloat16, int16 columns
  dense     F.linear(x, W, b) in bfloat16, W the same pruned weight        cuBLAS
  cusparse  torch.addmm(b, W_csr, x.T).T, W_csr = torch.sparse_csr_tensor of the same weight
            (bfloat16 values, int32 indices; float32 where torch has no     cuSPARSE SpMM
            bfloat16 sparse addmm, noted in the JSON as cusparse_dtype)

The weight is a random (N, K) matrix pruned by magnitude (the largest |w| of every row kept) to
50 / 70 / 90 / 95 % sparsity. Times are per-call GPU times from CUDA events, medians (20th / 80th
percentiles in the JSON), measured after a warm-up while a sleep kernel holds the GPU so that the
host queues every timed call ahead of it (no host gaps in the times). Each method cycles through
copies of its weight that together exceed twice the L2 (capped at MAX_COPIES), so small-M cases
stream the weight from HBM as they would in a model. `b2b` is ours called back to back over the same
copies, wall clock, host overhead included.
Ratios are speedups t(baseline) / t(ours): > 1 means ours is faster.

    python bench/gpu/bench_csr_linear_gpu.py               # all shapes
    python bench/gpu/bench_csr_linear_gpu.py --quick       # two shapes, two sparsities, two M
    python bench/gpu/bench_csr_linear_gpu.py --cpu-dry-run # the script itself, without a GPU
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

# (N, K): a 4096 square (Llama-7B's attention projections), Llama-7B's MLP up/gate projection, then
# MiniLM / BERT-base layers (bench/int8_linear.py's shapes). Large shapes first: a --budget-s cut
# drops the small ones.
SHAPES = [(4096, 4096), (11008, 4096), (384, 1536), (1536, 384), (768, 3072)]
SPARSITIES = [0.5, 0.7, 0.9, 0.95]
MS = [1, 16, 128, 512, 2048]
QUICK_SHAPES = [(4096, 4096), (384, 1536)]
QUICK_SPARSITIES = [0.7, 0.95]
QUICK_MS = [1, 512]
METHODS = ["ours", "dense", "cusparse"]
MAX_COPIES = 32


def prune_rows(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """w with all but the round(K * (1 - sparsity)) largest |w| of every row set to zero."""
    keep = max(1, round(w.shape[1] * (1 - sparsity)))
    idx = w.abs().topk(keep, dim=1).indices
    return torch.zeros_like(w).scatter_(1, idx, w.gather(1, idx))


def bench_case(N: int, K: int, sparsity: float, M: int, rep_ms: float, dev: torch.device, timer) -> dict:
    from torchslim.formats import csr

    op = torch.ops.torchslim.csr_linear.default
    g = torch.Generator(device=dev).manual_seed(N * 7 + K * 3 + M + int(sparsity * 100))
    x = torch.randn(M, K, device=dev, generator=g).bfloat16()
    w = prune_rows(torch.randn(N, K, device=dev, generator=g) * K**-0.5, sparsity).bfloat16()
    bias = (torch.randn(N, device=dev, generator=g) * 0.1).bfloat16()
    crow, col, values = csr.pack(w)
    nnz = values.numel()
    csr_bytes = nnz * (values.element_size() + col.element_size()) + crow.numel() * 4
    dense_bytes = N * K * 2
    case: dict = {"N": N, "K": K, "sparsity": sparsity, "M": M, "nnz": nnz, "csr_bytes": csr_bytes,
                  "us": {}, "errors": {}, "rel_err": {}, "weight_copies": {}}

    def ours():
        c = (crow.clone(), col.clone(), values.clone())
        return lambda: op(x, *c, bias)

    def dense():
        wc = w.clone()
        return lambda: F.linear(x, wc, bias)

    # cuSPARSE in bfloat16 where torch supports it, else in float32 (the dtype used goes in the JSON).
    sparse_dtype = torch.bfloat16
    try:
        torch.addmm(bias[:, None], torch.sparse_csr_tensor(crow, col.to(torch.int32), values, (N, K)), x.t())
    except (RuntimeError, NotImplementedError):
        sparse_dtype = torch.float32
    case["cusparse_dtype"] = str(sparse_dtype)

    def cusparse():
        ws = torch.sparse_csr_tensor(crow.clone(), col.to(torch.int32), values.to(sparse_dtype), (N, K))
        b, xs = bias[:, None].to(sparse_dtype), x.to(sparse_dtype)
        return lambda: torch.addmm(b, ws, xs.t()).t()

    builders = {"ours": (ours, csr_bytes), "dense": (dense, dense_bytes), "cusparse": (cusparse, csr_bytes)}
    ref = x.double() @ w.double().T + bias.double()

    def rotating(build, nbytes: int, name: str):
        copies = copies_for(nbytes, dev, MAX_COPIES)
        case["weight_copies"][name] = copies
        return Rotating([build() for _ in range(copies)])

    fns = {}
    for name, (build, nbytes) in builders.items():
        fns[name] = time_method(case, name, lambda: rotating(build, nbytes, name), ref, rep_ms, dev, timer)
    if fns.get("ours") is not None:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours"], dev)
    return case


def table(cases: list[dict]) -> str:
    head = ["N", "K", "sparse", "M", "ours", "dense", "cusparse", "dense/ours", "cusparse/ours", "b2b us", "err ours"]
    rows = []
    for c in cases:
        us = c["us"]
        o = us.get("ours")
        rows.append([str(c["N"]), str(c["K"]), f"{round(100 * c['sparsity'])}%", str(c["M"]), fmt(o),
                     fmt(us.get("dense")), fmt(us.get("cusparse")),
                     fmt(us["dense"] / o if o and "dense" in us else None, 2),
                     fmt(us["cusparse"] / o if o and "cusparse" in us else None, 2),
                     fmt(c.get("ours_back_to_back_us")), err_cell(c, "ours")])
    return text_table(head, rows)


def main(argv=None) -> int:
    started = start(__doc__, "csr_linear", "two shapes, two sparsities, two M", 20, argv)
    if started is None:
        return 2
    args, dev, timer = started

    shapes, sparsities, ms = ((QUICK_SHAPES, QUICK_SPARSITIES, QUICK_MS) if args.quick
                              else (SHAPES, SPARSITIES, MS))
    if args.cpu_dry_run:
        shapes, ms = DRY_RUN_SHAPES, DRY_RUN_MS
    # Every shape at every sparsity and M (CSR's targets are at small M), then the cubes (M = N = K)
    # at 90 % sparsity.
    todo = [(N, K, s, M) for N, K in shapes for s in sparsities for M in ms]
    if not args.cpu_dry_run:
        todo += [(n, n, 0.9, n) for n in (CUBES[:1] if args.quick else CUBES)]
    run = run_cases(todo, ("N", "K", "sparsity", "M"),
                    lambda N, K, s, M: bench_case(N, K, s, M, args.rep_ms, dev, timer), args.budget_s, dev)
    device = device_info(dev)
    result = {
        **result_header("csr_linear_gpu", device, with_triton=False),
        "timing": "per-call GPU time from CUDA events (median; p20/p80 in us_p20_p80), host queued ahead behind a "
                  "sleep kernel, rotating weight copies beyond twice the L2; x and the weight bfloat16",
        "pruning": "per-row magnitude (top-k of |w| kept in every row)",
        "methods": METHODS, **run,
    }
    return finish(result, args,
                  f"csr_linear on {device['device']} (torch {result['torch']}), times in us (GPU, weight from HBM); "
                  f"ratios = t(baseline) / t(ours), > 1: ours faster",
                  "dense: cuBLAS bf16 on the pruned weight; cusparse: torch.sparse_csr_tensor (cuSPARSE SpMM) in bf16; "
                  "b2b: ours back to back incl. host overhead", table(run["cases"]), skip_keys=("N", "K", "s", "M"))


if __name__ == "__main__":
    sys.exit(main())
