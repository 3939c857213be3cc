"""Bad inputs to the INT8 ops, generated: each call gets a valid set of arguments with one of them
spoiled (shape, dtype, device including meta, strides, malformed packed weight, non-finite values).

Every call must end in a RuntimeError that names the spoiled argument, or in a result equal to the
reference (some spoils are legal: a float64 bias, NaN in x); never in uninitialized output or a
crash. A structural spoil must be caught alike by the C++ op and by the fake (all arguments on
meta), since both check the same things in the same words.
"""
import re

import pytest
import torch
from conftest import assert_close_to_reference, examples
from hypothesis import given
from hypothesis import strategies as st

from torchslim import ops, reference

SIZES = st.one_of(st.integers(0, 24), st.sampled_from([1, 17, 65]))
# Spoils that make any argument invalid by its shape, dtype, device or layout (the fake sees them).
STRUCTURAL = ["dim", "dtype", "meta", "strides", "size"]


def spoil(draw, t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "dim":
        return draw(st.sampled_from([t.unsqueeze(0), t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1),
                                     t.reshape(-1)[0] if t.numel() else torch.zeros((), dtype=t.dtype)]))
    if how == "dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool,
                                      torch.float16, torch.bfloat16, torch.float32]))
        return t.to(dtype)
    if how == "meta":
        return t.to("meta")
    if how == "strides":  # same shape and values, not contiguous
        wide = torch.stack([t, t], dim=-1)
        return wide[..., 0]
    if how == "size":
        shape = list(t.shape) or [1]
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = max(0, shape[i] + draw(st.sampled_from([-1, 1, 3])))
        return torch.zeros(shape, dtype=t.dtype)
    if how == "nonfinite":
        t = t.clone()
        if t.numel() and t.is_floating_point():
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return t
    raise AssertionError(how)


def names(message: str, arg: str) -> bool:
    return re.search(rf"(^|[^\w]){re.escape(arg)}([^\w]|$)", message) is not None


def to_meta(args):
    # empty_strided keeps the strides (.to("meta") would make a strided tensor contiguous).
    return tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                 if isinstance(a, torch.Tensor) else a for a in args)


def check_call(op, args, spoiled: str, how: str, reference_fn, arg_names=(), fake_sees=STRUCTURAL):
    """The contract above, for one call. A wrong size may be reported by the argument it must
    agree with (w_q with N rows against w_scale of another length): any of arg_names then.
    fake_sees: the spoils the fake (all arguments on meta) must reject too."""
    allowed = arg_names if how in ("size", "other shape") else (spoiled,)
    try:
        out = op(*args)
    except RuntimeError as e:
        assert any(names(str(e), a) for a in allowed), f"{how} of {spoiled}: the error does not name it: {e}"
        if how in fake_sees and how != "meta":
            with pytest.raises(RuntimeError) as fake_error:
                op(*to_meta(args))
            assert any(names(str(fake_error.value), a) for a in allowed), f"fake: {fake_error.value}"
        return
    reference_fn(out, args)


def make_linear_args(draw, M, N, K):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = (torch.randn(M, K, generator=g) * 3).to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))
    w_q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w_scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g) if draw(st.booleans()) else None
    return x, w_q, w_scale, bias


def linear_reference(out, args):
    x, w_q, w_scale, bias = args
    if isinstance(w_q, torch.Tensor) and w_q.dim() == 1:  # the packed op
        w_q = ops.int8_unpack_weight(w_q, w_scale.shape[0], x.shape[1])
    ref = reference.int8_linear(x, w_q, w_scale, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape and out.device == x.device
    q, s = reference.quantize_per_token(x)
    mag = reference.int8_accumulate(q, w_q).abs().double() * (s.double()[:, None] * w_scale.double()[None, :])
    mag = mag + (bias.double().abs() if bias is not None else 0)
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan)
    assert_close_to_reference(torch.where(nan, 0, out), torch.where(nan, 0, ref), torch.where(nan, 0, mag))


@given(data=st.data(), M=SIZES, N=SIZES, K=SIZES, spoiled=st.sampled_from(["x", "w_q", "w_scale", "bias"]),
       how=st.sampled_from(STRUCTURAL + ["nonfinite"]))
@examples(150)
def test_int8_linear(data, M, N, K, spoiled, how):
    x, w_q, w_scale, bias = make_linear_args(data.draw, M, N, K)
    if spoiled == "bias" and bias is None:
        bias = torch.randn(N)
    args = dict(x=x, w_q=w_q, w_scale=w_scale, bias=bias)
    args[spoiled] = spoil(data.draw, args[spoiled], how)
    check_call(ops.int8_linear, tuple(args.values()), spoiled, how, linear_reference, tuple(args))


@given(data=st.data(), M=SIZES, N=SIZES, K=SIZES,
       spoiled=st.sampled_from(["x", "w_packed", "w_scale", "bias"]),
       how=st.sampled_from(STRUCTURAL + ["nonfinite", "truncated", "header", "other shape"]))
@examples(150)
def test_int8_linear_packed(data, M, N, K, spoiled, how):
    x, w_q, w_scale, bias = make_linear_args(data.draw, M, N, K)
    if spoiled == "bias" and bias is None:
        bias = torch.randn(N)
    args = dict(x=x, w_packed=ops.int8_pack_weight(w_q), w_scale=w_scale, bias=bias)
    if how in ("truncated", "header", "other shape"):
        spoiled = "w_packed"
        p = args["w_packed"]
        if how == "truncated":
            p = p[: data.draw(st.integers(0, p.numel() - 1))].clone()
        elif how == "header":
            p = p.clone()
            p[data.draw(st.integers(0, 31))] ^= data.draw(st.sampled_from([1, 16, -128]))
        else:  # packed for another N or K (often the same number of bytes)
            n2 = max(0, N + data.draw(st.sampled_from([-1, 1, 5])))
            k2 = max(0, K + data.draw(st.sampled_from([-4, -1, 1, 3])))
            p = ops.int8_pack_weight(torch.zeros(n2, k2, dtype=torch.int8)) if (n2, k2) != (N, K) else p
        args["w_packed"] = p
    else:
        args[spoiled] = spoil(data.draw, args[spoiled], how)
    # Accepted calls: the header said this N and K, and the result is the reference's. The fake
    # sees sizes, not the header: a weight packed for another shape of the same byte count (or a
    # w_scale or x of another size, when N = 0) passes it and the op raises when it runs.
    fake_sees = ["dim", "dtype", "strides", "truncated"]
    check_call(ops.int8_linear_packed, tuple(args.values()), spoiled, how, linear_reference, tuple(args), fake_sees)


@given(data=st.data(), M=SIZES, K=SIZES, how=st.sampled_from(STRUCTURAL + ["nonfinite"]))
@examples(60)
def test_quantize_per_token(data, M, K, how):
    x = spoil(data.draw, torch.randn(M, K), how)

    def exact(out, args):
        q, s = out
        q_ref, s_ref = reference.quantize_per_token(args[0])
        assert torch.equal(q, q_ref) and torch.equal(s.isnan(), s_ref.isnan())
        assert torch.equal(torch.nan_to_num(s), torch.nan_to_num(s_ref))

    if how == "meta":  # a single argument: meta in, meta out is the fake's legal answer
        q, s = ops.quantize_per_token(x)
        assert q.is_meta and q.shape == x.shape and s.shape == x.shape[:1]
        return
    check_call(ops.quantize_per_token, (x,), "x", how, exact)


@given(data=st.data(), N=SIZES, K=SIZES, how=st.sampled_from(STRUCTURAL))
@examples(60)
def test_int8_pack_weight(data, N, K, how):
    w = spoil(data.draw, torch.randint(-127, 128, (N, K), dtype=torch.int8), how)

    def round_trip(out, args):
        assert torch.equal(ops.int8_unpack_weight(out, *args[0].shape), args[0])

    if how == "meta":
        assert ops.int8_pack_weight(w).is_meta
        return
    check_call(ops.int8_pack_weight, (w,), "w_q", how, round_trip)


@given(data=st.data(), N=SIZES, K=SIZES, dn=st.sampled_from([0, 0, -1, 1, -100]), dk=st.sampled_from([0, 0, -1, 1, -100]),
       how=st.sampled_from(STRUCTURAL + ["none"]))
@examples(60)
def test_int8_unpack_weight(data, N, K, dn, dk, how):
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    packed = ops.int8_pack_weight(w)
    if how != "none":
        packed = spoil(data.draw, packed, how)
    try:
        out = ops.int8_unpack_weight(packed, N + dn, K + dk)
    except RuntimeError as e:
        assert names(str(e), "w_packed") or names(str(e), "N") or names(str(e), "K"), str(e)
        return
    if packed.is_meta:
        assert out.shape == (N + dn, K + dk)
        return
    assert (dn, dk) == (0, 0) and torch.equal(out, w)
