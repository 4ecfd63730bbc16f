"""pQuant: decoupled linear QAT -- a dominant 1-bit FFN branch plus a small 8-bit branch (from scratch).

Zhang et al., "pQuant: Decoupled Linear QAT" (arXiv 2602.22592, Findings ACL 2026). Not LoRA: the
latent weights train (BitNet-style QAT from scratch). Per linear (``weight_bits`` 1 or 2..8)::

    1-bit (BitNet b1):  W_eff = lam * Sign(W - mean W),  lam = mean|W| (uncentred),  Sign(0) = -1
    b-bit (absmax):     W_eff = sw * clip(round(W / sw), -Q - 1, Q),  sw = max|W| / Q   per tensor
    input (absmax):     x_q   = sx * clip(round(x / sx), -Q - 1, Q),  sx = max_row|x| / Q  per token
    y = x_q @ W_eff^T (+ bias)                                         Q = 2^(bits-1) - 1 (127)

Backward is straight-through with no mask (absmax never clips; ``lam``, ``sw``, ``sx`` detached):
``dL/dx = dy @ W_eff``, ``dL/dW = dy^T @ x_q``, ``dL/dbias = sum dy``. The FFN (``PQuantFFN``)::

    FFN(x) = beta * F_1bit(x) + alpha * p_e(x) * F_8bit^(e)(x),   e = argmax softmax(x W_r^T)

both branches SwiGLU on the same input; the 1-bit branch keeps ``d_ff``, the 8-bit one has width
``r``; ``alpha = 2.0``, ``beta = 0.2`` learnable; with ``N > 1`` experts only the routed expert runs
per token (Switch-style ``p_e`` gate and aux loss ``coef * N * sum_i f_i P_i``; with ``N = 1`` no
router, ``p_e = 1``). Attention linears are ``BitLinear`` (pure 1-bit). The absmax quantiser uses the
step ``max|x| / Q`` (``x / s``, ``x_int * s``): METHODS' ``RoundClip(x * gamma) / gamma``,
``gamma = Q / max|x|``, to the rounding of one product; ``max|x|`` is clamped to 1e-5 (BitNet's floor).

Deployment (``deploy()``): 1-bit weights packed 8 a byte, LSB-first along the input dimension
(:func:`pack_signs`: bit ``k`` of byte ``j`` is column ``8j + k``, 1 for +1, padding bits 0), the
scale ``lam`` in fp32; b-bit weights int8 with ``sw``. The deployed forward equals the training
forward bit for bit (same fp32 ops on the same values) for fp32 / bf16 / fp16 latent weights and
inputs: ``tests/test_pquant.py::test_deploy_equals_the_training_forward``. ``binary_linear`` wraps the
native CPU 1-bit GEMM (``csrc/binary_cpu/``), which ``PackedPQuantLinear.use_binary_kernel`` turns on.

Size: about 540 lines: one method read top to bottom (quantisers, autograd function, layers, FFN,
packed deployment form and its GEMM wrapper), as l4q.py / peqat.py; the packing and the GEMM wrapper
go to ops/ with the Triton kernels (issue 20's fused ops).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ext
from .formats import check_bits

__all__ = [
    "BitLinear", "PQuantFFN", "PQuantLinear", "PQuantLinearFunction", "PackedPQuantFFN", "PackedPQuantLinear",
    "absmax_quant", "absmax_quantize", "average_weight_bits", "binary_linear", "binarize", "binarize_weight", "check_pquant_args",
    "pack_signs", "pquant_linear", "pquant_weight_bits", "unpack_signs",
]

#: Floor of ``max|x|`` in the absmax quantisers (BitNet's reference code): an all-zero row gives 0, not NaN.
ABSMAX_EPS = 1e-5


def _cdt(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(name, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")


def _check_weight_bits(weight_bits) -> None:
    if isinstance(weight_bits, bool) or weight_bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"weight_bits must be 1 (binary) or 2..8 (absmax), got {weight_bits!r}")


def _check_act_bits(act_bits) -> None:
    if act_bits is not None:
        try:
            check_bits(act_bits)
        except (TypeError, ValueError):
            raise ValueError(f"act_bits must be None or 2..8, got {act_bits!r}") from None


def binarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1's code and scale of ``w [out, in]``: ``(Sign(w - mean w)`` as +-1 in w's dtype, ``mean|w|`` 0-d)."""
    sign = torch.where(w - w.mean() > 0, 1.0, -1.0).to(w.dtype)
    return sign, w.abs().mean()


def absmax_quantize(t: torch.Tensor, *, bits: int = 8, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_int, step)``: ``t ~ step * t_int``, ``step = max|t| / Q`` per row (``per_token``) or per tensor.

    ``t_int`` holds integers in ``[-Q - 1, Q]`` in t's dtype; ``step`` is ``[..., 1]`` or 0-d.
    """
    q = 2 ** (bits - 1) - 1
    a = t.abs().amax(dim=-1, keepdim=True) if per_token else t.abs().amax()
    step = a.clamp_min(ABSMAX_EPS) / q
    return torch.round(t / step).clamp(-q - 1, q), step


def _effective_weight(w: torch.Tensor, weight_bits: int) -> torch.Tensor:
    if weight_bits == 1:
        sign, lam = binarize(w)
        return lam * sign
    w_int, step = absmax_quantize(w, bits=weight_bits, per_token=False)
    return w_int * step


def _quant_input(x: torch.Tensor, act_bits) -> torch.Tensor:
    if act_bits is None:
        return x
    x_int, step = absmax_quantize(x, bits=act_bits)
    return x_int * step


class _StraightThrough(torch.autograd.Function):
    """Forward ``fn(t)`` in fp32 (fp64 for fp64), cast to t's dtype; backward the identity."""

    @staticmethod
    def forward(ctx, t, fn):
        with torch.no_grad():
            return fn(t.to(_cdt(t))).to(t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def binarize_weight(w: torch.Tensor) -> torch.Tensor:
    """``lam * Sign(w - mean w)`` (BitNet b1, per tensor) with a straight-through gradient.

    Args:
        w: float ``[out, in]`` latent weights. Returns w's shape and dtype.
    """
    _check_float("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    return _StraightThrough.apply(w, lambda t: _effective_weight(t, 1))


def absmax_quant(t: torch.Tensor, *, bits: int = 8, per_token: bool = True) -> torch.Tensor:
    """Absmax fake quantisation, straight-through: per token (last dim; activations) or per tensor (weights).

    Args:
        t: float ``[..., n]``. bits: 2..8. Returns t's shape and dtype.
    """
    _check_float("t", t)
    check_bits(bits)
    return _StraightThrough.apply(t, lambda u: _quant_input(u, bits) if per_token else _effective_weight(u, bits))


def check_pquant_args(x, weight, bias, *, weight_bits, act_bits) -> None:
    """Validate a pQuant linear's inputs (one-line errors naming the argument)."""
    _check_weight_bits(weight_bits)
    _check_act_bits(act_bits)
    _check_float("x", x)
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., in] = [..., {weight.shape[1]}], got {tuple(x.shape)}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be None or [out] = [{weight.shape[0]}], got {tuple(bias.shape)}")


class PQuantLinearFunction(torch.autograd.Function):
    """``y = x_q @ W_eff^T + bias``; saves ``x`` and ``weight``, recomputes ``x_q`` and ``W_eff`` in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_bits, act_bits):
        cdt = _cdt(x, weight)
        with torch.no_grad():
            x_q = _quant_input(x.to(cdt), act_bits)
            w_eff = _effective_weight(weight.to(cdt), weight_bits)
        ctx.save_for_backward(x, weight)
        ctx.args = (weight_bits, act_bits, None if bias is None else bias.dtype)
        return F.linear(x_q.to(x.dtype), w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        weight_bits, act_bits, bias_dtype = ctx.args
        cdt = _cdt(x, weight)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(cdt)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ _effective_weight(weight.to(cdt), weight_bits)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x_q = _quant_input(x.reshape(-1, x.shape[-1]).to(cdt), act_bits)
            dw = (dy2.t() @ x_q).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(dim=0).to(bias_dtype)
        return dx, dw, db, None, None


def pquant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  weight_bits: int = 1, act_bits: int | None = 8) -> torch.Tensor:
    """A pQuant linear (module docstring): ``[..., in] -> [..., out]`` in x's dtype.

    Args:
        x: float ``[..., in]``. weight: latent float ``[out, in]`` (trainable). bias: None or ``[out]``.
        weight_bits: 1 (BitNet b1 binary) or 2..8 (absmax per tensor). act_bits: per-token absmax bits
            of the input (8), None for no input quantiser. Quantisers compute in fp32 (fp64 if an input is).
    """
    check_pquant_args(x, weight, bias, weight_bits=weight_bits, act_bits=act_bits)
    return PQuantLinearFunction.apply(x, weight, bias, weight_bits, act_bits)


class PQuantLinear(nn.Module):
    """A linear trained from scratch with ``weight_bits``-bit weights and absmax ``act_bits`` inputs.

    Tensors:
        weight: parameter ``[out, in]``, the latent full-precision weight (init ``N(0, init_std)``).
        bias: parameter ``[out]`` or None (pQuant / BitNet linears have none: the default).
    """

    def __init__(self, in_features: int, out_features: int, *, weight_bits: int = 1, act_bits: int | None = 8,
                 bias: bool = False, init_std: float = 0.02, dtype=None, device=None, generator=None):
        super().__init__()
        _check_weight_bits(weight_bits)
        _check_act_bits(act_bits)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits = weight_bits, act_bits
        w = torch.randn(out_features, in_features, generator=generator) * init_std
        self.weight = nn.Parameter(w.to(dtype=dtype or torch.get_default_dtype(), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.weight.dtype, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, **kw) -> "PQuantLinear":
        """Start from an ``nn.Linear``'s weights (``kw``: ``weight_bits``, ``act_bits``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  dtype=linear.weight.dtype, device=linear.weight.device, **kw)
        mod.weight.copy_(linear.weight)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pquant_linear(x, self.weight, self.bias, weight_bits=self.weight_bits, act_bits=self.act_bits)

    @torch.no_grad()
    def deploy(self) -> "PackedPQuantLinear":
        """The deployment form (module docstring); its forward equals this layer's bit for bit."""
        w = self.weight.detach().to(_cdt(self.weight))
        if self.weight_bits == 1:
            sign, lam = binarize(w)
            qweight, step = pack_signs(sign), lam
        else:
            w_int, step = absmax_quantize(w, bits=self.weight_bits, per_token=False)
            qweight = w_int.to(torch.int8)
        bias = None if self.bias is None else self.bias.detach().clone()
        return PackedPQuantLinear(qweight, step.float().reshape(1), self.in_features, weight_bits=self.weight_bits,
                                  act_bits=self.act_bits, bias=bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight_bits={self.weight_bits}, "
                f"act_bits={self.act_bits}, bias={self.bias is not None}, method=pquant")


class BitLinear(PQuantLinear):
    """A pure 1-bit ``PQuantLinear`` (pQuant's attention projections): ``weight_bits=1``, 8-bit absmax inputs."""

    def __init__(self, in_features: int, out_features: int, *, act_bits: int | None = 8, bias: bool = False,
                 init_std: float = 0.02, dtype=None, device=None, generator=None):
        super().__init__(in_features, out_features, weight_bits=1, act_bits=act_bits, bias=bias, init_std=init_std,
                         dtype=dtype, device=device, generator=generator)


def pack_signs(sign: torch.Tensor) -> torch.Tensor:
    """Pack a +-1 (or bool, True = +1) ``[out, in]`` code 8 a byte: uint8 ``[out, ceil(in / 8)]``.

    LSB-first along ``in``: bit ``k`` (value ``1 << k``) of byte ``j`` is column ``8j + k``; 1 means +1,
    0 means -1; the padding bits past ``in`` are 0.
    """
    if not isinstance(sign, torch.Tensor) or sign.dim() != 2:
        raise ValueError(f"sign must be a 2-D tensor [out, in], got {getattr(sign, 'shape', type(sign).__name__)}")
    bits = sign if sign.dtype == torch.bool else sign > 0
    out_f, in_f = bits.shape
    pad = (-in_f) % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    weights = 1 << torch.arange(8, device=bits.device, dtype=torch.int32)
    return (bits.reshape(out_f, (in_f + pad) // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``[out, in_features]`` of +-1 in ``dtype``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if not isinstance(in_features, int) or not 8 * packed.shape[1] - 8 < in_features <= 8 * packed.shape[1]:
        raise ValueError(f"in_features must be in ({8 * packed.shape[1] - 8}, {8 * packed.shape[1]}] for "
                         f"{packed.shape[1]} bytes a row, got {in_features!r}")
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], 8 * packed.shape[1])[:, :in_features].to(dtype) * 2 - 1


def _binary_linear_cpu_fake(x, packed, scale, bias, in_features, isa="auto"):
    torch._check(x.dim() == 2 and x.shape[1] == in_features, lambda: "lrqat::binary_linear_cpu: x must be [M, in_features]")
    return x.new_empty((x.shape[0], packed.shape[0]))


def _register_fake() -> None:
    global _fake_registered
    if not _fake_registered:  # csrc/registration.cpp names this module (m.set_python_module)
        torch.library.register_fake("lrqat::binary_linear_cpu", _binary_linear_cpu_fake)
        _fake_registered = True


_fake_registered = False
if "lrqat_kernels._C" in sys.modules and hasattr(torch.ops.lrqat, "binary_linear_cpu"):
    _register_fake()


def binary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                  in_features: int, isa: str = "auto") -> torch.Tensor:
    """The native CPU 1-bit GEMM ``y = scale * x @ S^T + bias`` (``csrc/binary_cpu/``, runtime ISA dispatch).

    It sums ``2 * sum_{S=+1} x - sum x`` in fp32, in another order than ``F.linear``: equal to the
    dequantised product to fp32 rounding, not bit for bit (``tests/test_pquant.py``).

    Args:
        x: float ``[..., in_features]`` on CPU (computed in fp32, returned in x's dtype).
        packed: uint8 ``[N, ceil(in_features / 8)]`` (:func:`pack_signs`). scale: fp32 ``[1]`` or ``[N]``.
        bias: None or ``[N]``. isa: ``auto`` (``LRQAT_CPU_ISA``, else the best), ``scalar``, ``avx2``, ``avx512``.
    """
    _ext.require_extension("binary_linear_cpu")
    if not hasattr(torch.ops.lrqat, "binary_linear_cpu"):
        raise RuntimeError("lrqat_kernels._C predates binary_linear_cpu: rebuild it (python setup.py build_ext --inplace)")
    _register_fake()
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    y = torch.ops.lrqat.binary_linear_cpu(x2, packed, scale.to(torch.float32), None if bias is None else bias.float(),
                                          in_features, isa)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


class PackedPQuantLinear(nn.Module):
    """Deployment form of a :class:`PQuantLinear`: ``y = x_q @ (step * W_code)^T (+ bias)``.

    Tensors:
        qweight: buffer; 1-bit: uint8 ``[out, ceil(in / 8)]`` (:func:`pack_signs`); else int8 ``[out, in]``.
        weight_scale: buffer fp32 ``[1]``: ``lam = mean|W|`` (1-bit) or ``max|W| / Q``.
        bias: buffer ``[out]`` or None.
    """

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, in_features: int, *, weight_bits: int = 1,
                 act_bits: int | None = 8, bias: torch.Tensor | None = None):
        super().__init__()
        _check_weight_bits(weight_bits)
        _check_act_bits(act_bits)
        want = torch.uint8 if weight_bits == 1 else torch.int8
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != want or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D {want} tensor for weight_bits={weight_bits}, "
                             f"got {getattr(qweight, 'dtype', type(qweight).__name__)}")
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).reshape(1))
        self.register_buffer("bias", bias)
        self.dequantize(torch.float32)  # checks in_features against the packed width

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_eff [out, in]``: the code times the scale, computed in fp32 (fp64 for fp64), cast to ``dtype``."""
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        if self.weight_bits == 1:
            code = unpack_signs(self.qweight, self.in_features, cdt)
        else:
            code = self.qweight.to(cdt)
        return (self.weight_scale.to(cdt).reshape(()) * code).to(dtype)

    #: 1-bit layers on CPU: run :func:`binary_linear` (the native GEMM; equal to fp32 rounding) instead of
    #: the exact dequantise-then-matmul path (bit-identical to training). Off by default.
    use_binary_kernel: bool = False

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = _cdt(x)
        x_q = _quant_input(x.to(cdt), self.act_bits)
        if self.use_binary_kernel and self.weight_bits == 1 and x.device.type == "cpu" and cdt == torch.float32:
            return binary_linear(x_q, self.qweight, self.weight_scale, self.bias, in_features=self.in_features).to(x.dtype)
        return F.linear(x_q.to(x.dtype), self.dequantize(cdt).to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        store = "1-bit packed 8/byte LSB-first" if self.weight_bits == 1 else f"int8 ({self.weight_bits}-bit)"
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={store}, act_bits={self.act_bits}"


class _SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` over three pQuant linears (training or packed)."""

    def __init__(self, gate_proj, up_proj, down_proj):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _ffn_forward(mod, x: torch.Tensor) -> torch.Tensor:
    """``beta * F_1bit(x) + alpha * p_e * F_8bit^(e)(x)``; sets ``mod.aux_loss`` (None for one expert)."""
    if x.dim() < 1 or x.shape[-1] != mod.d_model:
        raise ValueError(f"x must be [..., d_model] = [..., {mod.d_model}], got {tuple(x.shape)}")
    cdt = _cdt(x)
    x2 = x.reshape(-1, mod.d_model)
    f1 = mod.branch_1bit(x2).to(cdt)
    if len(mod.experts) == 1:
        f8 = mod.experts[0](x2).to(cdt)
        mod.aux_loss = None
    else:
        p = torch.softmax(F.linear(x2.to(cdt), mod.router_weight.to(cdt)), dim=-1)   # [T, N], fp32 (fp64)
        e = p.argmax(dim=-1)
        p_e = p.gather(1, e[:, None])
        f8 = torch.zeros_like(f1)
        for i, expert in enumerate(mod.experts):
            idx = (e == i).nonzero().squeeze(1)
            if idx.numel():  # only the routed expert runs; the others get no gradient
                f8 = f8.index_copy(0, idx, expert(x2.index_select(0, idx)).to(cdt) * p_e.index_select(0, idx))
        n = len(mod.experts)
        frac = torch.bincount(e, minlength=n).to(cdt) / max(e.numel(), 1)
        mod.aux_loss = mod.aux_loss_coef * n * (frac * p.mean(dim=0)).sum()
    y = mod.beta.to(cdt) * f1 + mod.alpha.to(cdt) * f8
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


class PQuantFFN(nn.Module):
    """pQuant's decoupled FFN (module docstring): 1-bit SwiGLU of width ``d_ff`` plus ``n_experts``
    ``weight_bits``-bit SwiGLU experts of width ``r`` (top-1 routed when ``n_experts > 1``).

    Tensors:
        branch_1bit.{gate,up,down}_proj.weight: latent ``[d_ff, d]``, ``[d_ff, d]``, ``[d, d_ff]``.
        experts[i].{gate,up,down}_proj.weight: latent ``[r, d]``, ``[r, d]``, ``[d, r]``.
        router.weight: ``[n_experts, d]`` (only when ``n_experts > 1``; fp32 routing, not quantised).
        alpha, beta: parameters fp32 ``[1]`` (2.0 on the 8-bit branch, 0.2 on the 1-bit branch).
        aux_loss: after a forward, the Switch load-balancing loss (0-d) to add to the training loss, or None.
    """

    def __init__(self, d_model: int, d_ff: int, r: int, *, n_experts: int = 1, alpha: float = 2.0, beta: float = 0.2,
                 weight_bits: int = 8, act_bits: int | None = 8, aux_loss_coef: float = 0.01, init_std: float = 0.02,
                 dtype=None, device=None, generator=None):
        super().__init__()
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        if weight_bits == 1:
            raise ValueError("weight_bits must be 2..8 for the high-precision branch, got 1")
        for name, v in (("alpha", alpha), ("beta", beta), ("aux_loss_coef", aux_loss_coef)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        self.d_model, self.d_ff, self.r, self.aux_loss_coef = d_model, d_ff, r, float(aux_loss_coef)
        kw = dict(act_bits=act_bits, init_std=init_std, dtype=dtype, device=device, generator=generator)

        def swiglu(width, bits):
            return _SwiGLU(PQuantLinear(d_model, width, weight_bits=bits, **kw),
                           PQuantLinear(d_model, width, weight_bits=bits, **kw),
                           PQuantLinear(width, d_model, weight_bits=bits, **kw))

        self.branch_1bit = swiglu(d_ff, 1)
        self.experts = nn.ModuleList(swiglu(r, weight_bits) for _ in range(n_experts))
        self.router = None
        if n_experts > 1:
            self.router = nn.Linear(d_model, n_experts, bias=False, dtype=torch.float32, device=device)
            with torch.no_grad():
                self.router.weight.copy_(torch.randn(n_experts, d_model, generator=generator) * init_std)
        self.alpha = nn.Parameter(torch.tensor([float(alpha)], device=device))
        self.beta = nn.Parameter(torch.tensor([float(beta)], device=device))
        self.aux_loss = None

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.weight

    def _apply(self, fn, recurse=True):
        # A module-wide .to(bf16) moves alpha, beta and the router but keeps them fp32, unrounded.
        keep = [self.alpha, self.beta] + ([] if self.router is None else [self.router.weight])
        before = [(t.data, None if t.grad is None else t.grad.data) for t in keep]
        super()._apply(fn, recurse)
        keep = [self.alpha, self.beta] + ([] if self.router is None else [self.router.weight])
        for t, (data, grad) in zip(keep, before):
            if t.dtype != data.dtype:
                t.data = data.to(device=t.device)
                if grad is not None and t.grad is not None:
                    t.grad.data = grad.to(device=t.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., d_model]`` -> ``[..., d_model]`` in x's dtype (routing and the sum in fp32, fp64 for fp64)."""
        return _ffn_forward(self, x)

    @torch.no_grad()
    def deploy(self) -> "PackedPQuantFFN":
        """Packed 1-bit branch, int8 experts, fp32 ``alpha`` / ``beta`` / router; same forward bit for bit."""
        def pack(s):
            return _SwiGLU(s.gate_proj.deploy(), s.up_proj.deploy(), s.down_proj.deploy())

        return PackedPQuantFFN(pack(self.branch_1bit), [pack(e) for e in self.experts],
                               None if self.router is None else self.router.weight.detach().float().clone(),
                               self.alpha.detach().clone(), self.beta.detach().clone(), self.aux_loss_coef)


class PackedPQuantFFN(nn.Module):
    """Deployment form of :class:`PQuantFFN` (buffers only): ``branch_1bit`` / ``experts`` of
    :class:`PackedPQuantLinear`, ``router_weight`` fp32 ``[N, d]`` (or None), ``alpha`` / ``beta`` fp32 ``[1]``."""

    def __init__(self, branch_1bit, experts, router_weight, alpha, beta, aux_loss_coef=0.01):
        super().__init__()
        self.branch_1bit, self.experts = branch_1bit, nn.ModuleList(experts)
        self.d_model = branch_1bit.gate_proj.in_features
        self.register_buffer("router_weight", router_weight)
        self.register_buffer("alpha", alpha.float().reshape(1))
        self.register_buffer("beta", beta.float().reshape(1))
        self.aux_loss_coef, self.aux_loss = aux_loss_coef, None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ffn_forward(self, x)


def average_weight_bits(p: float) -> float:
    """pQuant's average bits a weight with a share ``p`` of 8-bit weights: ``1 + 7 p``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"p must be a number in [0, 1], got {p!r}")
    return 1 + 7 * p


def pquant_weight_bits(model: nn.Module) -> dict:
    """Bit accounting over the pQuant linears of ``model`` (stored weights: every expert counts).

    Returns:
        ``{"weights": {bits: count}, "total": n, "high_precision_share": p, "average_bits": sum(bits * n_b) / n}``;
        with only 1- and 8-bit weights ``average_bits == 1 + 7 p``. Scales, router, norms, embeddings excluded.
    """
    counts: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, (PQuantLinear, PackedPQuantLinear)):
            counts[m.weight_bits] = counts.get(m.weight_bits, 0) + m.in_features * m.out_features
    total = sum(counts.values())
    if not total:
        raise ValueError("model holds no pQuant linear (PQuantLinear / PackedPQuantLinear)")
    high = sum(n for b, n in counts.items() if b > 1)
    return {"weights": counts, "total": total, "high_precision_share": high / total,
            "average_bits": sum(b * n for b, n in counts.items()) / total}
