"""Checkpoints: ``save_pretrained`` / ``load_pretrained`` of a prepared or converted model, and the
trainer state ``lrqat train`` resumes from.

Checkpoint directory layout (``save_pretrained``)::

    config.json          the HF model config (absent for plain nn.Module models)
    generation_config.json  the HF generation defaults (EOS ids, sampling), when the model has them
    lrqat_config.json    {"format_version", "stage": "lrqat"|"quantized", "lrqat_config": {...},
                          "modules": {name: layer structure}, "tied": {alias: source}, "dtype",
                          "attn_implementation" (HF models: config.json does not keep it),
                          "sha256": {file: hex digest} of the weights and config files, ...}
    lrqat_model.safetensors  every tensor of ``model.state_dict()`` (tied duplicates stored once).
                         Not ``model.safetensors``: HF's ``from_pretrained`` would load that file
                         into the floating-point architecture, initialise every swapped linear at
                         random and only log it; without it, HF refuses the directory.
                         Checkpoints with ``model.safetensors`` (the name before) still load.

Plain ``nn.Module`` models (not HF) save the same way without ``config.json``; load them by
passing a freshly built FP skeleton: ``load_pretrained(dir, model=build_model())``. The skeleton's
``nn.Linear`` layers named in the checkpoint are swapped structurally (no range estimation)
and every tensor is then loaded strictly.

Integrity: ``lrqat_config.json`` (written last) records in ``"sha256"`` the digests of
``lrqat_model.safetensors``, ``config.json``, ``generation_config.json`` and of its own content
(the JSON with that one entry left out, normalised); the weights file's header records the
digest of the JSON's content without the record, which tells a lost record from a checkpoint
saved without one. ``load_pretrained`` checks them all (files hashed in 1 MB chunks), so a
truncated or bit-flipped weights file (a flip in the tensor data, which safetensors does not
notice) or a damaged but still parseable JSON is a ValueError naming the file, never a wrong
model. Checkpoints saved without the record load unchecked
(tests/test_reliability.py::test_checksum_checkpoint_without_the_record_still_loads).

The trainer state (``<out>/checkpoint/trainer_state.pt``, :func:`save_trainer_state`) is one
``torch.save`` file written atomically; it records the sha256 of its own content
(:func:`lrqat_kernels._io.sha256_content`) under ``"sha256"``, checked by :func:`load_trainer_state`:
a truncated or bit-flipped file is a ValueError naming it, never a wrong resume
(tests/test_train.py::test_damaged_trainer_state_is_refused_naming_the_file).

Size: about 530 lines: one file format read and written in one place (the layer specs of the four
layer types, the digests, the atomic directory swap and the trainer state).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn as nn

from ._io import atomic_replace_dir, atomic_write, atomic_write_json, sha256_content, sha256_file, temp_dir_for, umask
from ._version import __version__
from .api import _freeze_and_mark, _set_submodule, _stage, cast_floating
from .config import LRQATConfig, resolve_dtype
from .l4q import L4QLinear
from .modules import LRQATLinear, QuantizedLinear, factor_dtype
from .peqat import PEQATLinear
from .wa_quant import inner_attn_impl, install_activation_quantizers, restore_attn_implementation

__all__ = [
    "save_pretrained",
    "load_pretrained",
    "read_meta",
    "verify_checkpoint",
    "save_trainer_state",
    "load_trainer_state",
]

FORMAT_VERSION = 1
META_FILE = "lrqat_config.json"
WEIGHTS_FILE = "lrqat_model.safetensors"
# read, never written: tests/test_api.py::test_checkpoint_with_the_old_weights_name_loads
LEGACY_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
STAGES = ("lrqat", "quantized")
# lrqat_config.json's record of the files' sha256, and the weights header's key for the JSON's own digest
SHA256_KEY = "sha256"
META_DIGEST_KEY = "lrqat_config_sha256"
_HASHED_FILES = (WEIGHTS_FILE, HF_CONFIG_FILE, GENERATION_CONFIG_FILE)
STATE_FILE = "trainer_state.pt"


def _module_spec(m: nn.Module) -> dict:
    if isinstance(m, LRQATLinear):
        return {
            "type": "LRQATLinear", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "rank": m.rank, "alpha": m.alpha, "phi_format": m.phi_format, "group_size": m.group_size,
            "symmetric": m.symmetric, "bias": m.bias is not None, "learn_scale": bool(m.scale.requires_grad),
            "dtype": str(m.lora_A.dtype).replace("torch.", ""), **_act_spec(m),
        }
    if isinstance(m, L4QLinear):
        return {
            "type": "L4QLinear", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "rank": m.rank, "alpha": m.alpha, "group_size": m.group_size, "grad_scale": m.grad_scale,
            "bias": m.bias is not None, "learn_scale": bool(m.scale.requires_grad), "dtype": _dtype_str(m.w0),
        }
    if isinstance(m, PEQATLinear):
        return {
            "type": "PEQATLinear", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "act_bits": m.act_bits, "rank": m.rank, "alpha": m.alpha, "clip_grad_scale": m.clip_grad_scale,
            "bias": m.bias is not None, "learn_scale": bool(m.clip.requires_grad), "dtype": _dtype_str(m.w0),
        }
    spec = {
        "type": "QuantizedLinear", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
        "group_size": m.group_size, "symmetric": m.symmetric, "bias": m.bias is not None,
        "dtype": None if m.bias is None else str(m.bias.dtype).replace("torch.", ""), **_act_spec(m),
    }
    if m.offset is not None:
        spec["offset"] = True
    if m.input_step is not None:
        spec["input_qrange"] = list(m.input_qrange)
        spec["input_smooth"] = m.input_smooth is not None
    return spec


def _dtype_str(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _act_spec(m: nn.Module) -> dict:
    return {"input_bits": m.input_bits, "output_bits": m.output_bits, "act_symmetric": m.act_symmetric}


def _build_module(spec: dict, name: str) -> nn.Module:
    dtype = None if spec.get("dtype") is None else getattr(torch, spec["dtype"])
    act = {k: spec.get(k, d) for k, d in (("input_bits", None), ("output_bits", None), ("act_symmetric", False))}
    if spec["type"] == "LRQATLinear":
        return LRQATLinear(
            spec["in_features"], spec["out_features"], bits=spec["bits"], rank=spec["rank"], alpha=spec["alpha"],
            phi_format=spec["phi_format"], group_size=spec["group_size"], symmetric=spec["symmetric"],
            bias=spec["bias"], learn_scale=spec.get("learn_scale", True), dtype=dtype, **act,
        )
    if spec["type"] == "QuantizedLinear":
        mod = QuantizedLinear(
            spec["in_features"], spec["out_features"], bits=spec["bits"], group_size=spec["group_size"],
            symmetric=spec["symmetric"], bias=spec["bias"], dtype=dtype, offset=spec.get("offset", False), **act,
        )
        if "input_qrange" in spec:  # static input quantiser: step (and smoothing) loaded from the weights
            lo, hi = spec["input_qrange"]
            mod.set_static_input_quant(torch.ones(1), (int(lo), int(hi)),
                                       torch.ones(mod.in_features) if spec.get("input_smooth") else None)
        return mod
    if spec["type"] == "L4QLinear":
        mod = L4QLinear(
            spec["in_features"], spec["out_features"], bits=spec["bits"], rank=spec["rank"], alpha=spec["alpha"],
            group_size=spec["group_size"], grad_scale=spec["grad_scale"], bias=spec["bias"], dtype=dtype,
        )
        for t in (mod.scale, mod.offset):
            t.requires_grad_(spec["learn_scale"])
        return mod
    if spec["type"] == "PEQATLinear":
        mod = PEQATLinear(
            spec["in_features"], spec["out_features"], bits=spec["bits"], act_bits=spec["act_bits"], rank=spec["rank"],
            alpha=spec["alpha"], clip_grad_scale=spec["clip_grad_scale"], bias=spec["bias"], dtype=dtype,
        )
        for t in (mod.log_smooth, mod.clip):
            t.requires_grad_(spec["learn_scale"])
        return mod
    raise ValueError(f"checkpoint module {name!r} has unknown type {spec.get('type')!r}")


def _dedup_tied(state: dict) -> tuple[dict, dict]:
    """Drop tensors sharing storage with an earlier key (tied weights); return (state, {alias: source})."""
    seen, out, tied = {}, {}, {}
    for k, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.detach().contiguous()
    return out, tied


def _model_dtype(model: nn.Module) -> str | None:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return None


def save_pretrained(model: nn.Module, save_directory: str, *, tokenizer=None) -> str:
    """Save a prepared (``"lrqat"``) or converted (``"quantized"``) model, atomically.

    Writes ``config.json`` (HF config, when ``model.config`` has ``to_dict``), ``lrqat_config.json``
    (LR-QAT config, stage, swapped-module structure, tied-weight aliases) and
    ``lrqat_model.safetensors`` into a temporary sibling directory, then renames it to
    ``save_directory``: an interrupted save never leaves a half-written checkpoint.

    Args:
        model: a model returned by :func:`prepare` or :func:`convert`.
        save_directory: target directory (replaced if it exists).
        tokenizer: optional object with ``save_pretrained(dir)``, saved alongside.

    Returns:
        The absolute path of the checkpoint.
    """
    from safetensors.torch import save_file

    stage = _stage(model)
    if stage not in STAGES:
        raise ValueError("save_pretrained() saves LR-QAT models; call prepare() (or convert()) first, "
                         "or use the model's own save method for a floating-point model")
    modules = {n: _module_spec(m) for n, m in model.named_modules()
               if isinstance(m, (LRQATLinear, L4QLinear, PEQATLinear, QuantizedLinear))}
    state, tied = _dedup_tied(model.state_dict())
    config = getattr(model, "lrqat_config", None)
    hf_config = getattr(model, "config", None)
    is_hf = hf_config is not None and hasattr(hf_config, "to_dict") and hasattr(hf_config, "save_pretrained")
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "lrqat_kernels",
        "library_version": __version__,
        "stage": stage,
        "lrqat_config": None if config is None else config.to_dict(),
        "model_class": type(model).__name__,
        "hf_model": bool(is_hf),
        "dtype": _model_dtype(model),
        "modules": modules,
        "tied": tied,
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        # not in config.json; the wrapped implementation for weight-activation models
        "attn_implementation": inner_attn_impl(getattr(hf_config, "_attn_implementation", None)) if is_hf else None,
    }
    save_directory = os.path.abspath(save_directory)
    tmp = temp_dir_for(save_directory)
    try:
        if is_hf:
            hf_config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None and hasattr(gen, "save_pretrained"):  # EOS ids, sampling defaults
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, WEIGHTS_FILE),
                  metadata={"format": "pt", "stage": stage, META_DIGEST_KEY: _json_digest(_without_record(meta))})
        with open(os.path.join(tmp, WEIGHTS_FILE), "rb") as f:
            os.fsync(f.fileno())
        os.chmod(os.path.join(tmp, WEIGHTS_FILE), 0o666 & ~umask())  # safetensors writes it owner-only
        meta[SHA256_KEY] = {f: sha256_file(os.path.join(tmp, f)) for f in _HASHED_FILES if os.path.isfile(os.path.join(tmp, f))}
        meta[SHA256_KEY][META_FILE] = _self_digest(meta)
        atomic_write_json(os.path.join(tmp, META_FILE), meta, sort_keys=True)  # last: marks a complete dir
        atomic_replace_dir(tmp, save_directory, marker=META_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_directory


def read_meta(directory: str) -> dict:
    """Parse and check ``lrqat_config.json`` of a checkpoint directory (ValueError when broken)."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory")
    if not os.path.isfile(path):
        raise ValueError(f"{directory} is not an LR-QAT checkpoint: {META_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt checkpoint: {path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint: {path} must hold a JSON object")
    _check_meta_digest(directory, meta)  # before its fields are trusted
    for key in ("format_version", "stage", "modules"):
        if key not in meta:
            raise ValueError(f"corrupt checkpoint: {path} lacks {key!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format_version {meta['format_version']!r} (this library reads {FORMAT_VERSION})")
    if meta["stage"] not in STAGES:
        raise ValueError(f"corrupt checkpoint: stage must be one of {STAGES}, got {meta['stage']!r}")
    if not isinstance(meta["modules"], dict) or not meta["modules"]:
        raise ValueError(f"corrupt checkpoint: {path} lists no LR-QAT modules")
    return meta


def _json_digest(obj) -> str:
    """sha256 of ``obj`` as JSON normalises it (tuples as lists, keys as strings; sorted, compact):
    the same digest before saving and after reading back."""
    import hashlib

    body = json.loads(json.dumps(obj, allow_nan=False))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _without_record(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != SHA256_KEY}


def _self_digest(meta: dict) -> str:
    """Digest of ``lrqat_config.json``'s content with its own entry of the sha256 record left out."""
    record = meta.get(SHA256_KEY)
    return _json_digest({**meta, SHA256_KEY: {k: v for k, v in record.items() if k != META_FILE}})


def _check_meta_digest(directory: str, meta: dict) -> None:
    """``lrqat_config.json`` as saved: its self digest, or (the record lost) no digest in the weights header."""
    path = os.path.join(directory, META_FILE)
    record = meta.get(SHA256_KEY)
    if record is not None:
        if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
            raise ValueError(f"corrupt checkpoint: {path} has a damaged {SHA256_KEY!r} record")
    if isinstance(record, dict) and META_FILE in record:
        if _self_digest(meta) != record[META_FILE]:
            raise ValueError(f"corrupt checkpoint: {path} was damaged or edited after saving (its content differs "
                             f"from its recorded sha256)")
        return
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        return  # a model.safetensors checkpoint, or no weights (reported when loading)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint: cannot read {weights} ({type(e).__name__}: {e}); the file is truncated or damaged") from e
    if header.get(META_DIGEST_KEY) is not None:  # saved with a record: it was lost
        raise ValueError(f"corrupt checkpoint: {path} was damaged or edited after saving (its {SHA256_KEY!r} record "
                         f"is missing or incomplete)")


def verify_checkpoint(directory: str, meta: dict | None = None) -> None:
    """Check a checkpoint's files against the sha256 record of its ``lrqat_config.json`` (see the
    module docstring): ValueError naming the damaged file. Checkpoints saved without the record
    pass unchecked. ``meta``: the checkpoint's :func:`read_meta` (read when not given)."""
    if meta is None:
        meta = read_meta(directory)  # checks the JSON itself
    record = meta.get(SHA256_KEY) or {}
    for name in sorted((n for n in record if n != META_FILE), key=lambda n: n != WEIGHTS_FILE):
        path = os.path.join(directory, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            what = "weights file" if name == WEIGHTS_FILE else "file"
            raise ValueError(f"corrupt checkpoint: the {what} {path} recorded in {META_FILE} is missing")
        if sha256_file(path) != record[name]:
            raise ValueError(f"corrupt checkpoint: {path} is truncated or damaged (its sha256 differs from the one "
                             f"recorded in {META_FILE}); save or copy the checkpoint again")


def _read_tensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint is missing its weights file {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint: cannot read {path} ({type(e).__name__}: {e}); the file is truncated or damaged") from e


def _model_from_config(from_config, hf_config, dtype_name):
    """``from_config(hf_config)`` in the saved dtype, skipping the random init every tensor is loaded over."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    dtype = resolve_dtype(dtype_name) if dtype_name in ("float32", "bfloat16", "float16") else None
    with no_init_weights():
        model = None
        if dtype is not None:
            try:
                model = from_config(hf_config, dtype=dtype)
            except TypeError:
                model = None
        if model is None:
            model = from_config(hf_config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied embeddings / head as the config says (skipped init may not tie)
    return model


def _hf_from_config(model_class: str | None):
    """How to build the saved HF class from its config: the class transformers exports under
    ``model_class`` (``LlamaForSequenceClassification``, ``LlamaModel``, ...), else
    ``AutoModelForCausalLM`` (checkpoints that do not record it)."""
    import transformers

    cls = getattr(transformers, model_class, None) if isinstance(model_class, str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and hasattr(cls, "_from_config"):
        return cls._from_config
    return transformers.AutoModelForCausalLM.from_config


def load_pretrained(directory: str, model: nn.Module | None = None, *, device=None) -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained` (either stage).

    HF checkpoints rebuild the saved class (``LlamaForCausalLM``, ``LlamaModel``, ...; else
    ``AutoModelForCausalLM``) from ``config.json``; plain ``nn.Module`` checkpoints need ``model=``: a freshly built
    floating-point skeleton of the same architecture. The LR-QAT layers are swapped in
    structurally (no range estimation) and every tensor is loaded strictly: missing or extra
    keys, shape or dtype-kind mismatches raise ValueError naming them.

    Args:
        directory: checkpoint directory.
        model: optional FP skeleton (required for non-HF checkpoints).
        device: optional device to move the loaded model to.

    Returns:
        The model, in the saved stage, dtype and trainable/frozen state, in eval mode (as HF's
        ``from_pretrained``: dropout off; ``lrqat train`` / :func:`train.fit` call ``train()``).
    """
    meta = read_meta(directory)
    verify_checkpoint(directory, meta)  # a damaged file is an error here, never a wrong model
    stage = meta["stage"]
    config = None if meta.get("lrqat_config") is None else LRQATConfig.from_dict(meta["lrqat_config"])
    if model is None:
        if not os.path.isfile(os.path.join(directory, HF_CONFIG_FILE)):
            raise ValueError(
                f"{directory} holds a non-HF model ({meta.get('model_class')}); pass model= a freshly built "
                "floating-point skeleton of the same architecture: load_pretrained(dir, model=skeleton)"
            )
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as e:  # noqa: BLE001  (transformers raises several types for a bad config)
            raise ValueError(f"corrupt checkpoint: cannot read {os.path.join(directory, HF_CONFIG_FILE)} ({e})") from e
        model = _model_from_config(_hf_from_config(meta.get("model_class")), hf_config, meta.get("dtype"))
        restore_attn_implementation(model, meta.get("attn_implementation"))
        if os.path.isfile(os.path.join(directory, GENERATION_CONFIG_FILE)):
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    elif _stage(model) is not None:
        raise ValueError("model= must be a floating-point skeleton, not an already prepared/converted model")

    dtype = resolve_dtype(meta.get("dtype")) if meta.get("dtype") in ("float32", "bfloat16", "float16") else None
    if dtype is not None:
        cast_floating(model, dtype)
    for name, spec in meta["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint/model mismatch: the model has no module {name!r} (checkpoint of {meta.get('model_class')})") from None
        if not isinstance(old, nn.Linear):
            raise ValueError(f"checkpoint/model mismatch: module {name!r} is {type(old).__name__}, expected nn.Linear")
        if tuple(old.weight.shape) != (spec["out_features"], spec["in_features"]):
            raise ValueError(
                f"checkpoint/model mismatch: layer {name!r} is [{old.weight.shape[0]}, {old.weight.shape[1]}] in the model, "
                f"[{spec['out_features']}, {spec['in_features']}] in the checkpoint"
            )
        new = _build_module(spec, name).to(old.weight.device)
        _set_submodule(model, name, new)

    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights) and os.path.isfile(os.path.join(directory, LEGACY_WEIGHTS_FILE)):
        weights = os.path.join(directory, LEGACY_WEIGHTS_FILE)
    tensors = _read_tensors(weights)
    for alias, src in (meta.get("tied") or {}).items():
        if src in tensors and alias not in tensors:
            tensors[alias] = tensors[src]
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            "checkpoint/model mismatch: "
            + (f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected keys {extra[:10]}{' ...' if len(extra) > 10 else ''}" if extra else "")
        )
    for k, t in expected.items():
        src = tensors[k]
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"checkpoint/model mismatch: {k} has shape {tuple(src.shape)} in the checkpoint, {tuple(t.shape)} in the model")
        if src.is_floating_point() != t.is_floating_point():
            raise ValueError(f"checkpoint/model mismatch: {k} is {src.dtype} in the checkpoint, {t.dtype} in the model")
        if src.dtype != t.dtype:
            if not t.is_floating_point():
                raise ValueError(f"checkpoint/model mismatch: {k} is {src.dtype} in the checkpoint, {t.dtype} in the model")
            # the saved dtype exactly (shared/tied tensors follow); LoRA factors stored in fp16 load as
            # fp32 master weights, as prepare() makes them (modules.factor_dtype;
            # tests/test_api.py::test_old_checkpoint_with_fp16_factors_loads_fp32_master_factors)
            dtype = factor_dtype(src.dtype) if k.rsplit(".", 1)[-1] in LRQATLinear._factors else src.dtype
            t.data = t.data.to(dtype)
    model.load_state_dict(tensors, strict=True)
    install_activation_quantizers(model, config)
    _freeze_and_mark(model, config, stage)
    if stage == "lrqat" and isinstance(meta.get("trainable"), list):
        trainable = set(meta["trainable"])
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
    if device is not None:
        model.to(device)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# trainer state
# ----------------------------------------------------------------------------------------------


def save_trainer_state(state: dict, path: str) -> str:
    """Write a trainer state (``torch.save`` of ``state``, a dict) to ``path`` atomically, recording
    the sha256 of its content under ``"sha256"`` (an existing record in ``state`` is replaced).

    Args:
        state: tensors, numbers, strings, None and dicts / lists / tuples of them (what
            ``torch.load(weights_only=True)`` reads back).
        path: the file (``<ckpt_dir>/trainer_state.pt``); its directory is created.

    Returns:
        The absolute path.
    """
    body = {k: v for k, v in state.items() if k != SHA256_KEY}
    body[SHA256_KEY] = sha256_content(body)  # of the entries before it: what load_trainer_state checks
    return atomic_write(path, lambda f: torch.save(body, f), binary=True)


def load_trainer_state(path: str) -> dict:
    """Read a file written by :func:`save_trainer_state` and check its content against the recorded
    sha256: ValueError naming ``path`` when it is unreadable (truncated) or its content differs
    (bit-flipped). A state saved without the record loads unchecked. Returns the state without
    the record."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"cannot resume: {path} does not exist") from None
    except Exception as e:  # noqa: BLE001  (a damaged zip / pickle raises many types)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"corrupt checkpoint: cannot read {path} ({type(e).__name__}: {first}); the file is "
                         "truncated or damaged") from None
    if not isinstance(state, dict):
        raise ValueError(f"corrupt checkpoint: {path} does not hold a trainer state (a dict)")
    record = state.pop(SHA256_KEY, None)
    if record is not None and record != sha256_content(state):
        raise ValueError(f"corrupt checkpoint: {path} is damaged (its content differs from the sha256 recorded "
                         "in it); resume from an intact copy or train again")
    return state
