"""GPU benchmark: torchslim::int8_linear (per-token quantization + Triton int8 GEMM with fused
dequant) against what a user would otherwise run, side by side in one process on the same inputs.

  ours       torch.ops.torchslim.int8_linear(x, w_q, w_scale, bias)     quantization included
  gemm       the Triton GEMM alone on pre-quantized x (int8_matmul_dequant): ours minus quantization
  bf16       F.linear(x, W, b) in bfloat16                               cuBLAS
  intmm      per-token quantization in torch ops, torch._int_mm, dequant + bias in torch ops

x is bfloat16 throughout. Times are GPU medians from triton.testing.do_bench, which clears the L2
cache before every call, so small-M cases stream the weight from HBM as they would in a model.
The clearing also keeps the GPU busy while the host launches the next call, so these are device
times as long as the host needs less than the ~0.1 ms that clearing the cache takes.
`b2b` is ours called back to back (warm L2, host-side overhead included): at M=1 it shows the
per-call cost of the Python dispatch, which CUDA graphs would remove.
Ratios are speedups t(baseline) / t(ours): > 1 means ours is faster.

    python bench/gpu/bench_int8_linear_gpu.py            # all shapes (~1-2 min on an H200)
    python bench/gpu/bench_int8_linear_gpu.py --quick    # two shapes, two M
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SHAPES = [(384, 1536), (1536, 384), (768, 3072), (4096, 4096), (11008, 4096)]  # (N, K)
MS = [1, 16, 128, 512, 2048]
QUICK_SHAPES = [(384, 1536), (4096, 4096)]
QUICK_MS = [1, 512]
# Square problems M = N = K, where GEMM throughput (not the weight stream) decides: the headline
# compute-bound cases of every GPU benchmark, run first so that a --budget-s cut never drops them.
CUBES = [4096, 8192]


def case_list(shapes, ms, quick: bool = False) -> list[tuple[int, int, int]]:
    """(N, K, M) of a benchmark: the cubes (the first only with --quick), then every shape at every M."""
    cubes = CUBES[:1] if quick else CUBES
    return [(n, n, n) for n in cubes] + [(N, K, M) for N, K in shapes for M in ms]
METHODS = ["ours", "gemm", "bf16", "intmm"]


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


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def back_to_back_us(fn, dev: torch.device, calls: int = 100) -> float:
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / calls * 1e6


def gpu_times_ms(fn, rep_ms: int) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile in ms, L2 cleared before each call."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def wall_times_ms(fn, rep_ms: int) -> tuple[float, float, float]:
    """For --cpu-dry-run only: one wall-clock sample, no statistics."""
    t0 = time.perf_counter()
    fn()
    t = (time.perf_counter() - t0) * 1e3
    return t, t, t


def bench_case(N: int, K: int, M: int, rep_ms: int, dev: torch.device, timer=gpu_times_ms) -> dict:
    from torchslim import reference
    from torchslim.triton_kernels.int8_linear import int8_matmul_dequant

    g = torch.Generator(device=dev).manual_seed(N * 7 + K * 3 + M)
    x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, device=dev, generator=g) * K**-0.5).to(torch.bfloat16)
    bias = (torch.randn(N, device=dev, generator=g) * 0.1).to(torch.bfloat16)
    w_q, w_scale = quantize_weight(w)
    w_q_t = w_q.t()
    q_ref, s_ref = reference.quantize_per_token(x)

    case: dict = {"N": N, "K": K, "M": M, "us": {}, "errors": {}, "rel_err": {}}
    pad = 0
    try:
        pad = intmm_pad_rows(M, K, N, dev)
    except RuntimeError as e:
        case["errors"]["intmm"] = str(e)
    case["intmm_padded_rows"] = pad

    fns = {
        "ours": lambda: torch.ops.torchslim.int8_linear.default(x, w_q, w_scale, bias),
        "gemm": lambda: int8_matmul_dequant(q_ref, s_ref, w_q, w_scale, bias, torch.bfloat16),
        "bf16": lambda: F.linear(x, w, bias),
        "intmm": lambda: intmm_linear(x, w_q_t, w_scale, bias, pad),
    }
    # Float64 references: the quantized model's exact output (ours, gemm, intmm approximate it)
    # and the unquantized bf16 layer's (what bf16 approximates).
    ref_q = (q_ref.double() @ w_q.double().T) * (s_ref.double()[:, None] * w_scale.double()[None, :]) + bias.double()
    ref_dense = x.double() @ w.double().T + bias.double()
    for name, fn in fns.items():
        if name in case["errors"]:
            continue
        try:
            y = fn()  # first call: compiles and autotunes outside the timing
            sync(dev)
            case["rel_err"][name] = max_rel_err(y, ref_dense if name == "bf16" else ref_q)
            med, p20, p80 = timer(fn, rep_ms)
            case["us"][name] = 1e3 * med
            case.setdefault("us_p20_p80", {})[name] = [1e3 * p20, 1e3 * p80]
        except Exception as e:  # noqa: BLE001  (a missing kernel must not hide the other numbers)
            case["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if "ours" in case["us"]:
        case["ours_back_to_back_us"] = back_to_back_us(fns["ours"], dev, calls=100 if dev.type == "cuda" else 2)
    return case


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def table(cases: list[dict]) -> str:
    head = ["N", "K", "M", "ours us", "gemm us", "bf16 us", "intmm us", "bf16/ours", "intmm/ours",
            "b2b us", "err ours"]
    rows = []
    for c in cases:
        us = c["us"]
        o = us.get("ours")
        r = lambda b: (us[b] / o) if (o and b in us) else None  # noqa: E731
        intmm = fmt(us.get("intmm")) + ("*" if c.get("intmm_padded_rows") else "")
        rows.append([str(c["N"]), str(c["K"]), str(c["M"]), fmt(o), fmt(us.get("gemm")), fmt(us.get("bf16")),
                     intmm, fmt(r("bf16"), 2), fmt(r("intmm"), 2), fmt(c.get("ours_back_to_back_us")),
                     f"{c['rel_err']['ours']:.1e}" if "ours" in c["rel_err"] else "-"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def write_result(result: dict, out: str) -> None:
    """The benchmark's JSON at out, and a copy in $OUT when set (the device tool brings that folder back)."""
    paths = [os.path.normpath(out)]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], os.path.basename(out)))
    for path in paths:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {path}")


def print_table(text: str, cases: list[dict]) -> None:
    """A benchmark's table, then the methods that raised in some case (their errors are in the JSON)."""
    print(text)
    failed = sorted({k for c in cases for k in c["errors"]})
    if failed:
        print(f"errors in: {', '.join(failed)} (see the JSON)")


def print_skipped(skipped: list, budget_s: float | None) -> None:
    """The cases a --budget-s cut left out, if any."""
    if skipped:
        print(f"not run (past --budget-s {budget_s:g}): " + ", ".join(
            " ".join(f"{k}={v}" for k, v in zip(("N", "K", "M", "sparsity"), case)) for case in skipped))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, two M")
    p.add_argument("--rep-ms", type=int, default=30, help="do_bench measuring time per method and case")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (the cases left are listed as skipped), so "
                        "that a time-limited run still writes its JSON and table")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="check this script without a GPU: tiny shapes on CPU tensors through the Triton "
                        "interpreter (set TRITON_INTERPRET=1); timings are meaningless and ours is the CPU "
                        "op there")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                  "int8_linear_gpu.json"))
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        dev, timer = torch.device("cpu"), wall_times_ms
        args.out = os.path.join(os.path.dirname(args.out), "int8_linear_gpu_cpu_dry_run.json")
    elif torch.cuda.is_available():
        dev, timer = torch.device("cuda"), gpu_times_ms
    else:
        print("bench_int8_linear_gpu: no CUDA device (--cpu-dry-run checks the script without one)",
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
                  "capability": f"{props.major}.{props.minor}"}
    else:
        device = {"device": "cpu (dry run through the Triton interpreter)"}
    result = {
        "benchmark": "int8_linear_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "torchslim": torchslim.__version__, "python": platform.python_version(),
        "info": torchslim.info(),
        "timing": "GPU median of triton.testing.do_bench (L2 cleared before each call); x bfloat16",
        "methods": METHODS, "runtime_s": round(time.time() - t0, 1), "cases": cases,
        "skipped_over_budget": skipped,
    }
    write_result(result, args.out)

    print(f"\nint8_linear on {device['device']} (torch {torch.__version__}, triton {triton.__version__}), "
          f"bf16 activations, times in us (GPU, cold L2); ratios = t(baseline) / t(ours), > 1: ours faster")
    print("gemm: the Triton GEMM alone on pre-quantized x; b2b: ours back to back incl. host overhead; "
          "*: torch._int_mm needed padded rows")
    print_table(table(cases), cases)
    print_skipped(skipped, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
