"""What every export format shares: the converted layers as integers, bit packing, scale checks.

A converted model (``lrqat_kernels.convert``) holds, per quantised linear, ``W_int`` on the signed
``bits``-bit grid, an fp32 scale ``s`` and an optional integer zero point ``z`` per output channel
or per group of ``group_size`` consecutive input columns, with ``W_hat = s * (W_int - z)``
(``docs/NUMERICS.md``). The format writers (``compressed_tensors.py``, ``gguf.py``, ``gptq.py``)
start from :class:`QuantLayer` and never look at the modules.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn as nn

from ..formats import qrange

__all__ = [
    "ExportError",
    "QuantLayer",
    "HeadPlan",
    "check_options",
    "collect_layers",
    "dense_state",
    "plan_head",
    "pack_bitstream",
    "unpack_bitstream",
    "save_safetensors",
    "scale_rounding",
    "UNIT_ROUNDOFF",
]

#: Largest relative change round-to-nearest makes to a value in the type's normal range (half an
#: ulp relative to 1: 2^-11 for fp16, 2^-8 for bf16). Below the normal range (fp16 < 6.1e-5) a
#: value can move much more: callers that promise this bound must check ``max_rel_error``.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


class ExportError(ValueError):
    """A model or an option a format cannot hold; the message names the layer and what is allowed."""


def check_options(fmt: str, options: dict, allowed) -> None:
    """Refuse option names a format's writer does not take (one message format for every writer).

    Raises:
        ExportError: ``"<fmt>: unknown option 'x'; allowed: a, b"`` (``options 'x', 'y'`` for several).
    """
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        what = "option" if len(unknown) == 1 else "options"
        raise ExportError(f"{fmt}: unknown {what} {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


@dataclasses.dataclass
class QuantLayer:
    """One converted linear, as integers.

    Attributes:
        name: module name in the model (``model.layers.0.self_attn.q_proj``).
        w_int: int8 ``[out, in]``, values in ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``.
        scale: float32 ``[out, G]`` (``G = in // group_size``; 1 per-channel).
        zero_point: None (symmetric) or int8 ``[out, G]`` in ``[qmin, qmax]``.
        bits: 2..8.
        group_size: None for per-channel, else the number of consecutive input columns a scale covers.
        bias: None or float ``[out]``.
    """

    name: str
    w_int: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int | None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.w_int.shape[0]

    @property
    def in_features(self) -> int:
        return self.w_int.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def group(self) -> int:
        """Columns a scale covers: ``group_size``, or ``in_features`` per-channel."""
        return self.in_features if self.group_size is None else self.group_size

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """``[out, G]`` -> ``[out, in]``, each group's value repeated over its columns."""
        return t.repeat_interleave(self.group, dim=1)

    def w_hat(self, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s * (W_int - z)`` ``[out, in]`` computed in ``scale_dtype`` with ``s`` rounded to it.

        ``W_int - z`` is a small integer, exact in any float dtype, so one rounding (the product)
        gives the result: what a reader that stores ``s`` in ``scale_dtype`` computes.
        """
        q = self.w_int.to(scale_dtype)
        if self.zero_point is not None:
            q = q - self.expand(self.zero_point.to(scale_dtype))
        return q * self.expand(self.scale.to(scale_dtype))

    def check(self) -> None:
        """Raise :class:`ExportError` when the integers leave the grid (a packer would spill them
        into the neighbouring field) or the tensors disagree in shape."""
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ExportError(f"layer {self.name}: bits must be in 2..8, got {self.bits!r}")
        qmin, qmax = qrange(self.bits)
        n_groups = self.in_features // self.group
        if self.in_features % self.group:
            raise ExportError(f"layer {self.name}: in_features={self.in_features} is not a multiple of group_size={self.group}")
        if tuple(self.scale.shape) != (self.out_features, n_groups):
            raise ExportError(f"layer {self.name}: scale is {tuple(self.scale.shape)}, expected {(self.out_features, n_groups)}")
        for what, t in (("W_int", self.w_int), ("zero_point", self.zero_point)):
            if t is None or t.numel() == 0:
                continue
            lo, hi = int(t.min()), int(t.max())
            if lo < qmin or hi > qmax:
                raise ExportError(f"layer {self.name}: {what} holds values in [{lo}, {hi}], outside the {self.bits}-bit grid [{qmin}, {qmax}]")
        if not torch.isfinite(self.scale).all() or (self.scale <= 0).any():
            raise ExportError(f"layer {self.name}: scales must be finite and positive")


def collect_layers(model: nn.Module) -> list[QuantLayer]:
    """Every :class:`~lrqat_kernels.QuantizedLinear` of a converted model, as :class:`QuantLayer`, in module order."""
    from ..modules import QuantizedLinear

    layers = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            if getattr(m, "offset", None) is not None:
                raise ExportError(f"layer {name!r} has a float offset per group (method='l4q': W_hat = s * W_int + b); "
                                  "no export format holds it exactly yet")
            if getattr(m, "input_step", None) is not None:
                raise ExportError(f"layer {name!r} quantises its input statically (method='peqat' smoothing and clip); "
                                  "exporting static activation scales is not supported yet")
            layer = QuantLayer(
                name=name,
                w_int=m.w_int.detach().cpu(),
                scale=m.scale.detach().to(device="cpu", dtype=torch.float32),
                zero_point=None if m.zero_point is None else m.zero_point.detach().cpu().to(torch.int8),
                bits=int(m.bits),
                group_size=m.group_size,
                bias=None if m.bias is None else m.bias.detach().cpu(),
            )
            layer.check()
            layers.append(layer)
    return layers


def dense_state(model: nn.Module, layers: list[QuantLayer]) -> dict[str, torch.Tensor]:
    """The model's persistent tensors that stay in high precision (embeddings, norms, an excluded
    head, biases of quantised layers), keyed by their state-dict names, on the CPU.

    A tensor shared under several names (tied embeddings) appears under each name; writers that
    cannot store shared tensors keep the first.
    """
    quant = {l.name for l in layers}
    out = {}
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in quant and leaf != "bias":
            continue
        out[key] = t.detach().cpu()
    return out


@dataclasses.dataclass
class HeadPlan:
    """How a writer stores the output embedding (the rule every format follows: :func:`plan_head`).

    Attributes:
        key: the head's weight key (``lm_head.weight``), None when the model has no head / embedding.
        how: ``"tied"`` (the input embedding's tensor, or equal to it), ``"dense"`` (its own
            high-precision tensor), ``"quantised"`` (a quantised layer) or ``"none"``.
        omit: leave the head's tensor out; the reader ties it back to the embedding.
        untie: the checkpoint's config must say ``tie_word_embeddings: false`` (it said true, but the
            head is its own tensor: a reader would overwrite it with the embedding).
    """

    key: str | None
    how: str
    omit: bool
    untie: bool

    def note(self) -> str | None:
        """The report line when the config is changed, else None."""
        if not self.untie:
            return None
        return f"{self.key} is not the input embedding ({self.how}): config.json says tie_word_embeddings=false"


def plan_head(model: nn.Module, dense: dict[str, torch.Tensor], layers: list[QuantLayer],
              tie_word_embeddings: bool) -> HeadPlan:
    """Where the output head goes, from what the tensors are and what the config says.

    - tied (same storage as the input embedding, or equal values) and the config says tied:
      omitted, as HF's ``save_pretrained`` writes a tied head (once, under the embedding's name);
    - tied but the config says untied: written under its own name (a reader would otherwise
      leave it uninitialised);
    - its own tensor (dense or quantised) while the config says tied: written, and the config
      must be changed to untied (``untie``), else the reader re-ties it to the embedding.

    ``tests/test_export_ct.py::test_tied_head_written_as_hf_writes_it`` and
    ``tests/test_export_gptq.py::test_head_follows_storage_and_config`` hold the rule.

    Args:
        model: the converted model (``get_output_embeddings`` / ``get_input_embeddings``).
        dense: its high-precision tensors by state-dict name (:func:`dense_state`).
        layers: its quantised layers.
        tie_word_embeddings: what the checkpoint's config says. GGUF passes True: llama.cpp uses
            the token embedding whenever ``output.weight`` is absent.
    """
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_out() if callable(get_out) else None
    emb = get_in() if callable(get_in) else None
    key, how = None, "none"
    if head is not None and emb is not None:
        names = {id(m): n for n, m in model.named_modules()}
        head_name, emb_key = names.get(id(head)), f"{names.get(id(emb))}.weight"
        if head_name is not None and head_name in {l.name for l in layers}:
            key, how = f"{head_name}.weight", "quantised"
        elif head_name is not None and f"{head_name}.weight" in dense and emb_key in dense:
            key = f"{head_name}.weight"
            a, b = dense[key], dense[emb_key]
            same = a.shape == b.shape and a.dtype == b.dtype and (
                (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b))
            how = "tied" if same else "dense"
    tie = bool(tie_word_embeddings)
    return HeadPlan(key=key, how=how, omit=how == "tied" and tie, untie=tie and how in ("dense", "quantised"))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write ``tensors`` to ``path`` as safetensors, fsynced, with the permissions ``open()`` gives.

    Tensors sharing storage are written as separate copies (safetensors refuses shared storage;
    which names to leave out is the writer's decision, e.g. :func:`plan_head`). safetensors
    creates the file owner-only (0600); it gets ``0666 & ~umask`` like every other exported file.
    """
    from safetensors.torch import save_file

    from .._io import umask

    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        out[name] = t
    save_file(out, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(path, 0o666 & ~umask())


def pack_bitstream(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dim into a dense LSB-first bitstream of int32 words.

    Element ``i`` of a row sits at bit ``i * bits`` of the row's stream (word ``i*bits // 32``, bit
    ``i*bits % 32``; a code that crosses a word boundary puts its low bits at the top of one word
    and its high bits at the bottom of the next). Rows are zero-padded to a multiple of 32 codes,
    then cut to ``ceil(cols * bits / 32)`` words: the compressed-tensors (>= 0.18) and GPTQ (along
    their axes) layout for every ``bits`` in 1..8 (``tests/test_export.py::test_bitstream_matches_bit_by_bit_reference``).

    Args:
        u: integer ``[..., cols]`` with values in ``[0, 2^bits)`` (checked).
        bits: 1..8.

    Returns:
        int32 ``[..., ceil(cols * bits / 32)]`` (the uint32 words reinterpreted).
    """
    if not 1 <= bits <= 8:
        raise ExportError(f"bits must be in 1..8, got {bits}")
    if u.is_floating_point():
        raise ExportError(f"codes must be integers, got {u.dtype}")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ExportError(f"codes must be in [0, {(1 << bits) - 1}] for {bits} bits, got [{int(u.min())}, {int(u.max())}]")
    *lead, cols = u.shape
    n_words = math.ceil(cols * bits / 32)
    rows = u.reshape(-1, cols).to(torch.int64)
    if 32 % bits == 0:  # whole codes per word: word w holds codes w*k .. w*k+k-1, code j at bit j*bits
        k = 32 // bits
        r = torch.nn.functional.pad(rows, (0, (-cols) % k)).reshape(rows.shape[0], -1, k)
        words = (r << (torch.arange(k, dtype=torch.int64) * bits)).sum(-1)
    else:  # codes cross words: low bits into word p // 32, the rest into the next (bits never overlap: add == or)
        pos = torch.arange(cols, dtype=torch.int64) * bits
        word, off = pos // 32, pos % 32
        words = torch.zeros(rows.shape[0], n_words + 1, dtype=torch.int64)
        words.scatter_add_(1, word.expand_as(rows), (rows << off) & 0xFFFFFFFF)
        words.scatter_add_(1, (word + 1).expand_as(rows), rows >> (32 - off))
    words = words[:, :n_words]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # uint32 -> int32 bits
    return words.to(torch.int32).reshape(*lead, n_words)


def unpack_bitstream(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitstream`: int32 ``[..., W]`` -> int64 codes ``[..., cols]``."""
    *lead, n_words = words.shape
    w = words.reshape(-1, n_words).to(torch.int64) & 0xFFFFFFFF
    stream = (w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1  # [rows, W, 32]
    stream = stream.reshape(w.shape[0], -1)[:, : cols * bits].reshape(w.shape[0], cols, bits)
    codes = (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)
    return codes.reshape(*lead, cols)


def scale_rounding(scale: torch.Tensor, dtype: torch.dtype) -> dict:
    """How ``scale`` (fp32) changes when stored in ``dtype``.

    Returns:
        ``{"dtype", "inexact": count of scales not exactly representable, "total",
        "max_rel_error": max |s - dtype(s)| / |s|, "overflow": count that become inf or 0}``.
    """
    s = scale.detach().to(torch.float32)
    r = s.to(dtype).to(torch.float32)
    inexact = r != s
    # |s| itself as the denominator (no clamp: an fp32-subnormal scale's error would be understated);
    # a zero scale has error 0 when kept, inf when not (tests/test_export.py::test_scale_rounding_counts_and_error).
    err = (r - s).abs()
    rel = torch.where(s != 0, err / s.abs(), torch.where(err == 0, 0.0, float("inf")))
    overflow = (~torch.isfinite(r)) | ((r == 0) & (s != 0))
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "inexact": int(inexact.sum()),
        "total": int(s.numel()),
        "max_rel_error": float(rel.max()) if s.numel() else 0.0,
        "overflow": int(overflow.sum()),
    }
