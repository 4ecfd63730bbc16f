"""``lrqat_kernels.lrqat_linear`` (LRQATLinearFunction, default and fused dequant-GEMM paths)
against the eager reference: output and every gradient (x, lora_A, lora_B, scale, bias), the
bytes autograd saves, ``torch.compile(fullgraph=True)``.

Gradient rule (as in test_fake_quant.py): the kernel's error against an fp64 reference is at
most twice the eager reference's error in the same dtype, plus a tiny atol.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lrqat_kernels as lk
from lrqat_kernels import functions, reference
from lrqat_kernels.formats import encode_phi, qrange
from lrqat_kernels.ops._launch import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = torch.cuda.is_available() or interpreting()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
ALPHA = 1.5


def make_layer(out, inn, rank, bits, phi_format, group_size, dtype, *, zero_point=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(bits)
    phi = encode_phi(torch.rand(out, inn, generator=gen) * (qmax - qmin + 3) + (qmin - 1.5), bits, phi_format)
    A = torch.randn(rank, inn, generator=gen).to(dtype)
    B = torch.randn(out, rank, generator=gen).to(dtype)
    n_groups = 1 if group_size is None else inn // group_size
    s = torch.rand(out, n_groups, generator=gen) * 0.02 + 0.01
    zp = torch.randint(qmin // 2, qmax // 2 + 1, (out, n_groups), generator=gen).float() if zero_point else None
    bias = torch.randn(out, generator=gen).to(dtype)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(phi), to(A), to(B), to(s), to(zp), to(bias)


def run(fn, x, phi, A, B, s, bias, kw, out_dtype=None, cast=None):
    """``(y, grads of x, A, B, s, bias)`` of ``sum(y * w)`` with fixed random weights ``w``;
    ``cast`` converts every float leaf first (fp64 for the truth)."""

    def leaf(t):
        if t is None:
            return None
        t = t.detach().clone()
        return (t if cast is None else t.to(cast)).requires_grad_(True)

    leaves = [leaf(t) for t in (x, A, B, s, bias)]
    y = fn(leaves[0], phi, leaves[1], leaves[2], leaves[3], leaves[4], out_dtype=out_dtype, **kw)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (y.double() * w.double()).sum().backward()
    return y, [None if t is None else t.grad for t in leaves]


def assert_close_2x(name, kern, eager, truth, atol_rel=2.0**-20):
    t = truth.double().cpu()
    e_k = (kern.double().cpu() - t).abs().max().item()
    e_e = (eager.double().cpu() - t).abs().max().item()
    atol = atol_rel * t.abs().max().item()
    assert e_k <= 2 * e_e + atol, f"{name}: kernel error {e_k:.3g} > 2 x eager error {e_e:.3g} + {atol:.3g}"


CASES = [
    # (phi_format, bits, group_size, dtype, x shape, bias, zero point)
    ("packed_int", 4, 32, torch.bfloat16, (2, 3), True, False),
    ("packed_int", 2, None, torch.float32, (5,), False, True),
    ("fixed_point", 4, 128, torch.float16, (17,), True, True),
    ("fixed_point", 7, None, torch.bfloat16, (1,), True, False),
    ("bf16", 8, 32, torch.float32, (3, 2), True, True),
    ("fp16", 3, 128, torch.bfloat16, (18,), False, False),
    ("fp32", 4, None, torch.float16, (4,), True, True),
]


def _id(c):
    f, b, g, d, shape, bias, zp = c
    return f"{f}-b{b}-{'ch' if g is None else f'g{g}'}-{str(d)[6:]}-x{'x'.join(map(str, shape))}{'-bias' if bias else ''}{'-zp' if zp else ''}"


@needs_kernels
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_gemm"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_lrqat_linear_matches_fp64_reference(case, fused):
    phi_format, bits, group_size, dtype, lead, has_bias, zp_on = case
    i = CASES.index(case)
    out, inn, rank = 37, 256, (1, 5, 17, 33)[i % 4]
    phi, A, B, s, zp, bias = make_layer(out, inn, rank, bits, phi_format, group_size, dtype, zero_point=zp_on, seed=i)
    bias = bias if has_bias else None
    x = torch.randn(*lead, inn, generator=torch.Generator().manual_seed(10 + i)).to(dtype).to(DEVICE)
    kw = dict(bits=bits, phi_format=phi_format, alpha=ALPHA, group_size=group_size, zero_point=zp)
    fn = lk.lrqat_linear if not fused else functions.lrqat_linear_fused
    y, grads = run(fn, x, phi, A, B, s, bias, kw)
    y_e, grads_e = run(reference.lrqat_linear, x, phi, A, B, s, bias, kw)
    y_t, grads_t = run(reference.lrqat_linear, x, phi, A, B, s, bias, kw, out_dtype=torch.float64, cast=torch.float64)
    assert y.dtype == dtype and y.shape == (*lead, out)
    assert_close_2x("y", y, y_e, y_t)
    for name, k, e, t in zip(("x", "lora_A", "lora_B", "scale", "bias"), grads, grads_e, grads_t):
        if t is None:
            assert k is None
            continue
        assert k.dtype == e.dtype and k.shape == e.shape, name
        assert_close_2x(name, k, e, t)


@needs_kernels
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_activations_with_fp32_master_factors(dtype, fused):
    """What LRQATLinear runs under a 16-bit compute dtype (modules.factor_dtype): x, bias, W_hat and
    y in bf16 / fp16, lora_A / lora_B fp32; gradients come back in each leaf's dtype."""
    phi, A, B, s, zp, bias = make_layer(24, 96, 5, 4, "packed_int", 32, torch.float32, zero_point=True, seed=7)
    bias = bias.to(dtype)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(8)).to(dtype).to(DEVICE)
    kw = dict(bits=4, phi_format="packed_int", alpha=ALPHA, group_size=32, zero_point=zp)
    fn = lk.lrqat_linear if not fused else functions.lrqat_linear_fused
    y, grads = run(fn, x, phi, A, B, s, bias, kw)
    y_e, grads_e = run(reference.lrqat_linear, x, phi, A, B, s, bias, kw)
    y_t, grads_t = run(reference.lrqat_linear, x, phi, A, B, s, bias, kw, out_dtype=torch.float64, cast=torch.float64)
    assert y.dtype == dtype
    assert_close_2x("y", y, y_e, y_t)
    for name, k, e, t, want in zip(("x", "lora_A", "lora_B", "scale", "bias"), grads, grads_e, grads_t,
                                   (dtype, torch.float32, torch.float32, torch.float32, dtype)):
        assert k.dtype == e.dtype == want, name
        assert_close_2x(name, k, e, t)


@needs_kernels
def test_option_selects_the_fused_path(monkeypatch, set_kernel_options):
    phi, A, B, s, zp, bias = make_layer(20, 64, 3, 4, "packed_int", 32, torch.float32, seed=3)
    x = torch.randn(4, 64, device=DEVICE)
    kw = dict(bits=4, phi_format="packed_int", alpha=ALPHA, group_size=32)
    seen = []
    real = functions.LRQATLinearFunction.apply

    def spy(*args):
        seen.append(args[-1])  # the fused_gemm flag
        return real(*args)

    monkeypatch.setattr(functions.LRQATLinearFunction, "apply", spy)
    lk.lrqat_linear(x, phi, A, B, s, bias, **kw)
    set_kernel_options(fused_gemm=True)
    y = lk.lrqat_linear(x, phi, A, B, s, bias, **kw)
    assert seen == [False, True]
    torch.testing.assert_close(y, reference.lrqat_linear(x, phi, A, B, s, bias, **kw), rtol=1e-5, atol=1e-5)


def test_fused_gemm_argument_and_deprecated_env_var_select_the_path(monkeypatch):
    """``lrqat_linear(..., fused_gemm=...)`` wins; None falls back to the option, then (deprecated,
    with a warning) ``LRQAT_FUSED_GEMM``; anything but a bool or None is refused."""
    phi, A, B, s, zp, bias = make_layer(20, 64, 3, 4, "packed_int", 32, torch.float32, seed=3)
    x = torch.randn(4, 64, device=DEVICE)
    kw = dict(bits=4, phi_format="packed_int", alpha=ALPHA, group_size=32)
    seen = []
    real = functions.LRQATLinearFunction.apply

    def spy(*args):
        seen.append(args[-1])  # the fused_gemm flag
        return real(*args)

    monkeypatch.setattr(functions.LRQATLinearFunction, "apply", spy)
    lk.lrqat_linear(x, phi, A, B, s, bias, fused_gemm=True, **kw)
    monkeypatch.setenv("LRQAT_FUSED_GEMM", "1")
    with pytest.warns(DeprecationWarning, match="LRQAT_FUSED_GEMM"):
        lk.lrqat_linear(x, phi, A, B, s, bias, **kw)
    lk.lrqat_linear(x, phi, A, B, s, bias, fused_gemm=False, **kw)
    assert seen == [True, True, False]
    with pytest.raises(TypeError, match="fused_gemm must be True, False or None"):
        lk.lrqat_linear(x, phi, A, B, s, bias, fused_gemm=1, **kw)


@needs_kernels
def test_out_dtype_differs_from_x_dtype():
    """x fp32, W_hat/y bf16 (reference semantics): dx comes back in x's dtype."""
    phi, A, B, s, zp, bias = make_layer(24, 64, 4, 4, "fixed_point", None, torch.float32, seed=5)
    x = torch.randn(6, 64, device=DEVICE)
    kw = dict(bits=4, phi_format="fixed_point", alpha=ALPHA)
    y, grads = run(lk.lrqat_linear, x, phi, A, B, s, bias, kw, out_dtype=torch.bfloat16)
    y_e, grads_e = run(reference.lrqat_linear, x, phi, A, B, s, bias, kw, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.float32 and grads[4].dtype == torch.float32
    torch.testing.assert_close(y, y_e, rtol=2e-2, atol=2e-2)
    for k, e in zip(grads, grads_e):
        torch.testing.assert_close(k, e, rtol=2e-2, atol=2e-2)


@needs_kernels
def test_only_lora_requires_grad():
    """Frozen x and no bias: backward computes only what is needed (no dx)."""
    phi, A, B, s, zp, _ = make_layer(20, 64, 3, 4, "packed_int", 32, torch.float32, seed=6)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x = torch.randn(3, 64, device=DEVICE)
    lk.lrqat_linear(x, phi, A, B, s, bits=4, phi_format="packed_int", alpha=ALPHA, group_size=32).sum().backward()
    assert A.grad is not None and B.grad is not None and s.grad is None and x.grad is None


# ----------------------------------------------------------------------------------------------
# Memory: autograd saves exactly the inputs
# ----------------------------------------------------------------------------------------------


def saved_by_autograd(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_gemm"])
@pytest.mark.parametrize("zp_on", [False, True])
def test_lrqat_linear_saves_only_its_inputs(fused, zp_on):
    phi, A, B, s, zp, bias = make_layer(48, 128, 8, 4, "packed_int", 32, torch.bfloat16, zero_point=zp_on, seed=7)
    A.requires_grad_(True)
    B.requires_grad_(True)
    s.requires_grad_(True)
    bias.requires_grad_(True)
    x = torch.randn(2, 5, 128, device=DEVICE).bfloat16().requires_grad_(True)
    fn = functions.lrqat_linear_fused if fused else lk.lrqat_linear
    kw = dict(bits=4, phi_format="packed_int", alpha=ALPHA, group_size=32, zero_point=zp)
    y, saved = saved_by_autograd(lambda: fn(x, phi, A, B, s, bias, **kw))
    inputs = [x, phi, A, B, s] + ([zp] if zp_on else [])
    assert len(saved) == len(inputs)
    for t in saved:
        assert any(t is i or (t.data_ptr() == i.data_ptr() and t.shape == i.shape and t.dtype == i.dtype) for i in inputs)
    assert nbytes(saved) == nbytes(inputs)
    # the eager reference keeps several weight-sized tensors alive
    _, saved_ref = saved_by_autograd(lambda: reference.lrqat_linear(x, phi, A, B, s, bias, **kw))
    assert nbytes(saved_ref) > nbytes(inputs) + 2 * 48 * 128
    y.sum().backward()


def test_fake_quant_weight_saves_only_its_inputs():
    phi, A, B, s, zp, _ = make_layer(48, 128, 8, 3, "fixed_point", None, torch.float16, zero_point=True, seed=8)
    for t in (A, B, s):
        t.requires_grad_(True)
    w, saved = saved_by_autograd(lambda: lk.fake_quant_weight(phi, A, B, s, bits=3, phi_format="fixed_point",
                                                              alpha=ALPHA, zero_point=zp))
    assert nbytes(saved) == nbytes([phi, A, B, s, zp])
    w.float().sum().backward()
    assert A.grad is not None and s.grad is not None


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------


class TinyLRQAT(torch.nn.Module):
    def __init__(self, phi, A, B, s, bias, kw):
        super().__init__()
        self.register_buffer("phi", phi)
        self.lora_A = torch.nn.Parameter(A.clone())
        self.lora_B = torch.nn.Parameter(B.clone())
        self.scale = torch.nn.Parameter(s.clone())
        self.bias = torch.nn.Parameter(bias.clone())
        self.kw = kw

    def forward(self, x):
        h = lk.lrqat_linear(x, self.phi, self.lora_A, self.lora_B, self.scale, self.bias, **self.kw)
        return torch.nn.functional.gelu(h).pow(2).mean()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    phi, A, B, s, zp, bias = make_layer(24, 64, 4, 4, "packed_int", 32, torch.float32, zero_point=True, seed=9)
    kw = dict(bits=4, phi_format="packed_int", alpha=ALPHA, group_size=32, zero_point=zp)
    eager_m = TinyLRQAT(phi, A, B, s, bias, kw)
    comp_m = TinyLRQAT(phi, A, B, s, bias, kw)
    x = torch.randn(2, 5, 64, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(comp_m, backend=backend, fullgraph=True)
    loss_c = compiled(x)
    loss_c.backward()
    loss_e = eager_m(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, p_c), p_e in zip(comp_m.named_parameters(), eager_m.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_eager_fp64_path_matches_reference():
    """fp64 (gradcheck territory) always takes the eager path; it must match the reference."""
    phi, A, B, s, zp, bias = make_layer(16, 64, 3, 4, "fp32", 32, torch.float64, zero_point=True, seed=12)
    s = s.double()
    x = torch.randn(3, 64, dtype=torch.float64, device=DEVICE)
    kw = dict(bits=4, phi_format="fp32", alpha=ALPHA, group_size=32, zero_point=zp)
    assert not functions.uses_kernels(phi, A, s)
    y, grads = run(lk.lrqat_linear, x, phi, A, B, s, bias, kw)
    y_r, grads_r = run(reference.lrqat_linear, x, phi, A, B, s, bias, kw)
    torch.testing.assert_close(y, y_r, rtol=1e-12, atol=1e-12)
    for k, r in zip(grads, grads_r):
        torch.testing.assert_close(k, r, rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("dtype,group_size", [(torch.bfloat16, None), (torch.float16, 32)])
def test_fused_gemm_builds_the_same_w_hat(dtype, group_size):
    """One-hot activations read the weight tiles the fused GEMMs build: they must equal the
    fake-quant kernel's W_hat bit for bit (so merge's W_int is the fused training forward's too)."""
    from lrqat_kernels.ops import fake_quant as fq
    from lrqat_kernels.ops import fused_linear as fl

    phi, A, B, s, zp, _ = make_layer(40, 128, 17, 4, "packed_int", group_size, dtype, zero_point=True, seed=21)
    kw = dict(bits=4, phi_format="packed_int", alpha=ALPHA)
    w = fq.fake_quant_forward(phi, A, B, s, zp, out_dtype=dtype, **kw)
    y = fl.fused_linear_forward(torch.eye(128, dtype=dtype, device=DEVICE), phi, A, B, s, zp, None, **kw)
    dx = fl.fused_linear_dx(torch.eye(40, dtype=dtype, device=DEVICE), phi, A, B, s, zp, **kw)
    assert torch.equal(y.T, w) and torch.equal(dx, w)


@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=["2d", "3d"])
def test_output_can_be_modified_in_place(lead):
    """The Function returned a reshape view of its result: `y = lin(x); y += 1` then failed in the
    backward ("Output 0 of LRQATLinearFunction is a view and is being modified inplace")."""
    phi, A, B, s, zp, bias = make_layer(16, 32, 4, 4, "packed_int", 16, torch.float32, zero_point=True, seed=2)
    x = torch.randn(*lead, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kw = dict(bits=4, phi_format="packed_int", alpha=ALPHA, group_size=16, zero_point=zp)
    grads = []
    for fn in (lk.lrqat_linear, reference.lrqat_linear):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, s, bias)]
        y = fn(leaves[0], phi, leaves[1], leaves[2], leaves[3], leaves[4], **kw)
        y += 1.0
        (y * y).sum().backward()
        grads.append([t.grad for t in leaves])
    for k, e in zip(*grads):
        torch.testing.assert_close(k, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_gemm"])
def test_autocast_keeps_the_integer_grid_fp32(fused):
    """Under torch.autocast the eager B @ A ran in bf16: the training forward's W_int differed from
    the merge's (317 of 131k entries in a review's trained layer), and the fused path returned a
    dtype its fake did not say. Now C / Z / W_int are fp32 whatever the region, and an fp32 x
    computes like nn.Linear under autocast (W_hat, GEMM and y in bf16)."""
    phi, A, B, s, zp, bias = make_layer(40, 64, 8, 4, "fixed_point", 32, torch.float32, zero_point=True, seed=5)
    B = B * 0.5  # C of a few grid units: many Z near a rounding boundary
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    kw = dict(bits=4, phi_format="fixed_point", alpha=ALPHA, group_size=32, zero_point=zp)
    w_int = lk.merge_weight(phi, A, B, s, **kw)[0]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        assert torch.equal(lk.merge_weight(phi, A, B, s, **kw)[0], w_int)
        assert torch.equal(reference.fake_quant_weight(phi, A, B, s, **kw), reference.fake_quant_weight(phi, A, B, s, **kw))
        w_ac = reference.fake_quant_weight(phi, A, B, s, **kw)
        fn = lk.lrqat_linear if not fused else functions.lrqat_linear_fused
        y = fn(x, phi, A, B, s, bias, **kw)
    assert torch.equal(w_ac, reference.fake_quant_weight(phi, A, B, s, **kw))
    assert y.dtype == torch.bfloat16
    w = reference.fake_quant_weight(phi, A, B, s, out_dtype=torch.bfloat16, **kw)
    want = F.linear(x.to(torch.bfloat16).float(), w.float(), bias.to(torch.bfloat16).float())
    torch.testing.assert_close(y.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())


def test_zero_output_features_backward():
    """out_features = 0 passed the checks and the forward, then the backward's reshape(-1, 0) failed."""
    phi, A, B, s, zp, bias = make_layer(0, 32, 4, 4, "packed_int", None, torch.float32, seed=1)
    x = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    A.requires_grad_(True)
    y = lk.lrqat_linear(x, phi, A, B, s, None, bits=4, phi_format="packed_int", alpha=ALPHA)
    assert y.shape == (3, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(A.grad, torch.zeros_like(A))
