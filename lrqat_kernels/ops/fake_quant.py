"""Fused Triton kernels for the LR-QAT fake-quantised weight (NUMERICS.md "Forward", "Backward").

    C     = (alpha / r) * lora_B @ lora_A                 [out, in], grid units, fp32
    Z     = decode(Phi0) + C
    W_int = clip(round_half_even(Z), qmin, qmax)          M = qmin <= round(Z) <= qmax
    W_hat = s * (W_int - z)                               cast to the compute dtype last

Forward (:func:`fake_quant_forward`): one program owns a ``[BLOCK_M, BLOCK_N]`` tile of
``W_hat``. It reads the tile of Phi0 once (0.5 to 4 bytes a weight), builds the tile of ``C`` on
the fly with one ``tl.dot`` of a ``[BLOCK_M, R]`` slice of lora_B and an ``[R, BLOCK_N]`` slice of
lora_A (fp32 factors above rank 32: a loop of 32-wide rank slices, :func:`_lowrank_chunked`; both
tiny and L2-resident: the low-rank factors are never expanded to ``[out, in]`` in HBM), quantises in registers and writes the tile once. HBM traffic is the roofline minimum:
``bytes(Phi0) + bytes(W_hat)``. ``write_int=True`` writes ``W_int`` as int8 instead (the merge
path: the deployed integers come from the very code the training forward runs).

Backward (:func:`fake_quant_backward`): given ``G = dL/dW_hat``, every tile recomputes ``Z``,
``W_int`` and ``M`` (cheaper than saving any of them: recomputing costs one extra read of Phi0,
saving would cost a weight-sized write plus read), forms ``dZ = s * G * M`` in registers and
reduces it straight into the three small gradients:

    dL/dlora_B = (alpha/r) dZ @ lora_A^T     (reduced along in:  a register accumulator)
    dL/dlora_A = (alpha/r) lora_B^T @ dZ     (reduced along out: per-row-band partial buffer)
    dL/ds      = sum_group G * (W_int - z)   (reduced along in:  register accumulator)

``G`` is read exactly once and nothing weight-sized is written. The cross-program reductions
are deterministic two-stage ones (no float atomics): a program owns a band of ``TM`` row tiles x
``TN`` column tiles; ``dB``/``ds`` partials are indexed by column band, ``dA`` partials by row band,
and the launcher sums the bands with ``torch.sum``. Partial bytes are
``4 r (P_n * out + P_m * in)`` for a ``P_m x P_n`` grid, minimised for a given program count by
``P_m / P_n = sqrt(out / in)`` (:func:`bwd_grid`).

Column tiling and groups (:func:`column_tiling`): a tile never straddles a quantisation group in
the "one group per tile" mode (``GPT == 1``): tiles walk each group in ``chunks = cdiv(g, BLOCK_N)``
pieces (a partial last piece is masked), so scale/zero point are one ``[BLOCK_M]`` vector load a
tile and ``dL/ds`` accumulates in a register. Groups smaller than the tile that divide it
(g = 16, 32, 64 with ``BLOCK_N = 128``) use ``GPT = BLOCK_N // g`` groups a tile: their
``[BLOCK_M, GPT]`` scales are loaded once and expanded in registers, and ``dL/ds`` is a
reshape-sum. Per-channel is one group of ``g = in``. Any divisor ``g`` of ``in`` works (odd ones
with a masked last chunk; packed nibbles are then read byte by byte instead of in pairs).

Numerics shared with the eager reference (``reference.py``): ``C`` is the fp32 sum of exact
products (16-bit factors go to tensor cores with fp32 accumulation; fp32 factors use an IEEE
fp32 dot, never TF32, so ``W_int`` matches the reference except where ``Z`` is within a few ulps
of a ``.5`` tie and the summation order decides); round half to even by the ``1.5 * 2^23`` trick;
NaN stays NaN, +-inf clip to the grid's ends, as ``torch.round`` + ``torch.clamp``. Kernels are
launched with ``enable_fp_fusion=False`` so ``Phi0 + C`` and ``s * (W_int - z)`` round as the
reference does (no FMA contraction). The backward's rank reductions multiply the fp32 ``dZ``
by the factors: bf16 factors as two bf16 tensor-core dots of ``dZ = hi + lo`` (~2^-17
relative, far below the bf16 gradients' rounding), fp32/fp16 factors as IEEE FMA dots.

Quantiser math lives in small ``@triton.jit`` helpers (``_decode_phi``, ``_round_clip``,
``_dequant``) apart from the tile plumbing, so a new mode (L4Q's scale inside the rounding,
PE-QAT, pQuant) is a new helper plus a constexpr switch.

Under ``TRITON_INTERPRET=1`` (CPU CI) the kernels run in Triton's interpreter, whose bf16
arithmetic and fp32->bf16 cast are not IEEE: 16-bit operands are widened to fp32 before every
dot (exact) and bf16 stores go through :func:`_to_bf16_rne`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import interpreting, on_device
from ._triton_quant import PHI_KIND, phi_constexprs
from ._triton_quant import and_scalar as _and_scalar
from ._triton_quant import cast as _cast
from ._triton_quant import center as _center
from ._triton_quant import decode_phi as _decode_phi
from ._triton_quant import dequant as _dequant
from ._triton_quant import dot as _dot
from ._triton_quant import int_to_f32 as _int_to_f32
from ._triton_quant import round_clip as _round_clip
from ._triton_quant import round_half_even as _round_half_even
from ._triton_quant import to_bf16_rne as _to_bf16_rne

__all__ = [
    "FwdConfig",
    "BwdConfig",
    "KernelSpec",
    "aot_specs",
    "column_tiling",
    "fwd_config",
    "bwd_config",
    "bwd_grid",
    "needs_int64",
    "fake_quant_forward",
    "fake_quant_backward",
    "PHI_KIND",
    "MAX_RANK",
    "interpreting",
]

#: Rank slice of the forward's low-rank product for fp32 factors (:func:`_lowrank_chunked`).
FMA_RANK_CHUNK = 32

#: Largest LoRA rank the kernels take (``R_PAD <= 128``; the paper uses r = 32); larger ranks
#: use the eager path (their register tiles would spill).
MAX_RANK = 128

_INT32_LIMIT = 2**31 - 1

#: Tests set this to run the GPU tile tables under the interpreter (the exact constexprs a GPU
#: gets, on a CPU); by default the interpreter uses small tiles so small shapes span many tiles.
FORCE_GPU_TILES = False


def small_tiles(interpret: bool) -> bool:
    """Whether the configuration tables pick their interpreter (small-tile) row."""
    return interpret and not FORCE_GPU_TILES


# ----------------------------------------------------------------------------------------------
# Tile plumbing shared by every kernel (fused GEMMs in fused_linear.py included)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(tile_m, n_rows, BLOCK_M: tl.constexpr, I64: tl.constexpr):
    """Rows of row tile ``tile_m`` (int64 when offsets can pass 2^31) and their mask."""
    if I64:
        rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < n_rows


@triton.jit
def _col_tile(tile_n, in_features, group_size, chunks, BLOCK_N: tl.constexpr, GPT: tl.constexpr):
    """Columns of column tile ``tile_n``: ``(cols, cmask, group, chunk, col0, n_valid)``.

    ``GPT == 1``: tile ``t`` is chunk ``t % chunks`` of group ``t // chunks`` (a tile never
    straddles a group; ``group`` is the tile's group, ``chunk`` its piece). ``GPT > 1``: tiles
    are contiguous and hold ``GPT`` whole groups; ``group`` is the first of them. ``col0`` is
    the first column, ``n_valid`` the number of real columns from it (``cmask = arange < n_valid``).
    """
    if GPT == 1:
        grp = tile_n // chunks
        chunk = tile_n - grp * chunks
        col0 = grp * group_size + chunk * BLOCK_N
        n_valid = group_size - chunk * BLOCK_N
    else:
        grp = tile_n * GPT
        chunk = 0
        col0 = tile_n * BLOCK_N
        n_valid = in_features - col0
    offs = tl.arange(0, BLOCK_N)
    return col0 + offs, offs < n_valid, grp, chunk, col0, n_valid


@triton.jit
def _load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GPT: tl.constexpr, HAS_ZP: tl.constexpr):
    """Scale and zero point of the tile, broadcastable against ``[BM, BN]``.

    ``GPT == 1``: ``[BM, 1]`` (one group a tile). ``GPT > 1``: the ``[BM, GPT]`` values are loaded
    once and expanded to ``[BM, BN]`` in registers (a per-element gather would carry a 64-bit
    address per element: ~100 more registers a thread at 64 x 128).
    """
    if GPT == 1:
        offs = rows * n_groups + grp
        # grp == n_groups on the dead tail tiles of a backward band: nothing to load there (the
        # values would be unused, but the last row's load would run one element past the end).
        qmask = _and_scalar(rmask, grp < n_groups)
        s = tl.load(scale_ptr + offs, mask=qmask, other=0.0)[:, None]
        if HAS_ZP:
            zp = tl.load(zp_ptr + offs, mask=qmask, other=0.0)[:, None]
        else:
            zp = s
    else:
        gidx = grp + tl.arange(0, GPT)
        offs = rows[:, None] * n_groups + gidx[None, :]
        m2 = rmask[:, None] & (gidx < n_groups)[None, :]
        s = _expand_groups(tl.load(scale_ptr + offs, mask=m2, other=0.0), BLOCK_M, BLOCK_N, GPT)
        if HAS_ZP:
            zp = _expand_groups(tl.load(zp_ptr + offs, mask=m2, other=0.0), BLOCK_M, BLOCK_N, GPT)
        else:
            zp = s
    return s, zp


@triton.jit
def _expand_groups(q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GPT: tl.constexpr):
    """``[BM, GPT]`` per-group values -> ``[BM, BN]`` (each repeated over its ``BN // GPT`` columns)."""
    G: tl.constexpr = BLOCK_N // GPT
    return tl.reshape(tl.broadcast_to(q[:, :, None], (BLOCK_M, GPT, G)), (BLOCK_M, BLOCK_N))


@triton.jit
def _lora_rows(b_ptr, rows, rmask, rank, R_PAD: tl.constexpr):
    """``lora_B[rows, :]`` zero-padded to ``[BM, R_PAD]`` (padding keeps the dot exact)."""
    rr = tl.arange(0, R_PAD)
    return tl.load(b_ptr + rows[:, None] * rank + rr[None, :], mask=rmask[:, None] & (rr < rank)[None, :], other=0.0)


@triton.jit
def _lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD: tl.constexpr):
    """``lora_A[:, cols]`` zero-padded to ``[R_PAD, BN]``."""
    rr = tl.arange(0, R_PAD)
    return tl.load(a_ptr + rr[:, None] * in_features + cols[None, :], mask=(rr < rank)[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _z_tile(phi_ptr, b_tile, a_tile, row_off, rmask, cols, cmask, col0, n_valid, lr_scale,
            PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """``Z = Phi0 + (B @ A) * (alpha / r)`` for one tile, fp32, from the lora slices."""
    acc = tl.zeros((b_tile.shape[0], a_tile.shape[1]), dtype=tl.float32)
    return _z_from_lowrank(phi_ptr, _dot(b_tile, a_tile, acc, DOT_FP32), row_off, rmask, cols, cmask, col0, n_valid,
                           lr_scale, PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N)


@triton.jit
def _z_from_lowrank(phi_ptr, ba, row_off, rmask, cols, cmask, col0, n_valid, lr_scale,
                    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Z = Phi0 + BA * (alpha / r)`` for one tile given ``BA = B @ A`` (fp32; the reference's op order)."""
    return _decode_phi(phi_ptr, row_off, rmask, cols, cmask, col0, n_valid, PHI_KIND, PHI_MUL, PACKED_PAIRS,
                       BLOCK_N) + ba * lr_scale


@triton.jit
def _lowrank_chunked(b_ptr, a_ptr, rows, rmask, cols, cmask, rank, in_features,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_CHUNK: tl.constexpr, DOT_FP32: tl.constexpr):
    """``lora_B[rows, :] @ lora_A[:, cols]`` (``[BM, BN]`` fp32), the rank in a loop of ``R_CHUNK`` slices.

    For wide fp32 factors (IEEE FMA dot, R_PAD > 32): one ``[BM, R_PAD] @ [R_PAD, BN]`` FMA dot
    is a single basic block of BM*BN*R_PAD/threads FMAs whose operands all live at once, and
    Triton 3.6's code for it leaves ptxas at 32 registers with ~8 KB of spills a thread. The
    loop's bound is the runtime rank (no padded slices are multiplied). An FMA dot accumulates
    along the rank in order, so chunking keeps the sum's order and the result bit for bit.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, R_CHUNK):
        rr = r0 + tl.arange(0, R_CHUNK)
        rk = rr < rank
        b = tl.load(b_ptr + rows[:, None] * rank + rr[None, :], mask=rmask[:, None] & rk[None, :], other=0.0)
        a = tl.load(a_ptr + rr[:, None] * in_features + cols[None, :], mask=rk[:, None] & cmask[None, :], other=0.0)
        acc = _dot(b, a, acc, DOT_FP32)
    return acc


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_fwd_kernel(
    phi_ptr, a_ptr, b_ptr, scale_ptr, zp_ptr, out_ptr, nan_ptr,
    out_features, in_features, rank, group_size, n_groups, chunks, stride_phi, lr_scale,
    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_ZP: tl.constexpr, GPT: tl.constexpr, WRITE_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr, I64: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``W_hat`` (or int8 ``W_int``): one read of Phi0, one write.

    Grid: ``(n_col_tiles, n_row_tiles)``; axis 0 walks along a row band, so consecutive programs
    stream contiguous Phi0 rows and reuse the same lora_B slice from L1/L2.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows, rmask = _row_tile(pid_m, out_features, BLOCK_M, I64)
    cols, cmask, grp, _, col0, n_valid = _col_tile(pid_n, in_features, group_size, chunks, BLOCK_N, GPT)
    mask = rmask[:, None] & cmask[None, :]

    if R_CHUNK < R_PAD:
        ba = _lowrank_chunked(b_ptr, a_ptr, rows, rmask, cols, cmask, rank, in_features, BLOCK_M, BLOCK_N, R_CHUNK,
                              DOT_FP32)
        z = _z_from_lowrank(phi_ptr, ba, rows[:, None] * stride_phi, rmask, cols, cmask, col0, n_valid, lr_scale,
                            PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N)
    else:
        b_tile = _lora_rows(b_ptr, rows, rmask, rank, R_PAD)
        a_tile = _lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD)
        z = _z_tile(phi_ptr, b_tile, a_tile, rows[:, None] * stride_phi, rmask, cols, cmask, col0, n_valid, lr_scale,
                    PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N, DOT_FP32)
    w_int, _ = _round_clip(z, QMIN, QMAX)

    offs = rows[:, None] * in_features + cols[None, :]
    if WRITE_INT:
        is_nan = w_int != w_int
        tl.store(out_ptr + offs, tl.where(is_nan, 0.0, w_int).to(tl.int8), mask=mask)
        # One int per program (no atomics): the launcher raises if any W_int is NaN.
        n_nan = tl.sum(tl.sum((is_nan & mask).to(tl.int32), axis=1), axis=0)
        tl.store(nan_ptr + pid_m * tl.num_programs(0) + pid_n, n_nan)
    else:
        s, zp = _load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups, BLOCK_M, BLOCK_N, GPT, HAS_ZP)
        w_hat = _dequant(w_int, s, zp, HAS_ZP)
        tl.store(out_ptr + offs, _cast(w_hat, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _g_tile_from_dy_x(dy_ptr, x_ptr, rows, rmask, cols, cmask, n_tokens, out_features, in_features,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                      DOT_FP32: tl.constexpr, I64: tl.constexpr):
    """``G[rows, cols] = dy[:, rows]^T @ x[:, cols]`` in fp32, looping over token chunks.

    Used by the G-free backward (fused_linear.py): the ``[out, in]`` gradient never exists in HBM.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        tmask = tt < n_tokens
        if I64:
            tt = tt.to(tl.int64)
        dy_t = tl.load(dy_ptr + tt[None, :] * out_features + rows[:, None], mask=rmask[:, None] & tmask[None, :], other=0.0)
        x_t = tl.load(x_ptr + tt[:, None] * in_features + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(dy_t, x_t, acc, DOT_FP32)
    return acc


@triton.jit
def _rank_reduce(dz, a_tile, b_tile, db_acc, SPLIT_BF16: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """``(db_acc + dZ @ A^T, B^T @ dZ)`` for one tile, fp32 results.

    ``dZ`` is fp32 and not representable in 16 bits. ``SPLIT_BF16`` (bf16 factors): write
    ``dZ = hi + lo`` with ``hi = bf16(dZ)``, ``lo = bf16(dZ - hi)`` (relative error <= 2^-17)
    and run two bf16 tensor-core dots each; products with the bf16 factors are exact, so the
    result is fp32-accumulated to ~2^-17 relative, far below the bf16 gradients' own rounding.
    Otherwise (fp32/fp16 factors) IEEE fp32 dots: exact products, CUDA-core FMAs.
    """
    if SPLIT_BF16:
        hi = _cast(dz, tl.bfloat16, INTERPRET)
        hi32 = hi.to(tl.float32)
        # inf/NaN stay in hi (lo = 0), so they propagate as they would through an fp32 dot.
        lo = _cast(tl.where(tl.abs(hi32) < float("inf"), dz - hi32, 0.0), tl.bfloat16, INTERPRET)
        a_t = tl.trans(a_tile)
        b_t = tl.trans(b_tile)
        db_acc = _dot(hi, a_t, db_acc, DOT_FP32)
        db_acc = _dot(lo, a_t, db_acc, DOT_FP32)
        da = tl.zeros((b_t.shape[0], dz.shape[1]), dtype=tl.float32)
        da = _dot(b_t, hi, da, DOT_FP32)
        da = _dot(b_t, lo, da, DOT_FP32)
    else:
        db_acc = tl.dot(dz, tl.trans(a_tile.to(tl.float32)), db_acc, input_precision="ieee")
        da = tl.dot(tl.trans(b_tile.to(tl.float32)), dz, input_precision="ieee")
    return db_acc, da


@triton.jit
def _fake_quant_bwd_kernel(
    g_ptr, dy_ptr, x_ptr, phi_ptr, a_ptr, b_ptr, scale_ptr, zp_ptr,
    da_part_ptr, db_part_ptr, ds_ptr,
    out_features, in_features, rank, group_size, n_groups, chunks, stride_phi,
    n_tiles_m, n_tiles_n, tiles_m_per_prog, tiles_n_per_prog, n_tokens, ds_band_stride, lr_scale,
    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_ZP: tl.constexpr, GPT: tl.constexpr, FUSED_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT_BF16: tl.constexpr, DOT_FP32: tl.constexpr, G_DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr,
    I64: tl.constexpr,
):
    """Recompute ``Z, W_int, M`` per tile and reduce ``G`` into dA, dB, ds partials in one pass.

    Grid ``(P_n, P_m)``: program ``(j, i)`` owns row tiles ``[i*TM, (i+1)*TM)`` x column tiles
    ``[j*TN, (j+1)*TN)``. Outputs (all fp32, unscaled by alpha/r):

    * ``da_part[i, r, col]``: sum over the band's rows of ``B^T dZ`` (read-modify-write over the
      band's row tiles; a CTA barrier orders the revisit).
    * ``db_part[j, row, r]``: sum over the band's columns of ``dZ A^T`` (register accumulator).
    * ``ds[j * ds_band_stride + row * n_groups + grp]``: group sums of ``G (W_int - z)``; bands
      write disjoint entries, so ``ds_band_stride`` is 0 when a group never crosses a band.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rr = tl.arange(0, R_PAD)
    rank_mask = rr < rank
    if I64:
        da_band = da_part_ptr + pid_m.to(tl.int64) * rank * in_features
        db_band = db_part_ptr + pid_n.to(tl.int64) * out_features * rank
        ds_band = ds_ptr + pid_n.to(tl.int64) * ds_band_stride
    else:
        da_band = da_part_ptr + pid_m * rank * in_features
        db_band = db_part_ptr + pid_n * out_features * rank
        ds_band = ds_ptr + pid_n * ds_band_stride

    for tm in range(0, tiles_m_per_prog):
        tile_m = pid_m * tiles_m_per_prog + tm
        rows, rmask = _row_tile(tile_m, out_features, BLOCK_M, I64)
        b_tile = _lora_rows(b_ptr, rows, rmask, rank, R_PAD)
        db_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for tn in range(0, tiles_n_per_prog):
            tile_n = pid_n * tiles_n_per_prog + tn
            cols, cmask, grp, chunk, col0, n_valid = _col_tile(tile_n, in_features, group_size, chunks, BLOCK_N, GPT)
            n_valid = tl.where(tile_n < n_tiles_n, n_valid, 0)
            cmask = _and_scalar(cmask, tile_n < n_tiles_n)
            mask = rmask[:, None] & cmask[None, :]

            a_tile = _lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD)
            z = _z_tile(phi_ptr, b_tile, a_tile, rows[:, None] * stride_phi, rmask, cols, cmask, col0, n_valid, lr_scale,
                        PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N, DOT_FP32)
            w_int, inside = _round_clip(z, QMIN, QMAX)
            if FUSED_G:
                g = _g_tile_from_dy_x(dy_ptr, x_ptr, rows, rmask, cols, cmask, n_tokens, out_features, in_features,
                                      BLOCK_M, BLOCK_N, BLOCK_T, G_DOT_FP32, I64)
            else:
                g = tl.load(g_ptr + rows[:, None] * in_features + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s, zp = _load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups, BLOCK_M, BLOCK_N, GPT, HAS_ZP)

            # STE through the rounding, inclusive clip mask; padding lanes contribute exact zeros.
            dz = tl.where(inside & mask, s * g, 0.0)
            gw = tl.where(mask, g * _center(w_int, zp, HAS_ZP), 0.0)

            # dB rows (reduced along in) stay in registers for the whole column band; dA columns
            # (this row tile's share) go to the band's partial.
            db_acc, da = _rank_reduce(dz, a_tile, b_tile, db_acc, SPLIT_BF16, DOT_FP32, INTERPRET)
            da_ptrs = da_band + rr[:, None] * in_features + cols[None, :]
            da_mask = rank_mask[:, None] & cmask[None, :]
            if tm > 0:
                da = da + tl.load(da_ptrs, mask=da_mask, other=0.0)
            tl.store(da_ptrs, da, mask=da_mask)

            if GPT == 1:
                ds_acc += tl.sum(gw, axis=1)
                flush = (chunk == chunks - 1) | (tn == tiles_n_per_prog - 1)
                tl.store(ds_band + rows * n_groups + grp, ds_acc, mask=_and_scalar(rmask, flush & (tile_n < n_tiles_n)))
                ds_acc = tl.where(flush, 0.0, ds_acc)
            else:
                G: tl.constexpr = BLOCK_N // GPT
                ds_tile = tl.sum(tl.reshape(gw, (BLOCK_M, GPT, G)), axis=2)
                gidx = grp + tl.arange(0, GPT)
                tl.store(ds_band + rows[:, None] * n_groups + gidx[None, :], ds_tile,
                         mask=_and_scalar(rmask[:, None] & (gidx < n_groups)[None, :], tile_n < n_tiles_n))

        tl.store(db_band + rows[:, None] * rank + rr[None, :], db_acc, mask=rmask[:, None] & rank_mask[None, :])
        # The next row tile revisits this band's dA partial: make this tile's stores visible to
        # every thread of the CTA first (a thread may read what another one wrote).
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Configuration: a small fixed table (no autotuning), exposed so tests enumerate exactly it
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FwdConfig:
    """Launch configuration of :func:`_fake_quant_fwd_kernel` (tile shape, warps)."""

    block_m: int
    block_n: int
    r_pad: int
    gpt: int
    num_warps: int
    num_stages: int = 1
    block_n_max: int = 128  # the table's tile width; ``block_n``/``gpt`` follow from it and g
    r_chunk: int = 0  # rank slice of the low-rank product's loop; ``r_pad`` (0): one dot, no loop

    def __post_init__(self):
        if not self.r_chunk:
            object.__setattr__(self, "r_chunk", self.r_pad)


@dataclass(frozen=True)
class BwdConfig:
    """Launch configuration of :func:`_fake_quant_bwd_kernel`."""

    block_m: int
    block_n: int
    r_pad: int
    gpt: int
    block_t: int
    num_warps: int
    num_stages: int = 1
    block_n_max: int = 64


def rank_pad(rank: int) -> int:
    """``R_PAD``: rank rounded up to a power of two, at least 16 (``tl.dot``'s minimum K/N)."""
    return max(16, triton.next_power_of_2(rank))


def column_tiling(in_features: int, group_size: int, block_n_max: int) -> tuple[int, int, int, int]:
    """How column tiles cover a row: ``(block_n, gpt, chunks, n_col_tiles)``.

    * ``g % block_n_max == 0`` (per-channel with ``in`` a multiple, g = 128, 256...): one group
      a tile, ``chunks = g / block_n``.
    * ``g < block_n_max`` dividing it (g = 16, 32, 64): ``gpt = block_n_max / g`` groups a tile.
    * otherwise one group a tile with the last chunk masked: the largest power-of-two tile
      (>= 16) wasting at most 1/8 of the lanes, else the one wasting least.
    """
    g = group_size
    if g % block_n_max == 0:
        return block_n_max, 1, g // block_n_max, (in_features // g) * (g // block_n_max)
    if g < block_n_max and block_n_max % g == 0:
        gpt = block_n_max // g
        return block_n_max, gpt, 1, triton.cdiv(in_features, block_n_max)
    best = None
    bn = block_n_max
    while bn >= 16:
        chunks = triton.cdiv(g, bn)
        waste = chunks * bn - g
        if best is None or waste < best[0]:
            best = (waste, bn, chunks)
        if waste * 8 <= g:
            best = (waste, bn, chunks)
            break
        bn //= 2
    _, bn, chunks = best
    return bn, 1, chunks, (in_features // g) * chunks


def fwd_config(out_features: int, in_features: int, rank: int, group_size: int, lora_dtype: torch.dtype,
               *, interpret: bool | None = None) -> FwdConfig:
    """The forward kernel's configuration for a problem (a fixed table, no autotuning).

    GPU table (``R_PAD`` = rank padded to a power of two >= 16, at most 128):

    ======================== ============== ======= ==========================================
    R_PAD                    BLOCK_M x N    warps   why
    ======================== ============== ======= ==========================================
    <= 64 (any R_PAD fp32)   64 x 128       8       32 fp32 lanes a thread; 256 B bf16 rows
    128 (16-bit lora)        64 x 64        8       wider lora slices would spill at 64 x 128
    ======================== ============== ======= ==========================================

    fp32 factors (IEEE FMA dot) with ``R_PAD > 32`` loop over the rank in 32-wide slices
    (``r_chunk``, :func:`_lowrank_chunked`): the operands of one FMA dot are live at once, and
    a whole-rank dot spilled (R_PAD = 128: ~8 KB a thread under Triton 3.6). Under the
    interpreter the tiles are 32 x 64: its cost is per program and per op, not per element.
    """
    interpret = interpreting() if interpret is None else interpret
    r_pad = rank_pad(rank)
    fma = lora_dtype == torch.float32  # IEEE FMA dot: its operands take more registers
    r_chunk = min(r_pad, FMA_RANK_CHUNK) if fma else r_pad
    if small_tiles(interpret):
        bm, bn_max, warps = 32, 64, 4
    elif r_chunk <= 64:
        bm, bn_max, warps = 64, 128, 8
    else:
        bm, bn_max, warps = 64, 64, 8
    bn, gpt, _, _ = column_tiling(in_features, group_size, bn_max)
    return FwdConfig(block_m=bm, block_n=bn, r_pad=r_pad, gpt=gpt, num_warps=warps, block_n_max=bn_max, r_chunk=r_chunk)


#: GPU backward table ``(split_bf16, R_PAD, fused_g) -> (BLOCK_M, BLOCK_N, num_warps)``, chosen
#: from ptxas sweeps (sm_80 and sm_90, Triton 3.6 and 3.8) of 27 tile shapes x warps per key for
#: no register spills: the kernel holds a ``[BM, R_PAD]`` dB accumulator, the lora slices and ~6
#: live ``[BM, BN]`` fp32 tiles. bf16 factors use the split-bf16 tensor-core dots
#: (``_rank_reduce``), fp32/fp16 factors IEEE FMA dots, whose operands take more registers. Among
#: spill-free shapes the tallest wins: each row tile re-reads and re-writes its band's fp32 dA
#: partial (``R_PAD / BLOCK_M`` words a weight), so ``BLOCK_M`` matters more than ``BLOCK_N``.
#: fp16 factors share fp32's rows; at R_PAD = 32 (8 warps, so fp16 does not spill) fp32 spills a
#: few words on sm_90 under Triton 3.6, and at R_PAD = 16 under 3.8. Fused fp32 at R_PAD = 128 is
#: 32 x 16: 32 x 32 spilled 176 B a thread on sm_90 under Triton 3.9 (CUDA 13.4's ptxas) and
#: 64 x 16 spills on sm_90 under 3.6 and 3.8; 32 x 16 is spill-free on sm_80 / sm_90 under 3.6,
#: 3.8 and 3.9 (tests/test_aot_compile.py::test_backward_configs_spill_at_most_a_few_words).
_BWD_TABLE = {
    (True, 16, False): (32, 32, 4), (True, 16, True): (32, 64, 8),
    (True, 32, False): (32, 64, 8), (True, 32, True): (32, 64, 8),
    (True, 64, False): (32, 32, 8), (True, 64, True): (32, 32, 8),
    (True, 128, False): (64, 16, 8), (True, 128, True): (64, 16, 8),
    (False, 16, False): (32, 32, 4), (False, 16, True): (32, 32, 4),
    (False, 32, False): (32, 64, 8), (False, 32, True): (32, 64, 8),
    (False, 64, False): (32, 32, 8), (False, 64, True): (64, 16, 8),
    (False, 128, False): (32, 16, 8), (False, 128, True): (32, 16, 8),
}


def bwd_config(out_features: int, in_features: int, rank: int, group_size: int, lora_dtype: torch.dtype,
               *, fused_g: bool = False, interpret: bool | None = None) -> BwdConfig:
    """The backward kernel's configuration: :data:`_BWD_TABLE` (no autotuning).

    Keyed on the dot mode (split-bf16 tensor cores for bf16 factors, IEEE FMA otherwise),
    ``R_PAD`` and whether ``G`` tiles are built in the kernel. ``BLOCK_T`` (token chunk of the
    G-free variant) is 32. Under the interpreter: 32 x 64 tiles, ``BLOCK_T`` 16.
    """
    interpret = interpreting() if interpret is None else interpret
    r_pad = rank_pad(rank)
    if small_tiles(interpret):
        bm, bn_max, warps, block_t = 32, 64, 4, 16
    else:
        bm, bn_max, warps = _BWD_TABLE[(lora_dtype == torch.bfloat16, r_pad, fused_g)]
        block_t = 32
    bn, gpt, _, _ = column_tiling(in_features, group_size, bn_max)
    return BwdConfig(block_m=bm, block_n=bn, r_pad=r_pad, gpt=gpt, block_t=block_t, num_warps=warps, block_n_max=bn_max)


@dataclass(frozen=True)
class KernelSpec:
    """One compilation the GPU launchers can ask for: what ``tests/test_aot_compile.py`` builds."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple  # integer/pointer args the JIT specialises as multiples of 16 for LLaMA shapes
    default: bool  # a default configuration (bf16, rank 32): must not spill


_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_PHI_TT = {"packed_int": "u8", "fixed_point": "i8", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_DIVISIBLE_INTS = ("out_features", "in_features", "group_size", "stride_phi", "rank")  # as the JIT specialises them at LLaMA shapes, r = 16..128


def _spec(kernel, name, ptr_types: dict, scalar_types: dict, constexprs: dict, num_warps, num_stages, default):
    sig = {}
    for arg in kernel.arg_names:
        if arg in ptr_types:
            sig[arg] = "*" + ptr_types[arg]
        elif arg in constexprs:
            sig[arg] = "constexpr"
        else:
            sig[arg] = scalar_types.get(arg, "i32")
    divisible = tuple(a for a in kernel.arg_names if a in ptr_types or a in _DIVISIBLE_INTS)
    return KernelSpec(name, kernel, sig, dict(constexprs), num_warps, num_stages, divisible, default)


def aot_specs() -> list[KernelSpec]:
    """Every configuration the GPU launchers of this module can pick, as compilable specs.

    The tables key on ``R_PAD`` (16..256), the column mode (one group a tile, ``gpt`` groups a
    tile), the factors' dtype (bf16 / fp16 / fp32) and, for the backward, ``fused_g``; every key
    is listed, with a representative Phi0 format and a zero point (the most registers). ``gpt > 1``
    variants and fp16 factors (whose table rows are fp32's) are listed at the default rank (32),
    the int8 ``W_int`` mode at every rank.
    """
    specs = []
    in_f = 4096
    for r_pad in (16, 32, 64, 128):
        for dt, fmt in ((torch.bfloat16, "packed_int"), (torch.float16, "fixed_point"), (torch.float32, "fp32")):
            for g, write_int in ((in_f, False), (32, False), (in_f, True)):
                if (g == 32 or write_int or dt == torch.float16) and r_pad != 32 or (write_int and dt != torch.bfloat16):
                    continue
                cfg = fwd_config(4096, in_f, r_pad, g, dt, interpret=False)
                ce = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, WRITE_INT=write_int,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, R_CHUNK=cfg.r_chunk,
                          DOT_FP32=dt == torch.float32, INTERPRET=False, I64=False)
                ptrs = dict(phi_ptr=_PHI_TT[fmt], a_ptr=_TT[dt], b_ptr=_TT[dt], scale_ptr="fp32", zp_ptr="fp32",
                            out_ptr="i8" if write_int else _TT[dt], nan_ptr="i32")
                name = f"fwd-{_TT[dt]}-R{r_pad}-gpt{cfg.gpt}{'-int8' if write_int else ''}"
                specs.append(_spec(_fake_quant_fwd_kernel, name, ptrs, {"lr_scale": "fp32"}, ce, cfg.num_warps,
                                   cfg.num_stages, default=dt == torch.bfloat16 and r_pad == 32))
            for fused in (False, True):
                for g in (in_f, 32):
                    if (g == 32 or dt == torch.float16) and r_pad != 32:
                        continue
                    cfg = bwd_config(4096, in_f, r_pad, g, dt, fused_g=fused, interpret=False)
                    ce = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, FUSED_G=fused,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, BLOCK_T=cfg.block_t,
                              SPLIT_BF16=dt == torch.bfloat16, DOT_FP32=dt == torch.float32,
                              G_DOT_FP32=dt == torch.float32 and not fused, INTERPRET=False, I64=False)
                    # G-free backward: 16-bit activations only (functions.py keeps fp32 unfused)
                    act = "bf16" if fused and dt == torch.float32 else _TT[dt]
                    ptrs = dict(g_ptr=act, dy_ptr=act, x_ptr=act, phi_ptr=_PHI_TT[fmt], a_ptr=_TT[dt], b_ptr=_TT[dt],
                                scale_ptr="fp32", zp_ptr="fp32", da_part_ptr="fp32", db_part_ptr="fp32", ds_ptr="fp32")
                    name = f"bwd{'_fused_g' if fused else ''}-{_TT[dt]}-R{r_pad}-gpt{cfg.gpt}"
                    specs.append(_spec(_fake_quant_bwd_kernel, name, ptrs, {"lr_scale": "fp32"}, ce, cfg.num_warps,
                                       cfg.num_stages, default=dt == torch.bfloat16 and r_pad == 32))
    # odd group sizes: a narrower tile (96 -> 32 columns) and nibble-by-nibble packed loads (9 -> 16)
    for g, fmt in ((96, "packed_int"), (9, "packed_int")):
        cfg = fwd_config(4096, 4032, 32, g, torch.bfloat16, interpret=False)
        ce = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, WRITE_INT=False, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, R_CHUNK=cfg.r_chunk, DOT_FP32=False, INTERPRET=False,
                  I64=False)
        ptrs = dict(phi_ptr="u8", a_ptr="bf16", b_ptr="bf16", scale_ptr="fp32", zp_ptr="fp32", out_ptr="bf16", nan_ptr="i32")
        specs.append(_spec(_fake_quant_fwd_kernel, f"fwd-bf16-R32-g{g}-bn{cfg.block_n}", ptrs, {"lr_scale": "fp32"}, ce,
                           cfg.num_warps, cfg.num_stages, default=False))
        b = bwd_config(4096, 4032, 32, g, torch.bfloat16, interpret=False)
        ce = dict(phi_constexprs(4, fmt, g, b.gpt), HAS_ZP=True, GPT=b.gpt, FUSED_G=False, BLOCK_M=b.block_m,
                  BLOCK_N=b.block_n, R_PAD=b.r_pad, BLOCK_T=b.block_t, SPLIT_BF16=True, DOT_FP32=False,
                  G_DOT_FP32=False, INTERPRET=False, I64=False)
        ptrs = dict(g_ptr="bf16", dy_ptr="bf16", x_ptr="bf16", phi_ptr="u8", a_ptr="bf16", b_ptr="bf16", scale_ptr="fp32",
                    zp_ptr="fp32", da_part_ptr="fp32", db_part_ptr="fp32", ds_ptr="fp32")
        specs.append(_spec(_fake_quant_bwd_kernel, f"bwd-bf16-R32-g{g}-bn{b.block_n}", ptrs, {"lr_scale": "fp32"}, ce,
                           b.num_warps, b.num_stages, default=False))
    return specs


def needs_int64(*numels: int) -> bool:
    """Whether any flat offset can pass 2^31 - 1: then the kernels compute offsets in int64.

    Offsets are ``row * stride + col`` over ``[out, in]`` tensors (and ``[tokens, in]`` /
    ``[tokens, out]`` activations for the fused GEMMs); int32 keeps the common case cheap.
    """
    return max(numels, default=0) > _INT32_LIMIT


def bwd_grid(out_features: int, in_features: int, n_tiles_m: int, n_tiles_n: int, *,
             target_programs: int, chunks: int, gpt: int) -> tuple[int, int, int, int]:
    """Row/column banding of the backward: ``(P_m, P_n, TM, TN)`` (programs and tiles per program).

    Chooses ``P_m * P_n ~ target_programs`` with ``P_m / P_n ~ sqrt(out / in)``, which minimises
    the partial-buffer bytes ``4 r (P_n out + P_m in)``. With one group a tile and several chunks
    a group, ``TN`` is rounded up to whole groups when a band spans more than one group, so
    ``dL/ds`` can be written in place (no ``[P_n, out, n_groups]`` partial).
    """
    target = max(1, target_programs)
    p_m = max(1, min(n_tiles_m, round(math.sqrt(target * out_features / max(1, in_features)))))
    p_n = max(1, min(n_tiles_n, triton.cdiv(target, p_m)))
    tm = triton.cdiv(n_tiles_m, p_m)
    tn = triton.cdiv(n_tiles_n, p_n)
    if gpt == 1 and chunks > 1 and tn > chunks:
        tn = triton.cdiv(tn, chunks) * chunks
    return triton.cdiv(n_tiles_m, tm), triton.cdiv(n_tiles_n, tn), tm, tn


def _target_programs(device: torch.device) -> int:
    """About two waves of CTAs on a GPU; a handful under the interpreter (programs run serially)."""
    override = os.environ.get("LRQAT_BWD_PROGRAMS")
    if override:
        return max(1, int(override))
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _qparams(scale: torch.Tensor, zero_point: torch.Tensor | None):
    """fp32 contiguous scale / zero point (tiny ``[out, n_groups]`` tensors)."""
    s = scale.to(torch.float32).contiguous()
    zp = None if zero_point is None else zero_point.to(torch.float32).contiguous()
    return s, zp


def _dot_fp32(lora_dtype: torch.dtype, interpret: bool) -> bool:
    return interpret or lora_dtype == torch.float32


def fake_quant_forward(
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    out_dtype: torch.dtype,
    write_int: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Launch the forward kernel (inputs already validated by ``_checks.check_fake_quant_args``).

    Args:
        phi: stored Phi0, contiguous ``[out, in]`` (uint8 ``[out, in // 2]`` for packed_int).
        lora_A: ``[r, in]`` fp32/bf16/fp16. lora_B: ``[out, r]``, same dtype.
        scale: ``[out, n_groups]`` float (per-channel: ``n_groups = 1``); the group size is
            ``in // n_groups``. zero_point: None or shaped like scale.
        out_dtype: fp32, bf16 or fp16: dtype of ``W_hat``.
        write_int: write int8 ``W_int`` instead of ``W_hat``.

    Returns:
        ``W_hat`` ``[out, in]`` in ``out_dtype``; with ``write_int``, ``(W_int int8 [out, in],
        number of NaN entries of W_int)`` (NaNs are written as 0).
    """
    phi = phi.contiguous()  # the kernels address it as dense rows (a no-op when it is)
    out_features = phi.shape[0]
    in_features = lora_A.shape[1]
    rank = lora_A.shape[0]
    n_groups = scale.shape[1]
    g = in_features // n_groups
    interpret = interpreting()
    cfg = fwd_config(out_features, in_features, rank, g, lora_A.dtype, interpret=interpret)
    _, _, chunks, n_tiles_n = column_tiling(in_features, g, cfg.block_n_max)
    n_tiles_m = triton.cdiv(out_features, cfg.block_m)
    a = lora_A.contiguous()
    b = lora_B.contiguous()
    s, zp = _qparams(scale, zero_point)
    device = phi.device
    if write_int:
        out = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        nan_count = torch.zeros(n_tiles_m * n_tiles_n, dtype=torch.int32, device=device)
    else:
        out = torch.empty(out_features, in_features, dtype=out_dtype, device=device)
        nan_count = out  # unused
    if out.numel() == 0:
        return (out, 0) if write_int else out
    grid = (n_tiles_n, n_tiles_m)
    with on_device(phi):
        _fake_quant_fwd_kernel[grid](
            phi, a, b, s, s if zp is None else zp, out, nan_count,
            out_features, in_features, rank, g, n_groups, chunks, phi.shape[1], float(alpha / rank),
            **phi_constexprs(bits, phi_format, g, cfg.gpt),
            HAS_ZP=zp is not None, GPT=cfg.gpt, WRITE_INT=write_int,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, R_CHUNK=cfg.r_chunk,
            DOT_FP32=_dot_fp32(lora_A.dtype, interpret), INTERPRET=interpret,
            I64=needs_int64(out.numel(), phi.numel()),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
    if write_int:
        return out, int(nan_count.sum().item())
    return out


def fake_quant_backward(
    grad: torch.Tensor | None,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    dy: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``(dL/dlora_A, dL/dlora_B, dL/dscale)``.

    Args:
        grad: ``G = dL/dW_hat`` ``[out, in]`` (any float dtype; read once), or None with ``dy``
            and ``x`` given: then each tile builds ``G = dy^T x`` itself (the G-free backward of
            the fused linear; ``dy`` ``[T, out]``, ``x`` ``[T, in]``, same 16/32-bit dtype).
        phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha: as the forward.

    Returns:
        ``dA`` ``[r, in]`` in lora_A's dtype, ``dB`` ``[out, r]`` in lora_B's dtype, ``ds`` like
        ``scale`` (fp32).
    """
    phi = phi.contiguous()  # the kernels address it as dense rows (a no-op when it is)
    out_features = phi.shape[0]
    in_features = lora_A.shape[1]
    rank = lora_A.shape[0]
    n_groups = scale.shape[1]
    g = in_features // n_groups
    device = phi.device
    interpret = interpreting()
    fused_g = grad is None
    cfg = bwd_config(out_features, in_features, rank, g, lora_A.dtype, fused_g=fused_g, interpret=interpret)
    _, _, chunks, n_tiles_n = column_tiling(in_features, g, cfg.block_n_max)
    n_tiles_m = triton.cdiv(out_features, cfg.block_m)
    if out_features == 0 or in_features == 0:
        return torch.zeros_like(lora_A), torch.zeros_like(lora_B), torch.zeros_like(scale)
    p_m, p_n, tm, tn = bwd_grid(out_features, in_features, n_tiles_m, n_tiles_n,
                                target_programs=_target_programs(device), chunks=chunks, gpt=cfg.gpt)
    a = lora_A.contiguous()
    b = lora_B.contiguous()
    s, zp = _qparams(scale, zero_point)
    # Partials in fp32. dA/dB bands are fully overwritten (empty); ds needs zeros only when a
    # group can span two column bands (then each band writes only its own part).
    da_part = torch.empty(p_m, rank, in_features, dtype=torch.float32, device=device)
    db_part = torch.empty(p_n, out_features, rank, dtype=torch.float32, device=device)
    ds_in_place = cfg.gpt > 1 or tn % chunks == 0
    if ds_in_place:
        ds_part = torch.empty(1, out_features, n_groups, dtype=torch.float32, device=device)
        ds_band_stride = 0
    else:
        ds_part = torch.zeros(p_n, out_features, n_groups, dtype=torch.float32, device=device)
        ds_band_stride = out_features * n_groups
    if fused_g:
        if dy is None or x is None:
            raise ValueError("fake_quant_backward: give grad, or both dy and x")
        dy = dy.contiguous()
        x = x.contiguous()
        n_tokens = dy.shape[0]
        g_arg = dy
        big = (dy.numel(), x.numel())
    else:
        grad = grad.contiguous()
        n_tokens = 0
        g_arg = grad
        dy = x = grad
        big = (grad.numel(),)
    grid = (p_n, p_m)
    with on_device(g_arg):
        _fake_quant_bwd_kernel[grid](
            g_arg, dy, x, phi, a, b, s, s if zp is None else zp,
            da_part, db_part, ds_part,
            out_features, in_features, rank, g, n_groups, chunks, phi.shape[1],
            n_tiles_m, n_tiles_n, tm, tn, n_tokens, ds_band_stride, float(alpha / rank),
            **phi_constexprs(bits, phi_format, g, cfg.gpt),
            HAS_ZP=zp is not None, GPT=cfg.gpt, FUSED_G=fused_g,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, BLOCK_T=cfg.block_t,
            SPLIT_BF16=lora_A.dtype == torch.bfloat16, DOT_FP32=_dot_fp32(lora_A.dtype, interpret),
            G_DOT_FP32=_dot_fp32(g_arg.dtype, interpret), INTERPRET=interpret,
            I64=needs_int64(out_features * in_features, phi.numel(), da_part.numel(), db_part.numel(), ds_part.numel(), *big),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
    lr = alpha / rank
    d_a = (da_part.sum(0) if p_m > 1 else da_part[0]) * lr
    d_b = (db_part.sum(0) if p_n > 1 else db_part[0]) * lr
    d_s = ds_part.sum(0) if ds_part.shape[0] > 1 else ds_part[0]
    return d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_s.to(scale.dtype)
