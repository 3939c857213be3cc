"""Prints the README's CPU performance table from the benchmark JSON files.

    python bench/report.py [bench/results/int8_linear_cpu.json] [bench/results/int8_linear_cpu_bf16.json]

The first file is a default run (Int8Linear on float32 activations against fp32, `_int_mm` +
quantization and torch.ao); the second, optional, a `--x-dtype bfloat16 --methods bf16` run (Int8Linear
on bf16 activations against bf16 dense), whose ratio fills the "vs bf16" column.
"""
from __future__ import annotations

import json
import sys

LAYERS = {(384, 1536): "MiniLM FFN in", (1536, 384): "MiniLM FFN out", (768, 3072): "BERT-base FFN out",
          (4096, 4096): "Llama-7B attention", (11008, 4096): "Llama-7B MLP up"}


def rows_by_case(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    return {(r["N"], r["K"], r["M"]): r for r in data["rows"]}


def speedup(row: dict, method: str) -> str:
    m = row["methods"]
    return f"{m[method]['median_s'] / m['ours']['median_s']:.2f}x" if method in m else "-"


def main(argv: list[str]) -> int:
    fp32_path = argv[0] if argv else "bench/results/int8_linear_cpu.json"
    bf16_path = argv[1] if len(argv) > 1 else "bench/results/int8_linear_cpu_bf16.json"
    fp32 = rows_by_case(fp32_path)
    try:
        bf16 = rows_by_case(bf16_path)
    except FileNotFoundError:
        bf16 = {}
    print("| layer (N x K) | M | GOP/s (fp32 x) | vs fp32 | vs `_int_mm` + quant | vs torch.ao "
          "| GOP/s (bf16 x) | vs bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    previous = None
    for (N, K, M), row in fp32.items():
        label = f"{LAYERS.get((N, K), '')} {N}x{K}".strip() if (N, K) != previous else ""
        previous = (N, K)
        other = bf16.get((N, K, M))
        bf16_cells = (f"{other['methods']['ours']['gops']:.0f} | {speedup(other, 'bf16')}" if other
                      else f"- | {speedup(row, 'bf16')} (fp32 x)")
        print(f"| {label} | {M} | {row['methods']['ours']['gops']:.0f} | {speedup(row, 'fp32')} | "
              f"{speedup(row, 'intmm')} | {speedup(row, 'ao')} | {bf16_cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
