"""GPTQ checkpoint writer (``quant_method: gptq``, ``checkpoint_format: gptq_v2`` by default).

What is written into ``out_dir`` (facts sheet ``shared/design/EXPORTS.md`` section 2):

- ``model.safetensors``: per quantised linear ``<m>`` (``b`` bits, ``G`` groups, ``o = 2^(b-1)``)

  ============== ======= ========================== ================================================
  tensor          dtype   shape                      content
  ============== ======= ========================== ================================================
  ``qweight``     int32   ``[ceil(in*b/32), out]``   codes ``u = W_int + o`` packed along the input dim
  ``qzeros``      int32   ``[G, ceil(out*b/32)]``    zero codes packed along the output dim: ``z + o``
                                                     (v2), ``o - 1`` (v1, symmetric only)
  ``scales``      fp16    ``[G, out]``               ``s`` transposed, rounded to fp16
  ``g_idx``       int32   ``[in]``                   ``k // group`` (contiguous groups)
  ``bias``        fp16    ``[out]``                  when the layer has one
  ============== ======= ========================== ================================================

  and every dense tensor (embeddings, norms, an excluded ``lm_head``) under its HF name in fp16,
  the dtype GPTQ stacks run (vLLM's ``gptq`` kernel takes fp16 activations only). A head tied to
  the embedding is left out only when config.json says tied; a head of its own under a config
  that says tied is written and the config set untied (:func:`~._common.plan_head`).
- ``config.json`` gains ``quantization_config`` (and its ``dtype`` becomes ``float16``);
  ``quantize_config.json`` holds the same dict (GPTQModel's own file name).

Bit layout: a code's bits go into a dense LSB-first stream of 32-bit words along the packed
dim (element ``i`` at bit ``i*b``). For ``b`` in {2, 4, 8} that is GPTQ's
``word[k // (32/b)] |= u[k] << b*(k % (32/b))``; for ``b = 3`` it is GPTQ's 3-word pattern per 32
codes. Both are what :func:`~._common.pack_bitstream` writes (``tests/test_export_gptq.py`` unpacks
them with GPTQ's documented per-word rules).

Exactness: the integers and zero points are exact; the checkpoint holds
``fp16(s) * (W_int - z)``. Scales that fp16 rounds are reported (count, largest relative error,
2^-11 at most in fp16's normal range) and warned about; scales fp16 turns into 0 or inf are
refused, scales in fp16's subnormal range that lose more than 1e-3 relative are refused unless
``allow_inexact=True``. Exact: a model converted with ``scale_dtype="float16"``.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from .._io import atomic_write_json
from .._version import __version__
from ._common import ExportError, QuantLayer, check_options, pack_bitstream, plan_head, save_safetensors, scale_rounding

__all__ = ["write", "validate_options", "OPTIONS", "CHECKPOINT_FORMATS", "BITS", "gptq_tensors", "quantization_config"]

#: The writer's options (anything else is refused).
OPTIONS = ("allow_inexact", "checkpoint_format")

#: ``checkpoint_format`` values: ``gptq_v2`` stores zero codes as is, ``gptq`` (v1) stores them minus 1.
CHECKPOINT_FORMATS = ("gptq_v2", "gptq")
#: Bit widths GPTQ's packed layout and readers (transformers' GPTQConfig, vLLM) accept.
BITS = (2, 3, 4, 8)
WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
#: A subnormal fp16 scale may lose at most this much (relative) without ``allow_inexact``.
SUBNORMAL_REL_TOL = 1e-3
# vLLM gptq_marlin takes (bits, sym) in {(4, True), (8, True)} with these group sizes (facts sheet 2.6).
_MARLIN_GROUPS = (-1, 32, 64, 128)
# GPTQModel's TorchQuantLinear (and its other kernels) accept these group sizes.
_GPTQMODEL_GROUPS = (-1, 16, 32, 64, 128, 256, 512, 1024)


def validate_options(options: dict) -> None:
    """Refuse unknown option names and bad values (``export()`` calls this before loading the model)."""
    check_options("gptq", options, OPTIONS)
    checkpoint_format = options.get("checkpoint_format", "gptq_v2")
    allow_inexact = options.get("allow_inexact", False)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportError(f"gptq: checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, got {checkpoint_format!r}")
    if not isinstance(allow_inexact, bool):
        raise ExportError(f"gptq: allow_inexact must be True or False, got {allow_inexact!r}")


def _check_uniform(layers: list[QuantLayer]) -> tuple[int, int | None, bool]:
    """One (bits, group_size, sym) for the model: GPTQ's config holds one of each."""
    if not layers:
        raise ExportError("gptq: the model has no quantised layers")
    first = layers[0]
    for l in layers[1:]:
        for what, a, b in (("bits", first.bits, l.bits), ("group_size", first.group_size, l.group_size),
                           ("sym", first.symmetric, l.symmetric)):
            if a != b:
                raise ExportError(
                    f"gptq: layer {l.name} has {what}={b} but layer {first.name} has {what}={a}; a GPTQ checkpoint "
                    "holds one bits/group_size/sym for all layers (export a mixed model as compressed-tensors)")
    if first.bits not in BITS:
        raise ExportError(f"gptq: layer {first.name} has bits={first.bits}; GPTQ packs bits in {{2, 3, 4, 8}}")
    return first.bits, first.group_size, first.symmetric


def _check_shape(layer: QuantLayer) -> None:
    """Facts sheet 4.2: whole words along both packed dims (``in`` for qweight, ``out`` for qzeros)."""
    b, n_in, n_out = layer.bits, layer.in_features, layer.out_features
    mult = 32 if b == 3 else 32 // b
    for what, n in (("in_features", n_in), ("out_features", n_out)):
        if n % mult:
            raise ExportError(f"gptq: layer {layer.name} has {what}={n}; {b}-bit GPTQ packing needs a multiple of {mult}")


def _dense_linears(model: nn.Module) -> tuple[list[str], str | None]:
    """Names of ``nn.Linear`` modules left dense, and the output-embedding module's name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = None
    dense = []
    for name, m in model.named_modules():
        if head is not None and m is head:
            head_name = name
        if isinstance(m, nn.Linear):
            dense.append(name)
    return dense, head_name


def gptq_tensors(layer: QuantLayer, checkpoint_format: str = "gptq_v2") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer (names without the ``<m>.`` prefix, bias excluded).

    Returns:
        ``qweight`` int32 ``[ceil(in*b/32), out]``, ``qzeros`` int32 ``[G, ceil(out*b/32)]``,
        ``scales`` fp16 ``[G, out]``, ``g_idx`` int32 ``[in]``.
    """
    b, o = layer.bits, 1 << (layer.bits - 1)
    u = layer.w_int.to(torch.int32) + o  # [out, in] in [0, 2^b)
    qweight = pack_bitstream(u, b).t().contiguous()  # packed along in, then [words, out]
    if layer.zero_point is None:
        zc = torch.full(tuple(layer.scale.shape), o, dtype=torch.int32)  # [out, G]
    else:
        zc = layer.zero_point.to(torch.int32) + o
    if checkpoint_format == "gptq":
        zc = zc - 1  # v1 readers add 1 back; symmetric only, so zc >= o - 1 >= 0
    qzeros = pack_bitstream(zc.t().contiguous(), b)  # [G, words]
    g_idx = (torch.arange(layer.in_features, dtype=torch.int32) // layer.group).to(torch.int32)
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": layer.scale.t().to(torch.float16).contiguous(),
        "g_idx": g_idx,
    }


def quantization_config(bits: int, group_size: int | None, sym: bool, checkpoint_format: str, lm_head: bool) -> dict:
    """The ``quantization_config`` dict (config.json) / ``quantize_config.json``.

    ``checkpoint_format`` and ``format`` carry the same value: vLLM and GPTQModel's
    ``dequantize_model`` read ``checkpoint_format`` (missing = v1), GPTQModel's QuantizeConfig and
    transformers' GPTQConfig read ``format``.
    """
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": -1 if group_size is None else group_size,
        "desc_act": False,
        "sym": sym,
        "lm_head": lm_head,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"lrqat_kernels:{__version__}"]},
    }


def _scale_report(layers: list[QuantLayer], allow_inexact: bool) -> dict:
    """Check every layer's fp16 scales; the totals and the worst layer."""
    tot = {"dtype": "float16", "inexact": 0, "total": 0, "max_rel_error": 0.0, "worst_layer": None}
    for l in layers:
        r = scale_rounding(l.scale, torch.float16)
        if r["overflow"]:
            lo, hi = float(l.scale.min()), float(l.scale.max())
            raise ExportError(
                f"gptq: layer {l.name} has {r['overflow']} scales fp16 cannot hold (range [{lo:.3g}, {hi:.3g}]; "
                "fp16 holds (0, 65504], normal from 6.1e-05): GPTQ stores fp16 scales")
        if r["max_rel_error"] > SUBNORMAL_REL_TOL and not allow_inexact:
            raise ExportError(
                f"gptq: layer {l.name}: fp16 rounds a scale by {r['max_rel_error']:.2e} relative (subnormal; "
                f"min scale {float(l.scale.min()):.3g}); pass allow_inexact=True (--allow-inexact) to write it anyway")
        tot["inexact"] += r["inexact"]
        tot["total"] += r["total"]
        if r["max_rel_error"] > tot["max_rel_error"]:
            tot["max_rel_error"], tot["worst_layer"] = r["max_rel_error"], l.name
    return tot


def _dense_fp16(dense: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Dense tensors as fp16 (integer tensors kept). Every name is kept: which to leave out (a tied
    head) is :func:`~._common.plan_head`'s decision."""
    out = {}
    changed = total = 0
    max_rel = 0.0
    tiny = torch.finfo(torch.float16).tiny
    for name, t in dense.items():
        if t.is_floating_point():
            t32 = t.detach().to(torch.float32)
            h = t32.to(torch.float16)
            if not torch.isfinite(h).all() and torch.isfinite(t32).all():
                raise ExportError(f"gptq: tensor {name} holds values beyond fp16's range (max |x| = "
                                  f"{float(t32.abs().max()):.3g} > 65504); GPTQ checkpoints are fp16")
            back = h.to(torch.float32)
            changed += int((back != t32).sum())
            total += t32.numel()
            normal = t32.abs() >= tiny
            if normal.any():
                max_rel = max(max_rel, float(((back - t32).abs()[normal] / t32.abs()[normal]).max()))
            t = h
        out[name] = t.contiguous()
    return out, {"dtype": "float16", "changed": changed, "total": total, "max_rel_error_normal": max_rel}


def _vllm_warnings(bits: int, group_size: int | None, sym: bool, layers: list[QuantLayer]) -> list[str]:
    """Where vLLM leaves gptq_marlin (facts sheet 2.6; read from vLLM's source, not run)."""
    g = -1 if group_size is None else group_size
    warns = []
    if not (sym and bits in (4, 8) and g in _MARLIN_GROUPS):
        why = "asymmetric" if not sym else f"{bits}-bit" if bits not in (4, 8) else f"group_size={g}"
        warns.append(
            f"gptq: vLLM's gptq_marlin kernel takes symmetric 4/8-bit with group_size in {{-1, 32, 64, 128}}; this "
            f"model ({why}) gets vLLM's gptq (exllama gptq_gemm) kernel: fp16 activations only and slower"
            + (", and vLLM warns that its 4-bit gptq_gemm is buggy" if bits == 4 else "")
            + ". For vLLM prefer the compressed-tensors export")
    else:
        bad = [l.name for l in layers if l.out_features % 64 or l.in_features % 128]
        if bad:
            warns.append(f"gptq: {len(bad)} layers (e.g. {bad[0]}) miss gptq_marlin's shape rule (out % 64 == 0, "
                         "in % 128 == 0 per tensor-parallel shard): vLLM cannot run them with Marlin")
    if g not in _GPTQMODEL_GROUPS:
        warns.append(f"gptq: group_size={g} is outside the list GPTQModel's kernels accept {list(_GPTQMODEL_GROUPS)}")
    return warns


def write(model: nn.Module, layers: list[QuantLayer], dense: dict[str, torch.Tensor], out_dir: str, *,
          allow_inexact: bool = False, checkpoint_format: str = "gptq_v2", **options) -> dict:
    """Write a GPTQ checkpoint of a converted model into ``out_dir`` (see the module docstring).

    Args:
        model: the converted model (``get_output_embeddings`` and dense ``nn.Linear`` modules are read).
        layers: its quantised layers; all must share bits (2, 3, 4 or 8), group_size and symmetry.
        dense: high-precision tensors by HF state-dict name (:func:`~._common.dense_state`).
        out_dir: existing directory; ``config.json`` there, if any, gets ``quantization_config``.
        allow_inexact: write scales fp16 rounds by more than 1e-3 relative (its subnormal range).
        checkpoint_format: ``"gptq_v2"`` (default) or ``"gptq"`` (v1, symmetric layers only: an
            asymmetric zero code of 0 would be stored as -1).

    Returns:
        The report: ``quantization_config``, ``scale_rounding`` (fp16 scales: counts, largest
        relative error and its layer), ``dense_rounding`` (the fp16 cast of dense tensors),
        ``exact`` (``quantized``: every scale fp16-exact; ``dense``: no dense value changed), ``warnings``.
    """
    validate_options(dict(options, allow_inexact=allow_inexact, checkpoint_format=checkpoint_format))
    bits, group_size, sym = _check_uniform(layers)
    if checkpoint_format == "gptq" and not sym:
        raise ExportError(
            f"gptq: layer {layers[0].name} is asymmetric; checkpoint_format='gptq' (v1) stores zero - 1, which "
            "underflows for a zero code of 0 (readers add 1 without a mask): use checkpoint_format='gptq_v2'")
    for l in layers:
        _check_shape(l)
    linears, head_name = _dense_linears(model)
    stray = [n for n in linears if n != head_name]
    if stray:
        raise ExportError(
            f"gptq: linear {stray[0]} is not quantised ({len(stray)} such); GPTQ readers expect every linear of the "
            "decoder blocks quantised (only lm_head may stay dense): export it as compressed-tensors")
    quant_names = {l.name for l in layers}
    lm_head = head_name is not None and head_name in quant_names
    scale_rep = _scale_report(layers, allow_inexact)

    cfg_path = os.path.join(out_dir, "config.json")
    cfg = None
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    tie = cfg.get("tie_word_embeddings", False) if cfg is not None else \
        bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    head = plan_head(model, dense, layers, tie)
    tensors, dense_rep = _dense_fp16({k: t for k, t in dense.items() if not (head.omit and k == head.key)})
    for l in layers:
        for k, t in gptq_tensors(l, checkpoint_format).items():
            tensors[f"{l.name}.{k}"] = t
        if l.bias is not None and f"{l.name}.bias" not in tensors:
            tensors[f"{l.name}.bias"] = l.bias.detach().to(torch.float16).contiguous()

    save_safetensors(tensors, os.path.join(out_dir, WEIGHTS_FILE))  # a tied head kept: written as a copy
    qcfg = quantization_config(bits, group_size, sym, checkpoint_format, lm_head)
    notes = []
    if cfg is not None:
        if head.untie:
            cfg["tie_word_embeddings"] = False
            notes.append(head.note())
        cfg["quantization_config"] = qcfg
        cfg["dtype"] = cfg["torch_dtype"] = "float16"  # transformers >= 4.56 reads dtype, older ones torch_dtype
        atomic_write_json(cfg_path, cfg, indent=2, sort_keys=True)
    atomic_write_json(os.path.join(out_dir, QUANTIZE_CONFIG_FILE), qcfg, indent=2)

    warns = []
    if scale_rep["inexact"]:
        warns.append(
            f"gptq: {scale_rep['inexact']} of {scale_rep['total']} scales are not fp16-exact (largest relative change "
            f"{scale_rep['max_rel_error']:.2e}, layer {scale_rep['worst_layer']}): the checkpoint holds "
            "fp16(s) * (W_int - z)")
    warns += _vllm_warnings(bits, group_size, sym, layers)
    if lm_head:
        warns.append(
            f"gptq: {head_name} is quantised (quantization_config lm_head: true): GPTQModel.load reads it, but "
            "transformers' GPTQ loader (checked: transformers 5.25 + optimum 2.3) ignores it and leaves the head "
            "randomly initialised; exclude lm_head (the default) for transformers")
    return {
        "weights_file": WEIGHTS_FILE,
        "checkpoint_format": checkpoint_format,
        "quantization_config": qcfg,
        "scale_rounding": scale_rep,
        "dense_rounding": dense_rep,
        "exact": {"quantized": scale_rep["inexact"] == 0, "dense": dense_rep["changed"] == 0},
        "tied_head_omitted": head.key if head.omit else None,
        "notes": notes,
        "warnings": warns,
    }
