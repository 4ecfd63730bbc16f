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
saved into ``out_dir``) goes into the GGUF as llama.cpp's converter writes it. The checks:
``tests/test_export_gguf.py`` (gguf-py's reader for every tensor bit for bit, llama.cpp itself for
logits, tokenization, generation and perplexity).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time

import numpy as np
import torch

from ._common import ExportError, QuantLayer, scale_rounding

__all__ = ["write", "GGUF_TYPES", "ARCHITECTURES", "QK", "GGUF_FILE", "rope_row_permutation",
           "llama_cpp_logits", "llama_cpp_perplexity"]

GGUF_FILE = "model.gguf"
#: ``gguf_type`` values: ``auto`` = smallest exact block type per layer.
GGUF_TYPES = ("auto", "Q4_0", "Q8_0", "F32", "F16")
#: HF architecture -> GGUF architecture (llama.cpp's converter maps Mistral to ``llama`` too).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
#: Weights per Q4_0 / Q8_0 block (ggml's QK4_0 = QK8_0 = 32).
QK = 32
_OPTIONS = ("gguf_type", "allow_inexact")

# HF module / parameter names -> GGUF tensor names (gguf-py constants.py TENSOR_NAMES, LLAMA / QWEN2).
_BLOCK_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_MODULES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")

# llama.cpp's pre-tokenizer probe (convert_hf_to_gguf.py / conversion/base.py get_vocab_base_pre,
# llama.cpp 0c1e570): the sha256 of str(tokenizer.encode(probe)) names the pre-tokenizer.
_PRE_PROBE = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501
# The probe hashes of the tokenizers of LLaMA / Mistral / Qwen2-architecture models, from the same
# table (the reference model in each comment).
_KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B-Instruct
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # DeepSeek-R1-Distill-Qwen-1.5B
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",  # Infinigence/Megrez-3B-Instruct
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # mistral-community/pixtral-12b
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the export extra installs it
        raise ExportError("format 'gguf' needs the gguf package (pip install gguf, or the [export] extra)") from e
    return gguf


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


def _requantize(w: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Nearest block encoding of a dense float32 ``[out, in]`` (only under allow_inexact).

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
        raise ExportError(f"weights up to {float(np.abs(w).max()):.4g} overflow the fp16 block scale of {qtype}")
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
    s = layer.scale.numpy()
    scale_inexact = bool((s.astype(np.float16).astype(np.float32) != s).any())
    return reasons, scale_inexact


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
            n_bad = int((scale.astype(np.float16).astype(np.float32) != scale).sum())
            hint = (f" ({n_bad} of {scale.size} scales are not fp16 values)" if any(found[t][1] for t in candidates) else "")
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
            q, d16 = _requantize(w_hat, qtype)
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
# Tokenizer


def _looks_special(text: str) -> bool:
    """llama.cpp's converter marks these added tokens CONTROL even when HF does not call them special."""
    return (text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _set_add_special(special, tok) -> None:
    """``add_bos_token`` / ``add_eos_token`` as the HF tokenizer behaves: whether ``encode`` (with
    special tokens) puts BOS first / EOS last. gguf's SpecialVocab infers them from the files and
    leaves them unset for some tokenizers; llama.cpp then uses its own per-vocab defaults."""
    ids = tok.encode("a b", add_special_tokens=True)
    for typ, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id)):
        adds = tid is not None and bool(ids) and ids[0 if typ == "bos" else -1] == tid
        special.add_special_token[typ] = adds


def _pre_from_structure(tj: dict) -> str | None:
    """llama.cpp's name for a pre-tokenizer it implements, read off ``tokenizer.json``.

    ``ByteLevel`` with the GPT-2 regex and no prefix space -> ``gpt-2``; individual digits, then
    that -> ``smollm`` (llama.cpp's regex lists for both, src/llama-vocab.cpp); anything else: None.
    """
    if tj.get("normalizer"):
        return None

    def gpt2_bytelevel(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    pt = tj.get("pre_tokenizer") or {}
    if gpt2_bytelevel(pt):
        return "gpt-2"
    parts = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
            and gpt2_bytelevel(parts[1])):
        return "smollm"
    return None


def _add_bpe_vocab(w, out_dir: str, n_vocab: int, allow_inexact: bool) -> tuple[dict, list[str]]:
    """GPT-2-style byte-level BPE (``tokenizer.ggml.model = "gpt2"``), as the converter's
    ``_set_vocab_gpt2``: tokens padded to ``n_vocab`` with ``[PAD<i>]`` (UNUSED), added tokens
    CONTROL (special) or USER_DEFINED, ``tokenizer.ggml.pre`` from the probe hash or the structure."""
    gguf = _gguf()
    from transformers import AutoTokenizer

    with open(os.path.join(out_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has token id {max(vocab.values())}, the model's vocab_size is {n_vocab}")
    rev = {i: t for t, i in vocab.items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in rev:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = rev[i]
        if text in added:
            if not decoder[i].normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or _looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    digest = hashlib.sha256(str(tok.encode(_PRE_PROBE)).encode()).hexdigest()
    warnings = []
    if digest in _KNOWN_PRE:
        pre, source = _KNOWN_PRE[digest], "llama.cpp probe hash"
    elif (pre := _pre_from_structure(tj)) is not None:
        source = "tokenizer.json pre_tokenizer"
    elif allow_inexact:
        pre, source = "default", "fallback"
        warnings.append(f"the tokenizer's pre-tokenizer is not one llama.cpp knows (probe hash {digest}); "
                        "written as 'default': llama.cpp may split text into other tokens than HF")
    else:
        raise ExportError(f"the tokenizer's pre-tokenizer is not one llama.cpp knows (probe hash {digest}; "
                          f"pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}): llama.cpp would split text "
                          "differently; pass allow_inexact=True to write it as 'default' with a warning")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(out_dir, load_merges=True, n_vocab=n_vocab)
    _set_add_special(special, tok)
    special.add_to_gguf(w, quiet=True)
    return {"model": "gpt2", "pre": pre, "pre_source": source, "probe_hash": digest, "tokens": len(tokens),
            "merges": len(special.merges), "special_token_ids": dict(special.special_token_ids)}, warnings


def _add_llama_vocab(w, out_dir: str, n_vocab: int, vocab) -> dict:
    """SentencePiece-style vocab (``tokenizer.ggml.model = "llama"``): tokens, scores, types, padded
    to ``n_vocab`` with ``[PAD<i>]`` (UNUSED, score -1000) as the converter pads."""
    gguf = _gguf()
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens, the model's vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(out_dir, n_vocab=n_vocab)
    from transformers import AutoTokenizer

    _set_add_special(special, AutoTokenizer.from_pretrained(out_dir, local_files_only=True))
    special.add_to_gguf(w, quiet=True)
    return {"model": "llama", "pre": "default", "source": type(vocab).__name__, "tokens": len(tokens),
            "special_token_ids": dict(special.special_token_ids)}


def _add_vocab(w, out_dir: str, gguf_arch: str, n_vocab: int, allow_inexact: bool) -> tuple[dict, list[str]]:
    """The tokenizer saved in ``out_dir``, chosen as llama.cpp's converter chooses: SentencePiece
    (``tokenizer.model``), then (llama arch) a byte-fallback HF BPE as ``llama``, then byte-level BPE."""
    gguf = _gguf()
    from pathlib import Path

    has = lambda f: os.path.isfile(os.path.join(out_dir, f))  # noqa: E731
    if has("tokenizer.model"):
        try:
            return _add_llama_vocab(w, out_dir, n_vocab, gguf.SentencePieceVocab(Path(out_dir))), []
        except RuntimeError as e:  # sentencepiece is missing
            if not has("tokenizer.json"):
                raise ExportError(f"the tokenizer is SentencePiece (tokenizer.model): {e}") from e
    if not has("tokenizer.json"):
        raise ExportError(
            "format 'gguf' needs the model's tokenizer (llama.cpp and ollama tokenize text with the one in the "
            "file): pass tokenizer=<tokenizer or directory> (--tokenizer DIR); none was found in the export "
            "(tokenizer.json or tokenizer.model)")
    with open(os.path.join(out_dir, "tokenizer.json"), encoding="utf-8") as f:
        model_json = json.load(f).get("model", {})
    if model_json.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model_json.get('type')!r} is not supported (BPE or SentencePiece)")
    if model_json.get("byte_fallback"):
        # llama.cpp's converter writes such a tokenizer.json as a SentencePiece vocab with placeholder
        # scores (gguf.LlamaHfVocab); llama.cpp's SPM tokenizer then merges by those scores, not by
        # HF's merge ranks (tests/test_export_gguf.py::test_byte_fallback_bpe_needs_allow_inexact).
        if gguf_arch != "llama":
            raise ExportError(f"a byte-fallback BPE tokenizer is written for the llama arch only, got {gguf_arch}")
        what = ("the tokenizer is a byte-fallback BPE tokenizer.json without a usable tokenizer.model: GGUF holds it "
                "as a SentencePiece vocab without merge ranks, so llama.cpp may split text into other tokens than HF")
        if not allow_inexact:
            raise ExportError(f"{what}; pass allow_inexact=True to write it anyway (warning), or provide "
                              "tokenizer.model with the sentencepiece package installed")
        try:
            return _add_llama_vocab(w, out_dir, n_vocab, gguf.LlamaHfVocab(Path(out_dir))), [what]
        except (FileNotFoundError, TypeError) as e:
            raise ExportError(f"byte-fallback BPE tokenizer not readable as llama.cpp's 'llama' vocab: {e}") from e
    return _add_bpe_vocab(w, out_dir, n_vocab, allow_inexact)


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
        The report: ``file``, ``arch``, ``file_type``, ``exact``, per-layer ``layers`` (type, exact,
        reason, max_abs_error, max_rel_error), ``dense`` tensor types, ``vocab`` (the GGUF tokenizer),
        ``warnings``.

    Raises:
        ExportError: an unsupported architecture / option / tokenizer, or a layer with no exact
            encoding (without ``allow_inexact``).
    """
    if options:
        raise ExportError(f"gguf: unknown option(s) {', '.join(sorted(options))}; allowed: {', '.join(_OPTIONS)}")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if not isinstance(allow_inexact, bool):
        raise ExportError(f"allow_inexact must be a bool, got {allow_inexact!r}")
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
    quant_names = {l.name for l in layers}
    embed = dense.get("model.embed_tokens.weight")
    for key, t in dense.items():
        if key == "lm_head.weight" and "lm_head" not in quant_names and embed is not None and torch.equal(t, embed):
            continue  # tied: llama.cpp uses token_embd when output.weight is absent
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
    tok_info, tok_warnings = _add_vocab(w, out_dir, arch, int(hp["vocab_size"]), allow_inexact)
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
        "exact": all(i["exact"] for i in layer_info.values()),
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


# --------------------------------------------------------------------------------------------------
# llama.cpp runtime helpers (llama-cpp-python)


def _load_llama(gguf_path: str, n_ctx: int, n_threads: int | None, kv_f32: bool):
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("llama.cpp's Python binding is needed: pip install llama-cpp-python") from e
    kw = dict(model_path=os.fspath(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
              verbose=False, seed=0)
    if n_threads is not None:
        kw.update(n_threads=n_threads, n_threads_batch=n_threads)
    if kv_f32:
        kw.update(type_k=0, type_v=0)  # GGML_TYPE_F32: no fp16 rounding of K and V
    return Llama(**kw)


def llama_cpp_logits(gguf_path: str, ids, *, n_threads: int | None = None, kv_f32: bool = True, llm=None) -> np.ndarray:
    """llama.cpp's logits for one token sequence, evaluated in one batch from an empty cache.

    Args:
        gguf_path: the GGUF file.
        ids: int sequence ``[T]``.
        kv_f32: F32 KV cache (llama.cpp's default is F16).
        llm: an already loaded ``llama_cpp.Llama`` (created with ``logits_all=True``) to reuse.

    Returns:
        float32 ``[T, vocab]``: row ``t`` predicts token ``t + 1``.
    """
    ids = [int(i) for i in ids]
    own = llm is None
    if own:
        llm = _load_llama(gguf_path, max(len(ids), 8), n_threads, kv_f32)
    try:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        if own:
            llm.close()


def llama_cpp_perplexity(gguf_path: str, ids, seq_len: int, n_threads: int | None = None, *,
                         max_windows: int | None = None, kv_f32: bool = False) -> dict:
    """Perplexity of a GGUF model in llama.cpp, on the windows :func:`lrqat_kernels.data.evaluate_perplexity` uses.

    Non-overlapping windows of ``seq_len`` tokens (the last partial one dropped), each scored from
    an empty cache: ``seq_len - 1`` predicted tokens per window, ``ppl = exp(total NLL / tokens)``
    with the log-softmax in float64. No BOS is added (the ids are used as given).

    Args:
        gguf_path: the GGUF file.
        ids: int64 ``[n]`` token ids (a torch tensor, numpy array or list).
        seq_len: window length (<= the model's context length).
        n_threads: llama.cpp threads (default: llama-cpp-python's).
        max_windows: score only the first windows.
        kv_f32: F32 KV cache (default: llama.cpp's F16, as served).

    Returns:
        ``{"metric", "perplexity", "nll", "window", "windows", "tokens", "backend", "seconds"}``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    ids = np.asarray(ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
    n = ids.size // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"held-out text has {ids.size} tokens, fewer than one window of {seq_len}")
    t0 = time.perf_counter()
    llm = _load_llama(gguf_path, seq_len, n_threads, kv_f32)
    total, count = 0.0, 0
    try:
        for j in range(n):
            win = ids[j * seq_len:(j + 1) * seq_len]
            logits = llama_cpp_logits(gguf_path, win, llm=llm).astype(np.float64)[:-1]
            m = logits.max(-1, keepdims=True)
            logz = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
            total += float((logz - logits[np.arange(seq_len - 1), win[1:]]).sum())
            count += seq_len - 1
    finally:
        llm.close()
    mean = total / count
    return {
        "metric": f"perplexity (non-overlapping windows of {seq_len} tokens)",
        "perplexity": math.exp(mean),
        "nll": mean,
        "window": seq_len,
        "windows": n,
        "tokens": count,
        "backend": "llama.cpp",
        "seconds": time.perf_counter() - t0,
    }
