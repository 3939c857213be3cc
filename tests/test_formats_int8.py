"""The int8 weight format: packing invariants as properties."""
import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim import ops
from torchslim.compress import quantize_weight_per_channel
from torchslim.formats.int8 import HEADER_BYTES, packed_shape


@given(N=st.integers(0, 70), K=st.integers(0, 200), seed=st.integers(0, 2**31))
@settings(max_examples=40, deadline=None)
def test_pack_then_unpack_is_identity_and_the_layout_is_as_documented(N, K, seed):
    w = torch.randint(-128, 128, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = ops.int8_pack_weight(w)
    assert tuple(packed.shape) == packed_shape(N, K) and packed.dtype == torch.int8
    assert torch.equal(ops.int8_unpack_weight(packed, N, K), w)
    # The header: magic, version 2, block width 16, N, K (little-endian), zeros.
    raw = packed[:HEADER_BYTES].numpy().tobytes()
    assert raw[:8] == b"TSLMI8PK"
    assert struct.unpack("<IIqq", raw[8:32]) == (2, 16, N, K) and raw[32:] == bytes(32)
    # The blocks: [block][k / 4][channel][k % 4] of w + 128 as uint8.
    if N and K:
        k_pad = -(-K // 64) * 64
        blocks = packed[HEADER_BYTES:].view(torch.uint8).view(-1, k_pad // 4, 16, 4)
        n, k = torch.randint(0, N, (20,)), torch.randint(0, K, (20,))
        assert torch.equal(blocks[n // 16, k // 4, n % 16, k % 4].int(), w[n, k].int() + 128)


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
