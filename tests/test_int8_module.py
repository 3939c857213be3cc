"""Int8Linear and patch_model: the drop-in module, its state_dict, compile, and model patching."""
import copy
import io

import pytest
import torch
from conftest import FLOAT_DTYPES, UNIT_ROUNDOFF
from torch import nn

from torchslim import Int8Linear, reference
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
    for bad in (-s, torch.full_like(s, float("inf")), torch.full_like(s, 1e-45), torch.zeros_like(s)):
        with pytest.raises(ValueError, match=r"smooth_scale\[0\] is .*: smooth scales must be finite and at least"):
            Int8Linear.from_linear(lin, smooth_scale=bad)
    with pytest.raises(ValueError, match=r"smooth_scale must be a float tensor of shape \(96,\)"):
        Int8Linear.from_linear(lin, smooth_scale=s[:-1])
    big = linear()
    big.weight.data *= 100
    with pytest.raises(ValueError, match="weight \\* smooth_scale overflows"):
        Int8Linear.from_linear(big, smooth_scale=torch.full_like(s, 1e38))


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




# ---------------------------------------------------------------------------------------------
# devices: every argument on x's device, meta included
# ---------------------------------------------------------------------------------------------
def test_module_on_meta_refuses_cpu_input():
    mod = Int8Linear.from_linear(linear()).to("meta")
    with pytest.raises(RuntimeError, match="int8_linear: w_q must be on cpu like x, got meta"):
        mod(torch.randn(2, 96))
    cpu_mod = Int8Linear.from_linear(linear())
    with pytest.raises(RuntimeError, match="int8_linear_packed: w_scale must be on meta like x, got cpu"):
        cpu_mod(torch.randn(2, 96, device="meta"))


def test_forward_names_the_wrong_input_width():
    with pytest.raises(RuntimeError, match=r"Int8Linear\(in_features=32\): x must have 32 features in its last "
                                           r"dimension, got shape \[4, 16\]"):
        Int8Linear(32, 24)(torch.randn(4, 16))
    with pytest.raises(RuntimeError, match="got shape \\[\\]"):
        Int8Linear(32, 24)(torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradient_matches_the_dequantized_linear(dtype, smooth):
    # Straight through the activation quantization, the gradient w.r.t. x is that of to_linear().
    lin = linear(dtype=dtype)
    s = torch.rand(96) + 0.5 if smooth else None
    mod = Int8Linear.from_linear(lin, smooth_scale=s)
    dense = mod.to_linear()
    x = torch.randn(3, 5, 96).to(dtype)
    dy = torch.randn(3, 5, 80).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    mod(xa).backward(dy)
    dense(xb).backward(dy)
    u = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(xa.grad, xb.grad, rtol=u, atol=u * float(xb.grad.abs().max()))
    assert not any(p.requires_grad for p in mod.parameters()) and list(mod.parameters()) == []


def test_layers_below_keep_training():
    torch.manual_seed(4)
    below = nn.Linear(16, 96)
    model = nn.Sequential(below, nn.ReLU(), Int8Linear.from_linear(linear()))
    x = torch.randn(8, 16)
    model(x).pow(2).sum().backward()
    assert below.weight.grad is not None and below.weight.grad.abs().sum() > 0
    # A residual branch around the int8 layer keeps both paths.
    block = Int8Linear.from_linear(linear(K=32, N=32))
    h = torch.randn(4, 32, requires_grad=True)
    (h + block(h)).sum().backward()
    expected = 1 + torch.ones(4, 32) @ block.to_linear().weight.detach()
    torch.testing.assert_close(h.grad, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# checkpoints are checked, not cast
# ---------------------------------------------------------------------------------------------
def state_of(mod):
    return {k: v.clone() for k, v in mod.state_dict().items()}


def assert_unchanged(mod, before, x=None):
    after = mod.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    if x is not None:
        mod(x)  # still runs


def bad_checkpoints(sd):
    """(label, state_dict, message) of checkpoints Int8Linear must refuse before writing anything."""
    def edit(**changes):
        out = dict(sd)
        out.update(changes)
        return out

    w = sd["weight"]
    yield "int32 weight", edit(weight=w.int() + 200), r"weight: expected int8 .* got torch.int32 .* would cast"
    yield "float weight", edit(weight=w.float() + 0.5), "weight: expected int8"
    yield "weight shape", edit(weight=w[:-1]), r"weight: expected int8 of shape \(80, 96\)"
    scale = sd["weight_scale"]
    for bad in (float("nan"), float("inf")):
        s = scale.clone()
        s[3] = bad
        yield f"{bad} scale", edit(weight_scale=s), f"weight_scale: element 3 is {bad}; it must be finite"
    yield "float64 scale", edit(weight_scale=scale.double()), "weight_scale: expected float32"
    yield "int bias", edit(bias=sd["bias"].long()), "bias: expected a float tensor"
    b = sd["bias"].clone()
    b[0] = float("nan")
    yield "NaN bias", edit(bias=b), "bias: element 0 is nan"
    yield "not a tensor", edit(weight_scale=[1.0] * 80), "weight_scale: expected a tensor"
    if "smooth_scale" in sd:
        for bad in (0.0, 1e-45, -1.0):
            ss = sd["smooth_scale"].clone()
            ss[5] = bad
            yield f"smooth {bad}", edit(smooth_scale=ss), r"smooth_scale\[5\] is .*at least"


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("strict", [True, False])
def test_bad_checkpoints_are_refused_and_change_nothing(strict, assign):
    good = Int8Linear.from_linear(linear(), smooth_scale=torch.rand(96) + 0.5)
    x = torch.randn(3, 96)
    for label, sd, message in bad_checkpoints(good.state_dict()):
        mod = Int8Linear.from_linear(linear(seed=1), smooth_scale=torch.rand(96) + 0.5)
        before, y = state_of(mod), mod(x)
        with pytest.raises(RuntimeError, match=message):
            mod.load_state_dict(sd, strict=strict, assign=assign)
        assert_unchanged(mod, before, x)
        assert torch.equal(mod(x), y), label


def test_assign_loads_into_a_meta_module():
    # The big-model flow: build on meta (no memory), then assign the checkpoint's tensors.
    src = Int8Linear.from_linear(linear(), smooth_scale=torch.rand(96) + 0.5)
    mod = Int8Linear(96, 80, smooth=True, device="meta")
    mod.load_state_dict(src.state_dict(), assign=True)
    assert mod.weight.device.type == "cpu" and mod.weight.dim() == 1  # packed for the CPU
    x = torch.randn(4, 96)
    assert torch.equal(mod(x), src(x))


def test_partial_checkpoint_with_strict_false():
    src = Int8Linear.from_linear(linear())
    mod = Int8Linear.from_linear(linear(seed=2))
    sd = {"weight_scale": src.weight_scale.clone()}
    result = mod.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == {"weight", "bias"}
    assert torch.equal(mod.weight_scale, src.weight_scale)


# ---------------------------------------------------------------------------------------------
# conversions leave the module as it was when they fail
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_failed_cuda_move_changes_nothing():
    mod = Int8Linear.from_linear(linear())
    before, x = state_of(mod), torch.randn(2, 96)
    with pytest.raises((RuntimeError, AssertionError)):
        mod.cuda()
    assert mod.weight.dim() == 1  # still the packed CPU layout
    assert_unchanged(mod, before, x)


def test_conversion_failing_midway_restores_every_buffer():
    mod = Int8Linear.from_linear(linear(), smooth_scale=torch.rand(96) + 0.5)
    before, x = state_of(mod), torch.randn(2, 96)
    calls = []

    def fails_on_third_tensor(t):
        calls.append(t)
        if len(calls) == 4:  # the probe, then weight, weight_scale, bias
            raise RuntimeError("boom")
        return t.clone()

    with pytest.raises(RuntimeError, match="boom"):
        mod._apply(fails_on_third_tensor)
    assert_unchanged(mod, before, x)


def test_dtype_conversion_of_the_int8_weight_is_refused():
    mod = Int8Linear.from_linear(linear())
    before = state_of(mod)
    with pytest.raises(TypeError, match="would turn the int8 weight into torch.float64"):
        mod.type(torch.float64)
    assert_unchanged(mod, before, torch.randn(2, 96))


def test_share_memory_shares_the_packed_weight():
    mod = Int8Linear.from_linear(linear())
    x = torch.randn(2, 96)
    y = mod(x)
    mod.share_memory()
    assert mod.weight.is_shared() and mod.weight_scale.is_shared() and mod.bias.is_shared()
    assert mod.weight.dim() == 1 and torch.equal(mod(x), y)


def test_to_empty_from_meta():
    mod = Int8Linear(96, 80, device="meta").to_empty(device="cpu")
    assert mod.weight.dim() == 1
    mod.load_state_dict(Int8Linear.from_linear(linear()).state_dict())
    assert mod(torch.randn(2, 96)).shape == (2, 80)


# ---------------------------------------------------------------------------------------------
# construction: clear errors, edge sizes
# ---------------------------------------------------------------------------------------------
def test_zero_input_features_give_the_bias():
    lin = nn.Linear(0, 4)
    mod = Int8Linear.from_linear(lin)
    assert torch.equal(mod(torch.randn(3, 0)), lin.bias.detach().expand(3, 4))
    assert Int8Linear.from_linear(nn.Linear(5, 0))(torch.randn(2, 5)).shape == (2, 0)


def test_layers_too_wide_for_int32_are_refused_up_front():
    with pytest.raises(ValueError, match="in_features=65537 exceeds 65536"):
        Int8Linear.from_linear(nn.Linear(65537, 1, device="meta"))
    with pytest.raises(ValueError, match="in_features must be a non-negative int"):
        Int8Linear(-1, 4)
    with pytest.raises(TypeError, match="expects an nn.Linear, got Conv1d"):
        Int8Linear.from_linear(nn.Conv1d(3, 3, 1))


def test_from_linear_on_meta_builds_a_meta_module():
    mod = Int8Linear.from_linear(nn.Linear(96, 80, device="meta"), smooth_scale=torch.ones(96, device="meta"))
    assert mod.weight.is_meta and mod.weight.shape == (80, 96) and mod.smooth_scale.is_meta
    assert mod(torch.randn(2, 96, device="meta")).shape == (2, 80)


# ---------------------------------------------------------------------------------------------
# on a GPU (skipped without one)
# ---------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_module_moves_to_cuda_and_back(dtype):
    cpu_mod = Int8Linear.from_linear(linear(dtype=dtype), smooth_scale=torch.rand(96) + 0.5)
    gpu_mod = copy.deepcopy(cpu_mod).cuda()
    assert gpu_mod.weight.shape == (80, 96) and gpu_mod.weight.is_cuda  # the canonical layout off the CPU
    for k, v in cpu_mod.state_dict().items():
        assert torch.equal(gpu_mod.state_dict()[k].cpu(), v), k
    x = torch.randn(3, 5, 96).to(dtype)
    y = gpu_mod(x.cuda())
    assert y.is_cuda and y.dtype == dtype
    # Same quantization, same int32 sums, another epilogue rounding: within the dtype's rounding.
    torch.testing.assert_close(y.cpu().float(), cpu_mod(x).float(), rtol=3 * UNIT_ROUNDOFF[dtype], atol=1e-5)
    back = gpu_mod.cpu()
    assert back.weight.dim() == 1 and torch.equal(back(x), cpu_mod(x))


@pytest.mark.gpu
@needs_cuda
def test_cuda_gradient_and_checkpoint():
    mod = Int8Linear.from_linear(linear()).cuda()
    x = torch.randn(4, 96, device="cuda", requires_grad=True)
    dy = torch.randn(4, 80, device="cuda")
    mod(x).backward(dy)
    expected = dy @ mod.to_linear().weight.detach()
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-5)
    before = state_of(mod)
    bad = dict(mod.state_dict())
    bad["weight"] = bad["weight"].float()
    with pytest.raises(RuntimeError, match="weight: expected int8"):
        mod.load_state_dict(bad)
    assert_unchanged(mod, before)
    with pytest.raises(RuntimeError, match="int8_linear: w_q must be on cpu like x, got cuda"):
        mod(torch.randn(2, 96))


# ---------------------------------------------------------------------------------------------
# found by an adversarial pass over the hardening (each was a defect)
# ---------------------------------------------------------------------------------------------
def test_float16_input_with_a_smooth_scale_stays_finite():
    # x / s overflows float16 (100 / 1e-3), and s = 1e-8 underflows in it: the division is float32.
    lin = linear(K=8, N=4)
    for s in (1e-3, 1e-8):
        mod = Int8Linear.from_linear(lin, smooth_scale=torch.full((8,), s))
        x = torch.full((2, 8), 100.0)
        y = mod(x.half())
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), mod(x), rtol=2e-3, atol=1e-2)


def test_integer_input_is_refused_with_or_without_smooth_scale():
    for s in (None, torch.ones(96)):
        with pytest.raises(RuntimeError, match="Int8Linear: x must be float32, bfloat16 or float16, got torch.int64"):
            Int8Linear.from_linear(linear(), smooth_scale=s)(torch.randint(0, 3, (2, 96)))


def test_float64_layers_are_refused_up_front():
    with pytest.raises(TypeError, match="the layer is torch.float64.*convert the model"):
        Int8Linear.from_linear(linear(dtype=torch.float64))


def test_meta_tensors_in_a_checkpoint_are_refused_before_writing():
    mod = Int8Linear.from_linear(linear())
    before = state_of(mod)
    sd = dict(Int8Linear.from_linear(linear(seed=3)).state_dict())
    sd["bias"] = sd["bias"].to("meta")
    with pytest.raises(RuntimeError, match="bias: a meta tensor has no values to copy"):
        mod.load_state_dict(sd)
    assert_unchanged(mod, before, torch.randn(2, 96))


def test_inference_tensors_are_refused_before_writing():
    with torch.inference_mode():
        mod = Int8Linear.from_linear(linear())
    before = state_of(mod)
    with pytest.raises(RuntimeError, match="inference tensors"):
        mod.load_state_dict(Int8Linear.from_linear(linear(seed=4)).state_dict())
    assert_unchanged(mod, before)


@pytest.mark.parametrize("assign", [False, True])
def test_non_contiguous_and_parameter_tensors_load(assign):
    src = Int8Linear.from_linear(linear())
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["weight"] = sd["weight"].t().contiguous().t()
    sd["weight_scale"] = torch.stack([sd["weight_scale"]] * 2, 1)[:, 0]
    sd["bias"] = nn.Parameter(sd["bias"])
    assert not sd["weight"].is_contiguous() and not sd["weight_scale"].is_contiguous()
    mod = Int8Linear(96, 80)
    mod.load_state_dict(sd, assign=assign)
    assert [n for n, _ in mod.named_buffers()] == ["weight", "weight_scale", "bias"] and list(mod.parameters()) == []
    x = torch.randn(3, 96)
    assert torch.equal(mod(x), src(x))


def test_conversions_to_other_kinds_of_numbers_are_refused():
    mod = Int8Linear.from_linear(linear())
    before = state_of(mod)
    for convert in (lambda m: m.type(torch.int8), lambda m: m.to(torch.complex64)):
        with pytest.raises(TypeError, match="Int8Linear: this conversion would turn"):
            convert(mod)
        assert_unchanged(mod, before, torch.randn(2, 96))


def test_to_empty_on_cpu_keeps_a_valid_layout():
    mod = Int8Linear.from_linear(linear()).to_empty(device="cpu")
    assert mod.state_dict()["weight"].shape == (80, 96)
    assert mod(torch.randn(2, 96)).shape == (2, 80)


def test_kernels_run_on_a_thread_with_a_small_stack():
    import threading

    mod = Int8Linear.from_linear(linear(K=256, N=64))
    x = torch.randn(64, 256)
    expected = mod(x)
    result = {}
    old = threading.stack_size(32 * 1024)  # the smallest Python allows
    try:
        t = threading.Thread(target=lambda: result.setdefault("y", mod(x)))
        t.start()
        t.join()
    finally:
        threading.stack_size(old)
    assert torch.equal(result["y"], expected)


# ---------------------------------------------------------------------------------------------
# found by a second adversarial pass (each was a defect)
# ---------------------------------------------------------------------------------------------
def test_dtype_conversions_follow_the_model_and_float64_is_refused():
    mod = Int8Linear.from_linear(linear())
    mod.half()
    assert mod.orig_dtype == torch.float16 and mod.to_linear().weight.dtype == torch.float16
    mod.to(torch.bfloat16)
    assert mod.to_linear().weight.dtype == torch.bfloat16 and mod.bias.dtype == torch.bfloat16
    before = state_of(mod)
    for convert in (lambda m: m.double(), lambda m: m.to(torch.float8_e4m3fn)):
        with pytest.raises(TypeError, match="Int8Linear runs on float32, bfloat16 or float16"):
            convert(mod)
        assert_unchanged(mod, before, torch.randn(2, 96, dtype=torch.bfloat16))


def test_export_with_a_dynamic_batch():
    mod = Int8Linear.from_linear(linear())
    exported = torch.export.export(mod, (torch.randn(3, 96),), dynamic_shapes=({0: torch.export.Dim("M")},))
    x = torch.randn(5, 96)
    assert torch.equal(exported.module()(x), mod(x))


def test_a_subclass_and_children_load_through_nn_module():
    class WithExtra(Int8Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = nn.Parameter(torch.zeros(3))
            self.adapter = nn.Linear(2, 2)

    a, b = WithExtra(96, 80), WithExtra(96, 80)
    with torch.no_grad():
        a.extra.fill_(5)
        a.weight_scale.fill_(0.5)
    result = b.load_state_dict(a.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(b.extra, a.extra) and torch.equal(b.adapter.weight, a.adapter.weight)
    assert torch.equal(b.weight_scale, a.weight_scale)
    sd = a.state_dict()
    sd["nonsense"] = torch.zeros(1)
    del sd["bias"]
    result = b.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["nonsense"]


def test_load_under_inference_mode_keeps_a_trainable_module():
    src = Int8Linear.from_linear(linear())
    mod = Int8Linear(96, 80)
    with torch.inference_mode():
        mod.load_state_dict(src.state_dict(), assign=True)
    assert not any(b.is_inference() for b in mod.buffers())
    x = torch.randn(2, 96, requires_grad=True)
    mod(x).sum().backward()
    assert x.grad is not None


def test_a_bias_that_overflows_the_module_dtype_is_refused():
    mod = Int8Linear(96, 80, dtype=torch.float16)
    sd = dict(Int8Linear(96, 80).state_dict())
    sd["bias"] = torch.full((80,), 1e6)
    before = state_of(mod)
    with pytest.raises(RuntimeError, match="bias: its values overflow the module's torch.float16"):
        mod.load_state_dict(sd)
    assert_unchanged(mod, before)


def test_loading_into_a_meta_module_without_assign_warns():
    with pytest.warns(UserWarning, match="meta buffer does nothing; pass assign=True"):
        Int8Linear(96, 80, device="meta").load_state_dict(Int8Linear(96, 80).state_dict())


def test_conversions_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        mod = Int8Linear(96, 80)
        mod.half()
        mod.to("cpu")
        assert mod(torch.randn(2, 96, dtype=torch.float16)).shape == (2, 80)
