"""Weight-activation LR-QAT: where the activation and KV-cache quantisers go in a model.

Placement (paper section 4.4 / appendix B, following OmniQuant and LLM-QAT), for
``LRQATConfig(act_bits=..., kv_bits=...)``:

* the input of every swapped linear (q/k/v, o, gate/up, down projections) at ``act_bits``:
  ``LRQATLinear.input_bits`` / ``QuantizedLinear.input_bits``. On LLaMA / Mistral / Qwen2 decoder
  layers (``config.fuse_act_quant``, default) the shared input of q/k/v is quantised once, by
  ``input_layernorm`` (an :class:`~lrqat_kernels.act_modules.ActQuantRMSNorm`, norm and quantiser in
  one kernel), and that of gate/up by ``post_attention_layernorm``; those five linears then have
  ``input_bits=None``; likewise the input of ``down_proj`` is quantised by the MLP that makes it
  (an :class:`~lrqat_kernels.act_modules.ActQuantMLP`: silu, product and quantiser in one kernel), so
  only ``o_proj`` quantises its own input. Same numerics: the quantiser is a function of the
  tensor alone;
* queries and keys after RoPE, the inputs of ``Q K^T``, at ``act_bits``: an attention function
  registered with transformers' ``AttentionInterface`` as ``"lrqat_<inner>"`` wraps the model's
  own implementation ``<inner>`` (sdpa or eager) and quantises them per token and head (over
  ``head_dim``). The same name is registered with ``AttentionMaskInterface`` with ``<inner>``'s mask
  function, so causal and padding masks are built exactly as for ``<inner>`` (transformers builds
  no mask for an implementation without one);
* the KV cache, i.e. the outputs of ``k_proj`` and ``v_proj``, at ``kv_bits``: ``output_bits``
  of those layers. The value states enter ``softmax(.) V`` already quantised this way;
* not the softmax output (the paper keeps it in high precision), not the head (``lm_head``).

Every quantiser is dynamic per-token fake quantisation (``lrqat_kernels.fake_quant_activation``,
looked up in ``lrqat_kernels.ops.act_quant`` at call time).
The settings live on the modules, so ``convert`` keeps them (deployed numerics = trained
numerics) and a saved checkpoint restores them.
"""

from __future__ import annotations

import sys
import warnings

import torch.nn as nn

from .act_modules import ActQuantMLP, ActQuantRMSNorm, _op
from .modules import LRQATLinear, QuantizedLinear

ATTN_IMPL_PREFIX = "lrqat_"
#: Attention implementations the q/k-quantising wrapper can run inside.
WRAPPABLE_ATTN = ("sdpa", "eager")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Decoder layers whose forward is ``self_attn(input_layernorm(h))`` and ``mlp(post_attention_layernorm(h))``
#: with ``mlp = down_proj(act(gate_proj(x)) * up_proj(x))`` (checked against transformers in tests).
_FUSABLE_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_LR = (LRQATLinear, QuantizedLinear)


def _is_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, p, None), nn.Module) for p in _PROJ)


def _lrqat_attention(module, query, key, value, attention_mask, **kwargs):
    """``AttentionInterface`` entry: quantise queries and keys (after RoPE), then run the
    model's original attention implementation (``module.lrqat_inner_attn``)."""
    bits = getattr(module, "lrqat_qk_bits", None)
    if bits is not None:
        sym = module.lrqat_act_symmetric
        quant = _op("fake_quant_activation")
        query = quant(query, bits, sym)
        key = quant(key, bits, sym)
    inner = getattr(module, "lrqat_inner_attn", "sdpa")
    if inner == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


def attn_impl_name(inner: str) -> str:
    """The attention implementation name that quantises queries and keys, then runs ``inner``."""
    return ATTN_IMPL_PREFIX + inner


def inner_attn_impl(name: str | None) -> str | None:
    """``inner`` of :func:`attn_impl_name` (``name`` itself when it is not one of ours)."""
    return name[len(ATTN_IMPL_PREFIX):] if name and name.startswith(ATTN_IMPL_PREFIX) else name


def restore_attn_implementation(model: nn.Module, inner: str | None) -> None:
    """Give a freshly built HF model the attention implementation its checkpoint was trained with
    (``config.json`` does not keep it); ``inner`` is the wrapped one for weight-activation models.
    One this machine cannot run (flash-attention not installed, ...) keeps the model's, with a
    warning: the numerics then differ by floating-point rounding only."""
    hf_config = getattr(model, "config", None)
    if not inner or hf_config is None or not hasattr(hf_config, "_attn_implementation"):
        return
    if inner == hf_config._attn_implementation:
        return
    try:
        model.set_attn_implementation(inner)  # checks that the implementation can run here
    except (ImportError, ValueError, AttributeError, TypeError) as e:
        warnings.warn(f"the checkpoint was trained with attention implementation {inner!r}, which cannot run here "
                      f"({type(e).__name__}: {e}); using {hf_config._attn_implementation!r}", stacklevel=3)


def _register_attention(inner: str) -> str:
    """Register :func:`_lrqat_attention` and ``inner``'s mask function under ``lrqat_<inner>``."""
    from transformers import AttentionInterface

    name = attn_impl_name(inner)
    AttentionInterface.register(name, _lrqat_attention)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:  # transformers without mask interfaces: masks are built by the model itself
        return name
    if inner in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def install_activation_quantizers(model: nn.Module, config) -> None:
    """Install (or, with ``config.act_bits is None``, leave off) the weight-activation quantisers.

    LR-QAT only: ``method="peqat"`` quantises its activations inside ``PEQATLinear`` (static,
    smoothed), so nothing is installed for it (``tests/test_methods_model.py``). Called by ``prepare`` after the module swap and by ``load_pretrained``; idempotent.

    Raises:
        ValueError: ``kv_bits`` on a model without ``q/k/v/o_proj`` attention modules; an
            ``*Attention`` module of an HF model without those projections (naming it); a
            k/v projection that was not swapped (excluded), since its output is the KV cache.
            The model's attention implementation must be one of :data:`WRAPPABLE_ATTN`.
    """
    if config is None or config.act_bits is None or getattr(config, "method", "lrqat") != "lrqat":
        return
    attn = [(n, m) for n, m in model.named_modules() if _is_attention(m)]
    hf_config = getattr(model, "config", None)
    is_hf = hf_config is not None and hasattr(hf_config, "_attn_implementation")
    if is_hf:
        for n, m in model.named_modules():
            if type(m).__name__.endswith("Attention") and not _is_attention(m):
                raise ValueError(
                    f"module {n!r} ({type(m).__name__}) has no {'/'.join(_PROJ)} projections: weight-activation "
                    "quantisation supports LLaMA / Mistral / Qwen2-style attention"
                )
        if not attn:
            raise ValueError(f"{type(model).__name__} has no attention modules with {'/'.join(_PROJ)}; "
                             "act_bits needs LLaMA / Mistral / Qwen2-style attention")
    if config.kv_bits is not None and not attn:
        raise ValueError(f"kv_bits={config.kv_bits} needs attention modules with k_proj / v_proj; "
                         f"{type(model).__name__} has none")
    for _, m in model.named_modules():
        if isinstance(m, (LRQATLinear, QuantizedLinear)):
            m.input_bits, m.act_symmetric = config.act_bits, config.act_symmetric
    for name, m in attn:
        for p in ("k_proj", "v_proj"):
            proj = getattr(m, p)
            if config.kv_bits is not None:
                if not isinstance(proj, (LRQATLinear, QuantizedLinear)):
                    raise ValueError(f"{name}.{p} is a {type(proj).__name__}, not an LR-QAT layer (excluded?); "
                                     "KV-cache quantisation quantises its output")
                proj.output_bits = config.kv_bits
        m.lrqat_qk_bits, m.lrqat_act_symmetric = config.act_bits, config.act_symmetric
    if config.fuse_act_quant:
        _fuse_act_quantizers(model, config)
    else:  # a re-install without fusion: producers swapped earlier stop quantising
        for m in model.modules():
            _unfuse(m)
    if is_hf and attn:
        inner = inner_attn_impl(hf_config._attn_implementation) or "sdpa"
        if inner not in WRAPPABLE_ATTN:
            raise ValueError(f"act_bits: queries and keys are quantised by wrapping the model's attention, which can wrap "
                             f"{WRAPPABLE_ATTN}, not {inner!r} (transformers' flash / flex paths key on their own name); "
                             "load the model with attn_implementation='sdpa'")
        for _, m in attn:
            m.lrqat_inner_attn = inner
        hf_config._attn_implementation = _register_attention(inner)


def _norm_sites(layer: nn.Module):
    """``(norm attribute, parent of the linears, linear names)`` of a norm-fusable decoder layer."""
    return (("input_layernorm", getattr(layer, "self_attn", None), ("q_proj", "k_proj", "v_proj")),
            ("post_attention_layernorm", getattr(layer, "mlp", None), ("gate_proj", "up_proj")))


def _fuse_act_quantizers(model: nn.Module, config) -> None:
    """Move the input quantisers of q/k/v and gate/up into the RMSNorms feeding them, and that of
    down_proj into the MLP's SwiGLU (see module doc).

    A producer is swapped only when every linear it feeds is an LR-QAT layer (an excluded linear
    gets full-precision inputs, as with the per-linear placement) and it has the expected form
    (an RMSNorm with ``weight`` and ``variance_epsilon``; a gate/up/down MLP with SiLU); other
    layers keep per-linear quantisers.
    """
    for layer in model.modules():
        if type(layer).__name__ not in _FUSABLE_LAYERS:
            continue
        for norm_name, parent, linears in _norm_sites(layer):
            norm = getattr(layer, norm_name, None)
            mods = [getattr(parent, n, None) for n in linears] if parent is not None else [None]
            if not all(isinstance(m, _LR) for m in mods):
                _unfuse(norm)  # swapped by an earlier install whose linears qualified
                continue
            if not isinstance(norm, ActQuantRMSNorm):
                if not (type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")):
                    continue
                norm = ActQuantRMSNorm.from_norm(norm, config.act_bits, config.act_symmetric)
                setattr(layer, norm_name, norm)
            norm.output_bits, norm.act_symmetric = config.act_bits, config.act_symmetric
            for m in mods:
                m.input_bits = None
        mlp = getattr(layer, "mlp", None)
        if not isinstance(getattr(mlp, "down_proj", None), _LR):
            _unfuse(mlp)
            continue
        if not isinstance(mlp, ActQuantMLP):
            if not ActQuantMLP.is_swiglu(mlp):
                continue
            mlp = ActQuantMLP.from_mlp(mlp, config.act_bits, config.act_symmetric)
            layer.mlp = mlp
        mlp.output_bits, mlp.act_symmetric = config.act_bits, config.act_symmetric
        mlp.down_proj.input_bits = None


def _unfuse(module) -> None:
    """A producer swapped earlier stops quantising (its consumers quantise their own inputs again)."""
    if isinstance(module, (ActQuantRMSNorm, ActQuantMLP)):
        module.output_bits = None
