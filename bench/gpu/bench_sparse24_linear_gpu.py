"""GPU benchmark: torchslim::sparse24_linear (Triton kernel that expands the compressed 2:4 weight in
registers) against what a user would otherwise run, side by side in one process on the same inputs.

  ours_bf16   torch.ops.torchslim.sparse24_linear(x, values, meta, bias)     bfloat16
  ours_fp16   the same in float16
  ours_cslt   ours on cuSPARSELt (the opt-in sparse24_cusparselt path; M >= 128 only), bfloat16
  dense       F.linear(x, W, b) in bfloat16, W the same pruned weight       cuBLAS
  cutlass     F.linear(x, to_sparse_semi_structured(W), b), CUTLASS backend (_FORCE_CUTLASS)
  cusparselt  the same with the cuSPARSELt backend, where torch has it

Every method multiplies the same 2:4-pruned weight (compress.prune_24 of a random matrix). Times are
GPU medians from triton.testing.do_bench, which clears the L2 cache before every call; on top of
that each method cycles through several copies of its weight (together more than twice the L2),
so small-M cases stream the weight from HBM as they would in a model. `b2b` is ours_bf16 called
back to back over the same rotating copies (no cache clearing, host-side overhead included).
Ratios are speedups t(baseline) / t(ours_bf16): > 1 means ours is faster; `semi/ours` takes the
faster of the two semi-structured backends.

    python bench/gpu/bench_sparse24_linear_gpu.py            # all shapes
    python bench/gpu/bench_sparse24_linear_gpu.py --quick    # two shapes, two M
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_int8_linear_gpu import (back_to_back_us, case_list, gpu_times_ms, max_rel_err,  # noqa: E402
                                  print_skipped, print_table, sync, wall_times_ms, write_result)

# (N, K): a 4096 square (Llama-7B's attention projections), Llama-7B's MLP up/gate and down
# projections, then MiniLM / BERT-base layers. Large shapes first: a --budget-s cut drops the small ones.
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (384, 1536), (1536, 384), (768, 3072)]
MS = [1, 16, 128, 512, 2048]
QUICK_SHAPES = [(4096, 4096), (384, 1536)]
QUICK_MS = [1, 512]
METHODS = ["ours_bf16", "ours_fp16", "ours_cslt", "dense", "cutlass", "cusparselt"]
MAX_COPIES = 16


class Rotating:
    """Calls fns[0], fns[1], ... in turn: one weight copy per call."""

    def __init__(self, fns):
        self.fns, self.i = fns, 0

    def __call__(self):
        fn = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return fn()


def copies_for(weight_bytes: int, dev: torch.device) -> int:
    """How many weight copies exceed twice the L2 (capped)."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20) if dev.type == "cuda" else 1 << 20
    return max(1, min(MAX_COPIES, math.ceil(2 * l2 / max(1, weight_bytes))))


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


def bench_case(N: int, K: int, M: int, rep_ms: int, dev: torch.device, timer=gpu_times_ms) -> dict:
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
    copies = copies_for(N * K * 2, dev)

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
    fns = {}
    if M < 128:
        del builders["ours_cslt"]  # the path is for compute-bound M (SPARSE24_TENSOR_CORE_MIN_M)
    for name, build in builders.items():
        try:
            fn = Rotating([build() for _ in range(copies)])
            y = fn()  # first call: compiles and autotunes outside the timing
            sync(dev)
            case["rel_err"][name] = max_rel_err(y, ref16 if name == "ours_fp16" else ref)
            med, p20, p80 = timer(fn, rep_ms)
            case["us"][name] = 1e3 * med
            case.setdefault("us_p20_p80", {})[name] = [1e3 * p20, 1e3 * p80]
            fns[name] = fn
        except Exception as e:  # noqa: BLE001  (a missing backend must not hide the other numbers)
            case["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if "ours_bf16" in fns:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours_bf16"], dev, calls=100 if dev.type == "cuda" else 2)
    return case


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


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
                     f"{c['rel_err']['ours_bf16']:.1e}" if "ours_bf16" in c["rel_err"] else "-"])
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, two M")
    p.add_argument("--rep-ms", type=int, default=25, help="do_bench measuring time per method and case")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (the cases left are listed as skipped), so "
                        "that a time-limited run still writes its JSON and table")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="check this script without a GPU: tiny shapes on CPU tensors; timings are meaningless, "
                        "ours is the CPU op there and the semi-structured backends fail (CUDA only)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                  "sparse24_linear_gpu.json"))
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        dev, timer = torch.device("cpu"), wall_times_ms
        args.out = os.path.join(os.path.dirname(args.out), "sparse24_linear_gpu_cpu_dry_run.json")
    elif torch.cuda.is_available():
        dev, timer = torch.device("cuda"), gpu_times_ms
    else:
        print("bench_sparse24_linear_gpu: no CUDA device (--cpu-dry-run checks the script without one)",
              file=sys.stderr)
        return 2

    import triton

    import torchslim

    todo = case_list(QUICK_SHAPES, QUICK_MS, quick=True) if args.quick else case_list(SHAPES, MS)
    if args.cpu_dry_run:
        todo = [(N, K, M) for N, K in [(40, 72), (24, 33)] for M in [1, 17]]
    t0 = time.time()
    cases, skipped = [], []
    for N, K, M in todo:
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            skipped.append([N, K, M])
            continue
        try:
            cases.append(bench_case(N, K, M, args.rep_ms, dev, timer))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            cases.append({"N": N, "K": K, "M": M, "us": {}, "rel_err": {},
                          "errors": {"case": traceback.format_exc(limit=1)}})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  N={N} K={K} M={M}: " + ", ".join(f"{k}={v:.1f}us" for k, v in cases[-1]["us"].items())
              + "".join(f"  [{k}: {v}]" for k, v in cases[-1]["errors"].items()), flush=True)

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        device = {"device": props.name, "sm_count": props.multi_processor_count,
                  "capability": f"{props.major}.{props.minor}",
                  "l2_bytes": getattr(props, "L2_cache_size", None),
                  "cusparselt": torch.backends.cusparselt.is_available()}
    else:
        device = {"device": "cpu (dry run)"}
    result = {
        "benchmark": "sparse24_linear_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "torchslim": torchslim.__version__, "python": platform.python_version(),
        "info": torchslim.info(),
        "timing": "GPU median of triton.testing.do_bench (L2 cleared before each call) over rotating weight "
                  "copies; x bfloat16 (float16 for ours_fp16)",
        "methods": METHODS, "runtime_s": round(time.time() - t0, 1), "cases": cases,
        "skipped_over_budget": skipped,
    }
    write_result(result, args.out)

    print(f"\nsparse24_linear on {device['device']} (torch {torch.__version__}, triton {triton.__version__}), "
          f"times in us (GPU, cold L2); ratios = t(baseline) / t(ours bf16), > 1: ours faster")
    print("dense: cuBLAS bf16 on the pruned weight; cutlass / cusparselt: to_sparse_semi_structured backends; "
          "semi/ours: the faster of the two; b2b: ours bf16 back to back incl. host overhead")
    print_table(table(cases), cases)
    print_skipped(skipped, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
