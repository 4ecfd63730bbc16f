"""Export a converted LR-QAT model to the formats serving stacks load.

    report = lrqat_kernels.export(model_or_dir, "out/ct", format="compressed-tensors")
    lrqat export --model OUT/quantized --format compressed-tensors|gguf|gptq --out DIR

Formats (one module each; every one starts from :class:`~._common.QuantLayer`):

- ``compressed-tensors``: ``pack-quantized`` safetensors + ``quantization_config`` (vLLM,
  llm-compressor, transformers). Exact with fp32 scales.
- ``gguf``: a llama.cpp / ollama file (``Q4_0`` / ``Q8_0`` where exact).
- ``gptq``: ``gptq_v2`` checkpoint (fp16 scales).

Every export writes into a temporary sibling directory and renames it into place at the end, so
a failed or killed export leaves no half-written ``out_dir``. The output directory also holds the
HF ``config.json`` / ``generation_config.json``, the tokenizer files and ``lrqat_export.json``
(what was exported, how exact, the warnings).
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings

import torch.nn as nn

from .._io import atomic_replace_dir, atomic_write_json, json_safe, temp_dir_for
from ._common import ExportError, QuantLayer, collect_layers, dense_state

__all__ = ["export", "FORMATS", "ExportError", "QuantLayer", "REPORT_FILE"]

#: The export formats and the module that writes each.
FORMATS = ("compressed-tensors", "gguf", "gptq")
REPORT_FILE = "lrqat_export.json"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def _writer(fmt: str):
    if fmt == "compressed-tensors":
        from . import compressed_tensors as mod
    elif fmt == "gguf":
        from . import gguf as mod
    elif fmt == "gptq":
        from . import gptq as mod
    else:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return mod.write


def _resolve_model(model_or_dir) -> tuple[nn.Module, str | None]:
    """A converted model, from a converted or LR-QAT checkpoint directory or an in-memory model.

    An LR-QAT (stage ``"lrqat"``) model is converted first, exactly as :func:`lrqat_kernels.convert`
    (an in-memory one on a copy: the caller's model is left as it is).
    """
    from ..api import _stage, convert, load_pretrained

    src_dir = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        src_dir = os.fspath(model_or_dir)
        if not os.path.isdir(src_dir):
            raise ExportError(f"model {src_dir} is not a directory")
        model = load_pretrained(src_dir)
    elif isinstance(model_or_dir, nn.Module):
        model = model_or_dir
    else:
        raise TypeError(f"model_or_dir must be an nn.Module or a checkpoint directory, got {type(model_or_dir).__name__}")
    stage = _stage(model)
    if stage == "lrqat":
        if src_dir is None:
            model = copy.deepcopy(model)
        convert(model)
    elif stage != "quantized":
        raise ExportError(
            "export needs a converted model (lrqat_kernels.convert / `lrqat convert`) or an LR-QAT checkpoint; "
            f"got a {'floating-point' if stage is None else stage} {type(model).__name__}"
        )
    return model, src_dir


def _check_activation_quant(model: nn.Module, drop: bool) -> str | None:
    cfg = getattr(model, "lrqat_config", None)
    act, kv = getattr(cfg, "act_bits", None), getattr(cfg, "kv_bits", None)
    if act is None and kv is None:
        return None
    what = f"the model quantises activations (act_bits={act}, kv_bits={kv})"
    if not drop:
        raise ExportError(f"{what}; the export formats carry weight quantisation only: pass "
                          "drop_activation_quant=True (--drop-activation-quant) to serve it with 16-bit activations")
    return what + "; exported weights only: the served model runs 16-bit activations"


def _save_side_files(model: nn.Module, tokenizer, src_dir: str | None, tmp: str) -> str | None:
    """config.json, generation_config.json and the tokenizer into ``tmp``; returns what the tokenizer came from."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "save_pretrained"):
        hf_config.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(tmp)
    if tokenizer is None and src_dir is not None:
        tokenizer = src_dir
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        tdir = os.fspath(tokenizer)
        found = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(tdir, f))]
        if not found:
            if src_dir is not None and tdir == src_dir:
                return None  # a checkpoint without a tokenizer: nothing to carry
            raise ExportError(f"tokenizer {tdir} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:4])}, ...)")
        for f in found:
            shutil.copy2(os.path.join(tdir, f), os.path.join(tmp, f))
        return tdir
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a directory or have save_pretrained(), got {type(tokenizer).__name__}")
    tokenizer.save_pretrained(tmp)
    return type(tokenizer).__name__


def export(
    model_or_dir,
    out_dir: str,
    format: str = "compressed-tensors",
    *,
    tokenizer=None,
    overwrite: bool = False,
    drop_activation_quant: bool = False,
    **options,
) -> dict:
    """Export a converted (or LR-QAT, converted first) model for a serving stack.

    Args:
        model_or_dir: a converted model, an LR-QAT model, or a checkpoint directory written by
            :func:`lrqat_kernels.save_pretrained` (either stage).
        out_dir: output directory; must not exist unless ``overwrite`` (then it is replaced
            atomically at the end).
        format: one of :data:`FORMATS`.
        tokenizer: a tokenizer object (``save_pretrained``) or a directory holding tokenizer files;
            default: the checkpoint directory's.
        overwrite: replace an existing ``out_dir``.
        drop_activation_quant: export a weight-activation model's weights only (else refused).
        **options: format options, e.g. ``scale_dtype="bfloat16"`` (compressed-tensors),
            ``allow_inexact=True`` (gguf), ``checkpoint_format="gptq_v2"`` (gptq); each writer
            refuses options it does not know.

    Returns:
        The report also written to ``out_dir/lrqat_export.json``: format, files, layers, scale
        rounding, warnings (also issued as ``UserWarning``).

    Raises:
        ExportError (a ValueError): what the model or a format cannot do, naming the layer.
    """
    write = _writer(format)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir):
        if not overwrite:
            raise ExportError(f"output directory {out_dir} exists; pass overwrite=True (--overwrite) to replace it")
        if not os.path.isdir(out_dir):
            raise ExportError(f"output path {out_dir} exists and is not a directory")
    model, src_dir = _resolve_model(model_or_dir)
    notes = [n for n in (_check_activation_quant(model, drop_activation_quant),) if n]
    layers = collect_layers(model)
    if not layers:
        raise ExportError("the model has no quantised layers to export")
    dense = dense_state(model, layers)
    tmp = temp_dir_for(out_dir)
    try:
        tok_src = _save_side_files(model, tokenizer, src_dir, tmp)
        report = write(model, layers, dense, tmp, **options)
        report.setdefault("warnings", [])
        report["warnings"] = notes + list(report["warnings"])
        report.update(format=format, source=src_dir or type(model).__name__, tokenizer=tok_src,
                      n_quantized_layers=len(layers))
        report["files"] = sorted(set(os.listdir(tmp)) | {REPORT_FILE})
        import lrqat_kernels

        report["library_version"] = lrqat_kernels.__version__
        atomic_write_json(os.path.join(tmp, REPORT_FILE), json_safe(report), sort_keys=True)
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["path"] = out_dir
    for w in report["warnings"]:
        warnings.warn(w, stacklevel=2)
    return report
