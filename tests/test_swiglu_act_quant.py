"""SwiGLU + per-token activation fake quantisation in one kernel (``ops/swiglu_act_quant.py``):
kernel vs reference, gradients, torch.library (the kernel's AOT compile: tests/test_act_quant.py)."""

import pytest
import torch

from lrqat_kernels import reference as R
from lrqat_kernels.ops._launch import interpreting
from lrqat_kernels.ops import swiglu_act_quant as S

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = torch.cuda.is_available() or interpreting()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="needs CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(n, dtype, rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(rows, n, generator=g) * 3
    up = torch.randn(rows, n, generator=g)
    gate[1], up[1] = 2.0, 1.5  # constant row
    up[2] = 0.0  # zero row
    gate[3, 0], up[3, 0] = 30.0, 4.0  # outlier
    gate[4] = -20.0  # silu ~ 0 everywhere: a row of tiny values
    return gate.to(dtype).to(DEVICE), up.to(dtype).to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("n", [1, 7, 130, 11008, 16385], ids=lambda n: f"inter{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (4, True)])
def test_kernel_quantises_its_product_exactly_and_product_matches_torch(n, dtype, bits, symmetric):
    gate, up = _case(n, dtype)
    y = S.swiglu_act_quant_forward(gate, up, bits, symmetric)
    prod = S.swiglu_act_quant_forward(gate, up, None)
    ref = R.swiglu(gate, up)
    assert y.dtype == prod.dtype == dtype and y.shape == gate.shape
    # 1. the quantiser is exactly the reference's, applied to the kernel's own product
    assert torch.equal(y, R.fake_quant_activation(prod, bits, symmetric))
    # 2. the product is torch's up to exp's last bits (fp32: a few ulp; 16-bit: rare one-ulp flips)
    torch.testing.assert_close(prod, ref, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-30)
    if dtype != torch.float32:
        assert (prod != ref).float().mean() < 0.01
    # 3. the whole op against the reference op: equal but for rounding-boundary flips of one step
    want = R.swiglu_fake_quant(gate, up, bits, symmetric)
    s, _ = R.act_quant_params(want, bits, symmetric)
    diff = (y.float() - want.float()).abs()
    assert (diff <= s * 1.001 + 1e-6).all()
    assert (diff > s * 1e-3).float().mean() < 0.02


@needs_kernels
def test_nan_and_strided_input():
    gate, up = _case(64, torch.float32)
    gate[5, 3] = float("nan")
    y = S.swiglu_act_quant_forward(gate, up, 8, False)
    assert torch.isnan(y[5]).all() and not torch.isnan(y[:5]).any()
    big = torch.randn(2, 3, 128, device=DEVICE)
    gs, us = big[..., ::2], big[..., 1::2]
    assert torch.equal(S.swiglu_act_quant_forward(gs, us, 4), S.swiglu_act_quant_forward(gs.contiguous(), us.contiguous(), 4))
    assert S.swiglu_act_quant_forward(torch.empty(0, 64, device=DEVICE), torch.empty(0, 64, device=DEVICE), 8).shape == (0, 64)


def test_backward_formula_matches_autograd():
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(4, 3, 33, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(4, 3, 33, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(4, 3, 33, dtype=torch.float64, generator=g)
    dg_ref, du_ref = torch.autograd.grad(R.swiglu(gate, up), (gate, up), grad)
    dg, du = R.swiglu_backward(gate.detach(), up.detach(), grad)
    # the formula runs in fp32 inside (as the kernels' 16-bit paths)
    torch.testing.assert_close(dg, dg_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, du_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_gradients_are_swiglus(dtype):
    gate, up = _case(96, dtype, rows=5, seed=2)
    grad = torch.randn(5, 96, generator=torch.Generator().manual_seed(3)).to(DEVICE).to(dtype)
    ga, ua = gate.clone().requires_grad_(), up.clone().requires_grad_()
    S.swiglu_fake_quant(ga, ua, 8).backward(grad)
    gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
    R.swiglu(gr, ur).backward(grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ga.grad, gr.grad, **tol)
    torch.testing.assert_close(ua.grad, ur.grad, **tol)


def test_eager_cpu_path_is_product_then_quantiser_bit_for_bit(set_kernel_options):
    set_kernel_options(kernels=False)
    gate, up = (t.cpu() for t in _case(48, torch.bfloat16))
    assert torch.equal(S.swiglu_fake_quant(gate, up, 4, True), R.fake_quant_activation(R.swiglu(gate, up), 4, True))


def test_opcheck_and_compile():
    gate, up = _case(40, torch.float32)
    torch.library.opcheck(torch.ops.lrqat.swiglu_fake_quant.default, (gate, up, 8, False))
    gt, ut = (torch.randn(3, 40, 5, device=DEVICE).transpose(1, 2) for _ in range(2))  # non-contiguous
    torch.library.opcheck(torch.ops.lrqat.swiglu_fake_quant.default, (gt, ut, 4, True))
    fn = torch.compile(lambda a, b: S.swiglu_fake_quant(a, b, 8) + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(gate, up), S.swiglu_fake_quant(gate, up, 8) + 1)


def test_bad_input():
    gate, up = _case(16, torch.float32)
    with pytest.raises(ValueError, match="one non-empty shape"):
        S.swiglu_fake_quant(gate, up[:, :8])
    with pytest.raises(TypeError, match="one dtype"):
        S.swiglu_fake_quant(gate, up.half())
    with pytest.raises(ValueError, match="bits must be one of"):
        S.swiglu_fake_quant(gate, up, bits=2)
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        S.swiglu_fake_quant(gate, [1.0])


def test_reference_backward_d_up_is_autograds():
    """d_up = grad * silu(gate) with the forward's own silu: bit-equal to autograd in fp16 (a
    recomputed gate * sigmoid(gate) was 1 ulp off in some elements)."""
    torch.manual_seed(0)
    gate = (torch.randn(4, 4096) * 3).half().requires_grad_()
    up = torch.randn(4, 4096).half().requires_grad_()
    g = torch.randn(4, 4096).half()
    (torch.nn.functional.silu(gate) * up).backward(g)
    _, d_up = R.swiglu_backward(gate.detach(), up.detach(), g)
    assert torch.equal(d_up, up.grad)
