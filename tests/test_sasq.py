"""SASQ (lrqat_kernels/sasq.py) against the naive straight-through graph and METHODS' hand values."""

from __future__ import annotations

import math

import pytest
import torch

from lrqat_kernels._oracle_sasq import sasq_fake_quant as oracle_fake_quant  # -> reference
from lrqat_kernels.modules import QuantizedLinear
from lrqat_kernels.sasq import (
    SASQLinear,
    StaticActQuant,
    calibrate_static_scale,
    calibrating,
    sasq_fake_quant,
    sasq_freeze,
)

F64 = torch.float64


def test_t1_hand_values_int8():
    """METHODS SASQ T1: int8, s = 0.5, x = [10.2, -70.0, 63.6] -> v = [20.4, -140, 127.2],
    x_q = [10, -64, 63.5]; upstream gradient 1: dL/ds = (20 - 20.4) - 128 + 127 = -1.4, dL/dx = [1, 0, 0]."""
    x = torch.tensor([10.2, -70.0, 63.6], dtype=F64, requires_grad=True)
    s = torch.tensor([0.5], dtype=F64, requires_grad=True)
    y = sasq_fake_quant(x, s)
    assert y.tolist() == [10.0, -64.0, 63.5]
    y.sum().backward()
    assert math.isclose(s.grad.item(), -1.4, rel_tol=1e-12)
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


def test_t1_a4_grid_and_inclusive_mask():
    """A4: grid [-8, 7]; v exactly on a bound passes the x-gradient (inclusive), just past it does not;
    outside, dL/ds is the bound (-8 or 7)."""
    s = torch.tensor([0.25], dtype=F64, requires_grad=True)
    x = torch.tensor([1.75, -2.0, 1.80, -2.06, 0.3], dtype=F64, requires_grad=True)  # v = 7, -8, 7.2, -8.24, 1.2
    y = sasq_fake_quant(x, s, bits=4)
    assert y.tolist() == [1.75, -2.0, 1.75, -2.0, 0.25]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert math.isclose(s.grad.item(), 0 + 0 + 7 - 8 + (1 - 1.2), rel_tol=1e-12)


def test_t2_static_no_batch_dependence():
    """METHODS SASQ T2: quant(x_i) is identical alone or in a batch with a 1e4 outlier row
    (a per-token or per-batch dynamic quantiser fails this: its step follows the outlier)."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    s = torch.tensor([0.02])
    batch = torch.cat([x, torch.full((1, 16), 1e4)])
    alone = torch.stack([sasq_fake_quant(r, s) for r in x])
    assert torch.equal(sasq_fake_quant(batch, s)[:4], alone)
    dyn = lambda t: (t.abs().amax() / 127) * torch.round(t / (t.abs().amax() / 127))  # noqa: E731
    assert not torch.equal(dyn(batch)[:4], dyn(x)), "the check must be able to fail"


def test_t3_calibration_init():
    """METHODS SASQ T3: calibration batches with absmax 4, 6, 8 -> s0 = 6 / 127."""
    s0 = calibrate_static_scale([4.0, 6.0, 8.0])
    assert s0.dtype == torch.float32 and tuple(s0.shape) == (1,)
    assert math.isclose(s0.item(), 6 / 127, rel_tol=1e-7)
    site = StaticActQuant()
    with calibrating(site):
        for a in (4.0, 6.0, 8.0):
            x = torch.tensor([0.5, -a, 1.0])
            assert torch.equal(site(x), x), "calibration passes activations through unquantised"
    assert math.isclose(site.scale.item(), 6 / 127, rel_tol=1e-7)
    assert math.isclose(calibrate_static_scale(torch.tensor([4.0, 6.0, 8.0]), bits=4).item(), 6 / 7, rel_tol=1e-7)


def _frozen_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q1 = QuantizedLinear.from_int(torch.randint(-8, 8, (24, 16), generator=gen, dtype=torch.int8),
                                  torch.rand(24, 1, generator=gen) * 0.05 + 0.01, bias=torch.randn(24, generator=gen), bits=4)
    q2 = QuantizedLinear.from_int(torch.randint(-128, 128, (8, 24), generator=gen, dtype=torch.int8),
                                  torch.rand(8, 1, generator=gen) * 0.01 + 0.001, bits=8)
    norm = torch.nn.LayerNorm(16)
    return torch.nn.Sequential(norm, SASQLinear(q1), torch.nn.GELU(), SASQLinear(q2, bits=4))


def test_t4_only_the_scales_train():
    """METHODS SASQ T4: after optimizer steps every other tensor is bit-identical, only the scales have .grad,
    and both scales moved (the first one's gradient comes back through the frozen layers after it)."""
    torch.manual_seed(1)
    model = _frozen_model()
    data = [torch.randn(6, 16) * 3 for _ in range(3)]
    with calibrating(model):
        for x in data:
            model(x)
    scales = sasq_freeze(model)
    assert len(scales) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s_before = [p.detach().clone() for p in scales]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # everything offered: freezing decides
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"1.act_quant.scale", "3.act_quant.scale"}
    for k, v in model.state_dict().items():
        if not k.endswith("act_quant.scale"):
            assert torch.equal(v, before[k]), k
    assert all(not torch.equal(p.detach(), b) for p, b in zip(scales, s_before))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("grad_scale", [1.0, 0.07])
def test_gradients_match_the_naive_graph_fp64(bits, grad_scale):
    """The recomputing backward equals autograd through the naive STE graph (x and scale, 1e-10, fp64),
    with values clipped on both sides and inside."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 7, generator=gen, dtype=F64) * 2
    s = torch.tensor([3.0 / 2 ** (bits - 1)], dtype=F64)
    v = x / s
    assert (v > 2 ** (bits - 1)).any() and (v < -(2 ** (bits - 1))).any()
    up = torch.cos(torch.arange(x.numel(), dtype=F64)).reshape(x.shape)
    res = []
    for fn in (sasq_fake_quant, oracle_fake_quant):
        xl, sl = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
        y = fn(xl, sl, bits=bits, grad_scale=grad_scale)
        y.backward(up)
        res.append((y.detach(), xl.grad, sl.grad))
    for name, got, want in zip(("y", "x", "scale"), *res):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_forward_equals_the_oracle_and_grads_keep_dtypes(dtype):
    """Forward bit-identical to the oracle in 16/32 bits (both compute in fp32, cast last); dL/dx in x's
    dtype, dL/dscale in the scale's fp32."""
    torch.manual_seed(2)
    x = (torch.randn(4, 32) * 4).to(dtype).requires_grad_(True)
    s = torch.tensor([0.03], requires_grad=True)
    y = sasq_fake_quant(x, s)
    assert y.dtype == dtype and torch.equal(y, oracle_fake_quant(x, s))
    y.float().sum().backward()
    assert x.grad.dtype == dtype and s.grad.dtype == torch.float32


def test_module_keeps_fp32_scale_under_bf16_cast():
    site = StaticActQuant(bits=8)
    with torch.no_grad():
        site.scale.fill_(0.1234567)
    site(torch.randn(3)).sum().backward()
    g = site.scale.grad.clone()
    site.to(torch.bfloat16)
    assert site.scale.dtype == torch.float32 and site.scale.item() == pytest.approx(0.1234567, rel=1e-7)
    assert site.scale.grad.dtype == torch.float32 and torch.equal(site.scale.grad, g)


def test_sasq_linear_equals_the_quantised_layer_on_quantised_input():
    model = _frozen_model(3)
    lin = model[1]
    with torch.no_grad():
        lin.scale.fill_(0.05)
    x = torch.randn(5, 16)
    want = lin.linear(0.05 * torch.round(x / torch.tensor(0.05)).clamp(-128, 127))
    assert torch.equal(lin(x), want)


def test_bad_arguments_name_the_argument():
    x, s = torch.randn(3), torch.tensor([0.1])
    with pytest.raises(ValueError, match="scale must hold one step"):
        sasq_fake_quant(x, torch.ones(2))
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        sasq_fake_quant(x, s, bits=9)
    with pytest.raises(ValueError, match="grad_scale must be a positive number"):
        sasq_fake_quant(x, s, grad_scale=0)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        sasq_fake_quant(torch.ones(3, dtype=torch.int32), s)
    with pytest.raises(ValueError, match="batches_absmax must hold at least one"):
        calibrate_static_scale([])
    with pytest.raises(ValueError, match="batches_absmax must hold a value > 0"):
        calibrate_static_scale([0.0, 0.0])
    with pytest.raises(ValueError, match="batches_absmax must hold finite values"):
        calibrate_static_scale([1.0, float("nan")])
    q = QuantizedLinear(16, 4, input_bits=8)
    with pytest.raises(ValueError, match="linear.input_bits must be None"):
        SASQLinear(q)
    with pytest.raises(ValueError, match="saw no calibration batch"):
        with calibrating(StaticActQuant()):
            pass
    with pytest.raises(ValueError, match="model holds no StaticActQuant"):
        sasq_freeze(torch.nn.Linear(2, 2))


def test_model_wrap_calibrate_train_deploy_save_load(tmp_path):
    """A converted model: every QuantizedLinear wrapped in SASQLinear, calibrated, its steps trained
    (weights bit-identical), then deployed as QuantizedLinear with a static input step: the deployed
    logits equal the SASQ model's (exact dequantise path) and survive save/load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lrqat_kernels import LRQATConfig, convert, load_pretrained, prepare, save_pretrained
    from lrqat_kernels.modules import QuantizedLinear
    from lrqat_kernels.ops._launch import use_kernels
    from lrqat_kernels.sasq import SASQLinear, calibrating, deploy, sasq_freeze, wrap_quantized

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    with use_kernels(False):
        model = convert(prepare(LlamaForCausalLM(cfg).eval(), LRQATConfig(rank=4, range_method="minmax")))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        names = wrap_quantized(model, bits=8)
        assert len(names) == 7
        with calibrating(model):
            model(ids)
        weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("act_quant.scale")}
        opt = torch.optim.AdamW(sasq_freeze(model), lr=1e-5)  # steps are ~1e-3: AdamW moves each by ~lr
        for _ in range(2):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.use_int4_kernel = False
        with torch.no_grad():
            ref = model(ids).logits
        deploy(model)
        assert not any(isinstance(m, SASQLinear) for m in model.modules())
        qs = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(qs) == 7 and all(m.input_qrange == (-128, 127) for m in qs)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref)
        save_pretrained(model, str(tmp_path / "sasq"))
        back = load_pretrained(str(tmp_path / "sasq"))
        for m in back.modules():
            if isinstance(m, QuantizedLinear):
                m.use_int4_kernel = False
        with torch.no_grad():
            assert torch.equal(back(ids).logits, ref)
