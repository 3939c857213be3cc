"""Int8Linear and patch_model: the drop-in module, its state_dict, compile, and model patching."""
import copy
import io

import pytest
import torch
from conftest import FLOAT_DTYPES
from torch import nn

import torchslim
from torchslim import Int8Linear, patch_model, reference, unpatch_model
from torchslim.compress import quantize_weight_per_channel


def linear(K=96, N=80, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias).to(dtype)


def max_quantization_error(x2, w):
    """The bound of test_int8_linear: per-token rounding moves x by half a step."""
    _, s_x = reference.quantize_per_token(x2)
    return s_x.double()[:, None] / 2 * w.double().abs().sum(1)[None, :]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_forward_matches_dequantized_linear(dtype):
    lin = linear(dtype=dtype)
    mod = Int8Linear.from_linear(lin)
    x = torch.randn(2, 5, 96).to(dtype)  # leading batch dimensions
    y = mod(x)
    assert y.shape == (2, 5, 80) and y.dtype == dtype
    deq = mod.to_linear()
    assert type(deq) is nn.Linear and deq.weight.dtype == dtype
    exact = x.double().reshape(-1, 96) @ deq.weight.double().T + deq.bias.double()
    tol = max_quantization_error(x.reshape(-1, 96).float(), deq.weight.float()) * 1.01 + 3e-2 * exact.abs() + 1e-3
    assert ((y.reshape(-1, 80).double() - exact).abs() <= tol).all()


def test_to_linear_is_close_to_the_original():
    lin = linear()
    back = Int8Linear.from_linear(lin).to_linear()
    step = lin.weight.abs().amax(1, keepdim=True) / 127
    assert ((back.weight - lin.weight).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(back.bias, lin.bias)


def test_smooth_scale_is_folded_and_divided_out():
    lin = linear()
    s = torch.rand(96) * 4 + 0.25
    mod = Int8Linear.from_linear(lin, smooth_scale=s)
    w_q, w_scale = quantize_weight_per_channel(lin.weight.detach() * s[None, :])
    assert torch.equal(mod.canonical_weight(), w_q) and torch.equal(mod.weight_scale, w_scale)
    x = torch.randn(7, 96)
    expected = reference.int8_linear(x / s, w_q, w_scale, lin.bias.detach())
    assert torch.allclose(mod(x).double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(mod(x).flatten(), lin(x).flatten(), dim=0) > 0.999
        back = mod.to_linear().weight
        assert ((back - lin.weight).abs() <= w_scale[:, None] / s[None, :] / 2 * 1.001 + 1e-7).all()
    for bad in (-s, torch.full_like(s, float("inf")), s[:-1]):
        with pytest.raises(ValueError, match="positive and finite"):
            Int8Linear.from_linear(lin, smooth_scale=bad)


def test_state_dict_round_trip_is_exact():
    mod = Int8Linear.from_linear(linear(), smooth_scale=torch.rand(96) + 0.5)
    sd = mod.state_dict()
    assert sd["weight"].shape == (80, 96) and sd["weight"].dtype == torch.int8  # canonical, portable
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = Int8Linear(96, 80, bias=True, smooth=True)
    fresh.load_state_dict(torch.load(buf))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), mod(x))


def test_load_rejects_bad_scales():
    mod = Int8Linear.from_linear(linear())
    sd = mod.state_dict()
    sd["weight_scale"] = sd["weight_scale"].clone()
    sd["weight_scale"][3] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        Int8Linear(96, 80).load_state_dict(sd)


def test_deepcopy_and_extra_repr():
    mod = Int8Linear.from_linear(linear(K=384, N=1536))
    twin = copy.deepcopy(mod)
    x = torch.randn(4, 384)
    assert torch.equal(twin(x), mod(x))
    text = repr(mod)
    assert "in_features=384" in text and "out_features=1536" in text
    assert f"saves {384 * 1536 * 4 - 384 * 1536 - 4 * 1536} bytes" in text


def test_cpu_copy_holds_one_packed_weight():
    mod = Int8Linear.from_linear(linear())
    assert mod.weight.shape != (80, 96)  # the packed CPU layout, not a second copy
    assert [n for n, _ in mod.named_buffers()] == ["weight", "weight_scale", "bias"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph_matches_eager(dtype):
    mod = Int8Linear.from_linear(linear(dtype=dtype))
    x = torch.randn(3, 4, 96).to(dtype)
    compiled = torch.compile(mod, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(x), mod(x))


def test_meta_device_module():
    mod = Int8Linear(96, 80, device="meta")
    assert mod.weight.shape == (80, 96) and mod.weight.device.type == "meta"
    assert mod(torch.randn(2, 96, device="meta")).shape == (2, 80)


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


def test_device_move_keeps_the_canonical_layout_off_cpu():
    # Off the CPU the module holds the plain (N, K) weight (what the CUDA kernel reads); the CPU
    # packing is redone when it comes back. "meta" stands in for a GPU here.
    mod = Int8Linear.from_linear(linear())
    canonical = mod.canonical_weight().clone()
    moved = copy.deepcopy(mod).to("meta")
    assert moved.weight.shape == (80, 96) and moved.weight.device.type == "meta"
    assert moved.state_dict()["weight"].shape == (80, 96)
    back = copy.deepcopy(mod).to("cpu")
    assert torch.equal(back.canonical_weight(), canonical)


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
