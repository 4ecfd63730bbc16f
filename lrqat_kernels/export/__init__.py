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
from .._version import __version__
from ._common import ExportError, QuantLayer, collect_layers, dense_state

__all__ = ["export", "FORMATS", "ExportError", "QuantLayer", "REPORT_FILE"]

#: The export formats and the module that writes each.
FORMATS = ("compressed-tensors", "gguf", "gptq")
REPORT_FILE = "lrqat_export.json"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def _format_module(fmt: str):
    """The writer module of a format: ``write(model, layers, dense, out_dir, **options)``,
    ``OPTIONS`` and ``validate_options(options)``."""
    if fmt == "compressed-tensors":
        from . import compressed_tensors as mod
    elif fmt == "gguf":
        from . import gguf as mod
    elif fmt == "gptq":
        from . import gptq as mod
    else:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return mod


def _writer(fmt: str):
    return _format_module(fmt).write


def _refuse_source_inside(out_dir: str, sources: dict[str, str]) -> None:
    """Refuse an ``out_dir`` that is, or contains, a directory the export reads (the checkpoint,
    the tokenizer): replacing it (``overwrite``) would delete the source.
    ``tests/test_export.py::test_refuses_out_dir_holding_the_source``."""
    out = os.path.realpath(out_dir)
    for what, src in sources.items():
        real = os.path.realpath(src)
        if os.path.commonpath([out, real]) == out:
            where = "is" if real == out else "contains"
            raise ExportError(f"output directory {out_dir} {where} the {what} {src}: the export would replace it; "
                              "choose another --out")


def _missing_dirs(path: str) -> list[str]:
    """The ancestors of ``path`` that do not exist yet, outermost first."""
    missing = []
    parent = os.path.dirname(path)
    while parent and not os.path.lexists(parent):
        missing.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    return missing[::-1]


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


def _remove_empty(dirs: list[str]) -> None:
    """Remove ``dirs`` (outermost first) innermost first, each only while empty (another process
    may have written into one since)."""
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except OSError:
            return


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
            atomically at the end; a symlink's target is replaced, the link kept). It must not be,
            or contain, the checkpoint or tokenizer directory read. Parent directories are
            created, and removed again if the export fails.
        format: one of :data:`FORMATS`.
        tokenizer: a tokenizer object (``save_pretrained``) or a directory holding tokenizer files;
            default: the checkpoint directory's.
        overwrite: replace an existing ``out_dir``.
        drop_activation_quant: export a weight-activation model's weights only (else refused).
        **options: format options, e.g. ``scale_dtype="bfloat16"`` (compressed-tensors),
            ``allow_inexact=True`` (gguf), ``checkpoint_format="gptq_v2"`` (gptq); unknown names
            and bad values are refused before the model is loaded.

    Returns:
        The report also written to ``out_dir/lrqat_export.json``: format, files, layers, scale
        rounding, warnings (also issued as ``UserWarning``).

    Raises:
        ExportError (a ValueError): what the model or a format cannot do, naming the layer.
    """
    # Everything that can be refused without the model is refused before loading / converting it.
    mod = _format_module(format)
    mod.validate_options(options)
    out_dir = os.path.abspath(os.fspath(out_dir))
    sources = {}
    if isinstance(model_or_dir, (str, os.PathLike)):
        sources["source checkpoint"] = os.fspath(model_or_dir)
    if isinstance(tokenizer, (str, os.PathLike)):
        sources["tokenizer directory"] = os.fspath(tokenizer)
    _refuse_source_inside(out_dir, sources)
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
    # A failed export removes what it created: the temporary directory and the parents it made.
    created = _missing_dirs(os.path.realpath(out_dir))
    try:
        tmp = temp_dir_for(out_dir)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        tok_src = _save_side_files(model, tokenizer, src_dir, tmp)
        report = mod.write(model, layers, dense, tmp, **options)
        report.setdefault("warnings", [])
        report["warnings"] = notes + list(report["warnings"])
        report.update(format=format, source=src_dir or type(model).__name__, tokenizer=tok_src,
                      n_quantized_layers=len(layers))
        report["files"] = sorted(set(os.listdir(tmp)) | {REPORT_FILE})
        report["library_version"] = __version__
        atomic_write_json(os.path.join(tmp, REPORT_FILE), json_safe(report), sort_keys=True)
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    report["path"] = out_dir
    for w in report["warnings"]:
        warnings.warn(w, stacklevel=2)
    return report
