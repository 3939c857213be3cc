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

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_int8_linear_gpu import CUBES, print_table, write_result  # noqa: E402

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


def copies_for(weight_bytes: int, dev: torch.device) -> int:
    """How many weight copies exceed twice the L2 (capped)."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20) if dev.type == "cuda" else 1 << 20
    return max(1, min(MAX_COPIES, math.ceil(2 * l2 / max(1, weight_bytes))))


class Rotating:
    """Calls fns[0], fns[1], ... in turn: one weight copy per call."""

    def __init__(self, fns):
        self.fns, self.i = fns, 0

    def __call__(self):
        fn = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return fn()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gpu_times_us(fn, rep_ms: float, max_calls: int = 400) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of per-call GPU times (CUDA events), in us.

    A sleep kernel first holds the stream while the host enqueues every timed call with its events,
    so each event pair spans that call's kernels only, not the host's launch latency."""
    for _ in range(10):  # warm-up
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        fn()
    host_s = (time.perf_counter() - t0) / 5
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / 5
    calls = int(min(max_calls, max(20, rep_ms / max(gpu_ms, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    # Hold the GPU for longer than the host needs to enqueue the calls (clock rate ~2 GHz or less).
    hold_ms = 1.5 * calls * (host_s * 1e3 + 0.02) + 1
    torch.cuda._sleep(int(hold_ms * 2e6))
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(1e3 * s.elapsed_time(e) for s, e in events)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def wall_times_us(fn, rep_ms: float) -> tuple[float, float, float]:
    """For --cpu-dry-run only: one wall-clock sample, no statistics."""
    t0 = time.perf_counter()
    fn()
    t = (time.perf_counter() - t0) * 1e6
    return t, t, t


def back_to_back_us(fn, dev: torch.device, calls: int = 100) -> float:
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / calls * 1e6


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


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
    fns = {}
    for name, (build, nbytes) in builders.items():
        try:
            copies = copies_for(nbytes, dev)
            case["weight_copies"][name] = copies
            fn = Rotating([build() for _ in range(copies)])
            y = fn()
            sync(dev)
            case["rel_err"][name] = max_rel_err(y, ref)
            med, p20, p80 = timer(fn, rep_ms)
            case["us"][name] = med
            case.setdefault("us_p20_p80", {})[name] = [p20, p80]
            fns[name] = fn
        except Exception as e:  # noqa: BLE001  (a missing backend must not hide the other numbers)
            case["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if "ours" in fns:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours"], dev, calls=100 if dev.type == "cuda" else 2)
    return case


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under a header and a rule (the GPU benchmarks' printed tables)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def add_common_args(p: argparse.ArgumentParser, name: str, quick_help: str, rep_ms: float) -> None:
    """The options every GPU benchmark of an op has; its JSON goes to bench/results/<name>_gpu.json."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--rep-ms", type=float, default=rep_ms, help="GPU time measured per method and case")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (the cases left are listed as skipped), so "
                        "that a time-limited run still writes its JSON and table")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="check this script without a GPU: tiny shapes on CPU tensors; timings are meaningless, "
                        "ours is the CPU op there (where this build has one)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                  f"{name}_gpu.json"))


def pick_device(args, name: str):
    """(device, timer) for the run: CUDA events on the GPU, or wall time for --cpu-dry-run (its JSON
    then named *_cpu_dry_run.json); None, said on stderr, without either."""
    if args.cpu_dry_run:
        args.out = os.path.join(os.path.dirname(args.out), f"{name}_gpu_cpu_dry_run.json")
        return torch.device("cpu"), wall_times_us
    if torch.cuda.is_available():
        return torch.device("cuda"), gpu_times_us
    print(f"bench_{name}_gpu: no CUDA device (--cpu-dry-run checks the script without one)", file=sys.stderr)
    return None


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
                     fmt(c.get("ours_back_to_back_us")),
                     f"{c['rel_err']['ours']:.1e}" if "ours" in c["rel_err"] else "-"])
    return text_table(head, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, "csr_linear", "two shapes, two sparsities, two M", 20)
    args = p.parse_args(argv)
    picked = pick_device(args, "csr_linear")
    if picked is None:
        return 2
    dev, timer = picked

    import torchslim

    shapes, sparsities, ms = ((QUICK_SHAPES, QUICK_SPARSITIES, QUICK_MS) if args.quick
                              else (SHAPES, SPARSITIES, MS))
    if args.cpu_dry_run:
        shapes, ms = [(40, 72), (24, 33)], [1, 17]
    # Every shape at every sparsity and M (CSR's targets are at small M), then the cubes (M = N = K)
    # at 90 % sparsity.
    todo = [(N, K, s, M) for N, K in shapes for s in sparsities for M in ms]
    if not args.cpu_dry_run:
        todo += [(n, n, 0.9, n) for n in (CUBES[:1] if args.quick else CUBES)]
    t0 = time.time()
    cases, skipped = [], []
    for N, K, sparsity, M in todo:
        if args.budget_s is not None and time.time() - t0 > args.budget_s:
            skipped.append([N, K, sparsity, M])
            continue
        try:
            cases.append(bench_case(N, K, sparsity, M, args.rep_ms, dev, timer))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            cases.append({"N": N, "K": K, "sparsity": sparsity, "M": M, "us": {}, "rel_err": {},
                          "errors": {"case": traceback.format_exc(limit=1)}})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  N={N} K={K} sparsity={sparsity:g} M={M}: "
              + ", ".join(f"{k}={v:.1f}us" for k, v in cases[-1]["us"].items())
              + "".join(f"  [{k}: {v}]" for k, v in cases[-1]["errors"].items()), flush=True)

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        device = {"device": props.name, "sm_count": props.multi_processor_count,
                  "capability": f"{props.major}.{props.minor}", "l2_bytes": getattr(props, "L2_cache_size", None)}
    else:
        device = {"device": "cpu (dry run)"}
    result = {
        "benchmark": "csr_linear_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device,
        "torch": torch.__version__, "cuda": torch.version.cuda, "torchslim": torchslim.__version__,
        "python": platform.python_version(), "info": torchslim.info(),
        "timing": "per-call GPU time from CUDA events (median; p20/p80 in us_p20_p80), host queued ahead behind a "
                  "sleep kernel, rotating weight copies beyond twice the L2; x and the weight bfloat16",
        "pruning": "per-row magnitude (top-k of |w| kept in every row)",
        "methods": METHODS, "runtime_s": round(time.time() - t0, 1), "cases": cases,
        "skipped_over_budget": skipped,
    }
    write_result(result, args.out)

    print(f"\ncsr_linear on {device['device']} (torch {torch.__version__}), times in us (GPU, weight from HBM); "
          f"ratios = t(baseline) / t(ours), > 1: ours faster")
    print("dense: cuBLAS bf16 on the pruned weight; cusparse: torch.sparse_csr_tensor (cuSPARSE SpMM) in bf16; "
          "b2b: ours back to back incl. host overhead")
    print_table(table(cases), cases)
    if skipped:
        print(f"not run (past --budget-s {args.budget_s:g}): "
              + ", ".join(f"N={n} K={k} s={s:g} M={m}" for n, k, s, m in skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
