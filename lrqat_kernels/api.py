"""Model-level LR-QAT API: ``prepare`` -> train -> ``convert`` (save / load: :mod:`lrqat_kernels.checkpoint`).

Two-step flow (as torchao's QAT ``prepare`` / ``convert``)::

    model = AutoModelForCausalLM.from_pretrained(...)
    prepare(model, LRQATConfig(bits=4, compute_dtype="bfloat16"))   # nn.Linear -> LRQATLinear, rest frozen
    ...train lora_A / lora_B / scale...
    save_pretrained(model, "ckpt-lrqat")                              # stage "lrqat"
    convert(model)                                                    # LRQATLinear -> QuantizedLinear (INT-b)
    save_pretrained(model, "ckpt-int4")                               # stage "quantized"
    model = load_pretrained("ckpt-int4")                              # no training code objects needed

``save_pretrained``, ``load_pretrained`` and the other checkpoint names live in
:mod:`lrqat_kernels.checkpoint`; ``lrqat_kernels.api.<name>`` still gives them (re-export).
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn as nn

from .config import LRQATConfig, name_matches
from .l4q import L4QLinear
from .modules import LRQATLinear, QuantizedLinear
from .peqat import PEQATLinear
from .wa_quant import install_activation_quantizers

__all__ = [
    "prepare",
    "convert",
    "print_trainable_parameters",
    "trainable_parameters",
    "save_pretrained",  # re-exported from lrqat_kernels.checkpoint
    "load_pretrained",
    "find_target_linears",
    "lrqat_layers",
]

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


#: The training layer of each method (``LRQATConfig.method``) and its trainable quantiser tensors
#: (trained when ``config.learn_scale``; the LoRA factors always train).
TRAINING_LAYERS = {"lrqat": LRQATLinear, "l4q": L4QLinear, "peqat": PEQATLinear}
QUANTIZER_PARAMS = {LRQATLinear: ("scale",), L4QLinear: ("scale", "offset"), PEQATLinear: ("log_smooth", "clip")}


def lrqat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every training layer (LR-QAT, L4Q or PE-QAT) in module order."""
    kinds = tuple(TRAINING_LAYERS.values())
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _stage(model: nn.Module) -> str | None:
    stage = getattr(model, "lrqat_stage", None)
    if stage is not None:
        return stage
    kinds = {type(m) for m in model.modules()}
    if kinds & set(TRAINING_LAYERS.values()):
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
        if config.rank > max(out_f, in_f):
            raise ValueError(f"rank={config.rank} exceeds max(out, in) = {max(out_f, in_f)} of layer {name!r}: "
                             "each LoRA factor would be larger than the weight")
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
        learn = True if config is None else config.learn_scale
        for _, layer in lrqat_layers(model):
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
            for name in QUANTIZER_PARAMS[type(layer)]:
                getattr(layer, name).requires_grad_(learn)
    model.lrqat_config = config
    model.lrqat_stage = stage
    model.print_trainable_parameters = types.MethodType(print_trainable_parameters, model)


def prepare(model: nn.Module, config: LRQATConfig | None = None, *, calibration=None) -> nn.Module:
    """Swap the target ``nn.Linear`` layers of ``model`` for :class:`LRQATLinear`, in place
    (``L4QLinear`` / ``PEQATLinear`` for ``config.method = "l4q"`` / ``"peqat"``).

    Each target gets ``s0`` from range estimation, ``Phi0 = phi(W0 / s0 + z)`` and ``lora_A`` /
    ``lora_B`` per ``config.init``. Every other parameter (embeddings, norms, head, biases) is
    frozen; only ``lora_A``, ``lora_B`` and ``scale`` (if ``learn_scale``) train. With
    ``config.compute_dtype`` the model is cast to it afterwards (scales stay fp32).
    The config is attached as ``model.lrqat_config`` and ``model.lrqat_stage = "lrqat"``.

    Args:
        model: any ``nn.Module`` (HF ``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ... or a plain stack of ``nn.Linear``).
        config: :class:`LRQATConfig`; default ``LRQATConfig()``.
        calibration: ``method="peqat"`` only, required: model inputs (a tensor, e.g. token ids
            ``[B, T]``, or an iterable of them) run once through the FP model to record each
            target's per-input-channel max ``|x|`` (the smoothing and clip initialisation).

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
    if (calibration is not None) != (config.method == "peqat"):
        raise ValueError("calibration data is needed by method='peqat' (smoothing and clip initialisation) and only "
                         f"by it; got method={config.method!r} with calibration={'given' if calibration is not None else None}")
    act_absmax = _input_absmax(model, targets, calibration) if config.method == "peqat" else None
    _untie_swapped_head(model, targets)
    gen = torch.Generator().manual_seed(config.seed)
    for name, lin in targets:
        if config.method == "lrqat":
            layer = LRQATLinear.from_linear(lin, config, generator=gen, name=name)
        elif config.method == "l4q":
            layer = L4QLinear.from_config(lin, config, generator=gen, name=name)
        else:
            layer = PEQATLinear.from_config(lin, config, act_absmax=act_absmax[name], generator=gen, name=name)
        _set_submodule(model, name, layer)
    install_activation_quantizers(model, config)
    dtype = config.torch_compute_dtype
    if dtype is not None:
        cast_floating(model, dtype)
    _freeze_and_mark(model, config, "lrqat")
    return model


@torch.no_grad()
def _input_absmax(model: nn.Module, targets, calibration) -> dict[str, torch.Tensor]:
    """Per target, fp32 ``[in]``: max ``|x|`` per input channel over the calibration inputs."""
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise TypeError("calibration must be a tensor of model inputs or an iterable of them")
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            stats[name] = x if name not in stats else torch.maximum(stats[name], x)
        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in targets]
    try:
        for b in batches:
            model(b)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in targets if name not in stats]
    if missing:
        raise ValueError(f"calibration never reached {len(missing)} target layer(s): {missing[:4]}")
    return stats


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
        q = QuantizedLinear.from_lrqat(layer) if isinstance(layer, LRQATLinear) else layer.to_quantized()
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
        if isinstance(m, (LRQATLinear, L4QLinear, PEQATLinear, QuantizedLinear)):
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
    fmt = ""
    if cfg is not None and _stage(model) == "lrqat":
        fmt = f" as Phi0 ({cfg.phi_format})" if cfg.method == "lrqat" else f" as W0 ({cfg.method})"
    print(
        f"trainable params: {c['trainable']:,} || all params: {c['all']:,} "
        f"+ {c['base_weights']:,} frozen base weights{fmt} || trainable%: {pct:.4f} "
        f"|| model bytes: {c['bytes']:,}"
    )
    return c


# The checkpoint names that lived here, re-exported from their home (lrqat_kernels.checkpoint), which
# imports this module: looked up on first use (PEP 562), not at import.
_CHECKPOINT_NAMES = frozenset({
    "save_pretrained", "load_pretrained", "read_meta", "verify_checkpoint", "FORMAT_VERSION", "META_FILE",
    "WEIGHTS_FILE", "LEGACY_WEIGHTS_FILE", "HF_CONFIG_FILE", "GENERATION_CONFIG_FILE", "STAGES", "SHA256_KEY", "META_DIGEST_KEY",
    "_HASHED_FILES", "_module_spec", "_act_spec", "_build_module", "_dedup_tied", "_model_dtype", "_json_digest",
    "_without_record", "_self_digest", "_check_meta_digest", "_read_tensors", "_model_from_config", "_hf_from_config",
})


def __getattr__(name: str):
    if name in _CHECKPOINT_NAMES:
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

