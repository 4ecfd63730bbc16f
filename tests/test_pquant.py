"""pQuant (lrqat_kernels/pquant.py) against the naive straight-through graph and METHODS' hand values."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lrqat_kernels import _oracle_pquant as oracle  # -> reference
from lrqat_kernels.pquant import (
    BitLinear,
    PQuantFFN,
    PQuantLinear,
    absmax_quant,
    absmax_quantize,
    average_weight_bits,
    binarize,
    binarize_weight,
    pack_signs,
    pquant_linear,
    pquant_weight_bits,
    unpack_signs,
)

F64 = torch.float64


def test_t1_binarize_hand_values():
    """METHODS pQuant T1: W = [[0.3, -0.1], [0.5, 0.1]] -> mu = 0.2, lam = 0.25, W~ = [[1, -1], [1, -1]]."""
    w = torch.tensor([[0.3, -0.1], [0.5, 0.1]], dtype=F64)
    sign, lam = binarize(w)
    assert sign.tolist() == [[1, -1], [1, -1]] and math.isclose(lam.item(), 0.25, rel_tol=1e-15)
    assert binarize_weight(w).tolist() == [[0.25, -0.25], [0.25, -0.25]]


def test_t1_sign_of_zero_is_minus_one_and_scale_is_uncentred():
    """Sign(0) = -1 (entries equal to the mean); lam = mean|W| of the uncentred W (not of W - mu)."""
    w = torch.tensor([[0.5, 0.25], [0.75, 0.5]])  # mean 0.5 exactly
    sign, lam = binarize(w)
    assert sign.tolist() == [[-1, -1], [1, -1]]
    assert lam.item() == 0.5  # mean|W - mu| would be 0.125


def test_t2_absmax_hand_values():
    """METHODS pQuant T2: x = [0.5, -2.0, 0.9] -> gamma = 63.5, ints [32, -127, 57], [0.503937, -2.0, 0.897638]."""
    x = torch.tensor([0.5, -2.0, 0.9], dtype=F64)
    x_int, step = absmax_quantize(x)
    assert x_int.tolist() == [32, -127, 57] and math.isclose(1 / step.item(), 63.5, rel_tol=1e-15)
    torch.testing.assert_close(absmax_quant(x), torch.tensor([32 / 63.5, -2.0, 57 / 63.5], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(absmax_quant(x), torch.tensor([0.503937, -2.0, 0.897638], dtype=F64), rtol=0, atol=1e-6)


def test_absmax_granularity_and_zero_rows():
    """Per token: each row its own step (row 0 ignores row 1's 100); ties round half to even (-63.5 -> -64);
    per tensor: one step for all; an all-zero row stays 0 (floor 1e-5, no NaN)."""
    x = torch.tensor([[1.0, -0.5], [100.0, 3.0], [0.0, 0.0]])
    per_token = absmax_quant(x)
    assert per_token[0].tolist() == [1.0, -64 / 127 * 1.0] or torch.equal(per_token[0], torch.tensor([127.0, -64.0]) / 127)
    assert per_token[2].tolist() == [0.0, 0.0] and torch.isfinite(per_token).all()
    per_tensor = absmax_quant(x, per_token=False)
    step = torch.tensor(100.0) / 127
    assert torch.equal(per_tensor[0], torch.tensor([1.0, -1.0]) * step)  # 1.27 -> 1, -0.635 -> -1


def test_t3_straight_through():
    """METHODS pQuant T3: dL/dW_latent == dL/d(lam W~) elementwise; a finite change to W that flips no
    sign (and keeps mean and mean|W|) leaves the forward unchanged."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=F64)
    w = torch.randn(3, 6, generator=gen, dtype=F64).requires_grad_(True)
    up = torch.randn(4, 3, generator=gen, dtype=F64)
    y = pquant_linear(x, w)
    y.backward(up)
    w_eff = binarize_weight(w.detach()).requires_grad_(True)
    torch.nn.functional.linear(absmax_quant(x), w_eff).backward(up)
    torch.testing.assert_close(w.grad, w_eff.grad, rtol=0, atol=1e-14)
    # dyadic weights (sums exact): move 1/8 between two entries above the mean and above 0
    w2 = torch.tensor([[1.0, 0.5, -0.5, -0.25], [0.75, -1.0, 0.25, 0.0]], dtype=F64)  # mean 0.09375
    x2 = torch.randn(4, 4, generator=gen, dtype=F64)
    y2 = pquant_linear(x2, w2)
    moved = w2.clone()
    moved[0, 0] -= 0.125
    moved[1, 0] += 0.125
    assert torch.equal(pquant_linear(x2, moved), y2)
    flipped = w2.clone()
    flipped[1, 2] = 0.0  # 0.25 -> 0 crosses the mean: the check can fail
    assert not torch.equal(pquant_linear(x2, flipped), y2)


@pytest.mark.parametrize("weight_bits", [1, 8, 4])
@pytest.mark.parametrize("act_bits", [8, 4, None])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_gradients_match_the_naive_graph_fp64(weight_bits, act_bits, bias):
    gen = torch.Generator().manual_seed(weight_bits * 100 + (act_bits or 0))
    x = torch.randn(2, 3, 10, generator=gen, dtype=F64)
    w = torch.randn(5, 10, generator=gen, dtype=F64) * 0.1
    b = torch.randn(5, generator=gen, dtype=F64) if bias else None
    up = torch.cos(torch.arange(30, dtype=F64)).reshape(2, 3, 5)
    res = []
    for fn in (pquant_linear, oracle.pquant_linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, w)] + ([b.clone().requires_grad_(True)] if bias else [])
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None, weight_bits=weight_bits, act_bits=act_bits)
        y.backward(up)
        res.append([y.detach()] + [t.grad for t in leaves])
    for name, got, want in zip(("y", "x", "weight", "bias"), *res):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_bits", [1, 8])
def test_linear_forward_equals_the_oracle_in_16_and_32_bits(dtype, weight_bits):
    torch.manual_seed(3)
    x = torch.randn(7, 16).to(dtype).requires_grad_(True)
    w = (torch.randn(9, 16) * 0.05).to(dtype).requires_grad_(True)
    y = pquant_linear(x, w, weight_bits=weight_bits)
    assert y.dtype == dtype and torch.equal(y, oracle.pquant_linear(x, w, weight_bits=weight_bits))
    y.float().sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def _ffn(n_experts, seed=0, **kw):
    torch.manual_seed(seed)
    return PQuantFFN(8, 24, 4, n_experts=n_experts, dtype=F64, generator=torch.Generator().manual_seed(seed), **kw).double()


@pytest.mark.parametrize("n_experts", [1, 3])
def test_ffn_gradients_match_the_dense_oracle_fp64(n_experts):
    """Every parameter (latent weights of both branches, experts, router, alpha, beta) and x: the routed
    FFN equals the dense masked oracle to 1e-10 (fp64); the aux loss and its router gradient too."""
    ffn = _ffn(n_experts)
    x = torch.randn(3, 5, 8, dtype=F64)
    up = torch.randn(3, 5, 8, dtype=F64)
    grads = []
    for run in ("module", "oracle"):
        ffn.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_(True)
        if run == "module":
            y, aux = ffn(xl), ffn.aux_loss
        else:
            y, aux = oracle.pquant_ffn(ffn, xl)
        loss = (y * up).sum() + (0 if aux is None else 10 * aux)
        loss.backward()
        g = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in ffn.named_parameters()}
        grads.append((y.detach(), xl.grad, g, aux))
    (y1, gx1, g1, a1), (y2, gx2, g2, a2) = grads
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-10)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-10, atol=1e-10, msg=n)
    assert g1["alpha"].abs().item() > 0 and g1["beta"].abs().item() > 0
    if n_experts > 1:
        assert math.isclose(a1.item(), a2.item(), rel_tol=1e-12) and g1["router.weight"].abs().sum() > 0


def test_t4_routing_hand_set_logits():
    """METHODS pQuant T4: with hand-set router logits the output equals beta F1 + alpha p_e F8^(e) per token;
    only the routed expert runs (on its tokens only) and the others get no gradient."""
    ffn = _ffn(3, seed=5)
    with torch.no_grad():
        ffn.router.weight.zero_()
        ffn.router.weight[0, 0], ffn.router.weight[1, 1], ffn.router.weight[2, 2] = 1.0, 2.0, 3.0
    x = torch.zeros(4, 8, dtype=F64)
    x[0, 0], x[1, 1], x[2, 1], x[3, 2] = 2.0, 1.0, 1.5, 0.5   # logits: e = 0, 1, 1, 2
    x[:, 3:] = torch.randn(4, 5, dtype=F64)
    seen = {}
    hooks = [e.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].shape[0])) for i, e in enumerate(ffn.experts)]
    y = ffn(x)
    for h in hooks:
        h.remove()
    assert seen == {0: 1, 1: 2, 2: 1}
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 3.0, 0], [0, 0, 1.5]], dtype=F64)
    p = torch.softmax(logits, -1)
    with torch.no_grad():
        for t, e in enumerate([0, 1, 1, 2]):
            a, b = ffn.alpha.double(), ffn.beta.double()  # fp32 parameters
            want = b * ffn.branch_1bit(x[t:t + 1]) + a * p[t, e] * ffn.experts[e](x[t:t + 1])
            torch.testing.assert_close(y[t:t + 1], want, rtol=1e-12, atol=1e-12)
    # all tokens to expert 1: experts 0 and 2 get no gradient
    ffn.zero_grad(set_to_none=True)
    x1 = torch.zeros(3, 8, dtype=F64)
    x1[:, 1] = 1.0
    x1[:, 4:] = torch.randn(3, 4, dtype=F64)
    ffn(x1).square().sum().backward()
    for i in (0, 2):
        assert all(p.grad is None for p in ffn.experts[i].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ffn.experts[1].parameters())


def test_t5_average_bits():
    """METHODS pQuant T5: p = 0.05 -> 1.35 bits; d = 8, d_ff = 76, r = 4, one expert: p = 4 / 80."""
    assert average_weight_bits(0.05) == pytest.approx(1.35)
    ffn = PQuantFFN(8, 76, 4)
    acc = pquant_weight_bits(ffn)
    assert acc["weights"] == {1: 3 * 8 * 76, 8: 3 * 8 * 4}
    assert acc["high_precision_share"] == pytest.approx(0.05) and acc["average_bits"] == pytest.approx(1.35)
    assert pquant_weight_bits(ffn.deploy())["average_bits"] == pytest.approx(1.35)
    model = torch.nn.ModuleDict({"q_proj": BitLinear(8, 8), "ffn": ffn})  # attention is pure 1-bit
    assert pquant_weight_bits(model)["average_bits"] == pytest.approx(1 + 7 * 96 / (96 + 1824 + 64))


def test_pack_signs_lsb_first_by_hand():
    """Bit k of byte j is column 8j + k, 1 = +1; padding bits 0."""
    row = torch.tensor([[1, -1, -1, 1, -1, -1, -1, -1, 1.0], [-1, -1, -1, -1, -1, -1, -1, 1, -1.0]])
    packed = pack_signs(row)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0b00001001, 1], [0b10000000, 0]]
    assert torch.equal(unpack_signs(packed, 9), row)
    w = torch.randn(5, 37)
    sign, _ = binarize(w)
    assert torch.equal(unpack_signs(pack_signs(sign), 37), sign)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deploy_equals_the_training_forward(dtype):
    """Packed 1-bit + int8 experts (+ BitLinear): the deployed forward equals the training forward bit for
    bit after training steps (the same fp32 ops on the same codes and scales)."""
    torch.manual_seed(0)
    ffn = PQuantFFN(16, 40, 8, n_experts=2, init_std=0.1)
    attn = BitLinear(16, 16, bias=True)
    opt = torch.optim.AdamW(list(ffn.parameters()) + list(attn.parameters()), lr=1e-2)
    x = torch.randn(6, 5, 16)
    for _ in range(3):
        opt.zero_grad()
        (ffn(attn(x)).square().mean() + ffn.aux_loss).backward()
        opt.step()
    assert ffn.alpha.item() != 2.0 and ffn.beta.item() != 0.2
    ffn, attn = ffn.to(dtype), attn.to(dtype)
    d_ffn, d_attn = ffn.deploy(), attn.deploy()
    assert d_attn.qweight.dtype == torch.uint8 and tuple(d_attn.qweight.shape) == (16, 2)
    assert d_ffn.experts[0].gate_proj.qweight.dtype == torch.int8
    assert not any(True for _ in d_ffn.parameters())
    xd = x.to(dtype)
    with torch.no_grad():
        assert torch.equal(d_attn(xd), attn(xd))
        assert torch.equal(d_ffn(xd), ffn(xd))


def test_init_choices():
    ffn = PQuantFFN(8, 16, 4, n_experts=2)
    assert ffn.alpha.item() == 2.0 and ffn.beta.item() == torch.tensor(0.2).item()  # fp32 parameters
    assert ffn.alpha.requires_grad and ffn.beta.requires_grad
    assert ffn.branch_1bit.gate_proj.weight_bits == 1 and ffn.experts[1].down_proj.weight_bits == 8
    assert tuple(ffn.branch_1bit.down_proj.weight.shape) == (8, 16) and tuple(ffn.experts[0].up_proj.weight.shape) == (4, 8)
    assert PQuantFFN(8, 16, 4).router is None
    ffn.to(torch.bfloat16)  # the branch scales and the router stay fp32; latent weights follow the cast
    assert ffn.alpha.dtype == ffn.beta.dtype == ffn.router.weight.dtype == torch.float32
    assert ffn.beta.item() == torch.tensor(0.2).item() and ffn.experts[0].gate_proj.weight.dtype == torch.bfloat16


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="weight_bits must be 1 .binary. or 2..8"):
        pquant_linear(x, w, weight_bits=16)
    with pytest.raises(ValueError, match="act_bits must be None or 2..8"):
        pquant_linear(x, w, act_bits=1)
    with pytest.raises(ValueError, match=r"x must be \[..., in\] = \[..., 4\]"):
        pquant_linear(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match=r"bias must be None or \[out\]"):
        pquant_linear(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="n_experts must be an int >= 1"):
        PQuantFFN(8, 16, 4, n_experts=0)
    with pytest.raises(ValueError, match="weight_bits must be 2..8 for the high-precision branch"):
        PQuantFFN(8, 16, 4, weight_bits=1)
    with pytest.raises(ValueError, match=r"x must be \[..., d_model\]"):
        PQuantFFN(8, 16, 4)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="in_features must be in"):
        unpack_signs(torch.zeros(2, 2, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="p must be a number in"):
        average_weight_bits(1.5)
    with pytest.raises(ValueError, match="model holds no pQuant linear"):
        pquant_weight_bits(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="from_linear needs an nn.Linear"):
        PQuantLinear.from_linear(torch.nn.Conv1d(1, 1, 1))


def _native() -> bool:
    from lrqat_kernels import _ext

    return _ext.load_extension() and hasattr(torch.ops.lrqat, "binary_linear_cpu")


def _cpu_isas():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return ["scalar"] + (["avx2"] if " avx2" in flags and " fma" in flags else []) + (["avx512"] if " avx512f" in flags else [])


native = pytest.mark.skipif(not _native(), reason="lrqat_kernels._C without binary_linear_cpu (rebuild: setup.py build_ext)")


@native
@pytest.mark.parametrize("isa", _cpu_isas())
@pytest.mark.parametrize("M,N,K", [(1, 5, 3), (3, 7, 16), (5, 9, 33), (4, 64, 64), (9, 33, 100), (1, 17, 1000), (6, 3, 31),
                                   (5, 6, 1024), (7, 5, 2100)])
def test_native_binary_gemm_matches_the_dequantised_product(isa, M, N, K):
    """``binary_linear`` (2 * sum_{S=+1} x - sum x, fp32) equals x @ (scale * S)^T + bias in fp64 to fp32 rounding:
    |err| <= 1e-5 * (sum_k |x| * |scale| + |bias|), every ISA, K tails of 1..31, per-tensor and per-row scales."""
    from lrqat_kernels.pquant import binary_linear

    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K, generator=gen)
    sign, lam = binarize(torch.randn(N, K, generator=gen))
    packed = pack_signs(sign)
    for scale in (lam.reshape(1), torch.rand(N, generator=gen) + 0.5):
        for bias in (None, torch.randn(N, generator=gen)):
            want = x.double() @ (sign.double() * scale.double().reshape(-1, 1)).t()
            if bias is not None:
                want = want + bias.double()
            y = binary_linear(x, packed, scale, bias, in_features=K, isa=isa)
            tol = 1e-5 * (x.abs().double().sum(1, keepdim=True) * scale.abs().max() + (0 if bias is None else bias.abs().double()))
            assert y.dtype == torch.float32 and ((y.double() - want).abs() <= tol).all()
    wrong = pack_signs(-sign)
    assert not torch.allclose(binary_linear(x, wrong, lam.reshape(1), in_features=K, isa=isa).double(), x.double() @ (lam * sign).double().t())


@native
def test_native_binary_gemm_in_the_deployed_layer_and_its_errors():
    from lrqat_kernels.pquant import PackedPQuantLinear, binary_linear

    torch.manual_seed(0)
    layer = BitLinear(40, 12, bias=True).deploy()
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    exact = layer(x)
    layer.use_binary_kernel = True
    fast = layer(x)
    assert fast.dtype == torch.bfloat16 and fast.shape == exact.shape
    torch.testing.assert_close(fast.float(), exact.float(), rtol=1e-2, atol=1e-2)  # bf16 output rounding
    assert PackedPQuantLinear.use_binary_kernel is False
    packed, scale = layer.qweight, layer.weight_scale
    with pytest.raises(RuntimeError, match="unknown instruction set 'neon'"):
        binary_linear(torch.randn(2, 40), packed, scale, in_features=40, isa="neon")
    with pytest.raises(RuntimeError, match=r"in_features \(41\) must equal x.size\(1\) = 40"):
        torch.ops.lrqat.binary_linear_cpu(torch.randn(2, 40), packed, scale, None, 41, "auto")
    with pytest.raises(RuntimeError, match="scale must be \\[1\\] or \\[N\\]"):
        binary_linear(torch.randn(2, 40), packed, torch.ones(3), in_features=40)
    torch.library.opcheck(torch.ops.lrqat.binary_linear_cpu, (torch.randn(3, 40), packed, scale, layer.bias.float(), 40, "auto"))


@native
def test_native_binary_gemm_isa_from_the_environment(monkeypatch):
    """``isa="auto"`` reads LRQAT_CPU_ISA: scalar there equals the forced scalar path bit for bit; an unknown name
    is an error naming the variable."""
    from lrqat_kernels.pquant import binary_linear

    x = torch.randn(3, 70)
    sign, lam = binarize(torch.randn(6, 70))
    packed = pack_signs(sign)
    forced = binary_linear(x, packed, lam.reshape(1), in_features=70, isa="scalar")
    monkeypatch.setenv("LRQAT_CPU_ISA", "scalar")
    assert torch.equal(binary_linear(x, packed, lam.reshape(1), in_features=70), forced)
    monkeypatch.setenv("LRQAT_CPU_ISA", "sve")
    with pytest.raises(RuntimeError, match=r"unknown instruction set 'sve' \(LRQAT_CPU_ISA\)"):
        binary_linear(x, packed, lam.reshape(1), in_features=70)


def test_binary_linear_without_the_extension_says_how_to_build(monkeypatch):
    from lrqat_kernels import _ext
    from lrqat_kernels.pquant import binary_linear

    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", "disabled by LRQAT_DISABLE_EXT=1")
    with pytest.raises(RuntimeError, match="binary_linear_cpu needs the compiled extension"):
        binary_linear(torch.randn(2, 8), torch.zeros(3, 1, dtype=torch.uint8), torch.ones(1), in_features=8)
