"""Sparse24Linear, Sparse24Config and patch_model(model, "2:4"): pruning, equivalence with the dense
pruned layer, state_dict and device round trips, corrupted checkpoints, compile, Wanda calibration."""
import copy
import io

import pytest
import torch
from conftest import FLOAT_DTYPES
from torch import nn

import torchslim
from torchslim import Sparse24Config, Sparse24Linear, patch_model, unpatch_model
from torchslim.compress import InputNorms, prune_24
from torchslim.formats import sparse24 as f


def linear(K=40, N=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K", [40, 37, 3])
def test_from_linear_equals_its_dense_pruned_layer(dtype, bias, K):
    lin = linear(K, 24, bias, dtype)
    mod = Sparse24Linear.from_linear(lin)
    dense = mod.to_linear()
    assert dense.weight.dtype == dtype and f.is_24(dense.weight)
    assert torch.equal(dense.weight, prune_24(lin.weight).to(dtype))
    for shape in [(K,), (5, K), (2, 3, K)]:
        x = torch.randn(shape).to(dtype)
        torch.testing.assert_close(mod(x), dense(x), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


def test_wanda_importance_changes_what_is_kept():
    lin = linear()
    importance = torch.rand(40) * 100
    mod = Sparse24Linear.from_linear(lin, importance=importance)
    assert torch.equal(mod.to_linear().weight, prune_24(lin.weight, importance))
    assert not torch.equal(mod.to_linear().weight, Sparse24Linear.from_linear(lin).to_linear().weight)


def test_gradient_reaches_x_and_the_layers_below_not_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 6))
    patch_model(model, "2:4", filter_fn=lambda m, fqn: fqn == "2")
    assert isinstance(model[2], Sparse24Linear)
    x = torch.randn(3, 8, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    assert list(model[2].parameters()) == []


def test_state_dict_round_trip_and_safetensors_style_tensors():
    mod = Sparse24Linear.from_linear(linear())
    sd = mod.state_dict()
    assert set(sd) == {"values", "metadata", "bias"} and sd["metadata"].dtype == torch.int16
    buf = io.BytesIO()
    torch.save(sd, buf)
    fresh = Sparse24Linear(40, 24)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(4, 40)
    assert torch.equal(fresh(x), mod(x))


def test_load_into_a_meta_module_with_assign():
    mod = Sparse24Linear.from_linear(linear())
    with torch.device("meta"):
        empty = Sparse24Linear.from_linear(nn.Linear(40, 24))
    assert empty.values.is_meta
    empty.load_state_dict(mod.state_dict(), assign=True)
    x = torch.randn(2, 40)
    assert torch.equal(empty(x), mod(x))


def corruptions():
    good = Sparse24Linear.from_linear(linear()).state_dict()

    def spoil(name, fn):
        sd = {k: v.clone() for k, v in good.items()}
        sd[name] = fn(sd[name])
        return sd

    def bad_nibble(meta):
        meta[3, 1] = 0x4404  # row 3, group 5: positions (0, 0)
        return meta

    yield "duplicated positions", spoil("metadata", bad_nibble), r"metadata row 3, group 5 .* holds positions \(0, 0\)"
    yield "meta dtype", spoil("metadata", lambda m: m.int()), "metadata must be int16"
    yield "meta shape", spoil("metadata", lambda m: m[:, :2]), "metadata must have shape"
    yield "values shape", spoil("values", lambda v: v[:, :-1]), "values must have shape"
    yield "values rows", spoil("values", lambda v: v[:-1]), "values must have shape"
    yield "values NaN", spoil("values", lambda v: v.index_fill(1, torch.tensor([3]), float("nan"))), "NaN or Inf"
    yield "values int", spoil("values", lambda v: v.long()), "values must be float32"
    yield "bias shape", spoil("bias", lambda b: b[:-1]), "bias must be a float tensor of shape"
    yield "bias Inf", spoil("bias", lambda b: b.fill_(float("inf"))), "NaN or Inf"
    sd = dict(good)
    del sd["metadata"]
    yield "values without meta", sd, "must hold both or neither"


@pytest.mark.parametrize("name,sd,message", list(corruptions()), ids=[c[0] for c in corruptions()])
def test_corrupted_checkpoints_are_refused_and_change_nothing(name, sd, message):
    mod = Sparse24Linear.from_linear(linear(seed=1))
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        mod.load_state_dict(sd)
    after = mod.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversions_follow_the_model(dtype):
    mod = Sparse24Linear.from_linear(linear())
    converted = copy.deepcopy(mod).to(dtype)
    assert converted.values.dtype == dtype and converted.bias.dtype == dtype and converted.metadata.dtype == torch.int16
    x = torch.randn(3, 40)
    torch.testing.assert_close(converted(x.to(dtype)).float(), mod(x), rtol=3e-2, atol=3e-2)
    with pytest.raises(RuntimeError, match="x is torch.float32 but the layer is"):
        converted(x)


def test_conversions_that_would_break_the_format_are_refused():
    mod = Sparse24Linear.from_linear(linear())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        mod.double()
    assert mod.values.dtype == torch.float32
    with pytest.raises(TypeError, match="int16 metadata"):
        mod._apply(lambda t: t.to(torch.int32))
    assert mod.metadata.dtype == torch.int16


def test_forward_names_a_wrong_width():
    mod = Sparse24Linear.from_linear(linear())
    with pytest.raises(RuntimeError, match="x must have 40 features"):
        mod(torch.randn(3, 41))


def test_compile_fullgraph_of_a_patched_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    patch_model(model, "2:4")
    x = torch.randn(5, 32)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_patch_model_wanda_with_calibration_and_unpatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(10, 16)
    with InputNorms(model) as norms:
        model(x)
    importance = norms.result()
    original = copy.deepcopy(model)
    report = patch_model(model, Sparse24Config(method="wanda", importance=importance))
    assert report.method == "Sparse24Config" and len(report.layers) == 2
    assert report.bytes_after < report.bytes_before
    for name in ("0", "2"):
        expected = prune_24(original.get_submodule(name).weight, importance[name])
        assert torch.equal(model.get_submodule(name).to_linear().weight, expected)
    unpatch_model(model)
    assert type(model[0]) is nn.Linear and f.is_24(model[0].weight)


def test_config_refuses_what_it_would_ignore():
    with pytest.raises(TypeError, match="importance must be a dict"):
        Sparse24Config(method="wanda", importance=[torch.ones(16)])
    with pytest.raises(ValueError, match="importance must be a float tensor of shape \\(40,\\)"):
        with torch.device("meta"):
            Sparse24Linear.from_linear(nn.Linear(40, 8), importance=torch.ones(39))
    with pytest.raises(ValueError, match="method must be one of 'magnitude', 'wanda', 'sparsegpt'"):
        Sparse24Config(method="random")
    with pytest.raises(ValueError, match="ignored"):
        Sparse24Config(importance={"0": torch.ones(16)})
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match="no importance for 2"):
        patch_model(model, Sparse24Config(method="wanda", importance={"0": torch.ones(16)}))
    with pytest.raises(ValueError, match="not converted: typo"):
        patch_model(model, Sparse24Config(method="wanda", importance={"0": torch.ones(16), "2": torch.ones(32),
                                                                      "typo": torch.ones(3)}))
    assert type(model[0]) is nn.Linear  # nothing swapped


def test_shortcut_and_shared_layers():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    patch_model(model, "2:4")
    assert isinstance(model[0], Sparse24Linear) and model[0] is model[2]
    assert torchslim.Sparse24Linear is Sparse24Linear


def test_checkpoint_values_that_overflow_the_layers_dtype_are_refused():
    src = Sparse24Linear.from_linear(linear(K=16, N=2)).bfloat16()
    with torch.no_grad():
        src.values.mul_(1e10)
    dst = Sparse24Linear(16, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="NaN or Inf once cast to the layer's torch.float16"):
        dst.load_state_dict(src.state_dict())
    assert bool(dst.values.isfinite().all())


def test_assign_refuses_another_dtype_and_makes_tensors_contiguous():
    mod = Sparse24Linear.from_linear(linear())
    sd = mod.state_dict()
    bad = dict(sd, values=sd["values"].bfloat16())
    with pytest.raises(RuntimeError, match="assign=True takes the checkpoint's tensor as it is"):
        Sparse24Linear(40, 24).load_state_dict(bad, assign=True)
    strided = {k: v.T.contiguous().T if v.dim() == 2 else v for k, v in sd.items()}
    assert not strided["values"].is_contiguous()
    fresh = Sparse24Linear(40, 24)
    fresh.load_state_dict(strided, assign=True)
    x = torch.randn(3, 40)
    assert torch.equal(fresh(x), mod(x))


def test_weight_is_the_dense_pruned_weight_for_code_written_for_linear():
    mod = Sparse24Linear.from_linear(linear(dtype=torch.bfloat16))
    assert mod.weight.dtype == torch.bfloat16 and torch.equal(mod.weight, mod.to_linear().weight)
    # PyTorch's fused encoder path reads every Linear's weight in eval mode
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    patch_model(enc, "2:4")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = enc(x)
    unpatch_model(enc)
    with torch.no_grad():
        torch.testing.assert_close(out, enc(x), rtol=1e-4, atol=1e-4)


def test_torch_export_of_the_layer_itself():
    mod = Sparse24Linear.from_linear(linear(K=17, N=5))
    x = torch.randn(3, 17)
    exported = torch.export.export(mod, (x,))
    torch.testing.assert_close(exported.module()(x), mod(x))


def test_code_that_reads_weight_traces_under_export_and_compile():
    class ReadsWeight(nn.Module):  # the T5 pattern: x.to(self.wo.weight.dtype)
        def __init__(self):
            super().__init__()
            self.wo = nn.Linear(8, 4)

        def forward(self, x):
            return self.wo(x.to(self.wo.weight.dtype))

    model = ReadsWeight()
    patch_model(model, "2:4")
    x = torch.randn(2, 8)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_old_meta_key_and_nonfinite_bias_get_clear_errors():
    sd = Sparse24Linear.from_linear(linear()).state_dict()
    old = {("meta" if k == "metadata" else k): v for k, v in sd.items()}
    with pytest.raises(RuntimeError, match="stored under 'metadata'"):
        Sparse24Linear(40, 24).load_state_dict(old)
    lin = linear()
    with torch.no_grad():
        lin.bias[3] = float("nan")
    with pytest.raises(ValueError, match="bias holds NaN or Inf"):
        Sparse24Linear.from_linear(lin)
    with pytest.raises(TypeError, match="importance values must be tensors"):
        Sparse24Config(method="wanda", importance={"0": [1.0] * 16})
