"""Tile plumbing of the fake-quant kernels and the fused GEMMs that reuse their tiles, and the launch tables.

Triton helpers (``@triton.jit``): where a tile's rows and columns are (:func:`row_tile`,
:func:`col_tile`), its scale / zero point (:func:`load_qparams`), the low-rank slices
(:func:`lora_rows`, :func:`lora_cols`) and ``Z = Phi0 + (alpha / r) B @ A`` (:func:`z_tile`,
:func:`lowrank_chunked`). The quantiser math itself lives in ``_triton_quant.py``.

Host side: how column tiles cover a row (:func:`column_tiling`), the fixed configuration tables
of the forward and backward kernels (:func:`fwd_config`, :func:`bwd_config`; no autotuning, so
tests/test_aot_compile.py enumerates and compiles exactly them), the backward's banding
(:func:`bwd_grid`) and the int64-offset rule (:func:`needs_int64`).

Column tiling and groups: a tile never straddles a quantisation group in the "one group per
tile" mode (``GPT == 1``): tiles walk each group in ``chunks = cdiv(g, BLOCK_N)`` pieces (a
partial last piece is masked), so scale/zero point are one ``[BLOCK_M]`` vector load a tile and
``dL/ds`` accumulates in a register. Groups smaller than the tile that divide it (g = 16, 32, 64
with ``BLOCK_N = 128``) use ``GPT = BLOCK_N // g`` groups a tile: their ``[BLOCK_M, GPT]``
scales are loaded once and expanded in registers. Per-channel is one group of ``g = in``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import bwd_programs_override, interpreting, options
from ._triton_quant import and_scalar, decode_phi, dot

__all__ = [
    "BWD_TABLE",
    "BwdConfig",
    "FMA_RANK_CHUNK",
    "FwdConfig",
    "MAX_RANK",
    "bwd_config",
    "bwd_grid",
    "col_tile",
    "column_tiling",
    "expand_groups",
    "fwd_config",
    "load_qparams",
    "lora_cols",
    "lora_rows",
    "lowrank_chunked",
    "needs_int64",
    "rank_pad",
    "row_tile",
    "small_tiles",
    "target_programs",
    "z_from_lowrank",
    "z_tile",
]

#: Rank slice of the forward's low-rank product for fp32 factors (:func:`lowrank_chunked`).
FMA_RANK_CHUNK = 32

#: Largest LoRA rank the kernels take (``R_PAD <= 128``; the paper uses r = 32); larger ranks
#: use the eager path (their register tiles would spill).
MAX_RANK = 128

_INT32_LIMIT = 2**31 - 1


def small_tiles(interpret: bool) -> bool:
    """Whether the configuration tables pick their interpreter (small-tile) row: under the
    interpreter, unless ``kernel_options(gpu_tiles=True)`` asks for the GPU tables."""
    return interpret and not options().gpu_tiles


# ----------------------------------------------------------------------------------------------
# Triton tile helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def row_tile(tile_m, n_rows, BLOCK_M: tl.constexpr, I64: tl.constexpr):
    """Rows of row tile ``tile_m`` (int64 when offsets can pass 2^31) and their mask."""
    if I64:
        rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < n_rows


@triton.jit
def col_tile(tile_n, in_features, group_size, chunks, BLOCK_N: tl.constexpr, GPT: tl.constexpr):
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
def load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GPT: tl.constexpr, HAS_ZP: tl.constexpr,
                  S_OTHER: tl.constexpr = 0.0):
    """Scale and zero point of the tile, broadcastable against ``[BM, BN]``.

    ``S_OTHER``: the scale of masked lanes (L4Q divides by it: 1.0 keeps padding lanes finite).

    ``GPT == 1``: ``[BM, 1]`` (one group a tile). ``GPT > 1``: the ``[BM, GPT]`` values are loaded
    once and expanded to ``[BM, BN]`` in registers (a per-element gather would carry a 64-bit
    address per element: ~100 more registers a thread at 64 x 128).
    """
    if GPT == 1:
        offs = rows * n_groups + grp
        # grp == n_groups on the dead tail tiles of a backward band: nothing to load there (the
        # values would be unused, but the last row's load would run one element past the end).
        qmask = and_scalar(rmask, grp < n_groups)
        s = tl.load(scale_ptr + offs, mask=qmask, other=S_OTHER)[:, None]
        if HAS_ZP:
            zp = tl.load(zp_ptr + offs, mask=qmask, other=0.0)[:, None]
        else:
            zp = s
    else:
        gidx = grp + tl.arange(0, GPT)
        offs = rows[:, None] * n_groups + gidx[None, :]
        m2 = rmask[:, None] & (gidx < n_groups)[None, :]
        s = expand_groups(tl.load(scale_ptr + offs, mask=m2, other=S_OTHER), BLOCK_M, BLOCK_N, GPT)
        if HAS_ZP:
            zp = expand_groups(tl.load(zp_ptr + offs, mask=m2, other=0.0), BLOCK_M, BLOCK_N, GPT)
        else:
            zp = s
    return s, zp


@triton.jit
def expand_groups(q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GPT: tl.constexpr):
    """``[BM, GPT]`` per-group values -> ``[BM, BN]`` (each repeated over its ``BN // GPT`` columns)."""
    G: tl.constexpr = BLOCK_N // GPT
    return tl.reshape(tl.broadcast_to(q[:, :, None], (BLOCK_M, GPT, G)), (BLOCK_M, BLOCK_N))


@triton.jit
def lora_rows(b_ptr, rows, rmask, rank, R_PAD: tl.constexpr):
    """``lora_B[rows, :]`` zero-padded to ``[BM, R_PAD]`` (padding keeps the dot exact)."""
    rr = tl.arange(0, R_PAD)
    return tl.load(b_ptr + rows[:, None] * rank + rr[None, :], mask=rmask[:, None] & (rr < rank)[None, :], other=0.0)


@triton.jit
def lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD: tl.constexpr):
    """``lora_A[:, cols]`` zero-padded to ``[R_PAD, BN]``."""
    rr = tl.arange(0, R_PAD)
    return tl.load(a_ptr + rr[:, None] * in_features + cols[None, :], mask=(rr < rank)[:, None] & cmask[None, :], other=0.0)


@triton.jit
def z_tile(phi_ptr, b_tile, a_tile, row_off, rmask, cols, cmask, col0, n_valid, lr_scale,
            PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """``Z = Phi0 + (B @ A) * (alpha / r)`` for one tile, fp32, from the lora slices."""
    acc = tl.zeros((b_tile.shape[0], a_tile.shape[1]), dtype=tl.float32)
    return z_from_lowrank(phi_ptr, dot(b_tile, a_tile, acc, DOT_FP32), row_off, rmask, cols, cmask, col0, n_valid,
                           lr_scale, PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N)


@triton.jit
def z_from_lowrank(phi_ptr, ba, row_off, rmask, cols, cmask, col0, n_valid, lr_scale,
                    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Z = Phi0 + BA * (alpha / r)`` for one tile given ``BA = B @ A`` (fp32; the reference's op order)."""
    return decode_phi(phi_ptr, row_off, rmask, cols, cmask, col0, n_valid, PHI_KIND, PHI_MUL, PACKED_PAIRS,
                       BLOCK_N) + ba * lr_scale


@triton.jit
def lowrank_chunked(b_ptr, a_ptr, rows, rmask, cols, cmask, rank, in_features,
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
        acc = dot(b, a, acc, DOT_FP32)
    return acc


# ----------------------------------------------------------------------------------------------
# Launch tables: small and fixed (no autotuning), exposed so tests enumerate exactly them
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FwdConfig:
    """Launch configuration of ``fake_quant._fake_quant_fwd_kernel`` (tile shape, warps)."""

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
    """Launch configuration of ``fake_quant._fake_quant_bwd_kernel``."""

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
    (``r_chunk``, :func:`lowrank_chunked`): the operands of one FMA dot are live at once, and
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
#: (``fake_quant._rank_reduce``), fp32/fp16 factors IEEE FMA dots, whose operands take more registers. Among
#: spill-free shapes the tallest wins: each row tile re-reads and re-writes its band's fp32 dA
#: partial (``R_PAD / BLOCK_M`` words a weight), so ``BLOCK_M`` matters more than ``BLOCK_N``.
#: fp16 factors share fp32's rows; at R_PAD = 32 (8 warps, so fp16 does not spill) fp32 spills a
#: few words on sm_90 under Triton 3.6, and at R_PAD = 16 under 3.8. Fused fp32 at R_PAD = 128 is
#: 32 x 16: 32 x 32 spilled 176 B a thread on sm_90 under Triton 3.9 (CUDA 13.4's ptxas) and
#: 64 x 16 spills on sm_90 under 3.6 and 3.8; 32 x 16 is spill-free on sm_80 / sm_90 under 3.6,
#: 3.8 and 3.9 (tests/test_aot_compile.py::test_backward_configs_spill_at_most_a_few_words).
BWD_TABLE = {
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
    """The backward kernel's configuration: :data:`BWD_TABLE` (no autotuning).

    Keyed on the dot mode (split-bf16 tensor cores for bf16 factors, IEEE FMA otherwise),
    ``R_PAD`` and whether ``G`` tiles are built in the kernel. ``BLOCK_T`` (token chunk of the
    G-free variant) is 32. Under the interpreter: 32 x 64 tiles, ``BLOCK_T`` 16.
    """
    interpret = interpreting() if interpret is None else interpret
    r_pad = rank_pad(rank)
    if small_tiles(interpret):
        bm, bn_max, warps, block_t = 32, 64, 4, 16
    else:
        bm, bn_max, warps = BWD_TABLE[(lora_dtype == torch.bfloat16, r_pad, fused_g)]
        block_t = 32
    bn, gpt, _, _ = column_tiling(in_features, group_size, bn_max)
    return BwdConfig(block_m=bm, block_n=bn, r_pad=r_pad, gpt=gpt, block_t=block_t, num_warps=warps, block_n_max=bn_max)


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


def target_programs(device: torch.device) -> int:
    """Programs the backward aims at: about two waves of CTAs on a GPU, a handful under the
    interpreter (programs run serially); ``kernel_options(bwd_programs=N)`` overrides."""
    override = bwd_programs_override()
    if override is not None:
        return override
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
