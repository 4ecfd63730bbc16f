"""SwiGLU (``silu(gate) * up``) fused with dynamic per-token fake quantisation of its output.

Semantics: :func:`lrqat_kernels.reference.swiglu_fake_quant`, straight-through backward.

Why: the input of ``down_proj`` is made by ``act_fn(gate_proj(x)) * up_proj(x)``, the widest
activation of the layer (``T x 11008`` for LLaMA-2-7B). Eagerly: silu (read + write), the
product (2 reads + write), then the quantiser (read + write): 7 passes over ``T x intermediate``.
This kernel reads gate and up once and writes ``x_hat`` once: 3 passes. (See
``ops/norm_act_quant.py`` for the other producers fused this way, and why not the GEMM prologue.)

One program per row. A row up to :data:`SWIGLU_BLOCKS` ``[-1]`` (16384) wide is one chunk held in
registers; wider rows take two passes (range, then quantise), the second re-reading from L2.
``silu`` is computed in fp32 (``g / (1 + exp(-g))``, IEEE division; ``exp`` is Triton's, within
a couple of ulp of torch's) and rounded to the input dtype, then the product is rounded to it, as
torch does for 16-bit tensors; the quantiser is exactly the reference's on that product.

Backward (``reference.swiglu_backward``, plain torch): recomputes ``sigmoid(gate)`` from the saved
``gate`` and ``up`` (which ``gate_proj`` / ``up_proj`` outputs autograd keeps anyway).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference as R
from ..formats import qrange
from .act_quant import act_fake_quant, act_qparams
from .fake_quant import _cast

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Row chunk widths the launcher picks from (a row up to the last one is a single chunk).
SWIGLU_BLOCKS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@triton.jit
def _swiglu_out(g, u, DT: tl.constexpr, INTERPRET: tl.constexpr):
    """``(silu(g).to(DT) * u).to(DT)`` in fp32, rounded as torch rounds it for 16-bit tensors."""
    a = _cast(tl.div_rn(g, 1.0 + tl.exp(-g)), DT, INTERPRET).to(tl.float32)
    return _cast(a * u, DT, INTERPRET).to(tl.float32)


@triton.jit
def _swiglu_act_quant_kernel(
    gate_ptr, up_ptr, y_ptr,
    n_cols, stride_g, stride_u, stride_y,
    QMIN: tl.constexpr, QMAX: tl.constexpr, QUANT: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``y[row] = fake_quant(silu(gate[row]) * up[row])`` (``QUANT``) or the product; grid ``(rows,)``."""
    DT: tl.constexpr = y_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2^31
    g_row = gate_ptr + row * stride_g
    u_row = up_ptr + row * stride_u
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)
    if ONE_CHUNK:
        m = cols < n_cols
        g = tl.load(g_row + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_row + cols, mask=m, other=0.0).to(tl.float32)
        p = _swiglu_out(g, u, DT, INTERPRET)
        if QUANT:
            lo = tl.min(tl.where(m, tl.minimum(p, 0.0), 0.0), axis=0)
            hi = tl.max(tl.where(m, tl.maximum(p, 0.0), 0.0), axis=0)
            has_nan = tl.max((m & (p != p)).to(tl.int32), axis=0) > 0
            s, z = act_qparams(lo, hi, has_nan, QMIN, QMAX, SYMMETRIC)
            p = act_fake_quant(p, s, z, QMIN, QMAX)
        tl.store(y_row + cols, _cast(p, DT, INTERPRET), mask=m)
    else:
        s = 1.0
        z = 0.0
        if QUANT:
            lo = tl.zeros([BLOCK], dtype=tl.float32)  # 0 is always in the range
            hi = tl.zeros([BLOCK], dtype=tl.float32)
            nan = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(0, n_cols, BLOCK):
                m = start + cols < n_cols
                g = tl.load(g_row + start + cols, mask=m, other=0.0).to(tl.float32)
                u = tl.load(u_row + start + cols, mask=m, other=0.0).to(tl.float32)
                p = _swiglu_out(g, u, DT, INTERPRET)
                lo = tl.minimum(lo, tl.where(m, p, 0.0))
                hi = tl.maximum(hi, tl.where(m, p, 0.0))
                nan = nan | (m & (p != p)).to(tl.int32)
            s, z = act_qparams(tl.min(lo, axis=0), tl.max(hi, axis=0), tl.max(nan, axis=0) > 0, QMIN, QMAX, SYMMETRIC)
        for start in range(0, n_cols, BLOCK):
            m = start + cols < n_cols
            g = tl.load(g_row + start + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_row + start + cols, mask=m, other=0.0).to(tl.float32)
            p = _swiglu_out(g, u, DT, INTERPRET)
            if QUANT:
                p = act_fake_quant(p, s, z, QMIN, QMAX)
            tl.store(y_row + start + cols, _cast(p, DT, INTERPRET), mask=m)


def swiglu_quant_config(n_cols: int) -> tuple[int, int, bool]:
    """``(BLOCK, num_warps, ONE_CHUNK)`` for rows of ``n_cols``: one chunk up to 16384 wide
    (LLaMA-2-7B's 11008, LLaMA-3-8B's 14336), warps grown with the block (<= 32 values of each
    of gate / up / output a thread at 16384; no spills: ``tests/test_swiglu_act_quant.py``).
    Wider rows loop over 8192-wide chunks (a 16384 chunk in the two-pass loop spills)."""
    block = max(triton.next_power_of_2(n_cols), SWIGLU_BLOCKS[0])
    if block > SWIGLU_BLOCKS[-1]:
        return 8192, 16, False
    return block, (4 if block <= 512 else 8 if block <= 2048 else 16), True


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu_act_quant_forward(gate: torch.Tensor, up: torch.Tensor, bits: int | None,
                             symmetric: bool = False) -> torch.Tensor:
    """Launch the kernel: ``gate``, ``up`` ``[..., intermediate]`` fp32/bf16/fp16 (one dtype);
    ``bits`` None gives the plain product. Returns ``[..., intermediate]`` in their dtype."""
    if gate.dtype not in _DTYPES or up.dtype != gate.dtype:
        raise TypeError(f"gate and up must be fp32 / bf16 / fp16 of one dtype, got {gate.dtype} and {up.dtype}")
    qmin, qmax = qrange(bits) if bits is not None else (0, 0)
    g2, u2 = _rows(gate), _rows(up)
    y = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    n_rows, n_cols = g2.shape
    if n_rows:
        block, num_warps, one = swiglu_quant_config(n_cols)
        _swiglu_act_quant_kernel[(n_rows,)](
            g2, u2, y, n_cols, g2.stride(0), u2.stride(0), y.stride(0),
            QMIN=qmin, QMAX=qmax, QUANT=bits is not None, SYMMETRIC=symmetric, BLOCK=block, ONE_CHUNK=one,
            INTERPRET=not gate.is_cuda, num_warps=num_warps,
            enable_fp_fusion=False,  # each fp32 op rounded as torch rounds it
        )
    return y.reshape(gate.shape)


def _use_triton(gate: torch.Tensor) -> bool:
    """Triton on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the rule of functions.py)."""
    from ..functions import _interpreting

    return gate.dtype in _DTYPES and (gate.is_cuda or _interpreting())


@torch.library.custom_op("lrqat::swiglu_fake_quant", mutates_args=())
def _swiglu_fake_quant_op(gate: torch.Tensor, up: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if _use_triton(gate):
        return swiglu_act_quant_forward(gate, up, bits, symmetric)
    with torch.no_grad():
        return R.fake_quant_activation(R.swiglu(gate, up), bits, symmetric)


@_swiglu_fake_quant_op.register_fake
def _(gate, up, bits, symmetric):
    return torch.empty_like(gate)


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
    R.check_swiglu_args(gate, up)
    R.check_act_args(gate, bits, symmetric)
    if not _use_triton(gate):
        return R.fake_quant_activation(R.swiglu(gate, up), bits, symmetric)
    return _swiglu_fake_quant_op(gate, up, bits, symmetric)
