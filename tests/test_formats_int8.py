"""The int8 weight format: packing invariants as properties."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim import ops
from torchslim.compress import quantize_weight_per_channel
from torchslim.formats.int8 import packed_shape


@given(N=st.integers(1, 70), K=st.integers(1, 200), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_pack_then_unpack_is_identity(N, K, seed):
    w = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = ops.int8_pack_weight(w)
    assert tuple(packed.shape) == packed_shape(N, K)
    assert torch.equal(ops.int8_unpack_weight(packed, N, K), w)
    # Each block row ends with its 16 channels' sums over k (padding channels sum to 0).
    sums = packed[:, -64:].contiguous().view(torch.int32).reshape(-1)
    expected = torch.zeros(sums.numel(), dtype=torch.int32)
    expected[:N] = w.int().sum(1)
    assert torch.equal(sums, expected)


@given(N=st.integers(1, 40), K=st.integers(1, 100), seed=st.integers(0, 2**31))
@settings(max_examples=30, deadline=None)
def test_weight_quantization_bound(N, K, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    w[0] = 0
    w_q, scale = quantize_weight_per_channel(w)
    assert w_q.dtype == torch.int8 and int(w_q.abs().max()) <= 127
    assert scale[0] == 0 and (w_q[0] == 0).all()
    err = (w_q.double() * scale.double()[:, None] - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
