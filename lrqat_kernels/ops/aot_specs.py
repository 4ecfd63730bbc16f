"""Every Triton kernel configuration the launchers can pick, as specs :mod:`.aot` compiles.

``tests/test_aot_compile.py`` compiles :func:`all_specs` for sm_80 / sm_90 without a GPU and
checks registers, spills and the PTX rules (round-half-even constants kept, no contraction, no
int -> float conversions). The lists are built from the launchers' own tables (``_tiles.fwd_config``,
``_tiles.bwd_config``, ``fused_linear.fused_gemm_config``), so a table change is compiled here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fake_quant as fq
from . import fused_linear as fl
from ._tiles import bwd_config, fwd_config
from ._triton_quant import phi_constexprs

__all__ = ["KernelSpec", "all_specs", "fake_quant_specs", "fused_linear_specs", "l4q_specs", "spec"]


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


def spec(kernel, name: str, ptr_types: dict, scalar_types: dict, constexprs: dict, num_warps: int, num_stages: int,
         default: bool) -> KernelSpec:
    """A :class:`KernelSpec` for ``kernel``: pointer args typed by ``ptr_types`` (``"bf16"``,
    ``"u8"``...), other scalars by ``scalar_types`` (default ``"i32"``), ``constexprs`` fixed."""
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


def all_specs() -> list[KernelSpec]:
    """:func:`fake_quant_specs`, :func:`fused_linear_specs`, then :func:`l4q_specs`."""
    return fake_quant_specs() + fused_linear_specs() + l4q_specs()


def fake_quant_specs() -> list[KernelSpec]:
    """Every configuration the fake-quant launchers (``ops/fake_quant.py``) can pick, as compilable specs.

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
                          DOT_FP32=dt == torch.float32, INTERPRET=False, I64=False, L4Q=False)
                ptrs = dict(phi_ptr=_PHI_TT[fmt], a_ptr=_TT[dt], b_ptr=_TT[dt], scale_ptr="fp32", zp_ptr="fp32",
                            out_ptr="i8" if write_int else _TT[dt], nan_ptr="i32")
                name = f"fwd-{_TT[dt]}-R{r_pad}-gpt{cfg.gpt}{'-int8' if write_int else ''}"
                specs.append(spec(fq._fake_quant_fwd_kernel, name, ptrs, {"lr_scale": "fp32"}, ce, cfg.num_warps,
                                   cfg.num_stages, default=dt == torch.bfloat16 and r_pad == 32))
            for fused in (False, True):
                for g in (in_f, 32):
                    if (g == 32 or dt == torch.float16) and r_pad != 32:
                        continue
                    cfg = bwd_config(4096, in_f, r_pad, g, dt, fused_g=fused, interpret=False)
                    ce = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, FUSED_G=fused,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, BLOCK_T=cfg.block_t,
                              SPLIT_BF16=dt == torch.bfloat16, DOT_FP32=dt == torch.float32,
                              G_DOT_FP32=dt == torch.float32 and not fused, INTERPRET=False, I64=False, L4Q=False)
                    # G-free backward: 16-bit activations only (the fused_linear ops keep fp32 unfused)
                    act = "bf16" if fused and dt == torch.float32 else _TT[dt]
                    ptrs = dict(g_ptr=act, dy_ptr=act, x_ptr=act, phi_ptr=_PHI_TT[fmt], a_ptr=_TT[dt], b_ptr=_TT[dt],
                                scale_ptr="fp32", zp_ptr="fp32", da_part_ptr="fp32", db_part_ptr="fp32", ds_ptr="fp32",
                                dof_ptr="fp32")
                    name = f"bwd{'_fused_g' if fused else ''}-{_TT[dt]}-R{r_pad}-gpt{cfg.gpt}"
                    specs.append(spec(fq._fake_quant_bwd_kernel, name, ptrs, {"lr_scale": "fp32"}, ce, cfg.num_warps,
                                       cfg.num_stages, default=dt == torch.bfloat16 and r_pad == 32))
    # odd group sizes: a narrower tile (96 -> 32 columns) and nibble-by-nibble packed loads (9 -> 16)
    for g, fmt in ((96, "packed_int"), (9, "packed_int")):
        cfg = fwd_config(4096, 4032, 32, g, torch.bfloat16, interpret=False)
        ce = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, WRITE_INT=False, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, R_CHUNK=cfg.r_chunk, DOT_FP32=False, INTERPRET=False,
                  I64=False, L4Q=False)
        ptrs = dict(phi_ptr="u8", a_ptr="bf16", b_ptr="bf16", scale_ptr="fp32", zp_ptr="fp32", out_ptr="bf16", nan_ptr="i32")
        specs.append(spec(fq._fake_quant_fwd_kernel, f"fwd-bf16-R32-g{g}-bn{cfg.block_n}", ptrs, {"lr_scale": "fp32"}, ce,
                           cfg.num_warps, cfg.num_stages, default=False))
        b = bwd_config(4096, 4032, 32, g, torch.bfloat16, interpret=False)
        ce = dict(phi_constexprs(4, fmt, g, b.gpt), HAS_ZP=True, GPT=b.gpt, FUSED_G=False, BLOCK_M=b.block_m,
                  BLOCK_N=b.block_n, R_PAD=b.r_pad, BLOCK_T=b.block_t, SPLIT_BF16=True, DOT_FP32=False,
                  G_DOT_FP32=False, INTERPRET=False, I64=False, L4Q=False)
        ptrs = dict(g_ptr="bf16", dy_ptr="bf16", x_ptr="bf16", phi_ptr="u8", a_ptr="bf16", b_ptr="bf16", scale_ptr="fp32",
                    zp_ptr="fp32", da_part_ptr="fp32", db_part_ptr="fp32", ds_ptr="fp32", dof_ptr="fp32")
        specs.append(spec(fq._fake_quant_bwd_kernel, f"bwd-bf16-R32-g{g}-bn{b.block_n}", ptrs, {"lr_scale": "fp32"}, ce,
                           b.num_warps, b.num_stages, default=False))
    return specs


def fused_linear_specs() -> list[KernelSpec]:
    """Every configuration the fused dequant-GEMM launchers can pick (``tests/test_aot_compile.py``).

    Keys: ``R_PAD`` (16..128) x ``BLOCK_T`` (16 below 33 tokens, else 64) for bf16; fp16 and
    ``gpt > 1`` at the default rank 32. (fp32 activations never take the fused GEMMs.)
    """
    specs = []
    in_f = 4096
    for r_pad in (16, 32, 64, 128):
        for dt, fmt, n_tokens, g in ((torch.bfloat16, "packed_int", 16, in_f), (torch.bfloat16, "packed_int", 64, in_f),
                                     (torch.float16, "bf16", 16, in_f), (torch.bfloat16, "packed_int", 16, 32)):
            if (dt == torch.float16 or g == 32) and r_pad != 32:
                continue
            cfg = fl.fused_gemm_config(4096, in_f, r_pad, g, n_tokens, interpret=False)
            base = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, R_PAD=cfg.r_pad,
                        DOT_FP32=dt == torch.float32, X_DOT_FP32=dt == torch.float32, INTERPRET=False, I64=False)
            act = _TT[dt]
            common = dict(phi_ptr=_PHI_TT[fmt], a_ptr=act, b_ptr=act, scale_ptr="fp32", zp_ptr="fp32")
            tag = f"{act}-R{r_pad}-T{cfg.block_t}-gpt{cfg.gpt}"
            default = dt == torch.bfloat16 and r_pad == 32
            specs.append(spec(
                fl._fused_linear_fwd_kernel, f"fused_fwd-{tag}", dict(common, x_ptr=act, bias_ptr=act, y_ptr=act),
                {"lr_scale": "fp32"},
                dict(base, HAS_BIAS=True, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_m, BLOCK_K=cfg.block_n),
                cfg.num_warps, cfg.num_stages, default))
            specs.append(spec(
                fl._fused_linear_dx_kernel, f"fused_dx-{tag}", dict(common, dy_ptr=act, dx_ptr=act), {"lr_scale": "fp32"},
                dict(base, BLOCK_T=cfg.block_t, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                cfg.num_warps, cfg.num_stages, default))
    return specs


def l4q_specs() -> list[KernelSpec]:
    """The fake-quant kernels' L4Q mode (``L4Q=True``: float ``W0``, fp32 offset through the zero-point
    pointer, ``div_rn``; the backward's second partial), as ``fq.l4q_forward`` / ``fq.l4q_backward``
    launch it. Same tables as LR-QAT: every ``R_PAD`` with bf16 ``W0`` and factors and with fp16
    ``W0`` (fp32 factors: fp16 compute), fp32 ``W0`` at the default rank; ``gpt > 1`` and the int8
    merge at the default rank; the G-free backward. Names start ``fwd-l4q`` / ``bwd-l4q``, so the forward / backward spill rules cover them.
    """
    specs = []
    in_f = 4096
    w0_dt = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float16, torch.float32: torch.float32}
    for r_pad in (16, 32, 64, 128):
        # (W0 dtype, factor dtype): bf16 model, fp16 model (fp32 factors), fp32 model
        for w_dt, dt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float32)):
            fmt = _TT[w0_dt[w_dt]]
            for g, write_int in ((in_f, False), (32, False), (in_f, True)):
                if (g == 32 or write_int or w_dt == torch.float32) and r_pad != 32:
                    continue
                cfg = fwd_config(4096, in_f, r_pad, g, dt, interpret=False)
                ce = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, WRITE_INT=write_int,
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, R_CHUNK=cfg.r_chunk,
                          DOT_FP32=dt == torch.float32, INTERPRET=False, I64=False, L4Q=True)
                ptrs = dict(phi_ptr=fmt, a_ptr=_TT[dt], b_ptr=_TT[dt], scale_ptr="fp32", zp_ptr="fp32",
                            out_ptr="i8" if write_int else _TT[w_dt], nan_ptr="i32")
                name = f"fwd-l4q-w{fmt}-{_TT[dt]}-R{r_pad}-gpt{cfg.gpt}{'-int8' if write_int else ''}"
                specs.append(spec(fq._fake_quant_fwd_kernel, name, ptrs, {"lr_scale": "fp32"}, ce, cfg.num_warps,
                                   cfg.num_stages, default=w_dt == torch.bfloat16 and r_pad == 32))
            for fused in (False, True):
                for g in (in_f, 32):
                    if (g == 32 or w_dt == torch.float32) and r_pad != 32:
                        continue
                    cfg = bwd_config(4096, in_f, r_pad, g, dt, fused_g=fused, interpret=False)
                    ce = dict(phi_constexprs(4, fmt, g, cfg.gpt), HAS_ZP=True, GPT=cfg.gpt, FUSED_G=fused,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, BLOCK_T=cfg.block_t,
                              SPLIT_BF16=dt == torch.bfloat16, DOT_FP32=dt == torch.float32,
                              G_DOT_FP32=False, INTERPRET=False, I64=False, L4Q=True)
                    # G in fp32 (l4q.py forms dy^T x in fp32); the G-free variant reads 16-bit dy and x
                    act = _TT[w_dt] if fused and w_dt != torch.float32 else ("bf16" if fused else "fp32")
                    ptrs = dict(g_ptr=act, dy_ptr=act, x_ptr=act, phi_ptr=fmt, a_ptr=_TT[dt], b_ptr=_TT[dt],
                                scale_ptr="fp32", zp_ptr="fp32", da_part_ptr="fp32", db_part_ptr="fp32", ds_ptr="fp32",
                                dof_ptr="fp32")
                    name = f"bwd-l4q{'_fused_g' if fused else ''}-w{fmt}-{_TT[dt]}-R{r_pad}-gpt{cfg.gpt}"
                    specs.append(spec(fq._fake_quant_bwd_kernel, name, ptrs, {"lr_scale": "fp32"}, ce, cfg.num_warps,
                                       cfg.num_stages, default=w_dt == torch.bfloat16 and r_pad == 32))
    return specs
