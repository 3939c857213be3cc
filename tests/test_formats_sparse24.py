"""The 2:4 format (formats/sparse24.py) and 2:4 pruning (compress/prune.py) as properties."""
import pytest
import torch
from conftest import FLOAT_DTYPES, examples
from hypothesis import given
from hypothesis import strategies as st

from torchslim.compress import InputNorms, prune_24
from torchslim.formats import sparse24 as f

SETTINGS = examples(40)
sizes = st.one_of(st.integers(0, 40), st.sampled_from([1, 3, 4, 15, 16, 17, 31, 33, 64, 65, 129]))


def random_24(N, K, dtype, seed):
    """A 2:4 weight with every kind of group: 0, 1 or 2 non-zeros at random positions."""
    g = torch.Generator().manual_seed(seed)
    w = prune_24(torch.randn(N, K, generator=g)) * (torch.rand(N, K, generator=g) > 0.3)
    return w.to(dtype)


@given(N=sizes, K=sizes, dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31))
@SETTINGS
def test_pack_then_unpack_is_the_identity(N, K, dtype, seed):
    w = random_24(N, K, dtype, seed)
    values, meta = f.pack(w)
    assert values.dtype == dtype and meta.dtype == torch.int16
    assert (tuple(values.shape), tuple(meta.shape)) == f.shapes(N, K)
    assert f.check(values, meta, K) == []
    assert torch.equal(f.unpack(values, meta, K), w)
    # and the canonical pair is a fixed point
    v2, m2 = f.pack(f.unpack(values, meta, K))
    assert torch.equal(v2, values) and torch.equal(m2, meta)


@given(N=sizes, K=sizes, seed=st.integers(0, 2**31), wanda=st.booleans())
@SETTINGS
def test_pruning_keeps_the_two_best_of_every_group(N, K, seed, wanda):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    importance = torch.rand(K, generator=g) * 10 if wanda else None
    p = prune_24(w, importance)
    assert f.is_24(p)
    score = w.abs() * (importance if wanda else 1)
    k_pad = -(-K // 4) * 4
    groups = torch.nn.functional.pad(score, (0, k_pad - K), value=-1).reshape(N, k_pad // 4, 4)
    kept = torch.nn.functional.pad(p != 0, (0, k_pad - K)).reshape(N, k_pad // 4, 4)
    padded_w = torch.nn.functional.pad(w, (0, k_pad - K)).reshape(N, k_pad // 4, 4)
    for n in range(N):
        for grp in range(groups.shape[1]):
            real = min(4, K - 4 * grp)
            best = groups[n, grp, :real].argsort(descending=True, stable=True)[:2]
            expect = torch.zeros(4, dtype=torch.bool)
            expect[best] = True
            expect &= padded_w[n, grp] != 0
            assert torch.equal(kept[n, grp], expect), (n, grp)
    # kept weights are untouched
    assert torch.equal(p[p != 0], w[p != 0])


def test_wanda_differs_from_magnitude_where_activations_differ():
    w = torch.tensor([[1.0, 0.9, 0.8, 0.1]])
    assert torch.equal(prune_24(w) != 0, torch.tensor([[True, True, False, False]]))
    importance = torch.tensor([0.1, 0.1, 1.0, 100.0])
    assert torch.equal(prune_24(w, importance) != 0, torch.tensor([[False, False, True, True]]))


def test_input_norms_are_the_l2_norms_of_each_feature():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    xs = [torch.randn(4, 6), torch.randn(2, 3, 6)]
    with InputNorms(model) as norms:
        for x in xs:
            model(x)
    got = norms.result()
    all_x = torch.cat([x.reshape(-1, 6) for x in xs])
    assert got["0"].dtype == torch.float64  # no overflow for large activations
    torch.testing.assert_close(got["0"].float(), all_x.norm(dim=0))
    h = torch.relu(model[0](all_x))
    torch.testing.assert_close(got["2"].float(), h.norm(dim=0), rtol=1e-5, atol=1e-6)
    # hooks are gone after the with block
    assert not model[0]._forward_pre_hooks


def test_input_norms_see_keyword_inputs_and_can_skip_unreached_layers():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.a(input=x)

    net = Net()
    x = torch.randn(5, 3)
    with InputNorms(net) as norms:
        net(x)
        with pytest.raises(RuntimeError):
            net.a(torch.randn(2, 7))  # a wrong width is no calibration data
    got = norms.result(require_all=False)
    assert set(got) == {"a"}
    torch.testing.assert_close(got["a"].float(), x.norm(dim=0))


def test_input_norms_say_which_layer_saw_no_batch():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with InputNorms(model) as norms:
        pass
    with pytest.raises(RuntimeError, match="no batch reached 0"):
        norms.result()


def test_metadata_order_is_the_mma_sp_one():
    # Row 0: group 0 keeps columns 1 and 3 -> nibble 0b1101 = 0xD; group 1 keeps 0 and 2 -> 0x8;
    # groups 2, 3 hold zeros -> (0, 1) = 0x4. Word = 0x448D, nibbles little-endian.
    w = torch.zeros(1, 16)
    w[0, 1], w[0, 3], w[0, 4], w[0, 6] = 1.0, 2.0, 3.0, 4.0
    values, meta = f.pack(w)
    assert int(meta[0, 0]) & 0xFFFF == 0x448D
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]]
    assert set(f.VALID_NIBBLES) == {0x4, 0x8, 0xC, 0x9, 0xD, 0xE}


def test_pack_refuses_a_weight_that_is_not_24():
    w = torch.zeros(2, 8)
    w[1, 4:7] = 1.0
    with pytest.raises(ValueError, match=r"row 1, columns 4..7 hold 3 non-zeros"):
        f.pack(w)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        f.pack(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        f.pack(torch.zeros(8))


@pytest.mark.parametrize("nibble", [n for n in range(16) if n not in f.VALID_NIBBLES])
def test_every_invalid_nibble_is_named(nibble):
    values, meta = f.pack(torch.zeros(3, 20))
    meta[2, 1] = (0x4444 & ~(0xF << 4)) | (nibble << 4)  # row 2, group 5
    problems = f.check(values, meta, 20)
    assert len(problems) == 1 and "meta row 2, group 5 (columns 20..23)" in problems[0]
    assert f"positions ({nibble & 3}, {nibble >> 2})" in problems[0]
    with pytest.raises(ValueError, match="group 5"):
        f.unpack(values, meta, 20)


def test_check_names_shapes_and_dtypes():
    values, meta = f.pack(torch.zeros(3, 20))
    assert "values must have shape [3, 16]" in f.check(values[:, :8], meta, 20)[0]
    assert "meta must have shape [3, 2]" in f.check(values, meta[:, :1], 20)[0]
    assert "meta must be int16" in f.check(values, meta.int(), 20)[0]
    assert "values must be float32" in f.check(values.long(), meta, 20)[0]
    assert f.check(values, meta, 17) == []  # same padded width
    assert f.check(values, meta, 33) != []


def test_prune_refuses_bad_inputs():
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_24(torch.tensor([[float("nan"), 1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="importance must be a float tensor of shape"):
        prune_24(torch.randn(2, 8), torch.ones(7))
    with pytest.raises(ValueError, match="non-negative"):
        prune_24(torch.randn(2, 8), -torch.ones(8))
    with pytest.raises(ValueError, match="2-D floating point"):
        prune_24(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="importance must be a tensor of shape \\(8,\\), got list"):
        prune_24(torch.randn(2, 8), [1.0] * 8)
    with pytest.raises(ValueError, match="2-D"):
        f.is_24(torch.ones(8))
    with pytest.raises(ValueError, match="meta device"):
        f.pack(torch.zeros(2, 8, device="meta"))
