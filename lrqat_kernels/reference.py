"""Eager PyTorch reference of the LR-QAT math (the oracle every fast path is tested against).

Plain PyTorch, no Triton. Follows ``docs/NUMERICS.md`` literally:

    C     = (lora_B @ lora_A) * (alpha / r)            fp32, [out, in], grid units
    Z     = decode_phi(Phi0) + C
    W_int = clip(round_half_even(Z), qmin, qmax)
    W_hat = s * (W_int - z)                            cast to the compute dtype last

Backward (straight-through rounding, inclusive clip mask ``M = qmin <= round(Z) <= qmax``):

    dL/dZ      = s * G * M
    dL/dlora_B = (alpha / r) * dL/dZ @ lora_A^T
    dL/dlora_A = (alpha / r) * lora_B^T @ dL/dZ
    dL/ds      = sum over the channel / group of G * (W_int - z)

The gradients come from autograd over the ops below; the STE is the detach trick, which is
exact here because ``Z + (round(Z) - Z)`` reproduces ``round(Z)`` bit for bit for |Z| < 2^23.
Computation is fp32, or fp64 when lora_A/scale are fp64 (for ``gradcheck``).

The oracle only: the activation / RMSNorm / SwiGLU oracles and their backward formulas below
too, but no production helpers. Initialisation (range estimation, RTN, LoRA / SVD init) is
``init.py``, input validation ``_checks.py``.
"""

from __future__ import annotations

import importlib
import warnings

import torch
import torch.nn.functional as F

from . import _checks
from ._checks import check_fake_quant_args, check_linear_args
from .formats import decode_phi, qrange

__all__ = [
    "fake_quant_weight",
    "lrqat_linear",
    "lowrank_product",
    "quantize_z",
    "merge_weight",
    "expand_groups",
    "no_autocast",
    "range_with_zero",
    "fake_quant_activation",
    "act_quant_params",
    "rms_norm",
    "rms_norm_fake_quant",
    "rms_norm_backward",
    "swiglu",
    "swiglu_fake_quant",
    "swiglu_backward",
]

# Moved out of the oracle (issue 18); importable from here with a DeprecationWarning until the next
# release (tests/test_imports.py::test_moved_reference_names_warn_and_resolve).
_MOVED = {
    **dict.fromkeys(("estimate_scale", "parse_range_method", "rtn_w_int", "rtn_quantize", "lora_init", "svd_init",
                     "LP_NORMS", "LP_CANDIDATES", "LP_MAX", "_lp_row_chunks", "_lp_run", "_lp_sum"), "init"),
    **dict.fromkeys(("ACT_BITS", "check_act_bits", "check_act_args", "check_rms_norm_args", "check_swiglu_args"),
                    "_checks"),
}


def __getattr__(name: str):
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"lrqat_kernels.reference.{name} moved to lrqat_kernels.{home}.{name}; the old name goes in the "
                  "next release", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"{__package__}.{home}"), name)


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Broadcast a per-group tensor ``[out, in // g]`` to ``[out, in]`` (groups are contiguous columns)."""
    return t.repeat_interleave(group_size, dim=1)


def no_autocast(t: torch.Tensor):
    """A context that turns ``torch.autocast`` off for ``t``'s device (a no-op where it is off).

    NUMERICS computes ``C``, ``Z`` and ``W_int`` in fp32, autocast or not: the training forward's
    integers equal the merge's (``tests/test_lrqat_linear.py::test_autocast_keeps_the_integer_grid_fp32``).
    Only the forward is covered: call ``backward()`` outside the autocast region, as torch advises
    (inside it, this oracle's own ``B @ A`` backward would run in bf16; the package's Functions do not).
    """
    import contextlib

    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def lowrank_product(lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float, dtype=torch.float32) -> torch.Tensor:
    """``C = (lora_B @ lora_A) * (alpha / r)`` in ``dtype`` (autocast or not). lora_A ``[r, in]``,
    lora_B ``[out, r]`` -> ``[out, in]``."""
    r = lora_A.shape[0]
    with no_autocast(lora_A):
        return (lora_B.to(dtype) @ lora_A.to(dtype)) * (alpha / r)


def quantize_z(z_grid: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round half to even and clip, with the straight-through estimator.

    Args:
        z_grid: ``Z`` ``[out, in]`` float.
        bits: grid width.

    Returns:
        ``(w_int, mask)``: ``w_int`` float ``[out, in]`` on the grid whose gradient is 1 where
        ``mask`` (``qmin <= round(Z) <= qmax``, inclusive) and 0 elsewhere; NaN stays NaN.
    """
    qmin, qmax = qrange(bits)
    q = torch.round(z_grid)
    mask = (q >= qmin) & (q <= qmax)
    w_ste = z_grid + (q - z_grid).detach()
    w_int = torch.where(mask, w_ste, q.clamp(qmin, qmax).detach())
    return w_int, mask


def _w_int_and_dequant(phi, lora_A, lora_B, scale, *, bits, phi_format, alpha, zero_point, group_size, out_dtype,
                       check_values=None):
    shapes = check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=out_dtype, check_values=check_values,
    )
    cdt = _compute_dtype(lora_A, scale)
    # Phi0 and z are frozen (NUMERICS): no gradient reaches them, even when a caller's tensor asks for one
    z_grid = decode_phi(phi.detach(), bits, phi_format).to(cdt) + lowrank_product(lora_A, lora_B, alpha, cdt)
    w_int, _ = quantize_z(z_grid, bits)
    s = expand_groups(scale.to(cdt), shapes.group_size)
    centered = w_int if zero_point is None else w_int - expand_groups(zero_point.detach().to(cdt), shapes.group_size)
    return w_int, s * centered


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
    """LR-QAT fake-quantised weight ``W_hat = s * (clip(round(Phi0 + C), qmin, qmax) - z)``.

    Args:
        phi: stored Phi0, ``[out, in]`` (``[out, in // 2]`` uint8 for packed_int); frozen.
        lora_A: ``[r, in]`` float, trainable.
        lora_B: ``[out, r]`` float (same dtype as lora_A), trainable.
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
    _, w_hat = _w_int_and_dequant(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=out_dtype,
    )
    return w_hat.to(out_dtype)


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
    """``y = x @ W_hat^T + bias`` with ``W_hat`` from :func:`fake_quant_weight`.

    Args:
        x: ``[..., in]`` float (the compute dtype).
        bias: None or ``[out]``.
        out_dtype: dtype of ``W_hat`` and ``y``; default ``x.dtype``.
        Others: as :func:`fake_quant_weight`.

    Returns:
        ``[..., out]`` in ``out_dtype``.
    """
    out_dtype = out_dtype or (x.dtype if isinstance(x, torch.Tensor) else None)
    w_hat = fake_quant_weight(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=out_dtype,
    )
    shapes = check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size,
    )
    check_linear_args(x, bias, shapes, lora_A.dtype, phi.device)
    return F.linear(x.to(out_dtype), w_hat, None if bias is None else bias.to(out_dtype))


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
    """Fuse the trained layer into ``W_Z = W_int`` (NUMERICS "Merge").

    Returns:
        ``(w_int, scale, zero_point)``: int8 ``[out, in]`` on the grid, a float32 copy of
        ``scale``, and ``zero_point`` as int8 (or None). ``s * (w_int - z)`` equals the
        training forward's ``W_hat`` before its final cast.
    """
    if isinstance(phi, torch.Tensor) and phi.is_meta:
        raise ValueError("phi is on the meta device: merge_weight computes integer values, it needs real tensors")
    w_int, _ = _w_int_and_dequant(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=None, check_values=True,
    )
    if torch.isnan(w_int).any():
        raise ValueError("cannot merge: W_int contains NaN (lora_A/lora_B hold non-finite values)")
    zp = None if zero_point is None else zero_point.detach().round().to(torch.int8)
    return w_int.to(torch.int8), scale.detach().float().clone(), zp


def range_with_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric range ``[lo, hi]`` widened to hold 0 (weights and activations alike).

    The grid ``s * (q - z)``, q and z integers in ``[qmin, qmax]``, always holds 0 (q = z): a range
    without 0 would need z outside ``[qmin, qmax]``, and a clamped z shifts the grid off the values
    (``tests/test_reference.py::test_asymmetric_range_of_a_one_signed_group_still_covers_it``).
    """
    return lo.clamp_max(0.0), hi.clamp_min(0.0)


# ----------------------------------------------------------------------------------------------
# Activation / KV-cache fake quantisation (weight-activation settings, paper Table 5)
# ----------------------------------------------------------------------------------------------

def act_quant_params(x: torch.Tensor, bits: int, symmetric: bool):
    """Per-token scale and zero point from the row's min/max, fp32, detached.

    The range always includes 0 (``lo = min(row_min, 0)``, ``hi = max(row_max, 0)``) so zero is
    exact and a constant row survives. Symmetric: ``s = max|x| / qmax``, ``z = 0``. Asymmetric:
    ``s = (hi - lo) / (qmax - qmin)``, ``z = round(qmin - lo / s)``. ``s`` is floored at 1e-8
    (an all-zero row quantises to zeros). A row with a NaN gives NaN (as min/max propagate it).

    Returns:
        ``(s, z)`` float32 ``[..., 1]`` each.
    """
    qmin, qmax = qrange(bits)
    xf = x.detach().float()
    if symmetric:
        s = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
        return s, torch.zeros_like(s)
    lo, hi = range_with_zero(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True))
    s = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    return s, torch.round(qmin - lo / s)


def fake_quant_activation(x: torch.Tensor, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """Dynamic per-token fake quantisation: ``s * (clip(round(x / s + z), qmin, qmax) - z)``.

    Scale and zero point come from :func:`act_quant_params` and are detached; rounding is
    straight-through, so ``dL/dx = dL/dx_hat`` (nothing clips: the grid covers the row's range).

    Args:
        x: ``[..., hidden]`` float; quantised along the last dimension (one scale per token).
        bits: 4 or 8.
        symmetric: signed symmetric grid (z = 0) or asymmetric with an integer zero point.

    Returns:
        ``x_hat`` with ``x``'s shape and dtype (computed in fp32).
    """
    _checks.check_act_args(x, bits, symmetric)
    qmin, qmax = qrange(bits)
    s, z = act_quant_params(x, bits, symmetric)
    with torch.no_grad():  # no graph: the straight-through step passes the gradient to x alone
        q = torch.round(x.float() / s + z)
        q = torch.where(q < qmin, qmin, torch.where(q > qmax, qmax, q))  # keeps NaN
        x_hat = (s * (q - z)).to(x.dtype)
    return _StraightThrough.apply(x, x_hat)


class _StraightThrough(torch.autograd.Function):
    """Return ``x_hat`` in the forward; pass ``dL/dx_hat`` to ``x`` unchanged in the backward."""

    @staticmethod
    def forward(ctx, x, x_hat):
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ----------------------------------------------------------------------------------------------
# RMSNorm with its output quantised (the shared input of q/k/v and of gate/up, quantised once)
# ----------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm, op for op as transformers' ``LlamaRMSNorm`` (also Mistral's and Qwen2's):
    ``weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)``.

    Args:
        x: ``[..., hidden]``; weight: ``[hidden]``.

    Returns:
        ``[..., hidden]`` in ``promote_types(x.dtype, weight.dtype)``.
    """
    xf = x.float()
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_fake_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, bits: int = 8,
                        symmetric: bool = False) -> torch.Tensor:
    """``fake_quant_activation(rms_norm(x, weight, eps), bits, symmetric)``: per-token fake
    quantisation of the norm's output; straight-through, so the gradient is RMSNorm's."""
    _checks.check_rms_norm_args(x, weight, eps)
    return fake_quant_activation(rms_norm(x, weight, eps), bits, symmetric)


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor,
                      need_weight_grad: bool = True):
    """Gradients of :func:`rms_norm` (and, by the straight-through rule, of
    :func:`rms_norm_fake_quant`) for an upstream ``grad`` ``[..., hidden]``, by recomputation.

    With ``h = x * r``, ``r = rsqrt(mean(x^2) + eps)``, ``y = weight * h``:
    ``dL/dweight = sum_tokens(grad * h)`` and ``dL/dx = r * (g - h * mean(g * h))`` with
    ``g = grad * weight``; the casts of the forward are mirrored (``h`` rounded to ``x.dtype``
    where the forward multiplies it by ``weight``; ``g`` rounded to ``x.dtype`` as autograd's
    gradient of that cast).

    Returns:
        ``(dx like x, dweight like weight or None)``.
    """
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    h = xf * r
    grad = grad.to(out_dtype)
    dw = None
    if need_weight_grad:
        dw = (grad * h.to(x.dtype).to(out_dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    g = (grad * weight.to(out_dtype)).to(x.dtype).float()
    dx = r * (g - h * (g * h).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw


# ----------------------------------------------------------------------------------------------
# SwiGLU with its output quantised (the input of down_proj, quantised where it is made)
# ----------------------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LLaMA's MLP product ``silu(gate) * up``, op for op as transformers' ``LlamaMLP``."""
    return F.silu(gate) * up


def swiglu_fake_quant(gate: torch.Tensor, up: torch.Tensor, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """``fake_quant_activation(silu(gate) * up, bits, symmetric)``: the input of ``down_proj``,
    quantised per token; straight-through, so the gradients are SwiGLU's."""
    _checks.check_swiglu_args(gate, up)
    return fake_quant_activation(swiglu(gate, up), bits, symmetric)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """Gradients of :func:`swiglu` (and of :func:`swiglu_fake_quant`) by recomputation:
    ``d_up = grad * silu(gate)``, ``d_gate = (grad * up) * sigma(gate) * (1 + gate * (1 - sigma(gate)))``
    (fp32 inside, each result rounded to its input's dtype as autograd rounds it).

    Returns:
        ``(d_gate, d_up)`` like ``gate`` and ``up``.
    """
    gf = gate.float()
    sig = torch.sigmoid(gf)
    grad = grad.to(gate.dtype)
    d_up = grad * F.silu(gate)  # the forward's own silu (gate * sigma(gate) rounds 1 ulp off in fp16)
    d_a = (grad * up).float()
    d_gate = d_a * sig * (1 + gf * (1 - sig))  # autograd's order of silu_backward
    return d_gate.to(gate.dtype), d_up


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, g):
        ctx.g = g
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def scale_grad(t: torch.Tensor, g: float) -> torch.Tensor:
    """``t`` unchanged in the forward; its gradient multiplied by ``g`` (LSQ's gradient scale: the
    sibling methods' oracles, docs/METHODS.md, pass their step sizes through it)."""
    return _ScaleGrad.apply(t, g)
