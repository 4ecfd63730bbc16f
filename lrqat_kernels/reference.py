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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_fake_quant_args, check_group_size, check_linear_args, check_tensor
from .formats import check_bits, decode_phi, encode_phi, qrange

__all__ = [
    "fake_quant_weight",
    "lrqat_linear",
    "lowrank_product",
    "quantize_z",
    "merge_weight",
    "estimate_scale",
    "rtn_quantize",
    "rtn_w_int",
    "lora_init",
    "svd_init",
    "expand_groups",
    "fake_quant_activation",
    "act_quant_params",
]

LP_NORMS = (2.0, 2.4, 3.0, 3.5, 4.0, 5.0)
LP_CANDIDATES = 100
LP_MAX = 32.0  # largest p accepted: the search sums |err|^p in fp64 over errors normalised to the range


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Broadcast a per-group tensor ``[out, in // g]`` to ``[out, in]`` (groups are contiguous columns)."""
    return t.repeat_interleave(group_size, dim=1)


def no_autocast(t: torch.Tensor):
    """A context that turns ``torch.autocast`` off for ``t``'s device (a no-op where it is off).

    NUMERICS computes ``C``, ``Z`` and ``W_int`` in fp32; inside an autocast region the matmul
    ``B @ A`` would run in bf16, and the training forward's integers would differ from the merge's
    (a review counted 317 of 131k ``W_int`` entries off in a trained layer). Only the forward is
    covered: call ``backward()`` outside the autocast region, as torch advises (inside it, this
    oracle's own ``B @ A`` backward would run in bf16; the package's Functions do not).
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
    w_int, _ = _w_int_and_dequant(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=None, check_values=True,
    )
    if torch.isnan(w_int).any():
        raise ValueError("cannot merge: W_int contains NaN (lora_A/lora_B hold non-finite values)")
    zp = None if zero_point is None else zero_point.detach().round().to(torch.int8)
    return w_int.to(torch.int8), scale.detach().float().clone(), zp


# ----------------------------------------------------------------------------------------------
# Range estimation, RTN and initialisation
# ----------------------------------------------------------------------------------------------


def rtn_w_int(
    w: torch.Tensor, scale: torch.Tensor, *, bits: int, zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Round-to-nearest integer weights ``clip(round(w / s + z), qmin, qmax)`` as float32 ``[out, in]``."""
    g = check_group_size(group_size, w.shape[1])
    qmin, qmax = qrange(bits)
    x = w.float() / expand_groups(scale.float(), g)
    if zero_point is not None:
        x = x + expand_groups(zero_point.float(), g)
    return torch.round(x).clamp(qmin, qmax)


def rtn_quantize(
    w: torch.Tensor, scale: torch.Tensor, *, bits: int, zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """RTN baseline: ``s * (clip(round(w / s + z), qmin, qmax) - z)`` in ``w.dtype``.

    Args:
        w: ``[out, in]`` float weight. scale: ``[out, 1]`` or ``[out, in // group_size]``.
    """
    check_tensor("w", w, dim=2)
    check_bits(bits)
    g = check_group_size(group_size, w.shape[1])
    q = rtn_w_int(w, scale, bits=bits, zero_point=zero_point, group_size=group_size)
    if zero_point is not None:
        q = q - expand_groups(zero_point.float(), g)
    return (expand_groups(scale.float(), g) * q).to(w.dtype)


def parse_range_method(method: str, name: str = "method") -> float | None:
    """``"minmax"`` -> None; ``"lp:<p>"`` -> p, a finite number in (0, LP_MAX]; else ValueError naming ``name``.

    ``lp:inf`` or a p of 64 would make every candidate's ``sum |err|^p`` underflow to 0, and the
    search would keep its first candidate, 1 % of the range (the paper uses p in ``LP_NORMS``).
    """
    if method == "minmax":
        return None
    if isinstance(method, str) and method.startswith("lp:"):
        try:
            p = float(method[3:])
        except ValueError:
            p = None
        if p is not None and math.isfinite(p) and 0 < p <= LP_MAX:
            return p
    raise ValueError(f"{name} must be 'minmax' or 'lp:<p>' with 0 < p <= {LP_MAX:g} (paper: p in {LP_NORMS}), "
                     f"got {method!r}")


def range_with_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric range ``[lo, hi]`` widened to hold 0 (weights and activations alike).

    The grid ``s * (q - z)``, q and z integers in ``[qmin, qmax]``, always holds 0 (q = z). A range
    without 0 would need z outside ``[qmin, qmax]``, and clamping z shifts the whole grid off the
    values (a group in [1.0, 1.4] came out near [0, 0.4]).
    """
    return lo.clamp_max(0.0), hi.clamp_min(0.0)


def _lp_row_chunks(rows: torch.Tensor, elems: int = 1 << 16):
    """``(start, stop)`` row ranges of about ``elems`` values: each range's temporaries stay in
    cache across the candidates (the search is memory-bound when it sweeps the whole matrix)."""
    n = max(1, elems // max(1, rows.shape[1]))
    return [(r0, min(r0 + n, rows.shape[0])) for r0 in range(0, rows.shape[0], n)]


def _lp_run(search, rows: torch.Tensor) -> None:
    """Run ``search(r0, r1)`` over the row ranges of ``rows``.

    On the CPU each range runs single-threaded and the ranges are spread over the intra-op
    thread count with a thread pool (torch ops release the GIL): OpenMP's fork/join on every
    small op made 2 threads 10-20x slower than 1 on a loaded 2-core machine. On an accelerator
    the whole matrix is one range (few, large launches).
    """
    if rows.device.type != "cpu":
        search(0, rows.shape[0])
        return
    chunks = _lp_row_chunks(rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads > 1 and len(chunks) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(threads, len(chunks))) as pool:
                for f in [pool.submit(search, r0, r1) for r0, r1 in chunks]:
                    f.result()
        else:
            for r0, r1 in chunks:
                search(r0, r1)
    finally:
        torch.set_num_threads(threads)


def _lp_sum(err: torch.Tensor, p: float) -> torch.Tensor:
    """``sum |err|^p`` over the last dim; integer ``p`` by products (``pow`` with a non-integer
    exponent costs an exp and a log a value; the L^4 search of a 135M model took minutes)."""
    d = err.abs_()
    if p == 4.0:
        d.mul_(d)
        d.mul_(d)
    elif p == 2.0:
        d.mul_(d)
    else:
        d.pow_(p)
    return d.sum(-1)


@torch.no_grad()
def estimate_scale(
    w: torch.Tensor, bits: int, method: str = "minmax", group_size: int | None = None, symmetric: bool = True,
):
    """Range estimation for ``s0`` (and ``z`` when asymmetric), per channel or per group, in fp32.

    ``minmax``: symmetric ``s0 = max|w| / qmax``; asymmetric ``s0 = (max - min) / (qmax - qmin)``,
    ``z = clip(round(qmin - min / s0))``, with ``min <= 0 <= max`` (the range is widened to hold 0:
    the grid ``s (q - z)`` with ``z`` in ``[qmin, qmax]`` always does).
    ``lp:<p>``: candidate ranges ``k / 100`` of the min-max range, k = 1..100; keep the k
    minimising ``sum |w - q(w; s)|^p`` of the RTN quantizer (first k on ties). Asymmetric
    ranges shrink about the midpoint, and each tries zero points ``round(qmin - lo / s) + {-2..2}``.

    Args:
        w: ``[out, in]`` float weight.
        bits: 2..8.
        group_size: None for per-channel or a divisor of ``in``.

    Returns:
        ``s0`` float32 ``[out, n_groups]`` when symmetric; ``(s0, z)`` (z float32, integer
        valued, same shape) when asymmetric.
    """
    check_tensor("w", w, dim=2)
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    check_bits(bits)
    if not torch.isfinite(w).all():
        raise ValueError("w holds NaN or Inf values: no range can be estimated for them")
    p = parse_range_method(method)
    g = check_group_size(group_size, w.shape[1])
    qmin, qmax = qrange(bits)
    wg = w.detach().float().reshape(w.shape[0], w.shape[1] // g, g)
    eps = 1e-8  # the scale of an all-zero row or group (any scale is exact there)
    if symmetric:
        amax = wg.abs().amax(-1)
        if p is None:
            return amax.clamp_min(eps) / qmax
        # The search runs on the row normalised to max |w| = 1, in fp64: which candidate wins does
        # not depend on the row's magnitude, and sum |err|^p neither underflows (large p, tiny
        # weights) nor overflows (huge weights) as it did in fp32.
        unit = torch.where(amax > 0, amax, 1.0)
        wn = (wg / unit[..., None]).double().reshape(-1, g)
        best_t = torch.empty(wn.shape[0], dtype=torch.float32, device=wn.device)

        def search(r0, r1):
            rows = wn[r0:r1]
            best_err = torch.full((r1 - r0,), float("inf"), dtype=torch.float64, device=wn.device)
            best = torch.ones(r1 - r0, dtype=torch.float32, device=wn.device)
            for k in range(1, LP_CANDIDATES + 1):
                t = k / LP_CANDIDATES / qmax
                q = torch.round(rows / t).clamp_(qmin, qmax)
                err = _lp_sum(rows - q * t, p)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, torch.full_like(best, k / LP_CANDIDATES), best)
            best_t[r0:r1] = best

        _lp_run(search, wn)
        best_t = best_t.reshape(amax.shape)
        return torch.where(amax > 0, amax * best_t / qmax, eps / qmax)

    lo, hi = range_with_zero(wg.amin(-1), wg.amax(-1))
    span = hi - lo

    def zp_for(s, lo_k):
        return torch.round(qmin - lo_k / s).clamp(qmin, qmax)

    if p is None:
        s = span.clamp_min(eps) / (qmax - qmin)
        return s, zp_for(s, lo)
    # Normalised to span = 1 in fp64, as the symmetric search; z = round(qmin - lo / s) does not
    # change under the normalisation.
    unit = torch.where(span > 0, span, 1.0)
    wn = (wg / unit[..., None]).double().reshape(-1, g)
    lo_n, hi_n = (lo / unit).double().reshape(-1), (hi / unit).double().reshape(-1)
    mid = (hi_n + lo_n) / 2
    best_frac = torch.ones_like(lo_n)
    best_z = zp_for(torch.full_like(lo_n, 1.0 / (qmax - qmin)), lo_n)

    def search(r0, r1):
        rows, mid_r = wn[r0:r1], mid[r0:r1]
        best_err = torch.full((r1 - r0,), float("inf"), dtype=torch.float64, device=wn.device)
        frac_r, z_r = best_frac[r0:r1], best_z[r0:r1]
        for k in range(1, LP_CANDIDATES + 1):
            frac = k / LP_CANDIDATES
            s = frac / (qmax - qmin)
            z0 = zp_for(s, mid_r - frac / 2)
            for dz in (-2, -1, 0, 1, 2):
                z = (z0 + dz).clamp(qmin, qmax)
                q = torch.round(rows / s + z[:, None]).clamp_(qmin, qmax)
                err = _lp_sum(rows - (q - z[:, None]) * s, p)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                frac_r = torch.where(better, torch.full_like(frac_r, frac), frac_r)
                z_r = torch.where(better, z, z_r)
        best_frac[r0:r1], best_z[r0:r1] = frac_r, z_r

    _lp_run(search, wn)
    best_frac, best_z = best_frac.reshape(span.shape), best_z.reshape(span.shape)
    s = torch.where(span > 0, span * best_frac.float() / (qmax - qmin), eps / (qmax - qmin))
    z = torch.where(span > 0, best_z.float(), zp_for(s, lo))
    return s, z


def lora_init(out_features: int, in_features: int, rank: int, *, dtype=torch.float32, device=None, generator=None):
    """LoRA init (NUMERICS "Init"): ``lora_A ~ U(+-1/sqrt(in))`` ``[r, in]`` (kaiming_uniform, a=sqrt(5)), ``lora_B = 0`` ``[out, r]``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    bound = 1.0 / math.sqrt(in_features)
    lora_A = torch.empty(rank, in_features, dtype=torch.float32, device=device)
    lora_A.uniform_(-bound, bound, generator=generator)
    lora_B = torch.zeros(out_features, rank, dtype=torch.float32, device=device)
    return lora_A.to(dtype), lora_B.to(dtype)


@torch.no_grad()
def svd_init(
    x: torch.Tensor, rank: int, *, bits: int, phi_format: str, alpha: float = 1.0, steps: int = 1,
    dtype=torch.float32,
):
    """LoftQ-style initialisation of Phi0, lora_A, lora_B (paper section 3, "SVD-based init").

    Alternates ``T = steps`` times, starting from ``C = 0``:
    ``Phi0 = phi(x - C)``, then ``C = SVD_r(x - decode(Phi0))`` (best rank-r fit of what the
    downcast lost); returns the last ``Phi0`` with the ``C`` fitted to it (as LoftQ). ``C`` is split as ``lora_B = U sqrt(S) sqrt(r/alpha)``, ``lora_A = sqrt(S) V^T sqrt(r/alpha)``
    so that ``(alpha / r) lora_B @ lora_A = C``.

    Args:
        x: ``W0 / s0 + z`` in grid units, ``[out, in]``.
        rank: r >= 1 (at most ``min(out, in)``).
        steps: T >= 1 alternations.

    Returns:
        ``(phi, lora_A [r, in], lora_B [out, r])``; factors in ``dtype``.
    """
    check_tensor("x", x, dim=2)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(x.shape):
        raise ValueError(f"rank must be an int in 1..min(out, in)={min(x.shape)}, got {rank!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    x = x.float()
    c = torch.zeros_like(x)
    lora_A = lora_B = None
    for _ in range(steps):
        phi = encode_phi(x - c, bits, phi_format)
        residual = x - decode_phi(phi, bits, phi_format)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = (s[:rank] * (rank / alpha)).sqrt()
        lora_B = u[:, :rank] * root
        lora_A = root[:, None] * vh[:rank]
        c = lowrank_product(lora_A, lora_B, alpha)
    return phi, lora_A.to(dtype), lora_B.to(dtype)


# ----------------------------------------------------------------------------------------------
# Activation / KV-cache fake quantisation (weight-activation settings, paper Table 5)
# ----------------------------------------------------------------------------------------------

ACT_BITS = (4, 8)


def check_act_bits(name: str, bits, *, optional: bool = False) -> None:
    """``bits`` an int in :data:`ACT_BITS` (None too when ``optional``); 8.0 or True are refused."""
    if optional and bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ACT_BITS:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}one of {ACT_BITS} (a Python int), "
                         f"got {bits!r}")


def check_act_args(x, bits, symmetric) -> None:
    check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_act_bits("bits", bits)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")


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
    check_act_args(x, bits, symmetric)
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


def check_rms_norm_args(x, weight, eps) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight)
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"x and weight must be floating-point, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [hidden] = [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}: they must share a device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


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
    check_rms_norm_args(x, weight, eps)
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


def check_swiglu_args(gate, up) -> None:
    check_tensor("gate", gate)
    check_tensor("up", up)
    if not gate.is_floating_point() or gate.dtype != up.dtype:
        raise TypeError(f"gate and up must be floating-point tensors of one dtype, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.dim() < 1 or gate.shape[-1] < 1:
        raise ValueError(f"gate and up must have one non-empty shape [..., intermediate], got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device}, up on {up.device}: they must share a device")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """LLaMA's MLP product ``silu(gate) * up``, op for op as transformers' ``LlamaMLP``."""
    return F.silu(gate) * up


def swiglu_fake_quant(gate: torch.Tensor, up: torch.Tensor, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """``fake_quant_activation(silu(gate) * up, bits, symmetric)``: the input of ``down_proj``,
    quantised per token; straight-through, so the gradients are SwiGLU's."""
    check_swiglu_args(gate, up)
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
