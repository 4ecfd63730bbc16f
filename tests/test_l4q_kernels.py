"""L4Q on the fused fake-quant kernels (``ops/fake_quant.py``, ``L4Q`` constexpr) against the eager
layer (``l4q.py`` under ``use_kernels(False)``) and the naive straight-through oracle.

Interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1): small shapes whose tiles still cover
the layouts the GPU meets: several groups a column tile, a group over several column tiles and
backward bands, odd ``out`` / ``in`` / group sizes, and every ``bits``.

Tolerances: the forward (``W_q``, ``W_int``) is bit for bit (same fp32 ops in the same order: IEEE
division, no FMA); the gradients are sums in another order than torch's, so they are compared
to ``REL`` of the largest entry of the reference (fp32 ``G``), looser for 16-bit factors (their own
rounding).
"""

from __future__ import annotations

import pytest
import torch

from lrqat_kernels import l4q
from lrqat_kernels._oracle_l4q import l4q_fake_quant_weight as oracle_weight
from lrqat_kernels.formats import qrange
from lrqat_kernels.ops import fake_quant as fq
from lrqat_kernels.ops._launch import kernel_options, use_kernels

REL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the L4Q launches of the two kernels (so a test knows the kernels, not eager, computed)."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = fq.fake_quant_forward, fq.fake_quant_backward

    def counting_fwd(*a, **k):
        calls["fwd"] += bool(k.get("l4q"))
        return fwd(*a, **k)

    def counting_bwd(*a, **k):
        calls["bwd"] += bool(k.get("l4q"))
        return bwd(*a, **k)

    monkeypatch.setattr(fq, "fake_quant_forward", counting_fwd)
    monkeypatch.setattr(fq, "fake_quant_backward", counting_bwd)
    return calls


def _problem(out_f, in_f, rank, bits, group_size, w_dtype=torch.float32, f_dtype=torch.float32, seed=0, spread=1.5):
    """Random L4Q tensors whose ``v`` lands on both clip sides (``spread`` x the grid)."""
    gen = torch.Generator().manual_seed(seed)
    g = in_f if group_size is None else group_size
    qmin, qmax = qrange(bits)
    s = (torch.rand(out_f, in_f // g, generator=gen) + 0.5) * 0.05
    b = (torch.rand(out_f, in_f // g, generator=gen) - 0.5) * 0.05
    v = (torch.rand(out_f, in_f, generator=gen) * (qmax - qmin) + qmin) * spread
    w0 = (v * s.repeat_interleave(g, 1) + b.repeat_interleave(g, 1)).to(w_dtype)
    A = (torch.randn(rank, in_f, generator=gen) * 0.1).to(f_dtype)
    B = (torch.randn(out_f, rank, generator=gen) * 0.1).to(f_dtype)
    return w0, A, B, s, b


def _weight_and_grads(mode, w0, A, B, s, b, G, **kw):
    """``W_q`` and the four gradients of ``sum(W_q * G)``: mode "kernels", "eager" or "oracle"."""
    leaves = [t.clone().requires_grad_(True) for t in (A, B, s, b)]
    with use_kernels(mode == "kernels"):
        fn = oracle_weight if mode == "oracle" else l4q.l4q_fake_quant_weight
        w = fn(w0, *leaves, **kw)
        (w.float() * G).sum().backward()
    return [w.detach()] + [t.grad for t in leaves]


def _assert_rel(got, want, rel, name):
    err = (got.float() - want.float()).abs().max().item()
    bound = rel * max(1.0, want.float().abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


# (out, in, rank, bits, group_size). Interpreter tiles: 32 x 64 (forward and backward), 4 programs.
CASES = [
    (37, 80, 3, 4, 16),    # 4 groups a tile (gpt 4), odd out, in not a multiple of the tile
    (33, 200, 5, 2, 100),  # a group over 7 column tiles of 16 (odd chunking), 2 bits
    (20, 192, 4, 3, None),  # per-channel: one group over 3 tiles and 3 backward bands (ds partials)
    (9, 48, 2, 8, 8),      # 8 bits, 8 groups a tile, one partial tile
    (35, 130, 3, 4, 13),   # odd group size, odd in
]


@pytest.mark.parametrize("out_f,in_f,rank,bits,group_size", CASES, ids=str)
def test_forward_and_gradients_match_eager_and_oracle(out_f, in_f, rank, bits, group_size, kernel_calls):
    """fp32: W_q bit for bit against the eager layer and the oracle; every gradient (lora_A, lora_B,
    scale, offset) to REL, with v on both clip sides."""
    w0, A, B, s, b = _problem(out_f, in_f, rank, bits, group_size, seed=out_f)
    G = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1))
    kw = dict(bits=bits, alpha=2.0, group_size=group_size)
    ker = _weight_and_grads("kernels", w0, A, B, s, b, G, **kw)
    assert kernel_calls == {"fwd": 1, "bwd": 1}
    eager = _weight_and_grads("eager", w0, A, B, s, b, G, **kw)
    orc = _weight_and_grads("oracle", w0, A, B, s, b, G, **kw)
    assert torch.equal(ker[0], eager[0]) and torch.equal(ker[0], orc[0])
    g = in_f if group_size is None else group_size
    v = (eager[0] - b.repeat_interleave(g, 1)) / s.repeat_interleave(g, 1)
    qmin, qmax = qrange(bits)
    assert (v.round() == qmin).any() and (v.round() == qmax).any()  # both ends of the grid are hit
    for name, got, e, o in zip(("lora_A", "lora_B", "scale", "offset"), ker[1:], eager[1:], orc[1:]):
        _assert_rel(got, e, REL[torch.float32], name + " vs eager")
        _assert_rel(got, o, REL[torch.float32], name + " vs oracle")


def test_bands_and_programs_do_not_change_the_result():
    """One program, and more programs than tiles: the two-stage reductions (dA / dB / ds / offset
    partials, a group split over bands) give the same gradients."""
    w0, A, B, s, b = _problem(40, 192, 4, 4, None, seed=3)
    G = torch.randn(40, 192, generator=torch.Generator().manual_seed(2))
    kw = dict(bits=4, alpha=1.0, group_size=None)
    res = []
    for n in (1, 16):
        with kernel_options(bwd_programs=n):
            res.append(_weight_and_grads("kernels", w0, A, B, s, b, G, **kw))
    for name, x, y in zip(("W_q", "lora_A", "lora_B", "scale", "offset"), *res):
        _assert_rel(x, y, REL[torch.float32], name)


@pytest.mark.parametrize("w_dtype,f_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float32), (torch.float16, torch.float16)],
                         ids=["w0-bf16,bf16", "w0-fp16,fp32", "w0-bf16,fp32", "w0-fp32,bf16", "w0-fp32,fp32",
                              "w0-fp16,fp16"])
def test_dtypes_linear_matches_eager(w_dtype, f_dtype, kernel_calls):
    """16-bit W0 (decoded exactly), bf16 / fp32 factors, x in W0's dtype: y and W_q bit for bit against
    the eager layer; every gradient (x, lora_A, lora_B, scale, offset) to the factors' rounding."""
    w0, A, B, s, b = _problem(21, 96, 4, 4, 32, w_dtype=w_dtype, f_dtype=f_dtype, seed=7)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(4)).to(w_dtype)
    bias = torch.randn(21).to(w_dtype)
    kw = dict(bits=4, alpha=1.0, group_size=32)
    res = []
    for kernels in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, s, b)]
        with use_kernels(kernels):
            y = l4q.l4q_linear(leaves[0], w0, *leaves[1:], bias, **kw)
            y.float().square().sum().backward()
            w = l4q.l4q_fake_quant_weight(w0, A, B, s, b, **kw)
        res.append([y.detach(), w] + [t.grad for t in leaves])
    assert kernel_calls == {"fwd": 3, "bwd": 1}  # y, W_q for dx, the weight; one backward pass
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    rel = REL[torch.float32] if f_dtype == torch.float32 and w_dtype == torch.float32 else REL[torch.bfloat16]
    for name, got, want in zip(("x", "lora_A", "lora_B", "scale", "offset"), res[0][2:], res[1][2:]):
        assert got.dtype == want.dtype, name
        _assert_rel(got, want, rel, name)


def test_clip_mask_is_inclusive_at_the_grid_ends():
    """v exactly qmin and qmax are inside (STE gradient, no offset gradient); one step past each end is
    outside. Hand values, per-channel, grad_scale 1, G = 1: ds = 0 + 0 + qmax + qmin = -1, db = 2,
    dB = (alpha / r) * (dZ @ A^T) = 2 * 1 (A = 1, dZ = [1, 1, 0, 0])."""
    bits = 3
    qmin, qmax = qrange(bits)
    s = torch.tensor([[0.25]])
    w0 = torch.tensor([[qmin, qmax, qmax + 1, qmin - 1]]) * 0.25
    A, B = torch.ones(1, 4), torch.zeros(1, 1)
    leaves = [t.clone().requires_grad_(True) for t in (A, B, s, torch.zeros(1, 1))]
    w = l4q.l4q_fake_quant_weight(w0, *leaves, bits=bits, alpha=1.0, grad_scale=1.0)
    w.sum().backward()
    assert w.detach().tolist() == [[qmin * 0.25, qmax * 0.25, qmax * 0.25, qmin * 0.25]]
    assert leaves[2].grad.item() == qmax + qmin and leaves[3].grad.item() == 2.0
    assert leaves[1].grad.item() == 2.0 and torch.equal(leaves[0].grad, torch.zeros(1, 4))


@pytest.mark.parametrize("bits,group_size", [(2, 16), (8, None)])
def test_merge_integers_equal_eager(bits, group_size, kernel_calls):
    """``l4q_merge`` on the forward kernel's int8 mode: the eager integers, and ``s * W_int + b == W_q``."""
    w0, A, B, s, b = _problem(19, 64, 3, bits, group_size, w_dtype=torch.bfloat16, seed=11)
    w_int, scale, offset = l4q.l4q_merge(w0, A, B, s, b, bits=bits, alpha=1.5, group_size=group_size)
    assert kernel_calls["fwd"] == 1 and w_int.dtype == torch.int8
    with use_kernels(False):
        w_int_eager, _, _ = l4q.l4q_merge(w0, A, B, s, b, bits=bits, alpha=1.5, group_size=group_size)
    assert torch.equal(w_int, w_int_eager)
    g = 64 if group_size is None else group_size
    w_hat = scale.repeat_interleave(g, 1) * w_int.float() + offset.repeat_interleave(g, 1)
    assert torch.equal(w_hat, l4q.l4q_fake_quant_weight(w0, A, B, s, b, bits=bits, alpha=1.5, group_size=group_size,
                                                        out_dtype=torch.float32).detach())


@pytest.mark.parametrize("act_dtype,f_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_g_free_backward_matches_g_in_memory(act_dtype, f_dtype):
    """``l4q_backward(None, ..., dy=, x=)`` (G tiles built from dy and x in the kernel) equals the pass
    over ``G = dy^T x`` formed in fp32."""
    w0, A, B, s, b = _problem(27, 80, 4, 4, 16, f_dtype=f_dtype, seed=5)
    dy = torch.randn(23, 27, generator=torch.Generator().manual_seed(6)).to(act_dtype)
    x = torch.randn(23, 80, generator=torch.Generator().manual_seed(7)).to(act_dtype)
    kw = dict(bits=4, alpha=1.0, grad_scale=0.3)
    fused = fq.l4q_backward(None, w0, A, B, s, b, dy=dy, x=x, **kw)
    mem = fq.l4q_backward(dy.float().T @ x.float(), w0, A, B, s, b, **kw)
    for name, got, want in zip(("lora_A", "lora_B", "scale", "offset"), fused, mem):
        assert got.dtype == want.dtype
        _assert_rel(got, want, REL[f_dtype], name)


def test_ops_opcheck():
    """``lrqat::l4q_fwd`` / ``l4q_w_int`` / ``l4q_bwd``: schema, fakes, autograd registration, AOT dispatch."""
    w0, A, B, s, b = _problem(9, 32, 2, 4, 16, seed=2)
    G = torch.randn(9, 32, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.lrqat.l4q_fwd.default,
                          (w0.to(torch.bfloat16), A.requires_grad_(), B.requires_grad_(), s.requires_grad_(),
                           b.requires_grad_(), 4, 1.0, 0.5, torch.bfloat16))
    A, B, s, b = (t.detach() for t in (A, B, s, b))
    torch.library.opcheck(torch.ops.lrqat.l4q_w_int.default, (w0, A, B, s, b, 4, 1.0))
    torch.library.opcheck(torch.ops.lrqat.l4q_bwd.default, (G, w0, A, B, s, b, 4, 1.0, 0.5))


def test_ops_refuse_eager_inputs():
    """The L4Q ops run the kernels only (``l4q.py`` falls back to eager): fp64 inputs or kernels switched
    off give a one-line error naming the op; the layer itself still computes."""
    w0, A, B, s, b = _problem(4, 16, 1, 4, None, seed=1)
    with pytest.raises(RuntimeError, match=r"lrqat::l4q_fwd runs the Triton kernels only"):
        torch.ops.lrqat.l4q_fwd(w0.double(), A.double(), B.double(), s.double(), b.double(), 4, 1.0, 0.5, torch.float64)
    with use_kernels(False), pytest.raises(RuntimeError, match=r"lrqat::l4q_bwd runs the Triton kernels only"):
        torch.ops.lrqat.l4q_bwd(w0, w0, A, B, s, b, 4, 1.0, 0.5)
    assert l4q.l4q_fake_quant_weight(w0.double(), A.double(), B.double(), s.double(), b.double(), bits=4).dtype == torch.float64


def test_fwd_op_is_differentiable():
    """``lrqat::l4q_fwd``'s registered autograd (through ``lrqat::l4q_bwd``) gives the layer's gradients."""
    w0, A, B, s, b = _problem(10, 48, 2, 3, 16, seed=4)
    G = torch.randn(10, 48, generator=torch.Generator().manual_seed(5))
    want = _weight_and_grads("kernels", w0, A, B, s, b, G, bits=3, alpha=1.0, group_size=16, grad_scale=0.25)
    leaves = [t.clone().requires_grad_(True) for t in (A, B, s, b)]
    w = torch.ops.lrqat.l4q_fwd(w0, *leaves, 3, 1.0, 0.25, torch.float32)
    (w * G).sum().backward()
    assert torch.equal(w.detach(), want[0])
    for got, exp in zip((t.grad for t in leaves), want[1:]):
        assert torch.equal(got, exp)
