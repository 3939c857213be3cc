"""Low-rank compression (compress/lowrank.py): the rank rules, truncated and whitened SVD, and the
InputCovariance calibration hooks."""
import math
from fractions import Fraction

import pytest
import torch
from conftest import FLOAT_DTYPES, examples
from hypothesis import assume, given
from hypothesis import strategies as st

from torchslim.compress import InputCovariance, choose_rank, max_useful_rank, svd_factors

SETTINGS = examples(30)
dims = st.one_of(st.integers(1, 24), st.sampled_from([1, 2, 3, 17]))


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def frob(t):
    return float(t.double().norm())


# ---------------------------------------------------------------- the rank rules

@pytest.mark.parametrize("N,K,limit", [(1, 5, 0), (7, 1, 0), (2, 2, 0), (3, 3, 1), (4, 4, 1), (5, 5, 2), (100, 100, 49),
                                       (2, 1000, 1), (4096, 4096, 2047), (4096, 11008, 2985), (0, 5, 0), (5, 0, 0),
                                       (0, 0, 0)])
def test_max_useful_rank_table(N, K, limit):
    assert max_useful_rank(N, K) == limit


@given(N=st.integers(1, 5000), K=st.integers(1, 5000))
@SETTINGS
def test_max_useful_rank_is_the_last_rank_that_saves_parameters(N, K):
    r = max_useful_rank(N, K)
    assert r * (N + K) < N * K <= (r + 1) * (N + K)
    assert r < min(N, K)


def test_choose_rank_by_rank_and_by_param_ratio():
    assert choose_rank(100, 100, rank=49) == 49
    assert choose_rank(100, 100, rank=1) == 1
    assert choose_rank(100, 100, param_ratio=0.5) == 25  # 25 * 200 = half of 100 * 100
    assert choose_rank(100, 100, param_ratio=0.001) == 1  # at least 1
    assert choose_rank(100, 100, param_ratio=0.9999999999999999) == 49  # never rounds up to the useless 50
    assert choose_rank(4096, 11008, param_ratio=0.25) == 746  # floor(0.25 * 2985.2)
    assert choose_rank(14, 35, param_ratio=0.7) == 7  # 0.7 * 10 is 7, though 6.999999999999999 in floats
    assert choose_rank(4, 4, rank=4, allow_full=True) == 4


@given(N=st.integers(2, 3000), K=st.integers(2, 3000), ratio=st.floats(0.001, 0.999))
@SETTINGS
def test_param_ratio_keeps_at_most_that_fraction(N, K, ratio):
    assume(max_useful_rank(N, K) >= 1)
    r = choose_rank(N, K, param_ratio=ratio)
    assert 1 <= r <= max_useful_rank(N, K)
    kept = Fraction(repr(ratio)) * N * K  # the parameters the decimal ratio allows, exactly
    assert r == 1 or r * (N + K) <= kept < (r + 1) * (N + K)


def test_choose_rank_by_energy():
    # squared singular values 4, 2, 1, 1, then zeros: total 8
    s = torch.tensor([2.0, math.sqrt(2.0), 1.0, 1.0] + [0.0] * 96, dtype=torch.float64)
    by_energy = {0.1: 1, 0.5: 1, 0.75: 2, 0.76: 3, 0.875: 3, 0.9: 4, 1.0: 4}
    for energy, r in by_energy.items():
        assert choose_rank(100, 100, energy=energy, singular_values=s) == r, energy
    assert choose_rank(100, 100, energy=1, singular_values=torch.zeros(100)) == 1  # an all-zero weight
    assert choose_rank(3, 5, energy=1.0, singular_values=torch.ones(3), allow_full=True) == 3


@pytest.mark.parametrize("N,K,kwargs,match", [
    (100, 100, {}, "exactly one of rank, param_ratio or energy, got none"),
    (100, 100, dict(rank=3, param_ratio=0.5), "exactly one of .* got rank and param_ratio"),
    (100, 100, dict(rank=3, energy=0.5), "exactly one"),
    (100, 100, dict(rank=50), r"rank 50, but low rank saves nothing for a 100x100 weight at rank >= N\*K/\(N\+K\) \(50\*200 >= 10000\); "
     "the largest useful rank is 49"),
    (100, 100, dict(rank=100), "saves nothing"),
    (8, 100, dict(rank=9), r"rank 9 exceeds min\(N, K\) = 8"),
    (8, 100, dict(rank=9, allow_full=True), r"exceeds min\(N, K\)"),
    (100, 100, dict(rank=0), "rank must be an int >= 1, got 0"),
    (100, 100, dict(rank=-3), "rank must be an int >= 1"),
    (100, 100, dict(rank=True), "rank must be an int >= 1, got True"),
    (100, 100, dict(rank=2.0), "rank must be an int"),
    (100, 100, dict(param_ratio=1.0), r"param_ratio must be a number in \(0, 1\), got 1.0"),
    (100, 100, dict(param_ratio=0), r"param_ratio must be a number in \(0, 1\)"),
    (100, 100, dict(param_ratio=-0.5), "param_ratio"),
    (100, 100, dict(param_ratio=float("nan")), "param_ratio"),
    (100, 100, dict(param_ratio=True), "param_ratio"),
    (1, 100, dict(param_ratio=0.5), "param_ratio 0.5 gives rank 1, but low rank saves nothing .* largest useful rank is 0"),
    (2, 2, dict(rank=1), "saves nothing for a 2x2 weight"),
    (100, 100, dict(energy=0.0, singular_values=torch.ones(100)), r"energy must be a number in \(0, 1\]"),
    (100, 100, dict(energy=1.01, singular_values=torch.ones(100)), "energy must be"),
    (100, 100, dict(energy=0.5), "energy needs singular_values"),
    (100, 100, dict(energy=0.5, singular_values=torch.ones(99)), r"singular_values must be a float tensor of shape \(100,\)"),
    (100, 100, dict(energy=0.5, singular_values=torch.arange(100.0)), "descending"),
    (100, 100, dict(energy=0.5, singular_values=torch.full((100,), float("nan"))), "finite"),
    (100, 100, dict(energy=0.99, singular_values=torch.ones(100)),
     "retaining energy 0.99 needs rank 99, but low rank saves nothing .* largest useful rank is 49"),
    (0, 5, dict(rank=1), "a 0x5 weight is empty"),
    (-1, 5, dict(rank=1), "N must be an int >= 0, got -1"),
    (5, 2.0, dict(rank=1), "K must be an int >= 0, got 2.0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_choose_rank_refusals(N, K, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        choose_rank(N, K, caller="my_caller", **kwargs)
    assert str(info.value).startswith("my_caller: ")


# ---------------------------------------------------------------- truncated SVD

@given(N=dims, K=dims, whitened=st.booleans(), seed=st.integers(0, 2**31))
@SETTINGS
def test_full_rank_reconstructs_w(N, K, whitened, seed):
    w = randn(N, K, seed=seed)
    cov = None
    if whitened:  # any whitening cancels at full rank: W S S^-1 = W
        x = randn(2 * K + 1, K, seed=seed + 1)
        cov = x.T @ x / x.shape[0]
    U, V = svd_factors(w, rank=min(N, K), covariance=cov, allow_full=True)
    assert U.shape == (N, min(N, K)) and V.shape == (min(N, K), K)
    assert frob(U @ V - w) <= 1e-12 * frob(w)


@given(N=dims, K=dims, seed=st.integers(0, 2**31), data=st.data())
@SETTINGS
def test_truncated_svd_is_the_best_rank_r_approximation(N, K, seed, data):
    assume(max_useful_rank(N, K) >= 1)
    r = data.draw(st.integers(1, max_useful_rank(N, K)), label="rank")
    w = randn(N, K, seed=seed)
    U, V = svd_factors(w, rank=r)
    s = torch.linalg.svdvals(w)
    # Eckart-Young: the error of the best rank-r matrix is the energy of the dropped singular values
    assert math.isclose(frob(w - U @ V) ** 2, float(s[r:].square().sum()), rel_tol=1e-9, abs_tol=1e-12 * frob(w) ** 2)
    # the singular values are split evenly: U^T U = V V^T = diag(s_r)
    torch.testing.assert_close(U.T @ U, torch.diag(s[:r]), rtol=0, atol=1e-12 * float(s[0]))
    torch.testing.assert_close(V @ V.T, torch.diag(s[:r]), rtol=0, atol=1e-12 * float(s[0]))


@pytest.mark.parametrize("dtype", [torch.float64, *FLOAT_DTYPES], ids=str)
@pytest.mark.parametrize("whitened", [False, True])
def test_factors_follow_ws_dtype_and_are_the_float64_ones_rounded_once(dtype, whitened):
    w = randn(24, 40, seed=0, dtype=dtype)
    cov = None
    if whitened:
        x = randn(30, 40, seed=1) * torch.logspace(-2, 2, 40, dtype=torch.float64)
        cov = x.T @ x / 30
    U, V = svd_factors(w, rank=5, covariance=cov)
    assert U.dtype == V.dtype == dtype and U.device == V.device == w.device
    assert U.shape == (24, 5) and V.shape == (5, 40)
    U64, V64 = svd_factors(w.double(), rank=5, covariance=cov)  # w in dtype is exact in float64
    assert torch.equal(U, U64.to(dtype)) and torch.equal(V, V64.to(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("whitened", [False, True])
def test_factors_stay_on_the_gpu(whitened):
    w = randn(24, 40, seed=0).cuda().bfloat16()
    cov = torch.eye(40, device="cuda") if whitened else None
    U, V = svd_factors(w, rank=5, covariance=cov)
    assert U.is_cuda and V.is_cuda and U.dtype == V.dtype == torch.bfloat16
    U_cpu, V_cpu = svd_factors(w.cpu(), rank=5, covariance=None if cov is None else cov.cpu())
    assert frob(U.cpu().double() @ V.cpu().double() - U_cpu.double() @ V_cpu.double()) <= 0.02 * frob(w)


def test_energy_picks_the_rank_and_factors_that_rank():
    w = randn(30, 50, seed=2)
    s = torch.linalg.svdvals(w)
    for energy in (0.2, 0.5, 0.8):
        r = choose_rank(30, 50, energy=energy, singular_values=s)
        U, V = svd_factors(w, energy=energy)
        assert U.shape == (30, r) and V.shape == (r, 50)


@pytest.mark.parametrize("w,kwargs,match", [
    (torch.randn(8), dict(rank=1), "w must be a 2-D floating point tensor, got torch.float32 of shape \\(8,\\)"),
    (torch.ones(4, 8, dtype=torch.int32), dict(rank=1), "w must be a 2-D floating point tensor"),
    ([[1.0, 2.0]], dict(rank=1), "w must be a 2-D floating point tensor, got list"),
    (torch.full((4, 8), float("nan")), dict(rank=1), "w holds NaN or Inf"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), dict(rank=1, allow_full=True), "w holds NaN or Inf"),
    (torch.zeros(0, 8), dict(energy=0.5), "a 0x8 weight is empty"),
    (torch.zeros(4, 8, device="meta"), dict(rank=1), "meta device"),
    (torch.randn(6, 8), dict(rank=4), "rank 4, but low rank saves nothing"),
    (torch.randn(6, 8), dict(rank=2, param_ratio=0.5), "exactly one"),
    (torch.randn(6, 8), dict(rank=2, energy=0.5), "exactly one"),
    (torch.randn(6, 8), dict(rank=2, damping=0), "damping must be a finite number > 0"),
    (torch.randn(6, 8), dict(rank=2, damping=float("inf")), "damping"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_svd_factors_refusals(w, kwargs, match):
    with pytest.raises(ValueError, match="^svd_factors: .*" + match):
        svd_factors(w, **kwargs)


# ---------------------------------------------------------------- whitened SVD

def output_error(x, w, U, V):
    return frob(x @ (w - U.double() @ V.double()).T)


@given(N=st.integers(2, 16), K=st.integers(2, 16), tokens=st.integers(1, 40), seed=st.integers(0, 2**31),
       data=st.data())
@SETTINGS
def test_whitened_svd_changes_the_outputs_no_more_than_plain_svd(N, K, tokens, seed, data):
    assume(max_useful_rank(N, K) >= 1)
    r = data.draw(st.integers(1, max_useful_rank(N, K)), label="rank")
    w = randn(N, K, seed=seed)
    # features of very unequal size, as in a Transformer's activations (log-uniform over 6 decades)
    scale = 10.0 ** (6 * torch.rand(K, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) - 3)
    x = randn(tokens, K, seed=seed + 2) * scale
    Uw, Vw = svd_factors(w, rank=r, covariance=x.T @ x / tokens)
    Up, Vp = svd_factors(w, rank=r)
    assert output_error(x, w, Uw, Vw) <= output_error(x, w, Up, Vp) + 1e-9 * frob(x @ w.T)


def test_whitened_svd_protects_the_features_that_carry_the_signal():
    w = randn(16, 32, seed=3)
    x = randn(200, 32, seed=4)
    x[:, :4] *= 100  # four loud features
    Uw, Vw = svd_factors(w, rank=4, covariance=x.T @ x / 200)
    Up, Vp = svd_factors(w, rank=4)
    assert output_error(x, w, Uw, Vw) < 0.2 * output_error(x, w, Up, Vp)
    # the plain SVD stays the better approximation of w itself
    assert frob(w - Up @ Vp) < frob(w - Uw @ Vw)


def test_whitened_energy_is_measured_on_the_whitened_singular_values():
    w = randn(20, 30, seed=5)
    x = randn(100, 30, seed=6)
    x[:, :3] *= 30  # three loud features hold most of the output energy
    cov = x.T @ x / 100
    chol = torch.linalg.cholesky(cov + 1e-6 * cov.diagonal().mean() * torch.eye(30, dtype=torch.float64))
    r = choose_rank(20, 30, energy=0.9, singular_values=torch.linalg.svdvals(w @ chol))
    assert r < choose_rank(20, 30, energy=0.9, singular_values=torch.linalg.svdvals(w), allow_full=True)
    assert svd_factors(w, energy=0.9, covariance=cov)[0].shape == (20, r)


@pytest.mark.parametrize("case", ["fewer tokens than K", "zero feature", "all zero"])
def test_singular_covariance_still_factors(case):
    w = randn(12, 24, seed=7)
    x = randn(5 if case == "fewer tokens than K" else 50, 24, seed=8)
    if case == "zero feature":
        x[:, 3] = 0
    if case == "all zero":
        x.zero_()
    cov = x.T @ x / x.shape[0]
    assert torch.linalg.matrix_rank(cov) < 24
    U, V = svd_factors(w, rank=3, covariance=cov)
    assert bool(U.isfinite().all()) and bool(V.isfinite().all())
    Up, Vp = svd_factors(w, rank=3)
    if case == "all zero":  # no signal: the damping whitens by a multiple of I, which is plain SVD
        torch.testing.assert_close(U @ V, Up @ Vp, rtol=0, atol=1e-12 * frob(w))
    else:
        assert output_error(x, w, U, V) <= output_error(x, w, Up, Vp) + 1e-9 * frob(x @ w.T)


def test_an_indefinite_covariance_is_refused_after_the_damping_retries():
    cov = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues 3 and -1
    with pytest.raises(ValueError, match=r"covariance \+ 0.001 \* mean\(diag\) \* I is still not positive definite"):
        svd_factors(torch.randn(2, 2), rank=1, covariance=cov, allow_full=True)
    # a damping large enough to outweigh the negative eigenvalue is accepted
    U, V = svd_factors(torch.randn(2, 2), rank=1, covariance=cov, allow_full=True, damping=2.0)
    assert U.shape == (2, 1) and V.shape == (1, 2)


@pytest.mark.parametrize("cov,match", [
    (torch.full((8, 8), float("nan")), "covariance holds NaN or Inf"),
    (torch.eye(8) * float("inf"), "covariance holds NaN or Inf"),
    (torch.eye(7), r"covariance must be a \(8, 8\) floating point tensor, got torch.float32 of shape \(7, 7\)"),
    (torch.eye(8)[None], r"covariance must be a \(8, 8\)"),
    (torch.eye(8, dtype=torch.int64), r"covariance must be a \(8, 8\) floating point tensor"),
    ("identity", r"covariance must be a \(8, 8\) floating point tensor, got str"),
    (-torch.eye(8), "negative diagonal"),
    (torch.eye(8, device="meta"), "meta device"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_covariance_is_refused(cov, match):
    with pytest.raises(ValueError, match="^svd_factors: .*" + match):
        svd_factors(torch.randn(6, 8), rank=2, covariance=cov)


# ---------------------------------------------------------------- InputCovariance

def test_input_covariance_is_x_transpose_x_over_the_tokens():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.Linear(4, 3))
    xs = [torch.randn(5, 4), torch.randn(2, 3, 4)]
    with InputCovariance(model) as cov:
        for x in xs:
            model(x)
        with pytest.raises(RuntimeError):
            shared(torch.randn(2, 7))  # a wrong width is no calibration data
        shared(torch.zeros(0, 4))  # no tokens: nothing to count
    got = cov.result()
    assert set(got) == {"0", "3"}  # the shared layer under its first name
    x0 = torch.cat([x.reshape(-1, 4) for x in xs]).double()
    with torch.no_grad():
        h = torch.relu(shared(x0.float())).double()  # what the shared layer sees at its second site
        x3 = shared(h.float()).double()
    both = torch.cat([x0, h])
    assert got["0"].dtype == torch.float64 and got["0"].shape == (4, 4)
    # (the float32 activations recomputed in one batch may differ from the model's in the last bit)
    torch.testing.assert_close(got["0"], both.T @ both / both.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["3"], x3.T @ x3 / x3.shape[0], rtol=1e-5, atol=1e-6)
    assert not shared._forward_pre_hooks  # the hooks are gone after the with block


def test_input_covariance_sees_keyword_inputs_filters_and_names_missing_layers():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.skipped = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.skipped(self.a(input=x) @ torch.ones(2, 3))

    net = Net()
    x = torch.randn(6, 3)
    with InputCovariance(net, filter_fn=lambda m, fqn: fqn != "skipped") as cov:
        net(x)
        net.unused(torch.zeros(0, 2))  # only empty batches: still unreached
    with pytest.raises(RuntimeError, match="^InputCovariance: no batch reached unused; run the model inside"):
        cov.result()
    got = cov.result(require_all=False)
    assert set(got) == {"a"}
    torch.testing.assert_close(got["a"], x.double().T @ x.double() / 6)


def test_input_covariance_feeds_whitened_svd():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(64, 32) * torch.logspace(-2, 1, 32)
    with InputCovariance(lin) as cov:
        lin(x)
    U, V = svd_factors(lin.weight, rank=4, covariance=cov.result()[""])
    Up, Vp = svd_factors(lin.weight, rank=4)
    w = lin.weight.detach().double()
    assert U.dtype == torch.float32 and output_error(x.double(), w, U, V) < output_error(x.double(), w, Up, Vp)
