"""lrqat_kernels: fused kernels for Low-Rank Quantization-Aware Training (LR-QAT) of LLMs.

Public API only; the compiled extension ``lrqat_kernels._C`` is loaded lazily and its absence
never breaks ``import lrqat_kernels`` (see ``_ext.py``).
"""

__version__ = "0.1.0"

from . import _ext

# Registers torch.ops.lrqat.* (native schemas + their fakes) when _C is built; never raises.
_ext.load_extension()

from . import formats, reference  # noqa: F401,E402
from .formats import (  # noqa: F401
    BYTES_PER_WEIGHT,
    PHI_FORMATS,
    decode_phi,
    encode_phi,
    pack_nibbles,
    qrange,
    unpack_nibbles,
)
from .reference import estimate_scale, lora_init, rtn_quantize, svd_init  # noqa: F401

# The fused paths (Triton on CUDA / TRITON_INTERPRET, eager reference math on CPU) share the
# reference's signatures; functions.py registers the torch.ops.lrqat.* ops they run on.
from .functions import fake_quant_weight, lrqat_linear, merge_weight  # noqa: F401

# Model-level API (modules, prepare/convert, save/load). Appended last: modules call the ops above
# through the package attribute at call time, so the fused dispatchers apply transparently.
from .config import LRQATConfig  # noqa: E402,F401
from .modules import LRQATLinear, QuantizedLinear  # noqa: E402,F401
from .api import convert, load_pretrained, prepare, print_trainable_parameters, save_pretrained  # noqa: E402,F401
from .ops.int4_linear import int4_linear  # noqa: E402,F401  (deployment INT4 GEMM: C++ on CPU, GPU hook on CUDA)
from .ops.act_quant import fake_quant_activation  # noqa: E402,F401
from .ops.norm_act_quant import rms_norm_fake_quant  # noqa: E402,F401
from .modules import ActQuantRMSNorm  # noqa: E402,F401
from .ops.swiglu_act_quant import swiglu_fake_quant  # noqa: E402,F401
from .modules import ActQuantMLP  # noqa: E402,F401
