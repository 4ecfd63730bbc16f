"""The tokenizer of a GGUF file, written as llama.cpp's converter (``convert_hf_to_gguf.py``) writes it.

:func:`add_vocab` reads the tokenizer files :func:`~lrqat_kernels.export.export` saved into the
output directory and adds the GGUF vocab (``tokenizer.ggml.*``) to a ``gguf.GGUFWriter``:
SentencePiece (``tokenizer.model``) as ``llama``, a byte-fallback BPE ``tokenizer.json`` as
``llama`` (only under ``allow_inexact``), a byte-level BPE as ``gpt2`` with ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import hashlib
import json
import os

from ._common import ExportError

__all__ = ["add_vocab", "gguf_package"]

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


def gguf_package():
    """The installed ``gguf`` package (llama.cpp's gguf-py)."""
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the export extra installs it
        raise ExportError("format 'gguf' needs the gguf package (pip install gguf, or the [export] extra)") from e
    return gguf


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
    gguf = gguf_package()
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
            "merges": len(special.merges), "special_token_ids": dict(special.special_token_ids),
            "exact": source != "fallback"}, warnings


def _add_llama_vocab(w, out_dir: str, n_vocab: int, vocab, exact: bool) -> dict:
    """SentencePiece-style vocab (``tokenizer.ggml.model = "llama"``): tokens, scores, types, padded
    to ``n_vocab`` with ``[PAD<i>]`` (UNUSED, score -1000) as the converter pads. ``exact`` goes
    into the returned info (False for a byte-fallback BPE without merge ranks)."""
    gguf = gguf_package()
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
            "special_token_ids": dict(special.special_token_ids), "exact": exact}


def add_vocab(w, out_dir: str, gguf_arch: str, n_vocab: int, allow_inexact: bool) -> tuple[dict, list[str]]:
    """Add the tokenizer saved in ``out_dir`` to the GGUFWriter ``w``, chosen as llama.cpp's
    converter chooses: SentencePiece (``tokenizer.model``), then (llama arch) a byte-fallback HF BPE
    as ``llama``, then byte-level BPE.

    Returns:
        ``(info, warnings)``: ``info`` describes the GGUF vocab; ``info["exact"]`` is False when the
        tokenizer was written although llama.cpp may split text differently from HF (allowed only
        by ``allow_inexact``: a pre-tokenizer llama.cpp does not know, a byte-fallback BPE).
    """
    gguf = gguf_package()
    from pathlib import Path

    has = lambda f: os.path.isfile(os.path.join(out_dir, f))  # noqa: E731
    if has("tokenizer.model"):
        try:
            return _add_llama_vocab(w, out_dir, n_vocab, gguf.SentencePieceVocab(Path(out_dir)), True), []
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
            return _add_llama_vocab(w, out_dir, n_vocab, gguf.LlamaHfVocab(Path(out_dir)), False), [what]
        except (FileNotFoundError, TypeError) as e:
            raise ExportError(f"byte-fallback BPE tokenizer not readable as llama.cpp's 'llama' vocab: {e}") from e
    return _add_bpe_vocab(w, out_dir, n_vocab, allow_inexact)
