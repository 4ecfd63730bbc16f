"""SwiGLU (``silu(gate) * up``) fused with dynamic per-token fake quantisation of its output.

Semantics: :func:`lrqat_kernels.reference.swiglu_fake_quant`, straight-through backward.

Why: the input of ``down_proj`` is made by ``act_fn(gate_proj(x)) * up_proj(x)``, the widest
activation of the layer (``T x 11008`` for LLaMA-2-7B). Eagerly: silu (read + write), the
product (2 reads + write), then the quantiser (read + write): 7 passes over ``T x intermediate``.
This kernel reads gate and up once and writes ``x_hat`` once: 3 passes. (See
``ops/norm_act_quant.py`` for the other producers fused this way, and why not the GEMM prologue.)

The kernel (``ops/act_quant.py``, ``KIND_SWIGLU``): one program per row. A row up to 16384 wide
is one chunk held in registers; wider rows take two passes (range, then quantise), the second
re-reading from L2.
``silu`` is computed in fp32 (``g / (1 + exp(-g))``, IEEE division; ``exp`` is Triton's, within
a couple of ulp of torch's) and rounded to the input dtype, then the product is rounded to it, as
torch does for 16-bit tensors; the quantiser is exactly the reference's on that product.

Backward (``reference.swiglu_backward``, plain torch): recomputes ``sigmoid(gate)`` from the saved
``gate`` and ``up`` (which ``gate_proj`` / ``up_proj`` outputs autograd keeps anyway).
"""

from __future__ import annotations

import torch

from .. import reference as R
from .._checks import check_act_args, check_swiglu_args
from .act_quant import KERNEL_DTYPES, KIND_SWIGLU, launch_act_quant, use_triton

def swiglu_act_quant_forward(gate: torch.Tensor, up: torch.Tensor, bits: int | None,
                             symmetric: bool = False) -> torch.Tensor:
    """Launch the kernel (``ops/act_quant.py``, ``KIND_SWIGLU``): ``gate``, ``up``
    ``[..., intermediate]`` fp32/bf16/fp16 (one dtype); ``bits`` None gives the plain product.
    Returns ``[..., intermediate]`` in their dtype."""
    if gate.dtype not in KERNEL_DTYPES or up.dtype != gate.dtype:
        raise TypeError(f"gate and up must be fp32 / bf16 / fp16 of one dtype, got {gate.dtype} and {up.dtype}")
    return launch_act_quant(KIND_SWIGLU, gate, up, gate.dtype, bits, symmetric)


@torch.library.custom_op("lrqat::swiglu_fake_quant", mutates_args=())
def _swiglu_fake_quant_op(gate: torch.Tensor, up: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if use_triton(gate):
        return swiglu_act_quant_forward(gate, up, bits, symmetric)
    with torch.no_grad():
        return R.fake_quant_activation(R.swiglu(gate, up), bits, symmetric).contiguous()


@_swiglu_fake_quant_op.register_fake
def _(gate, up, bits, symmetric):
    return gate.new_empty(gate.shape)  # contiguous, as the kernel's and the eager branch's results


def _setup_context(ctx, inputs, output):
    gate, up, _, _ = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    d_gate, d_up = R.swiglu_backward(gate, up, grad)
    return d_gate, d_up, None, None


_swiglu_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu_fake_quant(gate: torch.Tensor, up: torch.Tensor, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` with the product fake-quantised per token, in one kernel.

    Args:
        gate, up: ``[..., intermediate]`` fp32 / bf16 / fp16, one dtype (``gate_proj(x)``, ``up_proj(x)``).
        bits: 4 or 8.
        symmetric: z = 0 when True, else an integer zero point per token.

    Returns:
        ``[..., intermediate]`` like ``gate``. Backward: SwiGLU's gradients (straight-through).
        Without Triton (CPU, no interpreter): the reference ops under autograd, bit-identical to
        transformers' MLP product followed by the quantiser.
    """
    check_swiglu_args(gate, up)
    check_act_args(gate, bits, symmetric)
    if not use_triton(gate):
        return R.fake_quant_activation(R.swiglu(gate, up), bits, symmetric).contiguous()
    return _swiglu_fake_quant_op(gate, up, bits, symmetric)
