"""L4Q (lrqat_kernels/l4q.py) against the naive straight-through graph and METHODS' hand values."""

from __future__ import annotations

import math

import pytest
import torch

from lrqat_kernels.formats import qrange
from lrqat_kernels.l4q import (
    L4QLinear,
    l4q_fake_quant_weight,
    l4q_init,
    l4q_linear,
    l4q_merge,
    lsq_grad_scale,
)
from lrqat_kernels._oracle_l4q import l4q_fake_quant_weight as oracle_weight  # -> reference


def _oracle_linear(x, w0, A, B, s, b, bias, **kw):
    w_q = oracle_weight(w0, A, B, s, b, **kw)
    y = torch.nn.functional.linear(x, w_q.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return y


def test_t1_init_and_forward_hand_values():
    """METHODS L4Q T1: 4-bit, one group per row: L4Q init, W_int and W_q by hand."""
    w0 = torch.tensor([[0.30, -0.55, 0.12, 0.90], [-0.21, 0.05, 0.40, -0.10]])
    s, b = l4q_init(w0, 4, None, "l4q")
    torch.testing.assert_close(s, torch.tensor([[0.1285714], [0.0571429]]), rtol=0, atol=1e-7)
    assert torch.equal(b, torch.zeros(2, 1))
    A, B = torch.zeros(1, 4), torch.zeros(2, 1)
    w_int, _, _ = l4q_merge(w0, A, B, s, b, bits=4, alpha=1.0)
    assert w_int.tolist() == [[2, -4, 1, 7], [-4, 1, 7, -2]]
    w_q = l4q_fake_quant_weight(w0, A, B, s, b, bits=4)
    expect = torch.tensor([[0.2571429, -0.5142857, 0.1285714, 0.9], [-0.2285714, 0.0571429, 0.4, -0.1142857]])
    torch.testing.assert_close(w_q, expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad_scale", [1.0, None])
def test_t2_gradients_hand_values(grad_scale):
    """METHODS L4Q T2: 3-bit, s = 0.1, b = 0, alpha / r = 1, G = 1. dL/ds = -1.4 (x g), dL/db = 2:
    the LSQ term tells L4Q from an LR-QAT-style step gradient (which would give +1)."""
    w0 = torch.tensor([[0.14, 0.27, -0.22]], dtype=torch.float64)
    B = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([[0.2, 0.4, -0.6]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[0.1]], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    w_q = l4q_fake_quant_weight(w0, A, B, s, b, bits=3, alpha=1.0, grad_scale=grad_scale)
    torch.testing.assert_close(w_q.detach(), torch.tensor([[0.2, 0.3, -0.4]], dtype=torch.float64))
    w_q.sum().backward()
    g = 1.0 if grad_scale is not None else 1 / math.sqrt(3 * 3)
    assert math.isclose(s.grad.item(), -1.4 * g, rel_tol=1e-12)
    assert math.isclose(b.grad.item(), 2.0 * g, rel_tol=1e-12)
    torch.testing.assert_close(A.grad, torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(B.grad, torch.tensor([[0.2]], dtype=torch.float64))
    assert math.isclose(lsq_grad_scale(3, 3), 1 / 3, rel_tol=1e-15)


def _problem(out_f, in_f, rank, bits, group_size, dtype=torch.float64, seed=0, spread=1.5):
    """Random L4Q tensors whose v lands on both clip sides (``spread`` x the grid)."""
    gen = torch.Generator().manual_seed(seed)
    g = in_f if group_size is None else group_size
    qmin, qmax = qrange(bits)
    s = (torch.rand(out_f, in_f // g, generator=gen, dtype=dtype) + 0.5) * 0.05
    b = (torch.rand(out_f, in_f // g, generator=gen, dtype=dtype) - 0.5) * 0.05
    v = (torch.rand(out_f, in_f, generator=gen, dtype=dtype) * (qmax - qmin) + qmin) * spread
    w0 = v * s.repeat_interleave(g, 1) + b.repeat_interleave(g, 1)
    A = torch.randn(rank, in_f, generator=gen, dtype=dtype) * 0.1
    B = torch.randn(out_f, rank, generator=gen, dtype=dtype) * 0.1
    return w0, A, B, s, b


CASES = [
    # (out, in, rank, bits, group_size)
    (5, 24, 3, 4, None),
    (7, 24, 2, 3, 8),
    (4, 32, 4, 2, 16),
    (6, 12, 1, 8, 4),
    (3, 40, 5, 4, 40),
]


@pytest.mark.parametrize("out_f,in_f,rank,bits,group_size", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("grad_scale", [None, 0.7])
def test_t3_linear_matches_naive_graph_fp64(out_f, in_f, rank, bits, group_size, grad_scale):
    """METHODS L4Q T3: the recomputing backward equals autograd through the naive STE graph, every
    gradient (x, lora_A, lora_B, scale, offset), to 1e-10 in fp64, with both clip sides hit."""
    w0, A, B, s, b = _problem(out_f, in_f, rank, bits, group_size)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(out_f, dtype=torch.float64)
    kw = dict(bits=bits, alpha=2.0, group_size=group_size, grad_scale=grad_scale)
    grads = []
    for fn in (l4q_linear, _oracle_linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, s, b)]
        y = fn(leaves[0], w0, *leaves[1:], bias, **kw)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float64)).reshape(y.shape))
        grads.append([y.detach()] + [t.grad for t in leaves])
    v = (w0 + 2.0 / rank * B @ A - b.repeat_interleave(w0.shape[1] // s.shape[1], 1)) / s.repeat_interleave(w0.shape[1] // s.shape[1], 1)
    qmin, qmax = qrange(bits)
    assert (v < qmin).any() and (v > qmax).any() and ((v >= qmin) & (v <= qmax)).any()
    for name, got, want in zip(("y", "x", "lora_A", "lora_B", "scale", "offset"), *grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("out_f,in_f,rank,bits,group_size", CASES[:3], ids=lambda v: str(v))
def test_fake_quant_weight_matches_naive_graph(out_f, in_f, rank, bits, group_size):
    w0, A, B, s, b = _problem(out_f, in_f, rank, bits, group_size, seed=3)
    kw = dict(bits=bits, alpha=1.0, group_size=group_size)
    out = []
    for fn in (l4q_fake_quant_weight, oracle_weight):
        leaves = [t.clone().requires_grad_(True) for t in (A, B, s, b)]
        w = fn(w0, *leaves, **kw)
        (w * torch.sin(torch.arange(w.numel(), dtype=w.dtype)).reshape(w.shape)).sum().backward()
        out.append([w.detach()] + [t.grad for t in leaves])
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compute_dtypes_follow_the_oracle(dtype):
    """16-bit W0 and x: W_q is formed in fp32 and cast to x's dtype last, as the oracle does; the
    forward equals it bit for bit, the gradients to the dtype's accumulation error."""
    w0, A, B, s, b = _problem(9, 32, 4, 4, 16, dtype=torch.float32, seed=5)
    w0 = w0.to(dtype)
    fdt = torch.float32 if dtype == torch.float16 else dtype
    A, B = A.to(fdt), B.to(fdt)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    kw = dict(bits=4, alpha=1.0, group_size=16)
    res = []
    for fn in (l4q_linear, _oracle_linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, s, b)]
        y = fn(leaves[0], w0, *leaves[1:], None, **kw)
        y.float().square().sum().backward()
        res.append([y.detach()] + [t.grad for t in leaves])
    assert torch.equal(res[0][0], res[1][0])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, want in zip(res[0][1:], res[1][1:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_t4_merge_is_exact_after_training_steps():
    """METHODS L4Q T4: after optimizer steps s * W_int + b equals the training W_q bit for bit, and
    the deployed product equals the training forward exactly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 12)
    layer = L4QLinear.from_linear(lin, bits=4, rank=4, group_size=16, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 64)
    for _ in range(5):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    assert layer.lora_B.abs().sum() > 0 and layer.offset.abs().sum() > 0
    w_int, scale, offset = layer.merge()
    assert w_int.dtype == torch.int8 and int(w_int.min()) >= -8 and int(w_int.max()) <= 7
    w_hat = scale.repeat_interleave(16, 1) * w_int.float() + offset.repeat_interleave(16, 1)
    with torch.no_grad():
        assert torch.equal(w_hat, layer.fake_quant_weight())
        assert torch.equal(torch.nn.functional.linear(x, w_hat, layer.bias), layer(x))


def test_step_zero_is_rtn_with_the_init_step():
    """lora_B = 0 at init: the forward equals round-to-nearest of W0 on L4Q's grid."""
    lin = torch.nn.Linear(32, 6, bias=False)
    layer = L4QLinear.from_linear(lin, bits=3, rank=2, group_size=8)
    s = layer.scale.detach().repeat_interleave(8, 1)
    rtn = s * torch.round(lin.weight.detach() / s).clamp(-4, 3)
    with torch.no_grad():
        assert torch.equal(layer.fake_quant_weight(), rtn)
    assert ((lin.weight.detach() / s).abs() <= 4 + 1e-6).all()  # nothing clipped at step 0 (L4Q init)


def test_backward_saves_only_inputs():
    """The linear's autograd saves x, W0, A, B, s, b: no tensor of W's size beyond W0 itself."""
    w0, A, B, s, b = _problem(16, 64, 4, 4, 16, dtype=torch.float32)
    x = torch.randn(3, 64)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    leaves = [t.clone().requires_grad_(True) for t in (A, B, s, b)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        l4q_linear(x, w0, *leaves, bits=4, group_size=16)
    assert sorted(saved) == sorted([(3, 64), (16, 64), (4, 64), (16, 4), (16, 4), (16, 4)])


def test_lsq_init():
    w0 = torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    s, b = l4q_init(w0, 4, None, "lsq")
    assert math.isclose(s.item(), 2 * 0.25 / math.sqrt(7), rel_tol=1e-6) and b.item() == 0
    s0, _ = l4q_init(torch.zeros(2, 8), 4, 4)
    assert (s0 > 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(grad_scale=0.0), "grad_scale must be None"),
    (dict(grad_scale=-1.0), "grad_scale must be None"),
    (dict(grad_scale=float("nan")), "grad_scale must be None"),
    (dict(group_size=5), "group_size"),
    (dict(alpha=float("inf")), "alpha must be a finite number"),
    (dict(bits=9), "bits"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    w0, A, B, s, b = _problem(4, 16, 2, 4, None, dtype=torch.float32)
    kw = dict(bits=4, alpha=1.0, group_size=None) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        l4q_linear(torch.randn(2, 16), w0, A, B, s, b, **kw)


def test_bad_shapes_and_init_name():
    w0, A, B, s, b = _problem(4, 16, 2, 4, None, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"offset must be \[out, in // group_size\]"):
        l4q_linear(torch.randn(2, 16), w0, A, B, s, b[:, :0], bits=4)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., in\]"):
        l4q_linear(torch.randn(2, 15), w0, A, B, s, b, bits=4)
    with pytest.raises(ValueError, match="l4q_init must be one of"):
        l4q_init(w0, 4, None, "kaiming")


def test_clip_mask_is_inclusive_at_the_grid_ends():
    """v exactly qmin / qmax counts as inside (NUMERICS' inclusive mask): LoRA gets the gradient,
    the step gets round(v) - v = 0 and the offset nothing; one step beyond is outside."""
    s = torch.tensor([[0.125]], dtype=torch.float64)
    b = torch.zeros(1, 1, dtype=torch.float64)
    w0 = torch.tensor([[7 * 0.125, -8 * 0.125, 7.5 * 0.125, -8.5 * 0.125]], dtype=torch.float64)
    A = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    B = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    s_, b_ = s.clone().requires_grad_(True), b.clone().requires_grad_(True)
    w = l4q_fake_quant_weight(w0, A, B, s_, b_, bits=4, grad_scale=1.0)
    w.sum().backward()
    assert A.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert s_.grad.item() == 0 + 0 + 7 - 8 and b_.grad.item() == 2.0
