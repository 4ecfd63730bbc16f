"""PE-QAT: LoRA merged in weight units under W4A4, with learned smoothing and activation clipping.

Mishra, "Parameter-Efficient QAT for LLMs" (ACL 2026 SRW). The abstract fixes the structure (LoRA
inside the weight quantiser, per-channel 4-bit weights and activations, per-channel smoothing
factors and symmetric activation clipping thresholds learned jointly); the rest are the standard
choices of ``docs/METHODS.md``. Per linear layer, input channel ``j``, output channel ``o``::

    W'    = W0 + (alpha / r) * lora_B @ lora_A               fp32; W0 frozen
    s     = exp(log_smooth)                                  [in], > 0 by construction
    W_s   = W' * s[None, :]                                  smoothing on the INPUT axis
    dw[o] = max_j |W_s[o, j]| / Qw                           per output channel, detached
    W_q   = dw * clip(round_half_even(W_s / dw), -Qw, Qw)    Qw = 2^(bits-1) - 1
    x_s   = x / s
    da    = c / Qa                                           c > 0: static clip threshold
    x_q   = da * round_half_even(clip(x_s, -c, c) / da)      Qa = 2^(act_bits-1) - 1
    y     = x_q @ W_q^T + bias

Backward (straight-through; ``Gq = dL/dW_q = dy^T x_q``, ``Gx = dL/dx_q = dy W_q``,
``M = (|x_s| <= c)`` inclusive, ``v = x_s / da``)::

    dL/dW'  = Gq * s                        (absmax scale: nothing clipped, dw detached)
    dL/dA   = (alpha / r) * lora_B^T dL/dW',   dL/dB = (alpha / r) * dL/dW' lora_A^T
    dL/dx_s = Gx * M,   dL/dx = dL/dx_s / s
    dL/dc   = g_c * sum Gx * (M * (round(v) - v) / Qa + (1 - M) * sign(x_s))     (LSQ with s_a = c / Qa)
    dL/ds_j = sum_o Gq[o, j] W'[o, j] - sum_t dL/dx_s[t, j] x[t, j] / s_j^2,   dL/dlog_smooth = s * dL/ds

``g_c`` is 1 by default (METHODS: LSQ's ``1 / sqrt(numel * Qa)`` is optional, ``clip_grad_scale``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import check_bits
from .init import lora_init
from .modules import QuantizedLinear, _KeepDtypes, factor_dtype, register_frozen_bias

__all__ = ["PEQATLinear", "PEQATLinearFunction", "check_peqat_args", "peqat_linear", "peqat_merge", "smoothquant_init"]

#: Smallest per-channel weight step: an all-zero row would divide by 0.
_MIN_STEP = 1e-30


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_peqat_args(x, w0, lora_A, lora_B, log_smooth, clip, *, bits, act_bits, alpha, clip_grad_scale) -> None:
    """Validate PE-QAT's tensors (one-line errors naming the argument).

    Args:
        x: float ``[..., in]``. w0: float ``[out, in]``. lora_A ``[r, in]``, lora_B ``[out, r]``.
        log_smooth: float ``[in]``. clip: float ``[1]`` (or 0-d), > 0.
        bits, act_bits: 2..8 (weights and activations on symmetric grids ``[-Q, Q]``).
    """
    check_bits(bits)
    if act_bits is None:
        raise ValueError("act_bits must be set for PE-QAT (W4A4: act_bits=4); got None")
    check_bits(act_bits)
    for name, t in (("x", x), ("w0", w0), ("lora_A", lora_A), ("lora_B", lora_B), ("log_smooth", log_smooth), ("clip", clip)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if w0.dim() != 2:
        raise ValueError(f"w0 must be 2-D [out, in], got shape {tuple(w0.shape)}")
    out_f, in_f = w0.shape
    rank = lora_A.shape[0] if lora_A.dim() == 2 else 0
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f or rank < 1:
        raise ValueError(f"lora_A must be [r, in] = [r, {in_f}] with r >= 1, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, rank):
        raise ValueError(f"lora_B must be [out, r] = [{out_f}, {rank}], got {tuple(lora_B.shape)}")
    if tuple(log_smooth.shape) != (in_f,):
        raise ValueError(f"log_smooth must be [in] = [{in_f}], got {tuple(log_smooth.shape)}")
    if clip.numel() != 1:
        raise ValueError(f"clip must hold one threshold, got shape {tuple(clip.shape)}")
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must be [..., in] = [..., {in_f}], got {tuple(x.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if isinstance(clip_grad_scale, bool) or not isinstance(clip_grad_scale, (int, float)) or not (0 < clip_grad_scale < math.inf):
        raise ValueError(f"clip_grad_scale must be a positive number, got {clip_grad_scale!r}")


def _cdt(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _weight(w0, lora_A, lora_B, s, *, bits, alpha, cdt):
    """``(W', W_q)`` in ``cdt`` (no autograd)."""
    qw = _qmax(bits)
    w_prime = w0.to(cdt) + (alpha / lora_A.shape[0]) * (lora_B.to(cdt) @ lora_A.to(cdt))
    w_s = w_prime * s
    dw = (w_s.abs().amax(dim=1, keepdim=True) / qw).clamp_min(_MIN_STEP)
    return w_prime, dw * torch.round(w_s / dw).clamp(-qw, qw), dw


def _act(x_s, c, act_bits):
    """``(x_q, inside mask, v)`` for ``x_s`` (compute dtype) and the threshold ``c`` (0-d)."""
    qa = _qmax(act_bits)
    da = c / qa
    inside = x_s.abs() <= c
    v = torch.where(inside, x_s, torch.where(x_s > 0, c, -c)) / da
    return da * torch.round(v), inside, x_s / da


class PEQATLinearFunction(torch.autograd.Function):
    """``y = x_q @ W_q^T + bias``; saves ``x, W0, lora_A, lora_B, log_smooth, clip`` and recomputes."""

    @staticmethod
    def forward(ctx, x, w0, lora_A, lora_B, log_smooth, clip, bias, bits, act_bits, alpha, clip_grad_scale):
        cdt = _cdt(x, w0, lora_A, log_smooth, clip)
        with torch.no_grad():
            s = torch.exp(log_smooth.to(cdt))
            _, w_q, _ = _weight(w0, lora_A, lora_B, s, bits=bits, alpha=alpha, cdt=cdt)
            x_q, _, _ = _act(x.to(cdt) / s, clip.to(cdt).reshape(()), act_bits)
        ctx.save_for_backward(x, w0, lora_A, lora_B, log_smooth, clip)
        ctx.args = (bits, act_bits, alpha, clip_grad_scale)
        return F.linear(x_q.to(x.dtype), w_q.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, w0, lora_A, lora_B, log_smooth, clip = ctx.saved_tensors
        bits, act_bits, alpha, clip_grad_scale = ctx.args
        cdt = _cdt(x, w0, lora_A, log_smooth, clip)
        s = torch.exp(log_smooth.to(cdt))
        c = clip.to(cdt).reshape(())
        w_prime, w_q, _ = _weight(w0, lora_A, lora_B, s, bits=bits, alpha=alpha, cdt=cdt)
        x2 = x.reshape(-1, x.shape[-1]).to(cdt)
        x_s = x2 / s
        x_q, inside, v = _act(x_s, c, act_bits)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
        g_x = dy2 @ w_q                                   # dL/dx_q [T, in]
        g_q = dy2.t() @ x_q                               # dL/dW_q [out, in]
        zero = torch.zeros((), dtype=cdt, device=x2.device)
        d_xs = torch.where(inside, g_x, zero)
        d_wp = g_q * s
        r = alpha / lora_A.shape[0]
        dx = (d_xs / s).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        d_a = (r * (lora_B.to(cdt).t() @ d_wp)).to(lora_A.dtype) if ctx.needs_input_grad[2] else None
        d_b = (r * (d_wp @ lora_A.to(cdt).t())).to(lora_B.dtype) if ctx.needs_input_grad[3] else None
        d_ls = None
        if ctx.needs_input_grad[4]:
            d_s = (g_q * w_prime).sum(dim=0) - (d_xs * x2).sum(dim=0) / (s * s)
            d_ls = (d_s * s).to(log_smooth.dtype)
        d_c = None
        if ctx.needs_input_grad[5]:
            qa = _qmax(act_bits)
            dq_dc = torch.where(inside, (torch.round(v) - v) / qa, torch.sign(x_s))
            d_c = (clip_grad_scale * (g_x * dq_dc).sum()).reshape(clip.shape).to(clip.dtype)
        return dx, None, d_a, d_b, d_ls, d_c, None, None, None, None, None


def peqat_linear(x, w0, lora_A, lora_B, log_smooth, clip, bias=None, *, bits: int = 4, act_bits: int = 4,
                 alpha: float = 1.0, clip_grad_scale: float = 1.0) -> torch.Tensor:
    """``y = x_q @ W_q^T + bias`` under PE-QAT (module docstring); ``[..., in] -> [..., out]`` in x's dtype.

    Args:
        x: float ``[..., in]``. w0: ``[out, in]`` frozen. lora_A ``[r, in]``, lora_B ``[out, r]``.
        log_smooth: fp32 ``[in]`` (``s = exp(log_smooth)``). clip: fp32 ``[1]``, the threshold ``c > 0``.
        bias: None or ``[out]`` (frozen). bits / act_bits: weight / activation bits (4 / 4).
        clip_grad_scale: multiplies ``dL/dc`` (1: none; LSQ: ``1 / sqrt(numel * Qa)``).
    """
    check_peqat_args(x, w0, lora_A, lora_B, log_smooth, clip, bits=bits, act_bits=act_bits, alpha=alpha,
                     clip_grad_scale=clip_grad_scale)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (w0.shape[0],)):
        raise ValueError(f"bias must be None or [out] = [{w0.shape[0]}], got {getattr(bias, 'shape', bias)!r}")
    return PEQATLinearFunction.apply(x, w0.detach(), lora_A, lora_B, log_smooth, clip, bias, bits, act_bits,
                                     float(alpha), float(clip_grad_scale))


@torch.no_grad()
def peqat_merge(w0, lora_A, lora_B, log_smooth, *, bits: int = 4, alpha: float = 1.0):
    """``(W_int int8 [out, in], dw fp32 [out, 1], s fp32 [in])``: ``W_q = dw * W_int`` holds the
    smoothing; the deployed layer divides its input by ``s`` (or the model folds ``1 / s`` upstream)."""
    cdt = _cdt(w0, lora_A, log_smooth)
    s = torch.exp(log_smooth.to(cdt))
    w_prime, _, dw = _weight(w0, lora_A, lora_B, s, bits=bits, alpha=alpha, cdt=cdt)
    qw = _qmax(bits)
    w_int = torch.round(w_prime * s / dw).clamp(-qw, qw)
    return w_int.to(torch.int8), dw.float(), s.float()


@torch.no_grad()
def smoothquant_init(act_absmax: torch.Tensor, w0: torch.Tensor, migration: float = 0.5,
                     lo: float = 1e-5, hi: float = 1e5) -> torch.Tensor:
    """SmoothQuant's factors ``s_j = max|X_j|^m / max_o|W0[o, j]|^(1 - m)``, clamped to ``[lo, hi]``.

    Args:
        act_absmax: ``[in]`` per-input-channel max |x| over calibration tokens (> 0 somewhere).
        w0: ``[out, in]``. migration: ``m`` in (0, 1) (SmoothQuant's alpha, default 0.5).

    Returns:
        fp32 ``[in]``, positive. Channels with no signal (0 / 0) get 1.
    """
    if not 0 < migration < 1:
        raise ValueError(f"migration must be in (0, 1), got {migration!r}")
    a = act_absmax.float()
    w = w0.detach().float().abs().amax(dim=0)
    if tuple(a.shape) != tuple(w.shape):
        raise ValueError(f"act_absmax must be [in] = [{w.shape[0]}], got {tuple(a.shape)}")
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("act_absmax must hold finite values >= 0")
    s = a.pow(migration) / w.pow(1 - migration)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(lo, hi)


class PEQATLinear(_KeepDtypes, nn.Module):
    """An ``nn.Linear`` under PE-QAT: frozen ``W0``; trainable ``lora_A``, ``lora_B``, ``log_smooth``, ``clip``.

    Tensors:
        w0: buffer ``[out, in]`` (compute dtype). lora_A ``[r, in]``, lora_B ``[out, r]`` (zeros at init).
        log_smooth: parameter fp32 ``[in]``; layers reading one tensor (q/k/v, gate/up) may share it.
        clip: parameter fp32 ``[1]``, the static activation threshold ``c > 0`` (shareable likewise).
        bias: frozen ``[out]`` or None.
    log_smooth and clip stay fp32 under ``module.to(torch.bfloat16)``; the factors are fp32 under fp16.
    """

    _keep_dtypes = ("log_smooth", "clip")
    _factors = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, act_bits: int = 4, rank: int = 32,
                 alpha: float = 1.0, clip_grad_scale: float = 1.0, bias: bool = True, dtype=None, device=None):
        super().__init__()
        check_bits(bits)
        check_bits(act_bits)
        dtype = dtype or torch.get_default_dtype()
        fdt = factor_dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.act_bits, self.rank, self.alpha = bits, act_bits, rank, float(alpha)
        self.clip_grad_scale = clip_grad_scale
        self.register_buffer("w0", torch.zeros(out_features, in_features, dtype=dtype, device=device))
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=fdt, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=fdt, device=device))
        self.log_smooth = nn.Parameter(torch.zeros(in_features, dtype=torch.float32, device=device))
        self.clip = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device))
        register_frozen_bias(self, bias, out_features, dtype, device)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, act_absmax: torch.Tensor | None = None, bits: int = 4,
                    act_bits: int = 4, rank: int = 32, alpha: float = 1.0, migration: float = 0.5,
                    clip_grad_scale: float = 1.0, generator: torch.Generator | None = None) -> "PEQATLinear":
        """Initialise: ``W0`` copied; LoRA ``A ~ U(-1/sqrt(in), 1/sqrt(in))``, ``B = 0``; with
        calibration ``act_absmax [in]``: SmoothQuant factors and ``c = max_j act_absmax_j / s_j``
        (nothing clipped on the calibration data), else ``s = 1``, ``c = 1``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w0 = linear.weight.detach()
        out_f, in_f = w0.shape
        mod = cls(in_f, out_f, bits=bits, act_bits=act_bits, rank=rank, alpha=alpha, clip_grad_scale=clip_grad_scale,
                  bias=linear.bias is not None, dtype=w0.dtype, device=w0.device)
        mod.w0.copy_(w0)
        mod.lora_A.copy_(lora_init(out_f, in_f, rank, generator=generator)[0])
        if act_absmax is not None:
            s = smoothquant_init(act_absmax, w0, migration)
            mod.log_smooth.copy_(torch.log(s))
            c = (act_absmax.float() / s).max()
            mod.clip.fill_(float(c) if c > 0 else 1.0)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_config(cls, linear: nn.Linear, config, *, act_absmax: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, name: str = "") -> "PEQATLinear":
        """:meth:`from_linear` with an ``LRQATConfig(method="peqat")`` (what ``prepare`` calls)."""
        where = f"layer {name!r}: " if name else ""
        try:
            mod = cls.from_linear(linear, act_absmax=act_absmax, bits=config.bits, act_bits=config.act_bits,
                                  rank=config.rank, alpha=config.alpha, migration=config.migration,
                                  clip_grad_scale=config.clip_grad_scale, generator=generator)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}{e}") from None
        dtype = config.torch_compute_dtype
        return mod if dtype is None else mod.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]`` in x's dtype."""
        return peqat_linear(x, self.w0, self.lora_A, self.lora_B, self.log_smooth, self.clip, self.bias,
                            bits=self.bits, act_bits=self.act_bits, alpha=self.alpha, clip_grad_scale=self.clip_grad_scale)

    def merge(self):
        """``(W_int, dw, s)``: :func:`peqat_merge`."""
        return peqat_merge(self.w0, self.lora_A, self.lora_B, self.log_smooth, bits=self.bits, alpha=self.alpha)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedLinear:
        """The deployment layer: ``W_int`` with per-channel ``dw`` and a static input quantiser
        (step ``c / Qa`` on ``[-Qa, Qa]`` after dividing by ``s``): bit-identical to the training
        forward on the dequantise path (``tests/test_methods_model.py``). The smoothing stays a
        per-channel division of the input until it is folded into the preceding layer."""
        w_int, dw, s = self.merge()
        bias = None if self.bias is None else self.bias.detach().clone()
        q = QuantizedLinear.from_int(w_int, dw, None, group_size=None, bias=bias, bits=self.bits)
        qa = _qmax(self.act_bits)
        q.set_static_input_quant(self.clip.detach().float().reshape(()) / qa, (-qa, qa), smooth=s)
        return q.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"act_bits={self.act_bits}, rank={self.rank}, alpha={self.alpha}, method=peqat, bias={self.bias is not None}")
