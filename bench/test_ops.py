"""The training-time fused ops against the eager reference (``lrqat_kernels.reference``).

Per op, shape, mode and device one group (``benchmark.group``); its impls:

    lrqat       the package's op (``lrqat_kernels.<op>``): Triton kernels on CUDA; on CPU its eager
                CPU path, which is what a user gets there (the Triton interpreter is never timed)
    reference   ``lrqat_kernels.reference.<op>``: eager PyTorch, plain autograd (the baseline)
    linear      (lrqat_linear only) ``F.linear`` with a trainable bf16 weight: the layer LR-QAT replaces
    fused_gemm  (lrqat_linear only, CUDA) ``functions.lrqat_linear_fused``: the fused dequant-GEMM path

Layers: bf16 compute, INT4 ``packed_int`` Phi0, rank 32, per-channel fp32 scales, alpha 1.
Activation quantisers: 8-bit asymmetric, per token, bf16. ``fwd`` runs with autograd recording
(what a training forward pays); ``fwd+bwd`` adds the backward of a random output gradient.
Each case first checks that its impl computes the reference's result (``check_same_product``).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _common import check_same_product, lrqat_layer, time_case, zero_grads

import lrqat_kernels as lk
from lrqat_kernels import reference

DTYPE = torch.bfloat16
BITS, PHI_FORMAT, RANK, ALPHA = 4, "packed_int", 32, 1.0
ACT_BITS, EPS = 8, 1e-5
MODES = ("fwd", "fwd+bwd")
RUNS = {"cpu": "eager CPU path (the Triton kernels run on CUDA)", "cuda": "Triton kernels"}


@pytest.fixture(autouse=True)
def _not_interpreted(device):
    """On CPU the Triton interpreter would run the kernels: a correctness tool, not a timing."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip("TRITON_INTERPRET is set: the fused ops would run interpreted kernels (not a timing)")


def _layer_kw() -> dict:
    return dict(bits=BITS, phi_format=PHI_FORMAT, alpha=ALPHA, group_size=None)


def _layer_info(name, out, inn) -> dict:
    return dict(shape=name, out_features=out, in_features=inn, dtype="bf16", bits=BITS, phi_format=PHI_FORMAT,
                rank=RANK, group_size="channel")


def _runs(impl: str, device: str) -> str:
    return RUNS[device] if impl == "lrqat" else "eager reference" if impl == "reference" else impl


def _step(fn, mode, grad_out, params):
    """``fn`` itself for fwd; for fwd+bwd a call that clears ``params``' grads, runs and backpropagates."""
    if mode == "fwd":
        return fn

    def fwd_bwd():
        zero_grads(*params)
        fn().backward(grad_out)

    return fwd_bwd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["lrqat", "reference"])
def test_fake_quant_weight(benchmark, device, linear_shape, mode, impl):
    name, out, inn = linear_shape
    lay = lrqat_layer(out, inn, rank=RANK, bits=BITS, phi_format=PHI_FORMAT, group_size=None, dtype=DTYPE,
                      device=device)
    args, kw = (lay["phi"], lay["lora_A"], lay["lora_B"], lay["scale"]), _layer_kw()
    op = {"lrqat": lk.fake_quant_weight, "reference": reference.fake_quant_weight}[impl]
    if impl != "reference":
        check_same_product(op(*args, **kw), reference.fake_quant_weight(*args, **kw), f"fake_quant_weight[{impl}]")
    grad_out = torch.randn(out, inn, dtype=DTYPE, device=device)
    fn = _step(lambda: op(*args, **kw), mode, grad_out, args[1:])
    time_case(benchmark, fn, device=device, group=f"fake_quant_weight {mode} {out}x{inn} {device}",
              baselines=("reference",), op="fake_quant_weight", impl=impl, mode=mode, runs=_runs(impl, device),
              **_layer_info(name, out, inn))


def _fused_gemm():
    try:
        from lrqat_kernels.functions import lrqat_linear_fused
    except ImportError as exc:
        pytest.skip(f"lrqat_linear_fused is not importable: {exc}")
    return lrqat_linear_fused


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["lrqat", "reference", "linear", "fused_gemm"])
def test_lrqat_linear(benchmark, device, linear_shape, tokens, mode, impl):
    name, out, inn = linear_shape
    if impl == "fused_gemm" and device != "cuda":
        pytest.skip("the fused dequant-GEMM path is Triton (CUDA); on CPU it is lrqat_linear's eager path (impl=lrqat)")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, inn, generator=gen).to(DTYPE).to(device).requires_grad_()
    bias = torch.zeros(out, dtype=DTYPE, device=device, requires_grad=True)
    grad_out = torch.randn(tokens, out, generator=gen).to(DTYPE).to(device)
    if impl == "linear":
        weight = (torch.randn(out, inn, generator=gen) / inn**0.5).to(DTYPE).to(device).requires_grad_()
        params = (x, weight, bias)

        def fn():
            return F.linear(x, weight, bias)
    else:
        lay = lrqat_layer(out, inn, rank=RANK, bits=BITS, phi_format=PHI_FORMAT, group_size=None, dtype=DTYPE,
                          device=device)
        args, kw = (x, lay["phi"], lay["lora_A"], lay["lora_B"], lay["scale"], bias), _layer_kw()
        params = (x, lay["lora_A"], lay["lora_B"], lay["scale"], bias)
        op = {"lrqat": lk.lrqat_linear, "reference": reference.lrqat_linear, "fused_gemm": None}[impl] or _fused_gemm()
        if impl != "reference":
            check_same_product(op(*args, **kw), reference.lrqat_linear(*args, **kw), f"lrqat_linear[{impl}]")

        def fn():
            return op(*args, **kw)

    time_case(benchmark, _step(fn, mode, grad_out, params), device=device,
              group=f"lrqat_linear {mode} {out}x{inn} T={tokens} {device}", baselines=("reference", "linear"),
              op="lrqat_linear", impl=impl, mode=mode, tokens=tokens, runs=_runs(impl, device),
              **_layer_info(name, out, inn))


@pytest.mark.parametrize("impl", ["lrqat", "reference"])
def test_merge_weight(benchmark, device, linear_shape, impl):
    name, out, inn = linear_shape
    lay = lrqat_layer(out, inn, rank=RANK, bits=BITS, phi_format=PHI_FORMAT, group_size=None, dtype=DTYPE,
                      device=device)
    args, kw = (lay["phi"], lay["lora_A"], lay["lora_B"], lay["scale"]), _layer_kw()
    op = {"lrqat": lk.merge_weight, "reference": reference.merge_weight}[impl]
    if impl != "reference" and not torch.equal(op(*args, **kw)[0], reference.merge_weight(*args, **kw)[0]):
        raise AssertionError(f"merge_weight[{impl}]: W_int differs from the reference's")
    time_case(benchmark, lambda: op(*args, **kw), device=device, group=f"merge_weight {out}x{inn} {device}",
              baselines=("reference",), op="merge_weight", impl=impl, mode="fwd", runs=_runs(impl, device),
              **_layer_info(name, out, inn))


def _act_case(benchmark, device, op_name, impl, mode, inputs, ours, ref, shape):
    """Time an activation quantiser: ``ours`` / ``ref`` take ``inputs`` (which require grad)."""
    op = {"lrqat": ours, "reference": ref}[impl]
    if impl != "reference":
        check_same_product(op(*inputs), ref(*inputs), f"{op_name}[{impl}]")
    tokens, width = shape
    grad_out = torch.randn(tokens, width, generator=torch.Generator().manual_seed(2)).to(DTYPE).to(device)
    time_case(benchmark, _step(lambda: op(*inputs), mode, grad_out, inputs), device=device,
              group=f"{op_name} {mode} {tokens}x{width} {device}", baselines=("reference",), op=op_name, impl=impl,
              mode=mode, tokens=tokens, width=width, dtype="bf16", act_bits=ACT_BITS, symmetric=False,
              runs=_runs(impl, device))


def _act(tokens, width, device, seed=0):
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))
    return x.to(DTYPE).to(device).requires_grad_()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["lrqat", "reference"])
def test_fake_quant_activation(benchmark, device, act_shape, mode, impl):
    tokens, width = act_shape
    _act_case(benchmark, device, "fake_quant_activation", impl, mode, (_act(tokens, width, device),),
              lambda x: lk.fake_quant_activation(x, ACT_BITS, False),
              lambda x: reference.fake_quant_activation(x, ACT_BITS, False), act_shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["lrqat", "reference"])
def test_rms_norm_fake_quant(benchmark, device, norm_shape, mode, impl):
    """RMSNorm (frozen weight) with the quantiser of its consumers' input."""
    tokens, width = norm_shape
    weight = (torch.rand(width, generator=torch.Generator().manual_seed(3)) + 0.5).to(DTYPE).to(device)
    _act_case(benchmark, device, "rms_norm_fake_quant", impl, mode, (_act(tokens, width, device),),
              lambda x: lk.rms_norm_fake_quant(x, weight, EPS, ACT_BITS, False),
              lambda x: reference.rms_norm_fake_quant(x, weight, EPS, ACT_BITS, False), norm_shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["lrqat", "reference"])
def test_swiglu_fake_quant(benchmark, device, mlp_shape, mode, impl):
    """``silu(gate) * up`` with the quantiser of down_proj's input."""
    tokens, width = mlp_shape
    up = _act(tokens, width, device, seed=4)
    _act_case(benchmark, device, "swiglu_fake_quant", impl, mode, (_act(tokens, width, device), up),
              lambda g, u: lk.swiglu_fake_quant(g, u, ACT_BITS, False),
              lambda g, u: reference.swiglu_fake_quant(g, u, ACT_BITS, False), mlp_shape)
