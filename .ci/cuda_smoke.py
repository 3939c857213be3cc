"""Smoke test of the CUDA build of torchslim (run by `make wheel-cuda` in CI and by `make cuda-check`, from outside the source tree).

Everywhere: the module imports, reports cuda_compiled, has CUDA kernels registered for
quantize_per_token and csr_linear, and its CPU ops agree with torchslim.reference (csr_linear's
where this build has its CPU kernel).
With a GPU (torch.cuda.is_available()): the CUDA quantize_per_token is bit-exact against the
reference on odd shapes, every dtype, unaligned rows, and rows of zeros / NaN / Inf / tiny values;
the CUDA csr_linear is within its rounding bound of the reference (each kernel path, an uneven
weight whose long row is split) and survives a malformed CSR without a CUDA error.
Without one: a CUDA call must fail with a clear error (no driver), which is expected here.
"""
from __future__ import annotations

import sys

import torch

import torchslim
from torchslim import reference
from torchslim._info import format_info

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_quantize_exact(x: torch.Tensor, label: str) -> None:
    q, s = torchslim.ops.quantize_per_token(x)
    rq, rs = reference.quantize_per_token(x.cpu())
    assert q.dtype == torch.int8 and s.dtype == torch.float32, label
    assert q.shape == x.shape and s.shape == x.shape[:1], label
    assert q.device == x.device and s.device == x.device, label
    q, s = q.cpu(), s.cpu()
    bad_q = (q != rq).nonzero()
    assert bad_q.numel() == 0, f"{label}: q differs from the reference at {bad_q[:5].tolist()}"
    same_s = (s == rs) | (s.isnan() & rs.isnan())
    assert bool(same_s.all()), f"{label}: scale differs from the reference: {s[~same_s][:5]} vs {rs[~same_s][:5]}"


def special_rows(K: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    x = torch.randn(8, K, dtype=torch.float32)
    x[1] = 0                                   # zeros -> scale 0, q 0
    x[2, K // 2] = float("nan")                # NaN -> scale NaN, q 0
    x[3, 0] = float("inf")                     # +-Inf -> scale NaN, q 0
    x[4, -1] = float("-inf")
    x[5] = torch.linspace(-127, 127, K)        # ties of round-half-even: x * (127 / 127) exactly
    x[6] = 1e-3 * torch.randn(K)
    x[7] = torch.randn(K) * 1e30 if dtype == torch.float32 else torch.randn(K) * 100
    return x.to(dtype).to(device)


def check_cpu() -> None:
    torch.manual_seed(0)
    for dtype in DTYPES:
        for M, K in [(1, 1), (3, 17), (37, 129), (64, 256), (0, 8), (4, 0)]:
            check_quantize_exact(torch.randn(M, K).to(dtype), f"cpu quantize {dtype} {M}x{K}")
        check_quantize_exact(special_rows(33, dtype, "cpu"), f"cpu quantize special rows {dtype}")
    for dtype in DTYPES:
        for M, K, N in [(1, 1, 1), (5, 17, 3), (37, 129, 65), (128, 256, 96)]:
            x = torch.randn(M, K).to(dtype)
            w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
            ws = torch.rand(N) / 100 + 1e-3
            b = torch.randn(N)
            out = torchslim.ops.int8_linear(x, w, ws, b)
            ref = reference.int8_linear(x, w, ws, b)
            assert out.shape == (M, N) and out.dtype == dtype
            # One rounding to dtype of a float32 value: within a few ulps of dtype of the result.
            eps = torch.finfo(dtype).eps
            err = (out.double() - ref).abs().max().item()
            assert err <= 4 * eps * (ref.abs().max().item() + 1), f"cpu int8_linear {dtype} {M}x{K}x{N}: err {err}"
    from torchslim.compress import prune_24
    from torchslim.formats import sparse24
    for dtype in DTYPES:
        for M, N, K in [(1, 5, 7), (6, 17, 40), (70, 33, 100)]:
            values, meta = sparse24.pack(prune_24(torch.randn(N, K)).to(dtype))
            x, bias = torch.randn(M, K).to(dtype), torch.randn(N)
            out = torchslim.ops.sparse24_linear(x, values, meta, bias)
            ref = reference.sparse24_linear(x, values, meta, bias)
            err = (out.double() - ref).abs().max().item()
            assert err <= 4 * torch.finfo(dtype).eps * (ref.abs().max().item() + 1) * max(1, K // 16), \
                f"cpu sparse24_linear {dtype} {M}x{K}x{N}: err {err}"
    csr_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("torchslim::csr_linear", "CPU")
    if csr_cpu:
        for dtype in DTYPES:
            for M, N, K in [(1, 5, 7), (6, 17, 40), (70, 33, 100)]:
                check_csr_linear(M, N, K, dtype, "cpu", 0.3)
    print("CPU ops: quantize_per_token bit-exact, int8_linear and sparse24_linear match the reference"
          + (", csr_linear too" if csr_cpu else "; csr_linear has no CPU kernel in this build (not checked)"))


def check_csr_linear(M: int, N: int, K: int, dtype: torch.dtype, device: str, density: float,
                     uneven: bool = False) -> None:
    """csr_linear of a random sparse weight against the float64 reference: within n + 1 float32
    roundings of S = |x| @ |W|.T + |bias| (n the longest row's stored entries), plus one of dtype."""
    from torchslim.formats import csr

    w = torch.randn(N, K) * (torch.rand(N, K) < density)
    if uneven:  # one full row among nearly empty ones
        w = torch.randn(N, K) * (torch.rand(N, K) < 0.002)
        w[N // 2] = torch.randn(K)
    w = w.to(dtype)
    crow, col, values = csr.pack(w)
    x, bias = torch.randn(M, K).to(dtype), torch.randn(N)
    out = torchslim.ops.csr_linear(x.to(device), crow.to(device), col.to(device), values.to(device), bias.to(device))
    ref = reference.csr_linear(x, crow, col, values, bias)
    label = f"{device} csr_linear {dtype} M={M} N={N} K={K}"
    assert out.shape == (M, N) and out.dtype == dtype and out.device.type == device, label
    n = int((crow[1:] - crow[:-1]).max()) if N else 0
    mag = x.double().abs() @ w.double().abs().T + bias.to(dtype).double().abs()
    fi = torch.finfo(dtype)
    bound = fi.eps / 2 * ref.abs() + 2 * (n + 1) * 2.0**-24 * mag + fi.smallest_normal * fi.eps / 2
    err = (out.cpu().double() - ref).abs()
    assert bool((err <= bound).all()), f"{label}: error {float((err - bound).max())} beyond the bound"


def check_cuda() -> None:
    torch.manual_seed(0)
    shapes = [(1, 1), (1, 3), (3, 17), (7, 64), (5, 1000), (9, 1024), (2, 1025), (33, 4096), (3, 4100),
              (2, 8192), (1, 12288), (300, 128), (0, 16), (5, 0)]
    for dtype in DTYPES:
        for M, K in shapes:
            check_quantize_exact(torch.randn(M, K, device="cuda").to(dtype), f"cuda quantize {dtype} {M}x{K}")
        for K in (8, 33, 256, 2048, 5000):
            check_quantize_exact(special_rows(K, dtype, "cuda"), f"cuda quantize special rows {dtype} K={K}")
        # Rows that start off 16-byte alignment (a contiguous view with a storage offset).
        base = torch.randn(4 * 64 + 1, device="cuda").to(dtype)
        check_quantize_exact(base[1:].view(4, 64), f"cuda quantize unaligned {dtype}")
    # Subnormal rows (float32): 127 / absmax overflows to Inf for absmax < 127 / FLT_MAX.
    tiny = torch.tensor([[1e-40, 0.0, -1e-41, 3e-39], [1e-30, -2e-30, 0.0, 5e-31]], device="cuda")
    q, s = torchslim.ops.quantize_per_token(tiny)
    rq, rs = reference.quantize_per_token(tiny.cpu())
    print(f"tiny rows: cuda q={q.cpu().tolist()} scale={s.cpu().tolist()}; reference q={rq.tolist()}")
    # Not contiguous / wrong dtype / wrong rank: clear errors.
    for bad, what in [(torch.randn(4, 6, device="cuda").t(), "contiguous"),
                      (torch.randn(4, 6, device="cuda").double(), "float32, bfloat16 or float16"),
                      (torch.randn(4, device="cuda"), "2-D")]:
        try:
            torchslim.ops.quantize_per_token(bad)
        except (RuntimeError, ValueError) as e:
            assert what in str(e), f"unexpected message: {e}"
        else:
            raise AssertionError(f"quantize_per_token accepted a bad input ({what})")
    # The op on a non-default stream, checked after synchronizing that stream.
    stream = torch.cuda.Stream()
    x = torch.randn(64, 512, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        q, s = torchslim.ops.quantize_per_token(x)
    stream.synchronize()
    rq, rs = reference.quantize_per_token(x.cpu())
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs), "cuda quantize on a side stream"
    torch.cuda.synchronize()
    print("CUDA ops: quantize_per_token bit-exact against the reference")

    # csr_linear: the row-group kernel (M <= 8; short and long rows), the token kernel (M > 8), a
    # split long row (K > 4096), empty shapes; then a malformed CSR must not cause a CUDA error.
    for dtype in DTYPES:
        for M, N, K, density in [(1, 37, 300, 0.3), (3, 64, 2000, 0.6), (1, 5, 1, 1.0), (17, 129, 777, 0.05),
                                 (130, 40, 500, 0.5), (0, 8, 16, 0.5), (4, 0, 16, 0.5), (4, 8, 16, 0.0)]:
            check_csr_linear(M, N, K, dtype, "cuda", density)
        for M in (1, 5, 40):
            check_csr_linear(M, 64, 9000, dtype, "cuda", 0.0, uneven=True)
    x = torch.randn(5, 70, device="cuda")
    values = torch.randn(300, device="cuda")
    for crow, col in [(torch.full((34,), -7, dtype=torch.int32), torch.randint(0, 70, (300,))),
                      (torch.arange(34, dtype=torch.int32) * 1000, torch.randint(0, 70, (300,))),
                      (torch.arange(33, -1, -1, dtype=torch.int32) * 9, torch.randint(0, 70, (300,))),
                      (torch.linspace(0, 300, 34).int(), torch.randint(-100000, 100000, (300,)))]:
        for col_dtype in (torch.int16, torch.int32):
            torchslim.ops.csr_linear(x, crow.cuda(), col.to(col_dtype).cuda(), values)
    torch.cuda.synchronize()  # an illegal address would surface here
    print("CUDA ops: csr_linear within its rounding bound of the reference; a malformed CSR is memory-safe")


def main() -> int:
    info = torchslim.info()
    print(format_info(info))
    assert torchslim.__file__ and "/python/torchslim/" not in torchslim.__file__, \
        f"imported the source tree, not the installed package: {torchslim.__file__}"
    assert info["cuda_compiled"], "torchslim._C was built without CUDA (cuda_compiled is False)"
    for op in ("quantize_per_token", "csr_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchslim::{op}", "CUDA"), \
            f"no CUDA kernel registered for torchslim::{op}"
    check_cpu()
    if torch.cuda.is_available():
        check_cuda()
    else:
        try:
            torchslim.ops.quantize_per_token(torch.zeros(2, 2, device="cuda"))
        except RuntimeError as e:
            print(f"No GPU here: a CUDA call raises, as expected: {str(e).splitlines()[0]}")
        else:
            raise AssertionError("a CUDA call succeeded although torch.cuda.is_available() is False")
    print("cuda smoke test: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
