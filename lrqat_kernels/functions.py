"""Autograd functions, ``torch.library`` ops and the public dispatchers of the fused LR-QAT path.

Layers (STYLE.md: kernel -> launcher -> autograd Function -> functional):

* ``ops/fake_quant.py``, ``ops/fused_linear.py``: Triton kernels and launchers.
* ``torch.ops.lrqat.*`` (this module): ``torch.library.custom_op`` ops with fake impls, so
  ``torch.compile(fullgraph=True)`` traces through them. Each op picks its implementation per
  call: the Triton launcher on CUDA (and on CPU when ``TRITON_INTERPRET=1``, which is how CI
  runs the kernels), else eager PyTorch that follows ``reference.py`` op for op (CPU; fp64 for
  ``gradcheck``; ranks above ``MAX_RANK``).
* :class:`FakeQuantWeightFunction`, :class:`LRQATLinearFunction`: autograd that saves only the
  inputs and recomputes everything else in the backward.
* :func:`fake_quant_weight`, :func:`lrqat_linear`, :func:`merge_weight`: the same signatures and
  semantics as their ``reference.py`` namesakes (``lrqat_kernels.<name>`` is these).

Ops (namespace ``lrqat``; the C++ ops of ``csrc/registration.cpp`` share it: Python
``custom_op`` registers through a library *fragment*, which coexists with the one
``TORCH_LIBRARY(lrqat, m)`` in either import order):

=============================== ==================================================================
``fake_quant_fwd``              ``W_hat`` ``[out, in]`` (differentiable: ``register_autograd``)
``fake_quant_w_int``            int8 ``W_int`` and the NaN count (merge)
``fake_quant_bwd``              ``(dA, dB, ds)`` from ``G = dL/dW_hat``
``fused_linear_fwd``            ``y = x W_hat^T + b`` with no ``W_hat`` in memory
``fused_linear_dx``             ``dx = dy W_hat`` with no ``W_hat`` in memory
``fused_linear_param_grads``    ``(dA, dB, ds)`` from ``dy``, ``x`` with no ``G`` in memory
=============================== ==================================================================

Environment:
    LRQAT_FUSED_GEMM=1   :func:`lrqat_linear` takes the fused dequant-GEMM path
                         (``ops/fused_linear.py``: no weight-sized tensor in forward or backward;
                         meant for small token counts; not chosen automatically because its
                         speed crossover has not been measured on a GPU yet).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference
from ._checks import check_fake_quant_args, check_linear_args
from .formats import decode_phi
from .ops._launch import interpreting as _interpreting  # a module attribute: tests patch it

__all__ = [
    "FakeQuantWeightFunction",
    "LRQATLinearFunction",
    "fake_quant_weight",
    "lrqat_linear",
    "lrqat_linear_fused",
    "merge_weight",
    "uses_kernels",
    "fused_gemm_enabled",
]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FUSED_ENV = "LRQAT_FUSED_GEMM"


# ----------------------------------------------------------------------------------------------
# Which implementation runs
# ----------------------------------------------------------------------------------------------


def _max_rank() -> int:
    from .ops.fake_quant import MAX_RANK

    return MAX_RANK


def uses_kernels(phi: torch.Tensor, lora_A: torch.Tensor, scale: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Whether the Triton kernels (rather than eager PyTorch) compute for these inputs.

    True on CUDA, and on CPU under ``TRITON_INTERPRET=1``, when every float involved is
    fp32/bf16/fp16 (fp64 is for ``gradcheck``: eager), the scale is fp32, the rank is at most
    ``MAX_RANK`` and the weight is not empty.
    """
    device = phi.device
    if not (device.type == "cuda" or (device.type == "cpu" and _interpreting())):
        return False
    if lora_A.dtype not in _KERNEL_DTYPES or scale.dtype != torch.float32:
        return False
    if any(d not in _KERNEL_DTYPES for d in dtypes):
        return False
    if phi.numel() == 0 or lora_A.shape[1] == 0 or lora_A.shape[0] > _max_rank():
        return False
    return True


def _fused_gemm_kernels(phi, lora_A, scale, *acts: torch.Tensor) -> bool:
    """The fused dequant-GEMM kernels take 16-bit activations only: with fp32 ones their GEMMs
    would be CUDA-core FMA loops (and their tiles spill); those run the unfused kernels instead."""
    return uses_kernels(phi, lora_A, scale, *(a.dtype for a in acts)) and all(
        a.dtype in (torch.bfloat16, torch.float16) for a in acts)


def fused_gemm_enabled() -> bool:
    """``LRQAT_FUSED_GEMM=1``: :func:`lrqat_linear` uses the fused dequant-GEMM path."""
    return os.environ.get(_FUSED_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _group_size_of(lora_A: torch.Tensor, scale: torch.Tensor) -> int | None:
    """The ``group_size`` argument the reference takes, from the scale's shape."""
    n_groups = scale.shape[1]
    return None if n_groups == 1 else lora_A.shape[1] // n_groups


# ----------------------------------------------------------------------------------------------
# Eager implementations (reference.py, op for op): CPU, fp64 and fallbacks
# ----------------------------------------------------------------------------------------------


def _eager_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    """``(Z, W_int, M, compute dtype)`` as ``reference._w_int_and_dequant`` computes them."""
    cdt = reference._compute_dtype(lora_A, scale)
    z = decode_phi(phi, bits, phi_format).to(cdt) + reference.lowrank_product(lora_A, lora_B, alpha, cdt)
    w_int, mask = reference.quantize_z(z, bits)  # the reference's rounding rule (no graph here)
    return z, w_int, mask, cdt


def _eager_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype):
    with torch.no_grad():
        return reference.fake_quant_weight(
            phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
            zero_point=zero_point, group_size=_group_size_of(lora_A, scale), out_dtype=out_dtype,
        )


def _eager_bwd(grad, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    """The reference's autograd, written out (NUMERICS "Backward"):

    ``dZ = s G M``, ``dB = (alpha/r dZ) A^T``, ``dA = B^T (alpha/r dZ)``, ``ds = sum_group G (W_int - z)``.
    """
    _, w_int, mask, cdt = _eager_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)
    g = lora_A.shape[1] // scale.shape[1]
    s = reference.expand_groups(scale.to(cdt), g)
    gf = grad.to(cdt)
    dz = torch.where(mask, s * gf, torch.zeros((), dtype=cdt, device=gf.device)) * (alpha / lora_A.shape[0])
    centered = w_int if zero_point is None else w_int - reference.expand_groups(zero_point.to(cdt), g)
    d_s = (gf * centered).reshape(gf.shape[0], scale.shape[1], g).sum(-1)
    with reference.no_autocast(dz):  # the factor gradients in the compute dtype, as the kernels give them
        d_b = dz @ lora_A.to(cdt).T
        d_a = lora_B.to(cdt).T @ dz
    return d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_s.to(scale.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("lrqat::fake_quant_fwd", mutates_args=())
def _fake_quant_fwd(
    phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``W_hat`` ``[out, in]`` in ``out_dtype``; the group size is ``in // scale.shape[1]``."""
    if uses_kernels(phi, lora_A, scale, out_dtype):
        from .ops.fake_quant import fake_quant_forward

        return fake_quant_forward(phi, lora_A, lora_B, scale, zero_point, bits=bits, phi_format=phi_format,
                                  alpha=alpha, out_dtype=out_dtype)
    return _eager_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)


@_fake_quant_fwd.register_fake
def _(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype):
    return phi.new_empty((phi.shape[0], lora_A.shape[1]), dtype=out_dtype)


@torch.library.custom_op("lrqat::fake_quant_w_int", mutates_args=())
def _fake_quant_w_int(
    phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_int int8 [out, in], NaN count int64 [])``: the forward's integers (NaN written as 0)."""
    if uses_kernels(phi, lora_A, scale):
        from .ops.fake_quant import fake_quant_forward

        w_int, n_nan = fake_quant_forward(phi, lora_A, lora_B, scale, zero_point, bits=bits, phi_format=phi_format,
                                          alpha=alpha, out_dtype=torch.float32, write_int=True)
        return w_int, torch.tensor(n_nan, dtype=torch.int64, device=phi.device)
    with torch.no_grad():
        _, w_int, _, _ = _eager_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)
    nan = torch.isnan(w_int)
    return torch.where(nan, 0, w_int).to(torch.int8), nan.sum()


@_fake_quant_w_int.register_fake
def _(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return (phi.new_empty((phi.shape[0], lora_A.shape[1]), dtype=torch.int8),
            phi.new_empty((), dtype=torch.int64))


@torch.library.custom_op("lrqat::fake_quant_bwd", mutates_args=())
def _fake_quant_bwd(
    grad: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dlora_A, dL/dlora_B, dL/dscale)`` from ``grad = dL/dW_hat`` ``[out, in]``."""
    if uses_kernels(phi, lora_A, scale, grad.dtype):
        from .ops.fake_quant import fake_quant_backward

        return fake_quant_backward(grad, phi, lora_A, lora_B, scale, zero_point, bits=bits,
                                   phi_format=phi_format, alpha=alpha)
    return _eager_bwd(grad, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)


@_fake_quant_bwd.register_fake
def _(grad, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(scale)


def _fake_quant_fwd_setup_context(ctx, inputs, output):
    phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype = inputs
    ctx.save_for_backward(phi, lora_A, lora_B, scale, zero_point)
    ctx.meta = (bits, phi_format, alpha)


def _fake_quant_fwd_backward(ctx, grad):
    phi, lora_A, lora_B, scale, zero_point = ctx.saved_tensors
    bits, phi_format, alpha = ctx.meta
    d_a, d_b, d_s = torch.ops.lrqat.fake_quant_bwd(grad.contiguous(), phi, lora_A, lora_B, scale, zero_point,
                                                   bits, phi_format, alpha)
    return None, d_a, d_b, d_s, None, None, None, None, None


_fake_quant_fwd.register_autograd(_fake_quant_fwd_backward, setup_context=_fake_quant_fwd_setup_context)


@torch.library.custom_op("lrqat::fused_linear_fwd", mutates_args=())
def _fused_linear_fwd(
    x2d: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> torch.Tensor:
    """``y = x2d @ W_hat^T + bias`` ``[T, out]`` in ``x2d.dtype`` (the compute dtype)."""
    if _fused_gemm_kernels(phi, lora_A, scale, x2d):
        from .ops.fused_linear import fused_linear_forward

        return fused_linear_forward(x2d, phi, lora_A, lora_B, scale, zero_point, bias, bits=bits,
                                    phi_format=phi_format, alpha=alpha)
    w = _fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, x2d.dtype)
    return F.linear(x2d, w, bias)


@_fused_linear_fwd.register_fake
def _(x2d, phi, lora_A, lora_B, scale, zero_point, bias, bits, phi_format, alpha):
    return x2d.new_empty((x2d.shape[0], phi.shape[0]))


@torch.library.custom_op("lrqat::fused_linear_dx", mutates_args=())
def _fused_linear_dx(
    dy2d: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> torch.Tensor:
    """``dx = dy2d @ W_hat`` ``[T, in]`` in ``dy2d.dtype``."""
    if _fused_gemm_kernels(phi, lora_A, scale, dy2d):
        from .ops.fused_linear import fused_linear_dx

        return fused_linear_dx(dy2d, phi, lora_A, lora_B, scale, zero_point, bits=bits, phi_format=phi_format,
                               alpha=alpha)
    return dy2d @ _fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, dy2d.dtype)


@_fused_linear_dx.register_fake
def _(dy2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return dy2d.new_empty((dy2d.shape[0], lora_A.shape[1]))


@torch.library.custom_op("lrqat::fused_linear_param_grads", mutates_args=())
def _fused_linear_param_grads(
    dy2d: torch.Tensor, x2d: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dA, dB, ds)`` of ``y = x W_hat^T`` from ``dy2d`` ``[T, out]`` and ``x2d`` ``[T, in]``."""
    if _fused_gemm_kernels(phi, lora_A, scale, dy2d, x2d):
        from .ops.fused_linear import fused_linear_param_grads

        return fused_linear_param_grads(dy2d, x2d, phi, lora_A, lora_B, scale, zero_point, bits=bits,
                                        phi_format=phi_format, alpha=alpha)
    return _fake_quant_bwd(dy2d.T @ x2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)


@_fused_linear_param_grads.register_fake
def _(dy2d, x2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(scale)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class FakeQuantWeightFunction(torch.autograd.Function):
    """``W_hat = s (clip(round(Phi0 + alpha/r B A), qmin, qmax) - z)`` with a recomputing backward.

    Saves ``phi, lora_A, lora_B, scale, zero_point`` (the inputs: no ``Z``, ``W_int`` or mask).
    With ``G = dL/dW_hat`` and ``M = qmin <= round(Z) <= qmax`` (straight-through rounding):

        dL/dZ      = s * G * M
        dL/dlora_B = (alpha/r) * dL/dZ @ lora_A^T            [out, r]
        dL/dlora_A = (alpha/r) * lora_B^T @ dL/dZ            [r, in]
        dL/ds      = sum over the channel/group of G * (W_int - z)

    computed by one pass of the backward kernel over ``G``. No gradient for Phi0 or ``z``.
    """

    @staticmethod
    def forward(ctx, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype):
        ctx.save_for_backward(phi, lora_A, lora_B, scale, zero_point)
        ctx.meta = (bits, phi_format, alpha)
        return torch.ops.lrqat.fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        phi, lora_A, lora_B, scale, zero_point = ctx.saved_tensors
        bits, phi_format, alpha = ctx.meta
        if not any(ctx.needs_input_grad[1:4]):
            return (None,) * 9
        d_a, d_b, d_s = torch.ops.lrqat.fake_quant_bwd(grad.contiguous(), phi, lora_A, lora_B, scale, zero_point,
                                                       bits, phi_format, alpha)
        return (None, d_a if ctx.needs_input_grad[1] else None, d_b if ctx.needs_input_grad[2] else None,
                d_s if ctx.needs_input_grad[3] else None, None, None, None, None, None)


class LRQATLinearFunction(torch.autograd.Function):
    """``y = x @ W_hat^T + bias`` that saves only its inputs and recomputes ``W_hat`` in the backward.

    Saved for backward: ``x, phi, lora_A, lora_B, scale, zero_point`` (never ``W_hat``, ``Z``,
    ``W_int``, masks or ``G``); peak extra memory in the backward is one ``W_hat`` and one ``G``
    (none with ``fused_gemm``). Chain rule, with ``x2 = x`` flattened to ``[T, in]``,
    ``dy2 = dL/dy`` ``[T, out]``, ``W = W_hat``, ``M = qmin <= round(Z) <= qmax``:

        dL/dx      = dy2 @ W                                  (W recomputed by the forward kernel)
        G          = dL/dW = dy2^T @ x2                       (one GEMM, in the compute dtype)
        dL/dZ      = s * G * M                                (straight-through rounding)
        dL/dlora_B = (alpha/r) * dL/dZ @ lora_A^T
        dL/dlora_A = (alpha/r) * lora_B^T @ dL/dZ
        dL/ds      = sum over the channel/group of G * (W_int - z)
        dL/dbias   = sum over tokens of dy2

    ``forward`` returns ``y2`` ``[tokens, out]`` (``x`` flattened to ``[tokens, in]``); callers
    reshape it (:func:`lrqat_linear`), so the output is not a view the caller could not modify in
    place. The last four come from one pass of the backward kernel over ``G``. With ``fused_gemm`` the
    forward is one dequant-GEMM, ``dL/dx`` another, and the backward kernel forms ``G`` tiles
    from ``dy2`` and ``x2`` itself: no weight-sized tensor at all.
    """

    @staticmethod
    def forward(ctx, x, phi, lora_A, lora_B, scale, zero_point, bias, bits, phi_format, alpha, out_dtype, fused_gemm):
        in_features = lora_A.shape[1]
        x2d = x.to(out_dtype).reshape(-1, in_features)
        b = None if bias is None else bias.to(out_dtype)
        if fused_gemm:
            y2d = torch.ops.lrqat.fused_linear_fwd(x2d, phi, lora_A, lora_B, scale, zero_point, b, bits, phi_format, alpha)
        else:
            w = torch.ops.lrqat.fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)
            y2d = F.linear(x2d, w, b)
        ctx.save_for_backward(x, phi, lora_A, lora_B, scale, zero_point)
        ctx.meta = (bits, phi_format, alpha, out_dtype, fused_gemm)
        ctx.bias_dtype = None if bias is None else bias.dtype
        # [tokens, out]: the caller reshapes (a view returned from a Function cannot be modified in
        # place, and models do y += ... on a linear's output)
        return y2d

    @staticmethod
    def backward(ctx, dy):
        x, phi, lora_A, lora_B, scale, zero_point = ctx.saved_tensors
        bits, phi_format, alpha, out_dtype, fused_gemm = ctx.meta
        needs = ctx.needs_input_grad
        in_features = lora_A.shape[1]
        dy2d = dy.reshape(x.shape[:-1].numel(), phi.shape[0]).to(out_dtype).contiguous()  # out may be 0
        d_x = d_a = d_b = d_s = d_bias = None
        if needs[0]:
            if fused_gemm:
                d_x2d = torch.ops.lrqat.fused_linear_dx(dy2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)
            else:
                w = torch.ops.lrqat.fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)
                d_x2d = dy2d @ w
                del w
            d_x = d_x2d.reshape(x.shape).to(x.dtype)
        if needs[2] or needs[3] or needs[4]:
            x2d = x.to(out_dtype).reshape(-1, in_features)
            if fused_gemm:
                d_a, d_b, d_s = torch.ops.lrqat.fused_linear_param_grads(dy2d, x2d, phi, lora_A, lora_B, scale, zero_point,
                                                                         bits, phi_format, alpha)
            else:
                g = dy2d.T @ x2d  # [out, in], the only weight-sized tensor of the backward
                d_a, d_b, d_s = torch.ops.lrqat.fake_quant_bwd(g, phi, lora_A, lora_B, scale, zero_point, bits,
                                                               phi_format, alpha)
                del g
            d_a = d_a if needs[2] else None
            d_b = d_b if needs[3] else None
            d_s = d_s if needs[4] else None
        if needs[6]:
            d_bias = dy2d.sum(0).to(ctx.bias_dtype)
        return d_x, None, d_a, d_b, d_s, None, d_bias, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public dispatchers: reference.py's signatures and semantics
# ----------------------------------------------------------------------------------------------


def _check_phi_layout(phi: torch.Tensor, phi_format: str) -> None:
    """The kernels address Phi0 as a dense row-major ``[out, in]`` (packed: ``[out, in // 2]``) array."""
    if not phi.is_contiguous():
        want = "[out, in // 2] uint8" if phi_format == "packed_int" else "[out, in]"
        raise ValueError(
            f"phi must be contiguous row-major {want} (got strides {tuple(phi.stride())} for shape "
            f"{tuple(phi.shape)}); pass phi.contiguous(), and store Phi0 untransposed"
        )


def fake_quant_weight(
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LR-QAT fake-quantised weight ``W_hat = s * (clip(round(Phi0 + C), qmin, qmax) - z)`` (fused).

    Same contract as :func:`lrqat_kernels.reference.fake_quant_weight`; differentiable in
    ``lora_A``, ``lora_B``, ``scale`` (:class:`FakeQuantWeightFunction`: saves only the inputs).

    Args:
        phi: stored Phi0, contiguous ``[out, in]`` (``[out, in // 2]`` uint8 for packed_int).
        lora_A: ``[r, in]`` float, trainable. lora_B: ``[out, r]``, same dtype.
        scale: float32 ``[out, 1]`` (per-channel) or ``[out, in // group_size]``, trainable.
        bits: 2..8 (2..4 for packed_int, 2..7 for fixed_point).
        phi_format: "packed_int", "fixed_point", "bf16", "fp16" or "fp32".
        alpha: LoRA scaling numerator (``C = alpha / r * lora_B @ lora_A``).
        zero_point: None (symmetric) or integer-valued tensor shaped like ``scale``; frozen.
        group_size: None for per-channel, else the number of contiguous input columns a group.
        out_dtype: dtype of ``W_hat``; default ``lora_A.dtype``.

    Returns:
        ``W_hat`` ``[out, in]`` in ``out_dtype``.
    """
    out_dtype = out_dtype or lora_A.dtype
    check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=out_dtype,
    )
    _check_phi_layout(phi, phi_format)
    return FakeQuantWeightFunction.apply(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, float(alpha), out_dtype)


def _autocast_out_dtype(x) -> torch.dtype | None:
    """The dtype ``nn.Linear`` would compute an fp32 ``x`` in under ``torch.autocast``, else None."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type not in ("cpu", "cuda"):
        return None
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _lrqat_linear(x, phi, lora_A, lora_B, scale, bias, bits, phi_format, alpha, zero_point, group_size, out_dtype,
                  fused_gemm):
    # Under torch.autocast an fp32 x computes like nn.Linear there: W_hat, the GEMM and y in the
    # autocast dtype; C, Z and W_int stay fp32 (NUMERICS), and autocast is off inside the ops, so
    # every path (eager, Triton, fused) returns what its fake says.
    out_dtype = out_dtype or _autocast_out_dtype(x) or (x.dtype if isinstance(x, torch.Tensor) else None)
    shapes = check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=out_dtype,
    )
    check_linear_args(x, bias, shapes, lora_A.dtype, phi.device)
    _check_phi_layout(phi, phi_format)
    with reference.no_autocast(x):
        y2d = LRQATLinearFunction.apply(x, phi, lora_A, lora_B, scale, zero_point, bias, bits, phi_format,
                                        float(alpha), out_dtype, fused_gemm)
    return y2d.reshape(*x.shape[:-1], phi.shape[0])


def lrqat_linear(
    x: torch.Tensor,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y = x @ W_hat^T + bias`` with ``W_hat`` from :func:`fake_quant_weight` (fused, lean autograd).

    Same contract as :func:`lrqat_kernels.reference.lrqat_linear`. Autograd saves only the
    inputs (:class:`LRQATLinearFunction`). ``LRQAT_FUSED_GEMM=1`` selects the fused
    dequant-GEMM path (:func:`lrqat_linear_fused`).

    Args:
        x: ``[..., in]`` float (the compute dtype).
        bias: None or ``[out]``.
        out_dtype: dtype of ``W_hat`` and ``y``; default ``x.dtype``.
        Others: as :func:`fake_quant_weight`.

    Returns:
        ``[..., out]`` in ``out_dtype``.
    """
    return _lrqat_linear(x, phi, lora_A, lora_B, scale, bias, bits, phi_format, alpha, zero_point, group_size,
                         out_dtype, fused_gemm_enabled())


def lrqat_linear_fused(
    x: torch.Tensor,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`lrqat_linear` on the fused dequant-GEMM path (``ops/fused_linear.py``), whatever the env.

    No weight-sized tensor exists in the forward or the backward (``W_hat`` tiles are built in the
    GEMMs' K loops; ``G`` tiles inside the backward kernel). Meant for small token counts, where
    the memory traffic saved outweighs rebuilding weight tiles per token tile; its speed has not
    been measured on a GPU yet. Needs 16-bit activations (``out_dtype`` bf16/fp16): fp32 ones
    take the unfused kernels; falls back to eager math where :func:`lrqat_linear` would.
    """
    return _lrqat_linear(x, phi, lora_A, lora_B, scale, bias, bits, phi_format, alpha, zero_point, group_size,
                         out_dtype, True)


@torch.no_grad()
def merge_weight(
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fuse the trained layer into ``W_Z = W_int`` by the training forward's own code path.

    Same contract as :func:`lrqat_kernels.reference.merge_weight`. On CUDA (and under
    ``TRITON_INTERPRET=1``) ``W_int`` comes from the forward kernel in its int8 mode, so the
    deployed integers are bit-identical to the ones the fused training forward used; elsewhere
    from the eager path that the forward uses there.

    Returns:
        ``(w_int, scale, zero_point)``: int8 ``[out, in]``, a float32 copy of ``scale``, and
        ``zero_point`` as int8 (or None).
    """
    check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, check_values=True,
    )
    _check_phi_layout(phi, phi_format)
    if not uses_kernels(phi, lora_A, scale):
        return reference.merge_weight(
            phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
            zero_point=zero_point, group_size=group_size,
        )
    w_int, n_nan = torch.ops.lrqat.fake_quant_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, float(alpha))
    if int(n_nan) > 0:
        raise ValueError("cannot merge: W_int contains NaN (lora_A/lora_B hold non-finite values)")
    zp = None if zero_point is None else zero_point.detach().round().to(torch.int8)
    return w_int, scale.detach().float().clone(), zp
