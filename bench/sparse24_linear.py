"""CPU benchmark: torchslim.nn.Sparse24Linear (2:4) against the dense layer a user would keep.

Side by side in one process, on the same pruned weight and inputs, interleaved round-robin:

  ours bf16   Sparse24Linear.from_linear(lin_bf16)(x_bf16)   values + metadata, never expanded in memory
  bf16        F.linear(x_bf16, W_bf16, b)                    dense bf16 (oneDNN; AMX where the CPU has it)
  ours fp32   Sparse24Linear.from_linear(lin)(x)
  fp32        F.linear(x, W, b)                              dense fp32

Every method rotates independent weight copies totalling >= --rotate-factor x L3 (each call the next
copy), so small-M cases measure weights streamed from memory, not the cache. Speedup = t(dense) /
t(ours). At M = 1 the time is the weight's bytes: 2:4 reads K/2 values + K/8 metadata bytes per row
against K values, so the speedup's ceiling is 2 / 1.125 = 1.78x (bf16) and 4 / 2.125 = 1.88x (fp32);
"% limit" is the fraction of it reached.

    python bench/sparse24_linear.py            # full run (~4 min on 2 idle cores)
    python bench/sparse24_linear.py --quick    # 2 shapes, M in {1, 16, 128}
    python bench/sparse24_linear.py --isa avx512_vnni   # the AVX-512 kernels instead of AMX
    python bench/sparse24_linear.py --report bench/results/sparse24_linear_cpu*.json   # README table
    python bench/sparse24_linear.py --per-call --shapes 4096x4096,11008x4096   # M = 1, call by call

--per-call alternates single calls of ours and dense (each on its next weight copy) and reports
percentiles of the per-call times: on a machine whose memory bandwidth drifts (these shared ones),
the loops of the default mode put whole loops of one method into a slow spell, call-by-call
alternation exposes both to the same conditions.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchslim
from torchslim.compress import prune_24

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int8_linear import (FULL_MS, FULL_SHAPES, Method, bench_case, describe_machine,  # noqa: E402
                         md_table, ratio_cell, rel_err, round_robin_copies)

QUICK_SHAPES = [(384, 1536), (4096, 4096)]
QUICK_MS = [1, 16, 128]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def clone_buffers(m: nn.Module) -> nn.Module:
    c = torchslim.Sparse24Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.values.dtype)
    c.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    return c


def copies_for(N: int, K: int, dtype: torch.dtype, args, l3: int) -> tuple[dict, nn.Linear]:
    """name -> (copies, call(copy, x)) for ours and dense, and the (pruned) dense layer."""
    g = torch.Generator().manual_seed(1000 + N + 7 * K)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(prune_24(torch.randn(N, K, generator=g) / math.sqrt(K)))
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    lin = lin.to(dtype).requires_grad_(False)
    ours0 = torchslim.Sparse24Linear.from_linear(lin)
    ours_bytes = sum(t.numel() * t.element_size() for t in (ours0.values, ours0.metadata, ours0.bias))
    dense_bytes = sum(t.numel() * t.element_size() for t in (lin.weight, lin.bias))
    w, b = lin.weight.detach(), lin.bias.detach()
    copies = round_robin_copies({"ours": (ours0, ours_bytes, clone_buffers),
                                 "dense": ((w.clone(), b.clone()), dense_bytes, lambda c: (c[0].clone(), c[1].clone()))},
                                args, l3)
    ours, dense = copies["ours"], copies["dense"]
    return {"ours": (ours, lambda m, x: m(x)), "dense": (dense, lambda c, x: F.linear(x, c[0], c[1]))}, lin


LAYERS = {(384, 1536): "MiniLM FFN in", (1536, 384): "MiniLM FFN out", (768, 3072): "BERT-base FFN out",
          (4096, 4096): "Llama-7B attention", (11008, 4096): "Llama-7B MLP up"}


def report(paths: list[str]) -> int:
    """The README's table from the JSON of one or more runs: per layer and M, the speed-up at bf16
    and at fp32 (the median over the runs, and their range when there are several)."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    rows: dict = {}
    for data in runs:
        for r in data["rows"]:
            rows.setdefault((r["N"], r["K"], r["M"], r["dtype"]), []).append(r)
    m = runs[0]["machine"]
    print(f"<!-- {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}; runs: "
          + ", ".join(d["machine"]["date"] for d in runs) + " -->")
    print("| layer (N x K) | M | vs bf16 dense (bf16 x) | vs fp32 dense (fp32 x) |")
    print("|---|---:|---:|---:|")
    order = list(LAYERS)
    previous = None
    for (N, K, M) in sorted({k[:3] for k in rows}, key=lambda k: (order.index(k[:2]) if k[:2] in LAYERS else 99, k[2])):
        label = f"{LAYERS.get((N, K), '')} {N}x{K}".strip() if (N, K) != previous else ""
        previous = (N, K)
        cells = []
        for dt in ("bf16", "fp32"):
            rs = rows.get((N, K, M, dt))
            if not rs:
                cells.append("-")
                continue
            ups = [r["speedup"] for r in rs]
            cell, med = ratio_cell(ups), statistics.median(ups)
            if M == 1:
                cell += f", {100 * med / rs[0]['byte_limit']:.0f}% of {rs[0]['byte_limit']:.2f}x"
            cells.append(cell)
        print(f"| {label} | {M} | {cells[0]} | {cells[1]} |")
    return 0


def per_call(shapes, dtypes, args, l3: int) -> list[dict]:
    rows = []
    for N, K in shapes:
        for name in dtypes:
            dtype = DTYPES[name]
            specs, _ = copies_for(N, K, dtype, args, l3)
            (ours, call_ours), (dense, call_dense) = specs["ours"], specs["dense"]
            x = torch.randn(1, K, generator=torch.Generator().manual_seed(1)).to(dtype)
            times = {"ours": [], "dense": []}
            for i in range(args.calls + 20):
                for key, cps, call in (("dense", dense, call_dense), ("ours", ours, call_ours)):
                    t0 = time.perf_counter()
                    call(cps[i % len(cps)], x)
                    if i >= 20:  # warm-up calls are not counted
                        times[key].append(time.perf_counter() - t0)
            pct = {k: {q: sorted(v)[int(q / 100 * (len(v) - 1))] for q in (10, 50, 90)} for k, v in times.items()}
            limit = (dtype.itemsize * K) / (dtype.itemsize * K / 2 + K / 8)
            ratio = pct["dense"][50] / pct["ours"][50]
            rows.append({"N": N, "K": K, "dtype": name, "percentiles_s": pct, "speedup_p50": ratio, "byte_limit": limit})
            print(f"{N}x{K} {name} M=1: ours p10/p50/p90 {pct['ours'][10] * 1e6:.0f}/{pct['ours'][50] * 1e6:.0f}/"
                  f"{pct['ours'][90] * 1e6:.0f} us, dense {pct['dense'][10] * 1e6:.0f}/{pct['dense'][50] * 1e6:.0f}/"
                  f"{pct['dense'][90] * 1e6:.0f} us: p50 speedup {ratio:.2f}x ({100 * ratio / limit:.0f}% of {limit:.2f}x)",
                  flush=True)
            del specs
    return rows


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:
        return report(argv[1:] or [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                "sparse24_linear_cpu.json")])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", type=str, default=None, help="comma list of NxK (out x in)")
    p.add_argument("--ms", type=str, default=None, help="comma list of token counts M")
    p.add_argument("--dtypes", type=str, default="bf16,fp32")
    p.add_argument("--isa", type=str, default=None, help="torchslim CPU ISA for ours (default: the best)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--target-ms", type=float, default=None)
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--rotate-factor", type=float, default=3.0)
    p.add_argument("--max-method-mb", type=float, default=1200.0)
    p.add_argument("--max-copies", type=int, default=4096)
    p.add_argument("--per-call", action="store_true", help="M = 1 only, single calls alternated (see above)")
    p.add_argument("--calls", type=int, default=300, help="--per-call: timed calls per method")
    p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "results", "sparse24_linear_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.isa:
        torchslim.set_cpu_isa(args.isa)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else (QUICK_SHAPES if args.quick else FULL_SHAPES))
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else FULL_MS)
    repeats = args.repeats or (5 if args.quick else 7)
    target_s = (args.target_ms or (30.0 if args.quick else 50.0)) / 1e3
    machine, l3 = describe_machine(args)
    print("Speedup = t(dense) / t(Sparse24Linear), same dtype, same pruned weight.\n", flush=True)
    if args.per_call:
        rows = per_call(shapes, [d for d in args.dtypes.split(",") if d], args, l3)
        out = args.out.replace(".json", "_per_call.json") if args.out.endswith("sparse24_linear_cpu.json") else args.out
        with open(out, "w") as fh:
            json.dump({"machine": machine, "args": vars(args), "per_call": rows}, fh, indent=1)
        print(f"wrote {out}")
        return 0
    rows, table = [], []
    for N, K in shapes:
        for name in [d for d in args.dtypes.split(",") if d]:
            dtype = DTYPES[name]
            specs, lin = copies_for(N, K, dtype, args, l3)
            limit = (dtype.itemsize * K) / (dtype.itemsize * K / 2 + K / 8)
            for M in ms:
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
                methods = [Method(name, cps, (lambda c, _call=call, _x=x: _call(c, _x)), 0, 0, "")
                           for name, (cps, call) in specs.items()]
                err = rel_err(specs["ours"][0][0](x), F.linear(x.float(), lin.weight.float(), lin.bias.float()))
                res = bench_case(methods, repeats, target_s, args.max_iters)
                t_ours, t_dense = res["ours"]["median_s"], res["dense"]["median_s"]
                speedup = t_dense / t_ours
                gflops = 2 * M * N * K / t_ours / 1e9  # dense-equivalent work
                row = {"N": N, "K": K, "M": M, "dtype": name, "ours": res["ours"], "dense": res["dense"],
                       "speedup": speedup, "byte_limit": limit, "rel_err_vs_fp32": err, "gflops_dense_equiv": gflops}
                rows.append(row)
                table.append([f"{N}x{K}", name, str(M), f"{t_ours * 1e6:.0f}", f"{t_dense * 1e6:.0f}",
                              f"{speedup:.2f}x", f"{100 * speedup / limit:.0f}%" if M == 1 else "", f"{err:.1e}"])
                print(md_table(["N x K", "dtype", "M", "ours us", "dense us", "speedup", "% limit", "rel err"],
                               table[-1:]).splitlines()[-1], flush=True)
            del specs
    print("\n" + md_table(["N x K", "dtype", "M", "ours us", "dense us", "speedup", "% limit (M=1)", "rel err"], table))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "args": vars(args), "rows": rows}, fh, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
