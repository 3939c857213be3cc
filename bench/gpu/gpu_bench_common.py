"""What the GPU benchmarks of the ops (bench_{int8,sparse24,csr,lowrank}_linear_gpu.py) share: their
options and device choice, the device-time timer, rotating weight copies, the loop over cases under a
time budget, and the JSON and table output. Each benchmark keeps its own shapes, methods and table.

Timing (gpu_times_us): per-call device time from CUDA event pairs, taken while a sleep kernel holds the
stream and the host queues every timed call ahead of it, so that an event pair spans that call's
kernels only, never the host's dispatch of the call (which at small M can take longer than the
kernels). Weights stream from HBM because every method cycles through copies of its weight that
together exceed twice the L2 (copies_for, Rotating). back_to_back_us is the other view: wall time per
call back to back, host overhead included.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch

# Square problems M = N = K, where GEMM throughput (not the weight stream) decides: the headline
# compute-bound cases of every GPU benchmark, run first so that a --budget-s cut never drops them.
CUBES = [4096, 8192]
# --cpu-dry-run's shapes (N, K) and M: tiny, odd sizes.
DRY_RUN_SHAPES = [(40, 72), (24, 33)]
DRY_RUN_MS = [1, 17]
DRY_RUN_HELP = ("check this script without a GPU: tiny shapes on CPU tensors; timings are meaningless, ours is the "
                "CPU op there (where this build has one)")
# The most weight copies one method cycles through, where a benchmark names no other cap.
MAX_COPIES = 32


def case_list(args, shapes, ms, quick_shapes, quick_ms) -> list[tuple[int, int, int]]:
    """(N, K, M) of a benchmark: the cubes (the first only with --quick), then every shape at every M
    (the quick shapes and M with --quick); two tiny shapes at M = 1 and 17 for --cpu-dry-run."""
    if args.cpu_dry_run:
        return [(N, K, M) for N, K in DRY_RUN_SHAPES for M in DRY_RUN_MS]
    if args.quick:
        return [(n, n, n) for n in CUBES[:1]] + [(N, K, M) for N, K in quick_shapes for M in quick_ms]
    return [(n, n, n) for n in CUBES] + [(N, K, M) for N, K in shapes for M in ms]


def add_common_args(p: argparse.ArgumentParser, name: str, quick_help: str, rep_ms: float,
                    dry_run_help: str = DRY_RUN_HELP) -> None:
    """The options every GPU benchmark of an op has; its JSON goes to bench/results/<name>_gpu.json."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--rep-ms", type=float, default=rep_ms, help="GPU time measured per method and case")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (the cases left are listed as skipped), so "
                        "that a time-limited run still writes its JSON and table")
    p.add_argument("--cpu-dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                  f"{name}_gpu.json"))


def pick_device(args, name: str):
    """(device, timer) for the run: device time from CUDA events on the GPU, or wall time for
    --cpu-dry-run (its JSON then named *_cpu_dry_run.json); None, said on stderr, without either."""
    if args.cpu_dry_run:
        args.out = os.path.join(os.path.dirname(args.out), f"{name}_gpu_cpu_dry_run.json")
        return torch.device("cpu"), wall_times_us
    if torch.cuda.is_available():
        return torch.device("cuda"), gpu_times_us
    print(f"bench_{name}_gpu: no CUDA device (--cpu-dry-run checks the script without one)", file=sys.stderr)
    return None


def start(doc: str, name: str, quick_help: str, rep_ms: float, argv=None, dry_run_help: str = DRY_RUN_HELP):
    """A benchmark's options parsed (add_common_args, described by doc's first line) and its device
    picked (pick_device), torchslim imported (its ops registered): (args, device, timer), or None where
    there is neither a GPU nor --cpu-dry-run."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    add_common_args(p, name, quick_help, rep_ms, dry_run_help)
    args = p.parse_args(argv)
    picked = pick_device(args, name)
    if picked is None:
        return None
    import torchslim  # noqa: F401  (registers the ops)

    return (args, *picked)


def copies_for(weight_bytes: int, dev: torch.device, max_copies: int = MAX_COPIES) -> int:
    """How many weight copies exceed twice the L2 (capped at max_copies)."""
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20) if dev.type == "cuda" else 1 << 20
    return max(1, min(max_copies, math.ceil(2 * l2 / max(1, weight_bytes))))


class Rotating:
    """Calls fns[0], fns[1], ... in turn: one weight copy per call."""

    def __init__(self, fns):
        self.fns, self.i = fns, 0

    def __call__(self):
        fn = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return fn()


def sync(dev: torch.device) -> None:
    """Waits for the GPU's queued work (nothing to wait for on the CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gpu_times_us(fn, rep_ms: float, max_calls: int = 400) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of per-call GPU (device) times from CUDA events, in us.

    A sleep kernel first holds the stream while the host enqueues every timed call with its events,
    so each event pair spans that call's kernels only, not the host's launch latency. Where the sleep
    ended before the host had queued every call (a host slower than estimated, or a full launch
    queue that blocked it), the calls are timed again, half as many, with the hold sized on the host
    time per call just seen (up to three tries; a warning on stderr says when none held)."""
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
    for _ in range(3):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        # Hold the GPU for longer than the host needs to enqueue the calls (clock rate ~2 GHz or less).
        hold_ms = 1.5 * calls * (host_s * 1e3 + 0.02) + 1
        torch.cuda._sleep(int(hold_ms * 2e6))
        t0 = time.perf_counter()
        for s, e in events:
            s.record()
            fn()
            e.record()
        enqueue_s = (time.perf_counter() - t0) / calls
        held = not events[0][0].query()  # the first call has not started: the host queued all in time
        torch.cuda.synchronize()
        if held:
            break
        host_s, calls = max(host_s, enqueue_s), max(20, calls // 2)
    else:
        print(f"gpu_times_us: the host did not queue all {len(events)} timed calls within the hold, so some times "
              f"may include host gaps", file=sys.stderr)
    times = sorted(1e3 * s.elapsed_time(e) for s, e in events)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def wall_times_us(fn, rep_ms: float) -> tuple[float, float, float]:
    """For --cpu-dry-run only: one wall-clock sample, no statistics."""
    t0 = time.perf_counter()
    fn()
    t = (time.perf_counter() - t0) * 1e6
    return t, t, t


def back_to_back_us(fn, dev: torch.device, calls: int | None = None) -> float:
    """Wall time per call of fn called back to back (host overhead included), in us; 100 calls on
    the GPU, 2 on the CPU (a dry run) unless calls says otherwise."""
    if calls is None:
        calls = 100 if dev.type == "cuda" else 2
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / calls * 1e6


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |y - ref| relative to the largest |ref|."""
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def error_text(e: BaseException) -> str:
    """An exception's type and the first line of its message, for a case's "errors"."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def time_method(case: dict, name: str, make_fn, ref: torch.Tensor, rep_ms: float, dev: torch.device, timer,
                after_first=None):
    """Measures one method of a case: fn = make_fn(), its first call outside the timing (compiles and
    autotunes) checked against ref (case["rel_err"]), then after_first() if given, then timer(fn) into
    case["us"] and case["us_p20_p80"]. Returns fn, or None with the error in case["errors"] (a missing
    backend must not hide the other numbers)."""
    try:
        fn = make_fn()
        y = fn()
        sync(dev)
        case["rel_err"][name] = max_rel_err(y, ref)
        if after_first is not None:
            after_first()
        med, p20, p80 = timer(fn, rep_ms)
        case["us"][name] = med
        case.setdefault("us_p20_p80", {})[name] = [p20, p80]
        return fn
    except Exception as e:  # noqa: BLE001
        case["errors"][name] = error_text(e)
        return None


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_cases(todo: list, keys: tuple[str, ...], bench_one, budget_s: float | None, dev: torch.device) -> dict:
    """bench_one(*params) for every params tuple of todo (named by keys), each printed as it ends; a case
    that raises is kept with its traceback under errors; no case starts after budget_s seconds. Returns
    the JSON's {"runtime_s", "cases", "skipped_over_budget"} (the params of the cases not started)."""
    t0 = time.time()
    cases, skipped = [], []
    for params in todo:
        if budget_s is not None and time.time() - t0 > budget_s:
            skipped.append(list(params))
            continue
        try:
            cases.append(bench_one(*params))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            cases.append({**dict(zip(keys, params)), "us": {}, "rel_err": {},
                          "errors": {"case": traceback.format_exc(limit=1)}})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print("  " + " ".join(f"{k}={_fmt_value(v)}" for k, v in zip(keys, params)) + ": "
              + ", ".join(f"{k}={v:.1f}us" for k, v in cases[-1]["us"].items())
              + "".join(f"  [{k}: {v}]" for k, v in cases[-1]["errors"].items()), flush=True)
    return {"runtime_s": round(time.time() - t0, 1), "cases": cases, "skipped_over_budget": skipped}


def device_info(dev: torch.device, dry_run: str = "cpu (dry run)") -> dict:
    """The GPU's name, SM count, compute capability and L2 size for the JSON; {"device": dry_run} on the CPU."""
    if dev.type != "cuda":
        return {"device": dry_run}
    props = torch.cuda.get_device_properties(dev)
    return {"device": props.name, "sm_count": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}", "l2_bytes": getattr(props, "L2_cache_size", None)}


def result_header(benchmark: str, device: dict, with_triton: bool = True) -> dict:
    """The first keys of a benchmark's JSON: its name, the date, the device, and the versions."""
    import torchslim

    versions = {"torch": torch.__version__}
    if with_triton:
        import triton

        versions["triton"] = triton.__version__
    return {"benchmark": benchmark,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **device, **versions, "cuda": torch.version.cuda, "torchslim": torchslim.__version__,
            "python": platform.python_version(), "info": torchslim.info()}


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


def fmt(v, digits=1):
    """A table cell: v with digits decimals, "-" for None."""
    return "-" if v is None else f"{v:.{digits}f}"


def err_cell(case: dict, name: str) -> str:
    """A table cell: the relative error of method name in case, "-" where it has none."""
    return f"{case['rel_err'][name]:.1e}" if name in case["rel_err"] else "-"


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under a header and a rule (the GPU benchmarks' printed tables)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def print_table(text: str, cases: list[dict]) -> None:
    """A benchmark's table, then the methods that raised in some case (their errors are in the JSON)."""
    print(text)
    failed = sorted({k for c in cases for k in c["errors"]})
    if failed:
        print(f"errors in: {', '.join(failed)} (see the JSON)")


def print_skipped(skipped: list, budget_s: float | None, keys: tuple[str, ...] = ("N", "K", "M")) -> None:
    """The cases a --budget-s cut left out, if any, each as its parameters named by keys."""
    if skipped:
        print(f"not run (past --budget-s {budget_s:g}): " + ", ".join(
            " ".join(f"{k}={_fmt_value(v)}" for k, v in zip(keys, case)) for case in skipped))


def finish(result: dict, args, title: str, legend: str, table_text: str, skip_keys: tuple[str, ...] = ("N", "K", "M"),
           notes: tuple[str, ...] = ()) -> int:
    """A benchmark's end: its JSON written (write_result), then its title, legend and table (print_table),
    any notes, and the cases past --budget-s (print_skipped, each named by skip_keys). Returns 0."""
    write_result(result, args.out)
    print("\n" + title)
    print(legend)
    print_table(table_text, result["cases"])
    for note in notes:
        print(note)
    print_skipped(result["skipped_over_budget"], args.budget_s, skip_keys)
    return 0
