"""Prepacked weights cached by the identity of the tensors they were made from.

A decode loop calls ``int4_linear(x, qweight, scale, ...)`` with the same layer tensors every
step; prepacking them costs ~30x an M = 1 GEMM, so the CPU and CUDA paths keep one prepacked copy
per ``qweight`` (it dies with the weight). A hit needs *the same tensor objects* as inputs, each
unchanged since (same version counter and data pointer). Data pointers and versions alone are not
enough: a new tensor the allocator places where a freed one lived has version 0 again, and would
silently reuse the old scales. (So a float zero point, converted to a new integer tensor every call
on CUDA, re-prepacks every call: pass integer zero points, as ``QuantizedLinear`` does.)

Not seen: writes through ``tensor.data`` (``w.data.copy_(...)``) bump no version counter and keep
the data pointer, so the cached copy stays. Update weights in place under ``torch.no_grad()``
(``w.copy_(...)``), or assign new tensors.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary


def _state(t: torch.Tensor | None):
    return None if t is None else (t._version, t.data_ptr(), tuple(t.shape), t.dtype)


class PrepackCache:
    """``get(qweight, others, extra, build)``: ``build()``'s result for these exact inputs.

    ``others`` (scale, zero point, ... or None) are held weakly: the cache keeps only ``qweight``'s
    prepacked copy alive, never a caller's temporary. ``extra`` holds hashable settings (group
    size, dtypes) that are part of the key.
    """

    def __init__(self):
        self._entries = WeakIdKeyDictionary()

    def get(self, qweight: torch.Tensor, others: tuple, extra: tuple, build: Callable):
        sig = (_state(qweight), tuple(_state(t) for t in others), extra)
        try:
            hit = self._entries.get(qweight)
        except TypeError:  # not weak-referenceable: no caching
            return build()
        if hit is not None and hit[0] == sig and all(
            (r is None and t is None) or (r is not None and r() is t) for r, t in zip(hit[1], others)
        ):
            return hit[2]
        packed = build()
        try:
            refs = tuple(None if t is None else weakref.ref(t) for t in others)
            self._entries[qweight] = (sig, refs, packed)
        except TypeError:  # not weak-referenceable: no caching
            pass
        return packed

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
