"""(moves into reference.py) SASQ oracle: autograd through the naive straight-through graph."""

from __future__ import annotations

import torch

from .reference import scale_grad


def sasq_fake_quant(x: torch.Tensor, scale: torch.Tensor, *, bits: int = 8, grad_scale: float = 1.0) -> torch.Tensor:
    """SASQ's ``x_q = s * clip(round(x / s), Qn, Qp)`` by plain autograd (the oracle of ``lrqat_kernels.sasq``).

    Straight-through graph: ``v = x / s``, ``vc = torch.clamp(v, Qn, Qp)`` (inclusive: the gradient
    passes at ``v == Qn`` / ``Qp``), ``x_q = s * (vc + (round(vc) - vc).detach())``; ``s`` enters
    through ``reference.scale_grad(g)``. Computed in fp32 (fp64 if an input is), cast to x's dtype last.

    Args: as ``lrqat_kernels.sasq.sasq_fake_quant``.
    """
    from .sasq import check_sasq_args

    check_sasq_args(x, scale, bits=bits, grad_scale=grad_scale)
    cdt = torch.float64 if torch.float64 in (x.dtype, scale.dtype) else torch.float32
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = scale_grad(scale.to(cdt).reshape(()), grad_scale)
    vc = torch.clamp(x.to(cdt) / s, qn, qp)
    return (s * (vc + (torch.round(vc) - vc).detach())).to(x.dtype)
