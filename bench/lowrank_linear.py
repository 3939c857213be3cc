"""CPU benchmark: torchslim.nn.LowRankLinear (one fused kernel for (x V^T) U^T + b) against dense and
against the same factors as two separate linears.

Side by side in one process, on the same factors and inputs, interleaved, every method's weight copies
made round-robin with the others':

  lowrank bf16   LowRankLinear(x_bf16)                              V (r, K), U (N, r) bf16, one kernel
  two bf16       F.linear(F.linear(x_bf16, V), U, b)                 what users write: two GEMMs (oneDNN)
  bf16           F.linear(x_bf16, W_bf16, b)                         dense bf16 (oneDNN; AMX where present)
  (and the same three in fp32)

The factors are random (the kernels' speed does not depend on the values; an SVD of every benchmark
layer would cost minutes). Ranks r = K/8, K/4, K/2 where r <= min(N, K); a rank at which low rank saves
no parameters (r >= N K / (N + K), e.g. K/2 on a square layer) is still timed and marked "no saving".
Every method rotates independent weight copies totalling >= --rotate-factor x L3. Ratios are
t(baseline) / t(lowrank) in the same dtype. At r = K/4 on a square layer low rank reads and multiplies
half of dense's bytes and FLOPs: 2x is the limit.

    python bench/lowrank_linear.py --dtypes bf16   # 5 layers x 3 ranks x M in 1, 16, 128, 512
    python bench/lowrank_linear.py --dtypes fp32   # the same in fp32 (default: both in one process)
    python bench/lowrank_linear.py --quick         # 4096x4096 at r = K/4, M in 1, 16, 128
    python bench/lowrank_linear.py --report bench/results/lowrank_linear_cpu_*.json   # README tables

The README's runs take each dtype in its own process (half the memory held at once: on these VMs the
speed of memory varies with when and how it was allocated, see lock_memory in bench/int8_linear.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import torchslim
from torchslim.compress import max_useful_rank

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int8_linear import (FULL_MS, FULL_SHAPES, Method, bench_case, describe_machine,  # noqa: E402
                         md_table, ratio_cell, rel_err, round_robin_copies)

LAYERS = {(384, 1536): "MiniLM FFN in", (1536, 384): "MiniLM FFN out", (768, 3072): "BERT-base FFN out",
          (4096, 4096): "Llama-7B attention", (11008, 4096): "Llama-7B MLP up"}
RANK_DIVISORS = [8, 4, 2]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# (ours, baseline) pairs whose ratio the tables report
RATIOS = {"vs bf16": ("lowrank bf16", "bf16"), "vs two bf16": ("lowrank bf16", "two bf16"),
          "vs fp32": ("lowrank fp32", "fp32"), "vs two fp32": ("lowrank fp32", "two fp32")}


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def clone_module(m: torchslim.LowRankLinear) -> torchslim.LowRankLinear:
    c = torchslim.LowRankLinear(m.in_features, m.out_features, m.rank, dtype=m.V.dtype)
    c.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    return c


def build(N: int, K: int, r: int, dtypes: list[str], args, l3: int) -> tuple[dict, dict]:
    """name -> (copies, call(copy, x)) for every method, and the fp32 (V, U, bias, W = U V)."""
    g = torch.Generator().manual_seed(1000 + N + 7 * K + 13 * r)
    V = torch.randn(r, K, generator=g) / K**0.5
    U = torch.randn(N, r, generator=g) / r**0.5
    b = torch.randn(N, generator=g) * 0.1
    makers, calls = {}, {}
    for name in dtypes:
        dt = DTYPES[name]
        m = torchslim.LowRankLinear(K, N, r, dtype=dt)
        m.load_state_dict({"V": V.to(dt), "U": U.to(dt), "bias": b.to(dt)})
        makers[f"lowrank {name}"] = (m, nbytes(m.V, m.U, m.bias), clone_module)
        calls[f"lowrank {name}"] = lambda c, x: c(x)
        pair = (V.to(dt), U.to(dt), b.to(dt))
        makers[f"two {name}"] = (pair, nbytes(*pair), lambda c: tuple(t.clone() for t in c))
        calls[f"two {name}"] = lambda c, x: F.linear(F.linear(x, c[0]), c[1], c[2])
        dense = ((U.double() @ V.double()).to(dt), b.to(dt))
        makers[name] = (dense, nbytes(*dense), lambda c: tuple(t.clone() for t in c))
        calls[name] = lambda c, x: F.linear(x, c[0], c[1])
    copies = round_robin_copies(makers, args, l3)
    return {name: (copies[name], calls[name]) for name in makers}, {"V": V, "U": U, "b": b}


def run(args) -> int:
    torch.set_num_threads(args.threads)
    if args.isa:
        torchslim.set_cpu_isa(args.isa)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else ([(4096, 4096)] if args.quick else FULL_SHAPES))
    ms = [int(v) for v in args.ms.split(",")] if args.ms else ([1, 16, 128] if args.quick else FULL_MS)
    divisors = [int(v) for v in args.rank_divisors.split(",")] if args.rank_divisors else ([4] if args.quick else RANK_DIVISORS)
    dtypes = [d for d in args.dtypes.split(",") if d]
    target_s = (args.target_ms or 30.0) / 1e3
    machine, l3 = describe_machine(args)
    print(f"low-rank CPU kernels: {torchslim._C.lowrank_cpu_kernels()}\n", flush=True)
    rows, table = [], []
    names = [f"{kind}{d}" for d in dtypes for kind in ("lowrank ", "two ", "")]
    headers = ["N x K", "r", "M"] + [f"{n} us" for n in names] + [k for k, (o, _) in RATIOS.items() if o in names]
    for N, K in shapes:
        for div in divisors:
            r = K // div
            if r > min(N, K):
                continue
            saves = r <= max_useful_rank(N, K)
            specs, f32 = build(N, K, r, dtypes, args, l3)
            for M in ms:
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
                xs = {name: x.to(DTYPES[name.split()[-1]]) for name in specs}
                methods = [Method(name, cps, (lambda c, _call=call, _x=xs[name]: _call(c, _x)), 0, 0, "")
                           for name, (cps, call) in specs.items()]
                ref = F.linear(F.linear(x, f32["V"]), f32["U"], f32["b"])
                errs = {name: rel_err(specs[name][1](specs[name][0][0], xs[name]), ref)
                        for name in specs if name.startswith("lowrank")}
                res = bench_case(methods, args.repeats, target_s, args.max_iters)
                t = {name: v["median_s"] for name, v in res.items()}
                ratios = {key: t[base] / t[ours] for key, (ours, base) in RATIOS.items() if ours in t}
                rows.append({"N": N, "K": K, "r": r, "saves": saves, "M": M, "times": res, "ratios": ratios,
                             "rel_err_vs_fp32_two_linears": errs})
                table.append([f"{N}x{K}", f"{r}" + ("" if saves else " (no saving)"), str(M)]
                             + [f"{t[n] * 1e6:.0f}" for n in names] + [f"{v:.2f}x" for v in ratios.values()])
                print(md_table(headers, table[-1:]).splitlines()[-1], flush=True)
            del specs
    print("\n" + md_table(headers, table))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "args": vars(args), "rows": rows}, fh, indent=1)
    print(f"\nwrote {args.out}")
    return 0


def report(paths: list[str]) -> int:
    """The README's table from the JSON of one or more runs: per layer, rank and M, the ratios (the
    median over the runs, and their range when there are several)."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    cells: dict = {}
    for data in runs:
        for row in data["rows"]:
            for key, v in row["ratios"].items():
                cells.setdefault((row["N"], row["K"], row["r"], row["saves"], row["M"]), {}).setdefault(key, []).append(v)
    m = runs[0]["machine"]
    print(f"<!-- {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}; runs: "
          + ", ".join(d["machine"]["date"] for d in runs) + " -->")
    print("| layer (N x K) | r | M | " + " | ".join(RATIOS) + " |")
    print("|---|---:|---:|" + "---:|" * len(RATIOS))
    order = list(LAYERS)
    previous = None
    for key in sorted(cells, key=lambda k: (order.index(k[:2]) if k[:2] in LAYERS else 99, k[2], k[4])):
        N, K, r, saves, M = key
        label = f"{LAYERS.get((N, K), '')} {N}x{K}".strip() if (N, K) != previous else ""
        previous = (N, K)
        out = [ratio_cell(cells[key].get(name)) for name in RATIOS]
        print(f"| {label} | {r}{'' if saves else ' (no saving)'} | {M} | " + " | ".join(out) + " |")
    return 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:
        return report(argv[1:] or [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                "lowrank_linear_cpu.json")])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", type=str, default=None, help="comma list of NxK (out x in)")
    p.add_argument("--ms", type=str, default=None, help="comma list of token counts M")
    p.add_argument("--rank-divisors", type=str, default=None, help="comma list d: ranks r = K / d (default 8,4,2)")
    p.add_argument("--dtypes", type=str, default="bf16,fp32")
    p.add_argument("--isa", type=str, default=None, help="torchslim CPU ISA (default: the best)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--target-ms", type=float, default=None)
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--rotate-factor", type=float, default=3.0)
    p.add_argument("--max-method-mb", type=float, default=600.0)
    p.add_argument("--max-copies", type=int, default=4096)
    p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "results", "lowrank_linear_cpu.json"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
