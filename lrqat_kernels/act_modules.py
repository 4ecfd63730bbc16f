"""Activation-quantising layers of weight-activation LR-QAT, and how layers find their ops.

``ActQuantRMSNorm`` (LLaMA's RMSNorm whose output is fake-quantised per token) and
``ActQuantMLP`` (the gated-SiLU MLP whose product, the input of ``down_proj``, is fake-quantised
where it is made) are what ``prepare`` installs when ``LRQATConfig.act_bits`` is set (placement:
``wa_quant.py``). The helpers below give every layer (these and ``modules.LRQATLinear`` /
``QuantizedLinear``) its ``input_bits`` / ``output_bits`` / ``act_symmetric`` settings and run
the per-token quantiser.

Ops are looked up through :func:`_op`: the op's home module is imported once, on first use
(Triton and the extension load only when a layer first runs), and the function is read from it
at every call, so a test that patches ``lrqat_kernels.functions.lrqat_linear`` or
``lrqat_kernels.ops.act_quant.fake_quant_activation`` sees its calls
(``tests/test_modules.py::test_module_ops_are_looked_up_at_call_time``, ``tests/test_wa_quant.py``).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn as nn

from ._checks import check_act_bits
from .reference import rms_norm

__all__ = ["ActQuantMLP", "ActQuantRMSNorm"]


_HOMES: dict[str, ModuleType] = {}


def _op_home(name: str) -> ModuleType:
    """The module that defines the op ``name`` (imported on the first call, then cached; a plain
    dict, which ``torch.compile`` traces without a warning)."""
    home = _HOMES.get(name)
    if home is not None:
        return home
    if name in ("lrqat_linear", "fake_quant_weight", "merge_weight"):
        from . import functions as home
    elif name == "fake_quant_activation":
        from .ops import act_quant as home
    elif name == "rms_norm_fake_quant":
        from .ops import norm_act_quant as home
    elif name == "swiglu_fake_quant":
        from .ops import swiglu_act_quant as home
    elif name == "int4_linear":
        from .ops import int4_linear as home
    else:
        raise KeyError(f"no op named {name!r}")
    _HOMES[name] = home
    return home


def _op(name: str):
    """The op ``name`` (``lrqat_linear``, ``fake_quant_activation``, ...) as its home module holds it now."""
    return getattr(_op_home(name), name)


def _set_act_quant(mod: nn.Module, input_bits, output_bits, act_symmetric) -> None:
    """Weight-activation settings of a layer: per-token fake quantisation of its input
    (``input_bits``) and of its output (``output_bits``: the KV cache on k/v projections)."""
    for name, val in (("input_bits", input_bits), ("output_bits", output_bits)):
        check_act_bits(name, val, optional=True)
    if not isinstance(act_symmetric, bool):
        raise TypeError(f"act_symmetric must be a bool, got {act_symmetric!r}")
    mod.input_bits, mod.output_bits, mod.act_symmetric = input_bits, output_bits, act_symmetric


def _quant_act(x: torch.Tensor, bits, symmetric: bool) -> torch.Tensor:
    return x if bits is None else _op("fake_quant_activation")(x, bits, symmetric)


def _act_repr(mod) -> str:
    parts = []
    if mod.input_bits is not None:
        parts.append(f"input_bits={mod.input_bits}")
    if mod.output_bits is not None:
        parts.append(f"output_bits={mod.output_bits}")
    if parts and mod.act_symmetric:
        parts.append("act_symmetric=True")
    return "".join(", " + p for p in parts)


class ActQuantRMSNorm(nn.Module):
    """LLaMA's RMSNorm whose output is fake-quantised per token (weight-activation LR-QAT).

    Installed by ``prepare`` in place of a decoder layer's ``input_layernorm`` (output: the input
    of q/k/v) and ``post_attention_layernorm`` (output: the input of gate/up) when
    ``LRQATConfig.act_bits`` is set and ``fuse_act_quant`` is on (the default), so the shared input of those linears is quantised once, in the
    norm's kernel (``lrqat_kernels.rms_norm_fake_quant``: Triton on CUDA / TRITON_INTERPRET=1;
    on CPU the reference, op for op, bit-identical to the norm followed by the quantiser).
    The linears it feeds then have ``input_bits=None``.

    It keeps the original module's ``weight`` Parameter (same object, same state-dict key) and
    ``variance_epsilon``; ``output_bits=None`` makes it a plain RMSNorm.

    Shapes: ``x`` ``[..., hidden]`` -> ``[..., hidden]`` in ``promote_types(x.dtype, weight.dtype)``.
    """

    def __init__(self, weight: nn.Parameter, eps: float, output_bits: int | None = 8, act_symmetric: bool = False):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)
        _set_act_quant(self, None, output_bits, act_symmetric)

    @classmethod
    def from_norm(cls, norm: nn.Module, output_bits: int | None, act_symmetric: bool = False) -> "ActQuantRMSNorm":
        """Wrap a transformers ``*RMSNorm`` (``weight`` ``[hidden]`` and ``variance_epsilon``)."""
        weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or eps is None:
            raise TypeError(f"{type(norm).__name__} is not an RMSNorm with weight [hidden] and variance_epsilon")
        return cls(weight, eps, output_bits, act_symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_bits is None:
            return rms_norm(x, self.weight, self.variance_epsilon)
        return _op("rms_norm_fake_quant")(x, self.weight, self.variance_epsilon, self.output_bits, self.act_symmetric)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}" + _act_repr(self)


class ActQuantMLP(nn.Module):
    """LLaMA's MLP, ``down_proj(silu(gate_proj(x)) * up_proj(x))``, with the product (the input
    of ``down_proj``) fake-quantised per token where it is made (weight-activation LR-QAT).

    Installed by ``prepare`` in place of a LLaMA / Mistral / Qwen2 decoder layer's ``mlp`` when
    ``LRQATConfig.act_bits`` is set (and ``fuse_act_quant``): one kernel
    (``lrqat_kernels.swiglu_fake_quant``: Triton on CUDA / TRITON_INTERPRET=1; on CPU the
    reference, op for op) replaces silu, the product and ``down_proj``'s input quantiser;
    ``down_proj`` then has ``input_bits=None``. It keeps the original ``gate_proj``, ``up_proj``,
    ``down_proj`` and ``act_fn`` modules (same state-dict keys); ``output_bits=None`` makes it the
    plain MLP.

    Shapes: ``x`` ``[..., hidden]`` -> ``[..., hidden]``.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module | None = None,
                 output_bits: int | None = 8, act_symmetric: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        _set_act_quant(self, None, output_bits, act_symmetric)

    @staticmethod
    def is_swiglu(mlp: nn.Module) -> bool:
        """True for a transformers gated-SiLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, SiLU ``act_fn``)."""
        act = getattr(mlp, "act_fn", None)
        return (all(isinstance(getattr(mlp, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
                and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))

    @classmethod
    def from_mlp(cls, mlp: nn.Module, output_bits: int | None, act_symmetric: bool = False) -> "ActQuantMLP":
        if not cls.is_swiglu(mlp):
            raise TypeError(f"{type(mlp).__name__} is not a gate/up/down MLP with a SiLU act_fn")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, output_bits, act_symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.output_bits is None:
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(_op("swiglu_fake_quant")(gate, up, self.output_bits, self.act_symmetric))

    def extra_repr(self) -> str:
        return _act_repr(self).lstrip(", ")
