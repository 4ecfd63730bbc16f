"""L4Q: the LoRA update inside an LSQ quantiser with a learned step size and offset per group.

Jeon, Kim, Kim, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models"
(ACL 2025). Where LR-QAT adds ``C`` in units of the integer grid with a frozen ``s0`` inside the
rounding, L4Q adds it in weight units and divides by the *learned* ``s``::

    W_comb = W0 + (alpha / r) * lora_B @ lora_A          fp32; W0 frozen in 16 bits
    v      = (W_comb - b) / s                            s, b: [out, G], trainable, fp32
    W_int  = clip(round_half_even(v), qmin, qmax)
    W_q    = s * W_int + b                               cast to the compute dtype last

Backward (``G = dL/dW_q``, ``M = (qmin <= v <= qmax)`` on ``v`` before rounding, inclusive; ``g``
the LSQ gradient scale, :func:`lsq_grad_scale`)::

    dL/dW_comb = M * G                       (LR-QAT: s * M * G)
    dL/dlora_B = (alpha / r) * (M * G) @ lora_A^T,   dL/dlora_A = (alpha / r) * lora_B^T @ (M * G)
    dL/ds      = g * sum_group G * (M * (W_int - v) + (1 - M) * clip(v))          (LSQ)
    dL/db      = g * sum_group G * (1 - M)                                        (LSQ+ offset)

Kernels: where :func:`~lrqat_kernels.ops._launch.kernels_run_on` (CUDA; CPU under
``TRITON_INTERPRET=1``; not under ``use_kernels(False)``) and the dtypes allow (fp32/bf16/fp16
``W0`` and factors, fp32 ``s`` and ``b``, rank <= 128), both autograd functions run the fused
LR-QAT kernels in their L4Q mode (``ops/fake_quant.py``: ``lrqat::l4q_fwd``, ``lrqat::l4q_bwd``,
``lrqat::l4q_w_int``): one forward pass over ``W0``, and a backward that recomputes ``v`` per tile
and reduces ``G`` into all four gradients in one pass. Otherwise (fp64, CPU without the
interpreter) the eager functions below, which the kernels match (``tests/test_l4q_kernels.py``).

Deployment: ``W_int`` (integers), ``s`` and a float offset ``b`` per group: ``W_hat = s * W_int + b``
equals ``W_q`` bit for bit (``test_l4q.py::test_merge_is_exact``).

Choices the paper leaves open (``docs/METHODS.md``): ``g = 1 / sqrt(group_size * qmax)`` (LSQ's
rule) by default, any positive number allowed, ``1`` turns the scaling off; the offset starts at 0
and the step from L4Q's init ``s = max(|min W0| / |qmin|, max W0 / qmax)`` per group (nothing
clipped at step 0), or LSQ's ``2 mean|W0| / sqrt(qmax)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_group_size
from .formats import check_bits, qrange
from .modules import QuantizedLinear, _KeepDtypes, factor_dtype
from .ops._launch import kernels_run_on

__all__ = [
    "L4QLinear",
    "L4QLinearFunction",
    "L4QWeightFunction",
    "L4Q_INITS",
    "check_l4q_args",
    "l4q_fake_quant_weight",
    "l4q_init",
    "l4q_linear",
    "l4q_merge",
    "lsq_grad_scale",
]

#: Step-size initialisations: "l4q" (min/max, nothing clipped) and "lsq" (2 mean|W0| / sqrt(qmax)).
L4Q_INITS = ("l4q", "lsq")

#: Smallest initial step: an all-zero group would otherwise divide by 0.
_MIN_SCALE = 1e-8


def lsq_grad_scale(group_size: int, bits: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * qmax)`` for ``N = group_size`` weights sharing a step."""
    check_bits(bits)
    return 1.0 / math.sqrt(group_size * qrange(bits)[1])


def _expand(t: torch.Tensor, g: int) -> torch.Tensor:
    return t.repeat_interleave(g, dim=1) if g > 1 else t


def _group_sum(t: torch.Tensor, g: int) -> torch.Tensor:
    out_f, in_f = t.shape
    return t.reshape(out_f, in_f // g, g).sum(dim=2)


def check_l4q_args(w0, lora_A, lora_B, scale, offset, *, bits, alpha, group_size, grad_scale) -> tuple[int, float]:
    """Validate L4Q's tensors; return ``(group columns g, gradient scale)``.

    Args:
        w0: float ``[out, in]`` (frozen ``W0``).
        lora_A: float ``[r, in]``; lora_B: float ``[out, r]`` (same dtype as lora_A).
        scale, offset: float ``[out, G]``, ``G = in // group_size`` (1 per-channel); scale > 0.
        bits: 2..8. alpha: finite. group_size: None or a divisor of ``in``.
        grad_scale: None (LSQ's rule) or a positive finite number.
    """
    check_bits(bits)
    for name, t in (("w0", w0), ("lora_A", lora_A), ("lora_B", lora_B), ("scale", scale), ("offset", offset)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    out_f, in_f = w0.shape
    rank = lora_A.shape[0]
    if tuple(lora_A.shape) != (rank, in_f) or rank < 1:
        raise ValueError(f"lora_A must be [r, in] = [r, {in_f}] with r >= 1, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, rank):
        raise ValueError(f"lora_B must be [out, r] = [{out_f}, {rank}], got {tuple(lora_B.shape)}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    g = check_group_size(group_size, in_f)
    shape = (out_f, in_f // g)
    for name, t in (("scale", scale), ("offset", offset)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be [out, in // group_size] = [{shape[0]}, {shape[1]}], got {tuple(t.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if grad_scale is None:
        grad_scale = lsq_grad_scale(g, bits)
    elif isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not (0 < grad_scale < math.inf):
        raise ValueError(f"grad_scale must be None (LSQ: 1 / sqrt(group_size * qmax)) or a positive number, got {grad_scale!r}")
    devices = {t.device for t in (w0, lora_A, lora_B, scale, offset)}
    if len(devices) > 1:
        raise ValueError(f"w0, lora_A, lora_B, scale and offset must be on one device, got {sorted(map(str, devices))}")
    return g, float(grad_scale)


def _compute_dtype(*tensors) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (the gradient tests run in fp64)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _quantise(w0, lora_A, lora_B, scale, offset, *, bits, alpha, g):
    """``(v, W_int as float, s, b)`` expanded to ``[out, in]`` in the compute dtype (no autograd)."""
    cdt = _compute_dtype(w0, lora_A, lora_B, scale, offset)
    rank = lora_A.shape[0]
    w_comb = w0.to(cdt) + (alpha / rank) * (lora_B.to(cdt) @ lora_A.to(cdt))
    s, b = _expand(scale.to(cdt), g), _expand(offset.to(cdt), g)
    v = (w_comb - b) / s
    qmin, qmax = qrange(bits)
    return v, torch.round(v).clamp(qmin, qmax), s, b


def _kernel_ops(w0, lora_A, scale, offset, *dtypes):
    """``ops.fake_quant`` when its L4Q kernels compute for these inputs, else None (eager).

    Imported here, not at the top: ``import lrqat_kernels`` imports no Triton kernel module."""
    if not kernels_run_on(w0.device):
        return None
    from .ops import fake_quant

    return fake_quant if fake_quant.l4q_uses_kernels(w0, lora_A, scale, offset, *dtypes) else None


def _grads(grad_w, v, w_int, lora_A, lora_B, scale, offset, *, bits, alpha, g, grad_scale, needs):
    """Gradients of ``(lora_A, lora_B, scale, offset)`` from ``G = dL/dW_q`` (module docstring)."""
    cdt = v.dtype
    qmin, qmax = qrange(bits)
    zero = torch.zeros((), dtype=cdt, device=v.device)
    inside = (v >= qmin) & (v <= qmax)
    dz = torch.where(inside, grad_w, zero)
    c = alpha / lora_A.shape[0]
    d_a = (c * (lora_B.to(cdt).t() @ dz)).to(lora_A.dtype) if needs[0] else None
    d_b = (c * (dz @ lora_A.to(cdt).t())).to(lora_B.dtype) if needs[1] else None
    d_s = d_o = None
    if needs[2]:
        dq_ds = torch.where(inside, w_int - v, v.clamp(qmin, qmax))
        d_s = (grad_scale * _group_sum(grad_w * dq_ds, g)).to(scale.dtype)
    if needs[3]:
        d_o = (grad_scale * _group_sum(torch.where(inside, zero, grad_w), g)).to(offset.dtype)
    return d_a, d_b, d_s, d_o


class L4QWeightFunction(torch.autograd.Function):
    """``W_q [out, in]`` in ``out_dtype``; the backward takes ``G = dL/dW_q`` and recomputes ``v``."""

    @staticmethod
    def forward(ctx, w0, lora_A, lora_B, scale, offset, bits, alpha, g, grad_scale, out_dtype):
        ctx.save_for_backward(w0, lora_A, lora_B, scale, offset)
        ctx.args = (bits, alpha, g, grad_scale)
        if _kernel_ops(w0, lora_A, scale, offset, out_dtype) is not None:
            return torch.ops.lrqat.l4q_fwd(w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale, out_dtype)
        with torch.no_grad():
            _, w_int, s, b = _quantise(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, g=g)
        return (s * w_int + b).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_w):
        w0, lora_A, lora_B, scale, offset = ctx.saved_tensors
        bits, alpha, g, grad_scale = ctx.args
        needs = ctx.needs_input_grad[1:5]
        if not any(needs):
            return (None,) * 10
        if _kernel_ops(w0, lora_A, scale, offset, grad_w.dtype) is not None:
            grads = torch.ops.lrqat.l4q_bwd(grad_w.contiguous(), w0, lora_A, lora_B, scale, offset, bits, alpha,
                                            grad_scale)
            return (None, *(t if n else None for t, n in zip(grads, needs)), None, None, None, None, None)
        v, w_int, _, _ = _quantise(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, g=g)
        grads = _grads(grad_w.to(v.dtype), v, w_int, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, g=g,
                       grad_scale=grad_scale, needs=ctx.needs_input_grad[1:5])
        return (None, *grads, None, None, None, None, None)


class L4QLinearFunction(torch.autograd.Function):
    """``y = x @ W_q^T + bias``; the backward recomputes ``W_q`` from the saved inputs.

    Saves ``x, W0, lora_A, lora_B, s, b`` only (no weight-sized tensor between forward and
    backward); ``G = dy^T x`` is formed in the backward and freed. Gradients: module docstring.
    """

    @staticmethod
    def forward(ctx, x, w0, lora_A, lora_B, scale, offset, bias, bits, alpha, g, grad_scale):
        if _kernel_ops(w0, lora_A, scale, offset, x.dtype) is not None:
            w_q = torch.ops.lrqat.l4q_fwd(w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale, x.dtype)
        else:
            with torch.no_grad():
                _, w_int, s, b = _quantise(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, g=g)
                w_q = (s * w_int + b).to(x.dtype)
        ctx.save_for_backward(x, w0, lora_A, lora_B, scale, offset)
        ctx.args = (bits, alpha, g, grad_scale)
        return F.linear(x, w_q, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, w0, lora_A, lora_B, scale, offset = ctx.saved_tensors
        bits, alpha, g, grad_scale = ctx.args
        if _kernel_ops(w0, lora_A, scale, offset, x.dtype, dy.dtype) is not None:
            return _kernel_linear_backward(ctx, dy, x, w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale)
        v, w_int, s, b = _quantise(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, g=g)
        dx = (dy @ (s * w_int + b).to(dy.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = dy.reshape(-1, dy.shape[-1]).to(v.dtype).t() @ x.reshape(-1, x.shape[-1]).to(v.dtype)
        grads = _grads(grad_w, v, w_int, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, g=g,
                       grad_scale=grad_scale, needs=ctx.needs_input_grad[2:6])
        return (dx, None, *grads, None, None, None, None, None)


def _kernel_linear_backward(ctx, dy, x, w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale):
    """:class:`L4QLinearFunction`'s backward on the kernels: ``W_q`` recomputed by the forward kernel
    for ``dx``; ``G = dy^T x`` in fp32 (as the eager path forms it), one backward-kernel pass over it."""
    needs = ctx.needs_input_grad
    dx = None
    if needs[0]:
        w_q = torch.ops.lrqat.l4q_fwd(w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale, dy.dtype)
        dx = (dy @ w_q).to(x.dtype)
        del w_q
    grads = (None,) * 4
    if any(needs[2:6]):
        grad_w = dy.reshape(-1, dy.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()
        grads = torch.ops.lrqat.l4q_bwd(grad_w, w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale)
        del grad_w
        grads = tuple(t if n else None for t, n in zip(grads, needs[2:6]))
    return (dx, None, *grads, None, None, None, None, None)


def l4q_linear(x, w0, lora_A, lora_B, scale, offset, bias=None, *, bits: int, alpha: float = 1.0,
               group_size: int | None = None, grad_scale: float | None = None) -> torch.Tensor:
    """``y = x @ W_q^T + bias`` under L4Q (recomputing backward).

    Args:
        x: ``[..., in]`` float (the compute dtype; ``W_q`` is cast to it).
        w0: ``[out, in]`` float, frozen. lora_A ``[r, in]``, lora_B ``[out, r]``, trainable.
        scale, offset: fp32 ``[out, G]``, trainable. bias: None or ``[out]``, frozen.
        bits, alpha, group_size, grad_scale: see :func:`check_l4q_args`.

    Returns:
        ``[..., out]`` in x's dtype.
    """
    g, gs = check_l4q_args(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, group_size=group_size,
                           grad_scale=grad_scale)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != w0.shape[1]:
        raise ValueError(f"x must be [..., in] = [..., {w0.shape[1]}], got {tuple(x.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (w0.shape[0],)):
        raise ValueError(f"bias must be None or [out] = [{w0.shape[0]}], got {getattr(bias, 'shape', bias)!r}")
    return L4QLinearFunction.apply(x, w0.detach(), lora_A, lora_B, scale, offset, bias, bits, float(alpha), g, gs)


def l4q_fake_quant_weight(w0, lora_A, lora_B, scale, offset, *, bits: int, alpha: float = 1.0,
                          group_size: int | None = None, grad_scale: float | None = None,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W_q [out, in]`` in ``out_dtype`` (default ``lora_A.dtype``), differentiable (module docstring).

    Args: as :func:`l4q_linear`.
    """
    g, gs = check_l4q_args(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, group_size=group_size,
                           grad_scale=grad_scale)
    return L4QWeightFunction.apply(w0.detach(), lora_A, lora_B, scale, offset, bits, float(alpha), g, gs,
                                   out_dtype or lora_A.dtype)


@torch.no_grad()
def l4q_merge(w0, lora_A, lora_B, scale, offset, *, bits: int, alpha: float = 1.0, group_size: int | None = None):
    """``(W_int int8 [out, in], scale fp32 [out, G], offset fp32 [out, G])`` with ``s * W_int + b == W_q``."""
    g, _ = check_l4q_args(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, group_size=group_size,
                          grad_scale=1.0)
    if _kernel_ops(w0, lora_A, scale, offset) is not None:
        w_int, _ = torch.ops.lrqat.l4q_w_int(w0.detach(), lora_A.detach(), lora_B.detach(), scale.detach(),
                                            offset.detach(), bits, float(alpha))  # a NaN is written as 0
        return w_int, scale.detach().float().clone(), offset.detach().float().clone()
    _, w_int, _, _ = _quantise(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, g=g)
    return w_int.to(torch.int8), scale.detach().float().clone(), offset.detach().float().clone()


@torch.no_grad()
def l4q_init(w0: torch.Tensor, bits: int, group_size: int | None = None, method: str = "l4q"):
    """Initial ``(scale, offset)``, fp32 ``[out, G]`` each, offset 0.

    Args:
        w0: float ``[out, in]``.
        method: ``"l4q"``: ``s = max(|min W0| / |qmin|, max W0 / qmax)`` per group (L4Q's init: the
            symmetric grid covers the group, nothing is clipped at step 0); ``"lsq"``:
            ``s = 2 mean|W0| / sqrt(qmax)`` (LSQ's init). A step below 1e-8 (an all-zero group) is 1e-8.
    """
    check_bits(bits)
    if method not in L4Q_INITS:
        raise ValueError(f"l4q_init must be one of {list(L4Q_INITS)}, got {method!r}")
    if not isinstance(w0, torch.Tensor) or not w0.is_floating_point() or w0.dim() != 2:
        raise ValueError(f"w0 must be a 2-D floating-point tensor, got {getattr(w0, 'shape', type(w0).__name__)}")
    if not torch.isfinite(w0).all():
        raise ValueError("w0 holds non-finite values; cannot initialise the step size")
    out_f, in_f = w0.shape
    g = check_group_size(group_size, in_f)
    wg = w0.float().reshape(out_f, in_f // g, g)
    qmin, qmax = qrange(bits)
    if method == "l4q":
        scale = torch.maximum(wg.amin(dim=2) / qmin, wg.amax(dim=2) / qmax)
    else:
        scale = 2 * wg.abs().mean(dim=2) / math.sqrt(qmax)
    scale = scale.clamp_min(_MIN_SCALE)
    return scale, torch.zeros_like(scale)


class L4QLinear(_KeepDtypes, nn.Module):
    """An ``nn.Linear`` under L4Q: frozen ``W0``; trainable ``lora_A``, ``lora_B``, ``scale``, ``offset``.

    Tensors (``G = in // group_size``, 1 for per-channel):
        w0: buffer ``[out, in]`` in the compute dtype (16 bits in practice). Frozen.
        lora_A: parameter ``[r, in]``; lora_B: parameter ``[out, r]`` (zeros at LoRA init); fp32
            under fp16 compute (:func:`~lrqat_kernels.modules.factor_dtype`).
        scale: parameter fp32 ``[out, G]`` (> 0); offset: parameter fp32 ``[out, G]``. Both stay
            fp32 under ``module.to(torch.bfloat16)``.
        bias: frozen parameter ``[out]`` or None.
    """

    _keep_dtypes = ("scale", "offset")
    _factors = ("lora_A", "lora_B")

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, rank: int = 32, alpha: float = 1.0,
                 group_size: int | None = 128, grad_scale: float | None = None, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        check_bits(bits)
        g = check_group_size(group_size, in_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.rank, self.alpha, self.group_size = bits, rank, float(alpha), group_size
        self.grad_scale = grad_scale
        n_groups = in_features // g
        fdt = factor_dtype(dtype)
        self.register_buffer("w0", torch.zeros(out_features, in_features, dtype=dtype, device=device))
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=fdt, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=fdt, device=device))
        self.scale = nn.Parameter(torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
        self.offset = nn.Parameter(torch.zeros(out_features, n_groups, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, bits: int = 4, rank: int = 32, alpha: float = 1.0,
                    group_size: int | None = 128, grad_scale: float | None = None, init: str = "l4q",
                    dtype: torch.dtype | None = None, generator: torch.Generator | None = None) -> "L4QLinear":
        """Initialise from a trained ``nn.Linear``: ``W0`` copied, ``(s, b)`` from :func:`l4q_init`,
        ``lora_A ~ U(-1/sqrt(in), 1/sqrt(in))``, ``lora_B = 0`` (so step 0 is RTN with that step)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w0 = linear.weight.detach()
        out_f, in_f = w0.shape
        dtype = dtype or w0.dtype
        mod = cls(in_f, out_f, bits=bits, rank=rank, alpha=alpha, group_size=group_size, grad_scale=grad_scale,
                  bias=linear.bias is not None, dtype=dtype, device=w0.device)
        scale, offset = l4q_init(w0, bits, group_size, init)
        mod.w0.copy_(w0)
        mod.scale.copy_(scale)
        mod.offset.copy_(offset)
        bound = 1.0 / math.sqrt(in_f)
        a = torch.empty(rank, in_f, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        mod.lora_A.copy_(a)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_config(cls, linear: nn.Linear, config, *, generator: torch.Generator | None = None,
                    name: str = "") -> "L4QLinear":
        """:meth:`from_linear` with an ``LRQATConfig(method="l4q")`` (what ``prepare`` calls)."""
        where = f"layer {name!r}: " if name else ""
        try:
            return cls.from_linear(linear, bits=config.bits, rank=config.rank, alpha=config.alpha,
                                   group_size=config.group_size, grad_scale=config.grad_scale, init=config.scale_init,
                                   dtype=config.torch_compute_dtype, generator=generator)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}{e}") from None

    def _qargs(self) -> dict:
        return dict(bits=self.bits, alpha=self.alpha, group_size=self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., in]`` -> ``[..., out]`` in x's dtype."""
        return l4q_linear(x, self.w0, self.lora_A, self.lora_B, self.scale, self.offset, self.bias,
                          grad_scale=self.grad_scale, **self._qargs())

    def fake_quant_weight(self) -> torch.Tensor:
        """``W_q [out, in]`` in the factors' dtype (differentiable)."""
        return l4q_fake_quant_weight(self.w0, self.lora_A, self.lora_B, self.scale, self.offset,
                                     grad_scale=self.grad_scale, **self._qargs())

    def merge(self):
        """``(W_int int8 [out, in], scale fp32 [out, G], offset fp32 [out, G])``: :func:`l4q_merge`."""
        return l4q_merge(self.w0, self.lora_A, self.lora_B, self.scale, self.offset, **self._qargs())

    @torch.no_grad()
    def to_quantized(self) -> QuantizedLinear:
        """The deployment layer: ``W_int``, ``s`` and the float offset ``b`` in a
        :class:`~lrqat_kernels.modules.QuantizedLinear` (``W_hat = s * W_int + b``, bit-identical to
        the training ``W_q`` on its exact dequantise path)."""
        w_int, scale, offset = self.merge()
        bias = None if self.bias is None else self.bias.detach().clone()
        q = QuantizedLinear.from_int(w_int, scale, None, group_size=self.group_size, bias=bias, bits=self.bits,
                                     offset=offset)
        return q.train(self.training)

    def extra_repr(self) -> str:
        gran = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"rank={self.rank}, alpha={self.alpha}, {gran}, method=l4q, bias={self.bias is not None}")
