"""Every compressed module, and models patched with each method, on CUDA: forward against the same
module on the CPU, gradients, torch.compile(fullgraph=True), CUDA-graph capture and replay, and
generate() on a small Llama. The op tests check each kernel against the float64 reference; these check
what a user runs: the modules' device moves and the ops behind them, together, on the GPU.

The CUDA cases are marked gpu (skipped without a GPU). The CPU cases of the first tests run the same
code here, so the test logic itself is checked on every machine."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim import CSRConfig, CSRLinear, Int8Linear, LowRankLinear, Sparse24Linear, patch_model
from conftest import capture_cuda_graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
# ||y_cuda - y_cpu|| / ||y_cpu||: two kernels that sum in different orders, each within its dtype's
# rounding (int8: the same exact int32 sums, only the float epilogue may round differently).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

BUILDERS = {
    "int8": lambda lin: Int8Linear.from_linear(lin),
    "2:4": lambda lin: Sparse24Linear.from_linear(lin),
    "csr": lambda lin: CSRLinear.from_linear(lin, sparsity=0.7),
    "lowrank": lambda lin: LowRankLinear.from_linear(lin, rank=24),
}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def make_module(kind: str, K: int = 200, N: int = 72, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[kind](nn.Linear(K, N))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("M", [1, 7, 130])
def test_module_on_device_matches_cpu(kind, dtype, device, M):
    cpu = make_module(kind).to(dtype)
    mod = copy.deepcopy(cpu).to(device)
    x = torch.randn(M, 200).to(dtype)
    y = mod(x.to(device))
    assert y.device.type == device and y.dtype == dtype and y.shape == (M, 72)
    assert rel_err(y, cpu(x)) <= REL_TOL[dtype]
    # The dense equivalent computes the same layer (int8: up to activation quantization).
    dense = mod.to_linear()
    assert dense.weight.device.type == device
    tol = 2e-2 if kind == "int8" else 4 * REL_TOL[dtype] + 1e-5
    assert rel_err(y, F.linear(x.double(), dense.weight.double().cpu(), dense.bias.double().cpu())) <= tol
    # And back: the module returns to the CPU unchanged.
    assert torch.equal(mod.cpu()(x), cpu(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_module_gradient_on_device(kind, device):
    cpu = make_module(kind, seed=1)
    mod = copy.deepcopy(cpu).to(device)
    x = torch.randn(5, 200)
    dy = torch.randn(5, 72)
    grads = []
    for m, dev in ((cpu, "cpu"), (mod, device)):
        xd = x.to(dev).detach().requires_grad_()  # a leaf on each device (x itself on the CPU)
        m(xd).backward(dy.to(dev))
        grads.append(xd.grad.cpu())
    assert rel_err(grads[1], grads[0]) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_module_checkpoint_across_devices(kind, device):
    # A checkpoint saved on one device loads into a module on the other and computes the same.
    src = make_module(kind, seed=2).to(device)
    dst = make_module(kind, seed=3)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 200)
    assert rel_err(src(x.to(device)), dst(x)) <= 1e-5


class Block(nn.Module):
    """Two attention-like projections and an MLP, as in a Transformer layer."""

    def __init__(self, d=128):
        super().__init__()
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = x + self.o(torch.tanh(self.q(x)))
        return self.norm(h + self.down(F.gelu(self.up(h))))


PATCH_CONFIGS = {"int8": "int8", "2:4": "2:4", "csr": CSRConfig(sparsity=0.7), "lowrank": "lowrank"}


def patched_block(method: str, dtype=torch.bfloat16) -> nn.Module:
    torch.manual_seed(4)
    model = nn.Sequential(Block(), Block())
    patch_model(model, PATCH_CONFIGS[method])
    return model.to("cuda", dtype).eval()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", list(PATCH_CONFIGS))
def test_patched_model_cuda_graph_capture_and_replay(method):
    model = patched_block(method)
    static_x = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        graph, static_y = capture_cuda_graph(model, static_x, warmup=3)
        for seed in range(3):
            x = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(seed))
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_y, model(x), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", list(PATCH_CONFIGS))
def test_patched_model_compiles_fullgraph_on_cuda(method):
    model = patched_block(method)
    x = torch.randn(2, 9, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    # Inductor fuses the float ops around the compressed layers in float32: close, not identical.
    assert rel_err(compiled, eager) <= 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", list(PATCH_CONFIGS))
def test_patched_model_trains_on_cuda(method):
    model = patched_block(method, dtype=torch.float32).train()
    x = torch.randn(4, 128, device="cuda")
    model(x).square().mean().backward()
    # Gradients reach every float parameter below and between the compressed layers.
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", list(PATCH_CONFIGS))
def test_patched_llama_generates_on_cuda(method):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    report = patch_model(model, PATCH_CONFIGS[method], filter_fn=lambda m, name: name != "lm_head")
    assert len(report.layers) == 14  # 7 projections per layer
    model = model.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 8), device="cuda")
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 14) and bool((out[:, :8] == ids).all())


@pytest.mark.gpu
@needs_cuda
def test_info_reports_the_cuda_kernels():
    info = torchslim.info()
    assert info["cuda_available"] and info["cuda_compiled"]
    assert all(k["cuda"] not in ("not built", "needs triton") for k in info["kernels"].values())
