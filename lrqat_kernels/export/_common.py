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

import torch
import torch.nn as nn

from ..formats import qrange

__all__ = [
    "ExportError",
    "QuantLayer",
    "collect_layers",
    "dense_state",
    "pack_bitstream",
    "unpack_bitstream",
    "scale_rounding",
]


class ExportError(ValueError):
    """A model or an option a format cannot hold; the message names the layer and what is allowed."""


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
    rel = ((r - s).abs() / s.abs().clamp_min(torch.finfo(torch.float32).tiny)) if s.numel() else s
    overflow = (~torch.isfinite(r)) | ((r == 0) & (s != 0))
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "inexact": int(inexact.sum()),
        "total": int(s.numel()),
        "max_rel_error": float(rel.max()) if s.numel() else 0.0,
        "overflow": int(overflow.sum()),
    }
