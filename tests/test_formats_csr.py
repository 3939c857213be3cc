"""The CSR format (formats/csr.py) and unstructured pruning (compress.prune_unstructured)."""
import re

import pytest
import torch
from conftest import FLOAT_DTYPES, examples
from hypothesis import given
from hypothesis import strategies as st

import torchslim
from torchslim.compress import prune_unstructured
from torchslim.formats import csr

SETTINGS = examples(40)


def random_weight(N, K, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (torch.rand(N, K, generator=g) < density)
    return w.to(dtype)


@given(N=st.integers(0, 40), K=st.sampled_from([1, 2, 3, 17, 64, 129]), density=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
       dtype=st.sampled_from(FLOAT_DTYPES), seed=st.integers(0, 2**31))
@SETTINGS
def test_round_trip_preserves_the_matrix(N, K, density, dtype, seed):
    w = random_weight(N, K, density, dtype, seed)
    crow, col, values = csr.pack(w)
    assert crow.dtype == torch.int32 and crow.shape == (N + 1,)
    assert col.dtype == torch.int16 and values.dtype == dtype
    assert values.shape == col.shape == (int((w != 0).sum()),)
    assert bool((values != 0).all())
    assert csr.check(crow, col, values, K) == []
    assert torch.equal(csr.unpack(crow, col, values, K), w)


def test_uneven_rows_round_trip():
    w = torch.zeros(6, 50)
    w[2] = torch.arange(1, 51)  # one full row among empty ones
    w[5, 49] = 3.0
    crow, col, values = csr.pack(w)
    assert crow.tolist() == [0, 0, 0, 50, 50, 50, 51]
    assert torch.equal(csr.unpack(crow, col, values, 50), w)


@pytest.mark.parametrize("K,dtype", [(1, torch.int16), (32768, torch.int16), (32769, torch.int32)])
def test_index_dtype_is_the_narrowest_that_fits(K, dtype):
    assert csr.index_dtype(K) == dtype
    w = torch.zeros(2, K)
    w[1, K - 1] = 1.0
    crow, col, values = csr.pack(w)
    assert col.dtype == dtype and col.tolist() == [K - 1]
    assert torch.equal(csr.unpack(crow, col, values, K), w)


def valid_triple():
    w = torch.zeros(5, 10)
    w[0, [1, 4]] = 1.0
    w[2, [0, 3, 9]] = 2.0
    w[3, [5]] = 3.0  # rows 1 and 4 are empty
    return csr.pack(w)


def corrupt(kind):
    crow, col, values = (t.clone() for t in valid_triple())
    if kind == "crow[0]":
        crow[0] = 1
    elif kind == "decreasing":
        crow[2] = 1
    elif kind == "end":
        crow[5] = 7
    elif kind == "col high":
        col[3] = 10
    elif kind == "col negative":
        col[0] = -1
    elif kind == "unsorted":
        col[2], col[3] = 3, 0
    elif kind == "duplicate":
        col[3] = col[2]
    elif kind == "last row unsorted":  # the last stored row (an empty one follows) holds columns 5 then 4
        crow = torch.tensor([0, 2, 2, 5, 7, 7], dtype=torch.int32)
        col = torch.cat([col, torch.tensor([4], dtype=col.dtype)])
        values = torch.cat([values, values[:1]])
    return crow, col, values


CORRUPTIONS = {
    "crow[0]": r"crow\[0\] must be 0, got 1",
    "decreasing": r"crow must never decrease: crow\[2\] = 1 < crow\[1\] = 2",
    "end": r"crow\[N\] must equal the number of stored values 6, got 7",
    "col high": r"col\[3\] = 10 \(row 2\) is outside \[0, 10\)",
    "col negative": r"col\[0\] = -1 \(row 0\) is outside \[0, 10\)",
    "unsorted": r"col must increase strictly within a row: row 2 has col\[2\] = 3 then col\[3\] = 0",
    "duplicate": r"col must increase strictly within a row: row 2 has col\[2\] = 0 then col\[3\] = 0",
    "last row unsorted": r"col must increase strictly within a row: row 3 has col\[5\] = 5 then col\[6\] = 4",
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_check_names_each_malformation(kind):
    problems = csr.check(*corrupt(kind), 10)
    assert len(problems) == 1
    assert re.search(CORRUPTIONS[kind], problems[0]), problems
    with pytest.raises(ValueError, match=CORRUPTIONS[kind]):
        csr.unpack(*corrupt(kind), 10)


def test_the_first_bad_entry_in_storage_order_is_named_as_the_op_names_it():
    crow = torch.tensor([0, 2, 4], dtype=torch.int32)
    col = torch.tensor([3, 1, 0, 10], dtype=torch.int16)  # row 0 out of order, then row 1 out of range
    assert csr.check(crow, col, torch.ones(4), 10) == [
        "col must increase strictly within a row: row 0 has col[0] = 3 then col[1] = 1"]
    with pytest.raises(RuntimeError, match=r"csr_linear: col must increase strictly within a row: row 0 has col\[0\]"):
        torchslim.ops.csr_linear(torch.ones(1, 10), crow, col, torch.ones(4))


def test_check_refuses_wrong_types_and_shapes():
    crow, col, values = valid_triple()
    assert "crow must be int32" in csr.check(crow.long(), col, values, 10)[0]
    assert "col must be int16 or int32" in csr.check(crow, col.long(), values, 10)[0]
    assert "values must be float32" in csr.check(crow, col, values.int(), 10)[0]
    assert "values must be 1-D" in csr.check(crow, col, values[None], 10)[0]
    assert "one entry per stored value" in csr.check(crow, col[:-1], values, 10)[0]
    assert "crow must have 7 entries" in csr.check(crow, col, values, 10, N=6)[0]
    assert csr.check(crow, col.int(), values, 10) == []  # int32 columns are valid (just not the narrowest)
    assert csr.check("a", col, values, 10) == ["crow, col and values must be tensors"]


def test_pack_refuses_bad_weights():
    with pytest.raises(ValueError, match="2-D"):
        csr.pack(torch.ones(3))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        csr.pack(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        csr.pack(torch.ones(2, 2, device="meta"))


@given(N=st.integers(1, 20), K=st.integers(1, 100), sparsity=st.floats(0, 0.99), seed=st.integers(0, 2**31))
@SETTINGS
def test_prune_keeps_the_largest_per_row(N, K, sparsity, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    p = prune_unstructured(w, sparsity)
    keep = K - round(sparsity * K)
    assert ((p != 0).sum(1) == keep).all()
    assert bool(((p == 0) | (p == w)).all())
    # every kept weight is at least as large as every pruned one of its row
    kept_min = torch.where(p != 0, w.abs(), torch.inf).min(1).values
    pruned_max = torch.where(p == 0, w.abs(), -torch.inf).max(1).values
    assert bool((kept_min >= pruned_max).all())


def test_prune_wanda_and_ties():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    assert prune_unstructured(w, 0.5).tolist() == [[1.0, 1.0, 0.0, 0.0], [4.0, 3.0, 0.0, 0.0]]
    importance = torch.tensor([0.0, 0.1, 10.0, 10.0])
    assert prune_unstructured(w, 0.5, importance).tolist() == [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 1.0]]
    assert torch.equal(prune_unstructured(w, 0), w)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_prune_refuses_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        prune_unstructured(torch.ones(2, 4), sparsity)


def test_prune_refuses_bad_weights_and_importance():
    with pytest.raises(ValueError, match="NaN or Inf"):
        prune_unstructured(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="importance"):
        prune_unstructured(torch.ones(2, 4), 0.5, torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        prune_unstructured(torch.ones(2, 4), 0.5, -torch.ones(4))
