"""The LR-QAT training loop: :func:`fit` (exact, atomic checkpoint / resume; SIGINT / SIGTERM save the
last finished step), :class:`DistillationLoss`, and :func:`run_train`, the ``lrqat train`` workflow.

The optimizer (AdamW with fp32 masters, the schedule) is :mod:`lrqat_kernels.optim`; the arguments
of ``lrqat train`` are :class:`lrqat_kernels.cli.TrainArgs`. Everything except ``lora_A``, ``lora_B``
and ``scale`` is frozen by :func:`lrqat_kernels.api.prepare`.

A checkpoint (``<out>/checkpoint/trainer_state.pt``, :func:`lrqat_kernels.checkpoint.save_trainer_state`:
written atomically, the sha256 of its content recorded in it and checked on resume) holds the
trainable tensors, the optimizer and scheduler states, the RNG states, the data position (samples
consumed) and the loss history; the frozen ``Phi0`` is rebuilt deterministically by ``prepare`` and
checked against a fingerprint. Resuming reproduces the uninterrupted run's loss curve exactly on CPU.

Size: about 620 lines. ``fit`` is one loop of about 280 lines whose order of operations is the
exact-resume and signal contract (what the saved state holds at each point), for one process and
for the ranks of :mod:`lrqat_kernels.distributed` alike (one loop: a second would drift from it);
the signal handling, progress bar and model helpers beside it are the ones ``fit`` and
``run_train`` share.
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

import torch
import torch.nn as nn

from ._io import atomic_write_json, json_safe
from .api import convert, lrqat_layers, prepare
from .checkpoint import META_FILE, STATE_FILE, load_pretrained, load_trainer_state, save_pretrained, save_trainer_state
from .data import WindowSampler, check_byte_fallback, evaluate_perplexity, load_tokenizer, read_text, tokenize
from .distributed import (check_same_model, clip_grad_norm_, gather_model, is_comm_error, load_checkpoint, meta_skeleton,
                          prune_checkpoints, save_checkpoint, wrap)
from .distributed import setup as setup_distributed

# Re-exported: the optimizer's names lived here (demo.py and tests import them from train).
from .optim import MasterAdamW, MasterWeights, _check_optim_args, build_optimizer, linear_warmup_decay  # noqa: F401

__all__ = [
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


def phi_fingerprint(model: nn.Module) -> list:
    """Cheap checksum of every frozen ``Phi0`` (sum and sum of squares as float64)."""
    out = []
    for name, layer in lrqat_layers(model):
        p = (layer.phi if hasattr(layer, "phi") else layer.w0).detach().to(torch.float64)  # L4Q / PE-QAT: W0
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
    dist_ctx=None,
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
        dist_ctx: a :class:`~lrqat_kernels.distributed.DistContext` (``model`` already passed to
            :func:`~lrqat_kernels.distributed.wrap`): each rank takes its slice of every micro-batch,
            the logged loss is the ranks' mean, checkpoints are DCP directories named by
            ``trainer_state.pt`` (any number of ranks, one process included, resumes them), the
            progress bar is rank 0's, and SIGINT / SIGTERM act as usual (resume from ``save_every``).

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
    # under FSDP2 Phi0 is sharded: the whole one's fingerprint was taken before (check_same_model)
    fingerprint = phi_fingerprint(model) if dist_ctx is None or dist_ctx.fingerprint is None else dist_ctx.fingerprint

    fwd = model if dist_ctx is None else dist_ctx.forward_model  # what computes the loss (DDP: its wrapper)
    if resume and state_path is not None and os.path.isfile(state_path):
        state = load_trainer_state(state_path)  # ValueError naming the file when damaged
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
        if state.get("format") == "dcp":  # written by N ranks: DCP reshards it onto this run's ranks
            load_checkpoint(ckpt_dir, state["dcp_dir"], trainable, opt, dist_ctx)
            for group, saved_group in zip(opt.param_groups, state["param_groups"]):
                group.update(saved_group)
        elif dist_ctx is not None:
            raise ValueError(f"cannot resume {state_path} under torchrun (WORLD_SIZE={dist_ctx.world_size}): a single-process checkpoint "
                             "resumes in one process (a checkpoint written by several ranks resumes on any number)")
        else:
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
        if dist_ctx is not None:  # tensors: DCP, each rank its shards; the rest: rank 0's trainer_state.pt
            tensors = {"format": "dcp", "dcp_dir": save_checkpoint(ckpt_dir, step_done, trainable, opt, dist_ctx),
                       "trainable": [n for n, _ in trainable], "world_size": dist_ctx.world_size,
                       "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}
        else:
            tensors = {"trainable": {n: p.detach().cpu().clone() for n, p in trainable}, "optimizer": opt.state_dict()}
        if dist_ctx is not None and not dist_ctx.main:
            dist_ctx.barrier("after saving a checkpoint")
            return
        save_trainer_state(
            {
                "step": step_done,
                "samples": step_done * grad_accum * batch_size,
                **tensors,
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
        if dist_ctx is not None:  # trainer_state.pt names the new DCP directory: the older ones can go
            prune_checkpoints(ckpt_dir, tensors["dcp_dir"])
            dist_ctx.barrier("after saving a checkpoint")

    model.train()
    tokens_per_step = batch_size * grad_accum * sampler.seq_len
    main = dist_ctx is None or dist_ctx.main
    bar = progress_bar(total=steps, initial=start, desc=desc, dynamic_ncols=True) if progress and main else None
    t_start = time.perf_counter()
    steps_run = 0
    done, rng_done = start, _rng_states()  # steps finished (of the whole run) and the RNG state after them
    # SIGINT / SIGTERM: save, then stop (one process; ranks could not agree on the step to save)
    interrupts = _Interrupts() if state_path is not None and dist_ctx is None else None
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
                    first = (step * grad_accum + micro) * batch_size
                    if dist_ctx is None:
                        x = sampler.batch(first, batch_size).to(device)
                    else:  # this rank's slice of the global micro-batch
                        x = sampler.batch(first, batch_size, dist_ctx.rank, dist_ctx.world_size).to(device)
                    loss = (loss_fn or _lm_loss)(fwd, x)
                    value = float(loss.detach()) if dist_ctx is None else dist_ctx.mean(float(loss.detach()))
                    if not math.isfinite(value):  # the ranks' mean: every rank stops at the same step
                        raise FloatingPointError(f"loss is {value} at step {step}; lower the learning rates")
                    scaler.scale(loss / grad_accum).backward()
                    if dist_ctx is not None:
                        dist_ctx.reduce_replicated()  # tensors FSDP2 does not shard (fp32 scales beside bf16 factors)
                    if masters is not None:
                        masters.pull_grads()  # accumulate the micro-batches in fp32, not in the bf16 .grad
                    loss_sum += value
                scaler.unscale_(opt)  # (a no-op without fp16) clipping sees the true gradients (masters: their fp32 ones)
                grad_norm = None
                if max_grad_norm > 0 and dist_ctx is not None and dist_ctx.mode == "fsdp":
                    grad_norm = float(clip_grad_norm_(opt_params, max_grad_norm, dist_ctx))  # over the ranks' shards
                elif max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(opt_params, max_grad_norm))
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
        except Exception as e:
            if dist_ctx is None or not is_comm_error(e):
                raise
            raise dist_ctx.lost(e, f"in step {done + 1}") from None
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
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: lrqat runs on cpu or cuda (cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
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


def run_train(args) -> dict:
    """``lrqat train``: load, prepare, train, save (``<out>/lrqat``, optionally ``<out>/quantized``), evaluate.

    Args:
        args: a :class:`lrqat_kernels.cli.TrainArgs`.

    Under torchrun (``WORLD_SIZE`` set; ``args.distributed``): every rank loads and prepares the
    model, trains its slice of each batch (:mod:`lrqat_kernels.distributed`); rank 0 saves the
    gathered model and writes ``results.json``.

    Writes ``<out>/results.json`` and returns its content.
    """
    args.validate()
    ctx = setup_distributed(args.distributed, args.dist_backend, args.device, args.batch_size, args.dist_timeout)
    try:
        return _run_train(args, ctx)
    finally:
        if ctx is not None:
            ctx.close()


def _run_train(args, ctx) -> dict:
    torch.manual_seed(args.seed)
    if ctx is not None and not ctx.main:  # progress bars and logs: rank 0's only (HF's loading bar too)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    device = resolve_device(args.device) if ctx is None else str(ctx.device)
    args.lrqat_config()  # validates the quantization arguments before any loading
    # range estimation then runs on the device; FSDP2: on the CPU, the model is sharded onto the GPUs after
    load_device = "cpu" if ctx is not None and ctx.mode == "fsdp" else device
    model = load_causal_lm(args.model, device=load_device)
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
        calibration = None
        if config.method == "peqat":  # smoothing / clip init from the first training windows (docs/METHODS.md)
            calib_ids = tokenize(read_text(args.data), tokenizer, vocab)
            calibration = WindowSampler(calib_ids, args.seq_len, seed=args.seed).batch(0, args.batch_size).to(device)
        prepare(model, config, calibration=calibration)
    if args.grad_checkpointing:
        enable_layer_checkpointing(model)
    skeleton = None
    if ctx is not None:
        check_same_model(ctx, phi_fingerprint(model))
        skeleton = meta_skeleton(model) if ctx.mode == "fsdp" and ctx.main else None  # rank 0's gathered model
        wrap(model, ctx)
    ids = tokenize(read_text(args.data), tokenizer, vocab)
    sampler = WindowSampler(ids, args.seq_len, seed=args.seed)
    eval_ids = None
    if args.eval_data:  # read before training: a bad file must not cost the run
        eval_ids = tokenize(read_text(args.eval_data), tokenizer, vocab)
        if eval_ids.numel() < eval_len:
            raise ValueError(f"eval_data {args.eval_data} has {eval_ids.numel()} tokens, fewer than one window of {eval_len}")
    run_info = args.run_info()
    result = fit(
        model, sampler, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        lr_scale=args.lr_scale, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, betas=args.betas,
        weight_decay=args.weight_decay, ckpt_dir=os.path.join(args.out, "checkpoint"), save_every=args.save_every,
        resume=args.resume, stop_after=args.stop_after, progress=args.progress, device=device, run_info=run_info,
        dist_ctx=ctx,
    )
    out = {
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(args).items()},
        "lrqat_config": config.to_dict(),
        "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
        "train_tokens_available": int(ids.numel()),
        **({} if ctx is None else {"distributed": {"mode": ctx.mode, "world_size": ctx.world_size, "backend": ctx.backend,
                                                   "phi_bytes_per_rank": ctx.phi_bytes}}),
        **{k: v for k, v in result.items() if k != "history"},
        "final_loss": result["history"][-1]["loss"] if result["history"] else None,
        "history": result["history"],
    }
    final = model if ctx is None or not result["finished"] else gather_model(model, ctx, skeleton)  # None: not rank 0
    if final is not None and result["finished"]:
        model = final
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
    if ctx is None or ctx.main:
        atomic_write_json(os.path.join(args.out, "results.json"), out)
    return out


def __getattr__(name: str):
    """``train.TrainArgs``: moved to :mod:`lrqat_kernels.cli` (an alias for one release)."""
    if name == "TrainArgs":
        import warnings

        from .cli import TrainArgs

        warnings.warn("lrqat_kernels.train.TrainArgs moved to lrqat_kernels.cli.TrainArgs", DeprecationWarning, stacklevel=2)
        return TrainArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
