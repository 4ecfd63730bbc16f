"""The LR-QAT optimizer (paper appendix B): AdamW with one learning rate for ``lora_A`` / ``lora_B``
and one for the scales ``s``, linear warm-up then linear decay, and fp32 master copies of bf16
trainable tensors.

Defaults used by :func:`lrqat_kernels.train.fit`: betas (0.9, 0.95), weight decay 0, warm-up over the
first 10 % of the steps then linear decay to 0, L2 gradient clipping at 1.0. Scales stay fp32
whatever the compute dtype; bf16 LoRA factors are stepped through fp32 masters (:class:`MasterWeights`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .api import QUANTIZER_PARAMS, lrqat_layers

__all__ = ["build_optimizer", "MasterWeights", "MasterAdamW", "linear_warmup_decay"]


def _check_optim_args(lr, lr_scale, max_grad_norm) -> None:
    for name, v in (("lr", lr), ("lr_scale", lr_scale), ("max_grad_norm", max_grad_norm)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            what = " (0 = no clipping)" if name == "max_grad_norm" else ""
            raise ValueError(f"{name} must be a finite number >= 0{what}, got {v!r}")


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
        """Masters from a checkpoint, or (``None``: a plain AdamW state, which has none) the model's values."""
        pairs = self.pairs
        if state is not None and len(state) != len(pairs):
            raise ValueError(f"cannot resume: the checkpoint holds {len(state)} master tensors, the model {len(pairs)}")
        for i, (p, m) in enumerate(pairs):
            m.copy_(p if state is None else state[i])


class MasterAdamW(torch.optim.AdamW):
    """AdamW over :class:`MasterWeights`: a drop-in optimizer for the model's own tensors.

    ``step(closure=None)`` runs the closure, adds the model's gradients into the fp32 copies
    (:meth:`MasterWeights.pull_grads`; :func:`~lrqat_kernels.train.fit` does it after every micro-batch), steps the
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
    quantizer_leaves = {n for names in QUANTIZER_PARAMS.values() for n in names}
    for _, layer in lrqat_layers(model):
        for qname in QUANTIZER_PARAMS[type(layer)]:
            t = getattr(layer, qname)
            t.requires_grad_(learn and (config is not None or t.requires_grad))
    lora, scales, other = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (lora if leaf in ("lora_A", "lora_B") else scales if leaf in quantizer_leaves else other).append(p)
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
