"""``LRQATConfig``: what :func:`lrqat_kernels.prepare` swaps in and how it initialises it.

Defaults follow the paper (section 3, appendix B) and ``docs/NUMERICS.md``:
W4 per-channel symmetric, rank 32, ``alpha = 1``, ``Phi0`` stored as fixed point (Q4.4),
``s0`` from the L^4 range estimator, LoRA initialisation, every ``nn.Linear`` except ``lm_head``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields

import torch

from .formats import PHI_FORMATS, check_bits, check_phi_format
from ._checks import check_act_bits
from .init import parse_range_method

__all__ = ["LRQATConfig", "COMPUTE_DTYPES", "METHODS", "PRESETS", "resolve_dtype"]

#: Quantization-aware training methods ``prepare`` can apply (docs/METHODS.md for L4Q and PE-QAT).
METHODS = ("lrqat", "l4q", "peqat")

#: Fields that belong to one method only (None = not given): ``(method, default when given None)``.
_METHOD_FIELDS = {
    "phi_format": ("lrqat", "fixed_point"),
    "scale_init": ("l4q", "l4q"),
    "grad_scale": ("l4q", None),
    "migration": ("peqat", 0.5),
    "clip_grad_scale": ("peqat", 1.0),
}

#: Weight-activation presets (paper Table 5: W-A-KV bits, INT4 per-channel weights).
PRESETS = {
    "W4A8KV8": dict(bits=4, act_bits=8, kv_bits=8),
    "W4A8KV4": dict(bits=4, act_bits=8, kv_bits=4),
    "W4A4KV4": dict(bits=4, act_bits=4, kv_bits=4),
}

#: Names accepted for ``compute_dtype`` and the torch dtype each stands for.
COMPUTE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = _DTYPE_ALIASES.get(name, name)
    if key not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None or one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[key]


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for k, v in COMPUTE_DTYPES.items():
            if v == dtype:
                return k
        raise ValueError(f"compute_dtype must be None or one of {sorted(COMPUTE_DTYPES)}, got {dtype}")
    resolve_dtype(dtype)
    return _DTYPE_ALIASES.get(dtype, dtype)


@dataclass
class LRQATConfig:
    """Configuration of the LR-QAT module swap (validated on construction).

    Attributes:
        method: ``"lrqat"`` (default), ``"l4q"`` (LoRA inside an LSQ quantiser with learned step and
            offset per group; ``W0`` kept in the compute dtype) or ``"peqat"`` (LoRA in weight units,
            W4A4 with learned smoothing and a static activation clip; needs ``act_bits`` and
            calibration data). docs/METHODS.md. Fields marked (lrqat) / (l4q) / (peqat) apply to that
            method only; setting one for another method is an error.
        bits: weight bit width ``b`` (2..8; 2..4 for ``packed_int``, 2..7 for ``fixed_point``).
        group_size: None for per-channel scales (one per output row), else the number of
            contiguous input columns sharing a scale; must divide every target layer's ``in``.
        symmetric: True for ``z = 0``; False adds a frozen integer zero point per channel/group.
        rank: rank ``r`` of ``lora_A [r, in]`` / ``lora_B [out, r]`` (paper default 32).
        alpha: ``C = alpha / r * lora_B @ lora_A`` (paper default 1.0).
        phi_format: (lrqat) storage of the frozen ``Phi0`` (``formats.PHI_FORMATS``; None:
            ``"fixed_point"``).
        scale_init: (l4q) initial step: ``"l4q"`` (min/max, nothing clipped; default) or ``"lsq"``.
        grad_scale: (l4q) LSQ gradient scale of ``s`` and ``b``; None: ``1 / sqrt(group * qmax)``.
        migration: (peqat) SmoothQuant migration strength of the smoothing init (default 0.5).
        clip_grad_scale: (peqat) factor on the clip threshold's gradient (default 1).
        range_method: range estimator for ``s0``: ``"minmax"`` or ``"lp:<p>"`` (default ``"lp:4"``).
        init: ``"lora"`` (``lora_B = 0``) or ``"svd"`` (LoftQ-style, ``svd_steps`` alternations).
            SVD init makes ``Phi0 + C`` fit ``W0 / s0`` better than ``Phi0`` alone
            (``tests/test_reference.py::test_svd_init_reduces_error``,
            ``tests/test_modules.py::test_svd_init_captures_fraction_for_packed_int``), but the
            forward rounds it: with an integer ``Phi0`` (``packed_int``) ``W_int`` differs from RTN
            only where ``|C| > 0.5``, and each such flip moves a weight off its nearest grid point,
            so the step-0 ``W_hat`` can be worse than RTN's. The paper found ``T = 1`` to recover
            INT-3's loss after training, and more steps or 4 bits not to help.
        svd_steps: alternations ``T`` of the SVD init.
        target_modules: None for every ``nn.Linear``; else a list of names. A name ``k`` matches
            module ``n`` when ``n == k``, ``n`` ends with ``"." + k`` or ``re.fullmatch(k, n)``.
        exclude: names never swapped, same matching rule (default ``["lm_head"]``).
        learn_scale: train the scale ``s`` (initialised to ``s0``); always fp32.
        compute_dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or None (keep the model's).
            ``lora_A``/``lora_B`` and the model are cast to it; ``scale`` stays fp32.
        seed: seed of the ``lora_A`` initialisation (layers draw in module order).
        act_bits: None (weight-only) or 4 / 8: dynamic per-token fake quantisation of every input
            to a matmul (the inputs of all swapped linears, and queries and keys after RoPE);
            the softmax output is not quantised (paper Table 5, OmniQuant placement).
        kv_bits: None or 4 / 8: the KV cache, i.e. the key and value projection outputs
            (``k_proj`` / ``v_proj``), per token. Needs ``act_bits``.
        act_symmetric: symmetric (z = 0) activation / KV grids; default asymmetric, as the paper.
        fuse_act_quant: on LLaMA / Mistral / Qwen2 decoder layers, quantise the shared input of
            q/k/v (and of gate/up) once, inside the RMSNorm that makes it
            (``ActQuantRMSNorm``, one fused kernel), instead of in each of those linears. The same
            model: the quantiser is a function of the tensor alone. Off: every linear quantises
            its own input. Norms feeding a linear that is not swapped stay unfused.

    Presets: ``LRQATConfig.preset("W4A8KV8" | "W4A8KV4" | "W4A4KV4", **overrides)``.
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    rank: int = 32
    alpha: float = 1.0
    phi_format: str | None = None
    range_method: str = "lp:4"
    init: str = "lora"
    svd_steps: int = 1
    target_modules: list[str] | None = None
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    learn_scale: bool = True
    compute_dtype: str | None = None
    seed: int = 0
    act_bits: int | None = None
    kv_bits: int | None = None
    act_symmetric: bool = False
    fuse_act_quant: bool = True
    method: str = "lrqat"
    scale_init: str | None = None
    grad_scale: float | None = None
    migration: float | None = None
    clip_grad_scale: float | None = None

    @classmethod
    def preset(cls, name: str, **overrides) -> "LRQATConfig":
        """A weight-activation preset of the paper's Table 5: ``"W4A8KV8"``, ``"W4A8KV4"``,
        ``"W4A4KV4"`` (per-channel INT4 weights, per-token activations and KV cache);
        ``overrides`` replace any field."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**dict(PRESETS[name], **overrides))

    def __post_init__(self):
        self.compute_dtype = _dtype_name(self.compute_dtype)
        if isinstance(self.target_modules, (str, tuple)):
            self.target_modules = [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)
        if isinstance(self.exclude, (str, tuple)):
            self.exclude = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude)
        if self.exclude is None:
            self.exclude = []
        if self.method in METHODS:
            for name, (owner, default) in _METHOD_FIELDS.items():
                if owner == self.method and getattr(self, name) is None:
                    setattr(self, name, default)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError/TypeError on a contradictory or malformed configuration."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name, (owner, _) in _METHOD_FIELDS.items():
            if owner != self.method and getattr(self, name) is not None:
                raise ValueError(f"{name} applies to method={owner!r} only, got {name}={getattr(self, name)!r} "
                                 f"with method={self.method!r}")
        if self.method != "lrqat":
            self._validate_sibling()
            return
        check_phi_format(self.phi_format)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int, got {type(self.bits).__name__}")
        if self.phi_format == "packed_int" and self.bits > 4:
            raise ValueError(
                f"phi_format='packed_int' packs two INT-b values per byte and needs bits <= 4, got bits={self.bits}; "
                "use phi_format='fixed_point' (bits <= 7) or a float format"
            )
        if self.phi_format == "fixed_point" and self.bits > 7:
            raise ValueError(f"phi_format='fixed_point' (Q b.(8-b)) needs bits <= 7, got bits={self.bits}")
        check_bits(self.bits, self.phi_format)
        self._validate_common()
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        parse_range_method(self.range_method, "range_method")
        if self.init not in ("lora", "svd"):
            raise ValueError(f"init must be 'lora' or 'svd', got {self.init!r}")
        if isinstance(self.svd_steps, bool) or not isinstance(self.svd_steps, int) or self.svd_steps < 1:
            raise ValueError(f"svd_steps must be an int >= 1, got {self.svd_steps!r}")
        for name in ("act_bits", "kv_bits"):
            check_act_bits(name, getattr(self, name), optional=True)
        if self.kv_bits is not None and self.act_bits is None:
            raise ValueError(
                f"kv_bits={self.kv_bits} needs act_bits: KV-cache quantisation is part of weight-activation "
                "quantisation (set act_bits=8 or 4, or use a preset such as 'W4A8KV4')"
            )
        for name in ("act_symmetric", "fuse_act_quant"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _validate_common(self) -> None:
        """The checks every method shares: group size, rank, alpha, targets, learn_scale, seed."""
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"group_size must be None (per-channel) or a positive int, got {self.group_size!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        for name in ("target_modules", "exclude"):
            val = getattr(self, name)
            if val is None and name == "target_modules":
                continue
            if not isinstance(val, list) or not all(isinstance(k, str) and k for k in val):
                raise TypeError(f"{name} must be a list of non-empty module names, got {val!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules must be None (every nn.Linear) or a non-empty list of names")
        if not isinstance(self.learn_scale, bool):
            raise TypeError(f"learn_scale must be a bool, got {self.learn_scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")

    def _validate_sibling(self) -> None:
        """The checks of ``method="l4q"`` / ``"peqat"`` (docs/METHODS.md)."""
        m = self.method
        check_bits(self.bits)
        self._validate_common()
        if self.symmetric is not True:
            raise ValueError(f"symmetric=False does not apply to method={m!r}: "
                             + ("the learned float offset b is its zero point" if m == "l4q" else "its grids are symmetric"))
        if self.init != "lora":
            raise ValueError(f"init={self.init!r} does not apply to method={m!r} (LoRA init only)")
        if self.kv_bits is not None:
            raise ValueError(f"kv_bits does not apply to method={m!r}, got kv_bits={self.kv_bits}")
        if m == "l4q":
            if self.act_bits is not None:
                raise ValueError(f"act_bits does not apply to method='l4q' (weight-only), got act_bits={self.act_bits}")
            if self.scale_init not in ("l4q", "lsq"):
                raise ValueError(f"scale_init must be 'l4q' or 'lsq', got {self.scale_init!r}")
            g = self.grad_scale
            if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < math.inf):
                raise ValueError(f"grad_scale must be None (LSQ: 1 / sqrt(group * qmax)) or a positive number, got {g!r}")
        else:
            if self.act_bits is None:
                raise ValueError("method='peqat' quantises activations: set act_bits (4 for W4A4, or 8), got act_bits=None")
            check_act_bits("act_bits", self.act_bits)
            if self.group_size is not None:
                raise ValueError(f"method='peqat' quantises weights per output channel: group_size must be None, "
                                 f"got {self.group_size}")
            mg = self.migration
            if isinstance(mg, bool) or not isinstance(mg, (int, float)) or not 0 < mg < 1:
                raise ValueError(f"migration must be in (0, 1), got {mg!r}")
            c = self.clip_grad_scale
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < math.inf:
                raise ValueError(f"clip_grad_scale must be a positive number, got {c!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return resolve_dtype(self.compute_dtype)

    def matches(self, name: str) -> bool:
        """True when module ``name`` is a target (``target_modules``) and not excluded."""
        if any(name_matches(name, k) for k in self.exclude):
            return False
        if self.target_modules is None:
            return True
        return any(name_matches(name, k) for k in self.target_modules)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        d["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LRQATConfig":
        if not isinstance(d, dict):
            raise TypeError(f"LRQATConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LRQATConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self, path: str | None = None, *, indent: int = 2) -> str:
        """JSON text of the config; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> "LRQATConfig":
        """Parse JSON text, or read it from a file path."""
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"LRQATConfig JSON is malformed: {e}") from e
        return cls.from_dict(d)


def name_matches(name: str, key: str) -> bool:
    """Whether module ``name`` matches a ``target_modules`` / ``exclude`` key: equal, a dotted suffix, or a full regex match."""
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False
