"""Text data for LR-QAT training and evaluation: loading, tokenising, deterministic batching, perplexity.

Tokeniser: the model directory's HF tokenizer when it has one (``tokenizer.json``,
``tokenizer_config.json`` or ``tokenizer.model``), else :class:`ByteTokenizer`, a byte-level
fallback: token id = UTF-8 byte value (0..255), no special tokens, so the model's
``vocab_size`` must be >= 256. A model directory written by this package with the byte
tokenizer carries ``lrqat_tokenizer.json`` (``{"type": "byte"}``). The fallback on a model whose
vocabulary is larger than 256 is almost surely a model directory without its tokenizer files:
``lrqat eval`` / ``lrqat train`` refuse it unless ``--byte-tokens`` (:func:`check_byte_fallback`).

Batches are contiguous windows of ``seq_len`` tokens from the token stream, cut at
non-overlapping offsets; their order is a permutation drawn from ``seed + epoch``, so the
``k``-th sample is a pure function of ``(seed, k)`` and training resumes exactly from a sample
counter.
"""

from __future__ import annotations

import json
import math
import os

import torch

__all__ = [
    "ByteTokenizer",
    "load_tokenizer",
    "check_byte_fallback",
    "read_text",
    "tokenize",
    "WindowSampler",
    "evaluate_perplexity",
]

BYTE_TOKENIZER_FILE = "lrqat_tokenizer.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    """Byte-level fallback tokenizer: ids are the UTF-8 bytes of the text (vocab 256)."""

    vocab_size = 256
    name = "byte"

    def __init__(self, fallback: bool = False):
        self.fallback = fallback  # True: chosen because the model directory has no tokenizer files

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BYTE_TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump({"type": "byte", "vocab_size": 256}, f)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


def load_tokenizer(model_dir: str | None):
    """The HF tokenizer saved in ``model_dir`` if any, else :class:`ByteTokenizer`."""
    if model_dir is not None and os.path.isdir(model_dir):
        if os.path.isfile(os.path.join(model_dir, BYTE_TOKENIZER_FILE)):
            return ByteTokenizer()
        if any(os.path.isfile(os.path.join(model_dir, f)) for f in _HF_TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return ByteTokenizer(fallback=True)


def check_byte_fallback(tokenizer, vocab_size: int | None, model_dir: str, allow: bool = False) -> None:
    """Refuse the byte-level fallback (no tokenizer files in ``model_dir``) for a model whose
    ``vocab_size`` exceeds 256, unless ``allow`` (``--byte-tokens``): such a model was trained on
    another tokenizer, and its perplexity on (or training with) UTF-8 bytes means nothing."""
    if (isinstance(tokenizer, ByteTokenizer) and getattr(tokenizer, "fallback", False) and not allow
            and isinstance(vocab_size, int) and vocab_size > 256):
        raise ValueError(
            f"--model {model_dir} has no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)}) and its vocab_size="
            f"{vocab_size} > 256: the byte-level fallback would feed it UTF-8 bytes as token ids; copy the model's "
            "tokenizer files into the directory, or pass --byte-tokens if the model really reads bytes"
        )


def read_text(path: str) -> str:
    """A text file, or every ``*.txt`` file of a directory (sorted by name, joined by blank lines)."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise ValueError(f"directory {path} holds no .txt files")
        parts = []
        for f in files:
            with open(os.path.join(path, f), encoding="utf-8", errors="replace") as fh:
                parts.append(fh.read())
        return "\n\n".join(parts)
    if not os.path.isfile(path):
        raise ValueError(f"data path {path} is neither a file nor a directory")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def tokenize(text: str, tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` as int64 ``[n]``; checks the ids fit ``vocab_size`` when given."""
    if isinstance(tokenizer, ByteTokenizer):
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
    else:
        ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.int64)
    if vocab_size is not None and ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(
            f"token id {int(ids.max())} does not fit the model's vocab_size={vocab_size} "
            f"(tokenizer {tokenizer!r}); the byte-level fallback needs vocab_size >= 256"
        )
    return ids


class WindowSampler:
    """Deterministic batches of ``seq_len``-token windows cut from a token stream.

    Window ``j`` is ``ids[j * seq_len : (j + 1) * seq_len]`` (non-overlapping). Sample ``k``
    (counted over the whole run) is window ``perm_e[k mod n]`` with ``e = k // n`` and
    ``perm_e`` a permutation seeded by ``seed + e``: the batch stream depends only on
    ``(seed, k)``, so a run resumes exactly from ``k`` alone.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int = 0):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.n_windows = ids.numel() // seq_len
        if self.n_windows < 1:
            raise ValueError(f"the data holds {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
        self.windows = ids[: self.n_windows * seq_len].view(self.n_windows, seq_len)
        self.seq_len, self.seed = seq_len, seed
        self._perm_epoch, self._perm = None, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g), epoch
        return self._perm

    def batch(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Samples ``start .. start + batch_size - 1`` as int64 ``[batch_size, seq_len]``; with
        ``world_size`` ranks, rank ``rank``'s slice of them: ``[batch_size / world_size, seq_len]``,
        samples ``start + rank * b .. start + (rank + 1) * b - 1`` with ``b = batch_size / world_size``
        (the ranks' slices together are the 1-rank batch: tests/test_distributed.py)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
        local = batch_size // world_size
        start += rank * local
        rows = []
        for k in range(start, start + local):
            epoch, i = divmod(k, self.n_windows)
            rows.append(int(self._perm_for(epoch)[i]))
        return self.windows[rows]


@torch.no_grad()
def evaluate_perplexity(model, ids: torch.Tensor, seq_len: int, batch_size: int = 8, device=None, max_windows: int | None = None) -> dict:
    """Perplexity on non-overlapping windows of ``seq_len`` tokens (the last partial window is dropped).

    Each window is scored on its own (no context carried across windows): ``seq_len - 1``
    predicted tokens per window. ``ppl = exp(total NLL / predicted tokens)``.

    Args:
        model: causal LM returning ``.logits`` ``[B, T, V]`` (HF) or a logits tensor.
        ids: int64 ``[n]`` token ids.

    Returns:
        ``{"metric", "perplexity", "nll", "window", "windows", "tokens"}``.
    """
    for name, v, least in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be None or an int >= 1, got {max_windows!r}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    device = device or next(iter(model.parameters())).device
    windows = ids[: n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, n, batch_size):
            x = windows[i : i + batch_size].to(device)
            hf = getattr(getattr(model, "config", None), "use_cache", None) is not None
            out = model(x, use_cache=False) if hf else model(x)  # no KV cache to build
            logits = out.logits if hasattr(out, "logits") else out
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
            total += float(nll.double().sum())
            count += nll.numel()
    finally:
        model.train(was_training)
    mean = total / count
    return {
        "metric": f"perplexity (non-overlapping windows of {seq_len} tokens)",
        "perplexity": math.exp(mean),
        "nll": mean,
        "window": seq_len,
        "windows": n,
        "tokens": count,
    }
