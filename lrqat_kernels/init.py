"""Initialisation of an LR-QAT layer: range estimation, round-to-nearest, LoRA and SVD init.

What ``LRQATLinear.from_linear`` runs once per layer before training (paper section 3,
``docs/NUMERICS.md`` "Init"): the initial scale ``s0`` (and zero point ``z``) of ``W0`` by min-max
or an L^p search (:func:`estimate_scale`), the RTN baseline (:func:`rtn_quantize`), and the
factors ``lora_A`` / ``lora_B`` (:func:`lora_init`, or :func:`svd_init` with ``Phi0``). Production
code, tested against hand-computed values and brute force in ``tests/test_reference.py``; the
oracle of the training math is ``reference.py``.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_group_size, check_tensor
from .formats import check_bits, decode_phi, encode_phi, qrange
from .reference import expand_groups, lowrank_product, range_with_zero

__all__ = [
    "LP_NORMS",
    "LP_CANDIDATES",
    "LP_MAX",
    "estimate_scale",
    "parse_range_method",
    "rtn_quantize",
    "rtn_w_int",
    "lora_init",
    "svd_init",
]

LP_NORMS = (2.0, 2.4, 3.0, 3.5, 4.0, 5.0)
LP_CANDIDATES = 100
LP_MAX = 32.0  # largest p accepted: the search sums |err|^p in fp64 over errors normalised to the range

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

    Beyond ``LP_MAX`` every candidate's ``sum |err|^p`` underflows to 0 and no candidate can win
    (the paper uses p in ``LP_NORMS``); ``tests/test_reference.py::test_range_method_must_be_a_usable_lp``.
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
    exponent costs an exp and a log a value, and the L^4 search runs it 100 times a weight)."""
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
    if w.is_meta:
        raise ValueError("w is on the meta device: estimate_scale needs the weight's values")
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
        # weights) nor overflows (huge weights)
        # (tests/test_reference.py::test_lp_search_is_exhaustive_and_scale_free).
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
