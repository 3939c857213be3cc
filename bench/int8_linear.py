"""CPU benchmark: torchslim.nn.Int8Linear against the dense and int8 alternatives a user would pick.

All methods run side by side in one process, on the same inputs, interleaved round-robin:

  ours       torchslim.nn.Int8Linear.from_linear(lin)(x)        x fp32, fused per-token quant + GEMM + dequant
  fp32       F.linear(x, W, b)                                   fp32 dense (MKL / oneDNN)
  bf16       F.linear(x_bf16, W_bf16, b_bf16)                    bf16 dense (oneDNN; AMX where the CPU has it)
  intmm      per-token quant of x in torch ops, torch._int_mm(xq, Wq.t()), dequant (x_scale, w_scale, bias)
  ao         torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), qint8)  (dynamic int8, per-tensor x)

Every method owns enough independent weight copies (each its own storage) that one method's copies
together exceed --rotate-factor x the L3 size, and each call uses the next copy, so small-M cases
measure weight streaming from memory rather than the cache.

Ratios are speedups, t(baseline) / t(ours): > 1 means Int8Linear is faster.

    python bench/int8_linear.py            # full run (~2.5 min on 2 idle cores)
    python bench/int8_linear.py --quick    # ~45 s subset
    python bench/int8_linear.py --isa amx,avx512_vnni   # first ISA is "ours", the others extra columns
    python bench/int8_linear.py --x-dtype bfloat16 --methods bf16   # ours on bf16 activations vs bf16 dense
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchslim

FULL_SHAPES = [(384, 1536), (1536, 384), (768, 3072), (4096, 4096), (11008, 4096)]
FULL_MS = [1, 16, 128, 512]
QUICK_SHAPES = [(384, 1536), (4096, 4096)]
QUICK_MS = [1, 128]
BASELINES = ["fp32", "bf16", "intmm", "ao"]


# ---------------------------------------------------------------------------------------------
# machine information
# ---------------------------------------------------------------------------------------------
def _parse_size(text: str) -> int:
    """'491520K', '32 MiB', '32M', '33554432' -> bytes."""
    t = text.strip().replace("iB", "").replace("B", "").strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if t and t[-1].upper() in mult:
        return int(float(t[:-1].strip()) * mult[t[-1].upper()])
    return int(float(t))


def l3_bytes() -> tuple[int, str]:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            return _parse_size(f.read()), "sysfs cpu0/cache/index3/size"
    except (OSError, ValueError):
        pass
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("L3 cache:"):
                val = line.split(":", 1)[1].split("(")[0]
                return _parse_size(val), "lscpu"
    except (OSError, ValueError, IndexError):
        pass
    return 32 << 20, "default (32 MB)"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    want = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
            "avx512_fp16"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(want & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def lock_memory() -> str:
    """Two settings of the process's memory that benchmarks on these VMs need, applied where the process
    may; returns what was done.
    - mlockall(MCL_CURRENT | MCL_FUTURE): these machines run DAMON with a pageout scheme (kdamond,
      physical addresses): it unmaps the rotated weight copies while they sit cold between a method's
      loops, and the next pass minor-faults them back, one fault per 4 KiB page (the sys time of a run,
      and swings of up to 2x between identical loops, measured on the CSR benchmark). Locked pages are
      left alone.
    - glibc's mmap threshold fixed at 64 KiB (mallopt(M_MMAP_THRESHOLD)): by default it grows to the size
      of the largest block freed (up to 32 MiB), after which the next cases' weight copies below that
      size come from reused heap memory instead of fresh mappings, and that memory streamed up to 2x
      slower (the low-rank benchmark's 8 MiB factors at 4096 x 4096, M = 1: 1.2x dense in a full run,
      2.0x in a run of that layer alone, and 2.0x in the full run with the threshold fixed)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    done = ["locked" if libc.mlockall(3) == 0 else f"not locked: {os.strerror(ctypes.get_errno())}"]
    done.append("mmap threshold 64 KiB" if libc.mallopt(-3, 65536) == 1 else "mmap threshold unchanged")  # M_MMAP_THRESHOLD
    return ", ".join(done)


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class CpuLoadMeter:
    """CPU time used by *other* processes (and stolen by the hypervisor) while a case ran, as a
    fraction of all CPUs' wall time: from /proc/stat minus this process's own os.times()."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1
        self.start = self._snap()

    def _snap(self):
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(v[i] for i in (0, 1, 2, 5, 6) if i < len(v)) / self.hz  # user nice system irq softirq
        steal = (v[7] / self.hz) if len(v) > 7 else 0.0
        t = os.times()
        return time.perf_counter(), busy, steal, t.user + t.system

    def read(self) -> dict | None:
        end = self._snap()
        if self.start is None or end is None:
            return None
        wall = max(end[0] - self.start[0], 1e-9) * self.ncpu
        other = (end[1] - self.start[1]) - (end[3] - self.start[3])
        return {"other_cpu_frac": round(max(other, 0.0) / wall, 3),
                "steal_frac": round((end[2] - self.start[2]) / wall, 3)}


def measure_read_bw(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Streaming-read bandwidth (GB/s) of a torch reduction over a buffer much larger than the
    L3 (information only; the memory ceiling used for fractions is --mem-gbs)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    del buf
    return nbytes / best / 1e9


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------
def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    wq = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return wq, scale.float()


def hand_rolled_int8(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What a user would write around torch._int_mm: per-token symmetric quant of x, int8 GEMM
    against the (N, K) int8 weight viewed as (K, N), dequant with x_scale * w_scale, add bias."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
    xq = torch.round(x / x_scale).clamp_(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, wq.t())
    return torch.addcmul(bias, acc.to(torch.float32), x_scale * w_scale)


def make_ao(lin: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


def clone_module_buffers(m: nn.Module) -> nn.Module:
    """A copy of a parameter-free leaf module whose buffers are cloned (own storage); cheaper than
    copy.deepcopy, which matters when building thousands of copies of a small layer."""
    assert not m._parameters and not m._modules
    c = copy.copy(m)
    c._buffers = {k: (None if v is None else v.clone()) for k, v in m._buffers.items()}
    c._non_persistent_buffers_set = set(m._non_persistent_buffers_set)
    return c


def nbytes_of(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Method:
    """A callable over a set of independent copies; each call uses the next copy."""

    def __init__(self, name: str, copies: list, call, weight_bytes: int, act_bytes: int, ceiling: str):
        self.name = name
        self.copies = copies
        self.call = call
        self.weight_bytes = weight_bytes  # bytes of weight-side data one call reads
        self.act_bytes = act_bytes  # activation in + out bytes
        self.ceiling = ceiling  # which compute ceiling its fraction refers to
        self.pos = 0
        self.isa = None  # for "ours" variants: the torchslim ISA to set before timing

    def __call__(self):
        c = self.copies[self.pos]
        self.pos = (self.pos + 1) % len(self.copies)
        return self.call(c)


def n_copies_for(copy_bytes: int, args, l3: int) -> int:
    target = args.rotate_factor * l3
    n = max(1, math.ceil(target / copy_bytes))
    cap_mem = max(1, int(args.max_method_mb * (1 << 20) // copy_bytes))
    return max(1, min(n, cap_mem, args.max_copies))


def ratio_cell(values: list[float]) -> str:
    """A README table cell for one ratio over the runs: the median, and the range where there are several."""
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}x" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def describe_machine(args, out=print) -> tuple[dict, int]:
    """The run's machine record (CPU, flags, threads, torch, ISA, L3, date, load, memory lock) and the
    L3 size weights are rotated beyond; prints the header the sparse and low-rank benchmarks share."""
    l3, l3_src = l3_bytes()
    machine = {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "torchslim_cpu_isa": torchslim.cpu_isa(), "l3_bytes": l3,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "loadavg_before": loadavg(), "memory": lock_memory()}
    out(f"CPU: {machine['cpu_model']}  flags: {' '.join(machine['cpu_flags'])}")
    out(f"torch {torch.__version__}, threads {machine['threads']}, torchslim cpu_isa={torchslim.cpu_isa()}; "
        f"L3 {l3 >> 20} MiB ({l3_src}), weights rotated over >= {args.rotate_factor:g} x L3 "
        f"(cap {args.max_method_mb:g} MiB per method)")
    return machine, l3


def round_robin_copies(makers: dict, args, l3: int) -> dict[str, list]:
    """name -> the copies of each method's weight: makers maps name -> (first copy, its bytes,
    clone(copy)); each method gets n_copies_for its bytes. The copies are made round-robin across the
    methods: on these VMs, memory allocated at one time can stream at half the speed of memory
    allocated at another (host page backing), and one method whose every copy came from such a stretch
    ran 2x slower through a whole case."""
    counts = {name: n_copies_for(b, args, l3) for name, (_, b, _) in makers.items()}
    copies = {name: [first] for name, (first, _, _) in makers.items()}
    for i in range(1, max(counts.values())):
        for name, (first, _, clone) in makers.items():
            if i < counts[name]:
                copies[name].append(clone(first))
    return copies


def build_methods(N: int, K: int, args, l3: int):
    """Returns (lin, specs, build seconds per method); specs: name -> (copies, call(copy, x),
    weight-side bytes per copy, activation element bytes, ceiling key)."""
    g = torch.Generator().manual_seed(1000 + N + 7 * K)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / math.sqrt(K))
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    lin.requires_grad_(False)
    w = lin.weight.detach()
    b = lin.bias.detach()

    specs, build_s = {}, {}

    def add(name, make, call, wb, act_elem_bytes, ceiling):
        t0 = time.perf_counter()
        n = n_copies_for(wb, args, l3)
        specs[name] = (make(n), call, wb, act_elem_bytes, ceiling)
        build_s[name] = time.perf_counter() - t0

    # ours: one quantization, then copies with cloned buffers (each its own packed-weight storage)
    ours0 = torchslim.Int8Linear.from_linear(lin)
    add("ours", lambda n: [ours0] + [clone_module_buffers(ours0) for _ in range(n - 1)], lambda m, x: m(x),
        sum(nbytes_of(t) for t in (ours0.weight, ours0.weight_scale, ours0.bias)), 4, "vnni")
    if "fp32" in args.methods:
        add("fp32", lambda n: [(w.clone(), b.clone()) for _ in range(n)], lambda c, x: F.linear(x, c[0], c[1]),
            nbytes_of(w) + nbytes_of(b), 4, "fp32")
    if "bf16" in args.methods:
        wbf, bbf = w.bfloat16(), b.bfloat16()
        add("bf16", lambda n: [(wbf.clone(), bbf.clone()) for _ in range(n)], lambda c, x: F.linear(x, c[0], c[1]),
            nbytes_of(wbf) + nbytes_of(bbf), 2, "bf16")
    if "intmm" in args.methods:
        wq, ws = quantize_weight_per_channel(w)
        add("intmm", lambda n: [(wq.clone(), ws.clone(), b.clone()) for _ in range(n)],
            lambda c, x: hand_rolled_int8(x, c[0], c[1], c[2]), nbytes_of(wq) + nbytes_of(ws) + nbytes_of(b), 4, "vnni")
    if "ao" in args.methods:
        q0 = make_ao(copy.deepcopy(lin))

        def make_ao_copies(n):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return [q0] + [copy.deepcopy(q0) for _ in range(n - 1)]  # repacks: new packed storage

        # int8 weight + fp32 bias (fbgemm packed weight, per-tensor weight scale)
        add("ao", make_ao_copies, lambda m, x: m(x), N * K + 4 * N, 4, "vnni")
    return lin, specs, build_s


def check_distinct_storage(specs) -> None:
    """Every copy must own its storage (else the rotation would measure the cache)."""
    for name, (cps, *_rest) in specs.items():
        if name == "ao":
            continue  # packed params are opaque; deepcopy unpacks and repacks into new storage
        ptrs = set()
        for c in cps:
            t = c.weight if isinstance(c, nn.Module) else c[0]
            ptrs.add(t.untyped_storage().data_ptr())
        if len(ptrs) != len(cps):
            raise SystemExit(f"{name}: weight copies share storage ({len(ptrs)} distinct of {len(cps)})")


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def set_isa(name: str | None) -> None:
    if name is not None and torchslim.cpu_isa() != name:
        torchslim.set_cpu_isa(name)


def timed_loop(m: Method, iters: int) -> float:
    set_isa(m.isa)
    t0 = time.perf_counter()
    for _ in range(iters):
        m()
    return (time.perf_counter() - t0) / iters


def calibrate(m: Method, target_s: float, max_iters: int) -> int:
    """Warm-up doubling as calibration: runs calls until ~target_s has passed (at least 2 calls),
    returns the iteration count of a timed loop that lasts ~target_s."""
    set_isa(m.isa)
    m()  # first call: allocations, oneDNN primitive creation
    n, t0 = 0, time.perf_counter()
    while True:
        m()
        n += 1
        el = time.perf_counter() - t0
        if (n >= 2 and el >= target_s) or el >= 4 * target_s:
            break
    per_call = el / n
    return max(1, min(max_iters, round(target_s / per_call)))


def bench_case(methods: list[Method], repeats: int, target_s: float, max_iters: int) -> dict[str, dict]:
    iters = {m.name: calibrate(m, target_s, max_iters) for m in methods}
    samples = {m.name: [] for m in methods}
    for r in range(repeats):
        k = r % len(methods)  # rotate the starting method so no method is always first
        for m in methods[k:] + methods[:k]:
            samples[m.name].append(timed_loop(m, iters[m.name]))
    out = {}
    for m in methods:
        s = sorted(samples[m.name])
        out[m.name] = {
            "median_s": statistics.median(s),
            "min_s": s[0],
            "max_s": s[-1],
            "iters": iters[m.name],
            "repeats": repeats,
        }
    return out


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------
def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| (elementwise relative error is meaningless near zero outputs)."""
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def fmt_t(s: float) -> str:
    """seconds -> microseconds, as text."""
    us = s * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--x-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="activation dtype of ours (in and out); bfloat16 is the like-for-like comparison "
                        "with bf16 dense: run it with --methods bf16")
    p.add_argument("--quick", action="store_true", help="~45 s subset (2 shapes, M in {1, 128}, fewer repeats)")
    p.add_argument("--shapes", type=str, default=None, help="comma list of NxK (out x in), e.g. 4096x4096,384x1536")
    p.add_argument("--ms", type=str, default=None, help="comma list of token counts M")
    p.add_argument("--methods", type=str, default=",".join(BASELINES), help=f"baselines to run, subset of {BASELINES}")
    p.add_argument("--isa", type=str, default=None,
                   help="torchslim CPU ISA for 'ours' (scalar, avx2, avx512_vnni, amx); a comma list adds the "
                        "further ISAs as extra columns ours[isa], timed on the same copies")
    p.add_argument("--repeats", type=int, default=None, help="timed loops per method per case (default 7, quick 5)")
    p.add_argument("--target-ms", type=float, default=None,
                   help="length of one timed loop (default 60, quick 30); big cases run 1 call per loop")
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--l3-mb", type=float, default=None, help="override the L3 size read from sysfs/lscpu")
    p.add_argument("--rotate-factor", type=float, default=3.0,
                   help="one method's weight copies together exceed this many L3 sizes")
    p.add_argument("--max-method-mb", type=float, default=1600.0,
                   help="memory cap for one method's copies (all methods of a shape are alive together)")
    p.add_argument("--max-copies", type=int, default=4096)
    p.add_argument("--vnni-gops", type=float, default=800.0, help="int8 ceiling (AVX-512 VNNI, 2 threads), GOP/s")
    p.add_argument("--bf16-gflops", type=float, default=450.0, help="bf16 ceiling (AVX512_BF16), GFLOP/s")
    p.add_argument("--fp32-gflops", type=float, default=210.0, help="fp32 FMA ceiling, GFLOP/s")
    p.add_argument("--mem-gbs", type=float, default=33.0, help="streaming-read ceiling, GB/s")
    p.add_argument("--tol", type=float, default=0.05, help="max relative error of ours vs fp32 before aborting")
    p.add_argument("--no-bw-probe", action="store_true", help="skip the informational streaming-read probe")
    p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "results", "int8_linear_cpu.json"))
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    load_before = loadavg()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"torch\.ao")

    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else (QUICK_SHAPES if args.quick else FULL_SHAPES))
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else FULL_MS)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in BASELINES:
            p.error(f"unknown method {m!r}; choose from {BASELINES}")
    repeats = args.repeats or (5 if args.quick else 7)
    target_s = (args.target_ms or (30.0 if args.quick else 60.0)) / 1e3

    isas = [s for s in args.isa.split(",") if s] if args.isa else [None]
    for name in isas:
        if name is not None:
            torchslim.set_cpu_isa(name)  # raises ValueError on an unknown / unsupported name
    set_isa(isas[0])
    primary_isa = torchslim.cpu_isa()

    if args.l3_mb is not None:
        l3, l3_src = int(args.l3_mb * (1 << 20)), "--l3-mb"
    else:
        l3, l3_src = l3_bytes()

    ceilings = {"vnni": args.vnni_gops, "bf16": args.bf16_gflops, "fp32": args.fp32_gflops}
    ceiling_desc = {"vnni": f"AVX-512 VNNI int8 {args.vnni_gops:g} GOP/s",
                    "bf16": f"AVX512_BF16 {args.bf16_gflops:g} GFLOP/s",
                    "fp32": f"fp32 FMA {args.fp32_gflops:g} GFLOP/s"}

    machine = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "l3_bytes": l3,
        "l3_source": l3_src,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "quantized_engine": torch.backends.quantized.engine,
        "torchslim_cpu_isa": primary_isa,
        "torchslim_info": torchslim.info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_before": load_before,
        "memory": lock_memory(),
    }
    print(f"CPU: {machine['cpu_model']}  flags: {' '.join(machine['cpu_flags'])}")
    print(f"torch {torch.__version__}, threads {machine['threads']}, quantized engine {machine['quantized_engine']}, "
          f"torchslim {torchslim.info()['torchslim']} cpu_isa={primary_isa} (best {torchslim.info()['best_cpu_isa']})"
          + (f", extra ISAs: {', '.join(isas[1:])}" if len(isas) > 1 else ""))
    print(f"L3 {l3 / (1 << 20):.0f} MiB ({l3_src}); every method rotates weight copies totalling "
          f">= {args.rotate_factor:g} x L3 = {args.rotate_factor * l3 / (1 << 20):.0f} MiB "
          f"(cap {args.max_method_mb:g} MiB, {args.max_copies} copies)")
    probe = CpuLoadMeter()
    time.sleep(1.0)
    busy_now = probe.read()
    machine["other_cpu_frac_at_start"] = busy_now["other_cpu_frac"] if busy_now else None
    print(f"load average before: {load_before}; other processes' CPU share over 1 s now: "
          + (f"{100 * busy_now['other_cpu_frac']:.0f}%" if busy_now else "?"))
    if busy_now and busy_now["other_cpu_frac"] > 0.05:
        print(f"  WARNING: other processes are using the CPUs; {args.threads}-thread timings will be disturbed "
              f"(see the 'busy' column)")
    if not args.no_bw_probe:
        bw = measure_read_bw()
        machine["measured_read_gbs"] = round(bw, 1)
        print(f"measured streaming read (torch sum over 1 GiB, {machine['threads']} threads): {bw:.1f} GB/s "
              f"(information only)")
    print("Ceilings (from BUILD_NOTES, measured on the reference Zen4; configurable):")
    print(f"  %VNNI -> {ceiling_desc['vnni']} (ours, intmm, ao); %bf16 -> {ceiling_desc['bf16']}; "
          f"%fp32 -> {ceiling_desc['fp32']}; %mem -> streaming read {args.mem_gbs:g} GB/s")
    if "amx_int8" in machine["cpu_flags"]:
        print("  NOTE: this CPU also has AMX; its int8 / bf16 peaks are far above the VNNI / AVX512_BF16 "
              "ceilings, so fractions > 100% are possible and the fractions are not 'headroom left'.")
    if "AMD" not in machine["cpu_model"]:
        print("  NOTE: the default ceilings come from a Zen4; on this CPU (2 FMA / VNNI ports per core) the "
              "fp32 and VNNI peaks are higher too; pass --fp32-gflops / --vnni-gops / --mem-gbs to rebase.")
    print("Ratios are speedups t(baseline) / t(ours): > 1 means Int8Linear is faster.\n", flush=True)

    rows = []
    for (N, K) in shapes:
        t_build = time.perf_counter()
        lin, specs, build_s = build_methods(N, K, args, l3)
        check_distinct_storage(specs)
        t_build = time.perf_counter() - t_build
        copies_desc = ", ".join(f"{k} {len(v[0])}x{v[2] / (1 << 20):.1f}MiB ({build_s[k]:.1f}s)"
                                for k, v in specs.items())
        print(f"[{N}x{K}] built in {t_build:.1f}s; copies: {copies_desc}", flush=True)

        for M in ms:
            gx = torch.Generator().manual_seed(M * 31 + N + K)
            x = torch.randn(M, K, generator=gx)
            x_bf = x.bfloat16()
            ops = 2.0 * M * N * K

            methods = []
            for name, (cps, call, wb, abytes, ceil) in specs.items():
                bf16_in = name == "bf16" or (name == "ours" and args.x_dtype == "bfloat16")
                xin = x_bf if bf16_in else x
                meth = Method(name, cps, (lambda c, _call=call, _x=xin: _call(c, _x)), wb,
                              (2 if bf16_in else abytes) * (M * K + M * N), ceil)
                if name == "ours":
                    meth.isa = isas[0]
                methods.append(meth)
                if name == "ours":
                    for extra in isas[1:]:
                        em = Method(f"ours[{extra}]", cps, meth.call, wb, meth.act_bytes, ceil)
                        em.isa = extra
                        methods.append(em)

            # correctness: against fp32 F.linear, on the first and the last copy of ours
            ref = F.linear(x, lin.weight, lin.bias)
            errs = {}
            with torch.no_grad():
                for m in methods:
                    set_isa(m.isa)
                    cps = m.copies
                    e = max(rel_err(m.call(cps[0]), ref), rel_err(m.call(cps[-1]), ref))
                    errs[m.name] = e
            set_isa(isas[0])
            bad = [f"{k}={v:.3g}" for k, v in errs.items() if k.startswith("ours") and not v <= args.tol]
            if bad:
                raise SystemExit(f"[{N}x{K} M={M}] ours is wrong vs fp32 ({', '.join(bad)} > tol {args.tol}); "
                                 f"refusing to time a broken kernel")

            meter = CpuLoadMeter()
            with torch.no_grad():
                res = bench_case(methods, repeats, target_s, args.max_iters)
            interference = meter.read()
            set_isa(isas[0])

            t_ours = res["ours"]["median_s"]
            row = {"N": N, "K": K, "M": M, "ops": ops, "max_rel_err": errs, "loadavg": loadavg(),
                   "interference": interference, "methods": {}}
            for m in methods:
                r = res[m.name]
                t = r["median_s"]
                gops = ops / t / 1e9
                byts = m.weight_bytes + m.act_bytes
                row["methods"][m.name] = {
                    **r,
                    "copies": len(m.copies),
                    "bytes": byts,
                    "gops": gops,
                    "gbs": byts / t / 1e9,
                    "ceiling": ceiling_desc[m.ceiling],
                    "frac_compute_ceiling": gops / ceilings[m.ceiling],
                    "frac_mem_ceiling": byts / t / 1e9 / args.mem_gbs,
                    "frac_roofline": max(ops / (ceilings[m.ceiling] * 1e9), byts / (args.mem_gbs * 1e9)) / t,
                    "speedup_of_ours": t / t_ours,
                }
            row["bytes"] = row["methods"]["ours"]["bytes"]
            rows.append(row)
            o = row["methods"]["ours"]
            print(f"  M={M:4d}: ours {fmt_t(t_ours)}us {o['gops']:.0f} GOP/s ({100 * o['frac_compute_ceiling']:.0f}% "
                  f"VNNI, {o['gbs']:.1f} GB/s = {100 * o['frac_mem_ceiling']:.0f}% mem) | "
                  + " ".join(f"{k} {fmt_t(v['median_s'])}us (x{v['speedup_of_ours']:.2f})"
                             for k, v in row["methods"].items() if k != "ours")
                  + " | rel err " + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
                  + (f" | other procs {100 * interference['other_cpu_frac']:.0f}% CPU, steal "
                     f"{100 * interference['steal_frac']:.0f}%" if interference else ""), flush=True)
        del lin, specs, methods
        gc.collect()

    load_after = loadavg()
    machine["loadavg_after"] = load_after
    elapsed = time.perf_counter() - t_start

    # ---- tables ----
    base = [b for b in BASELINES if b in args.methods]
    extras = [f"ours[{i}]" for i in isas[1:]]
    headers = (["N x K", "M", "ours us", "GOP/s", "%VNNI", "GB/s", "%mem"]
               + [f"{b} us" for b in base] + [f"{e} us" for e in extras]
               + [f"vs {b}" for b in base] + [f"vs {e}" for e in extras] + ["rel err", "busy"])
    trows = []
    for row in rows:
        mm = row["methods"]
        o = mm["ours"]
        trows.append([f"{row['N']}x{row['K']}", str(row["M"]), fmt_t(o["median_s"]), f"{o['gops']:.0f}",
                      f"{100 * o['frac_compute_ceiling']:.0f}%", f"{o['gbs']:.1f}",
                      f"{100 * o['frac_mem_ceiling']:.0f}%"]
                     + [fmt_t(mm[b]["median_s"]) for b in base + extras]
                     + [f"{mm[b]['speedup_of_ours']:.2f}x" for b in base + extras]
                     + [f"{row['max_rel_err']['ours']:.1e}",
                        "?" if not row["interference"] else f"{100 * row['interference']['other_cpu_frac']:.0f}%"])
    print("\n## torchslim Int8Linear (CPU) vs alternatives; times = median per call; "
          "'vs X' = t(X) / t(ours), > 1 means ours is faster")
    print(f"%VNNI = GOP/s / {ceiling_desc['vnni']}; %mem = (weight + activation in/out bytes) / time / "
          f"{args.mem_gbs:g} GB/s; rel err = max|y - y_fp32| / max|y_fp32|;\nbusy = CPU share taken by other "
          f"processes while the row was timed (rows with busy >~ 5% are disturbed: a descheduled thread stalls "
          f"every parallel region)\n")
    print(md_table(headers, trows))

    headers2 = ["N x K", "M"] + [f"{n} GOP/s (%ceil)" for n in ["ours"] + extras + base]
    trows2 = []
    for row in rows:
        mm = row["methods"]
        trows2.append([f"{row['N']}x{row['K']}", str(row["M"])]
                      + [f"{mm[n]['gops']:.0f} ({100 * mm[n]['frac_compute_ceiling']:.0f}%)"
                         for n in ["ours"] + extras + base])
    print("\n## Throughput per method; %ceil: ours/intmm/ao -> VNNI "
          f"{args.vnni_gops:g}, bf16 -> {args.bf16_gflops:g}, fp32 -> {args.fp32_gflops:g}\n")
    print(md_table(headers2, trows2))

    print(f"\nload average before {load_before}, after {load_after}; total {elapsed:.0f}s")

    result = {
        "benchmark": "torchslim.nn.Int8Linear CPU",
        "machine": machine,
        "config": {
            "shapes": [list(s) for s in shapes], "ms": ms, "methods": ["ours"] + extras + base,
            "isas": isas, "x_dtype": args.x_dtype, "repeats": repeats, "target_loop_s": target_s,
            "rotate_factor": args.rotate_factor, "max_method_mb": args.max_method_mb,
            "ceilings": {"vnni_gops": args.vnni_gops, "bf16_gflops": args.bf16_gflops,
                         "fp32_gflops": args.fp32_gflops, "mem_gbs": args.mem_gbs},
            "quick": args.quick,
            "notes": "time = median over repeats of a timed loop (perf_counter); methods interleaved "
                     "round-robin per repeat; speedup_of_ours = t(method) / t(ours); bytes = weight-side "
                     "bytes + activation in/out; rel err = max|y - y_fp32| / max|y_fp32|",
        },
        "elapsed_s": round(elapsed, 1),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
