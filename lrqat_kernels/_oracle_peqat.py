"""(moves into reference.py) PE-QAT oracle: autograd through the naive straight-through graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import scale_grad


def peqat_linear(x, w0, lora_A, lora_B, log_smooth, clip, bias=None, *, bits: int = 4, act_bits: int = 4,
                 alpha: float = 1.0, clip_grad_scale: float = 1.0, quantize: bool = True) -> torch.Tensor:
    """PE-QAT's ``y = x_q @ W_q^T + bias`` by plain autograd (the oracle of ``lrqat_kernels.peqat``).

    Straight-through graph: ``W_q = dw * (u + (clip(round(u)) - u).detach())`` with ``u = W_s / dw``
    and ``dw`` detached; ``x_c`` = ``x_s`` clipped to ``[-c, c]`` by ``torch.where`` (inclusive: the
    gradient goes to ``x_s`` at ``|x_s| == c``, to ``c`` beyond), ``v = x_c / da``,
    ``x_q = da * (v + (round(v) - v).detach())``. ``quantize=False`` drops both quantisers
    (``y = (x / s) @ (W' s)^T``: the smoothing must cancel). Compute in fp32 (fp64 if an input is).

    Args: as ``lrqat_kernels.peqat.peqat_linear``.
    """
    from .peqat import check_peqat_args

    check_peqat_args(x, w0, lora_A, lora_B, log_smooth, clip, bits=bits, act_bits=act_bits, alpha=alpha,
                     clip_grad_scale=clip_grad_scale)
    cdt = torch.float64 if any(t.dtype == torch.float64 for t in (x, w0, lora_A, log_smooth, clip)) else torch.float32
    qw, qa = 2 ** (bits - 1) - 1, 2 ** (act_bits - 1) - 1
    s = torch.exp(log_smooth.to(cdt))
    w_s = (w0.detach().to(cdt) + (alpha / lora_A.shape[0]) * (lora_B.to(cdt) @ lora_A.to(cdt))) * s
    x_s = x.to(cdt) / s
    if quantize:
        dw = (w_s.abs().amax(dim=1, keepdim=True) / qw).clamp_min(1e-30).detach()
        u = w_s / dw
        w_s = dw * (u + (torch.round(u).clamp(-qw, qw) - u).detach())
        c = clip.to(cdt).reshape(())
        c = scale_grad(c, clip_grad_scale)
        x_c = torch.where(x_s > c, c, torch.where(x_s < -c, -c, x_s))
        da = c / qa
        v = x_c / da
        x_s = da * (v + (torch.round(v) - v).detach())
    return F.linear(x_s.to(x.dtype), w_s.to(x.dtype), None if bias is None else bias.to(x.dtype))
