"""PE-QAT layer (lrqat_kernels/peqat.py) against the naive straight-through graph and METHODS' hand values."""

from __future__ import annotations

import math

import pytest
import torch

from lrqat_kernels._oracle_peqat import peqat_linear as oracle_linear  # -> reference
from lrqat_kernels.peqat import PEQATLinear, peqat_linear, peqat_merge, smoothquant_init

F64 = torch.float64


def _problem(out_f, in_f, rank, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=gen, dtype=dtype) * 0.2
    A = torch.randn(rank, in_f, generator=gen, dtype=dtype) * 0.1
    B = torch.randn(out_f, rank, generator=gen, dtype=dtype) * 0.1
    log_s = torch.randn(in_f, generator=gen, dtype=dtype) * 0.5
    x = torch.randn(3, 5, in_f, generator=gen, dtype=dtype) * torch.exp(log_s)  # some |x_s| > c, most inside
    clip = torch.tensor([1.6], dtype=dtype)
    return x, w0, A, B, log_s, clip


def test_t1_smoothing_cancels_without_quantisers():
    """METHODS PE-QAT T1: quantisers off, y(s) == y(s = 1) (to 1e-12, fp64): smoothing is on the input axis."""
    x, w0, A, B, log_s, clip = _problem(6, 10, 2)
    y_s = oracle_linear(x, w0, A, B, log_s, clip, quantize=False)
    y_1 = oracle_linear(x, w0, A, B, torch.zeros_like(log_s), clip, quantize=False)
    torch.testing.assert_close(y_s, y_1, rtol=0, atol=1e-12)
    # and a smoothing applied to the output rows would not cancel:
    assert not torch.allclose(y_s, oracle_linear(x, w0, A, B, log_s, clip)), "quantisers on must differ"


def test_t2_activation_clip_hand_values():
    """METHODS PE-QAT T2: 4-bit [-7, 7], c = 1.4 (da = 0.2), x = [0.33, -2.0, 1.39] -> x_q = [0.4, -1.4, 1.4];
    upstream gradient 1: dL/dc = 0.05 - 1 + 0.0071429, dL/dx = [1, 0, 1]. The layer sees x_q through an
    identity weight (s = 1; the weight's absmax grid holds the identity exactly)."""
    x = torch.tensor([[0.33, -2.0, 1.39]], dtype=F64, requires_grad=True)
    w0 = torch.eye(3, dtype=F64)
    A, B = torch.zeros(1, 3, dtype=F64), torch.zeros(3, 1, dtype=F64)
    clip = torch.tensor([1.4], dtype=F64, requires_grad=True)
    y = peqat_linear(x, w0, A, B, torch.zeros(3, dtype=F64), clip)
    torch.testing.assert_close(y.detach(), torch.tensor([[0.4, -1.4, 1.4]], dtype=F64))
    y.sum().backward()
    assert math.isclose(clip.grad.item(), 0.05 - 1 + 0.05 / 7, rel_tol=1e-9)
    assert x.grad.tolist() == [[1.0, 0.0, 1.0]]


def test_t3_per_channel_weight_hand_values():
    """METHODS PE-QAT T3: W_s = [[0.7, -0.36, 0.1], [0.2, -0.05, 0.13]] -> dw = [0.1, 0.0285714],
    W_int = [[7, -4, 1], [7, -2, 5]]."""
    w0 = torch.tensor([[0.7, -0.36, 0.1], [0.2, -0.05, 0.13]], dtype=F64)
    w_int, dw, s = peqat_merge(w0, torch.zeros(1, 3, dtype=F64), torch.zeros(2, 1, dtype=F64), torch.zeros(3, dtype=F64))
    assert w_int.tolist() == [[7, -4, 1], [7, -2, 5]]
    torch.testing.assert_close(dw, torch.tensor([[0.1], [0.2 / 7]]), rtol=1e-7, atol=0)
    assert torch.equal(s, torch.ones(3))


@pytest.mark.parametrize("bits,act_bits", [(4, 4), (4, 8), (3, 4), (8, 8)])
@pytest.mark.parametrize("clip_grad_scale", [1.0, 0.3])
def test_gradients_match_the_naive_graph_fp64(bits, act_bits, clip_grad_scale):
    """The recomputing backward equals autograd through the naive STE graph: x, lora_A, lora_B,
    log_smooth, clip, to 1e-10 in fp64, with activations clipped on both sides."""
    x, w0, A, B, log_s, clip = _problem(7, 12, 3, seed=bits * 10 + act_bits)
    bias = torch.randn(7, dtype=F64)
    x_s = x / torch.exp(log_s)
    assert (x_s > clip).any() and (x_s < -clip).any() and (x_s.abs() <= clip).any()
    kw = dict(bits=bits, act_bits=act_bits, alpha=2.0, clip_grad_scale=clip_grad_scale)
    res = []
    for fn in (peqat_linear, oracle_linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, A, B, log_s, clip)]
        y = fn(leaves[0], w0, *leaves[1:], bias, **kw)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=F64)).reshape(y.shape))
        res.append([y.detach()] + [t.grad for t in leaves])
    for name, got, want in zip(("y", "x", "lora_A", "lora_B", "log_smooth", "clip"), *res):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_the_oracle_in_16_and_32_bits(dtype):
    x, w0, A, B, log_s, clip = _problem(5, 16, 2, seed=4, dtype=torch.float32)
    x, w0 = x.to(dtype), w0.to(dtype)
    A, B = A.to(dtype), B.to(dtype)
    assert torch.equal(peqat_linear(x, w0, A, B, log_s, clip), oracle_linear(x, w0, A, B, log_s, clip))


def test_merge_reproduces_the_training_forward():
    """Deployed form ``y = (da * x_int) @ (dw * W_int)^T`` with ``x_int = round(clip(x / s) / da)``
    equals the fake-quant forward bit for bit (fp32: the merged steps are the forward's fp32 values)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 6)
    calib = torch.randn(64, 16) * torch.linspace(0.1, 5, 16)
    layer = PEQATLinear.from_linear(lin, act_absmax=calib.abs().amax(0), rank=2)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        opt.zero_grad()
        layer(calib).square().mean().backward()
        opt.step()
    assert layer.lora_B.abs().sum() > 0
    w_int, dw, s = layer.merge()
    assert int(w_int.abs().max()) <= 7
    c = layer.clip.detach().reshape(())
    da = c / 7
    x_int = torch.round((calib / s).clamp(-c, c) / da)
    y = torch.nn.functional.linear(da * x_int, dw * w_int.float(), layer.bias)
    with torch.no_grad():
        assert torch.equal(y, layer(calib))


def test_smoothquant_init_and_clip_start_unclipped():
    lin = torch.nn.Linear(8, 4)
    amax = torch.tensor([0.5, 1, 2, 4, 8, 16, 32, 0.0])
    layer = PEQATLinear.from_linear(lin, act_absmax=amax, rank=2)
    s = torch.exp(layer.log_smooth.detach())
    w = lin.weight.detach().abs().amax(0)
    expect = (amax.sqrt() / w.sqrt()).clamp(1e-5, 1e5)
    expect[-1] = 1.0  # no signal: 1
    torch.testing.assert_close(s, expect, rtol=1e-6, atol=0)
    assert math.isclose(layer.clip.item(), float((amax / s).max()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="migration must be in"):
        smoothquant_init(amax, lin.weight, 1.0)


def test_bad_arguments_name_the_argument():
    x, w0, A, B, log_s, clip = _problem(4, 8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="act_bits must be set for PE-QAT"):
        peqat_linear(x, w0, A, B, log_s, clip, act_bits=None)
    with pytest.raises(ValueError, match=r"log_smooth must be \[in\]"):
        peqat_linear(x, w0, A, B, log_s[:-1], clip)
    with pytest.raises(ValueError, match="clip_grad_scale must be a positive number"):
        peqat_linear(x, w0, A, B, log_s, clip, clip_grad_scale=0.0)
    with pytest.raises(ValueError, match="clip must hold one threshold"):
        peqat_linear(x, w0, A, B, log_s, torch.ones(2))
