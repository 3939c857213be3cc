"""LowRankLinear, LowRankConfig and patch_model(model, "lowrank"): the rank that rank / param_ratio / energy
give, exactness on weights that are low rank, whitened SVD from InputCovariance, refusals, forward shapes,
errors and gradients, state_dict round trips of any rank, corrupted checkpoints (the module unchanged),
conversions, compile, deepcopy, patching shared layers and Transformer layers, unpatch."""
import copy
import dataclasses
import io

import pytest
import torch
from conftest import FLOAT_DTYPES, UNIT_ROUNDOFF, examples
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchslim
from torchslim import LowRankConfig, LowRankLinear, patch_model, unpatch_model
from torchslim.compress import InputCovariance, max_useful_rank

# A 24 x 40 layer: low rank saves parameters below 24 * 40 / 64 = 15, so ranks 1..14 are useful.
N, K, LIMIT = 24, 40, 14


def linear(K=K, N=N, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias).to(dtype)


def rank4_linear(K=K, N=N, bias=True, dtype=torch.float32, seed=0):
    """A layer whose weight IS of rank 4 (A @ B, computed in float64, then rounded to dtype)."""
    lin = linear(K, N, bias, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, 4, generator=g, dtype=torch.float64)
    B = torch.randn(4, K, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(A @ B / 2)
    return lin


def randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def snapshot(module):
    """Everything load_state_dict / _apply could change: each buffer's object, values, dtype, device."""
    return {name: (t, None if t is None else (t.clone(), t.dtype, t.device, t.shape))
            for name, t in module._buffers.items()}


def assert_unchanged(module, snap):
    assert list(module._buffers) == list(snap)
    for name, (obj, saved) in snap.items():
        t = module._buffers[name]
        assert t is obj, f"{name} was replaced"
        if t is None:
            continue
        values, dtype, device, shape = saved
        assert (t.dtype, t.device, t.shape) == (dtype, device, shape), name
        assert t.is_meta or torch.equal(t, values), f"{name} was written"


def max_err(out, ref):
    return float((out.detach().double() - ref).abs().max())


# ------------------------------------------------------------------------------------ from_linear

@pytest.mark.parametrize("kwargs,rank", [
    (dict(rank=1), 1), (dict(rank=3), 3), (dict(rank=LIMIT), LIMIT),
    (dict(param_ratio=0.5), 7),  # floor(0.5 * 15)
    (dict(param_ratio=0.2), 3), (dict(param_ratio=0.99), 14), (dict(param_ratio=0.001), 1),
])
def test_rank_and_param_ratio_give_the_rank_they_promise(kwargs, rank):
    mod = LowRankLinear.from_linear(linear(), **kwargs)
    assert mod.rank == rank and mod.V.shape == (rank, K) and mod.U.shape == (N, rank)
    assert rank * (N + K) < N * K  # it saves parameters
    if "param_ratio" in kwargs and rank > 1:
        assert rank * (N + K) <= kwargs["param_ratio"] * N * K
    assert f"rank={rank}" in repr(mod)


@pytest.mark.parametrize("energy,rank", [(0.45, 1), (0.7, 2), (0.8, 3), (0.95, 4), (0.9999, 4)])
def test_energy_keeps_the_squared_singular_values_it_promises(energy, rank):
    # singular values 2, sqrt(2), 1, 1, then (float32 rounding noise): energies 4, 2, 1, 1 of 8
    g = torch.Generator().manual_seed(0)
    q1 = torch.linalg.qr(torch.randn(N, 4, generator=g, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(K, 4, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([2.0, 2.0**0.5, 1.0, 1.0], dtype=torch.float64)
    lin = linear()
    with torch.no_grad():
        lin.weight.copy_(q1 * s @ q2.T)
    mod = LowRankLinear.from_linear(lin, energy=energy)
    assert mod.rank == rank
    svals = torch.linalg.svdvals(mod.dense_weight().double())
    kept = float(svals[:rank].square().sum()) / float(s.square().sum())
    assert kept >= energy - 1e-5


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@given(n=st.integers(9, 48), k=st.integers(9, 48), seed=st.integers(0, 2**20))
@examples(3)
def test_a_weight_of_rank_4_is_reproduced_to_dtype_precision_at_rank_4(dtype, bias, n, k, seed):
    lin = rank4_linear(k, n, bias, dtype, seed)
    mod = LowRankLinear.from_linear(lin, rank=4)
    assert mod.V.dtype == mod.U.dtype == dtype and (mod.bias is None) == (not bias)
    if bias:
        assert torch.equal(mod.bias, lin.bias)
    assert (mod.to_linear().bias is None) == (not bias)
    u = UNIT_ROUNDOFF[dtype]
    w = lin.weight.detach().double()
    # The weight: U and V each rounded once, U @ V rounded to dtype once, and the truncation of the
    # rounding noise of w itself (at most u relative): 4 roundings of terms no larger than |U| @ |V|.
    err_w = (mod.dense_weight().double() - w).abs().max()
    assert float(err_w) <= 4 * u * float((mod.U.double().abs() @ mod.V.double().abs()).max())
    # The outputs, judged against the dense layer's own error in dtype (flash-attention's rule): the
    # module rounds U, V, the intermediate and the output (4 roundings) where the dense layer rounds
    # the output only; twice that.
    x = randn(2, 6, k, dtype=dtype, seed=seed + 1)
    ref = x.double() @ w.T + (lin.bias.detach().double() if bias else 0)
    out = mod(x)
    assert out.dtype == dtype and out.shape == (2, 6, n)
    assert max_err(out, ref) <= 8 * max_err(lin(x), ref)


def test_whitening_from_input_covariance_lowers_the_output_error_on_the_calibration_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 24))
    x = torch.randn(256, 32) * torch.logspace(-2, 1, 32)  # features of very unequal size
    with InputCovariance(model) as cov, torch.no_grad():
        ref = model(x)
    covariances = cov.result()
    assert set(covariances) == {"0", "2"} and covariances["0"].shape == (32, 32)
    plain, white = copy.deepcopy(model), copy.deepcopy(model)
    patch_model(plain, LowRankConfig(param_ratio=0.3))
    patch_model(white, LowRankConfig(param_ratio=0.3, whitening=covariances))
    assert [white[i].rank for i in (0, 2)] == [plain[i].rank for i in (0, 2)]
    # the config runs exactly from_linear with the layer's covariance
    direct = LowRankLinear.from_linear(model[0], param_ratio=0.3, whitening=covariances["0"])
    assert torch.equal(direct.U, white[0].U) and torch.equal(direct.V, white[0].V)
    with torch.no_grad():
        h = model[1](model[0](x))
        # each layer, on the inputs it was calibrated on: whitened SVD is optimal there
        for i, inp in ((0, x), (2, h)):
            dense = model[i](inp)
            assert (white[i](inp) - dense).norm() <= (plain[i](inp) - dense).norm()
        # and the whole model, well beyond rounding
        assert (white(x) - ref).norm() < 0.8 * (plain(x) - ref).norm()
    # plain SVD stays the nearer to the weight itself
    w = model[0].weight.detach()
    assert (plain[0].dense_weight() - w).norm() < (white[0].dense_weight() - w).norm()


def _int_linear():
    lin = linear()
    lin.weight = nn.Parameter(torch.ones(N, K, dtype=torch.int32), requires_grad=False)
    return lin


def _spoiled(name, index, value):
    def make():
        lin = linear()
        with torch.no_grad():
            getattr(lin, name)[index] = value
        return lin
    return make


FROM_LINEAR_REFUSALS = [
    ("rank saves nothing", linear, dict(rank=15), ValueError,
     (r"^LowRankLinear.from_linear: rank 15, but low rank saves nothing for a 24x40 weight at rank >= "
      r"N\*K/\(N\+K\) \(15\*64 >= 960\); the largest useful rank is 14$")),
    ("rank > min", linear, dict(rank=25), ValueError, r"rank 25 exceeds min\(N, K\) = 24 for a 24x40 weight"),
    ("rank 0", linear, dict(rank=0), ValueError, "rank must be an int >= 1, got 0"),
    ("rank float", linear, dict(rank=2.0), ValueError, "rank must be an int >= 1, got 2.0"),
    ("two options", linear, dict(rank=2, param_ratio=0.3), ValueError,
     "give exactly one of rank, param_ratio or energy, got rank and param_ratio"),
    ("three options", linear, dict(rank=2, param_ratio=0.3, energy=0.5), ValueError,
     "got rank and param_ratio and energy"),
    ("no option", linear, {}, ValueError, "exactly one of rank, param_ratio or energy, got none"),
    ("param_ratio 1", linear, dict(param_ratio=1.0), ValueError, r"param_ratio must be a number in \(0, 1\), got 1.0"),
    ("energy 0", linear, dict(energy=0.0), ValueError, r"energy must be a number in \(0, 1\], got 0.0"),
    ("energy keeping everything", linear, dict(energy=1.0), ValueError,
     "retaining energy 1.0 needs rank 24, but low rank saves nothing"),
    ("a 1-row layer", lambda: linear(N=1), dict(param_ratio=0.5), ValueError, "the largest useful rank is 0"),
    ("not a Linear", lambda: nn.Conv1d(K, N, 1), dict(rank=2), TypeError, "expects an nn.Linear, got Conv1d"),
    ("int layer", _int_linear, dict(rank=2), TypeError, "the layer is torch.int32; LowRankLinear computes in float32"),
    ("float64 layer", lambda: linear().double(), dict(rank=2), TypeError, "torch.float64.*convert the model first"),
    ("NaN weight", _spoiled("weight", (3, 5), float("nan")), dict(rank=2), ValueError, "weight holds NaN or Inf"),
    ("Inf weight", _spoiled("weight", (0, 0), float("inf")), dict(rank=2), ValueError, "weight holds NaN or Inf"),
    ("NaN bias", _spoiled("bias", 7, float("nan")), dict(rank=2), ValueError, "bias holds NaN or Inf"),
    ("NaN covariance", linear, dict(rank=2, whitening=torch.eye(K).index_fill(0, torch.tensor([3]), float("nan"))),
     ValueError, "LowRankLinear.from_linear: covariance holds NaN or Inf"),
    ("covariance of the output side", linear, dict(rank=2, whitening=torch.eye(N)), ValueError,
     r"covariance must be a \(40, 40\) floating point tensor, got torch.float32 of shape \(24, 24\)"),
    ("1-D covariance", linear, dict(rank=2, whitening=torch.ones(K)), ValueError, r"covariance must be a \(40, 40\)"),
    ("int covariance", linear, dict(rank=2, whitening=torch.eye(K, dtype=torch.int64)), ValueError,
     "floating point tensor, got torch.int64"),
    ("covariance not a tensor", linear, dict(rank=2, whitening=[[1.0] * K] * K), ValueError, "got list"),
    ("negative variance", linear, dict(rank=2, whitening=-torch.eye(K)), ValueError, "negative diagonal"),
]


@pytest.mark.parametrize("name,make,kwargs,exc,match", FROM_LINEAR_REFUSALS, ids=[r[0] for r in FROM_LINEAR_REFUSALS])
def test_from_linear_refuses_with_a_clear_message_and_leaves_the_layer_alone(name, make, kwargs, exc, match):
    lin = make()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with pytest.raises(exc, match=match):
        LowRankLinear.from_linear(lin, **kwargs)
    after = lin.state_dict()
    assert all(torch.equal(before[k], after[k]) or bool(before[k].isnan().any()) for k in before)


def test_meta_linear_gives_a_meta_module_of_the_same_rank_and_refuses_energy():
    with torch.device("meta"):
        lin = nn.Linear(K, N)
    for kwargs, rank in ((dict(rank=5), 5), (dict(param_ratio=0.5), 7)):
        mod = LowRankLinear.from_linear(lin, **kwargs)
        assert mod.V.is_meta and mod.U.is_meta and mod.bias.is_meta and mod.rank == rank
        assert mod(torch.empty(3, K, device="meta")).shape == (3, N)
    with pytest.raises(ValueError, match="energy needs the weight's singular values.*give rank or param_ratio"):
        LowRankLinear.from_linear(lin, energy=0.9)
    # a covariance is checked though there is nothing to whiten: a meta skeleton built with the
    # config used on the real model accepts it, a covariance of another layer is a mistake
    assert LowRankLinear.from_linear(lin, rank=2, whitening=torch.eye(K)).rank == 2
    with pytest.raises(ValueError, match=r"covariance must be a \(40, 40\)"):
        LowRankLinear.from_linear(lin, rank=2, whitening=torch.eye(3))
    # the same refusal, in the same words, as for a layer with values
    for layer in (lin, linear()):
        with pytest.raises(ValueError, match="^LowRankLinear.from_linear: rank 15, but low rank saves nothing"):
            LowRankLinear.from_linear(layer, rank=15)


def test_constructor_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="rank must be a non-negative int"):
        LowRankLinear(K, N, -1)
    with pytest.raises(ValueError, match="in_features must be a non-negative int"):
        LowRankLinear(4.0, N, 2)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        LowRankLinear(K, N, 2, dtype=torch.float64)
    zero = LowRankLinear(K, N, 3)  # the zero weight until filled
    assert torch.equal(zero(torch.ones(2, K)), torch.zeros(2, N))


# ------------------------------------------------------------------------------------ forward

def test_forward_takes_leading_dims_a_vector_and_no_tokens():
    mod = LowRankLinear.from_linear(linear(), rank=6)
    x = randn(2, 3, K)
    out = mod(x)
    assert out.shape == (2, 3, N)
    assert torch.equal(out, mod(x.reshape(6, K)).reshape(2, 3, N))
    assert torch.equal(mod(x[0, 0]), mod(x[0, :1])[0]) and mod(x[0, 0]).shape == (N,)
    assert mod(torch.randn(0, K)).shape == (0, N) and mod(torch.randn(2, 0, K)).shape == (2, 0, N)
    strided = torch.randn(K, 5).T  # not contiguous
    assert torch.equal(mod(strided), mod(strided.contiguous()))


def test_forward_names_a_wrong_width_dtype_or_device():
    mod = LowRankLinear.from_linear(linear(), rank=6)
    with pytest.raises(RuntimeError, match=r"LowRankLinear\(in_features=40\): x must have 40 features .* \[3, 41\]"):
        mod(torch.randn(3, 41))
    with pytest.raises(RuntimeError, match="x must have 40 features"):
        mod(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="x is torch.bfloat16 but the layer is torch.float32"):
        mod(torch.randn(3, K, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x is torch.int64 but the layer is torch.float32"):
        mod(torch.ones(3, K, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="V must be on meta like x, got cpu"):
        mod(torch.randn(3, K, device="meta"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(N, K), (64, 32), (9, 130)])
def test_forward_matches_to_linear(dtype, shape):
    n, k = shape
    mod = LowRankLinear.from_linear(linear(k, n, dtype=dtype, seed=n), param_ratio=0.5)
    dense = mod.to_linear()
    assert type(dense) is nn.Linear and dense.weight.dtype == dtype and not dense.weight.is_meta
    assert torch.equal(dense.weight, mod.dense_weight()) and torch.equal(mod.weight, dense.weight)
    assert torch.equal(dense.bias, mod.bias)
    x = randn(3, 7, k, dtype=dtype)
    # both against the float64 product of the module's own factors: the module rounds the
    # intermediate and the output, the dense layer the weight U @ V and the output; a bit over twice
    ref = x.double() @ (mod.U.double() @ mod.V.double()).T + mod.bias.double()
    assert max_err(mod(x), ref) <= 5 * max_err(dense(x), ref)


def test_gradient_reaches_x_and_the_layers_below_not_the_factors():
    torch.manual_seed(0)
    below = nn.Linear(8, K)
    mod = LowRankLinear.from_linear(linear(), rank=5)
    x = torch.randn(4, 8, requires_grad=True)
    mod(below(x)).square().sum().backward()
    dense_below, x2 = copy.deepcopy(below), x.detach().clone().requires_grad_()
    dense_below.zero_grad()
    mod.to_linear()(dense_below(x2)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(below.weight.grad, dense_below.weight.grad, rtol=1e-4, atol=1e-5)
    assert list(mod.parameters()) == []
    assert all(not b.requires_grad and b.grad is None for b in mod.buffers())
    # bf16 too, with a leading batch
    mod16 = copy.deepcopy(mod).bfloat16()
    xb = torch.randn(2, 3, K, dtype=torch.bfloat16, requires_grad=True)
    mod16(xb).sum().backward()
    assert xb.grad.shape == xb.shape and xb.grad.dtype == torch.bfloat16 and bool(xb.grad.isfinite().all())


def test_compile_fullgraph_of_a_patched_model_with_a_dynamic_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    patch_model(model, "lowrank")
    assert all(isinstance(model[i], LowRankLinear) for i in (0, 2))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(compiled(x), model(x))
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every batch size
        for M in (5, 17):
            x = torch.randn(M, 32)
            torch.testing.assert_close(compiled(x), model(x))


def test_code_that_reads_weight_exports():
    class ReadsWeight(nn.Module):  # the T5 pattern: x.to(self.wo.weight.dtype)
        def __init__(self):
            super().__init__()
            self.wo = nn.Linear(16, 8)

        def forward(self, x):
            return self.wo(x.to(self.wo.weight.dtype))

    model = ReadsWeight()
    patch_model(model, "lowrank")
    x = randn(2, 16)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))


def test_deepcopy_is_an_independent_module():
    mod = LowRankLinear.from_linear(linear(), rank=6)
    twin = copy.deepcopy(mod)
    x = randn(3, K)
    assert torch.equal(twin(x), mod(x)) and twin.rank == mod.rank
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.buffers(), mod.buffers()))
    with torch.no_grad():
        twin.U.zero_()
    assert not torch.equal(twin(x), mod(x))


# ------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip_is_bit_exact_into_a_module_of_any_rank(bias):
    mod = LowRankLinear.from_linear(linear(bias=bias), rank=4)
    sd = mod.state_dict()
    assert set(sd) == ({"V", "U", "bias"} if bias else {"V", "U"})
    buf = io.BytesIO()
    torch.save(sd, buf)
    x = randn(5, K)
    for fresh in (LowRankLinear(K, N, 0, bias=bias), LowRankLinear(K, N, 1, bias=bias),
                  LowRankLinear.from_linear(linear(bias=bias, seed=3), rank=11)):
        assert fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()))) is not None
        assert fresh.rank == 4 and "rank=4" in repr(fresh)
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
        assert torch.equal(fresh(x), mod(x))
        assert all(t.is_contiguous() for t in fresh.buffers())
    # a float64 or bfloat16 checkpoint is cast to the layer's dtype, as nn.Module casts
    fresh = LowRankLinear(K, N, 2, bias=bias)
    fresh.load_state_dict({k: v.double() for k, v in sd.items()})
    assert fresh.V.dtype == torch.float32 and torch.equal(fresh(x), mod(x))


def test_meta_module_loads_a_checkpoint_with_assign():
    mod = LowRankLinear.from_linear(linear(), rank=4)
    sd = mod.state_dict()
    with torch.device("meta"):
        empty = LowRankLinear.from_linear(nn.Linear(K, N), rank=9)  # another rank
    assert empty.V.is_meta and empty.rank == 9
    empty.load_state_dict(sd, assign=True)
    assert empty.rank == 4 and empty.V is sd["V"] and not empty.V.is_meta
    x = randn(2, K)
    assert torch.equal(empty(x), mod(x))
    # non-contiguous checkpoint tensors become contiguous buffers (the kernel needs them)
    strided = {k: v.T.contiguous().T if v.dim() == 2 else v for k, v in sd.items()}
    assert not strided["V"].is_contiguous()
    other = LowRankLinear(K, N, 1, device="meta")
    other.load_state_dict(strided, assign=True)
    assert other.V.is_contiguous() and other.U.is_contiguous() and torch.equal(other(x), mod(x))


def corruptions():
    good = LowRankLinear.from_linear(linear(), rank=4).state_dict()

    def spoil(**changes):
        sd = {k: v.clone() for k, v in good.items()}
        for name, fn in changes.items():
            if fn is None:
                del sd[name]
            else:
                sd[name] = fn(sd[name])
        return sd

    def set_at(index, value):
        def fn(t):
            t[index] = value
            return t
        return fn

    yield "U of another rank", spoil(U=lambda u: torch.randn(N, 5)), \
        r"U must be a float tensor of shape \(24, 4\) for V of rank 4, got torch.float32 of shape \(24, 5\)"
    yield "V of another rank", spoil(V=lambda v: torch.randn(3, K)), r"U must be a float tensor of shape \(24, 3\)"
    yield "U transposed", spoil(U=lambda u: u.T.contiguous()), r"U must be a float tensor of shape \(24, 4\)"
    yield "V only", spoil(U=None), "V and U are one weight: a checkpoint must hold both or neither"
    yield "U only", spoil(V=None), "V and U are one weight: a checkpoint must hold both or neither"
    yield "NaN in V", spoil(V=set_at((2, 7), float("nan"))), "V hold NaN or Inf"
    yield "Inf in U", spoil(U=set_at((0, 3), float("-inf"))), "U hold NaN or Inf"
    yield "NaN bias", spoil(bias=set_at(5, float("nan"))), "bias hold NaN or Inf"
    yield "V overflows float32", spoil(V=lambda v: v.double() * 1e300, U=lambda u: u.double()), \
        "V hold NaN or Inf once cast to the layer's torch.float32"
    yield "wrong in_features", spoil(V=lambda v: torch.randn(4, K + 1)), \
        r"V must be a float tensor of shape \(rank, 40\), got torch.float32 of shape \(4, 41\)"
    yield "wrong out_features", spoil(U=lambda u: torch.randn(N + 1, 4)), r"U must be a float tensor of shape \(24, 4\)"
    yield "1-D V", spoil(V=lambda v: v.flatten()), r"V must be a float tensor of shape \(rank, 40\)"
    yield "3-D V", spoil(V=lambda v: v[None]), r"V must be a float tensor of shape \(rank, 40\)"
    yield "int V", spoil(V=lambda v: v.long()), "V must be a float tensor of shape .* got torch.int64"
    yield "int U", spoil(U=lambda u: u.int()), "U must be a float tensor of shape .* got torch.int32"
    yield "bool U", spoil(U=lambda u: u > 0), "got torch.bool"
    yield "int bias", spoil(bias=lambda b: b.long()), r"bias must be a float tensor of shape \(24,\)"
    yield "short bias", spoil(bias=lambda b: b[:-1]), r"bias must be a float tensor of shape \(24,\)"
    yield "V not a tensor", spoil(V=lambda v: v.tolist()), "V: expected a tensor, got list"
    yield "bias not a tensor", spoil(bias=lambda b: 0.0), "bias: expected a tensor, got float"
    yield "sparse V", spoil(V=lambda v: v.to_sparse()), \
        r"V: expected a dense \(strided\) tensor, got layout torch.sparse_coo"
    yield "meta U", spoil(U=lambda u: u.to("meta")), "Cannot copy out of meta tensor"


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name,sd,message", list(corruptions()), ids=[c[0] for c in corruptions()])
def test_corrupted_checkpoints_are_refused_and_change_nothing(name, sd, message, strict):
    mod = LowRankLinear.from_linear(linear(seed=1), rank=6)
    snap = snapshot(mod)
    with pytest.raises(RuntimeError, match=message):
        mod.load_state_dict(sd, strict=strict)
    assert_unchanged(mod, snap)
    assert mod.rank == 6


@given(v_shape=st.tuples(st.integers(0, 6), st.sampled_from([K - 1, K, K + 1])),
       u_shape=st.tuples(st.sampled_from([N - 1, N, N + 1]), st.integers(0, 6)),
       dtype=st.sampled_from([torch.float64, *FLOAT_DTYPES, torch.int32]), seed=st.integers(0, 2**20))
@examples(25)
def test_any_checkpoint_is_either_loaded_exactly_or_refused_changing_nothing(v_shape, u_shape, dtype, seed):
    V, U = randn(*v_shape, seed=seed).to(dtype), randn(*u_shape, seed=seed + 1).to(dtype)
    mod = LowRankLinear.from_linear(linear(seed=2), rank=3)
    snap = snapshot(mod)
    sd = {"V": V, "U": U, "bias": randn(N, seed=seed + 2)}
    fits = v_shape[1] == K and u_shape == (N, v_shape[0]) and dtype.is_floating_point
    if not fits:
        with pytest.raises(RuntimeError, match="V must be a float tensor|U must be a float tensor"):
            mod.load_state_dict(sd)
        assert_unchanged(mod, snap)
        return
    mod.load_state_dict(sd)
    assert mod.rank == v_shape[0] and mod.V.dtype == torch.float32
    assert torch.equal(mod.V, V.float()) and torch.equal(mod.U, U.float()) and torch.equal(mod.bias, sd["bias"])
    x = randn(3, K, seed=seed + 3)
    ref = x.double() @ (U.float().double() @ V.float().double()).T + sd["bias"].double()
    assert max_err(mod(x), ref) <= 5 * max_err(mod.to_linear()(x), ref) + 1e-6


def test_assign_refuses_another_dtype_grad_or_several_devices_and_changes_nothing():
    sd = LowRankLinear.from_linear(linear(), rank=4).state_dict()
    mod = LowRankLinear.from_linear(linear(seed=2), rank=6)
    snap = snapshot(mod)
    cases = [
        (dict(sd, V=sd["V"].bfloat16(), U=sd["U"].bfloat16()),
         (r"V: assign=True takes the checkpoint's tensor as it is, but its dtype torch.bfloat16 is not the layer's "
          r"torch.float32")),
        (dict(sd, bias=sd["bias"].half()), "bias: assign=True .* dtype torch.float16"),
        (dict(sd, U=sd["U"].clone().requires_grad_()), "U: assign=True .* require grad"),
        (dict(sd, V=nn.Parameter(sd["V"].clone())), "V: assign=True .* require grad"),
        (dict(sd, V=sd["V"].to("meta")), r"on several devices \(cpu, meta\)"),
        (dict(sd, bias=sd["bias"].to("meta")), r"on several devices \(cpu, meta\)"),
    ]
    for bad, message in cases:
        with pytest.raises(RuntimeError, match=message):
            mod.load_state_dict(bad, assign=True)
        assert_unchanged(mod, snap)


def test_missing_and_unexpected_keys_behave_like_nn_module():
    sd = LowRankLinear.from_linear(linear(), rank=4).state_dict()
    dense = nn.Linear(K, N)
    mod = LowRankLinear.from_linear(linear(seed=1), rank=6)
    snap = snapshot(mod)
    # nothing at all: strict names every key, non-strict reports them and changes nothing
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "V", "U", "bias"'):
        mod.load_state_dict({})
    assert_unchanged(mod, snap)
    keys = mod.load_state_dict({}, strict=False)
    assert keys.missing_keys == ["V", "U", "bias"] and keys.unexpected_keys == []
    assert dense.load_state_dict({}, strict=False).missing_keys == ["weight", "bias"]  # the same rule
    assert_unchanged(mod, snap)
    # a dense Linear's checkpoint is not a low-rank one; as nn.Module does, a strict key error is
    # raised after the keys that match (here the bias) are loaded: a dense Linear given an extra key alike
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "weight"'):
        mod.load_state_dict(dense.state_dict())
    assert mod.rank == 6 and torch.equal(mod.bias, dense.bias) and torch.equal(mod.V, snap["V"][1][0])
    other = nn.Linear(K, N)
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "V"'):
        other.load_state_dict(dict(dense.state_dict(), V=sd["V"]))
    assert torch.equal(other.bias, dense.bias)
    # a bias the layer lacks, a bias missing
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "bias"'):
        LowRankLinear(K, N, 2, bias=False).load_state_dict(sd)
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "bias"'):
        LowRankLinear(K, N, 2).load_state_dict({"V": sd["V"], "U": sd["U"]})
    # non-strict: the factors (and their rank) load, the bias stays
    keys = mod.load_state_dict({"V": sd["V"], "U": sd["U"], "extra": torch.ones(1)}, strict=False)
    assert keys.missing_keys == ["bias"] and keys.unexpected_keys == ["extra"]
    assert mod.rank == 4 and torch.equal(mod.V, sd["V"]) and torch.equal(mod.bias, dense.bias)


def test_a_checkpoint_inside_a_model_names_the_layer():
    model = nn.Sequential(nn.Linear(8, K), LowRankLinear.from_linear(linear(), rank=4))
    sd = model.state_dict()
    sd["1.V"] = sd["1.V"][:, :-1]
    with pytest.raises(RuntimeError, match=r"1.V must be a float tensor of shape \(rank, 40\)"):
        model.load_state_dict(sd)


# ------------------------------------------------------------------------------------ conversions

@pytest.mark.parametrize("convert,dtype", [(lambda m: m.to(torch.bfloat16), torch.bfloat16),
                                           (lambda m: m.half(), torch.float16),
                                           (lambda m: m.bfloat16().float(), torch.float32)])
def test_float_conversions_reach_every_buffer(convert, dtype):
    mod = LowRankLinear.from_linear(linear(), rank=6)
    converted = convert(copy.deepcopy(mod))
    assert converted.V.dtype == converted.U.dtype == converted.bias.dtype == dtype
    x = randn(3, K)
    out = converted(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), mod(x), rtol=3e-2, atol=3e-2)
    if dtype != torch.float32:
        with pytest.raises(RuntimeError, match=f"x is torch.float32 but the layer is {dtype}"):
            converted(x)


def test_float64_is_refused_and_the_module_is_unchanged():
    mod = LowRankLinear.from_linear(linear(), rank=6)
    snap = snapshot(mod)
    for convert in (lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.to("cpu", torch.float64)):
        with pytest.raises(TypeError, match="would make the weight torch.float64; LowRankLinear runs on float32, "
                                            "bfloat16 or float16"):
            convert(mod)
        assert_unchanged(mod, snap)
    with pytest.raises(TypeError, match="would make the weight torch.float64"):
        nn.Sequential(mod).double()
    assert_unchanged(mod, snap)


def test_a_conversion_failing_part_way_restores_every_buffer():
    mod = LowRankLinear.from_linear(linear(), rank=6)
    snap = snapshot(mod)

    def half_until_U(t):
        if t.shape == (N, 6):
            raise RuntimeError("out of memory, say")
        return t.half()

    with pytest.raises(RuntimeError, match="out of memory, say"):
        mod._apply(half_until_U)
    assert_unchanged(mod, snap)


def test_to_meta_and_back_with_to_empty_and_a_checkpoint():
    mod = LowRankLinear.from_linear(linear(), rank=6)
    sd = mod.state_dict()
    meta = copy.deepcopy(mod).to("meta")
    assert all(t.is_meta for t in meta.buffers()) and meta.rank == 6
    assert meta(torch.empty(2, 5, K, device="meta")).shape == (2, 5, N)
    back = meta.to_empty(device="cpu")
    back.load_state_dict(sd)
    x = randn(3, K)
    assert torch.equal(back(x), mod(x))


# ------------------------------------------------------------------------------------ patch_model

def _same_model(model, reference):
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    sd, ref = model.state_dict(), reference.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_lowrank_shortcut_on_a_transformer_encoder_layer_and_unpatch():
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    report = patch_model(enc, "lowrank")
    # the attention's out_proj is a Linear subclass, left alone; the MLP's two Linears are swapped
    assert [layer.name for layer in report.layers] == ["linear1", "linear2"]
    assert isinstance(enc.linear1, LowRankLinear) and isinstance(enc.linear2, LowRankLinear)
    assert type(enc.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert enc.linear1.rank == enc.linear2.rank == 10  # floor(0.5 * 64 * 32 / 96)
    assert report.method == "LowRankConfig" and report.bytes_after < report.bytes_before
    assert report.bytes_before == sum(4 * (64 * 32 + n) for n in (64, 32))
    assert report.bytes_after == sum(4 * (10 * 96 + n) for n in (64, 32))
    assert "2 layers swapped" in str(report)
    dense_weights = {name: enc.get_submodule(name).dense_weight() for name in ("linear1", "linear2")}
    x = randn(2, 5, 32)
    out_train = enc.train()(x)
    with torch.no_grad():
        out_eval = enc.eval()(x)  # PyTorch's fused encoder path reads linear1.weight: the dense U @ V
    unpatch_model(enc)
    for name, w in dense_weights.items():
        assert type(enc.get_submodule(name)) is nn.Linear and torch.equal(enc.get_submodule(name).weight, w)
    with torch.no_grad():
        torch.testing.assert_close(out_eval, enc(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out_train.detach(), enc.train()(x), rtol=1e-4, atol=1e-4)


def shared_model(seed=0):
    torch.manual_seed(seed)
    shared = nn.Linear(16, 16)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), shared, nn.ReLU(), shared)


def test_a_shared_layer_becomes_one_module_whitened_by_its_covariance_and_unpatches_to_one_linear():
    model = shared_model()
    x = randn(64, 8)
    with InputCovariance(model) as cov:
        model(x)
    covariances = cov.result()
    assert set(covariances) == {"0", "2"}  # the shared layer once, its inputs from both sites
    original = copy.deepcopy(model)
    report = patch_model(model, LowRankConfig(rank=2, whitening=covariances))
    assert isinstance(model[2], LowRankLinear) and model[2] is model[4]
    assert [(layer.name, layer.aliases) for layer in report.layers] == [("0", ()), ("2", ("4",))]
    assert report.bytes_before == 4 * (16 * 8 + 16 + 16 * 16 + 16)  # the shared layer counted once
    assert report.bytes_after == 4 * (2 * 24 + 16 + 2 * 32 + 16) < report.bytes_before
    expected = LowRankLinear.from_linear(original[2], rank=2, whitening=covariances["2"])
    assert torch.equal(model[2].U, expected.U) and torch.equal(model[2].V, expected.V)
    # the covariance given under the other name of the shared layer does the same
    by_alias = copy.deepcopy(original)
    patch_model(by_alias, LowRankConfig(rank=2, whitening={"0": covariances["0"], "4": covariances["2"]}))
    assert torch.equal(by_alias[4].V, expected.V)
    unpatch_model(model)
    assert type(model[2]) is nn.Linear and model[2] is model[4]
    assert torch.equal(model[2].weight, expected.dense_weight()) and torch.equal(model[2].bias, original[2].bias)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_a_rank_that_saves_nothing_names_the_layer_and_changes_nothing():
    model = shared_model()
    reference = copy.deepcopy(model)
    # layer 0 (16 x 8) saves parameters up to rank 5; rank 6 does for 2 (16 x 16, up to 7), not for 0
    with pytest.raises(ValueError, match=r"^LowRankConfig, layer 0 \(16 x 8\): LowRankLinear.from_linear: rank 6, "
                                         r"but low rank saves nothing.*the largest useful rank is 5 "
                                         r"\(patch_model's filter_fn can leave the layer dense\)$"):
        patch_model(model, LowRankConfig(rank=6))
    _same_model(model, reference)
    with pytest.raises(ValueError, match=r"layer 2 \(16 x 16\): .*rank 9 exceeds|layer 0 .* rank 9 exceeds"):
        patch_model(model, LowRankConfig(rank=9))
    _same_model(model, reference)
    report = patch_model(model, LowRankConfig(rank=6), filter_fn=lambda m, fqn: fqn != "0")  # leave it out
    assert [layer.name for layer in report.layers] == ["2"] and type(model[0]) is nn.Linear


def test_whitening_that_would_be_ignored_or_is_ambiguous_is_refused():
    model = shared_model()
    reference = copy.deepcopy(model)
    cov8, cov16 = torch.eye(8), torch.eye(16)
    with pytest.raises(ValueError, match="LowRankConfig names layers that are not converted: 0"):
        patch_model(model, LowRankConfig(rank=2, whitening={"0": cov8}), filter_fn=lambda m, fqn: fqn != "0")
    with pytest.raises(ValueError, match="not converted: 2.weight, typo"):
        patch_model(model, LowRankConfig(rank=2, whitening={"typo": cov8, "2.weight": cov16}))
    with pytest.raises(ValueError, match=r"gives the shared layer 2 several covariances \(under 2, 4\)"):
        patch_model(model, LowRankConfig(rank=2, whitening={"2": cov16, "4": 2 * cov16}))
    with pytest.raises(ValueError, match=r"layer 0 \(16 x 8\): LowRankLinear.from_linear: covariance must be "
                                         r"a \(8, 8\)"):
        patch_model(model, LowRankConfig(rank=2, whitening={"0": cov16}))
    _same_model(model, reference)
    # the same tensor under both names is one covariance
    patch_model(model, LowRankConfig(rank=2, whitening={"2": cov16, "4": cov16.clone()}))
    assert model[2] is model[4]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=2, param_ratio=0.5), ValueError, "give one of rank, param_ratio and energy, got rank, param_ratio"),
    (dict(rank=0), ValueError, "rank must be an int >= 1, got 0"),
    (dict(rank=True), ValueError, "rank must be an int >= 1, got True"),
    (dict(param_ratio=1), ValueError, r"param_ratio must be a number in \(0, 1\), got 1"),
    (dict(param_ratio="0.5"), ValueError, "param_ratio must be a number"),
    (dict(energy=0), ValueError, r"energy must be a number in \(0, 1\], got 0"),
    (dict(energy=float("nan")), ValueError, "energy must be a number"),
    (dict(whitening=[torch.eye(3)]), TypeError, "whitening must be a dict"),
    (dict(whitening={"0": [[1.0]]}), TypeError, "whitening values must be tensors; not for 0"),
    (dict(filter_fn="0"), TypeError, "filter_fn must be callable"),
])
def test_config_refuses_bad_settings_up_front(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LowRankConfig(**kwargs)


def test_config_defaults_and_energy_through_patch_model():
    # no choice given: half the parameters, decided per layer (the fields stay as given, so
    # dataclasses.replace(LowRankConfig(), rank=4) is a valid config)
    assert LowRankConfig().param_ratio is None and dataclasses.replace(LowRankConfig(), rank=4).rank == 4
    default = shared_model()
    patch_model(default, LowRankConfig())
    assert default[0].rank == LowRankLinear.from_linear(shared_model()[0], param_ratio=0.5).rank
    assert torchslim.LowRankConfig is LowRankConfig and torchslim.LowRankLinear is LowRankLinear
    model = shared_model()
    patch_model(model, LowRankConfig(energy=0.3))
    assert 1 <= model[0].rank <= max_useful_rank(16, 8) and 1 <= model[2].rank <= max_useful_rank(16, 16)


def test_a_meta_model_is_patched_to_a_skeleton_that_loads_the_real_checkpoint():
    real = shared_model()
    patch_model(real, "lowrank")
    with torch.device("meta"):
        skeleton = shared_model()
    with pytest.raises(ValueError, match=r"layer 0 \(16 x 8\): .*energy needs the weight's singular values"):
        patch_model(skeleton, LowRankConfig(energy=0.5))
    assert type(skeleton[0]) is nn.Linear
    patch_model(skeleton, "lowrank")
    assert skeleton[2] is skeleton[4] and skeleton[0].V.is_meta
    skeleton.load_state_dict(real.state_dict(), assign=True)
    x = randn(3, 8)
    assert torch.equal(skeleton(x), real(x))


def test_factors_made_parameters_are_fine_tuned():
    # The documented way to train the factors: make them parameters; forward, .to() and to_linear follow.
    torch.manual_seed(3)
    m = LowRankLinear.from_linear(nn.Linear(16, 8), rank=2)
    m.V, m.U = nn.Parameter(m.V.clone()), nn.Parameter(m.U.clone())
    x = torch.randn(5, 16)
    ref = torch.nn.functional.linear(torch.nn.functional.linear(x, m.V), m.U, m.bias)
    m(x).square().sum().backward()
    assert m.V.grad is not None and m.U.grad is not None and m.V.grad.abs().sum() > 0
    torch.testing.assert_close(m(x), ref)
    m.to(torch.bfloat16)
    assert m.V.dtype == torch.bfloat16 and isinstance(m.V, nn.Parameter)
    assert m(x.bfloat16()).dtype == torch.bfloat16 and m.to_linear().weight.dtype == torch.bfloat16


def test_numpy_ratio_is_a_number():
    np = pytest.importorskip("numpy")
    lin = nn.Linear(64, 64)
    assert (LowRankLinear.from_linear(lin, param_ratio=np.float64(0.3)).rank
            == LowRankLinear.from_linear(lin, param_ratio=0.3).rank == 9)
