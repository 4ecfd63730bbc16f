"""(moves into reference.py) L4Q oracle: autograd through the naive straight-through graph."""

from __future__ import annotations

import torch

from .reference import scale_grad


def l4q_fake_quant_weight(w0, lora_A, lora_B, scale, offset, *, bits: int, alpha: float = 1.0,
                          group_size: int | None = None, grad_scale: float | None = None,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """L4Q's ``W_q = s * clip(round((W0 + (alpha/r) B A - b) / s)) + b`` by plain autograd (the oracle).

    The straight-through graph of METHODS (LSQ / LSQ+): ``vc = clamp(v, qmin, qmax)``,
    ``q = vc + (round(vc) - vc).detach()``, ``W_q = q * s + b``; torch.clamp's backward passes the
    gradient at the bounds (inclusive mask). ``s`` and ``b`` enter through an identity whose
    gradient is scaled by ``grad_scale`` (default LSQ's ``1 / sqrt(group_size * qmax)``).

    Args:
        w0: float ``[out, in]`` (frozen). lora_A ``[r, in]``, lora_B ``[out, r]``.
        scale, offset: float ``[out, G]``. bits: 2..8. group_size: None (per-channel) or a divisor of in.
        out_dtype: dtype of ``W_q``; default ``lora_A.dtype``.

    Returns:
        ``W_q [out, in]`` in ``out_dtype``, computed in fp32 (fp64 when an input is fp64).
    """
    from .formats import qrange
    from .l4q import check_l4q_args

    g, gs = check_l4q_args(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, group_size=group_size,
                           grad_scale=grad_scale)
    cdt = torch.float64 if any(t.dtype == torch.float64 for t in (w0, lora_A, lora_B, scale, offset)) else torch.float32
    qmin, qmax = qrange(bits)
    s = scale_grad(scale.to(cdt), gs).repeat_interleave(g, 1)
    b = scale_grad(offset.to(cdt), gs).repeat_interleave(g, 1)
    w_comb = w0.detach().to(cdt) + (alpha / lora_A.shape[0]) * (lora_B.to(cdt) @ lora_A.to(cdt))
    vc = ((w_comb - b) / s).clamp(qmin, qmax)
    q = vc + (torch.round(vc) - vc).detach()
    return (q * s + b).to(out_dtype or lora_A.dtype)
