"""Dynamic per-token activation fake quantisation in one Triton kernel.

Semantics: :func:`lrqat_kernels.reference.fake_quant_activation` (scale and zero point from the
row's min/max with 0 included, detached; straight-through backward).

Why a kernel: eager PyTorch does min, max, divide, round, clamp, multiply as separate passes over
the activations, each a full read and write of ``[tokens, hidden]``. Here one program owns one
row (a tile of several narrow rows), held in registers up to 16384 wide: it reduces min/max
(and a NaN flag) and writes ``x_hat``. HBM sees one read and one write. The backward is the identity (STE), so autograd
saves nothing.

The same kernel (:func:`_act_quant_kernel`, ``KIND``) also makes the values it quantises: RMSNorm
(``ops/norm_act_quant.py``) or SwiGLU (``ops/swiglu_act_quant.py``), so the producers of linear
inputs quantise their outputs in the pass that writes them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._checks import check_act_args
from ..formats import qrange
from ..reference import fake_quant_activation as _reference_fake_quant_activation
from ._launch import kernels_run_on, on_device
from ._triton_quant import cast, round_clip, round_half_even



@triton.jit
def act_qparams(lo, hi, has_nan, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Per-token ``(s, z)`` (fp32, shaped like ``lo``) from the row's range ``lo <= 0 <= hi`` and NaN flag,
    as :func:`lrqat_kernels.reference.act_quant_params`. Divisions are IEEE (``div_rn``): Triton's
    ``/`` on fp32 is ``div.full.f32`` (2 ulp) on NVIDIA GPUs and would move rounding boundaries."""
    if SYMMETRIC:
        s = tl.maximum(tl.div_rn(tl.maximum(hi, -lo), QMAX * 1.0), 1e-8)
        z = tl.zeros_like(s)
    else:
        s = tl.maximum(tl.div_rn(hi - lo, (QMAX - QMIN) * 1.0), 1e-8)
        z = round_half_even(QMIN - tl.div_rn(lo, s))
    return tl.where(has_nan, float("nan"), s), z


@triton.jit
def row_reciprocal(s, INTERPRET: tl.constexpr):
    """``r = 1 / s`` correctly rounded (IEEE ``div_rn``), once per row, for :func:`div_by_row`."""
    if INTERPRET:
        return s  # unused there: the interpreter divides
    else:
        return tl.div_rn(1.0, s)


@triton.jit
def div_by_row(v, s, r, INTERPRET: tl.constexpr):
    """``v / s`` rounded as IEEE division, from the row's ``r = RN(1 / s)``: a multiply and two FMA
    corrections a value (5 instructions) instead of a ``div.rn.f32`` (reciprocal, refinement,
    range check, branch to a slow path: ~10 and a branch, a quarter of the quantiser's work).

    Why it is exact: ``q0 = RN(v r)`` is within ~1.5 ulp of ``Q = v / s`` (``r`` and the product
    are each rounded), not always within one. One correction, ``t0 = RN(q0 s - v)``,
    ``q1 = RN(q0 - t0 r)``, leaves ``Q`` plus an error of ~``4 u^2 |Q|`` (``u = 2^-24``) before
    its rounding, so ``q1`` is within 1 ulp of ``Q``. Markstein's theorem (``r`` within half an
    ulp of ``1 / s``, ``q1`` within one ulp of ``Q``) then makes ``t1 = q1 s - v`` exact in one
    FMA and ``q2 = RN(q1 - t1 r) = RN(Q)``. (A single correction is exact in all but a few cases;
    a review found operands where ``q0`` is 1.25 ulp off and ``t0`` inexact.) Conditions: no
    overflow (``|Q| <= 255``) and ``r`` normal (``1e-8 <= s`` and ``s <= max|v| / 7 < 2^126``);
    a quotient below 2^-126 can be an ulp off, which no rounding to the integer grid after
    ``+ z`` can see (the sign is right). Zeros keep their sign (``t`` is taken as ``q s - v``, not
    ``v - q s``). A row with an Inf (or whose range overflows) has ``s = Inf`` and gives NaN, as
    the reference (``s * (q - z)`` is ``Inf * 0`` there). tests/test_act_quant.py checks a
    step-by-step exact-arithmetic model against IEEE division. The interpreter's ``fma`` is
    not fused: it divides instead.
    """
    if INTERPRET:
        return tl.div_rn(v, s)
    else:
        q0 = v * r
        t0 = tl.fma(q0, s, -v)
        q1 = tl.fma(-t0, r, q0)
        t1 = tl.fma(q1, s, -v)
        return tl.fma(-t1, r, q1)


@triton.jit
def act_fake_quant(v, s, z, r, QMIN: tl.constexpr, QMAX: tl.constexpr, INTERPRET: tl.constexpr):
    """``s * (clip(round(v / s + z), qmin, qmax) - z)`` in fp32 (``r``: :func:`row_reciprocal` of
    ``s``); NaN stays NaN, as torch.clamp."""
    q, _ = round_clip(div_by_row(v, s, r, INTERPRET) + z, QMIN, QMAX)
    return s * (q - z)


#: What a row's values are, before the quantiser (the ``KIND`` of :func:`_act_quant_kernel`).
KIND_IDENTITY, KIND_RMS_NORM, KIND_SWIGLU = 0, 1, 2


@triton.jit
def _norm_out(v, w, rstd, H_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """RMSNorm's output in fp32, rounded as torch rounds it: ``(w * (v * rstd).to(H)).to(O)``."""
    h = cast(v * rstd, H_DTYPE, INTERPRET).to(tl.float32)
    return cast(w * h, O_DTYPE, INTERPRET).to(tl.float32)


@triton.jit
def _exp(x, INTERPRET: tl.constexpr):
    """``exp`` as torch's CUDA kernels compute it: libdevice's ``expf`` (exact range reduction, then
    ``ex2.approx``; <= 2 ulp). Triton's ``tl.exp`` is ``ex2.approx(x * log2(e))`` with the product
    rounded first: ~10 ulp at |x| = 30. The interpreter (numpy) has no libdevice: ``tl.exp`` there."""
    if INTERPRET:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _swiglu_out(g, u, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """``(silu(g).to(DT) * u).to(DT)`` in fp32, rounded as torch rounds it for 16-bit tensors:
    ``silu(g) = g / (1 + exp(-g))`` as torch's CUDA kernel (IEEE division, libdevice ``expf``)."""
    a = cast(tl.div_rn(g, 1.0 + _exp(-g, INTERPRET)), DT, INTERPRET).to(tl.float32)
    return cast(a * u, DT, INTERPRET).to(tl.float32)


@triton.jit
def _produce(a, b, rstd, KIND: tl.constexpr, H_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """The values to quantise, fp32, from the loaded operands (``b`` unused for the identity)."""
    if KIND == 1:
        return _norm_out(a, b, rstd, H_DTYPE, O_DTYPE, INTERPRET)
    elif KIND == 2:
        return _swiglu_out(a, b, O_DTYPE, INTERPRET)
    else:
        return a


@triton.jit
def _load_produce(a_row, b_row, offs, m, rstd, KIND: tl.constexpr, H_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr,
                  INTERPRET: tl.constexpr):
    a = tl.load(a_row + offs, mask=m, other=0.0).to(tl.float32)
    b = a
    if KIND != 0:
        b = tl.load(b_row + offs, mask=m, other=0.0).to(tl.float32)
    return _produce(a, b, rstd, KIND, H_DTYPE, O_DTYPE, INTERPRET)


@triton.jit
def _load_operands(a_ptr, b_ptr, rows, rmask, cols, n_cols, stride_a, stride_b, KIND: tl.constexpr):
    """``[ROWS, BLOCK]`` tiles of ``a`` and ``b`` (fp32; ``b`` is ``a`` for the identity, the
    ``[1, BLOCK]`` norm weight for RMSNorm) at columns ``cols``, and their mask."""
    cmask = cols < n_cols
    m = rmask[:, None] & cmask[None, :]
    a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b = a
    if KIND == 1:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    elif KIND == 2:
        b = tl.load(b_ptr + rows[:, None] * stride_b + cols[None, :], mask=m, other=0.0).to(tl.float32)
    return a, b, m


@triton.jit
def _range_parts(v, m, KIND: tl.constexpr):
    """Per-element ``(min(v, 0), max(v, 0), isnan(v))`` where ``m`` (0 elsewhere): combined
    elementwise across a row's tiles, then reduced once.

    Rule: the quantiser (KIND 0) and SwiGLU (KIND 2) leave the mask out of the row's range and
    NaN flag (here and in the chunk loop of :func:`_act_quant_kernel`). Their masked lanes load 0
    and produce exactly +0 (``silu(0) * 0``), which the range holds anyway and which is no NaN, so
    the result is the same, and the mask stays unused until the store instead of live across the
    row reductions. With it live, Triton 3.9's code for a 16384-wide SwiGLU row without
    16-divisibility hints spilled 52 B a thread under its sm_90 ptxas (CUDA 13.4); held by
    tests/test_act_quant.py::test_aot_compiles_without_spills_or_approximate_math. RMSNorm
    (KIND 1) masks: its masked lanes are ``w * (0 * rstd)``, NaN when ``rstd`` is Inf.
    """
    if KIND == 1:
        return tl.where(m, tl.minimum(v, 0.0), 0.0), tl.where(m, tl.maximum(v, 0.0), 0.0), (m & (v != v)).to(tl.int32)
    else:
        return tl.minimum(v, 0.0), tl.maximum(v, 0.0), (v != v).to(tl.int32)


@triton.jit
def _rstd(sum_sq, n_cols, eps):
    """``rsqrt(mean(x^2) + eps)`` with IEEE division and square root."""
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sum_sq, n_cols * 1.0) + eps))


@triton.jit
def _act_quant_kernel(
    a_ptr, b_ptr, y_ptr,
    n_rows, n_cols, stride_a, stride_b, stride_y, eps,
    KIND: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, QUANT: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, ONE_CHUNK: tl.constexpr, INTERPRET: tl.constexpr,
    NCHUNK: tl.constexpr = 1,
):
    """``y[row] = fake_quant(produce(a[row], b[row]))`` (``QUANT``) or ``produce(...)``;
    grid ``(cdiv(n_rows, ROWS),)``.

    ``KIND`` 0: ``a`` itself (``b`` unused); 1: RMSNorm of ``a`` with weight ``b`` (``stride_b = 0``:
    every row reads the same weight) and ``eps``; 2: ``silu(a) * b``. Intermediate roundings
    follow ``a``'s dtype and the output's (``y``'s) as torch does. ``ONE_CHUNK``: ``ROWS`` rows
    of at most ``NCHUNK * BLOCK`` each are held in registers as ``NCHUNK`` (1 or 3) ``[ROWS,
    BLOCK]`` tiles, loaded once (narrow rows, such as queries and keys per head, share a program;
    three tiles only with ``ROWS = 1``: an 11008-wide row is 3 x 4096 lanes, 10 % of them
    masked, not the 33 % of one 16384-wide tile); else (``ROWS = 1``) each pass (sum of squares,
    range, write) loops over ``BLOCK``-wide chunks, re-reading them from L1/L2.
    """
    H_DTYPE: tl.constexpr = a_ptr.dtype.element_ty
    O_DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if ONE_CHUNK:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: rows * stride can pass 2^31
        rmask = rows < n_rows
        # One or three tiles, unrolled by hand (separate values: Triton has no lists). Two or four
        # would never cover a row with fewer lanes than one tile of twice or four times the width.
        a0, b0, m0 = _load_operands(a_ptr, b_ptr, rows, rmask, cols, n_cols, stride_a, stride_b, KIND)
        if NCHUNK == 3:
            a1, b1, m1 = _load_operands(a_ptr, b_ptr, rows, rmask, cols + BLOCK, n_cols, stride_a, stride_b, KIND)
            a2, b2, m2 = _load_operands(a_ptr, b_ptr, rows, rmask, cols + 2 * BLOCK, n_cols, stride_a, stride_b, KIND)
        rstd = 1.0
        if KIND == 1:
            sq = a0 * a0
            if NCHUNK == 3:
                sq += a1 * a1 + a2 * a2
            rstd = _rstd(tl.sum(sq, axis=1), n_cols, eps)[:, None]
        v0 = _produce(a0, b0, rstd, KIND, H_DTYPE, O_DTYPE, INTERPRET)
        if NCHUNK == 3:
            v1 = _produce(a1, b1, rstd, KIND, H_DTYPE, O_DTYPE, INTERPRET)
            v2 = _produce(a2, b2, rstd, KIND, H_DTYPE, O_DTYPE, INTERPRET)
        if QUANT:
            lo, hi, nan = _range_parts(v0, m0, KIND)  # 0 is always in the range
            if NCHUNK == 3:
                lo1, hi1, nan1 = _range_parts(v1, m1, KIND)
                lo2, hi2, nan2 = _range_parts(v2, m2, KIND)
                lo, hi, nan = tl.minimum(lo, tl.minimum(lo1, lo2)), tl.maximum(hi, tl.maximum(hi1, hi2)), nan | nan1 | nan2
            s, z = act_qparams(tl.min(lo, axis=1), tl.max(hi, axis=1), tl.max(nan, axis=1) > 0, QMIN, QMAX, SYMMETRIC)
            r = row_reciprocal(s, INTERPRET)
            s, z, r = s[:, None], z[:, None], r[:, None]
            v0 = act_fake_quant(v0, s, z, r, QMIN, QMAX, INTERPRET)
            if NCHUNK == 3:
                v1 = act_fake_quant(v1, s, z, r, QMIN, QMAX, INTERPRET)
                v2 = act_fake_quant(v2, s, z, r, QMIN, QMAX, INTERPRET)
        y_rows = y_ptr + rows[:, None] * stride_y
        tl.store(y_rows + cols[None, :], cast(v0, O_DTYPE, INTERPRET), mask=m0)
        if NCHUNK == 3:
            tl.store(y_rows + (cols + BLOCK)[None, :], cast(v1, O_DTYPE, INTERPRET), mask=m1)
            tl.store(y_rows + (cols + 2 * BLOCK)[None, :], cast(v2, O_DTYPE, INTERPRET), mask=m2)
    else:
        row = tl.program_id(0).to(tl.int64)
        a_row = a_ptr + row * stride_a
        b_row = b_ptr + row * stride_b
        y_row = y_ptr + row * stride_y
        rstd = 1.0
        if KIND == 1:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                a = tl.load(a_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
                acc += a * a
            rstd = _rstd(tl.sum(acc, axis=0), n_cols, eps)
        s = 1.0
        z = 0.0
        r = 1.0
        if QUANT:
            lo = tl.zeros([BLOCK], dtype=tl.float32)
            hi = tl.zeros([BLOCK], dtype=tl.float32)
            if KIND == 1:
                nan = tl.zeros([BLOCK], dtype=tl.int32)
                for start in range(0, n_cols, BLOCK):
                    m = start + cols < n_cols
                    v = _load_produce(a_row, b_row, start + cols, m, rstd, KIND, H_DTYPE, O_DTYPE, INTERPRET)
                    lo = tl.minimum(lo, tl.where(m, v, 0.0))
                    hi = tl.maximum(hi, tl.where(m, v, 0.0))
                    nan = nan | (m & (v != v)).to(tl.int32)
                has_nan = tl.max(nan, axis=0) > 0
            else:
                # No mask (masked lanes are +0: _range_parts) and no NaN accumulator: a NaN stays
                # in its lane's ``hi`` (max.NaN) and flags the row, whose outputs are all NaN (s is
                # NaN) whatever its range. At 16 warps ptxas 13.4 (Triton 3.9's for sm_90) holds
                # this loop at 64 registers: with the mask and a third [BLOCK] accumulator it
                # spilled 4-8 B (tests/test_act_quant.py::test_aot_compiles_without_spills_or_approximate_math).
                for start in range(0, n_cols, BLOCK):
                    m = start + cols < n_cols
                    v = _load_produce(a_row, b_row, start + cols, m, rstd, KIND, H_DTYPE, O_DTYPE, INTERPRET)
                    lo = tl.minimum(lo, v)
                    hi = tl.maximum(hi, v, propagate_nan=tl.PropagateNan.ALL)
                has_nan = tl.max((hi != hi).to(tl.int32), axis=0) > 0
            s, z = act_qparams(tl.min(lo, axis=0), tl.max(hi, axis=0), has_nan, QMIN, QMAX, SYMMETRIC)
            r = row_reciprocal(s, INTERPRET)
        for start in range(0, n_cols, BLOCK):
            m = start + cols < n_cols
            v = _load_produce(a_row, b_row, start + cols, m, rstd, KIND, H_DTYPE, O_DTYPE, INTERPRET)
            if QUANT:
                v = act_fake_quant(v, s, z, r, QMIN, QMAX, INTERPRET)
            tl.store(y_row + start + cols, cast(v, O_DTYPE, INTERPRET), mask=m)


#: Tile widths of rows held in registers (at most 16384 lanes; longer rows loop over
#: :data:`CHUNK_BLOCK`-wide chunks), and how many tiles such a row can take.
ONE_CHUNK_BLOCKS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
CHUNK_BLOCK = 8192
TILE_COUNTS = (1, 3)


class ActQuantConfig(NamedTuple):
    """Launch configuration of :func:`_act_quant_kernel` (see :func:`act_quant_config`)."""

    block: int
    rows: int
    num_warps: int
    one_chunk: bool
    nchunk: int = 1


def act_quant_config(n_cols: int, kind: int = KIND_IDENTITY) -> ActQuantConfig:
    """``(BLOCK, ROWS, num_warps, ONE_CHUNK, NCHUNK)`` for rows of ``n_cols`` made by ``kind``.

    Rows narrower than 2048 share a program, ``ROWS = 2048 / BLOCK`` of them (queries and keys
    quantised per head are 64-128 wide: one row a program would give each thread a value or two
    and launch a program per head and token), so a program always holds >= 2048 values.

    A row up to 16384 wide (LLaMA hidden sizes 4096 / 5120 / 8192, intermediate 11008 / 14336) is
    held in registers: HBM sees one read of each operand and one write. Its lanes are ``NCHUNK``
    (1 or 3) tiles of ``BLOCK`` (a power of two, >= 1024 for three), the fewest lanes that cover
    the row, then one tile: 11008 -> 3 x 4096 (10 % of the lanes masked, where one 16384-wide
    tile masks 33 % and pays every instruction for them), 5120 -> 3 x 2048 (17 %, not 37.5 %),
    4096 -> 1 x 4096, 14336 -> 1 x 16384. Wider rows loop over 8192-wide chunks (16 warps).

    Warps: 32 values a thread for one tile (``ROWS * BLOCK / 1024`` warps), at least 4 warps (the
    2048-value programs of narrow rows: 16 values a thread), at least 8 for SwiGLU (two operands
    and ``exp``: 4 warps spill at 256 wide). Several tiles: 8 values a thread a tile, one
    16-byte vector of a 16-bit row (``BLOCK / 256`` warps; 24 values a thread with three). A program's
    fixed work (three block reductions, the row's scale, address set-up: ~250 instructions a
    thread) is then spread over enough values, and the kernel stays under the ~50 instructions a
    value (bf16 in and out, 4 bytes a value) at which an H100 would stop being memory bound at 80 %
    of its HBM bandwidth. Static SASS a lane (sm_90, 8-bit, LLaMA-aligned), quantiser / RMSNorm +
    quantiser: 4096 wide 30-33 / 38-42 at 4 warps (64 / 81 at the 16 warps and per-value
    division this used before), 8192 wide 31-34 / 39-42 at 8 warps. A model of the issue rate,
    not a measurement: ``bench/bench_act_quant.py`` on a GPU decides. Every (KIND, dtype, block)
    compiles without spills on sm_80 and sm_90 with the ptxas of Triton 3.6 (the GPU image's),
    3.8 and 3.9 (AOT tests; 3.9 takes CUDA 13.4's ptxas for sm_90), at <= 128 registers (>= 16 warps resident an SM)
    for widths that are multiples of 16 (odd widths load scalars: up to ~170 registers), except
    a few words (<= 64 B) that ptxas spills in some several-tile rows to stay at 64 registers.
    """
    min_warps = 8 if kind == KIND_SWIGLU else 4
    block = max(triton.next_power_of_2(n_cols), ONE_CHUNK_BLOCKS[0])
    if block <= 2048:
        rows = 2048 // block
        return ActQuantConfig(block, rows, max(min_warps, rows * block // 1024), True)
    if block > ONE_CHUNK_BLOCKS[-1]:
        return ActQuantConfig(CHUNK_BLOCK, 1, 16, False)
    lanes, nchunk, block = min((c * b, c, b) for b in ONE_CHUNK_BLOCKS if b >= 1024
                               for c in TILE_COUNTS if n_cols <= c * b <= ONE_CHUNK_BLOCKS[-1])
    if nchunk == 1:
        return ActQuantConfig(block, 1, max(min_warps, block // 1024), True, 1)
    return ActQuantConfig(block, 1, block // 256, True, nchunk)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last]`` with a contiguous last dimension (a copy only when needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def launch_act_quant(kind: int, a: torch.Tensor, b: torch.Tensor | None, out_dtype: torch.dtype, bits: int | None,
                     symmetric: bool = False, eps: float = 0.0) -> torch.Tensor:
    """Run :func:`_act_quant_kernel` over the rows of ``a`` ``[..., n]``.

    Args:
        kind: :data:`KIND_IDENTITY` (``b`` None), :data:`KIND_RMS_NORM` (``b`` the ``[n]`` weight),
            :data:`KIND_SWIGLU` (``b`` = up, shaped like ``a``).
        out_dtype: the result's dtype (fp32 / bf16 / fp16).
        bits: 4 / 8, or None for the producer alone (no quantiser).

    Returns:
        ``[..., n]`` in ``out_dtype``.
    """
    qmin, qmax = qrange(bits) if bits is not None else (0, 0)
    a2 = _rows(a)
    if kind == KIND_RMS_NORM:
        b2, stride_b = b.contiguous(), 0
    elif kind == KIND_SWIGLU:
        b2 = _rows(b)
        stride_b = b2.stride(0)
    else:
        b2, stride_b = a2, 0
    y = torch.empty(a2.shape, dtype=out_dtype, device=a.device)
    n_rows, n_cols = a2.shape
    if n_rows:
        block, rows, num_warps, one, nchunk = act_quant_config(n_cols, kind)
        with on_device(a2):
            _act_quant_kernel[(triton.cdiv(n_rows, rows),)](
                a2, b2, y, n_rows, n_cols, a2.stride(0), stride_b, y.stride(0), float(eps),
                KIND=kind, QMIN=qmin, QMAX=qmax, QUANT=bits is not None, SYMMETRIC=symmetric, BLOCK=block, ROWS=rows,
                ONE_CHUNK=one, INTERPRET=not a.is_cuda, NCHUNK=nchunk, num_warps=num_warps,
                enable_fp_fusion=False,  # each fp32 op rounded as torch rounds it
            )
    return y.reshape(a.shape)


def act_fake_quant_forward(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Launch the kernel on ``x`` ``[..., hidden]``; returns ``x_hat`` like ``x``."""
    return launch_act_quant(KIND_IDENTITY, x, None, x.dtype, bits, symmetric)


#: Dtypes the activation-quant kernel reads and writes.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(x: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Triton where kernels run (``_launch.kernels_run_on``: CUDA, and CPU under
    ``TRITON_INTERPRET=1``, unless ``use_kernels(False)``), when ``x``'s dtype and every other
    dtype involved (``dtypes``) are kernel dtypes."""
    return all(d in KERNEL_DTYPES for d in (x.dtype, *dtypes)) and kernels_run_on(x.device)


@torch.library.custom_op("lrqat::fake_quant_activation", mutates_args=())
def _fake_quant_activation_op(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if use_triton(x):
        return act_fake_quant_forward(x, bits, symmetric)
    with torch.no_grad():
        return _reference_fake_quant_activation(x, bits, symmetric).contiguous()


@_fake_quant_activation_op.register_fake
def _(x, bits, symmetric):
    return x.new_empty(x.shape)  # contiguous, as the kernel's and the eager branch's results


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    # Straight-through: scale and zero point are detached and nothing clips.
    return grad, None, None


_fake_quant_activation_op.register_autograd(_backward, setup_context=_setup_context)


def fake_quant_activation(x: torch.Tensor, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """Dynamic per-token fake quantisation of activations (Triton on CUDA / TRITON_INTERPRET=1).

    Args:
        x: ``[..., hidden]`` fp32 / bf16 / fp16; one scale (and zero point) per row of the last dim.
        bits: 4 or 8.
        symmetric: z = 0 when True, else an integer zero point per token.

    Returns:
        ``x_hat`` with ``x``'s shape and dtype. Backward: ``dL/dx = dL/dx_hat``.
    """
    check_act_args(x, bits, symmetric)
    return _fake_quant_activation_op(x, bits, symmetric)
