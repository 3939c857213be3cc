"""patch_model / unpatch_model: which layers are swapped, shared layers, atomicity, clear refusals,
and what a patched model still does (state_dict, dtype casts, compile, safetensors)."""
import pytest
import torch
from torch import nn

import torchslim
from torchslim import Int8Linear, patch_model, unpatch_model


class TinyBlock(nn.Module):
    """Attention-projection-like and MLP-like linears, nested, plus a non-Linear layer."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(64, 64), "k": nn.Linear(64, 64), "v": nn.Linear(64, 64)})
        self.mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10, bias=False)

    def forward(self, x):
        h = self.attn["q"](x) + self.attn["k"](x) + self.attn["v"](x)
        return self.head(self.norm(h + self.mlp(h)))


def test_patch_model_swaps_every_linear_and_unpatch_reverts():
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(2, 9, 64)
    ref = model(x)
    report = patch_model(model, "int8")
    assert len(report.layers) == 6
    assert all(isinstance(m, Int8Linear) for m in [model.attn["q"], model.mlp[0], model.mlp[2], model.head])
    assert report.bytes_after < report.bytes_before / 3
    assert "6 layers swapped" in str(report)
    y = model(x)
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.99
    unpatch_model(model)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert sum(type(m) is nn.Linear for m in model.modules()) == 6
    # The reverted layers hold the dequantized weights: float activations again, int8-rounded weights.
    assert torch.nn.functional.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0) > 0.999


def test_patch_model_filter_and_config():
    model = TinyBlock()
    report = patch_model(model, torchslim.Int8Config(filter_fn=lambda m, name: name.startswith("mlp")))
    assert [layer.name for layer in report.layers] == ["mlp.0", "mlp.2"]
    assert type(model.head) is nn.Linear
    report = patch_model(TinyBlock(), "int8", filter_fn=lambda m, name: m.out_features == 10)
    assert [layer.name for layer in report.layers] == ["head"]
    with pytest.raises(ValueError, match="unknown method"):
        patch_model(TinyBlock(), "int4")


def test_patched_model_state_dict_reloads_into_patched_model():
    torch.manual_seed(1)
    a = TinyBlock()
    patch_model(a, "int8")
    b = TinyBlock()
    patch_model(b, "int8")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))


def test_patched_model_dtype_conversion_and_compile():
    torch.manual_seed(2)
    model = TinyBlock()
    patch_model(model, "int8")
    scale = model.mlp[0].weight_scale.clone()
    model = model.to(torch.bfloat16)  # the bias follows; int8 weights and float32 scales stay
    assert model.mlp[0].weight.dtype == torch.int8 and model.mlp[0].bias.dtype == torch.bfloat16
    assert torch.equal(model.mlp[0].weight_scale, scale)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    eager = model(x)
    assert eager.dtype == torch.bfloat16
    # One graph for the whole patched model; aot_eager keeps the other ops' bf16 rounding as in
    # eager (inductor would fuse GELU/LayerNorm in float32), so the result must be identical.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)


def test_safetensors_round_trip(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(3)
    a = TinyBlock()
    patch_model(a, "int8")
    path = tmp_path / "slim.safetensors"
    safetensors.save_file(a.state_dict(), str(path))
    b = TinyBlock()
    patch_model(b, "int8")
    b.load_state_dict(safetensors.load_file(str(path)))
    x = torch.randn(4, 64)
    assert torch.equal(a(x), b(x))


def test_a_bare_linear_is_refused():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="cannot replace the model object itself.*from_linear"):
        patch_model(lin, "int8")
    assert list(lin.state_dict()) == ["weight", "bias"] and dict(lin.named_children()) == {}
    with pytest.raises(ValueError, match="cannot replace the model object itself"):
        unpatch_model(Int8Linear.from_linear(lin))


def test_bad_config_is_a_clear_error():
    with pytest.raises(TypeError, match="config must be one of \\['2:4', 'csr', 'int8', 'lowrank'\\] or a config "
                       "\\(Int8Config, Sparse24Config, CSRConfig, LowRankConfig\\), got None"):
        patch_model(TinyBlock(), None)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        patch_model("model", "int8")


def test_a_shared_layer_becomes_one_compressed_layer_at_every_site():
    torch.manual_seed(5)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(3, 16)
    ref = model(x)
    report = patch_model(model, "int8")
    assert isinstance(model[0], Int8Linear) and model[0] is model[2]
    assert len(report.layers) == 1 and report.layers[0].aliases == ("2",) and "(also 2)" in str(report)
    sd = model.state_dict()  # both sites, as nn.Module lists a shared child; one tensor set behind them
    assert list(sd) == [f"{i}.{k}" for i in (0, 2) for k in ("weight", "weight_scale", "bias")]
    assert torch.nn.functional.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0) > 0.99
    unpatch_model(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2]


def test_a_filter_that_splits_a_shared_layer_is_refused():
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match="the layer 0 is shared .*also reachable as 2.*accepts only 0"):
        patch_model(model, "int8", filter_fn=lambda m, fqn: fqn == "0")
    assert model[0] is lin and model[2] is lin


def test_a_failing_conversion_leaves_the_model_unchanged():
    model = TinyBlock()
    with torch.no_grad():
        model.mlp[2].weight[0, 0] = float("nan")  # cannot be quantized; converted after others
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match="NaN or Inf"):
        patch_model(model, "int8")
    assert dict(model.named_modules()) == modules
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)


def test_a_model_on_meta_is_patched_and_loads_a_checkpoint():
    # Build the big model without memory, patch it, then assign a compressed checkpoint.
    torch.manual_seed(6)
    src = TinyBlock()
    patch_model(src, "int8")
    with torch.device("meta"):
        model = TinyBlock()
    report = patch_model(model, "int8")
    assert len(report.layers) == 6 and model.mlp[0].weight.is_meta
    model.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(2, 64)
    assert torch.equal(model(x), src(x))


def test_filter_fn_must_be_callable():
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        patch_model(TinyBlock(), "int8", filter_fn=5)


def test_forward_hooks_move_to_the_compressed_layer():
    model = TinyBlock()
    seen = []
    handle = model.mlp[0].register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    patch_model(model, "int8")
    model(torch.randn(2, 64))
    assert seen == ["Int8Linear"]
    handle.remove()  # the user's handle still works
    model(torch.randn(2, 64))
    assert seen == ["Int8Linear"]


def test_smooth_scale_of_a_shared_layer_under_any_name():
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    s = torch.rand(16) + 0.5
    patch_model(model, torchslim.Int8Config(smooth_scales={"2": s}))
    assert torch.equal(model[0].smooth_scale, s) and model[0] is model[2]


def test_backward_hooks_move_to_the_compressed_layer():
    model = TinyBlock()
    seen = []
    model.mlp[0].register_full_backward_hook(lambda m, grad_in, grad_out: seen.append(type(m).__name__))
    patch_model(model, "int8")
    model(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert seen == ["Int8Linear"]


def test_smooth_scales_for_unknown_layers_are_refused():
    model = TinyBlock()
    with pytest.raises(ValueError, match="names layers that are not converted: mlp.9"):
        patch_model(model, torchslim.Int8Config(smooth_scales={"mlp.9": torch.ones(64)}))
    assert type(model.mlp[0]) is nn.Linear
    # Equal scales given under two names of one shared layer are one scale.
    lin = nn.Linear(16, 16)
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    s = torch.rand(16) + 0.5
    patch_model(shared, torchslim.Int8Config(smooth_scales={"0": s, "2": s.clone()}))
    assert torch.equal(shared[0].smooth_scale, s)
