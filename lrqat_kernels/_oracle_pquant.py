"""(moves into reference.py) pQuant oracle: autograd through the naive straight-through graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ste(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, identity gradient to ``t``: ``value.detach() + (t - t.detach())``."""
    return value.detach() + (t - t.detach())


def binarize_weight(w: torch.Tensor) -> torch.Tensor:
    """``lam * Sign(w - mean w)``, ``lam = mean|w|``, ``Sign(0) = -1``; straight-through, fp32 (fp64) then cast."""
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    u = w.to(cdt)
    value = u.abs().mean() * torch.where(u - u.mean() > 0, 1.0, -1.0).to(cdt)
    return _ste(u, value).to(w.dtype)


def absmax_quant(t: torch.Tensor, *, bits: int = 8, per_token: bool = True) -> torch.Tensor:
    """``step * clip(round(t / step), -Q - 1, Q)``, ``step = max(max|t|, 1e-5) / Q`` per row or per tensor;
    straight-through (the step detached)."""
    cdt = torch.float64 if t.dtype == torch.float64 else torch.float32
    u = t.to(cdt)
    q = 2 ** (bits - 1) - 1
    a = u.abs().amax(dim=-1, keepdim=True) if per_token else u.abs().amax()
    step = a.clamp_min(1e-5) / q
    return _ste(u, torch.round(u / step).clamp(-q - 1, q) * step).to(t.dtype)


def pquant_linear(x, weight, bias=None, *, weight_bits: int = 1, act_bits: int | None = 8) -> torch.Tensor:
    """pQuant's linear by plain autograd (the oracle of ``lrqat_kernels.pquant.pquant_linear``)."""
    from .pquant import check_pquant_args

    check_pquant_args(x, weight, bias, weight_bits=weight_bits, act_bits=act_bits)
    cdt = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    x_q = x.to(cdt) if act_bits is None else absmax_quant(x.to(cdt), bits=act_bits)
    w = weight.to(cdt)
    w_q = binarize_weight(w) if weight_bits == 1 else absmax_quant(w, bits=weight_bits, per_token=False)
    return F.linear(x_q.to(x.dtype), w_q.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _swiglu(s, x):
    def lin(m, t):
        return pquant_linear(t, m.weight, m.bias, weight_bits=m.weight_bits, act_bits=m.act_bits)

    return lin(s.down_proj, F.silu(lin(s.gate_proj, x)) * lin(s.up_proj, x))


def pquant_ffn(ffn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(FFN(x), aux_loss)`` of a ``PQuantFFN``'s tensors, every expert computed densely on every token
    and selected by a one-hot mask (unselected experts get exactly zero gradient through the mask)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, ffn.d_model)
    f1 = _swiglu(ffn.branch_1bit, x2).to(cdt)
    outs = torch.stack([_swiglu(e, x2).to(cdt) for e in ffn.experts])        # [N, T, d]
    aux = None
    if len(ffn.experts) == 1:
        f8 = outs[0]
    else:
        n = len(ffn.experts)
        p = torch.softmax(x2.to(cdt) @ ffn.router.weight.to(cdt).t(), dim=-1)  # [T, N]
        onehot = F.one_hot(p.argmax(-1), n).to(p.dtype)                       # [T, N]
        f8 = torch.einsum("tn,ntd->td", onehot * p, outs)
        aux = ffn.aux_loss_coef * n * (onehot.mean(0) * p.mean(0)).sum()
    y = ffn.beta.to(cdt) * f1 + ffn.alpha.to(cdt) * f8
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1]), aux
