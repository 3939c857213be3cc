"""The GPU's two ceilings, measured in the same run as the benchmarks (METHOD: measure, don't quote the
datasheet): device-memory bandwidth (a large device-to-device copy, bytes read + written) and the
matrix rates of cuBLAS bf16 and torch._int_mm int8 at 8192^3 on random data. The benchmarks' roofline
statements divide by these.

    python bench/gpu/ceilings.py [--out bench/results/h200/ceilings_gpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def median_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                  "h200", "ceilings_gpu.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ceilings: no CUDA device", file=sys.stderr)
        return 2
    n_bytes = 4 << 30
    src = torch.randn(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16_ms = median_ms(lambda: a @ b)
    ai = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device="cuda", dtype=torch.int8)
    int_ms = median_ms(lambda: torch._int_mm(ai, bi.t()))
    flops = 2 * n**3
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "copy_GBps_read_plus_write": 2 * n_bytes / copy_ms / 1e6,
        "bf16_8192_TFLOPs": flops / bf16_ms / 1e9,
        "int8_int_mm_8192_TOPs": flops / int_ms / 1e9,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(args.out)), "w") as f:
            json.dump(result, f, indent=1)
    print("ceilings: " + ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
