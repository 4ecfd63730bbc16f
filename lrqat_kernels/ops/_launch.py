"""Launch plumbing shared by every Triton launcher."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, or true / yes / on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def on_device(t: torch.Tensor):
    """A context making ``t``'s CUDA device the current one for a Triton launch.

    Triton launches on the *current* CUDA device (and its current stream), not on the device of
    the tensors passed in; PyTorch custom ops implemented in Python get no device guard. Without
    this, a layer on ``cuda:1`` (e.g. a model sharded with ``device_map="auto"``) would run on
    ``cuda:0`` with foreign pointers. A no-op for CPU tensors (the interpreter) and when the
    device is already current (the common case: no device switch on the launch path).
    """
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
