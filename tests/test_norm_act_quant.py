"""RMSNorm + per-token activation fake quantisation in one kernel (``ops/norm_act_quant.py``):
kernel vs reference, gradients, torch.library (the kernel's AOT compile: tests/test_act_quant.py)."""

import pytest
import torch

from lrqat_kernels import reference as R
from lrqat_kernels.ops._launch import interpreting
from lrqat_kernels.ops import norm_act_quant as N

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = torch.cuda.is_available() or interpreting()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs CUDA or TRITON_INTERPRET=1")
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32)]


def _case(n, dtype, wdtype, rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 3
    x[1] = 2.5  # constant row
    x[2] = 0.0  # zero row: rstd = 1/sqrt(eps), output 0
    x[3, 0] = 40.0  # outlier
    w = torch.rand(n, generator=g) + 0.5
    w[0] = -1.0  # a negative norm weight flips the sign of a column
    return x.to(dtype).to(DEVICE), w.to(wdtype).to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 130, 4096, 8193, 20000], ids=lambda n: f"hidden{n}")  # 20000: two-pass
@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (4, True)])
def test_kernel_quantises_its_norm_exactly_and_norm_matches_torch(n, dtype, wdtype, bits, symmetric):
    x, w = _case(n, dtype, wdtype)
    y = N.rms_norm_act_quant_forward(x, w, 1e-6, bits, symmetric)
    norm = N.rms_norm_act_quant_forward(x, w, 1e-6, None)
    ref_norm = R.rms_norm(x, w, 1e-6)
    assert y.dtype == norm.dtype == ref_norm.dtype == torch.promote_types(dtype, wdtype)
    assert y.shape == x.shape
    # 1. the quantiser is exactly the reference's, applied to the kernel's own norm output
    assert torch.equal(y, R.fake_quant_activation(norm, bits, symmetric))
    # 2. the norm is torch's up to the order of the sum of squares (last bits of rstd)
    # (16-bit: at most one ulp where h's rounding flips; a bf16 ulp is 2^-7 relative at most)
    torch.testing.assert_close(norm, ref_norm, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=0)
    if dtype != torch.float32:
        # after rounding h to 16 bits an ulp of rstd rarely shows
        assert (norm != ref_norm).float().mean() < 0.01
    # 3. the whole op against the reference op: equal but for rounding-boundary flips of one step
    want = R.rms_norm_fake_quant(x, w, 1e-6, bits, symmetric)
    s, _ = R.act_quant_params(want, bits, symmetric)
    diff = (y.float() - want.float()).abs()
    assert (diff <= s * 1.001 + 1e-6).all()
    assert (diff > s * 1e-3).float().mean() < 0.02


@needs_kernels
def test_nan_inf_and_strided_input():
    x, w = _case(64, torch.float32, torch.float32)
    x[4, 3] = float("nan")
    x[5, 2] = float("inf")
    y = N.rms_norm_act_quant_forward(x, w, 1e-6, 8, False)
    want = R.rms_norm_fake_quant(x, w, 1e-6, 8, False)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(y[:4], R.fake_quant_activation(N.rms_norm_act_quant_forward(x[:4], w, 1e-6, None), 8))
    big = torch.randn(3, 5, 128, device=DEVICE)
    xs = big[:, :, ::2]  # last dim strided: copied, result the same
    torch.testing.assert_close(N.rms_norm_act_quant_forward(xs, w, 1e-5, 8), N.rms_norm_act_quant_forward(xs.contiguous(), w, 1e-5, 8))
    assert N.rms_norm_act_quant_forward(torch.empty(0, 64, device=DEVICE), w, 1e-6, 8).shape == (0, 64)


def test_backward_formula_matches_autograd_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 33, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(4, 3, 33, dtype=torch.float64, generator=g)
    dx_ref, dw_ref = torch.autograd.grad(R.rms_norm(x, w, 1e-5), (x, w), up)
    dx, dw = R.rms_norm_backward(x.detach(), w.detach(), 1e-5, up)
    # rms_norm computes in fp32 (as transformers' RMSNorm), whatever x's dtype
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-6)
    assert R.rms_norm_backward(x.detach(), w.detach(), 1e-5, up, need_weight_grad=False)[1] is None


@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_op_gradients_are_rmsnorms(dtype, wdtype):
    """Straight-through: the op's gradients are RMSNorm's, as autograd computes them on the reference."""
    x, w = _case(96, dtype, wdtype, rows=5, seed=2)
    up = torch.randn(5, 96, generator=torch.Generator().manual_seed(3)).to(DEVICE).to(torch.promote_types(dtype, wdtype))
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    N.rms_norm_fake_quant(xa, wa, 1e-6, 8).backward(up)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    R.rms_norm(xr, wr, 1e-6).backward(up)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xa.grad, xr.grad, **tol)
    torch.testing.assert_close(wa.grad, wr.grad, **tol)
    assert xa.grad.dtype == dtype and wa.grad.dtype == wdtype


def test_eager_cpu_path_is_norm_then_quantiser_bit_for_bit(set_kernel_options):
    set_kernel_options(kernels=False)
    x, w = _case(48, torch.bfloat16, torch.bfloat16)
    x, w = x.cpu(), w.cpu()
    assert torch.equal(N.rms_norm_fake_quant(x, w, 1e-6, 4, True), R.fake_quant_activation(R.rms_norm(x, w, 1e-6), 4, True))


def test_opcheck_and_compile():
    x, w = _case(40, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.lrqat.rms_norm_fake_quant.default, (x, w, 1e-6, 8, False))
    xt = torch.randn(3, 40, 5, device=DEVICE).transpose(1, 2)  # non-contiguous: the result is contiguous
    torch.library.opcheck(torch.ops.lrqat.rms_norm_fake_quant.default, (xt, w, 1e-6, 4, True))
    fn = torch.compile(lambda a, b: N.rms_norm_fake_quant(a, b, 1e-6, 8) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, w), N.rms_norm_fake_quant(x, w, 1e-6, 8) * 2)


def test_bad_input():
    x, w = _case(16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \[hidden\] = \[16\]"):
        N.rms_norm_fake_quant(x, w[:8])
    with pytest.raises(ValueError, match="bits must be one of"):
        N.rms_norm_fake_quant(x, w, bits=3)
    with pytest.raises(ValueError, match="eps must be a float >= 0"):
        N.rms_norm_fake_quant(x, w, eps=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        N.rms_norm_fake_quant(x.int(), w)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        N.rms_norm_fake_quant(x, w, symmetric=1)
