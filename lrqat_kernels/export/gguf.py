"""GGUF export: one ``model.gguf`` for llama.cpp / ollama, written with llama.cpp's ``gguf`` package.

    report = lrqat_kernels.export(model, "out/gguf", format="gguf")                 # exact or refused
    report = lrqat_kernels.export(model, "out/gguf", format="gguf", allow_inexact=True)

Quantised layers go into GGUF blocks of 32 weights along the input dim (``QK``), written here with
numpy (never ``gguf.quants.quantize``, which picks its own block scale):

- ``Q4_0`` (18 bytes: fp16 ``d`` + 16 bytes of nibbles, byte ``j`` = element ``j`` low | element
  ``j + 16`` high): ``d = fp16(s)``, ``nibble = W_int + 8``; value ``d * (nibble - 8)``. Exact for
  symmetric layers with ``bits <= 4`` whose groups are whole blocks and whose scales are fp16 values.
- ``Q8_0`` (34 bytes: fp16 ``d`` + 32 int8): ``d = fp16(s)``, ``q = W_int - z``; exact for any grid
  with ``W_int - z`` in int8 (asymmetric layers, ``bits`` 5..8) under the same block/scale rules.
- ``F32`` / ``F16`` (on request): the dense ``W_hat`` (F16 only where every weight is an fp16 value).

``gguf_type="auto"`` takes the smallest exact block type per layer. A layer no block type holds
exactly (an fp16-inexact scale, a group of 16, an explicit type that cannot hold the layer) is
refused with :class:`~._common.ExportError`, unless ``allow_inexact=True``: then the nearest block
encoding is written and its weight error is reported.

LLaMA / Mistral (GGUF arch ``llama``): llama.cpp's converter reorders the rows of ``q_proj`` /
``k_proj`` (weights and biases) inside each head so that HF's rotate-half RoPE pairs become
llama.cpp's adjacent pairs; whole rows move, so ``W_int``, ``s`` and ``z`` are permuted together
before packing and the export stays exact. Qwen2 (arch ``qwen2``, NEOX RoPE) keeps its rows.

The tokenizer (``tokenizer.json`` / ``tokenizer.model`` that :func:`~lrqat_kernels.export.export`
saved into ``out_dir``) goes into the GGUF as llama.cpp's converter writes it (``gguf_vocab.py``);
``llama_cpp.py`` runs the file in llama.cpp (logits, perplexity). The checks:
``tests/test_export_gguf.py`` (gguf-py's reader for every tensor bit for bit, llama.cpp itself for
logits, tokenization, generation and perplexity).

Size: one writer, one job: the block encoders, the exactness rules and ``write`` (GGUF metadata,
tensor order and file type as llama.cpp reads them) only make sense together; the tokenizer
(``gguf_vocab.py``) and the llama.cpp runner (``llama_cpp.py``) are already apart.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from ._common import ExportError, QuantLayer, check_options, plan_head, scale_rounding
from .gguf_vocab import add_vocab
from .gguf_vocab import gguf_package as _gguf
from .llama_cpp import llama_cpp_logits, llama_cpp_perplexity  # re-exported: callers import them from here

__all__ = ["write", "validate_options", "OPTIONS", "GGUF_TYPES", "ARCHITECTURES", "QK", "GGUF_FILE",
           "rope_row_permutation", "llama_cpp_logits", "llama_cpp_perplexity"]

GGUF_FILE = "model.gguf"
#: ``gguf_type`` values: ``auto`` = smallest exact block type per layer.
GGUF_TYPES = ("auto", "Q4_0", "Q8_0", "F32", "F16")
#: HF architecture -> GGUF architecture (llama.cpp's converter maps Mistral to ``llama`` too).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
#: Weights per Q4_0 / Q8_0 block (ggml's QK4_0 = QK8_0 = 32).
QK = 32
#: The writer's options (anything else is refused).
OPTIONS = ("gguf_type", "allow_inexact")

# HF module / parameter names -> GGUF tensor names (gguf-py constants.py TENSOR_NAMES, LLAMA / QWEN2).
_BLOCK_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_MODULES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")



def validate_options(options: dict) -> None:
    """Refuse unknown option names and bad values (``export()`` calls this before loading the model)."""
    check_options("gguf", options, OPTIONS)
    gguf_type = options.get("gguf_type", "auto")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"gguf: gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    allow_inexact = options.get("allow_inexact", False)
    if not isinstance(allow_inexact, bool):
        raise ExportError(f"gguf: allow_inexact must be True or False, got {allow_inexact!r}")


# --------------------------------------------------------------------------------------------------
# Names, permutation, float types


def _gguf_name(hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; None if unknown."""
    mod, _, leaf = hf_name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if mod in _TOP_MODULES:
        return f"{_TOP_MODULES[mod]}.{leaf}"
    m = _BLOCK_RE.match(mod)
    if m and m.group(2) in _BLOCK_MODULES:
        return f"blk.{m.group(1)}.{_BLOCK_MODULES[m.group(2)]}.{leaf}"
    return None


def rope_row_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives ``q_proj`` / ``k_proj`` for the ``llama`` arch.

    Within each head of ``hd = n_rows // n_head`` rows, new row ``2i + j`` is old row
    ``j * hd/2 + i`` (``i < hd/2``, ``j`` in {0, 1}): HF's rotate-half pairs ``(i, i + hd/2)``
    become llama.cpp's adjacent pairs. ``k_proj`` uses the KV head count (GQA).

    Returns:
        int64 ``[n_rows]``: ``W_gguf = W_hf[perm]``.
    """
    if n_head <= 0 or n_rows % (2 * n_head):
        raise ExportError(f"{n_rows} rows cannot be split into {n_head} heads of an even size")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _float_type(t: torch.Tensor) -> str:
    """The GGUF type a high-precision 2-D tensor keeps: its own dtype (F32, F16 or BF16); all exact."""
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(t.dtype, "F32")


def _dense_array(t: torch.Tensor, ftype: str):
    """(array, raw_dtype) for GGUFWriter.add_tensor: F32/F16 as numpy floats, BF16 as raw bytes."""
    gguf = _gguf()
    t = t.detach().cpu().contiguous()
    if ftype == "BF16":
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").view(np.uint8)
        return raw, gguf.GGMLQuantizationType.BF16
    return t.to(torch.float16 if ftype == "F16" else torch.float32).numpy(), None


# --------------------------------------------------------------------------------------------------
# Blocks


def _block_scales(scale: np.ndarray, group: int, in_features: int) -> np.ndarray:
    """Per-group ``[out, G]`` -> per-block ``[out, in // QK]`` (each block lies inside one group)."""
    starts = np.arange(0, in_features, QK)
    return scale[:, starts // group]


def _pack_q4_0(q: np.ndarray, d16: np.ndarray) -> np.ndarray:
    """Q4_0 blocks. q: int ``[out, in]`` in [-8, 7]; d16: float16 ``[out, in // 32]``.

    Returns uint8 ``[out, in // 32 * 18]``: per block ``d`` (fp16, little-endian), then byte ``j``
    = nibble ``j`` | nibble ``j + 16`` << 4 with ``nibble = q + 8``.
    """
    out, n = q.shape
    nib = (q.astype(np.int16) + 8).astype(np.uint8).reshape(out, n // QK, QK)
    blocks = np.empty((out, n // QK, 2 + QK // 2), np.uint8)
    blocks[..., :2] = np.ascontiguousarray(d16, dtype="<f2").reshape(out, n // QK, 1).view(np.uint8)
    blocks[..., 2:] = nib[..., : QK // 2] | (nib[..., QK // 2:] << 4)
    return blocks.reshape(out, -1)


def _pack_q8_0(q: np.ndarray, d16: np.ndarray) -> np.ndarray:
    """Q8_0 blocks. q: int ``[out, in]`` in [-128, 127]; d16: float16 ``[out, in // 32]``.

    Returns uint8 ``[out, in // 32 * 34]``: per block ``d`` (fp16, little-endian), then 32 int8.
    """
    out, n = q.shape
    blocks = np.empty((out, n // QK, 2 + QK), np.uint8)
    blocks[..., :2] = np.ascontiguousarray(d16, dtype="<f2").reshape(out, n // QK, 1).view(np.uint8)
    blocks[..., 2:] = q.astype(np.int8).reshape(out, n // QK, QK).view(np.uint8)
    return blocks.reshape(out, -1)


def _decode(q: np.ndarray, d16: np.ndarray) -> np.ndarray:
    """What a reader computes: ``fp32(d) * q`` per block, float32 ``[out, in]``."""
    return np.repeat(d16.astype(np.float32), QK, axis=1) * q.astype(np.float32)


def _requantize(w: np.ndarray, qtype: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Nearest block encoding of layer ``name``'s dense float32 ``[out, in]`` (only under allow_inexact).

    Q8_0: ``d = amax / 127`` per block; Q4_0: ``d = -m / 8`` with ``m`` the block's value of the
    largest magnitude (it lands on -8, the grid's long side). ``q = clip(rint(w / fp16(d)))``.
    """
    out, n = w.shape
    b = w.reshape(out, n // QK, QK)
    if qtype == "Q8_0":
        d = np.abs(b).max(-1) / 127.0
        lo, hi = -128, 127
    else:
        idx = np.abs(b).argmax(-1)[..., None]
        d = np.take_along_axis(b, idx, -1)[..., 0] / -8.0
        lo, hi = -8, 7
    d16 = d.astype(np.float16)
    if not np.isfinite(d16).all():
        raise ExportError(f"layer {name}: weights up to {float(np.abs(w).max()):.4g} overflow the fp16 block scale "
                          f"of {qtype} (max 65504)")
    inv = np.divide(1.0, d16.astype(np.float32), out=np.zeros(d16.shape, np.float32), where=d16 != 0)
    q = np.clip(np.rint(b * inv[..., None]), lo, hi).astype(np.int8).reshape(out, n)
    return q, d16


def _obstacles(layer: QuantLayer, qtype: str, q: np.ndarray) -> tuple[list[str], bool]:
    """Why ``qtype`` cannot hold the layer exactly: (structural reasons, scale is fp16-inexact).

    q: int16 ``W_int - z`` ``[out, in]``.
    """
    reasons = []
    if layer.in_features % QK:
        reasons.append(f"in_features={layer.in_features} is not a multiple of the {QK}-weight block")
    elif layer.group % QK:
        reasons.append(f"group_size={layer.group_size} is not a multiple of the {QK}-weight block")
    if qtype == "Q4_0":
        if not layer.symmetric:
            reasons.append("asymmetric (zero points): Q4_0 holds d * (nibble - 8) only")
        if layer.bits > 4:
            reasons.append(f"bits={layer.bits} > 4")
    elif q.size and (int(q.min()) < -128 or int(q.max()) > 127):
        reasons.append(f"W_int - z spans [{int(q.min())}, {int(q.max())}], outside int8")
    return reasons, scale_rounding(layer.scale, torch.float16)["inexact"] > 0


def _encode_layer(layer: QuantLayer, perm: np.ndarray | None, want: str, allow_inexact: bool):
    """Encode one quantised layer.

    Returns ``(array, raw_dtype, info)``: the tensor for GGUFWriter.add_tensor and the report entry
    (``type``, ``exact``, ``reason``, ``max_abs_error``, ``max_rel_error`` = max abs error / max |W_hat|).
    """
    gguf = _gguf()
    w_int = layer.w_int.numpy().astype(np.int16)
    scale = layer.scale.numpy()
    zp = None if layer.zero_point is None else layer.zero_point.numpy().astype(np.int16)
    w_hat = layer.w_hat(torch.float32).numpy()
    if perm is not None:  # whole rows: integers, scales and zero points move together
        w_int, scale, w_hat = w_int[perm], scale[perm], w_hat[perm]
        zp = None if zp is None else zp[perm]
    q = w_int if zp is None else w_int - np.repeat(zp, layer.group, axis=1)
    info = {"hf_name": layer.name, "bits": layer.bits, "group_size": layer.group_size, "symmetric": layer.symmetric}

    if want in ("F32", "F16"):
        arr = w_hat if want == "F32" else w_hat.astype(np.float16)
        err = np.abs(arr.astype(np.float32) - w_hat)
        bad = int(((err != 0) | ~np.isfinite(arr)).sum())
        reason = None if bad == 0 else f"{bad} weights of s * (W_int - z) are not fp16 values"
        if reason and not allow_inexact:
            raise ExportError(f"layer {layer.name}: gguf_type='F16' changes weights: {reason}; "
                              "use gguf_type='F32' (exact) or allow_inexact=True (rounded, error reported)")
        return arr, None, dict(info, type=want, exact=reason is None, reason=reason, **_errors(arr.astype(np.float32), w_hat))

    candidates = ("Q4_0", "Q8_0") if want == "auto" else (want,)
    found = {t: _obstacles(layer, t, q) for t in candidates}
    exact = [t for t in candidates if not found[t][0] and not found[t][1]]
    if exact:
        qtype, reason = exact[0], None
        d16 = _block_scales(scale, layer.group, layer.in_features).astype(np.float16)
    else:
        why = "; ".join(f"{t}: " + ", ".join(found[t][0] + (["scale not an fp16 value"] if found[t][1] else []))
                        for t in candidates)
        if not allow_inexact:
            r = scale_rounding(layer.scale, torch.float16)
            hint = (f" ({r['inexact']} of {r['total']} scales are not fp16 values)" if any(found[t][1] for t in candidates) else "")
            raise ExportError(
                f"layer {layer.name}: no exact GGUF encoding ({why}){hint}; pass allow_inexact=True "
                "(--allow-inexact) to write the nearest one and report the error, or gguf_type='F32' for an exact dense file")
        if layer.in_features % QK:
            if want != "auto":
                raise ExportError(f"layer {layer.name}: in_features={layer.in_features} is not a multiple of {QK}: "
                                  f"{want} cannot hold it at all; use gguf_type='F32' or 'auto'")
            return w_hat, None, dict(info, type="F32", exact=True, reason=f"stored dense: {why}", **_errors(w_hat, w_hat))
        # Same integers with d = fp16(s) where only the scale is in the way; else re-quantise W_hat.
        scale_only = [t for t in candidates if not found[t][0]]
        if scale_only:
            qtype = scale_only[0]
            d16 = _block_scales(scale, layer.group, layer.in_features).astype(np.float16)
            if not np.isfinite(d16).all():
                raise ExportError(f"layer {layer.name}: scales up to {float(scale.max()):.4g} overflow fp16 (max 65504)")
        else:
            qtype = "Q8_0" if want == "auto" else want
            q, d16 = _requantize(w_hat, qtype, layer.name)
        reason = why
    packed = (_pack_q4_0 if qtype == "Q4_0" else _pack_q8_0)(q, d16)
    raw = gguf.GGMLQuantizationType.Q4_0 if qtype == "Q4_0" else gguf.GGMLQuantizationType.Q8_0
    return packed, raw, dict(info, type=qtype, exact=reason is None, reason=reason, **_errors(_decode(q, d16), w_hat))


def _errors(written: np.ndarray, w_hat: np.ndarray) -> dict:
    err = float(np.abs(written.astype(np.float64) - w_hat.astype(np.float64)).max()) if w_hat.size else 0.0
    top = float(np.abs(w_hat).max()) if w_hat.size else 0.0
    return {"max_abs_error": err, "max_rel_error": err / top if top > 0 else 0.0}


# --------------------------------------------------------------------------------------------------
# Model metadata


def _hparams(model, gguf_arch: str) -> dict:
    """The values llama.cpp reads from the HF config; refuses what the GGUF arch cannot express."""
    cfg = model.config
    get = lambda k, d=None: getattr(cfg, k, d)  # noqa: E731
    n_head = get("num_attention_heads")
    hidden = get("hidden_size")
    hp = {
        "context_length": get("max_position_embeddings"),
        "embedding_length": hidden,
        "block_count": get("num_hidden_layers"),
        "feed_forward_length": get("intermediate_size"),
        "head_count": n_head,
        "head_count_kv": get("num_key_value_heads") or n_head,
        "layer_norm_rms_epsilon": get("rms_norm_eps"),
        "vocab_size": get("vocab_size"),
    }
    missing = [k for k, v in hp.items() if v is None]
    if missing:
        raise ExportError(f"the model's config lacks {', '.join(missing)} (needed by llama.cpp)")
    hp["head_dim"] = get("head_dim") or hidden // n_head
    if get("hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={get('hidden_act')!r}: llama.cpp's {gguf_arch} arch runs SiLU (SwiGLU) only")
    rope = dict(get("rope_parameters") or {})
    if not rope:  # transformers < 5: rope_theta + rope_scaling
        rope = dict(get("rope_scaling") or {})
        rope.setdefault("rope_theta", get("rope_theta", 10000.0))
    hp["rope_theta"] = float(rope.get("rope_theta", 10000.0))
    hp["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    hp["rope"] = rope
    if hp["rope_type"] not in ("default", "linear", "llama3"):
        raise ExportError(f"RoPE scaling {hp['rope_type']!r} is not supported by the gguf exporter "
                          "(supported: none, 'linear', 'llama3')")
    if hp["rope_type"] == "llama3" and gguf_arch != "llama":
        raise ExportError(f"RoPE scaling 'llama3' needs the llama arch, got {gguf_arch}")
    return hp


def _llama3_rope_factors(hp: dict) -> np.ndarray:
    """Llama-3.1 RoPE scaling as llama.cpp's ``rope_freqs.weight``: float32 ``[head_dim / 2]``.

    llama.cpp divides each base frequency by its factor, so ``factor_i = inv_freq_i /
    inv_freq_scaled_i`` with ``inv_freq_scaled`` as HF's ``_compute_llama3_parameters``: low
    frequencies (wavelength > old_ctx / low_freq_factor) divided by ``factor``, high ones kept, the
    band between interpolated.
    """
    r, dim = hp["rope"], hp["head_dim"]
    factor, lo, hi = float(r.get("factor", 8.0)), float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (hp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = np.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return (inv_freq / scaled).astype(np.float32)


def _model_name(model) -> str:
    path = getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "")
    return os.path.basename(os.path.normpath(path)) if path else type(model).__name__


# --------------------------------------------------------------------------------------------------
# Writer


def write(model, layers: list[QuantLayer], dense: dict[str, torch.Tensor], out_dir: str, *,
          gguf_type: str = "auto", allow_inexact: bool = False, **options) -> dict:
    """Write ``out_dir/model.gguf`` (GGUF v3) from a converted LLaMA / Mistral / Qwen2 model.

    Args:
        model: the converted HF model (its ``config`` gives the metadata).
        layers: the quantised layers (:func:`~._common.collect_layers`), ``W_int`` ``[out, in]``.
        dense: the high-precision tensors by HF state-dict name (:func:`~._common.dense_state`).
        out_dir: directory holding the saved config and tokenizer; ``model.gguf`` is added to it.
        gguf_type: tensor type of the quantised layers, one of :data:`GGUF_TYPES`.
        allow_inexact: write the nearest encoding where no exact one exists (error in the report).

    Returns:
        The report: ``file``, ``arch``, ``file_type``, ``weights_exact`` (every quantised layer
        exact), ``tokenizer_exact`` (no allow_inexact tokenizer fallback), per-layer ``layers``
        (type, exact, reason, max_abs_error, max_rel_error), ``dense`` tensor types, ``vocab`` (the
        GGUF tokenizer), ``warnings``.

    Raises:
        ExportError: an unsupported architecture / option / tokenizer, or a layer with no exact
            encoding (without ``allow_inexact``).
    """
    validate_options(dict(options, gguf_type=gguf_type, allow_inexact=allow_inexact))
    gguf = _gguf()
    hf_arch = type(model).__name__
    if hf_arch not in ARCHITECTURES:
        raise ExportError(f"architecture {hf_arch} is not supported by the gguf exporter (supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[hf_arch]
    hp = _hparams(model, arch)
    warnings: list[str] = []
    window = getattr(model.config, "sliding_window", None)
    if window is not None and (hf_arch == "MistralForCausalLM" or getattr(model.config, "use_sliding_window", False)) \
            and window < hp["context_length"]:
        warnings.append(f"sliding_window={window}: llama.cpp's {arch} arch attends to the whole context, so sequences "
                        f"longer than {window} tokens are computed differently from HF")

    def perm_for(gname: str, n_rows: int) -> np.ndarray | None:
        if arch != "llama":
            return None
        if ".attn_q." in gname:
            return rope_row_permutation(n_rows, hp["head_count"])
        if ".attn_k." in gname:
            return rope_row_permutation(n_rows, hp["head_count_kv"])
        return None

    # Every tensor is named first: an unknown one is refused before anything is written.
    tensors: dict[str, tuple] = {}  # gguf name -> ("q", layer) | ("dense", tensor, type)
    for layer in layers:
        gname = _gguf_name(layer.name + ".weight")
        if gname is None:
            raise ExportError(f"layer {layer.name}: no GGUF tensor name for it in the {arch} arch")
        tensors[gname] = ("q", layer)
    # llama.cpp uses token_embd whenever output.weight is absent: a tied head is always omitted.
    head = plan_head(model, dense, layers, tie_word_embeddings=True)
    for key, t in dense.items():
        if head.omit and key == head.key:
            continue
        gname = _gguf_name(key)
        if gname is None:
            raise ExportError(f"tensor {key}: no GGUF tensor name for it in the {arch} arch")
        if gname in tensors:
            continue  # a quantised layer's weight
        ftype = "F32" if t.dim() == 1 else _float_type(t)  # norms and biases F32, as the converter
        tensors[gname] = ("dense", t, ftype)
    if "token_embd.weight" not in tensors:
        raise ExportError("the model has no model.embed_tokens.weight")
    if tensors["token_embd.weight"][1].shape[0] != hp["vocab_size"]:
        raise ExportError(f"embedding rows {tensors['token_embd.weight'][1].shape[0]} != vocab_size {hp['vocab_size']}")

    path = os.path.join(out_dir, GGUF_FILE)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(_model_name(model))
    w.add_quantized_by("lrqat_kernels")
    w.add_context_length(int(hp["context_length"]))
    w.add_embedding_length(int(hp["embedding_length"]))
    w.add_block_count(int(hp["block_count"]))
    w.add_feed_forward_length(int(hp["feed_forward_length"]))
    w.add_head_count(int(hp["head_count"]))
    w.add_head_count_kv(int(hp["head_count_kv"]))
    w.add_key_length(int(hp["head_dim"]))
    w.add_value_length(int(hp["head_dim"]))
    w.add_layer_norm_rms_eps(float(hp["layer_norm_rms_epsilon"]))
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_rope_dimension_count(int(hp["head_dim"]))
    w.add_vocab_size(int(hp["vocab_size"]))
    if hp["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["rope"]["factor"]))
    tok_info, tok_warnings = add_vocab(w, out_dir, arch, int(hp["vocab_size"]), allow_inexact)
    warnings += tok_warnings

    layer_info, dense_info, counts, flagged = {}, {}, {}, []
    for gname in _tensor_order(tensors, hp["block_count"]):
        kind, *rest = tensors[gname]
        if kind == "q":
            layer = rest[0]
            arr, raw, info = _encode_layer(layer, perm_for(gname, layer.out_features), gguf_type, allow_inexact)
            layer_info[gname] = info
            counts[info["type"]] = counts.get(info["type"], 0) + layer.w_int.numel()
            if info["reason"]:
                flagged.append(info)
        else:
            t, ftype = rest
            perm = perm_for(gname, t.shape[0])
            if perm is not None:
                t = t[torch.from_numpy(perm)]
            arr, raw = _dense_array(t, ftype)
            dense_info[gname] = ftype
        w.add_tensor(gname, arr, raw_dtype=raw)
    if hp["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(hp))
        dense_info["rope_freqs.weight"] = "F32"
    warnings += _inexact_warnings(flagged, len(layers))
    file_type = _file_type(counts, dense_info.get("token_embd.weight", "F32"))
    w.add_file_type(int(getattr(gguf.LlamaFileType, file_type)))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()

    all_scales = torch.cat([l.scale.reshape(-1) for l in layers]) if layers else torch.empty(0)
    return {
        "file": GGUF_FILE,
        "bytes": os.path.getsize(path),
        "arch": arch,
        "gguf_type": gguf_type,
        "file_type": file_type,
        # weights_exact: every quantised layer reads back as s * (W_int - z); tokenizer_exact: the
        # tokenizer was written without an allow_inexact fallback (gguf_vocab.add_vocab).
        "weights_exact": all(i["exact"] for i in layer_info.values()),
        "tokenizer_exact": bool(tok_info.get("exact", True)),
        "allow_inexact": allow_inexact,
        "tensor_types": {t: sum(1 for i in layer_info.values() if i["type"] == t) for t in sorted(counts)},
        "layers": layer_info,
        "dense": dense_info,
        "rope": hp["rope_type"],
        "scale_rounding": scale_rounding(all_scales, torch.float16),
        "vocab": tok_info,
        "gguf_version": _gguf_version(),
        "warnings": warnings,
    }


def _inexact_warnings(flagged: list[dict], n_layers: int) -> list[str]:
    """One warning per written type for the layers allow_inexact let through (details per layer in
    the report's ``layers``), e.g. ``3 of 14 layers written as Q8_0 (not exact): max weight error ...``."""
    out = []
    for qtype in sorted({i["type"] for i in flagged}):
        group = [i for i in flagged if i["type"] == qtype]
        worst = max(group, key=lambda i: i["max_rel_error"])
        if qtype == "F32":  # exact, only larger
            out.append(f"{len(group)} of {n_layers} layers stored dense F32 (no block type holds them), "
                       f"e.g. {worst['hf_name']}: {worst['reason']}")
            continue
        out.append(f"{len(group)} of {n_layers} layers written as {qtype} (not exact): max weight error "
                   f"{worst['max_abs_error']:.3g} = {worst['max_rel_error']:.3g} of the layer's largest weight, in "
                   f"{worst['hf_name']} ({worst['reason']})")
    return out


def _tensor_order(tensors: dict, n_blocks: int) -> list[str]:
    """token_embd, then block by block in the converter's order, then output_norm, output."""
    rank = {n: i for i, n in enumerate(("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                         "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"))}

    def key(name):
        parts = name.split(".")
        if parts[0] == "token_embd":
            return (0, 0, 0, name)
        if parts[0] == "blk":
            return (1, int(parts[1]), rank.get(parts[2], 99), name)
        return (2, 0, 0 if parts[0] == "output_norm" else 1, name)

    return sorted(tensors, key=key)


def _file_type(counts: dict, embed_type: str) -> str:
    """``general.file_type``: the type holding most quantised weights (informational in llama.cpp)."""
    if not counts:
        return {"F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}.get(embed_type, "ALL_F32")
    top = max(counts, key=counts.get)
    return {"Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "F32": "ALL_F32"}[top]


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # pragma: no cover
        return "unknown"
