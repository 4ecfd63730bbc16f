"""RMSNorm fused with dynamic per-token activation fake quantisation of its output.

Semantics: :func:`lrqat_kernels.reference.rms_norm_fake_quant`
(``fake_quant_activation(rms_norm(x, weight, eps), bits, symmetric)``), straight-through backward.

Why: in a LLaMA decoder layer the output of ``input_layernorm`` is the input of q, k and v, and
that of ``post_attention_layernorm`` the input of gate and up. Quantising each linear's input
(what the paper's placement says) quantises the same tensor 3 and 2 times. The numerics are a
function of the tensor alone, so quantising it once, where it is made, gives the same model; and
doing it inside the norm's kernel removes the norm's own write and read as well. Per layer and
``T x hidden`` activations, in passes over the tensor (a read or a write each):

    per-linear placement  2 norms (2 r + 2 w) + 5 quantisers (5 r + 5 w)  = 14
    this kernel, twice    2 x (r + w)                                     = 4

(down_proj's input is made by the SwiGLU and quantised there: ``ops/swiglu_act_quant.py``;
o_proj's comes out of attention and keeps its own quantiser.) Fusing instead into the prologue of the LR-QAT linear does not pay: the default path
hands the input to cuBLAS, which has no prologue, and the fused dequant-GEMM path
(``ops/fused_linear.py``) is for a few tokens, where activations are a rounding error of the
layer's traffic next to the weights.

The kernel (``ops/act_quant.py``, ``KIND_RMS_NORM``): one program per row. It sums squares
(fp32), forms the norm's output (``h = x * rstd`` rounded to ``x.dtype``, then ``weight * h``
rounded to the output dtype, as torch computes ``LlamaRMSNorm``) and its min/max/NaN flag, then
writes ``x_hat``. A row up to 16384 wide is one chunk held in registers: HBM sees one read of
``x`` (and of ``weight``, from L2) and one write. The reduction order of the sum of
squares is not torch's, so the norm's output can differ from torch's in the last bit (which
quantisation then may or may not hide); with the same kernel in training and deployment the model
sees one set of numerics.

Backward (``reference.rms_norm_backward``, plain torch): recomputes ``rstd`` from the saved ``x``;
nothing activation-sized is saved beyond ``x``, which the residual stream keeps alive anyway.
Without Triton (CPU, no interpreter) :func:`rms_norm_fake_quant` runs the reference ops under
autograd instead: values and gradients bit-identical to the norm followed by the quantiser.
"""

from __future__ import annotations

import torch

from .. import reference as R
from .._checks import check_act_args, check_rms_norm_args
from .act_quant import KERNEL_DTYPES, KIND_RMS_NORM, launch_act_quant, use_triton

def rms_norm_act_quant_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, bits: int | None,
                               symmetric: bool = False) -> torch.Tensor:
    """Launch the kernel (``ops/act_quant.py``, ``KIND_RMS_NORM``): ``x`` ``[..., hidden]``
    fp32/bf16/fp16, ``weight`` ``[hidden]``; ``bits`` None gives the plain RMSNorm. Returns
    ``[..., hidden]`` in ``promote_types(x.dtype, weight.dtype)``."""
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if x.dtype not in KERNEL_DTYPES or out_dtype not in KERNEL_DTYPES:
        raise TypeError(f"x and weight must be fp32 / bf16 / fp16, got {x.dtype} and {weight.dtype}")
    return launch_act_quant(KIND_RMS_NORM, x, weight, out_dtype, bits, symmetric, eps)


@torch.library.custom_op("lrqat::rms_norm_fake_quant", mutates_args=())
def _rms_norm_fake_quant_op(x: torch.Tensor, weight: torch.Tensor, eps: float, bits: int, symmetric: bool) -> torch.Tensor:
    if use_triton(x, torch.promote_types(x.dtype, weight.dtype)):
        return rms_norm_act_quant_forward(x, weight, eps, bits, symmetric)
    with torch.no_grad():  # eager: the reference, op for op (bit-identical to norm + quantiser)
        return R.fake_quant_activation(R.rms_norm(x, weight, eps), bits, symmetric).contiguous()


@_rms_norm_fake_quant_op.register_fake
def _(x, weight, eps, bits, symmetric):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, eps, _, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw = R.rms_norm_backward(x, weight, ctx.eps, grad, need_weight_grad=ctx.needs_input_grad[1])
    return dx, dw, None, None, None


_rms_norm_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm_fake_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, bits: int = 8,
                        symmetric: bool = False) -> torch.Tensor:
    """RMSNorm (LLaMA's) with its output fake-quantised per token, in one kernel.

    Args:
        x: ``[..., hidden]`` fp32 / bf16 / fp16.
        weight: ``[hidden]``, the norm's scale.
        eps: the norm's epsilon (``variance_epsilon``).
        bits: 4 or 8.
        symmetric: z = 0 when True, else an integer zero point per token.

    Returns:
        ``[..., hidden]`` in ``promote_types(x.dtype, weight.dtype)``. Backward: RMSNorm's
        gradients for ``x`` and ``weight`` (straight-through rounding).
    """
    check_rms_norm_args(x, weight, eps)
    check_act_args(x, bits, symmetric)
    if not use_triton(x, torch.promote_types(x.dtype, weight.dtype)):
        # Eager: the reference ops themselves, so values and gradients are bit-identical to the
        # transformers norm followed by the quantiser (what per-linear placement computes).
        return R.fake_quant_activation(R.rms_norm(x, weight, eps), bits, symmetric).contiguous()
    return _rms_norm_fake_quant_op(x, weight, float(eps), bits, symmetric)
