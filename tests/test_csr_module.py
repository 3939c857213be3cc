"""CSRLinear, CSRConfig and patch_model(model, CSRConfig(...)): pruning, equivalence with the dense
layer, state_dict round trips of any nnz, corrupted checkpoints, conversions, compile, export, Wanda."""
import copy
import io

import pytest
import torch
from conftest import FLOAT_DTYPES
from torch import nn

import torchslim
from torchslim import CSRConfig, CSRLinear, patch_model, unpatch_model
from torchslim.compress import InputNorms, prune_unstructured
from torchslim.formats import csr


def linear(K=40, N=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sparsity", [None, 0.0, 0.5, 0.9])
def test_from_linear_equals_its_dense_pruned_layer(dtype, bias, sparsity):
    lin = linear(bias=bias, dtype=dtype)
    mod = CSRLinear.from_linear(lin, sparsity=sparsity)
    expected = lin.weight if sparsity is None else prune_unstructured(lin.weight, sparsity)
    assert torch.equal(mod.to_linear().weight, expected) and torch.equal(mod.weight, expected)
    assert mod.values.dtype == dtype and mod.col.dtype == torch.int16 and mod.crow.dtype == torch.int32
    assert mod.nnz == int((expected != 0).sum())
    x = torch.randn(3, 5, 40).to(dtype)
    out = mod(x)
    assert out.shape == (3, 5, 24)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, mod.to_linear()(x), rtol=tol, atol=tol)


def test_keeps_a_pruned_layers_own_zeros():
    lin = linear()
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.2)
    mod = CSRLinear.from_linear(lin)
    assert mod.nnz == int((lin.weight != 0).sum()) and abs(mod.sparsity - 0.8) < 0.1
    assert "sparse" in repr(mod)


def test_wanda_importance_changes_what_is_kept():
    lin = linear()
    importance = torch.ones(40)
    importance[:20] = 0.0  # the first 20 input features never fire: Wanda prunes them first
    mod = CSRLinear.from_linear(lin, sparsity=0.5, importance=importance)
    assert bool((mod.col >= 20).all())
    assert not torch.equal(mod.to_linear().weight, CSRLinear.from_linear(lin, sparsity=0.5).to_linear().weight)


def test_from_linear_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="needs a sparsity"):
        CSRLinear.from_linear(linear(), importance=torch.ones(40))
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        CSRLinear.from_linear(linear(), sparsity=1.0)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        CSRLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="float64"):
        CSRLinear.from_linear(linear().double())
    bad = linear()
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight holds NaN or Inf"):
        CSRLinear.from_linear(bad)


def test_gradient_reaches_x_and_the_layers_below_not_the_weight():
    torch.manual_seed(0)
    below = nn.Linear(8, 40)
    mod = CSRLinear.from_linear(linear(), sparsity=0.7)
    x = torch.randn(4, 8)
    mod(below(x)).square().sum().backward()
    dense = copy.deepcopy(below)
    mod.to_linear()(dense(x)).square().sum().backward()
    torch.testing.assert_close(below.weight.grad, dense.weight.grad, rtol=1e-4, atol=1e-5)
    assert all(not b.requires_grad for b in mod.buffers())


def test_state_dict_round_trip_of_any_nnz():
    mod = CSRLinear.from_linear(linear(), sparsity=0.75)
    sd = mod.state_dict()
    assert set(sd) == {"crow", "col", "values", "bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    fresh = CSRLinear(40, 24)  # nnz 0: load_state_dict takes the checkpoint's nnz
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(4, 40)
    assert torch.equal(fresh(x), mod(x)) and fresh.nnz == mod.nnz
    other = CSRLinear.from_linear(linear(seed=3), sparsity=0.2)
    other.load_state_dict(sd)  # another nnz
    assert torch.equal(other(x), mod(x))
    # int32 columns (another writer's choice) become the layer's int16
    fresh.load_state_dict(dict(sd, col=sd["col"].int()))
    assert fresh.col.dtype == torch.int16 and torch.equal(fresh(x), mod(x))


def test_load_into_a_meta_module_with_assign():
    mod = CSRLinear.from_linear(linear(), sparsity=0.5)
    with torch.device("meta"):
        empty = CSRLinear.from_linear(nn.Linear(40, 24))
    assert empty.values.is_meta
    empty.load_state_dict(mod.state_dict(), assign=True)
    x = torch.randn(2, 40)
    assert torch.equal(empty(x), mod(x))


def corruptions():
    good = CSRLinear.from_linear(linear(), sparsity=0.5).state_dict()

    def spoil(name, fn):
        sd = {k: v.clone() for k, v in good.items()}
        sd[name] = fn(sd[name])
        return sd

    def set_at(i, v):
        def fn(t):
            t[i] = v
            return t
        return fn

    yield "column out of range", spoil("col", set_at(5, 40)), r"col\[5\] = 40 \(row 0\) is outside \[0, 40\)"
    yield "negative column", spoil("col", set_at(0, -1)), r"col\[0\] = -1"
    yield "duplicate column", spoil("col", set_at(1, int(good["col"][0]))), "col must increase strictly within a row"
    yield "crow start", spoil("crow", set_at(0, 1)), r"crow\[0\] must be 0"
    yield "crow decreasing", spoil("crow", set_at(3, 0)), "crow must never decrease"
    yield "crow end", spoil("crow", set_at(24, 0)), "crow must never decrease|crow\\[N\\] must equal"
    yield "crow length", spoil("crow", lambda c: c[:-1]), "crow must have 25 entries"
    yield "crow dtype", spoil("crow", lambda c: c.long()), "crow must be int32"
    yield "col dtype", spoil("col", lambda c: c.long()), "col must be int16 or int32"
    yield "values short", spoil("values", lambda v: v[:-1]), "one entry per stored value"
    yield "values NaN", spoil("values", set_at(2, float("nan"))), "NaN or Inf"
    yield "values int", spoil("values", lambda v: v.long()), "values must be float32"
    yield "bias shape", spoil("bias", lambda b: b[:-1]), "bias must be a float tensor of shape"
    yield "bias Inf", spoil("bias", lambda b: b.fill_(float("inf"))), "NaN or Inf"
    sd = dict(good)
    del sd["col"]
    yield "values without col", sd, "must hold all three or none"


@pytest.mark.parametrize("name,sd,message", list(corruptions()), ids=[c[0] for c in corruptions()])
def test_corrupted_checkpoints_are_refused_and_change_nothing(name, sd, message):
    mod = CSRLinear.from_linear(linear(seed=1), sparsity=0.3)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        mod.load_state_dict(sd)
    after = mod.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_values_that_overflow_the_layers_dtype_are_refused():
    src = CSRLinear.from_linear(linear(K=16, N=2)).bfloat16()
    with torch.no_grad():
        src.values.mul_(1e10)
    dst = CSRLinear(16, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="NaN or Inf once cast to the layer's torch.float16"):
        dst.load_state_dict(src.state_dict())
    assert dst.nnz == 0


def test_assign_refuses_another_dtype():
    sd = CSRLinear.from_linear(linear()).state_dict()
    with pytest.raises(RuntimeError, match="assign=True takes the checkpoint's tensor as it is"):
        CSRLinear(40, 24).load_state_dict(dict(sd, values=sd["values"].bfloat16()), assign=True)
    with pytest.raises(RuntimeError, match="assign=True takes the checkpoint's tensor as it is"):
        CSRLinear(40, 24).load_state_dict(dict(sd, col=sd["col"].int()), assign=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_conversions_follow_the_model(dtype):
    mod = CSRLinear.from_linear(linear(), sparsity=0.5)
    model = nn.Sequential(mod).to(dtype)
    assert mod.values.dtype == dtype and mod.bias.dtype == dtype
    assert mod.col.dtype == torch.int16 and mod.crow.dtype == torch.int32
    assert model(torch.randn(2, 40, dtype=dtype)).dtype == dtype
    assert copy.deepcopy(mod).nnz == mod.nnz


def test_conversions_that_would_break_the_format_are_refused():
    mod = CSRLinear.from_linear(linear(), sparsity=0.5)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(TypeError, match="integer CSR indices"):
        mod._apply(lambda t: t.float())
    with pytest.raises(TypeError, match="torch.float64"):
        mod.double()
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())


def test_forward_names_a_wrong_width_or_dtype():
    mod = CSRLinear.from_linear(linear())
    with pytest.raises(RuntimeError, match="must have 40 features"):
        mod(torch.randn(2, 39))
    with pytest.raises(RuntimeError, match="layer's dtype"):
        mod(torch.randn(2, 40, dtype=torch.bfloat16))


def test_compile_fullgraph_and_export_of_a_patched_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    patch_model(model, CSRConfig(sparsity=0.8))
    x = torch.randn(5, 32)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))


def test_patch_model_wanda_with_calibration_and_unpatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(10, 16)
    with InputNorms(model) as norms:
        model(x)
    importance = norms.result()
    original = copy.deepcopy(model)
    report = patch_model(model, CSRConfig(sparsity=0.75, method="wanda", importance=importance))
    assert report.method == "CSRConfig" and len(report.layers) == 2
    assert report.bytes_after < report.bytes_before
    for name in ("0", "2"):
        expected = prune_unstructured(original.get_submodule(name).weight, 0.75, importance[name])
        assert torch.equal(model.get_submodule(name).to_linear().weight, expected)
    unpatch_model(model)
    assert type(model[0]) is nn.Linear and float((model[0].weight == 0).float().mean()) == 0.75


def test_config_refuses_what_it_would_ignore():
    with pytest.raises(ValueError, match="sparsity must be a number"):
        CSRConfig(sparsity=1.2)
    with pytest.raises(ValueError, match="prunes to a sparsity"):
        CSRConfig(method="wanda", importance={"0": torch.ones(16)})
    with pytest.raises(ValueError, match="ignored"):
        CSRConfig(sparsity=0.5, importance={"0": torch.ones(16)})
    with pytest.raises(ValueError, match="method must be one of 'magnitude', 'wanda', 'sparsegpt'"):
        CSRConfig(sparsity=0.5, method="random")
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match="no importance for 2"):
        patch_model(model, CSRConfig(sparsity=0.5, method="wanda", importance={"0": torch.ones(16)}))
    assert type(model[0]) is nn.Linear


def test_shortcut_and_shared_layers():
    shared = nn.Linear(16, 16)
    with torch.no_grad():
        shared.weight.mul_(torch.rand_like(shared.weight) < 0.1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    patch_model(model, "csr")
    assert isinstance(model[0], CSRLinear) and model[0] is model[2]
    assert torchslim.CSRLinear is CSRLinear and csr.check(model[0].crow, model[0].col, model[0].values, 16) == []


def test_assign_refuses_a_checkpoint_on_several_devices_or_requiring_grad():
    sd = CSRLinear.from_linear(linear(), sparsity=0.5).state_dict()
    mod = CSRLinear.from_linear(linear(seed=2), sparsity=0.5)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"on several devices \(cpu, meta\)"):
        mod.load_state_dict(dict(sd, values=sd["values"].to("meta")), assign=True)
    with pytest.raises(RuntimeError, match="values: assign=True .* require grad"):
        mod.load_state_dict(dict(sd, values=sd["values"].clone().requires_grad_()), assign=True)
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())


def test_pruning_by_an_importance_without_values_is_refused():
    with pytest.raises(ValueError, match="importance is on the meta device"):
        CSRLinear.from_linear(linear(), sparsity=0.5, importance=torch.ones(40, device="meta"))
