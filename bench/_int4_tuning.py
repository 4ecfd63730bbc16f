"""The W4A16 tuner's tables: what ``bench/tune_int4_gemm.py`` sweeps and the JSON it writes.

Tuner-only code (the package reads no table: ``int4_triton_config`` and ``int4_linear``'s "auto"
use their heuristics until a first measured table ships with a small loader). A table records, per
GPU, the measured winner per layer shape ``[N, K]`` and token count ``M``: which backend (Triton,
dequantise + cuBLAS, or with ``--allow-cuda`` the opt-in CUDA kernel) and the fastest Triton config.

File name: ``int4_<device name>.json`` with every run of characters other than letters, digits,
``-`` and ``.`` replaced by ``_`` (``NVIDIA H100 80GB HBM3`` -> ``int4_NVIDIA_H100_80GB_HBM3.json``).

Schema (``version`` 1)::

    {"version": 1, "device": "NVIDIA H100 80GB HBM3", "sm": "90", "created": "...",
     "torch": "...", "triton": "...", "cuda": "...", "dtype": "bf16", "group_size": 128,
     "entries": [{"N": 11008, "K": 4096, "M": 16, "backend": "triton",
                  "config": {"block_m": 16, "block_n": 64, "block_k": 128, "split_k": 4,
                             "num_warps": 4, "num_stages": 4, "swap_ab": false, "fast_decode": false},
                  "us": {"triton": 20.1, "dequant": 52.3, "cublas": 48.0}},
                 {"N": 11008, "K": 4096, "M": 4096, "backend": "dequant", "dequant_chunk_n": 2048, ...}, ...]}

``swap_ab`` / ``fast_decode`` are optional (default false). ``dequant_chunk_n`` (optional): the row
chunk with which ``int4_linear.dequant_linear`` ran fastest for that shape (absent: one whole W_hat).
:func:`lookup` states which entry decides a point (the rule a loader will follow): the entries of
the same ``[N, K]`` if tuned, else of the nearest tuned shape (log distance of N and K, at most a
factor of 4), only for the table's group size; among those the smallest tuned M >= M, else the
largest tuned M.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lrqat_kernels._io import atomic_write_json
from lrqat_kernels.ops.int4_triton import _block_k, heuristic_tiles, int4_triton_config

TABLE_VERSION = 1
TABLE_BACKENDS = ("triton", "dequant", "cuda")
_CONFIG_KEYS = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages")
_OPTIONAL_BOOL_KEYS = ("swap_ab", "fast_decode")


@dataclass(frozen=True)
class TunedEntry:
    """One measured choice: for layer ``[N, K]`` at ``M`` tokens, ``backend`` won; ``config`` is the
    fastest Triton config (dict with :data:`_CONFIG_KEYS`), ``us`` the medians it was chosen by."""

    N: int
    K: int
    M: int
    backend: str
    config: dict
    us: dict
    #: the "dequant" backend's row chunk (``int4_linear.dequant_linear``), None: one whole ``W_hat``
    dequant_chunk_n: int | None = None


def table_filename(device_name: str) -> str:
    """``int4_<device name, sanitised>.json``."""
    return "int4_" + re.sub(r"[^A-Za-z0-9.\-]+", "_", device_name.strip()) + ".json"


def _pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


def _validate(table: dict) -> list[TunedEntry]:
    """The table's entries, or ValueError naming the first problem."""
    if not isinstance(table, dict):
        raise ValueError("top level must be a JSON object")
    if type(table.get("version")) is not int or table.get("version") != TABLE_VERSION:
        raise ValueError(f"version must be the integer {TABLE_VERSION}, got {table.get('version')!r}")
    g = table.get("group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise ValueError(f"group_size must be a positive integer (what the table was measured with), got {g!r}")
    raw = table.get("entries")
    if not isinstance(raw, list) or not raw:
        raise ValueError("entries must be a non-empty list")
    entries = []
    for i, e in enumerate(raw):
        where = f"entries[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} must be an object")
        for key in ("N", "K", "M"):
            v = e.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}.{key} must be a positive integer, got {v!r}")
        if e.get("backend") not in TABLE_BACKENDS:
            raise ValueError(f"{where}.backend must be one of {TABLE_BACKENDS}, got {e.get('backend')!r}")
        cfg = e.get("config")
        if not isinstance(cfg, dict) or not set(_CONFIG_KEYS) <= set(cfg) <= {*_CONFIG_KEYS, *_OPTIONAL_BOOL_KEYS}:
            raise ValueError(f"{where}.config must have the keys {_CONFIG_KEYS} (optional: {_OPTIONAL_BOOL_KEYS}), "
                             f"got {cfg!r}")
        for key in _OPTIONAL_BOOL_KEYS:
            if not isinstance(cfg.get(key, False), bool):
                raise ValueError(f"{where}.config.{key} must be true or false, got {cfg[key]!r}")
        for key in _CONFIG_KEYS:
            v = cfg[key]
            if key in ("split_k", "num_stages"):
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                    raise ValueError(f"{where}.config.{key} must be an integer in [1, 64], got {v!r}")
            elif not _pow2(v):
                raise ValueError(f"{where}.config.{key} must be a power of two, got {v!r}")
        if cfg["num_warps"] > 32 or max(cfg["block_m"], cfg["block_n"], cfg["block_k"]) > 512:
            raise ValueError(f"{where}.config: num_warps <= 32 and blocks <= 512, got {cfg}")
        if cfg["block_m"] < 8 or cfg["block_n"] < 16 or cfg["block_k"] < 32:
            raise ValueError(f"{where}.config: block_m >= 8, block_n >= 16 and block_k >= 32 (tensor-core tiles), "
                             f"got {cfg}")
        us = e.get("us", {})
        if not isinstance(us, dict):
            raise ValueError(f"{where}.us must be an object")
        chunk = e.get("dequant_chunk_n")
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk < e["N"]):
            raise ValueError(f"{where}.dequant_chunk_n must be null or an integer in [1, N), got {chunk!r}")
        entries.append(TunedEntry(e["N"], e["K"], e["M"], e["backend"], dict(cfg), dict(us), chunk))
    seen = set()
    for e in entries:
        if (e.N, e.K, e.M) in seen:
            raise ValueError(f"two entries for N={e.N}, K={e.K}, M={e.M}")
        seen.add((e.N, e.K, e.M))
    return entries


def _shape_distance(e: TunedEntry, N: int, K: int) -> float:
    return abs(math.log(e.N / N)) + abs(math.log(e.K / K))


#: The farthest a layer shape may be from a tuned one, in ``|log N ratio| + |log K ratio|``, for
#: that entry to decide it: one factor of 4 (LLaMA's q/k/v/o, gate/up, down and 7B/8B shapes
#: are within it of each other). Farther layers (a 128k-vocabulary head, tiny test layers) keep the
#: built-in heuristics instead of a crossover and tiles measured for another size class.
MAX_SHAPE_DISTANCE = math.log(4.0) + 1e-9


def lookup(table: dict, M: int, N: int, K: int, group_size: int | None = None) -> tuple[TunedEntry, bool] | None:
    """The entry of ``table`` that decides ``(M, N, K)``, and whether its shape is exactly ``[N, K]``;
    None for a ``group_size`` other than the table's (``None``: not checked), or for a shape farther
    than :data:`MAX_SHAPE_DISTANCE` from every tuned one."""
    entries = _validate(table)
    if group_size is not None and group_size != table["group_size"]:
        return None  # measured with other groups: their tiles and crossover do not carry over
    best = min(_shape_distance(e, N, K) for e in entries)
    if best > MAX_SHAPE_DISTANCE:
        return None
    same = sorted((e for e in entries if _shape_distance(e, N, K) == best), key=lambda e: e.M)
    # Entries of one shape (the nearest; ties broken by the shape with the smallest tuned M): N, K of same[0].
    same = [e for e in same if (e.N, e.K) == (same[0].N, same[0].K)]
    chosen = next((e for e in same if e.M >= M), same[-1])
    return chosen, (chosen.N, chosen.K) == (N, K)


# ---- what the tuner sweeps and how it writes a table ----------------------------------------------


def candidate_configs(M: int, N: int, K: int, group_size: int | None, sms: int = 132) -> list[dict]:
    """The Triton configs ``bench/tune_int4_gemm.py`` times for ``(M, N, K)``: tile shapes by the M
    regime, warps, pipeline depth and split-K around the heuristic's choice, each tile also with the
    operands swapped (``swap_ab``) and, for M <= 64, with the PTX decode (``fast_decode``). Always
    contains the heuristic default (so a tuned table is never worse than no table), every
    ``block_k`` divides the group, and no split is empty."""
    default = int4_triton_config(M, N, K, group_size, "cuda", sms=sms)
    # (BLOCK_M, BLOCK_N) by regime: decode (M <= 64) is memory bound (narrow N tiles, many of them,
    # split-K to fill the SMs); prefill is compute bound (big tiles amortise the dequantisation).
    if M <= 16:
        tiles = [(16, 64), (16, 128)]
    elif M <= 32:
        tiles = [(32, 64), (16, 64), (32, 128)]
    elif M <= 64:
        tiles = [(64, 64), (32, 64), (64, 128)]
    elif M <= 256:
        tiles = [(64, 128), (128, 64), (64, 64), (128, 128)]
    else:  # 128 x 256 in the default order is left out: ptxas spills it heavily at 8 warps (sm_80 and sm_90)
        tiles = [(64, 128), (128, 128), (128, 64)]
    k_tiles = lambda bk: -(-K // bk)  # noqa: E731
    # The heuristic's fill-the-GPU split for this many M x N tiles: ~4 programs an SM, <= 16.
    fill_split = lambda tiles_mn: max(1, min(16, -(-4 * sms // tiles_mn))) if tiles_mn < 4 * sms else 1  # noqa: E731
    out, seen = [], set()

    def add(bm, bn, bk, split, warps, stages, swap=False, fast=False):
        try:
            bk = _block_k(K, group_size, bk)
        except ValueError:
            return
        split = max(1, min(split, k_tiles(bk)))
        split = -(-k_tiles(bk) // -(-k_tiles(bk) // split))  # the launcher's no-empty-split count
        key = (bm, bn, bk, split, warps, stages, swap, fast)
        if key not in seen:
            seen.add(key)
            out.append(dict(zip((*_CONFIG_KEYS, "swap_ab", "fast_decode"), key)))

    add(default.block_m, default.block_n, default.block_k, default.split_k, default.num_warps, default.num_stages,
        default.swap_ab)
    # Second: the default with the operand order flipped (so even a --max-candidates 2 run compares both).
    add(default.block_m, default.block_n, default.block_k, default.split_k, default.num_warps, default.num_stages,
        not default.swap_ab)
    for bm, bn in tiles:
        bk = 128 if bm <= 32 else 64  # as the heuristic: wide K tiles only while the x tile is small
        warps = 4 if bm * bn <= 32 * 64 else 8
        fill = fill_split(-(-M // bm) * -(-N // bn))
        splits = sorted({1, fill, max(1, fill // 2), min(16, fill * 2)}) if M <= 256 else [1, 2]
        for split in splits:
            for stages in (3, 4) if bm * bn < 128 * 128 else (3,):
                add(bm, bn, bk, split, warps, stages)
        # Weights as the MMA's A operand (y^T = W x^T; no shared-memory round trip of the weight
        # tile on sm_90): every split when compute bound, else only the fill-the-GPU split.
        for split in (splits if M > 64 else [fill]):
            add(bm, bn, bk, split, warps, 3 if bm * bn >= 128 * 128 else 4, True)
    if M <= 8:
        # Swapped, x is the MMA's N side, where 8 is a native width (mma.sync m16n8k16, wgmma
        # m64n8k16): half the tensor-core work of a 16-row x tile padded from M = 1.
        for bn in (64, 128):
            add(8, bn, 128, fill_split(-(-N // bn)), 4, 4, True)
    if M <= 64:
        # Memory bound, where the decode's ALU work can limit: every distinct tile shape and
        # operand order once more with the 2-weights-per-instruction PTX decode, at the split and
        # depth timed first for that shape (NVIDIA only; the tuner checks each output first).
        firsts = {}
        for c in out:
            firsts.setdefault((c["block_m"], c["block_n"], c["swap_ab"]), c)
        for c in firsts.values():
            add(c["block_m"], c["block_n"], c["block_k"], c["split_k"], c["num_warps"], c["num_stages"],
                c["swap_ab"], True)
    if M > 256:
        # 256-wide tiles only swapped: with the weights in registers and the group scales folded
        # into them, ptxas fits them without spills on sm_90 (the default order spills).
        for bm, bn in ((256, 128), (128, 256)):
            add(bm, bn, 64, 1, 8, 3, True)
    return out


def build_table(measurements: list[dict], info: dict, *, dtype: str, group_size: int, allow_cuda: bool = False) -> dict:
    """A table from the tuner's measurements.

    Args:
        measurements: one dict per (shape, M): ``N``, ``K``, ``M``, ``triton`` = list of
            ``(config dict, median us)`` (failed configs left out), ``dequant`` / ``cublas`` /
            ``cuda`` = median us or None; ``dequant_chunk_n``: the row chunk ``dequant`` was
            timed with (its fastest), None for one whole ``W_hat``.
        info: device facts (``device``, ``sm``, ``torch``, ``triton``, ``cuda``, ``date``).
        allow_cuda: let the CUDA kernel win entries (only once its GPU tests passed on this GPU).
    """
    entries = []
    for m in measurements:
        timed = [(us, cfg) for cfg, us in m["triton"] if us is not None and math.isfinite(us)]
        if timed:
            t_us, t_cfg = min(timed, key=lambda t: t[0])
            options = {"triton": t_us}
        elif m.get("dequant") is not None or (allow_cuda and m.get("cuda") is not None):
            # No Triton config passed its check here: still an entry, so a neighbouring "triton"
            # entry cannot decide this point. Its config is the built-in default (used only if a
            # caller forces Triton on this shape).
            t_us, t_cfg, options = None, heuristic_config_dict(m["M"], m["N"], m["K"], group_size), {}
        else:
            continue
        if m.get("dequant") is not None:
            options["dequant"] = m["dequant"]
        if allow_cuda and m.get("cuda") is not None:
            options["cuda"] = m["cuda"]
        backend = min(options, key=options.get)
        us = {k: round(v, 3) for k, v in (("triton", t_us), ("dequant", m.get("dequant")),
                                          ("cuda", m.get("cuda")), ("cublas", m.get("cublas"))) if v is not None}
        entry = dict(N=m["N"], K=m["K"], M=m["M"], backend=backend, config=dict(t_cfg), us=us)
        if m.get("dequant") is not None and m.get("dequant_chunk_n") is not None:
            entry["dequant_chunk_n"] = m["dequant_chunk_n"]
        entries.append(entry)
    table = dict(version=TABLE_VERSION, device=info["device"], sm=str(info.get("sm", "")),
                 created=info.get("date", ""), torch=info.get("torch", ""), triton=info.get("triton", ""),
                 cuda=str(info.get("cuda", "")), dtype=dtype, group_size=group_size, entries=entries)
    _validate(table)
    return table


def merge_tables(old: dict, new: dict) -> dict:
    """``new`` plus the entries of ``old`` it did not re-measure (same ``(N, K, M)``: ``new`` wins),
    sorted by shape and M: one device's table built over several tuner runs (e.g. one call per
    group of layer shapes). Both must be valid tables for the same device, dtype and group size,
    measured with the same torch / Triton / CUDA versions (the table records one set); ``created``
    is ``new``'s."""
    _validate(old)
    _validate(new)
    for key in ("device", "sm", "dtype", "group_size", "torch", "triton", "cuda"):
        if old.get(key) != new.get(key):
            raise ValueError(f"cannot merge tables with different {key}: {old.get(key)!r} vs {new.get(key)!r}")
    fresh = {(e["N"], e["K"], e["M"]) for e in new["entries"]}
    entries = [e for e in old["entries"] if (e["N"], e["K"], e["M"]) not in fresh] + list(new["entries"])
    entries.sort(key=lambda e: (e["N"], e["K"], e["M"]))
    merged = dict(new, entries=entries)
    _validate(merged)
    return merged


def write_table(table: dict, directory: str | os.PathLike) -> Path:
    """Validate ``table`` and write it atomically as ``directory / table_filename(device)``."""
    _validate(table)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / table_filename(table["device"])
    atomic_write_json(path, table, indent=1)
    return path


def heuristic_config_dict(M: int, N: int, K: int, group_size: int) -> dict:
    """The built-in tiles for ``(M, N, K)`` as a table ``config`` (split-K 1)."""
    bm, bn, bk_max, num_warps, num_stages = heuristic_tiles(M)
    return dict(block_m=bm, block_n=bn, block_k=_block_k(K, group_size, bk_max), split_k=1, num_warps=num_warps,
                num_stages=num_stages)


def dequant_chunk_candidates(N: int, K: int, dtype: torch.dtype) -> list[int]:
    """The ``chunk_n`` values the tuner times for ``int4_linear.dequant_linear``: buffers of 8, 16
    and 32 MiB (H100 L2: 50 MB), in multiples of 256 rows, each smaller than N."""
    row_bytes = K * torch.empty((), dtype=dtype).element_size()
    out = []
    for mib in (8, 16, 32):
        c = (mib << 20) // max(1, row_bytes) // 256 * 256
        if 256 <= c < N and c not in out:
            out.append(c)
    return out
