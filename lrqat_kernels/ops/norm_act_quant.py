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

The kernel: one program per row. Pass 1 sums squares (fp32), pass 2 forms the norm's output
(``h = x * rstd`` rounded to ``x.dtype``, then ``weight * h`` rounded to the output dtype, as
torch computes ``LlamaRMSNorm``) and its min/max/NaN flag, pass 3 re-forms it and writes
``x_hat``. A row up to :data:`NORM_BLOCKS` ``[-1]`` wide is one chunk held in registers: HBM sees
one read of ``x`` (and of ``weight``, from L2) and one write. The reduction order of the sum of
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
import triton
import triton.language as tl

from ..formats import qrange
from .. import reference as R
from .act_quant import act_fake_quant, act_qparams
from .fake_quant import _cast

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: Row chunk widths the launcher picks from (a row up to the last one is a single chunk).
NORM_BLOCKS = (128, 256, 512, 1024, 2048, 4096, 8192)


@triton.jit
def _norm_out(v, w, rstd, H_DTYPE: tl.constexpr, O_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """The norm's output in fp32, rounded as torch rounds it: ``(w * (v * rstd).to(H)).to(O)``."""
    h = _cast(v * rstd, H_DTYPE, INTERPRET).to(tl.float32)
    return _cast(w * h, O_DTYPE, INTERPRET).to(tl.float32)


@triton.jit
def _rms_norm_act_quant_kernel(
    x_ptr, w_ptr, y_ptr,
    n_cols, stride_x, stride_y, eps,
    QMIN: tl.constexpr, QMAX: tl.constexpr, QUANT: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``y[row] = fake_quant(rms_norm(x[row]))`` (``QUANT``) or ``rms_norm(x[row])``; grid ``(rows,)``.
    ``h`` rounds to ``x``'s dtype, the output to ``y``'s (``promote_types(x.dtype, weight.dtype)``)."""
    H_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    O_DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2^31
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)
    if ONE_CHUNK:
        m = cols < n_cols
        v = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(v * v, axis=0), n_cols * 1.0) + eps))
        o = _norm_out(v, w, rstd, H_DTYPE, O_DTYPE, INTERPRET)
        if QUANT:
            lo = tl.min(tl.where(m, tl.minimum(o, 0.0), 0.0), axis=0)
            hi = tl.max(tl.where(m, tl.maximum(o, 0.0), 0.0), axis=0)
            has_nan = tl.max((m & (o != o)).to(tl.int32), axis=0) > 0
            s, z = act_qparams(lo, hi, has_nan, QMIN, QMAX, SYMMETRIC)
            o = act_fake_quant(o, s, z, QMIN, QMAX)
        tl.store(y_row + cols, _cast(o, O_DTYPE, INTERPRET), mask=m)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            v = tl.load(x_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
            acc += v * v
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(acc, axis=0), n_cols * 1.0) + eps))
        s = 1.0
        z = 0.0
        if QUANT:
            lo = tl.zeros([BLOCK], dtype=tl.float32)  # 0 is always in the range
            hi = tl.zeros([BLOCK], dtype=tl.float32)
            nan = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(0, n_cols, BLOCK):
                m = start + cols < n_cols
                v = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=m, other=0.0).to(tl.float32)
                o = _norm_out(v, w, rstd, H_DTYPE, O_DTYPE, INTERPRET)
                lo = tl.minimum(lo, tl.where(m, o, 0.0))
                hi = tl.maximum(hi, tl.where(m, o, 0.0))
                nan = nan | (m & (o != o)).to(tl.int32)
            s, z = act_qparams(tl.min(lo, axis=0), tl.max(hi, axis=0), tl.max(nan, axis=0) > 0, QMIN, QMAX, SYMMETRIC)
        for start in range(0, n_cols, BLOCK):
            m = start + cols < n_cols
            v = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + start + cols, mask=m, other=0.0).to(tl.float32)
            o = _norm_out(v, w, rstd, H_DTYPE, O_DTYPE, INTERPRET)
            if QUANT:
                o = act_fake_quant(o, s, z, QMIN, QMAX)
            tl.store(y_row + start + cols, _cast(o, O_DTYPE, INTERPRET), mask=m)


def norm_quant_config(n_cols: int) -> tuple[int, int, bool]:
    """``(BLOCK, num_warps, ONE_CHUNK)`` for rows of ``n_cols``: one chunk up to 8192 wide (the row
    stays in registers: HBM sees one read), warps grown with the block so a thread holds <= 16
    values of each of ``x``, ``weight`` and the output (no spills; ``tests/test_norm_act_quant.py``)."""
    block = min(max(triton.next_power_of_2(n_cols), NORM_BLOCKS[0]), NORM_BLOCKS[-1])
    warps = 4 if block <= 512 else 8 if block <= 2048 else 16
    return block, warps, n_cols <= block


def rms_norm_act_quant_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, bits: int | None,
                               symmetric: bool = False) -> torch.Tensor:
    """Launch the kernel: ``x`` ``[..., hidden]`` fp32/bf16/fp16, ``weight`` ``[hidden]``; ``bits``
    None gives the plain RMSNorm. Returns ``[..., hidden]`` in ``promote_types(x.dtype, weight.dtype)``."""
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if x.dtype not in _TL or out_dtype not in _TL:
        raise TypeError(f"x and weight must be fp32 / bf16 / fp16, got {x.dtype} and {weight.dtype}")
    qmin, qmax = qrange(bits) if bits is not None else (0, 0)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.contiguous()
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    n_rows, n_cols = x2.shape
    if n_rows:
        block, num_warps, one = norm_quant_config(n_cols)
        _rms_norm_act_quant_kernel[(n_rows,)](
            x2, w, y, n_cols, x2.stride(0), y.stride(0), float(eps),
            QMIN=qmin, QMAX=qmax, QUANT=bits is not None, SYMMETRIC=symmetric,
            BLOCK=block, ONE_CHUNK=one,
            INTERPRET=not x.is_cuda, num_warps=num_warps,
            enable_fp_fusion=False,  # each fp32 op rounded as torch rounds it
        )
    return y.reshape(x.shape)


def _use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Triton on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the rule of functions.py)."""
    from ..functions import _interpreting

    return (x.dtype in _TL and torch.promote_types(x.dtype, weight.dtype) in _TL
            and (x.is_cuda or _interpreting()))


@torch.library.custom_op("lrqat::rms_norm_fake_quant", mutates_args=())
def _rms_norm_fake_quant_op(x: torch.Tensor, weight: torch.Tensor, eps: float, bits: int, symmetric: bool) -> torch.Tensor:
    if _use_triton(x, weight):
        return rms_norm_act_quant_forward(x, weight, eps, bits, symmetric)
    with torch.no_grad():  # eager: the reference, op for op (bit-identical to norm + quantiser)
        return R.fake_quant_activation(R.rms_norm(x, weight, eps), bits, symmetric)


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
    R.check_rms_norm_args(x, weight, eps)
    R.check_act_args(x, bits, symmetric)
    if not _use_triton(x, weight):
        # Eager: the reference ops themselves, so values and gradients are bit-identical to the
        # transformers norm followed by the quantiser (what per-linear placement computes).
        return R.fake_quant_activation(R.rms_norm(x, weight, eps), bits, symmetric)
    return _rms_norm_fake_quant_op(x, weight, float(eps), bits, symmetric)
