"""save_compressed / load_compressed: bit-exact round trips (every method, mixed, shared and tied
layers, bf16, Hugging Face BERT and Llama, meta-device targets), the file format (safetensors, no
pickle, smaller than dense), and every refusal, each leaving the model unchanged."""
import json
import struct

import pytest
import torch
from torch import nn

import torchslim
from torchslim import (CSRConfig, CSRLinear, Int8Config, Int8Linear, LowRankLinear, Sparse24Linear, load_compressed,
                       patch_model, save_compressed)

METHODS = {"int8": Int8Linear, "2:4": Sparse24Linear, "csr": CSRLinear, "lowrank": LowRankLinear}


def config_of(method: str):
    if method == "csr":
        return CSRConfig(sparsity=0.7)
    if method == "int8":  # one layer with a SmoothQuant scale: the 'smooth' fact
        return Int8Config(smooth_scales={"up": torch.rand(64, generator=torch.Generator().manual_seed(3)) + 0.5})
    return method


class Stack(nn.Module):
    def __init__(self, d=64, h=128, out=32):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.act = nn.GELU()
        self.down = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, out, bias=False)

    def forward(self, x):
        return self.head(self.norm(x + self.down(self.act(self.up(x)))))


class Shared(nn.Module):
    """A Linear reachable under three names, and an output layer tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.proj = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([nn.Sequential(self.proj, nn.GELU()), nn.Sequential(self.proj, nn.ReLU())])
        self.out = nn.Linear(64, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def built(cls, seed, **kw):
    torch.manual_seed(seed)
    return cls(**kw)


def patched_stack(method="int8", dtype=torch.float32):
    model = built(Stack, 0).to(dtype)
    patch_model(model, config_of(method))
    return model


def assert_same(a: nn.Module, b: nn.Module):
    """Same module types at the same names, and every state_dict tensor equal, dtype included."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def snapshot(model):
    return ([(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, snap):
    modules, state = snap
    assert [(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)


def rewrite(src, dst, header_fn=None, tensors_fn=None):
    """A copy of a save_compressed file with its JSON header and/or tensors edited."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(metadata["torchslim"])
    if header_fn:
        header_fn(header)
    if tensors_fn:
        tensors_fn(tensors)
    metadata["torchslim"] = json.dumps(header)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


# ---- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_is_bit_exact(method, tmp_path):
    model = patched_stack(method)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    fresh = built(Stack, 1)  # other random weights: everything must come from the file
    assert load_compressed(fresh, path) is fresh
    assert all(isinstance(getattr(fresh, n), METHODS[method]) for n in ("up", "down", "head"))
    assert_same(model, fresh)
    x = torch.randn(3, 5, 64)
    assert torch.equal(model(x), fresh(x))
    if method == "int8":
        assert fresh.up.smooth_scale is not None and fresh.down.smooth_scale is None


def test_mixed_model_and_bf16(tmp_path):
    model = built(Stack, 0).to(torch.bfloat16)
    patch_model(model, "int8", filter_fn=lambda m, fqn: fqn == "up")
    patch_model(model, CSRConfig(sparsity=0.5), filter_fn=lambda m, fqn: fqn == "down")
    patch_model(model, "lowrank", filter_fn=lambda m, fqn: fqn == "head")
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = load_compressed(built(Stack, 1).to(torch.bfloat16), tmp_path / "m.safetensors")
    assert [type(fresh.up), type(fresh.down), type(fresh.head)] == [Int8Linear, CSRLinear, LowRankLinear]
    assert_same(model, fresh)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(model(x), fresh(x))


def test_shared_layer_and_tied_weights(tmp_path):
    model = built(Shared, 0)
    patch_model(model, "2:4", filter_fn=lambda m, fqn: fqn != "out")
    path = tmp_path / "m.safetensors"
    save_compressed(model, path)
    header, keys = _header_and_keys(path)
    assert header["layers"][0]["names"] == ["proj", "blocks.0.0", "blocks.1.0"]
    assert not any(k.startswith("blocks.") for k in keys)  # the shared layer once
    assert header["tied"] == {"out.weight": "emb.weight"}
    fresh = load_compressed(built(Shared, 1), path)
    assert fresh.proj is fresh.blocks[0][0] is fresh.blocks[1][0]
    assert fresh.out.weight is fresh.emb.weight
    assert_same(model, fresh)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids), fresh(ids))


def test_meta_device_target(tmp_path):
    model = built(Shared, 0)
    patch_model(model, "int8", filter_fn=lambda m, fqn: fqn != "out")
    save_compressed(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        fresh = Shared()
    load_compressed(fresh, tmp_path / "m.safetensors")
    assert all(t.device.type == "cpu" for t in list(fresh.parameters()) + list(fresh.buffers()))
    assert fresh.proj is fresh.blocks[1][0] and fresh.out.weight is fresh.emb.weight  # ties kept
    assert_same(model, fresh)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(ids), fresh(ids))


def test_model_patched_the_same_way_is_accepted(tmp_path):
    model = patched_stack("lowrank")
    save_compressed(model, tmp_path / "m.safetensors")
    with torch.device("meta"):  # patch_model on meta, then fill: the other way to build the target
        fresh = Stack()
    patch_model(fresh, "lowrank")
    load_compressed(fresh, tmp_path / "m.safetensors")
    assert_same(model, fresh)


def test_hooks_move_to_the_loaded_layer(tmp_path):
    save_compressed(patched_stack("csr"), tmp_path / "m.safetensors")
    fresh, seen = built(Stack, 1), []
    handle = fresh.up.register_forward_hook(lambda m, args, out: seen.append(type(m)))
    load_compressed(fresh, tmp_path / "m.safetensors")
    fresh(torch.randn(1, 64))
    assert seen == [CSRLinear]
    handle.remove()
    fresh(torch.randn(1, 64))
    assert seen == [CSRLinear]


@pytest.mark.parametrize("method", list(METHODS))
def test_hf_bert(method, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    model = built(transformers.BertModel, 0, config=cfg).eval()
    patch_model(model, CSRConfig(sparsity=0.7) if method == "csr" else method)
    save_compressed(model, tmp_path / "bert.safetensors")
    fresh = load_compressed(built(transformers.BertModel, 1, config=cfg).eval(), tmp_path / "bert.safetensors")
    assert isinstance(fresh.encoder.layer[1].intermediate.dense, METHODS[method])
    assert_same(model, fresh)
    ids = torch.randint(0, 99, (2, 9))
    a, b = model(input_ids=ids), fresh(input_ids=ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)


def _llama(seed, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    return built(transformers.LlamaForCausalLM, seed, config=cfg).to(dtype).eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_hf_llama_bf16_tied_embeddings(method, tmp_path):
    model = _llama(0, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # lm_head stays dense and tied to the embedding (stored once, tied again on load).
    patch_model(model, CSRConfig(sparsity=0.7) if method == "csr" else method,
                filter_fn=lambda m, fqn: fqn != "lm_head")
    save_compressed(model, tmp_path / "llama.safetensors")
    tied = _header_and_keys(tmp_path / "llama.safetensors")[0]["tied"]
    assert tied == {"lm_head.weight": "model.embed_tokens.weight"}
    fresh = load_compressed(_llama(1, torch.bfloat16), tmp_path / "llama.safetensors")
    assert isinstance(fresh.model.layers[0].mlp.gate_proj, METHODS[method])
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert_same(model, fresh)
    ids = torch.randint(0, 64, (2, 6))
    assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_hf_llama_compressed_lm_head_and_meta_refusal(tmp_path):
    model = _llama(0)
    # lm_head too (patch_model leaves output heads dense by default): the tie ends, in both models alike.
    patch_model(model, "int8", filter_fn=lambda m, fqn: True)
    save_compressed(model, tmp_path / "llama.safetensors")
    fresh = load_compressed(_llama(1), tmp_path / "llama.safetensors")
    assert isinstance(fresh.lm_head, Int8Linear)
    assert_same(model, fresh)
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(model.config)
    # The rotary inv_freq is a non-persistent buffer: in no file, it would stay on meta (garbage logits).
    modules = [(n, type(m), id(m)) for n, m in meta.named_modules(remove_duplicate=False)]
    with pytest.raises(ValueError, match=r"meta device and holds non-persistent buffers.*inv_freq.*on the CPU"):
        load_compressed(meta, tmp_path / "llama.safetensors")
    assert [(n, type(m), id(m)) for n, m in meta.named_modules(remove_duplicate=False)] == modules
    assert all(t.is_meta for t in meta.state_dict().values())


# ---- the file ---------------------------------------------------------------------------------------

def _header_and_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["torchslim"]), list(f.keys())


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    path = tmp_path / "m.safetensors"
    save_compressed(patched_stack("int8"), path)
    raw = path.read_bytes()
    # safetensors: an 8-byte length, a JSON header, then the tensors' bytes back to back and nothing else:
    # no room for a pickle.
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + n + spans[-1][1] == len(raw)
    assert all(isinstance(v, str) for v in header["__metadata__"].values())
    layers = json.loads(header["__metadata__"]["torchslim"])
    assert layers["format_version"] == torchslim.checkpoint.FORMAT_VERSION
    assert layers["layers"][0] == {"names": ["up"], "class": "Int8Linear", "in_features": 64, "out_features": 128,
                                   "bias": True, "dtype": "float32", "smooth": True}
    assert header["up.weight"]["dtype"] == "I8" and header["up.weight"]["shape"] == [128, 64]  # canonical layout


@pytest.mark.parametrize("method", list(METHODS))
def test_file_is_smaller_than_dense(method, tmp_path):
    dense = built(Stack, 0, d=256, h=512)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    patch_model(dense, config_of(method) if method != "int8" else "int8")
    save_compressed(dense, tmp_path / "m.safetensors")
    size = (tmp_path / "m.safetensors").stat().st_size
    assert size < {"int8": 0.3, "2:4": 0.6, "csr": 0.5, "lowrank": 0.55}[method] * dense_bytes


def test_header_facts_per_class(tmp_path):
    model = built(Stack, 0)
    patch_model(model, CSRConfig(sparsity=0.75), filter_fn=lambda m, fqn: fqn == "up")
    patch_model(model, "lowrank", filter_fn=lambda m, fqn: fqn == "down")
    patch_model(model, "2:4", filter_fn=lambda m, fqn: fqn == "head")
    save_compressed(model, tmp_path / "m.safetensors")
    layers = {layer["names"][0]: layer for layer in _header_and_keys(tmp_path / "m.safetensors")[0]["layers"]}
    assert layers["up"]["nnz"] == model.up.nnz and layers["up"]["index_dtype"] == "int16"
    assert layers["down"]["rank"] == model.down.rank
    assert layers["head"] == {"names": ["head"], "class": "Sparse24Linear", "in_features": 64, "out_features": 32,
                              "bias": False, "dtype": "float32"}


def test_save_refuses_meta_and_leaves_no_file(tmp_path):
    with torch.device("meta"):
        model = Stack()
    patch_model(model, "int8")
    with pytest.raises(ValueError, match="meta device"):
        save_compressed(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---- refusals: each clear, each leaving the model as it was -------------------------------------------

@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    save_compressed(patched_stack("lowrank"), path)
    return path


def _refused(model, path, match):
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_compressed(model, path)
    assert_unchanged(model, snap)


def test_refuses_other_format_version(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "v2.safetensors", header_fn=lambda h: h.update(format_version=2))
    _refused(built(Stack, 1), bad, r"format version 2; this torchslim .* reads format version 1")


def test_refuses_unknown_class(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "c.safetensors", header_fn=lambda h: h["layers"][0].update({"class": "FP4Linear"}))
    _refused(built(Stack, 1), bad, "up has class 'FP4Linear', which this torchslim does not know")


def test_refuses_layer_name_the_model_lacks(saved):
    class Other(Stack):
        def __init__(self):
            super().__init__()
            del self.head
            self.proj = nn.Linear(64, 32, bias=False)

    _refused(built(Other, 1), saved, "layer head .* the model has no module of that name")


def test_refuses_a_module_that_is_not_linear(saved):
    model = built(Stack, 1)
    model.down = nn.Conv1d(128, 64, 1)
    _refused(model, saved, r"the model's down is a Conv1d, not an nn.Linear")


def test_refuses_other_shapes_bias_and_dtype(saved):
    _refused(built(Stack, 1, h=96), saved, r"layer up is LowRankLinear\(in_features=64, out_features=128.* has "
                                           "out_features=96")
    model = built(Stack, 1)
    model.head = nn.Linear(64, 32, bias=True)
    _refused(model, saved, "layer head .* has bias=True")
    _refused(built(Stack, 1).to(torch.bfloat16), saved, r"dtype=bfloat16 \(build or convert the model in float32")


def test_refuses_missing_and_extra_tensors(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "a.safetensors", tensors_fn=lambda t: t.pop("norm.bias"))
    _refused(built(Stack, 1), bad, "the file lacks tensors the model has: norm.bias")
    bad = rewrite(saved, tmp_path / "b.safetensors", tensors_fn=lambda t: t.update({"extra": torch.zeros(2)}))
    _refused(built(Stack, 1), bad, "the file has tensors the model lacks: extra")
    bad = rewrite(saved, tmp_path / "c.safetensors", tensors_fn=lambda t: t.pop("down.U"))
    _refused(built(Stack, 1), bad, "tensors for layer down .* are refused")
    bad = rewrite(saved, tmp_path / "d.safetensors", tensors_fn=lambda t: t.update({"down.W": torch.zeros(2)}))
    _refused(built(Stack, 1), bad, "(?s)tensors for layer down .* refused.*Unexpected key.*W")
    model = built(Stack, 1)
    model.register_buffer("step", torch.zeros(()))
    _refused(model, saved, "the file lacks tensors the model has: step")


def test_refuses_bad_tensors_and_header_disagreeing_with_them(saved, tmp_path):
    def nan(t):
        t["up.V"][0, 0] = float("nan")

    _refused(built(Stack, 1), rewrite(saved, tmp_path / "a.safetensors", tensors_fn=nan),
             "(?s)layer up .*V hold NaN or Inf")

    def rank(h):
        h["layers"][1]["rank"] += 1

    _refused(built(Stack, 1), rewrite(saved, tmp_path / "b.safetensors", header_fn=rank),
             r"records layer down as LowRankLinear\(.*rank=\d+\), but its tensors make")
    _refused(built(Stack, 1), rewrite(saved, tmp_path / "c.safetensors",
                                      tensors_fn=lambda t: t.update({"norm.weight": torch.zeros(65)})),
             r"norm.weight: shape \[65\] in the file, \[64\] in the model")


def test_refuses_a_model_patched_otherwise(saved):
    model = built(Stack, 1)
    patch_model(model, "int8", filter_fn=lambda m, fqn: fqn == "down")
    _refused(model, saved, "already patched otherwise: down is a Int8Linear where the file has a LowRankLinear")
    model = built(Shared, 1)
    path = saved.parent / "s.safetensors"
    save_compressed(built(Shared, 0), path)  # nothing compressed
    patch_model(model, "int8", filter_fn=lambda m, fqn: fqn != "out")
    _refused(model, path, "already patched: proj is a Int8Linear, which the file holds dense")


def test_refuses_sharing_that_differs(tmp_path):
    model = built(Shared, 0)
    patch_model(model, "int8", filter_fn=lambda m, fqn: fqn != "out")
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = built(Shared, 1)
    fresh.blocks[1][0] = nn.Linear(64, 64)  # no longer the same module
    _refused(fresh, tmp_path / "m.safetensors", "shared under proj, blocks.0.0, blocks.1.0, but in the model "
                                                "blocks.1.0 is another module")
    fresh = built(Shared, 1)
    fresh.extra = fresh.proj  # shared once more
    _refused(fresh, tmp_path / "m.safetensors", "also reachable as extra, which the file does not list")


def test_refuses_files_that_are_not_ours(tmp_path):
    from safetensors.torch import save_file

    save_file(built(Stack, 0).state_dict(), str(tmp_path / "plain.safetensors"))
    _refused(built(Stack, 1), tmp_path / "plain.safetensors", "without a torchslim header")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk" * 10)
    _refused(built(Stack, 1), tmp_path / "junk.safetensors", "not a readable safetensors file")
    with pytest.raises(FileNotFoundError):
        load_compressed(built(Stack, 1), tmp_path / "none.safetensors")


def test_failure_while_loading_the_rest_restores_the_layers(saved, monkeypatch):
    model = built(Stack, 1)
    snap = snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(model, "load_state_dict", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load_compressed(model, saved)
    assert_unchanged(model, snap)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoints_move_between_cuda_and_cpu(method, tmp_path):
    # Saved from CUDA (the int8 weight in its CUDA layout) and loaded on the CPU (packed), and back.
    model = patched_stack(method, torch.bfloat16).cuda()
    save_compressed(model, tmp_path / "cuda.safetensors")
    on_cpu = load_compressed(built(Stack, 1).to(torch.bfloat16), tmp_path / "cuda.safetensors")
    assert_same(model.cpu(), on_cpu)
    save_compressed(on_cpu, tmp_path / "cpu.safetensors")
    on_cuda = load_compressed(built(Stack, 1).to(torch.bfloat16).cuda(), tmp_path / "cpu.safetensors")
    assert all(t.is_cuda for t in on_cuda.state_dict().values())
    assert_same(on_cpu, on_cuda.cpu())
    x = torch.randn(4, 64, dtype=torch.bfloat16, device="cuda")
    assert torch.equal(model.cuda()(x), on_cuda.cuda()(x))


# ---- regressions --------------------------------------------------------------------------------------

class Untied(Shared):
    """Shared with its output layer's own weight (not tied to the embedding)."""

    def __init__(self):
        super().__init__()
        self.out.weight = nn.Parameter(self.emb.weight.detach().clone())


@pytest.mark.parametrize("meta", [False, True])
def test_refuses_ties_that_differ(meta, tmp_path):
    for saved_cls, target_cls, match in ((Untied, Shared, r"the model ties emb.weight, out.weight .* the file stores "
                                                          "them as separate tensors"),
                                         (Shared, Untied, r"the file ties emb.weight, out.weight .* the model holds "
                                                          "them as separate tensors")):
        model = built(saved_cls, 0)
        patch_model(model, "int8", filter_fn=lambda m, fqn: fqn != "out")
        path = tmp_path / f"{saved_cls.__name__}.safetensors"
        save_compressed(model, path)
        if meta:
            with torch.device("meta"):
                target = target_cls()
            modules = [(n, type(m), id(m)) for n, m in target.named_modules(remove_duplicate=False)]
            with pytest.raises(ValueError, match=match):
                load_compressed(target, path)
            assert [(n, type(m), id(m)) for n, m in target.named_modules(remove_duplicate=False)] == modules
        else:
            _refused(built(target_cls, 1), path, match)
        # Tied alike: loads.
        if meta:
            with torch.device("meta"):
                same = saved_cls()
        else:
            same = built(saved_cls, 1)
        assert_same(model, load_compressed(same, path))


def test_refuses_hf_llama_ties_that_differ(tmp_path):
    transformers = pytest.importorskip("transformers")
    untied = _llama(0)
    untied.config.tie_word_embeddings = False
    untied = built(transformers.LlamaForCausalLM, 0, config=untied.config).eval()
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    patch_model(untied, "int8")
    save_compressed(untied, tmp_path / "untied.safetensors")
    _refused(_llama(1), tmp_path / "untied.safetensors",
             r"the model ties model.embed_tokens.weight, lm_head.weight .* separate tensors")
    tied = _llama(0)
    patch_model(tied, "int8")
    save_compressed(tied, tmp_path / "tied.safetensors")
    _refused(built(transformers.LlamaForCausalLM, 1, config=untied.config), tmp_path / "tied.safetensors",
             r"the file ties model.embed_tokens.weight, lm_head.weight")


@pytest.mark.parametrize("edit, match", [
    (lambda layer: layer.update(rank=2 ** 40), r"records layer up as LowRankLinear\(.*rank=1099511627776.*but its "
                                               r"tensors make V of shape \[\d+, 64\] \(the record makes "
                                               r"\[1099511627776, 64\]\)"),
    (lambda layer: layer.update(rank=-3), r"cannot build one: .*rank must be a non-negative int, got -3"),
    (lambda layer: layer.update(rank="8"), r"cannot build one: .*rank must be a non-negative int, got '8'"),
    (lambda layer: layer.update(rank=True), r"cannot build one: .*rank must be a non-negative int, got True"),
], ids=["huge", "negative", "str", "bool"])
def test_header_counts_are_checked_against_the_tensors_before_anything_is_allocated(saved, tmp_path, edit, match,
                                                                                     monkeypatch):
    bad = rewrite(saved, tmp_path / "bad.safetensors", header_fn=lambda h: edit(h["layers"][0]))
    built_from = []
    monkeypatch.setattr(LowRankLinear, "_from_layer_spec", classmethod(lambda cls, spec, device=None:
                                                                       built_from.append(spec) or 1 / 0))
    _refused(built(Stack, 1), bad, match)
    assert built_from == []


def test_csr_nnz_and_missing_tensors_are_checked_before_allocating(tmp_path):
    path = tmp_path / "csr.safetensors"
    save_compressed(patched_stack("csr"), path)

    def nnz(h):
        h["layers"][0]["nnz"] = 2 ** 40

    _refused(built(Stack, 1), rewrite(path, tmp_path / "a.safetensors", header_fn=nnz),
             r"records layer up as CSRLinear\(.*nnz=1099511627776.*but its tensors make col of shape")
    _refused(built(Stack, 1), rewrite(path, tmp_path / "b.safetensors", tensors_fn=lambda t: t.pop("up.col")),
             r"tensors for layer up \(CSRLinear\) are refused: it lacks col")
    save_compressed(patched_stack("int8"), path)

    def smooth(h):
        h["layers"][1]["smooth"] = True  # down has no SmoothQuant scale stored

    _refused(built(Stack, 1), rewrite(path, tmp_path / "c.safetensors", header_fn=smooth),
             r"tensors for layer down \(Int8Linear\) are refused: it lacks smooth_scale")


def test_saved_file_gets_the_default_or_the_replaced_files_mode(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        save_compressed(patched_stack("int8"), tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o640  # 0o666 & ~0o027
    (tmp_path / "old.safetensors").write_bytes(b"")
    os.chmod(tmp_path / "old.safetensors", 0o604)
    save_compressed(patched_stack("int8"), tmp_path / "old.safetensors")
    assert stat.S_IMODE((tmp_path / "old.safetensors").stat().st_mode) == 0o604
    load_compressed(built(Stack, 1), tmp_path / "old.safetensors")


class WithNonPersistent(Stack):
    def __init__(self):
        super().__init__()
        self.register_buffer("freq", torch.arange(64, dtype=torch.float32), persistent=False)

    def forward(self, x):
        return super().forward(x * self.freq)


def test_meta_model_with_non_persistent_buffers_on_meta_is_refused(tmp_path):
    model = built(WithNonPersistent, 0)
    patch_model(model, "int8")
    save_compressed(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        meta = WithNonPersistent()
    modules = [(n, type(m), id(m)) for n, m in meta.named_modules(remove_duplicate=False)]
    with pytest.raises(ValueError, match="non-persistent buffers.*: freq; .*Build the model on the CPU"):
        load_compressed(meta, tmp_path / "m.safetensors")
    assert [(n, type(m), id(m)) for n, m in meta.named_modules(remove_duplicate=False)] == modules
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.freq = torch.arange(64, dtype=torch.float32)  # given its value on the CPU: accepted
    load_compressed(meta, tmp_path / "m.safetensors")
    assert_same(model, meta)
    x = torch.randn(2, 64)
    assert torch.equal(model(x), meta(x))
    # Also on a real BERT: its position_ids / token_type_ids are non-persistent.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    bert = built(transformers.BertModel, 0, config=cfg).eval()
    patch_model(bert, "int8")
    save_compressed(bert, tmp_path / "bert.safetensors")
    with torch.device("meta"):
        meta_bert = transformers.BertModel(cfg)
    if any(name not in meta_bert.state_dict() for name, _ in meta_bert.named_buffers()):
        with pytest.raises(ValueError, match="non-persistent buffers.*position_ids"):
            load_compressed(meta_bert, tmp_path / "bert.safetensors")
