"""LRQATLinear / QuantizedLinear: initialisation, forward, gradients, dtypes, fusion, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrqat_kernels
from lrqat_kernels import LRQATConfig, LRQATLinear, QuantizedLinear
from lrqat_kernels.formats import decode_phi, encode_phi, qrange, unpack_nibbles
from lrqat_kernels.init import estimate_scale
from lrqat_kernels.reference import expand_groups, lowrank_product, quantize_z
from lrqat_kernels.ops._launch import use_kernels


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """Model-level tests run the eager CPU path, fast. tests/conftest.py turns the Triton
    interpreter on for the kernel tests; the environment is left alone (Triton reads it when
    kernels are defined), only the dispatcher's choice is switched off here."""
    with use_kernels(False):
        yield


def _linear(out_f=24, in_f=32, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin.to(dtype)


def _w_int_reference(layer: LRQATLinear) -> torch.Tensor:
    """W_int recomputed from the layer's tensors by the eager reference path (NUMERICS 'Forward')."""
    z = decode_phi(layer.phi, layer.bits, layer.phi_format) + lowrank_product(layer.lora_A.detach(), layer.lora_B.detach(), layer.alpha)
    return quantize_z(z, layer.bits)[0].to(torch.int8)


def _perturb(layer: LRQATLinear, seed=1, amount=0.8):
    """Give lora_B a non-zero value so C moves Z across rounding boundaries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b = torch.randn(layer.lora_B.shape, generator=g) * amount * layer.rank / layer.alpha
        layer.lora_B.copy_(b.to(layer.lora_B.dtype))
        layer.scale.mul_(1 + 0.01 * torch.randn(layer.scale.shape, generator=g))


CASES = [
    pytest.param(dict(phi_format="fixed_point", bits=4), id="q4.4-pc"),
    pytest.param(dict(phi_format="fixed_point", bits=3, group_size=8), id="q3.5-g8"),
    pytest.param(dict(phi_format="packed_int", bits=4), id="int4packed-pc"),
    pytest.param(dict(phi_format="packed_int", bits=2, symmetric=False, group_size=16), id="int2packed-g16-asym"),
    pytest.param(dict(phi_format="bf16", bits=4, symmetric=False), id="bf16-pc-asym"),
    pytest.param(dict(phi_format="fp32", bits=8), id="fp32-w8"),
]


@pytest.mark.parametrize("kw", CASES)
def test_from_linear_initialisation(kw):
    lin = _linear()
    cfg = LRQATConfig(rank=4, range_method="minmax", **kw)
    layer = LRQATLinear.from_linear(lin, cfg)
    g = cfg.group_size or lin.in_features
    if cfg.symmetric:
        s0, z = estimate_scale(lin.weight, cfg.bits, "minmax", cfg.group_size), None
    else:
        s0, z = estimate_scale(lin.weight, cfg.bits, "minmax", cfg.group_size, symmetric=False)
    x = lin.weight.float() / expand_groups(s0, g) + (0 if z is None else expand_groups(z, g))
    assert torch.equal(layer.phi, encode_phi(x, cfg.bits, cfg.phi_format))
    assert torch.equal(layer.scale.detach(), s0) and layer.scale.dtype == torch.float32
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (24, 4)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / 32**0.5
    if z is None:
        assert layer.zero_point is None
    else:
        assert layer.zero_point.dtype == torch.int8 and torch.equal(layer.zero_point.float(), z)
    assert torch.equal(layer.bias, lin.bias) and not layer.bias.requires_grad


@pytest.mark.parametrize("kw", CASES)
def test_forward_matches_reference_and_rtn_at_init(kw):
    lin = _linear()
    layer = LRQATLinear.from_linear(lin, LRQATConfig(rank=4, range_method="minmax", **kw))
    x = torch.randn(3, 5, 32)
    y = layer(x)
    ref = lrqat_kernels.reference.lrqat_linear(
        x, layer.phi, layer.lora_A, layer.lora_B, layer.scale, layer.bias, bits=layer.bits, phi_format=layer.phi_format,
        alpha=layer.alpha, zero_point=layer.zero_point, group_size=layer.group_size,
    )
    assert y.shape == (3, 5, 24) and torch.equal(y, ref)
    # At init W_hat is (double-rounded) RTN of W0: close to the FP layer.
    assert (layer.fake_quant_weight() - lin.weight).abs().max() <= layer.scale.max() * 1.01


@pytest.mark.parametrize("kw", CASES)
def test_gradients_only_reach_trainables(kw):
    layer = LRQATLinear.from_linear(_linear(), LRQATConfig(rank=4, range_method="minmax", **kw))
    _perturb(layer)
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).square().sum().backward()
    for t in (layer.lora_A, layer.lora_B, layer.scale, x):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0
    assert layer.bias.grad is None
    assert not layer.phi.requires_grad


def test_scale_and_phi_keep_dtype_under_model_casts():
    layer = LRQATLinear.from_linear(_linear(), LRQATConfig(rank=4, phi_format="fp32", bits=4))
    s = layer.scale.detach().clone()
    phi = layer.phi.clone()
    layer.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale.detach(), s)  # exact, no bf16 round trip
    assert layer.phi.dtype == torch.float32 and torch.equal(layer.phi, phi)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    layer.half()
    assert layer.scale.dtype == torch.float32 and layer.lora_B.dtype == torch.float32  # factor_dtype
    seq = nn.Sequential(layer).to(torch.bfloat16)
    assert seq[0].scale.dtype == torch.float32 and isinstance(seq[0].scale, nn.Parameter)
    assert seq[0].scale.requires_grad
    q = QuantizedLinear.from_lrqat(layer).to(torch.bfloat16)
    assert q.scale.dtype == torch.float32 and q.qweight.dtype == torch.uint8


def test_bf16_compute_dtype_and_tiny_scale_updates_survive():
    lin = _linear()
    layer = LRQATLinear.from_linear(lin, LRQATConfig(rank=4, compute_dtype="bfloat16"))
    assert layer.lora_A.dtype == torch.bfloat16 and layer.scale.dtype == torch.float32
    before = layer.scale.detach().clone()
    opt = torch.optim.AdamW([layer.scale], lr=1e-5)
    layer(torch.randn(8, 32, dtype=torch.bfloat16)).float().square().sum().backward()
    opt.step()
    assert not torch.equal(layer.scale.detach(), before)  # a bf16 scale would not move by 1e-5


def test_fp16_compute_keeps_fp32_factors():
    """Under fp16 the factors are fp32 master weights (AdamW on fp16 factors made lora_A NaN at
    the first step: eps = 1e-8 is 0 in fp16 and dlora_A = 0 at LoRA init); activations, W_hat,
    bias and output stay fp16; a .half() cast keeps them fp32, a bf16 cast casts them."""
    layer = LRQATLinear.from_linear(_linear(), LRQATConfig(rank=4, compute_dtype="float16"))
    assert (layer.lora_A.dtype, layer.lora_B.dtype, layer.bias.dtype) == (torch.float32, torch.float32, torch.float16)
    assert LRQATLinear(32, 16, rank=4, dtype=torch.float16).lora_A.dtype == torch.float32
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    y = layer(torch.randn(8, 32, dtype=torch.float16))
    assert y.dtype == torch.float16
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B, layer.scale], lr=1e-3)
    with torch.no_grad():
        layer.lora_B.zero_()  # LoRA init: dlora_A = 0
    layer(torch.randn(8, 32, dtype=torch.float16)).float().square().sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in (layer.lora_A, layer.lora_B, layer.scale))
    layer.half()
    assert layer.lora_A.dtype == torch.float32 and layer.bias.dtype == torch.float16
    layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.scale.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kw", CASES)
def test_fusion_is_bit_exact(kw, dtype):
    layer = LRQATLinear.from_linear(_linear(), LRQATConfig(rank=4, range_method="minmax", **kw)).to(dtype)
    _perturb(layer)
    q = QuantizedLinear.from_lrqat(layer)
    w_ref = _w_int_reference(layer)
    assert q.w_int.dtype == torch.int8 and torch.equal(q.w_int, w_ref)
    w_merge, s, zp = layer.merge()
    assert torch.equal(w_merge, w_ref)
    x = torch.randn(2, 7, 32, dtype=dtype)
    y_train = layer(x)
    q.use_int4_kernel = False  # exact dequantise path: the same ops as the eager training forward
    assert torch.equal(q(x), y_train)
    q.use_int4_kernel = True  # deployment GEMM when available: fp32 sums in another order
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(q(x), y_train, **tol)
    qmin, qmax = qrange(layer.bits)
    assert int(q.w_int.min()) >= qmin and int(q.w_int.max()) <= qmax
    if layer.bits <= 4:
        assert q.packed and q.qweight.dtype == torch.uint8 and q.qweight.shape == (24, 16)
        assert torch.equal(unpack_nibbles(q.qweight), w_ref)
    else:
        assert not q.packed and q.qweight.dtype == torch.int8


def test_quantized_from_int_and_dequantize():
    torch.manual_seed(0)
    w = torch.randint(-8, 8, (6, 8), dtype=torch.int8)
    s = torch.rand(6, 2) + 0.1
    zp = torch.randint(-2, 3, (6, 2)).float()
    b = torch.randn(6)
    q = QuantizedLinear.from_int(w, s, zp, group_size=4, bias=b, bits=4)
    assert q.packed and q.qweight.shape == (6, 4) and torch.equal(q.w_int, w)
    want = s.repeat_interleave(4, 1) * (w.float() - zp.repeat_interleave(4, 1))
    assert torch.equal(q.dequantize(), want)
    x = torch.randn(3, 8)
    assert torch.allclose(q(x), x @ want.T + b, atol=1e-5)
    lin = q.to_linear()
    assert torch.equal(lin.weight, want)
    # int8 storage: bits > 4, or an odd in.
    q8 = QuantizedLinear.from_int(torch.randint(-128, 128, (4, 6), dtype=torch.int8), torch.ones(4, 1), bits=8)
    assert not q8.packed and q8.qweight.dtype == torch.int8
    q_odd = QuantizedLinear.from_int(torch.randint(-4, 4, (4, 5), dtype=torch.int8), torch.ones(4, 1), bits=3)
    assert not q_odd.packed and q_odd.w_int.shape == (4, 5)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(w_int=torch.zeros(4, 8)), TypeError, "integer dtype"),
        (dict(w_int=torch.full((4, 8), 8, dtype=torch.int8)), ValueError, "grid"),
        (dict(w_int=torch.zeros(4, 8, 2, dtype=torch.int8)), ValueError, "2-D"),
        (dict(scale=torch.ones(4, 2)), ValueError, "scale must be"),
        (dict(scale=torch.ones(4, 1, dtype=torch.int32)), TypeError, "floating-point"),
        (dict(scale=torch.full((4, 1), float("nan"))), ValueError, "non-finite"),
        (dict(group_size=3), ValueError, "divide"),
        (dict(zero_point=torch.full((4, 1), 9.0)), ValueError, "zero_point values"),
        (dict(zero_point=torch.full((4, 1), 0.5)), ValueError, "integers"),
        (dict(bias=torch.ones(5)), ValueError, "bias must be"),
        (dict(bits=9), ValueError, "bits"),
    ],
    ids=["float-w", "off-grid", "3d", "scale-shape", "scale-dtype", "scale-nan", "group", "zp-range", "zp-frac", "bias", "bits"],
)
def test_from_int_validation(kwargs, err, match):
    args = dict(w_int=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(4, 1), zero_point=None, group_size=None, bias=None, bits=4)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        QuantizedLinear.from_int(**args)


def test_int4_linear_hook_used_when_present(monkeypatch):
    layer = LRQATLinear.from_linear(_linear(), LRQATConfig(rank=4))
    q = layer.to_quantized()
    calls = []

    def fake_int4_linear(x, qweight, scale, zero_point=None, group_size=None, bias=None, *, bits=None):
        calls.append((qweight.dtype, tuple(qweight.shape), bits, group_size))
        return torch.zeros(*x.shape[:-1], scale.shape[0])

    monkeypatch.setattr("lrqat_kernels.ops.int4_linear.int4_linear", fake_int4_linear)  # where layers look it up
    y = q(torch.randn(2, 32))
    assert calls == [(torch.uint8, (24, 16), 4, None)] and torch.count_nonzero(y) == 0


def test_module_ops_are_looked_up_at_call_time(monkeypatch):
    """Modules look the op up at call time (lrqat_kernels.functions, else the package attribute)."""
    layer = LRQATLinear.from_linear(_linear(), LRQATConfig(rank=4))
    seen = []
    real = lrqat_kernels.lrqat_linear

    def spy(*a, **k):
        seen.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lrqat_kernels, "lrqat_linear", spy)
    if hasattr(lrqat_kernels, "functions"):
        monkeypatch.setattr(lrqat_kernels.functions, "lrqat_linear", spy)
    layer(torch.randn(2, 32))
    assert seen


def test_svd_init_captures_fraction_for_packed_int():
    lin = _linear(out_f=32, in_f=32)
    plain = LRQATLinear.from_linear(lin, LRQATConfig(rank=8, phi_format="packed_int", bits=3, range_method="minmax"))
    svd = LRQATLinear.from_linear(lin, LRQATConfig(rank=8, phi_format="packed_int", bits=3, init="svd", svd_steps=2, range_method="minmax"))
    target = lin.weight.detach() / svd.scale.detach()
    z_plain = decode_phi(plain.phi, 3, "packed_int")
    z_svd = decode_phi(svd.phi, 3, "packed_int") + lowrank_product(svd.lora_A.detach(), svd.lora_B.detach(), svd.alpha)
    assert (z_svd - target).norm() < (z_plain - target).norm()
    with pytest.raises(ValueError, match="rank <= min"):
        LRQATLinear.from_linear(_linear(out_f=4, in_f=32), LRQATConfig(rank=8, init="svd"))


def test_structural_constructor_and_state_dict_keys():
    layer = LRQATLinear(32, 24, bits=4, rank=4, phi_format="packed_int", group_size=8, symmetric=False)
    assert set(layer.state_dict()) == {"phi", "lora_A", "lora_B", "scale", "zero_point", "bias"}
    assert layer.phi.shape == (24, 16) and layer.scale.shape == (24, 4)
    q = QuantizedLinear(32, 24, bits=4, bias=False)
    assert set(q.state_dict()) == {"qweight", "scale"}
    with pytest.raises(ValueError, match="even"):
        LRQATLinear(31, 8, phi_format="packed_int")
    with pytest.raises(ValueError, match="divide"):
        LRQATLinear(32, 8, group_size=5)
    with pytest.raises(TypeError, match="nn.Linear"):
        LRQATLinear.from_linear(nn.Conv1d(3, 3, 1), LRQATConfig())
    bad = _linear()
    with torch.no_grad():
        bad.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        LRQATLinear.from_linear(bad, LRQATConfig(), name="blk.q")


def test_lrqat_linear_saves_only_its_inputs():
    """With the fused dispatcher, autograd keeps exactly x, phi, lora_A, lora_B, scale for backward
    (no W_hat, Z, W_int or mask); the eager reference keeps weight-sized intermediates."""
    layer = LRQATLinear.from_linear(_linear(), LRQATConfig(rank=4))
    _perturb(layer)
    x = torch.randn(5, 32, requires_grad=True)

    def saved_storages(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn()
        return y, {t.untyped_storage().data_ptr() for t in saved}, saved

    y, ptrs, _ = saved_storages(lambda: layer(x))
    want = {t.untyped_storage().data_ptr() for t in (x, layer.phi, layer.lora_A, layer.lora_B, layer.scale)}
    if not hasattr(lrqat_kernels, "functions"):
        pytest.skip("the fused dispatcher (lrqat_kernels.functions) is not installed")
    assert ptrs == want
    q = layer._qargs()
    y_ref, ptrs_ref, saved_ref = saved_storages(
        lambda: lrqat_kernels.reference.lrqat_linear(x, layer.phi, layer.lora_A, layer.lora_B, layer.scale, layer.bias, **q)
    )
    assert sum(t.numel() * t.element_size() for t in saved_ref) > 3 * layer.phi.numel()  # weight-sized saves
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B, layer.scale), g)
    grads_ref = torch.autograd.grad(y_ref, (x, layer.lora_A, layer.lora_B, layer.scale), g)
    assert torch.equal(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_merge_matches_the_kernel_forward_under_triton_interpreter(monkeypatch):
    """With the Triton path active (CUDA, or TRITON_INTERPRET=1 on CPU), merge_weight's W_int is the
    one the forward kernel used: recover it from the forward's fp32 W_hat and compare bit for bit."""
    import os

    pytest.importorskip("triton")
    functions = pytest.importorskip("lrqat_kernels.functions")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 from the start of the session (tests/conftest.py sets it without CUDA)")
    monkeypatch.setattr(functions, "_interpreting", lambda: True)
    layer = LRQATLinear.from_linear(_linear(out_f=16, in_f=32), LRQATConfig(rank=4, bits=3, group_size=16, symmetric=False))
    _perturb(layer)
    if not functions.uses_kernels(layer.phi, layer.lora_A, layer.scale):
        pytest.skip("the Triton kernels do not run here")
    with torch.no_grad():
        w_hat = layer.fake_quant_weight()
    s = expand_groups(layer.scale.detach(), 16)
    w_from_forward = torch.round(w_hat / s + expand_groups(layer.zero_point.float(), 16)).to(torch.int8)
    q = QuantizedLinear.from_lrqat(layer)
    assert torch.equal(q.w_int, w_from_forward)


def test_memory_bench_quick(tmp_path, capsys):
    """bench/bench_memory.py runs (scaled-down shapes) and accounts what it should."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_memory.py")
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    csv_path = tmp_path / "mem.csv"
    rows = bm.main(["--quick", "--seq", "128", "--csv", str(csv_path)])
    assert csv_path.exists() and len(rows) == 8
    key = {(r["phi_format"], r["lrqat_linear"], r["layer_checkpointing"]): r for r in rows}
    cur, ref = key[("fixed_point", "current", False)], key[("fixed_point", "reference", False)]
    assert cur["per_layer_saved_bytes"] < ref["per_layer_saved_bytes"]
    assert key[("packed_int", "current", False)]["weights_bytes"] < cur["weights_bytes"]
    assert key[("fixed_point", "current", True)]["activations_bytes"] < cur["activations_bytes"]
    for r in rows:
        assert 2 * r["trainable_bytes"] <= r["optimizer_bytes"] <= 6 * r["trainable_bytes"]  # 8 B per fp32 (4 B) param, 12 B per bf16 (2 B) one: two fp32 states + its fp32 master
    assert "TOTAL" in capsys.readouterr().out


@pytest.mark.parametrize("group_size", [None, 16])
def test_gradients_flow_through_a_quantized_linear(group_size):
    """The INT4 kernel path has no autograd: the gradient of a trainable layer in front of a
    converted one was dropped (None) with only a torch warning; it now takes the dequantise path."""
    torch.manual_seed(0)
    front = nn.Linear(32, 32)
    q = QuantizedLinear.from_lrqat(LRQATLinear.from_linear(_linear(out_f=16, in_f=32), LRQATConfig(rank=4, group_size=group_size)))
    x = torch.randn(5, 32)
    q(front(x)).square().sum().backward()
    want = torch.autograd.grad(F.linear(front(x), q.dequantize(), q.bias).square().sum(), front.weight)[0]
    assert front.weight.grad is not None
    torch.testing.assert_close(front.weight.grad, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference keeps the INT4 kernel
        assert q._kernel(x) is not None or not q.packed
