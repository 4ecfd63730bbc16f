"""LR-QAT training loop (paper appendix B defaults) with exact, atomic checkpoint / resume.

Optimiser: AdamW, one learning rate for ``lora_A`` / ``lora_B`` and one for the scales ``s``,
betas (0.9, 0.95), weight decay 0, linear warm-up over the first 10 % of the steps then
linear decay to 0, L2 gradient clipping at 1.0. Everything except ``lora_A``, ``lora_B`` and
``scale`` is frozen by :func:`lrqat_kernels.prepare`. Scales stay fp32 whatever the compute dtype.

A checkpoint (``<out>/checkpoint/trainer_state.pt``, written to a temporary file then renamed)
holds the trainable tensors, the optimizer and scheduler states, the RNG states, the data
position (samples consumed) and the loss history; the frozen ``Phi0`` is rebuilt
deterministically by ``prepare`` and checked against a fingerprint. Resuming reproduces the
uninterrupted run's loss curve exactly on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._io import atomic_write, atomic_write_json, json_safe
from .api import lrqat_layers, prepare
from .config import LRQATConfig
from .data import WindowSampler, check_byte_fallback, evaluate_perplexity, load_tokenizer, read_text, tokenize

__all__ = [
    "TrainArgs",
    "fit",
    "DistillationLoss",
    "build_optimizer",
    "MasterWeights",
    "MasterAdamW",
    "linear_warmup_decay",
    "run_train",
    "load_causal_lm",
    "phi_fingerprint",
    "enable_layer_checkpointing",
    "progress_bar",
    "TrainingInterrupted",
]

STATE_FILE = "trainer_state.pt"


# Quantization arguments whose ``None`` in :class:`TrainArgs` means "not given": the documented
# default below for an FP ``--model``, the checkpoint's own value for an LR-QAT ``--model``.
# ``act_bits`` / ``kv_bits`` / ``compute_dtype`` (None: weight-only / the model's dtype) are
# "not given" when None too.
_CONFIG_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(LRQATConfig)}  # one source of the defaults: LRQATConfig
_QUANT_DEFAULTS = {k: _CONFIG_DEFAULTS[k] for k in ("bits", "symmetric", "rank", "alpha", "phi_format", "range_method",
                                                    "init", "svd_steps", "fuse_act_quant")}
_QUANT_OPTIONAL = ("act_bits", "kv_bits", "compute_dtype")
# None / the default is a value of its own for these: they count as given when they differ from the default.
_QUANT_IF_CHANGED = {k: _CONFIG_DEFAULTS[k] for k in ("group_size", "exclude", "target_modules", "learn_scale")}
_FLAG = {"symmetric": "--asymmetric", "fuse_act_quant": "--no-fuse-act-quant", "learn_scale": "learn_scale"}


def _check_optim_args(lr, lr_scale, max_grad_norm) -> None:
    for name, v in (("lr", lr), ("lr_scale", lr_scale), ("max_grad_norm", max_grad_norm)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            what = " (0 = no clipping)" if name == "max_grad_norm" else ""
            raise ValueError(f"{name} must be a finite number >= 0{what}, got {v!r}")


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

    def lrqat_config(self) -> LRQATConfig:
        """The :class:`LRQATConfig` of these arguments (fields left at None get the documented defaults)."""
        q = {k: (d if getattr(self, k) is None else getattr(self, k)) for k, d in _QUANT_DEFAULTS.items()}
        return LRQATConfig(
            **q, group_size=self.group_size, target_modules=self.target_modules, exclude=list(self.exclude),
            learn_scale=self.learn_scale, compute_dtype=self.compute_dtype, seed=self.seed, act_bits=self.act_bits,
            kv_bits=self.kv_bits,
        )

    def resolved(self, checkpoint: LRQATConfig | None = None, model_dtype: str | None = None) -> "TrainArgs":
        """A copy with every quantization field set to the value training uses.

        Without ``checkpoint`` (an FP ``--model``): the documented defaults fill the fields left at
        None. With the :class:`LRQATConfig` of an LR-QAT checkpoint: its values, and a ValueError
        naming the flag when one given here differs from it (training continues a checkpoint with
        its own quantization; ``model_dtype`` is its dtype, compared with a given ``compute_dtype``
        when the checkpoint kept the model's).
        """
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

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
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
        if self.resume and not os.path.isfile(os.path.join(self.out, "checkpoint", STATE_FILE)):
            raise ValueError(f"resume: no checkpoint at {os.path.join(self.out, 'checkpoint', STATE_FILE)} "
                             "(a different --out? --save-every 0 writes none before the end)")


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
)


def linear_warmup_decay(total_steps: int, warmup_steps: int):
    """LR multiplier: linear 0 -> 1 over ``warmup_steps`` (step ``i`` gets ``(i + 1) / warmup``), then
    linear decay to 0 at ``total_steps``."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return fn


class MasterWeights:
    """fp32 master copies of the bf16 trainable tensors: the optimizer steps these.

    Stepped in bf16, an update under half an ulp of the tensor is lost: with bf16 LoRA factors at
    lr 1e-4 only 4 % of ``lora_A`` moved in two AdamW steps (lr 1e-5: 0.2 %), so the tail of every
    linearly decayed run did next to nothing, and AdamW's moments were bf16 too. The model keeps
    its bf16 factors (the kernels build ``B @ A`` from them on tensor cores, and the merge uses the
    same values); after each step they take the masters' values, rounded to nearest. fp32 tensors
    (scales, fp16-compute factors) are their own masters.

    Args:
        params: the model's trainable tensors, in optimizer order.
    """

    def __init__(self, params):
        self.params = list(params)
        self.masters = [p.detach().float().clone() if p.dtype == torch.bfloat16 else p for p in self.params]
        self._of = {id(p): m for p, m in zip(self.params, self.masters)}

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer holds for model tensor ``p``."""
        return self._of[id(p)]

    @property
    def pairs(self):
        return [(p, m) for p, m in zip(self.params, self.masters) if m is not p]

    @torch.no_grad()
    def pull_grads(self) -> None:
        """Add the model's gradients into the masters' fp32 ``.grad`` and free them: after every
        micro-batch, accumulation happens in fp32; a second call without a new backward is a no-op."""
        for p, m in self.pairs:
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """The masters' values, rounded, into the model's tensors."""
        for p, m in self.pairs:
            p.copy_(m)

    def zero_grad(self) -> None:
        for p, m in self.pairs:
            p.grad = None
            m.grad = None

    def state_dict(self) -> list[torch.Tensor]:
        return [m.detach().cpu().clone() for _, m in self.pairs]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor] | None) -> None:
        """Masters from a checkpoint, or (``None``: a checkpoint of before master weights) the model's values."""
        pairs = self.pairs
        if state is not None and len(state) != len(pairs):
            raise ValueError(f"cannot resume: the checkpoint holds {len(state)} master tensors, the model {len(pairs)}")
        for i, (p, m) in enumerate(pairs):
            m.copy_(p if state is None else state[i])


class MasterAdamW(torch.optim.AdamW):
    """AdamW over :class:`MasterWeights`: a drop-in optimizer for the model's own tensors.

    ``step(closure=None)`` runs the closure, adds the model's gradients into the fp32 copies
    (:meth:`MasterWeights.pull_grads`; :func:`fit` does it after every micro-batch), steps the
    copies and writes their rounded values back into the model; ``zero_grad()`` clears both.
    ``state_dict()`` holds the copies too (``"lrqat_masters"``), so a resume from it is exact. A
    plain ``loss.backward(); opt.step(); opt.zero_grad()`` loop trains the bf16 factors as ``fit``
    does. ``param_groups`` hold the copies (LR schedulers work as usual); clip the model's
    parameters before ``step()`` (as HF's Trainer does), or call ``pull_grads()`` first and clip
    the groups' tensors (as ``fit`` does).
    """

    def __init__(self, groups, masters: MasterWeights, **kw):
        for g in groups:
            g["params"] = [masters.master(p) for p in g["params"]]
        super().__init__(groups, **kw)
        self.lrqat_masters = masters

    def pull_grads(self) -> None:
        self.lrqat_masters.pull_grads()

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.lrqat_masters.pull_grads()
        # AdamW's own step, not the hook-running wrapper torch puts on it once an AdamW exists:
        # this class's step (wrapped the same way) already ran the hooks
        adamw_step = torch.optim.AdamW.step
        if getattr(adamw_step, "hooked", False):
            adamw_step = adamw_step.__wrapped__
        adamw_step(self)
        self.lrqat_masters.push()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
        self.lrqat_masters.zero_grad()

    def state_dict(self):
        state = super().state_dict()
        state["lrqat_masters"] = self.lrqat_masters.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        masters = state_dict.pop("lrqat_masters", None)
        self.lrqat_masters.load_state_dict(masters)  # None (an AdamW state): the model's values
        super().load_state_dict(state_dict)


def build_optimizer(model: nn.Module, lr: float, lr_scale: float, *, betas=(0.9, 0.95), weight_decay: float = 0.0,
                    master_weights: bool = True):
    """AdamW with two parameter groups: ``lora`` (lora_A, lora_B) at ``lr``, ``scale`` at ``lr_scale``.

    With ``master_weights`` (default) and bf16 trainable tensors, a :class:`MasterAdamW`: the
    tensors are stepped through fp32 copies (``optimizer.lrqat_masters``), its groups hold the
    copies, and a plain backward / step / zero_grad loop works as with AdamW.

    The scales' ``requires_grad`` is set by this call: on when ``lr_scale > 0`` and the model's
    ``lrqat_config.learn_scale``, off otherwise (``lr_scale = 0`` is the paper's ``0*`` setting,
    ``s = s0``). A frozen state left by an earlier call, or saved in a checkpoint trained with
    ``lr_scale = 0``, does not stick. (A model without ``lrqat_config`` keeps its scales' state
    when ``lr_scale > 0``.)
    """
    config = getattr(model, "lrqat_config", None)
    learn = lr_scale > 0 and (config is None or bool(getattr(config, "learn_scale", True)))
    for _, layer in lrqat_layers(model):
        layer.scale.requires_grad_(learn and (config is not None or layer.scale.requires_grad))
    lora, scales, other = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (lora if leaf in ("lora_A", "lora_B") else scales if leaf == "scale" else other).append(p)
    if other:
        raise ValueError(f"unexpected trainable parameters outside lora_A/lora_B/scale: {len(other)} tensors")
    if lr_scale == 0:  # scales outside LRQATLinear layers (none in practice) freeze too
        for p in scales:
            p.requires_grad_(False)
        scales = []
    groups = [{"params": lora, "lr": lr, "name": "lora"}]
    if scales:
        groups.append({"params": scales, "lr": lr_scale, "name": "scale"})
    if not lora:
        raise ValueError("no trainable lora_A/lora_B parameters; was the model prepared?")
    half = [p for p in lora + scales if p.dtype == torch.float16]
    if half:
        raise ValueError(f"{len(half)} trainable tensors are float16: AdamW cannot train fp16 tensors (eps=1e-8 rounds "
                         "to 0, squared gradients underflow); keep them float32 (prepare(compute_dtype='float16') does)")
    kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=1e-8)
    masters = MasterWeights(lora + scales) if master_weights else None
    if masters is not None and masters.pairs:
        return MasterAdamW(groups, masters, **kw)
    opt = torch.optim.AdamW(groups, **kw)
    opt.lrqat_masters = None
    return opt


def phi_fingerprint(model: nn.Module) -> list:
    """Cheap checksum of every frozen ``Phi0`` (sum and sum of squares as float64)."""
    out = []
    for name, layer in lrqat_layers(model):
        p = layer.phi.detach().to(torch.float64)
        out.append([name, float(p.sum()), float((p * p).sum())])
    return out


def _memory_gb(device) -> float:
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (peak RSS)


def _base_dtype(model: nn.Module) -> str | None:
    """The dtype name of the model's frozen floating tensors (LoRA factors and scales may be fp32 in a
    bf16 / fp16 model)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "scale"):
            return str(p.dtype).replace("torch.", "")
    return None


class TrainingInterrupted(KeyboardInterrupt):
    """:func:`fit` stopped by SIGINT (Ctrl-C) or SIGTERM with a checkpoint directory: the checkpoint
    holds the last finished step, so a resume continues exactly. ``exit_status``: 128 + signal
    number (130 for SIGINT, 143 for SIGTERM), what ``lrqat train`` exits with."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: str):
        self.signum, self.step, self.steps, self.checkpoint = signum, step, steps, checkpoint
        self.exit_status = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} after step {step} of {steps}; {checkpoint} holds "
                         "it: run the same command with --resume to continue")


class _Stop(BaseException):
    """Raised by :class:`_Interrupts`' handler to leave a step being computed."""


class _Interrupts:
    """SIGINT / SIGTERM handlers for :func:`fit`'s loop (main thread only; the previous handlers come
    back afterwards). A signal leaves a step at once while its gradients are computed (nothing the
    checkpoint holds has changed yet); while a step is applied (optimizer, scheduler, history) or a
    checkpoint written it is held until that is done, so the state saved is always that of the last
    finished step. Rule and test: tests/test_reliability.py::test_sigterm_and_sigint_during_train_*."""

    def __init__(self):
        self.signum = None
        self.held = True
        self.previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if not self.held:
            self.held = True
            raise _Stop()

    def release(self) -> None:
        """From here a signal stops the step at once (one already received: now)."""
        self.held = False
        if self.signum is not None:
            self.held = True
            raise _Stop()

    def hold(self) -> None:
        self.held = True


_NO_TQDM_NOTED = False


def progress_bar(**kwargs):
    """``tqdm.auto.tqdm(**kwargs)``, or None when tqdm is not installed (noted once on stderr): a
    missing progress bar must not cost a run that has already spent its set-up."""
    global _NO_TQDM_NOTED
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _NO_TQDM_NOTED:
            print("lrqat: note: tqdm is not installed, so no progress bars (pip install tqdm)", file=sys.stderr)
            _NO_TQDM_NOTED = True
        return None
    return tqdm(**kwargs)


def _rng_states():
    """``(cpu, cuda)`` RNG states, as a checkpoint stores them."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x, labels=x, use_cache=False)
    return out.loss


class DistillationLoss:
    """Knowledge distillation from a frozen teacher (the floating-point model) as ``fit``'s loss.

    ``loss = T^2 * mean over tokens of KL(softmax(z_t / T) || softmax(z_s / T))`` with teacher
    logits ``z_t`` and student logits ``z_s`` ``[batch, seq, vocab]``, computed in fp32. Unlike the
    next-token loss it does not adapt the model to the training text: the student learns to
    reproduce the teacher, which isolates the repair of the quantisation damage.

    Args:
        teacher: the model to imitate (kept in eval mode, no gradients); same vocabulary.
        temperature: ``T`` > 0 (default 1).
    """

    def __init__(self, teacher: nn.Module, temperature: float = 1.0):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.teacher, self.temperature = teacher.eval().requires_grad_(False), float(temperature)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        with torch.no_grad():
            zt = self.teacher(input_ids=x, use_cache=False).logits.float() / t
        zs = model(input_ids=x, use_cache=False).logits.float() / t
        if zs.shape != zt.shape:
            raise ValueError(f"teacher logits {tuple(zt.shape)} and student logits {tuple(zs.shape)} differ (vocabulary?)")
        log_ps, log_pt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
        p_t = log_pt.exp()
        # A token the teacher gives no mass (logit -inf, p_t = 0) adds 0 (0 * log 0 = 0), not
        # 0 * (-inf) = NaN: tests/test_train.py::test_distillation_loss_teacher_neg_inf_logit.
        kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros_like(p_t)).sum(-1)
        return kl.mean() * (t * t)


def fit(
    model: nn.Module,
    sampler: WindowSampler,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    lr_scale: float,
    grad_accum: int = 1,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    betas=(0.9, 0.95),
    weight_decay: float = 0.0,
    ckpt_dir: str | None = None,
    save_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    desc: str = "LR-QAT",
    device=None,
    run_info: dict | None = None,
    log_every: int = 1,
    step_hook=None,
    master_weights: bool = True,
    loss_fn=None,
) -> dict:
    """Train the prepared ``model`` (a HF causal LM) on ``sampler``'s windows.

    Args:
        model: prepared model (only lora_A / lora_B / scale require grad).
        sampler: :class:`~lrqat_kernels.data.WindowSampler`; step ``i`` micro-batch ``j`` takes
            samples ``(i * grad_accum + j) * batch_size ...``.
        steps: optimizer steps of the whole run (the schedule spans them).
        ckpt_dir: where ``trainer_state.pt`` is written every ``save_every`` steps (and when
            ``stop_after`` or a signal interrupts), and read from when ``resume``. With it, SIGINT
            (Ctrl-C) and SIGTERM save the last finished step there and raise
            :class:`TrainingInterrupted` (a ``KeyboardInterrupt``); without it they act as usual.
        stop_after: stop after this many optimizer steps in this call (simulates an interruption).
        run_info: JSON-able dict stored in the checkpoint and compared on resume.
        step_hook: optional callable ``(seconds_of_the_step) -> None`` run after every step.
        master_weights: step bf16 trainable tensors through fp32 copies (:class:`MasterWeights`).
        loss_fn: ``(model, input_ids [batch, seq]) -> scalar loss``; default the next-token
            cross-entropy; :class:`DistillationLoss` for knowledge distillation.

    With fp16 loss scaling, a step whose gradients overflowed is skipped by the GradScaler (the
    scale shrinks): as HF's Trainer, it does not advance the learning-rate schedule, and its
    history row has ``"skipped": True`` (``grad_norm`` None).

    Returns:
        ``{"history": [{"step", "loss", "lr", "lr_scale", "grad_norm", "tokens_per_s", "skipped"}],
        "steps_done", "finished", "skipped_steps", "train_seconds", "tokens", "tokens_per_s",
        "peak_memory_gb", "resumed_from"}``. ``grad_norm`` is None without clipping
        (``max_grad_norm=0``) or when not finite. ``tokens`` / ``train_seconds`` / ``tokens_per_s``
        cover the whole run, across resumptions (checkpoints written before they were stored count
        from the resumption); ``peak_memory_gb`` is this call's.
    """
    _check_optim_args(lr, lr_scale, max_grad_norm)
    device = device or next(iter(model.parameters())).device
    # fp16 activations: dynamic loss scaling, so small activation gradients do not flush to zero
    # in the fp16 backward (the trainable tensors themselves are fp32, see modules.factor_dtype)
    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=fp16)
    opt = build_optimizer(model, lr, lr_scale, betas=betas, weight_decay=weight_decay, master_weights=master_weights)
    masters = opt.lrqat_masters
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    warmup = int(round(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps, warmup))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    history: list[dict] = []
    start = 0
    tokens_before, seconds_before = 0, 0.0  # of the run before a resumption
    resumed_from = None
    state_path = None if ckpt_dir is None else os.path.join(ckpt_dir, STATE_FILE)
    fingerprint = phi_fingerprint(model)

    if resume and state_path is not None and os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if run_info is not None and state.get("run_info") is not None:
            diff = {k: (state["run_info"].get(k), run_info.get(k)) for k in run_info if state["run_info"].get(k) != run_info.get(k)}
            if diff:
                raise ValueError(f"cannot resume: the run's arguments changed since the checkpoint ({diff}); use the same arguments or a new --out")
        if state["fingerprint"] != fingerprint:
            raise ValueError("cannot resume: the frozen Phi0 rebuilt from --model differs from the checkpoint's (different base model?)")
        saved = state["trainable"]
        names = [n for n, _ in trainable]
        if sorted(saved) != sorted(names):
            raise ValueError("cannot resume: the checkpoint's trainable tensors do not match the model's")
        with torch.no_grad():
            for n, p in trainable:
                p.copy_(saved[n])
        opt.load_state_dict(state["optimizer"])  # MasterAdamW: its fp32 copies too
        sched.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        history = list(state["history"])
        start = resumed_from = int(state["step"])
        tokens_before, seconds_before = int(state.get("tokens", 0)), float(state.get("train_seconds", 0.0))

    def save_state(step_done: int, rng=None) -> None:
        if state_path is None:
            return
        rng_cpu, rng_cuda = rng if rng is not None else _rng_states()
        _atomic_torch_save(
            {
                "step": step_done,
                "samples": step_done * grad_accum * batch_size,
                "trainable": {n: p.detach().cpu().clone() for n, p in trainable},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "rng_cpu": rng_cpu,
                "rng_cuda": rng_cuda,
                "history": history,
                "fingerprint": fingerprint,
                "run_info": run_info,
                "tokens": tokens_before + steps_run * tokens_per_step,
                "train_seconds": seconds_before + (time.perf_counter() - t_start),
            },
            state_path,
        )

    model.train()
    tokens_per_step = batch_size * grad_accum * sampler.seq_len
    bar = progress_bar(total=steps, initial=start, desc=desc, dynamic_ncols=True) if progress else None
    t_start = time.perf_counter()
    steps_run = 0
    done, rng_done = start, _rng_states()  # steps finished (of the whole run) and the RNG state after them
    interrupts = _Interrupts() if state_path is not None else None  # SIGINT / SIGTERM: save, then stop
    try:
        if interrupts is not None:
            interrupts.install()
        try:
            for step in range(start, steps):
                if interrupts is not None:
                    interrupts.release()  # a signal from here to hold() leaves this step unapplied
                t0 = time.perf_counter()
                loss_sum = 0.0
                for micro in range(grad_accum):
                    x = sampler.batch((step * grad_accum + micro) * batch_size, batch_size).to(device)
                    loss = (loss_fn or _lm_loss)(model, x)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {float(loss)} at step {step}; lower the learning rates")
                    scaler.scale(loss / grad_accum).backward()
                    if masters is not None:
                        masters.pull_grads()  # accumulate the micro-batches in fp32, not in the bf16 .grad
                    loss_sum += float(loss.detach())
                scaler.unscale_(opt)  # (a no-op without fp16) clipping sees the true gradients (masters: their fp32 ones)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(opt_params, max_grad_norm)) if max_grad_norm > 0 else None
                if interrupts is not None:
                    interrupts.hold()  # the step is applied whole (a signal now waits for the next release)
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}
                scale_before = scaler.get_scale() if fp16 else None
                scaler.step(opt)  # fp16: skipped when a gradient overflowed (the scale then shrinks)
                scaler.update()
                skipped = fp16 and scaler.get_scale() < scale_before
                if not skipped:  # as HF's Trainer: a skipped step does not advance the schedule
                    sched.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                rec = {
                    "step": step + 1,
                    "loss": loss_sum / grad_accum,
                    "lr": lrs.get("lora", 0.0),
                    "lr_scale": lrs.get("scale", 0.0),
                    "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                    "tokens_per_s": tokens_per_step / dt if dt > 0 else None,
                    "skipped": bool(skipped),
                }
                history.append(rec)
                steps_run += 1
                done, rng_done = step + 1, _rng_states()
                if step_hook is not None:
                    step_hook(dt)
                if bar is not None:
                    bar.update(1)
                    if (step + 1) % log_every == 0 or step + 1 == steps:
                        bar.set_postfix(
                            loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}",
                            mem=f"{_memory_gb(device):.2f}GB",
                        )
                if save_every and done % save_every == 0 and done < steps:
                    save_state(done)
                if stop_after is not None and steps_run >= stop_after and done < steps:
                    save_state(done)
                    break
        except _Stop:
            pass
        if interrupts is not None and interrupts.signum is not None:  # save the last finished step, stop
            interrupts.hold()
            save_state(done, rng_done)
            raise TrainingInterrupted(interrupts.signum, done, steps, os.path.dirname(state_path))
    finally:
        if interrupts is not None:
            interrupts.restore()
        if bar is not None:
            bar.close()
    elapsed = seconds_before + (time.perf_counter() - t_start)
    n_tok = tokens_before + steps_run * tokens_per_step
    return {
        "history": history,
        "steps_done": history[-1]["step"] if history else start,
        "finished": bool(history) and history[-1]["step"] == steps,
        "skipped_steps": sum(bool(h.get("skipped")) for h in history),
        "train_seconds": elapsed,
        "tokens": n_tok,
        "tokens_per_s": n_tok / elapsed if elapsed > 0 else 0.0,
        "peak_memory_gb": _memory_gb(device),
        "resumed_from": resumed_from,
    }


def enable_layer_checkpointing(model: nn.Module) -> None:
    """Layer-level activation checkpointing of a HF model (non-reentrant: works with frozen embeddings).

    Each decoder layer keeps only its input; its activations are recomputed in the backward.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError("--grad-checkpointing needs a HF model (activation_checkpointing_enable / gradient_checkpointing_enable)")


def disable_layer_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()


def resolve_device(device: str | None) -> str:
    """``device`` (default: cuda when available, else cpu); a CUDA device without CUDA is an error."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch.cuda.is_available() is False here; use --device cpu")
    return device


def check_window(model: nn.Module, seq_len: int, what: str = "seq_len") -> None:
    """A window must fit the model's context (``max_position_embeddings``, when it has one)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"{what}={seq_len} exceeds the model's max_position_embeddings={limit}")


def load_causal_lm(model_dir: str, *, device=None):
    """A HF causal LM directory (``from_pretrained``, local files only, saved dtype) or an LR-QAT
    checkpoint (``lrqat_config.json`` present, via :func:`~lrqat_kernels.load_pretrained`)."""
    from .api import META_FILE, load_pretrained

    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir} is not a directory")
    if os.path.isfile(os.path.join(model_dir, META_FILE)):
        model = load_pretrained(model_dir)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="auto")
    if device is not None:
        model.to(device)
    return model


def run_train(args: TrainArgs) -> dict:
    """``lrqat train``: load, prepare, train, save (``<out>/lrqat``, optionally ``<out>/quantized``), evaluate.

    Writes ``<out>/results.json`` and returns its content.
    """
    from .api import META_FILE, convert, save_pretrained

    args.validate()
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    args.lrqat_config()  # validates the quantization arguments before any loading
    model = load_causal_lm(args.model, device=device)  # range estimation then runs on the device
    eval_len = args.eval_seq_len or args.seq_len
    check_window(model, args.seq_len)
    check_window(model, eval_len, "eval_seq_len")
    tokenizer = load_tokenizer(args.model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    check_byte_fallback(tokenizer, vocab, args.model, args.byte_tokens)  # before the (long) prepare
    if os.path.isfile(os.path.join(args.model, META_FILE)):
        if getattr(model, "lrqat_stage", None) != "lrqat":
            raise ValueError(f"--model {args.model} is a converted (quantized) checkpoint; train from an FP or LR-QAT model")
        # continue training an LR-QAT checkpoint with its own config (a differing flag is an error)
        args = args.resolved(model.lrqat_config, _base_dtype(model))
        config = model.lrqat_config
    else:
        args = args.resolved()
        config = args.lrqat_config()
        prepare(model, config)
    if args.grad_checkpointing:
        enable_layer_checkpointing(model)
    ids = tokenize(read_text(args.data), tokenizer, vocab)
    sampler = WindowSampler(ids, args.seq_len, seed=args.seed)
    eval_ids = None
    if args.eval_data:  # read before training: a bad file must not cost the run
        eval_ids = tokenize(read_text(args.eval_data), tokenizer, vocab)
        if eval_ids.numel() < eval_len:
            raise ValueError(f"eval_data {args.eval_data} has {eval_ids.numel()} tokens, fewer than one window of {eval_len}")
    run_info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items() if k in _RESUME_KEYS}
    result = fit(
        model, sampler, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        lr_scale=args.lr_scale, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, betas=args.betas,
        weight_decay=args.weight_decay, ckpt_dir=os.path.join(args.out, "checkpoint"), save_every=args.save_every,
        resume=args.resume, stop_after=args.stop_after, progress=args.progress, device=device, run_info=run_info,
    )
    out = {
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()},
        "lrqat_config": config.to_dict(),
        "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
        "train_tokens_available": int(ids.numel()),
        **{k: v for k, v in result.items() if k != "history"},
        "final_loss": result["history"][-1]["loss"] if result["history"] else None,
        "history": result["history"],
    }
    if result["finished"]:
        model.eval()
        out["lrqat_dir"] = save_pretrained(model, os.path.join(args.out, "lrqat"), tokenizer=tokenizer)
        if eval_ids is not None:
            out["eval_lrqat"] = evaluate_perplexity(model, eval_ids, eval_len, batch_size=args.batch_size)
        if args.convert:
            if args.grad_checkpointing:
                disable_layer_checkpointing(model)
            convert(model)
            out["quantized_dir"] = save_pretrained(model, os.path.join(args.out, "quantized"), tokenizer=tokenizer)
            if eval_ids is not None:
                out["eval_quantized"] = evaluate_perplexity(model, eval_ids, eval_len, batch_size=args.batch_size)
    out = json_safe(out)  # null, not NaN / Infinity, for missing or non-finite values
    atomic_write_json(os.path.join(args.out, "results.json"), out)
    return out

