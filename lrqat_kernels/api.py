"""Model-level LR-QAT API: ``prepare`` -> train -> ``convert``, plus save / load of both stages.

Two-step flow (as torchao's QAT ``prepare`` / ``convert``)::

    model = AutoModelForCausalLM.from_pretrained(...)
    prepare(model, LRQATConfig(bits=4, compute_dtype="bfloat16"))   # nn.Linear -> LRQATLinear, rest frozen
    ...train lora_A / lora_B / scale...
    save_pretrained(model, "ckpt-lrqat")                              # stage "lrqat"
    convert(model)                                                    # LRQATLinear -> QuantizedLinear (INT-b)
    save_pretrained(model, "ckpt-int4")                               # stage "quantized"
    model = load_pretrained("ckpt-int4")                              # no training code objects needed

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
                         random and only log it; without it, HF refuses the directory. Older
                         checkpoints with ``model.safetensors`` still load here.

Plain ``nn.Module`` models (not HF) save the same way without ``config.json``; load them by
passing a freshly built FP skeleton: ``load_pretrained(dir, model=build_model())``. The skeleton's
``nn.Linear`` layers named in the checkpoint are swapped structurally (no range estimation)
and every tensor is then loaded strictly.

Integrity: ``lrqat_config.json`` (written last) records in ``"sha256"`` the digests of
``lrqat_model.safetensors``, ``config.json``, ``generation_config.json`` and of its own content
(the JSON with that one entry left out, normalised); the weights file's header records the
digest of the JSON's content without the record, which tells a lost record from an old
checkpoint. ``load_pretrained`` checks them all (files hashed in 1 MB chunks), so a truncated or
bit-flipped weights file (a flip in the tensor data, which safetensors does not notice) or a
damaged but still parseable JSON is a ValueError naming the file, never a wrong model.
Checkpoints written before these records load unchecked.
"""

from __future__ import annotations

import json
import os
import shutil
import types
import warnings

import torch
import torch.nn as nn

from ._io import atomic_replace_dir, atomic_write_json, sha256_file, temp_dir_for, umask
from .config import LRQATConfig, name_matches, resolve_dtype
from .modules import LRQATLinear, QuantizedLinear, factor_dtype
from .wa_quant import inner_attn_impl, install_activation_quantizers, restore_attn_implementation

__all__ = [
    "prepare",
    "convert",
    "print_trainable_parameters",
    "trainable_parameters",
    "save_pretrained",
    "load_pretrained",
    "find_target_linears",
    "lrqat_layers",
]

FORMAT_VERSION = 1
META_FILE = "lrqat_config.json"
WEIGHTS_FILE = "lrqat_model.safetensors"
LEGACY_WEIGHTS_FILE = "model.safetensors"  # checkpoints written before the rename; read, never written
HF_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
STAGES = ("lrqat", "quantized")
# lrqat_config.json's record of the files' sha256, and the weights header's key for the JSON's own digest
SHA256_KEY = "sha256"
META_DIGEST_KEY = "lrqat_config_sha256"
_HASHED_FILES = (WEIGHTS_FILE, HF_CONFIG_FILE, GENERATION_CONFIG_FILE)


# ----------------------------------------------------------------------------------------------
# prepare / convert
# ----------------------------------------------------------------------------------------------


def find_target_linears(model: nn.Module, config: LRQATConfig) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` in ``model`` that ``config`` targets, in module order.

    Only plain ``nn.Linear`` is swapped. A subclass is read by its owner or library in ways a swap
    breaks (``nn.MultiheadAttention`` reads ``out_proj.weight`` itself; quantised or adapter
    linears of other libraries are not float layers): targeted subclasses are skipped with a
    warning naming them. An ``nn.Linear`` registered under two names is refused (swapping by name
    would quantise one name and leave the other in floating point).
    """
    if isinstance(model, nn.Linear):
        raise ValueError("prepare() takes a model that contains nn.Linear layers, not an nn.Linear itself: wrap it "
                         "(nn.Sequential(linear)) or build the layer with LRQATLinear.from_linear(linear, config)")
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Linear) and n:
            names_of.setdefault(id(m), []).append(n)
    targets, skipped = [], []
    for n, m in model.named_modules():
        if not (isinstance(m, nn.Linear) and n and config.matches(n)):
            continue
        if type(m) is not nn.Linear:
            skipped.append(f"{n} ({type(m).__name__})")
            continue
        if len(names_of[id(m)]) > 1:
            raise ValueError(f"layer {n!r} is one nn.Linear registered under several names {names_of[id(m)]}: prepare() "
                             "swaps layers by name and would leave the other names in floating point; give each name "
                             "its own module, or exclude all of them")
        targets.append((n, m))
    if skipped:
        warnings.warn(f"prepare(): {len(skipped)} targeted layer(s) are nn.Linear subclasses and stay in floating point "
                      f"(their owners read them directly): {skipped[:6]}{' ...' if len(skipped) > 6 else ''}", stacklevel=3)
    if config.target_modules is not None:
        linears = [n for names in names_of.values() for n in names]
        unused = [k for k in config.target_modules if not any(name_matches(n, k) for n in linears)]
        if unused:
            warnings.warn(f"prepare(): target_modules entries {unused} match no nn.Linear of the model (a typo?)",
                          stacklevel=3)
    return targets


def lrqat_layers(model: nn.Module) -> list[tuple[str, LRQATLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LRQATLinear)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _stage(model: nn.Module) -> str | None:
    stage = getattr(model, "lrqat_stage", None)
    if stage is not None:
        return stage
    kinds = {type(m) for m in model.modules()}
    if LRQATLinear in kinds:
        return "lrqat"
    if QuantizedLinear in kinds:
        return "quantized"
    return None


def _validate_targets(targets, config: LRQATConfig) -> None:
    """Check every target before touching the model, naming the offending layer."""
    for name, lin in targets:
        out_f, in_f = lin.weight.shape
        if config.group_size is not None and in_f % config.group_size:
            raise ValueError(f"group_size={config.group_size} does not divide in_features={in_f} of layer {name!r}")
        if config.phi_format == "packed_int" and in_f % 2:
            raise ValueError(f"phi_format='packed_int' needs an even in_features; layer {name!r} has {in_f}")
        if config.init == "svd" and config.rank > min(out_f, in_f):
            raise ValueError(f"init='svd' needs rank <= min(out, in) = {min(out_f, in_f)} for layer {name!r}, got rank={config.rank}")
        if not lin.weight.is_floating_point():
            raise TypeError(f"layer {name!r} has a non-float weight ({lin.weight.dtype}); is the model already quantized?")
        if lin.weight.is_meta:
            raise ValueError(f"layer {name!r} is on the meta device; load real weights before prepare()")
        if not bool(torch.isfinite(lin.weight).all()):
            raise ValueError(f"layer {name!r}: weight holds non-finite values; cannot estimate a quantization range")


def _freeze_and_mark(model: nn.Module, config: LRQATConfig, stage: str) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == "lrqat":
        for _, layer in lrqat_layers(model):
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
            layer.scale.requires_grad_(config.learn_scale)
    model.lrqat_config = config
    model.lrqat_stage = stage
    model.print_trainable_parameters = types.MethodType(print_trainable_parameters, model)


def prepare(model: nn.Module, config: LRQATConfig | None = None) -> nn.Module:
    """Swap the target ``nn.Linear`` layers of ``model`` for :class:`LRQATLinear`, in place.

    Each target gets ``s0`` from range estimation, ``Phi0 = phi(W0 / s0 + z)`` and ``lora_A`` /
    ``lora_B`` per ``config.init``. Every other parameter (embeddings, norms, head, biases) is
    frozen; only ``lora_A``, ``lora_B`` and ``scale`` (if ``learn_scale``) train. With
    ``config.compute_dtype`` the model is cast to it afterwards (scales stay fp32).
    The config is attached as ``model.lrqat_config`` and ``model.lrqat_stage = "lrqat"``.

    Args:
        model: any ``nn.Module`` (HF ``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ... or a plain stack of ``nn.Linear``).
        config: :class:`LRQATConfig`; default ``LRQATConfig()``.

    Returns:
        ``model`` (modified in place).
    """
    config = LRQATConfig() if config is None else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LRQATConfig):
        raise TypeError(f"config must be an LRQATConfig, got {type(config).__name__}")
    config.validate()
    stage = _stage(model)
    if stage is not None:
        raise ValueError(f"model is already prepared (stage {stage!r}); prepare() applies to a floating-point model once")
    targets = find_target_linears(model, config)
    if not targets:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        subclasses = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and type(m) is not nn.Linear]
        raise ValueError(
            f"no target layers: no nn.Linear matches target_modules={config.target_modules} minus exclude={config.exclude} "
            f"(the model's nn.Linear layers: {linears[:8]}{' ...' if len(linears) > 8 else ''}"
            + (f"; nn.Linear subclasses, never swapped: {subclasses[:4]}{' ...' if len(subclasses) > 4 else ''}"
               if subclasses else "") + ")"
        )
    _validate_targets(targets, config)
    _untie_swapped_head(model, targets)
    gen = torch.Generator().manual_seed(config.seed)
    for name, lin in targets:
        _set_submodule(model, name, LRQATLinear.from_linear(lin, config, generator=gen, name=name))
    install_activation_quantizers(model, config)
    dtype = config.torch_compute_dtype
    if dtype is not None:
        cast_floating(model, dtype)
    _freeze_and_mark(model, config, "lrqat")
    return model


def cast_floating(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, except floating non-persistent buffers, which keep their dtype.

    Those buffers are derived state that no checkpoint holds, such as RoPE's ``inv_freq``: HF's
    ``from_pretrained(dtype=bf16)`` computes it in fp32 and keeps it so. Cast to bf16 it is rounded
    before the rotary code's ``.float()``, and the rotation angle ``position * inv_freq`` is off by
    up to ~5 rad at position 4096 (head_dim 128). The LR-QAT modules keep their own dtypes as
    ever (``_KeepDtypes``).
    """
    keep = [(mod, name, buf) for mod in model.modules() for name, buf in mod._buffers.items()
            if name in mod._non_persistent_buffers_set and buf is not None and buf.is_floating_point()]
    model.to(dtype)
    for mod, name, buf in keep:
        mod._buffers[name] = buf.to(device=mod._buffers[name].device)
    return model


def _untie_swapped_head(model: nn.Module, targets) -> None:
    """Tell an HF config that its output embedding is no longer tied when ``prepare`` swaps it.

    The swap unties it already (the LR-QAT layer has no ``weight``), but ``tie_weights()``, which
    HF calls from ``resize_token_embeddings`` and others, would follow ``tie_word_embeddings`` and
    give the layer a ``weight`` again: saved, it made the checkpoint unloadable.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    cfg = getattr(model, "config", None)
    if head is not None and getattr(cfg, "tie_word_embeddings", False) and any(lin is head for _, lin in targets):
        cfg.tie_word_embeddings = False


_SCALE_GRIDS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.no_grad()
def convert(model: nn.Module, *, scale_dtype: str | None = None) -> nn.Module:
    """Fuse every :class:`LRQATLinear` into a :class:`QuantizedLinear`, in place.

    ``W_int`` comes from ``lrqat_kernels.merge_weight`` (the training forward's code path on the
    layer's device), so it is bit-identical to the integers the training forward used and the
    converted model's outputs match the prepared model's.

    Args:
        model: a model returned by :func:`prepare` (trained).
        scale_dtype: None (default) keeps the trained fp32 scales. ``"float16"`` / ``"bfloat16"``
            rounds each scale to the nearest value of that type (still stored as fp32), so that
            formats storing fp16 scales (GGUF, GPTQ) hold the converted model exactly; ``W_int``
            is unchanged and ``W_hat`` moves by at most 2^-11 (fp16) / 2^-8 (bf16) relative.
            A scale that would move more (below the type's normal range, e.g. fp16 < 6.1e-5), or
            that the type cannot hold (overflow, underflow to 0), is an error naming the layer;
            nothing is converted then.

    Returns:
        ``model`` with ``model.lrqat_stage = "quantized"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if scale_dtype is not None and scale_dtype not in _SCALE_GRIDS:
        raise ValueError(f"scale_dtype must be None, 'float16' or 'bfloat16', got {scale_dtype!r}")
    layers = lrqat_layers(model)
    if not layers:
        stage = _stage(model)
        if stage == "quantized":
            raise ValueError("model is already converted (stage 'quantized')")
        raise ValueError("convert() needs a model prepared with lrqat_kernels.prepare(); it has no LRQATLinear layers")
    from .export._common import UNIT_ROUNDOFF, scale_rounding

    converted = []
    for name, layer in layers:
        q = QuantizedLinear.from_lrqat(layer)
        if scale_dtype is not None:
            grid = _SCALE_GRIDS[scale_dtype]
            rounding = scale_rounding(q.scale, grid)
            lo, hi = float(q.scale.min()), float(q.scale.max())
            if rounding["overflow"]:
                raise ValueError(f"layer {name!r}: a scale in [{lo:.3g}, {hi:.3g}] overflows or flushes to 0 in "
                                 f"{scale_dtype}; convert with scale_dtype=None")
            # The promised bound (tests/test_api.py::test_convert_scale_dtype_refuses_subnormal_scales).
            if rounding["max_rel_error"] > UNIT_ROUNDOFF[grid]:
                raise ValueError(f"layer {name!r}: {scale_dtype} moves a scale by {rounding['max_rel_error']:.3g} relative "
                                 f"(> {UNIT_ROUNDOFF[grid]:.3g}: smallest scale {lo:.3g} is below "
                                 f"{scale_dtype}'s normal range {torch.finfo(grid).tiny:.3g}); convert with scale_dtype=None")
            converted.append((q, q.scale.to(grid).float()))
        else:
            converted.append((q, None))
        q.train(layer.training)
    for (name, _), (q, r) in zip(layers, converted):  # swap only once every layer converted: no half-converted model
        if r is not None:
            q.scale.copy_(r)
        _set_submodule(model, name, q)
    config = getattr(model, "lrqat_config", None)
    _freeze_and_mark(model, config, "quantized")
    return model


def trainable_parameters(model: nn.Module) -> dict:
    """Counts: ``trainable``, ``all`` (parameters), ``base_weights`` (logical weights held in Phi0 /
    qweight buffers) and ``bytes`` of parameters + buffers."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    base = 0
    for m in model.modules():
        if isinstance(m, (LRQATLinear, QuantizedLinear)):
            base += m.in_features * m.out_features
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"trainable": trainable, "all": total, "base_weights": base, "bytes": nbytes}


def print_trainable_parameters(model: nn.Module) -> dict:
    """Print trainable / total parameter counts (PEFT style) and the frozen base weights held as
    Phi0 (or packed W_int) buffers; returns the counts (see :func:`trainable_parameters`)."""
    c = trainable_parameters(model)
    denom = c["all"] + c["base_weights"]
    pct = 100.0 * c["trainable"] / denom if denom else 0.0
    cfg = getattr(model, "lrqat_config", None)
    fmt = f" as Phi0 ({cfg.phi_format})" if cfg is not None and _stage(model) == "lrqat" else ""
    print(
        f"trainable params: {c['trainable']:,} || all params: {c['all']:,} "
        f"+ {c['base_weights']:,} frozen base weights{fmt} || trainable%: {pct:.4f} "
        f"|| model bytes: {c['bytes']:,}"
    )
    return c


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------


def _module_spec(m: nn.Module) -> dict:
    if isinstance(m, LRQATLinear):
        return {
            "type": "LRQATLinear", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
            "rank": m.rank, "alpha": m.alpha, "phi_format": m.phi_format, "group_size": m.group_size,
            "symmetric": m.symmetric, "bias": m.bias is not None, "learn_scale": bool(m.scale.requires_grad),
            "dtype": str(m.lora_A.dtype).replace("torch.", ""), **_act_spec(m),
        }
    return {
        "type": "QuantizedLinear", "in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
        "group_size": m.group_size, "symmetric": m.symmetric, "bias": m.bias is not None,
        "dtype": None if m.bias is None else str(m.bias.dtype).replace("torch.", ""), **_act_spec(m),
    }


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
        return QuantizedLinear(
            spec["in_features"], spec["out_features"], bits=spec["bits"], group_size=spec["group_size"],
            symmetric=spec["symmetric"], bias=spec["bias"], dtype=dtype, **act,
        )
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
    modules = {n: _module_spec(m) for n, m in model.named_modules() if isinstance(m, (LRQATLinear, QuantizedLinear))}
    state, tied = _dedup_tied(model.state_dict())
    config = getattr(model, "lrqat_config", None)
    hf_config = getattr(model, "config", None)
    is_hf = hf_config is not None and hasattr(hf_config, "to_dict") and hasattr(hf_config, "save_pretrained")
    import lrqat_kernels

    meta = {
        "format_version": FORMAT_VERSION,
        "library": "lrqat_kernels",
        "library_version": lrqat_kernels.__version__,
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
        atomic_replace_dir(tmp, save_directory)
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
        return  # a legacy model.safetensors checkpoint, or no weights (reported when loading)
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
    module docstring): ValueError naming the damaged file. Checkpoints written before the record
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
            # keep the saved dtype exactly (shared/tied tensors follow); LoRA factors saved in fp16
            # (older checkpoints) load as fp32 master weights, as prepare() makes them now
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
