"""lrqat_kernels: fused kernels for Low-Rank Quantization-Aware Training (LR-QAT) of LLMs.

Public API only, and lazy (PEP 562): ``import lrqat_kernels`` imports neither torch nor Triton
nor the compiled extension ``_C``; each public name imports its home module on first access (``tests/test_imports.py::test_import_is_lazy``). ``_C`` is loaded by the ops that call
``torch.ops.lrqat.*`` natively (``_ext.load_extension`` / ``require_extension``), and its absence
never breaks an import.

``_PUBLIC`` below maps each public name to the module that defines it. The package's layers,
lowest first: formats -> _checks -> reference / ops -> init -> functions -> modules -> api ->
train -> cli; a module imports only from layers below its own (``tests/test_imports.py``).
"""

from __future__ import annotations

import importlib
import importlib.util

from ._version import __version__  # noqa: F401

#: Public name -> the module (relative to this package) that defines it.
_PUBLIC = {
    # storage formats of Phi0
    "BYTES_PER_WEIGHT": "formats",
    "PHI_FORMATS": "formats",
    "decode_phi": "formats",
    "encode_phi": "formats",
    "pack_nibbles": "formats",
    "qrange": "formats",
    "unpack_nibbles": "formats",
    # initialisation
    "estimate_scale": "init",
    "lora_init": "init",
    "rtn_quantize": "init",
    "svd_init": "init",
    # fused ops (Triton on CUDA / TRITON_INTERPRET=1, eager reference math on CPU)
    "fake_quant_weight": "functions",
    "lrqat_linear": "functions",
    "merge_weight": "functions",
    "fake_quant_activation": "ops.act_quant",
    "rms_norm_fake_quant": "ops.norm_act_quant",
    "swiglu_fake_quant": "ops.swiglu_act_quant",
    "int4_linear": "ops.int4_linear",
    # modules and the model-level API
    "LRQATConfig": "config",
    "LRQATLinear": "modules",
    "QuantizedLinear": "modules",
    "ActQuantRMSNorm": "act_modules",
    "ActQuantMLP": "act_modules",
    "prepare": "api",
    "convert": "api",
    "print_trainable_parameters": "api",
    "save_pretrained": "checkpoint",
    "load_pretrained": "checkpoint",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    """Import the home module of a public name (or a submodule) on first access, then cache it."""
    home = _PUBLIC.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    elif name != "_C" and not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a submodule (_C: only through _ext)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
