"""The cuSPARSELt path of sparse24_linear (python/torchslim/_sparse24_cusparselt.py, taken from
SPARSE24_CUSPARSELT_MIN_M rows on): the op against the float64 reference, the weight cache, and the
fallback to the Triton kernel where the library cannot take the call. GPU only."""
import pytest
import torch

from conftest import assert_close_to_reference
from test_sparse24_linear_triton import dense_weight, make_case
from torchslim import _cuda_registration, _sparse24_cusparselt, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not torch.backends.cusparselt.is_available(),
                       reason="needs an NVIDIA GPU and torch with cuSPARSELt"),
]
BIG_M = _cuda_registration.SPARSE24_CUSPARSELT_MIN_M


def check(x, values, meta, bias, y):
    K = x.shape[1]
    w = dense_weight(values, meta, K)
    ref = reference.sparse24_linear(x.cpu(), values.cpu(), meta.cpu(), None if bias is None else bias.cpu())
    s = x.double().cpu().abs() @ w.double().abs().T
    if bias is not None:
        s = s + bias.cpu().to(x.dtype).double().abs()
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_cuda
    assert_close_to_reference(y.cpu(), ref, s, float32_roundings=K + 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(BIG_M, 128, 256), (BIG_M + 3, 64, 128), (BIG_M + 1000, 256, 512), (BIG_M, 1024, 1024)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference(M, N, K, dtype, with_bias):
    x, values, meta, bias = make_case(M, N, K, dtype, dtype if with_bias else None, M + N + K, device="cuda")
    assert _sparse24_cusparselt.usable(x, values)
    check(x, values, meta, bias, torch.ops.torchslim.sparse24_linear(x, values, meta, bias))


def test_weight_change_in_place_is_seen():
    x, values, meta, bias = make_case(BIG_M, 64, 128, torch.bfloat16, None, 1, device="cuda")
    torch.ops.torchslim.sparse24_linear(x, values, meta, bias)
    values.mul_(2)  # a new version: the cached compressed copy must be rebuilt
    check(x, values, meta, bias, torch.ops.torchslim.sparse24_linear(x, values, meta, bias))


@pytest.mark.parametrize("M,N,K,dtype", [(BIG_M, 100, 128, torch.bfloat16),   # N not a multiple of 32
                                          (BIG_M, 64, 100, torch.float16),     # K not a multiple of 64
                                          (BIG_M, 64, 128, torch.float32),     # float32: never (TF32)
                                          (BIG_M - 1, 64, 128, torch.bfloat16)])  # small M: Triton
def test_other_calls_take_the_triton_kernel(M, N, K, dtype):
    x, values, meta, bias = make_case(M, N, K, dtype, dtype, 2, device="cuda")
    y = torch.ops.torchslim.sparse24_linear(x, values, meta, bias)
    check(x, values, meta, bias, y)
    if M >= BIG_M:
        assert _sparse24_cusparselt.sparse24_linear(x, values, meta, bias) is None


def test_cuda_graph_capture_after_warm_up():
    x, values, meta, bias = make_case(BIG_M, 128, 256, torch.bfloat16, torch.bfloat16, 3, device="cuda")
    torch.ops.torchslim.sparse24_linear(x, values, meta, bias)  # warm-up builds the compressed copy
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.torchslim.sparse24_linear(x, values, meta, bias)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, torch.ops.torchslim.sparse24_linear(x, values, meta, bias), rtol=0, atol=0)
