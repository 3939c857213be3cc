"""Real Transformer architectures from Hugging Face transformers (tiny configs, built offline), patched
with every method through one calibration pass: they run, generate with and without the KV cache,
and unpatch back to nn.Linear layers computing the same function."""
import pytest
import torch
from torch import nn

from torchslim import CSRConfig, Int8Config, LowRankConfig, Sparse24Config, patch_model, unpatch_model
from torchslim.nn import CSRLinear, Int8Linear, LowRankLinear, Sparse24Linear

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "int8": Int8Config(smooth_alpha=0.5),
    "2:4": Sparse24Config(method="wanda"),
    "csr": CSRConfig(sparsity=0.5, method="wanda"),
    "lowrank": LowRankConfig(param_ratio=0.75, whiten=True),
}
TYPES = {"int8": Int8Linear, "2:4": Sparse24Linear, "csr": CSRLinear, "lowrank": LowRankLinear}


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def calib(n: int = 4, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, 128, (2, seq), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("method", list(CONFIGS))
def test_patched_llama_generates_the_same_with_and_without_the_kv_cache(method):
    model = tiny_llama()
    report = patch_model(model, CONFIGS[method], calib_data=calib(), progress=False)
    assert len(report.layers) == 14 and all(layer.error is not None for layer in report.layers)
    assert type(model.lm_head) is nn.Linear  # output head dense by default
    assert sum(isinstance(m, TYPES[method]) for m in model.modules()) == 14
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 14) and torch.equal(cached[:, :6], ids)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_patched_bert_unpatches_to_the_same_function(method):
    model = tiny_bert()
    ids = calib(1)[0]
    dense_out = model(**ids).last_hidden_state
    patch_model(model, CONFIGS[method], calib_data=calib(), progress=False)
    patched_out = model(**ids).last_hidden_state
    cos = nn.functional.cosine_similarity(patched_out.flatten(), dense_out.flatten(), dim=0)
    assert cos > 0.9, cos  # a tiny random model: a loose sanity bound, not an accuracy claim
    unpatch_model(model)
    assert not any(isinstance(m, tuple(TYPES.values())) for m in model.modules())
    # The unpatched layers hold the dequantized / pruned / factored weights: the patched model's function
    # (int8 also quantized its activations, which the dense layers no longer do).
    tol = 0.05 if method == "int8" else 1e-4
    torch.testing.assert_close(model(**ids).last_hidden_state, patched_out, rtol=tol, atol=tol)
