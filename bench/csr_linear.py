"""CPU benchmark: torchslim.nn.CSRLinear (unstructured sparsity, CSR) against dense and torch.sparse.

Side by side in one process, on the same pruned weight (magnitude, per row) and inputs, interleaved
(torch.sparse right after the others), every method's weight copies made round-robin with the others':

  csr bf16      CSRLinear.from_linear(lin_bf16, sparsity=s)(x_bf16)   int16 columns + bf16 values
  bf16          F.linear(x_bf16, W_bf16, b)                            dense bf16 (oneDNN; AMX where present)
  csr fp32      CSRLinear.from_linear(lin, sparsity=s)(x)
  fp32          F.linear(x, W, b)                                      dense fp32
  torch.sparse  torch.addmm(b, W_csr, x.T).T, W_csr = W.to_sparse_csr() fp32 (MKL on CPU)

Every method rotates independent weight copies totalling >= --rotate-factor x L3 (each call the next
copy), so small-M cases measure weights streamed from memory, not the cache. Ratios are
t(baseline) / t(csr): "vs bf16" is csr bf16 against dense bf16, "vs fp32" and "vs sparse" are csr
fp32 against dense fp32 and torch.sparse (fp32 both). At M = 1 the time is bytes: CSR reads
(1 - s) K (2 + 2) bytes per row in bf16 with int16 columns against 2 K dense, so 1 / (2 (1 - s)) is
the ceiling of "vs bf16" (5x at 90%).

    python bench/csr_linear.py              # full run: 5 layers x 50/70/90/95% x M in 1, 16, 128, 512
    python bench/csr_linear.py --quick      # 4096x4096 and 384x1536, 90%, M in 1, 16, 128
    python bench/csr_linear.py --report bench/results/csr_linear_cpu*.json   # README tables
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchslim
from torchslim.compress import prune_unstructured

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int8_linear import (FULL_MS, FULL_SHAPES, Method, bench_case, describe_machine,  # noqa: E402
                         md_table, ratio_cell, rel_err, round_robin_copies)

SPARSITIES = [0.5, 0.7, 0.9, 0.95]
QUICK_SHAPES = [(4096, 4096), (384, 1536)]
QUICK_MS = [1, 16, 128]
LAYERS = {(384, 1536): "MiniLM FFN in", (1536, 384): "MiniLM FFN out", (768, 3072): "BERT-base FFN out",
          (4096, 4096): "Llama-7B attention", (11008, 4096): "Llama-7B MLP up"}
# (ours, baseline) pairs whose ratio the tables report
RATIOS = {"vs bf16": ("csr bf16", "bf16"), "vs fp32": ("csr fp32", "fp32"), "vs sparse": ("csr fp32", "torch.sparse")}


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def clone_csr(m: torchslim.CSRLinear) -> torchslim.CSRLinear:
    c = torchslim.CSRLinear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.values.dtype)
    c.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    return c


def build(N: int, K: int, sparsity: float, args, l3: int) -> tuple[dict, nn.Linear]:
    """name -> (copies, call(copy, x)) for every method, and the pruned fp32 layer."""
    g = torch.Generator().manual_seed(1000 + N + 7 * K)
    lin = nn.Linear(K, N).requires_grad_(False)
    lin.weight.copy_(prune_unstructured(torch.randn(N, K, generator=g) / math.sqrt(K), sparsity))
    lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    lin_bf16 = nn.Linear(K, N).to(torch.bfloat16).requires_grad_(False)
    lin_bf16.load_state_dict(lin.state_dict())
    # name -> (one copy, its bytes, clone(copy), call(copy, x))
    makers = {}
    for name, layer in (("csr bf16", lin_bf16), ("csr fp32", lin)):
        m = torchslim.CSRLinear.from_linear(layer)
        makers[name] = (m, nbytes(m.crow, m.col, m.values, m.bias), clone_csr, lambda c, x: c(x))
    for name, layer in (("bf16", lin_bf16), ("fp32", lin)):
        makers[name] = ((layer.weight, layer.bias), nbytes(layer.weight, layer.bias),
                        lambda c: (c[0].clone(), c[1].clone()), lambda c, x: F.linear(x, c[0], c[1]))
    if not args.no_torch_sparse:
        ws = lin.weight.to_sparse_csr()
        ws_bytes = nbytes(ws.crow_indices(), ws.col_indices(), ws.values(), lin.bias)
        makers["torch.sparse"] = ((ws, lin.bias[:, None].clone()), ws_bytes, lambda c: (c[0].clone(), c[1].clone()),
                                  lambda c, x: torch.addmm(c[1], c[0], x.T).T)
    copies = round_robin_copies({name: (first, b, clone) for name, (first, b, clone, _) in makers.items()}, args, l3)
    specs = {name: (copies[name], call) for name, (_, _, _, call) in makers.items()}
    return specs, lin


def run(args) -> int:
    torch.set_num_threads(args.threads)
    if args.isa:
        torchslim.set_cpu_isa(args.isa)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else (QUICK_SHAPES if args.quick else FULL_SHAPES))
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else FULL_MS)
    sparsities = ([float(v) for v in args.sparsities.split(",")] if args.sparsities
                  else ([0.9] if args.quick else SPARSITIES))
    repeats = args.repeats or (5 if args.quick else 5)
    target_s = (args.target_ms or 30.0) / 1e3
    machine, l3 = describe_machine(args)
    print(flush=True)
    rows, table = [], []
    for N, K in shapes:
        for s in sparsities:
            specs, lin = build(N, K, s, args, l3)
            for M in ms:
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
                xs = {"csr bf16": x.bfloat16(), "bf16": x.bfloat16()}
                methods = [Method(name, cps, (lambda c, _call=call, _x=xs.get(name, x): _call(c, _x)), 0, 0, "")
                           for name, (cps, call) in specs.items()]
                ref = F.linear(x, lin.weight, lin.bias)
                errs = {name: rel_err(specs[name][1](specs[name][0][0], xs.get(name, x)), ref)
                        for name in ("csr bf16", "csr fp32")}
                # torch.sparse is timed on its own, after the others (an early run had the method after
                # it 2x slower; that was mostly the allocation effect build() now avoids, but its calls of
                # 10-200 ms at large M also stretch the interleaved loops apart).
                res = bench_case([m for m in methods if m.name != "torch.sparse"], repeats, target_s, args.max_iters)
                if "torch.sparse" in specs:  # absent with --no-torch-sparse
                    res.update(bench_case([m for m in methods if m.name == "torch.sparse"], repeats, target_s,
                                          args.max_iters))
                t = {name: r["median_s"] for name, r in res.items()}
                ratios = {key: t[base] / t[ours] for key, (ours, base) in RATIOS.items() if base in t}
                rows.append({"N": N, "K": K, "sparsity": s, "M": M, "times": res, "ratios": ratios,
                             "rel_err_vs_fp32": errs, "byte_limit_bf16": 1 / (2 * (1 - s))})
                table.append([f"{N}x{K}", f"{100 * s:.0f}%", str(M)] + [f"{t[n] * 1e6:.0f}" for n in specs]
                             + [f"{ratios[k]:.2f}x" if k in ratios else "-" for k in RATIOS])
                headers = ["N x K", "sparsity", "M"] + [f"{n} us" for n in specs] + list(RATIOS)
                print(md_table(headers, table[-1:]).splitlines()[-1], flush=True)
            del specs
    print("\n" + md_table(headers, table))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "args": vars(args), "rows": rows}, fh, indent=1)
    print(f"\nwrote {args.out}")
    return 0


def report(paths: list[str]) -> int:
    """The README's tables from the JSON of one or more runs (medians over the runs, with their
    range when there are several): the ratios per layer, sparsity and M; then per M the lowest
    sparsity at which CSR bf16 beats dense bf16 on every layer measured."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    cells: dict = {}
    for data in runs:
        for r in data["rows"]:
            for key, v in r["ratios"].items():
                cells.setdefault((r["N"], r["K"], r["sparsity"], r["M"]), {}).setdefault(key, []).append(v)
    m = runs[0]["machine"]
    print(f"<!-- {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}; runs: "
          + ", ".join(d["machine"]["date"] for d in runs) + " -->")
    print("| layer (N x K) | sparsity | M | CSR bf16 vs bf16 dense | CSR fp32 vs fp32 dense | CSR fp32 vs torch.sparse |")
    print("|---|---:|---:|---:|---:|---:|")
    order = list(LAYERS)
    previous = None
    for (N, K, s, M) in sorted(cells, key=lambda k: (order.index(k[:2]) if k[:2] in LAYERS else 99, k[2], k[3])):
        label = f"{LAYERS.get((N, K), '')} {N}x{K}".strip() if (N, K) != previous else ""
        previous = (N, K)
        out = [ratio_cell(cells[(N, K, s, M)].get(key)) for key in RATIOS]
        print(f"| {label} | {100 * s:.0f}% | {M} | " + " | ".join(out) + " |")
    print("\n| M | lowest sparsity where CSR bf16 beats dense bf16 (median, every layer) |")
    print("|---:|---|")
    for M in sorted({k[3] for k in cells}):
        sps = sorted({k[2] for k in cells if k[3] == M})
        wins = [s for s in sps if all(statistics.median(cells[k]["vs bf16"]) > 1 for k in cells if k[3] == M and k[2] == s)]
        print(f"| {M} | {f'{100 * wins[0]:.0f}%' if wins else f'none up to {100 * sps[-1]:.0f}%'} |")
    return 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--report"]:
        return report(argv[1:] or [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                "csr_linear_cpu.json")])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shapes", type=str, default=None, help="comma list of NxK (out x in)")
    p.add_argument("--ms", type=str, default=None, help="comma list of token counts M")
    p.add_argument("--sparsities", type=str, default=None, help="comma list, e.g. 0.5,0.9")
    p.add_argument("--isa", type=str, default=None, help="torchslim CPU ISA (default: the best)")
    p.add_argument("--no-torch-sparse", action="store_true", help="skip the (slow at large M) torch.sparse baseline")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--target-ms", type=float, default=None)
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--rotate-factor", type=float, default=3.0)
    p.add_argument("--max-method-mb", type=float, default=600.0)
    p.add_argument("--max-copies", type=int, default=4096)
    p.add_argument("--out", type=str, default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                         "results", "csr_linear_cpu.json"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
