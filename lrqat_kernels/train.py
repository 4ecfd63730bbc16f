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
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._io import atomic_write, atomic_write_json
from .api import lrqat_layers, prepare
from .config import LRQATConfig
from .data import WindowSampler, evaluate_perplexity, load_tokenizer, read_text, tokenize

__all__ = [
    "TrainArgs",
    "fit",
    "build_optimizer",
    "linear_warmup_decay",
    "run_train",
    "load_causal_lm",
    "phi_fingerprint",
    "enable_layer_checkpointing",
]

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainArgs:
    """Arguments of ``lrqat train`` (see ``lrqat train --help``)."""

    model: str
    data: str
    out: str
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    rank: int = 32
    alpha: float = 1.0
    phi_format: str = "fixed_point"
    range_method: str = "lp:4"
    init: str = "lora"
    svd_steps: int = 1
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
    fuse_act_quant: bool = True

    def lrqat_config(self) -> LRQATConfig:
        return LRQATConfig(
            bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, rank=self.rank, alpha=self.alpha,
            phi_format=self.phi_format, range_method=self.range_method, init=self.init, svd_steps=self.svd_steps,
            target_modules=self.target_modules, exclude=list(self.exclude), learn_scale=self.learn_scale,
            compute_dtype=self.compute_dtype, seed=self.seed, act_bits=self.act_bits, kv_bits=self.kv_bits,
            fuse_act_quant=self.fuse_act_quant,
        )

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr < 0 or self.lr_scale < 0:
            raise ValueError(f"learning rates must be >= 0, got lr={self.lr}, lr_scale={self.lr_scale}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.seq_len < 2 or (self.eval_seq_len is not None and self.eval_seq_len < 2):
            raise ValueError(f"seq_len / eval_seq_len must be >= 2 (a window predicts its tokens after the first), "
                             f"got {self.seq_len} / {self.eval_seq_len}")
        if self.eval_data is not None and not os.path.exists(self.eval_data):
            raise ValueError(f"eval_data {self.eval_data} does not exist")
        if self.resume and not os.path.isfile(os.path.join(self.out, "checkpoint", STATE_FILE)):
            raise ValueError(f"resume: no checkpoint at {os.path.join(self.out, 'checkpoint', STATE_FILE)} "
                             "(a different --out? --save-every 0 writes none before the end)")


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


def build_optimizer(model: nn.Module, lr: float, lr_scale: float, *, betas=(0.9, 0.95), weight_decay: float = 0.0):
    """AdamW with two parameter groups: ``lora`` (lora_A, lora_B) at ``lr``, ``scale`` at ``lr_scale``.

    Parameters of a group whose learning rate is 0 are frozen (``requires_grad=False``), which
    is the paper's ``0*`` setting (``s = s0``).
    """
    lora, scales, other = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (lora if leaf in ("lora_A", "lora_B") else scales if leaf == "scale" else other).append(p)
    if other:
        raise ValueError(f"unexpected trainable parameters outside lora_A/lora_B/scale: {len(other)} tensors")
    if lr_scale == 0:
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
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=1e-8)


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


def _atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x, labels=x, use_cache=False)
    return out.loss


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
) -> dict:
    """Train the prepared ``model`` (a HF causal LM) on ``sampler``'s windows.

    Args:
        model: prepared model (only lora_A / lora_B / scale require grad).
        sampler: :class:`~lrqat_kernels.data.WindowSampler`; step ``i`` micro-batch ``j`` takes
            samples ``(i * grad_accum + j) * batch_size ...``.
        steps: optimizer steps of the whole run (the schedule spans them).
        ckpt_dir: where ``trainer_state.pt`` is written every ``save_every`` steps (and when
            ``stop_after`` interrupts), and read from when ``resume``.
        stop_after: stop after this many optimizer steps in this call (simulates an interruption).
        run_info: JSON-able dict stored in the checkpoint and compared on resume.
        step_hook: optional callable ``(seconds_of_the_step) -> None`` run after every step.

    Returns:
        ``{"history": [{"step", "loss", "lr", "lr_scale", "grad_norm", "tokens_per_s"}], "steps_done",
        "train_seconds", "tokens", "tokens_per_s", "peak_memory_gb", "resumed_from"}``.
    """
    device = device or next(iter(model.parameters())).device
    # fp16 activations: dynamic loss scaling, so small activation gradients do not flush to zero
    # in the fp16 backward (the trainable tensors themselves are fp32, see modules.factor_dtype)
    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=fp16)
    opt = build_optimizer(model, lr, lr_scale, betas=betas, weight_decay=weight_decay)
    warmup = int(round(warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps, warmup))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    history: list[dict] = []
    start = 0
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
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        history = list(state["history"])
        start = resumed_from = int(state["step"])

    def save_state(step_done: int) -> None:
        if state_path is None:
            return
        _atomic_torch_save(
            {
                "step": step_done,
                "samples": step_done * grad_accum * batch_size,
                "trainable": {n: p.detach().cpu().clone() for n, p in trainable},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "history": history,
                "fingerprint": fingerprint,
                "run_info": run_info,
            },
            state_path,
        )

    model.train()
    tokens_per_step = batch_size * grad_accum * sampler.seq_len
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, dynamic_ncols=True)
    t_start = time.perf_counter()
    steps_run = 0
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            loss_sum = 0.0
            for micro in range(grad_accum):
                x = sampler.batch((step * grad_accum + micro) * batch_size, batch_size).to(device)
                loss = _lm_loss(model, x)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)} at step {step}; lower the learning rates")
                scaler.scale(loss / grad_accum).backward()
                loss_sum += float(loss.detach())
            scaler.unscale_(opt)  # (a no-op without fp16) clipping sees the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else torch.tensor(float("nan"))
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}
            scaler.step(opt)  # fp16: skipped when a gradient overflowed (the scale then shrinks)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            rec = {
                "step": step + 1,
                "loss": loss_sum / grad_accum,
                "lr": lrs.get("lora", 0.0),
                "lr_scale": lrs.get("scale", 0.0),
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step / dt,
            }
            history.append(rec)
            steps_run += 1
            if step_hook is not None:
                step_hook(dt)
            if bar is not None:
                bar.update(1)
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                        mem=f"{_memory_gb(device):.2f}GB",
                    )
            done = step + 1
            if save_every and done % save_every == 0 and done < steps:
                save_state(done)
            if stop_after is not None and steps_run >= stop_after and done < steps:
                save_state(done)
                break
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    n_tok = steps_run * tokens_per_step
    return {
        "history": history,
        "steps_done": history[-1]["step"] if history else start,
        "finished": bool(history) and history[-1]["step"] == steps,
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
    config = args.lrqat_config()  # validates the quantization arguments before any loading
    model = load_causal_lm(args.model, device=device)  # range estimation then runs on the device
    eval_len = args.eval_seq_len or args.seq_len
    check_window(model, args.seq_len)
    check_window(model, eval_len, "eval_seq_len")
    if os.path.isfile(os.path.join(args.model, META_FILE)):
        if getattr(model, "lrqat_stage", None) != "lrqat":
            raise ValueError(f"--model {args.model} is a converted (quantized) checkpoint; train from an FP or LR-QAT model")
        config = model.lrqat_config  # continue training an LR-QAT checkpoint with its own config
    else:
        prepare(model, config)
    if args.grad_checkpointing:
        enable_layer_checkpointing(model)
    tokenizer = load_tokenizer(args.model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
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
    atomic_write_json(os.path.join(args.out, "results.json"), out)
    return out

