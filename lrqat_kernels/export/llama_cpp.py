"""Run a GGUF file in llama.cpp (through llama-cpp-python): logits and perplexity.

Used by the tests (``tests/test_export_gguf.py`` part 3) and the SmolLM2 demo to compare llama.cpp
with the converted model on the same tokens. Needs ``pip install llama-cpp-python``.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

__all__ = ["llama_cpp_logits", "llama_cpp_perplexity"]


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
