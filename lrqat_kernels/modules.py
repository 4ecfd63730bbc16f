"""LR-QAT modules: ``LRQATLinear`` (training) and ``QuantizedLinear`` (deployment, INT-b).

``LRQATLinear`` replaces an ``nn.Linear`` during LR-QAT (paper eq. 8, NUMERICS.md):

    W_hat = s * (clip(round_half_even(Phi0 + alpha / r * lora_B @ lora_A), qmin, qmax) - z)
    y     = x @ W_hat^T + bias

with ``Phi0 = phi(W0 / s0 + z)`` frozen (a buffer, stored per ``phi_format``), ``lora_A``,
``lora_B`` and ``s`` trainable. ``QuantizedLinear`` holds the fused result ``W_int`` (packed two
nibbles a byte for ``bits <= 4``) with ``s`` (and ``z``): ``y = x @ (s * (W_int - z))^T + bias``.

Both forward through the dispatchers (``lrqat_kernels.functions.lrqat_linear`` / ``merge_weight``,
``lrqat_kernels.ops.int4_linear.int4_linear``; looked up by ``act_modules._op``), so the fused
Triton kernels replace the eager reference transparently; :meth:`QuantizedLinear.from_lrqat`
uses ``merge_weight``, which computes ``W_int`` by the training forward's code path on that
device: the deployed integers are bit-identical to the ones training used.

The activation-quantising layers ``ActQuantRMSNorm`` / ``ActQuantMLP`` live in ``act_modules.py``
(re-exported here).

Size: about 550 lines: the training layer and the deployment layer it fuses into, with the argument
checks they share; apart, each would import the other's rules.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_group_size
from .act_modules import ActQuantMLP, ActQuantRMSNorm, _act_repr, _op, _op_home, _quant_act, _set_act_quant
from .formats import PHI_DTYPES, check_bits, check_phi_format, encode_phi, pack_nibbles, qrange, unpack_nibbles
from .init import estimate_scale, lora_init, svd_init
from .reference import expand_groups

__all__ = ["ActQuantMLP", "ActQuantRMSNorm", "LRQATLinear", "QuantizedLinear"]


def _check_layer_args(in_features, out_features, bits, phi_format, group_size, rank, where):
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}{name} must be a positive int, got {v!r}")
    if phi_format is not None:
        check_phi_format(phi_format)
        check_bits(bits, phi_format)
        if phi_format == "packed_int" and in_features % 2:
            raise ValueError(f"{where}phi_format='packed_int' needs an even in_features, got {in_features}")
    else:
        check_bits(bits)
    try:
        g = check_group_size(group_size, in_features, "in_features")
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{where}rank must be an int >= 1, got {rank!r}")
    return g


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA factors are kept in under compute ``dtype``: fp16 factors become fp32.

    fp16 factors cannot be trained: AdamW's ``eps = 1e-8`` rounds to 0 in fp16 (at LoRA init
    ``lora_B = 0`` makes ``dlora_A = 0``, and the first update is 0/0 = NaN), squared gradients
    below ~2.4e-4 underflow, and updates below half an ulp are lost. So under fp16 compute the
    factors are fp32 master weights: the kernels take fp16 activations with fp32 factors and give
    ``W_hat`` and the output in fp16.

    bf16 factors are kept: the kernels build ``B @ A`` from them on tensor cores (exact products,
    fp32 sums), while fp32 factors take IEEE FMA dots, 2r FMAs a weight, which at r = 32 would
    make the memory-bound fake-quant forward ~2x slower than its HBM time on an H100 (a model,
    not a timing). Their small AdamW updates are kept by fp32 master copies on the optimizer
    side (:class:`lrqat_kernels.train.MasterWeights`, used by ``fit``): an update under half a
    bf16 ulp is otherwise lost.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def register_frozen_bias(module: nn.Module, bias: bool, out_features: int, dtype, device) -> None:
    """``module.bias``: a frozen zero parameter ``[out_features]`` (a checkpoint or the source layer fills
    it), or None. Every training and deployment layer holds its bias this way."""
    if bias:
        module.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
    else:
        module.register_parameter("bias", None)


class _KeepDtypes:
    """Mixin: ``module.to(bf16)`` / ``.half()`` must not cast the tensors named in ``_keep_dtypes``,
    and turns a cast of the tensors named in ``_factors`` to fp16 into fp32 (:func:`factor_dtype`).

    Scales stay fp32 (NUMERICS: bf16 scales never move under AdamW steps of ~1e-5) and a stored
    Phi0 keeps its format's dtype. Device moves still apply. The original (unrounded) value is
    kept, not a round trip through the lower precision.
    """

    _keep_dtypes: tuple[str, ...] = ()
    _factors: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {}
        for name in (*self._keep_dtypes, *self._factors):
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                before[name] = (t.data, t.dtype, None if t.grad is None else t.grad.data)
        super()._apply(fn, recurse)
        for name, (data, dtype, grad) in before.items():
            t = getattr(self, name)
            if name in self._factors:
                if t.dtype != torch.float16:
                    continue
                dtype = factor_dtype(t.dtype)
            if t.dtype != dtype:
                t.data = data.to(device=t.device, dtype=dtype)
            if t.grad is not None and grad is not None and t.grad.dtype != dtype:
                t.grad.data = grad.to(device=t.device, dtype=dtype)
        return self


class LRQATLinear(_KeepDtypes, nn.Module):
    """An ``nn.Linear`` under LR-QAT: frozen ``Phi0``, trainable ``lora_A``, ``lora_B``, ``scale``.

    Tensors (``G = in // group_size``, 1 for per-channel):
        phi: buffer, ``Phi0 = phi(W0 / s0 + z)``; int8 ``[out, in]`` (fixed_point), uint8
            ``[out, in // 2]`` (packed_int) or float ``[out, in]``. Frozen.
        lora_A: parameter ``[r, in]`` in the compute dtype (fp32 under fp16: :func:`factor_dtype`).
        lora_B: parameter ``[out, r]`` like lora_A (zeros at LoRA init).
        scale: parameter float32 ``[out, G]``, initialised to ``s0``; stays fp32 under
            ``module.to(torch.bfloat16)``.
        zero_point: buffer int8 ``[out, G]`` (asymmetric) or None. Frozen.
        bias: parameter ``[out]`` in the compute dtype or None. Frozen.

    The constructor builds the structure only (zeros / ones, for loading a checkpoint);
    :meth:`from_linear` initialises it from a trained ``nn.Linear``.
    """

    _keep_dtypes = ("scale", "phi")
    _factors = ("lora_A", "lora_B")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        rank: int = 32,
        alpha: float = 1.0,
        phi_format: str = "fixed_point",
        group_size: int | None = None,
        symmetric: bool = True,
        bias: bool = True,
        learn_scale: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
        input_bits: int | None = None,
        output_bits: int | None = None,
        act_symmetric: bool = False,
    ):
        super().__init__()
        g = _check_layer_args(in_features, out_features, bits, phi_format, group_size, rank, "")
        _set_act_quant(self, input_bits, output_bits, act_symmetric)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.rank, self.alpha = bits, rank, float(alpha)
        self.phi_format, self.group_size, self.symmetric = phi_format, group_size, symmetric
        n_groups = in_features // g
        phi_cols = in_features // 2 if phi_format == "packed_int" else in_features
        self.register_buffer("phi", torch.zeros(out_features, phi_cols, dtype=PHI_DTYPES[phi_format], device=device))
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=factor_dtype(dtype), device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=factor_dtype(dtype), device=device))
        self.scale = nn.Parameter(torch.ones(out_features, n_groups, dtype=torch.float32, device=device), requires_grad=learn_scale)
        if symmetric:
            self.register_buffer("zero_point", None)
        else:
            self.register_buffer("zero_point", torch.zeros(out_features, n_groups, dtype=torch.int8, device=device))
        register_frozen_bias(self, bias, out_features, dtype, device)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, config, *, generator: torch.Generator | None = None, name: str = "") -> "LRQATLinear":
        """Initialise from a trained ``nn.Linear`` (range estimation, ``Phi0`` encoding, A/B init).

        Args:
            linear: ``nn.Linear`` with weight ``W0 [out, in]`` (any float dtype, any device).
            config: :class:`~lrqat_kernels.LRQATConfig`.
            generator: CPU generator for ``lora_A`` (LoRA init); default seeded with ``config.seed``.
            name: the layer's name, used in error messages.

        Returns:
            An ``LRQATLinear`` on ``linear``'s device; ``lora_A``/``lora_B``/``bias`` in
            ``config.compute_dtype`` (default ``W0``'s dtype; factors fp32 under fp16, see
            :func:`factor_dtype`), ``scale = s0`` in fp32.
        """
        where = f"layer {name!r}: " if name else ""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}from_linear needs an nn.Linear, got {type(linear).__name__}")
        w0 = linear.weight.detach()
        out_f, in_f = w0.shape
        _check_layer_args(in_f, out_f, config.bits, config.phi_format, config.group_size, config.rank, where)
        if not torch.isfinite(w0).all():
            raise ValueError(f"{where}weight holds non-finite values; cannot estimate a quantization range")
        dtype = config.torch_compute_dtype or w0.dtype
        g = check_group_size(config.group_size, in_f)
        w32 = w0.float()
        if config.symmetric:
            s0 = estimate_scale(w32, config.bits, config.range_method, config.group_size, symmetric=True)
            z = None
        else:
            s0, z = estimate_scale(w32, config.bits, config.range_method, config.group_size, symmetric=False)
        x = w32 / expand_groups(s0, g)
        if z is not None:
            x = x + expand_groups(z, g)
        if config.init == "svd":
            if config.rank > min(out_f, in_f):
                raise ValueError(f"{where}init='svd' needs rank <= min(out, in) = {min(out_f, in_f)}, got rank={config.rank}")
            phi, lora_A, lora_B = svd_init(
                x, config.rank, bits=config.bits, phi_format=config.phi_format, alpha=config.alpha,
                steps=config.svd_steps, dtype=factor_dtype(dtype),
            )
        else:
            phi = encode_phi(x, config.bits, config.phi_format)
            if generator is None:
                generator = torch.Generator().manual_seed(config.seed)
            lora_A, lora_B = lora_init(out_f, in_f, config.rank, dtype=factor_dtype(dtype), generator=generator)
        mod = cls(
            in_f, out_f, bits=config.bits, rank=config.rank, alpha=config.alpha, phi_format=config.phi_format,
            group_size=config.group_size, symmetric=config.symmetric, bias=linear.bias is not None,
            learn_scale=config.learn_scale, dtype=dtype, device=w0.device,
        )
        mod.phi.copy_(phi.to(w0.device))
        mod.lora_A.copy_(lora_A.to(w0.device))
        mod.lora_B.copy_(lora_B.to(w0.device))
        mod.scale.copy_(s0)
        if z is not None:
            mod.zero_point.copy_(z.round().to(torch.int8))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def _qargs(self) -> dict:
        return dict(bits=self.bits, phi_format=self.phi_format, alpha=self.alpha, zero_point=self.zero_point, group_size=self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x @ W_hat^T + bias``. x: ``[..., in]`` (compute dtype) -> ``[..., out]`` in x's dtype.

        With ``input_bits`` / ``output_bits`` set (weight-activation LR-QAT), ``x`` and ``y`` pass
        through dynamic per-token fake quantisation (``lrqat_kernels.fake_quant_activation``).
        """
        x = _quant_act(x, self.input_bits, self.act_symmetric)
        y = _op("lrqat_linear")(x, self.phi, self.lora_A, self.lora_B, self.scale, self.bias, **self._qargs())
        return _quant_act(y, self.output_bits, self.act_symmetric)

    def fake_quant_weight(self) -> torch.Tensor:
        """``W_hat [out, in]`` in the factors' dtype (differentiable): the compute dtype, fp32 under
        fp16 (:func:`factor_dtype`; ``forward`` makes its ``W_hat`` in the input's dtype)."""
        return _op("fake_quant_weight")(self.phi, self.lora_A, self.lora_B, self.scale, **self._qargs())

    @torch.no_grad()
    def merge(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(w_int int8 [out, in], scale fp32 [out, G], zero_point int8 [out, G] | None)`` via ``merge_weight``."""
        return _op("merge_weight")(self.phi, self.lora_A, self.lora_B, self.scale, **self._qargs())

    def to_quantized(self) -> "QuantizedLinear":
        """The fused deployment layer (see :meth:`QuantizedLinear.from_lrqat`)."""
        return QuantizedLinear.from_lrqat(self)

    def extra_repr(self) -> str:
        gran = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"rank={self.rank}, alpha={self.alpha}, phi_format={self.phi_format}, {gran}, "
            f"symmetric={self.symmetric}, bias={self.bias is not None}{_act_repr(self)}"
        )


class QuantizedLinear(_KeepDtypes, nn.Module):
    """Deployment linear with integer weights: ``y = x @ (s * (W_int - z))^T + bias``.

    Tensors (``G = in // group_size``, 1 for per-channel):
        qweight: buffer; uint8 ``[out, in // 2]`` holding ``W_int`` as two's-complement nibbles
            (``formats.pack_nibbles``: column ``2j`` low nibble, ``2j + 1`` high) when
            ``bits <= 4`` and ``in`` is even; otherwise int8 ``[out, in]``.
        scale: buffer float32 ``[out, G]`` (stays fp32 under ``module.to(torch.bfloat16)``).
        zero_point: buffer int8 ``[out, G]`` or None (symmetric).
        bias: frozen parameter ``[out]`` or None.

    Forward: ``lrqat_kernels.int4_linear(x, qweight, scale, zero_point=, group_size=, bias=, bits=)``
    (the deployment INT4 GEMM, which never materialises ``W_hat``) when the package provides it
    at call time, the weight is packed and the kernel takes the group size; otherwise exact
    dequantise-then-matmul (the same ops as the eager LR-QAT forward, so the outputs are
    bit-identical to it on CPU). Either way ``W_int`` is bit-identical to the training forward's.
    """

    _keep_dtypes = ("scale", "offset", "input_smooth", "input_step")

    #: Use ``lrqat_kernels.int4_linear`` (the deployment GEMM) when available. Its fp32 sums run
    #: in a different order than ``F.linear``, so outputs match the LR-QAT forward to rounding;
    #: set False (on the class or an instance) for the exact dequantise path.
    use_int4_kernel: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int | None = None,
        symmetric: bool = True,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
        input_bits: int | None = None,
        output_bits: int | None = None,
        act_symmetric: bool = False,
        offset: bool = False,
    ):
        super().__init__()
        g = _check_layer_args(in_features, out_features, bits, None, group_size, None, "")
        _set_act_quant(self, input_bits, output_bits, act_symmetric)
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        n_groups = in_features // g
        if self.packed:
            qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        else:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
        if symmetric:
            self.register_buffer("zero_point", None)
        else:
            self.register_buffer("zero_point", torch.zeros(out_features, n_groups, dtype=torch.int8, device=device))
        if offset:
            self.register_buffer("offset", torch.zeros(out_features, n_groups, dtype=torch.float32, device=device))
        else:
            self.register_buffer("offset", None)
        self.register_buffer("input_smooth", None)
        self.register_buffer("input_step", None)
        self.input_qrange: tuple[int, int] | None = None
        register_frozen_bias(self, bias, out_features, dtype, device)

    @property
    def packed(self) -> bool:
        """True when ``qweight`` holds nibbles (``bits <= 4`` and even ``in``)."""
        return self.bits <= 4 and self.in_features % 2 == 0

    @classmethod
    @torch.no_grad()
    def from_int(
        cls,
        w_int: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None = None,
        group_size: int | None = None,
        bias: torch.Tensor | None = None,
        bits: int = 4,
        offset: torch.Tensor | None = None,
    ) -> "QuantizedLinear":
        """Build from integer weights.

        Args:
            w_int: integer tensor ``[out, in]`` (int8 or any integer dtype) with values in
                ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``.
            scale: float ``[out, 1]`` (per-channel) or ``[out, in // group_size]``; stored fp32.
            zero_point: None (symmetric) or integer-valued ``[out, G]`` in ``[qmin, qmax]``.
            group_size: None for per-channel, else a divisor of ``in``.
            bias: None or float ``[out]``; its dtype is kept.
            bits: 2..8.
            offset: None or float ``[out, G]``, a float offset per group (L4Q): ``W_hat = s * (W_int - z) + offset``.

        Returns:
            A ``QuantizedLinear`` on ``w_int``'s device.
        """
        check_bits(bits)
        if not isinstance(w_int, torch.Tensor):
            raise TypeError(f"w_int must be a torch.Tensor, got {type(w_int).__name__}")
        if w_int.is_floating_point() or w_int.is_complex() or w_int.dtype == torch.bool:
            raise TypeError(f"w_int must have an integer dtype (int8), got {w_int.dtype}")
        if w_int.dim() != 2:
            raise ValueError(f"w_int must be 2-D [out, in], got shape {tuple(w_int.shape)}")
        out_f, in_f = w_int.shape
        g = _check_layer_args(in_f, out_f, bits, None, group_size, None, "")
        qmin, qmax = qrange(bits)
        if w_int.numel() and (int(w_int.min()) < qmin or int(w_int.max()) > qmax):
            raise ValueError(f"w_int values must be on the {bits}-bit grid [{qmin}, {qmax}], got [{int(w_int.min())}, {int(w_int.max())}]")
        n_groups = in_f // g
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point torch.Tensor, got {getattr(scale, 'dtype', type(scale).__name__)}")
        if tuple(scale.shape) != (out_f, n_groups):
            raise ValueError(f"scale must be [out, in // group_size] = [{out_f}, {n_groups}], got {tuple(scale.shape)}")
        if not torch.isfinite(scale).all():
            raise ValueError("scale holds non-finite values")
        if zero_point is not None:
            if not isinstance(zero_point, torch.Tensor):
                raise TypeError(f"zero_point must be None or a torch.Tensor, got {type(zero_point).__name__}")
            if tuple(zero_point.shape) != (out_f, n_groups):
                raise ValueError(f"zero_point must have scale's shape {(out_f, n_groups)}, got {tuple(zero_point.shape)}")
            if zero_point.is_floating_point() and not torch.equal(zero_point, zero_point.round()):
                raise ValueError("zero_point must hold integers")
            if zero_point.numel() and (zero_point.min() < qmin or zero_point.max() > qmax):
                raise ValueError(f"zero_point values must be in [{qmin}, {qmax}]")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                raise TypeError(f"bias must be None or a floating-point torch.Tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
            if tuple(bias.shape) != (out_f,):
                raise ValueError(f"bias must be [out] = [{out_f}], got {tuple(bias.shape)}")
        if offset is not None:
            if not isinstance(offset, torch.Tensor) or not offset.is_floating_point():
                raise TypeError(f"offset must be None or a floating-point torch.Tensor, got {getattr(offset, 'dtype', type(offset).__name__)}")
            if tuple(offset.shape) != (out_f, n_groups):
                raise ValueError(f"offset must have scale's shape {(out_f, n_groups)}, got {tuple(offset.shape)}")
            if not torch.isfinite(offset).all():
                raise ValueError("offset holds non-finite values")
        mod = cls(
            in_f, out_f, bits=bits, group_size=group_size, symmetric=zero_point is None, bias=bias is not None,
            dtype=None if bias is None else bias.dtype, device=w_int.device, offset=offset is not None,
        )
        if offset is not None:
            mod.offset.copy_(offset.to(torch.float32))
        w8 = w_int.to(torch.int8)
        mod.qweight.copy_(pack_nibbles(w8) if mod.packed else w8)
        mod.scale.copy_(scale.to(torch.float32))
        if zero_point is not None:
            mod.zero_point.copy_(zero_point.round().to(torch.int8))
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    @classmethod
    @torch.no_grad()
    def from_lrqat(cls, layer: LRQATLinear) -> "QuantizedLinear":
        """Fuse a trained :class:`LRQATLinear`: ``W_int`` from ``lrqat_kernels.merge_weight``.

        ``merge_weight`` computes ``W_int = clip(round(Phi0 + C), qmin, qmax)`` through the same
        code path as the training forward on the layer's device, so the integers are identical
        to the ones the last training forward used and the outputs match bit for bit.
        """
        if not isinstance(layer, LRQATLinear):
            raise TypeError(f"from_lrqat needs an LRQATLinear, got {type(layer).__name__}")
        w_int, scale, zp = layer.merge()
        bias = None if layer.bias is None else layer.bias.detach().clone()
        q = cls.from_int(w_int, scale, zp, group_size=layer.group_size, bias=bias, bits=layer.bits)
        # Deployed numerics equal trained numerics: the activation / KV quantisers come along.
        _set_act_quant(q, layer.input_bits, layer.output_bits, layer.act_symmetric)
        return q

    @torch.no_grad()
    def set_static_input_quant(self, step: torch.Tensor, qrange: tuple[int, int], smooth: torch.Tensor | None = None):
        """Quantise the input with a fixed step (static activations, PE-QAT / SASQ deployment):
        ``x_q = step * clip(round_half_even((x / smooth) / step), qmin, qmax)``, in fp32, cast to
        x's dtype. Replaces the per-token ``input_bits`` quantiser.

        Args:
            step: fp32 ``[1]``, > 0. qrange: ``(qmin, qmax)`` integers, ``qmin < qmax``.
            smooth: None or fp32 ``[in]``, > 0: per-input-channel divisor (PE-QAT's smoothing,
                until folded into the preceding layer).
        """
        step = torch.as_tensor(step, dtype=torch.float32).reshape(1)
        if not torch.isfinite(step).all() or float(step) <= 0:
            raise ValueError(f"step must be a finite number > 0, got {float(step)}")
        lo, hi = qrange
        if not (isinstance(lo, int) and isinstance(hi, int) and lo < hi):
            raise ValueError(f"qrange must be two ints (qmin, qmax) with qmin < qmax, got {qrange!r}")
        if smooth is not None:
            smooth = smooth.detach().to(torch.float32).reshape(-1)
            if smooth.numel() != self.in_features or not torch.isfinite(smooth).all() or bool((smooth <= 0).any()):
                raise ValueError(f"smooth must be [in] = [{self.in_features}] positive finite values")
            self.input_smooth = smooth.to(self.scale.device).clone()
        self.input_step = step.to(self.scale.device)
        self.input_qrange = (lo, hi)
        self.input_bits = None

    def _static_input(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        if self.input_smooth is not None:
            x32 = x32 / self.input_smooth
        lo, hi = self.input_qrange
        return (self.input_step * torch.round(x32 / self.input_step).clamp(lo, hi)).to(x.dtype)

    @property
    def w_int(self) -> torch.Tensor:
        """int8 ``[out, in]`` integer weights (unpacked)."""
        return unpack_nibbles(self.qweight) if self.packed else self.qweight.clone()

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat = s * (W_int - z) (+ offset)`` ``[out, in]``, computed in fp32, cast to ``dtype`` last."""
        g = self.in_features // self.scale.shape[1]
        w = self.w_int.to(torch.float32)
        if self.zero_point is not None:
            w = w - expand_groups(self.zero_point.to(torch.float32), g)
        w = expand_groups(self.scale.to(torch.float32), g) * w
        if self.offset is not None:
            w = w + expand_groups(self.offset, g)
        return w.to(dtype)

    def _kernel(self, x: torch.Tensor):
        """``lrqat_kernels.int4_linear`` when it exists and takes this layer, else None."""
        if not self.use_int4_kernel or not self.packed:
            return None
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # fp64: the exact dequantise path
            return None
        fn = getattr(_op_home("int4_linear"), "int4_linear", None)
        if fn is None:
            return None
        # The CPU kernel takes per-channel scales or groups that are a multiple of 8 columns.
        if x.device.type == "cpu" and self.group_size is not None and self.group_size % 8:
            return None
        return fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in]`` float -> ``[..., out]`` in x's dtype (activation quantisers as in LRQATLinear)."""
        if self.input_step is not None:
            x = self._static_input(x)
        x = _quant_act(x, self.input_bits, self.act_symmetric)
        kernel = self._kernel(x)
        if kernel is not None:
            y = kernel(x, self.qweight, self.scale, zero_point=self.zero_point, group_size=self.group_size,
                       bias=self.bias, bits=self.bits)
            if self.offset is not None:
                # x @ expand(offset)^T = (x summed per group) @ offset^T: [..., G] @ [G, out], fp32
                n_groups = self.offset.shape[1]
                xg = x.to(torch.float32).reshape(*x.shape[:-1], n_groups, self.in_features // n_groups).sum(-1)
                y = (y.to(torch.float32) + F.linear(xg, self.offset)).to(y.dtype)
        else:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x must be [..., in] = [..., {self.in_features}], got {tuple(x.shape)}")
            w = self.dequantize(x.dtype)
            y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return _quant_act(y, self.output_bits, self.act_symmetric)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantised weight (for inspection / export)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype, device=self.qweight.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        gran = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        store = "packed nibbles (uint8)" if self.packed else "int8"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {gran}, "
            f"symmetric={self.symmetric}, bias={self.bias is not None}, storage={store}"
            f"{', float offset' if self.offset is not None else ''}"
            f"{f', static input {self.input_qrange}' if self.input_step is not None else ''}{_act_repr(self)}"
        )
