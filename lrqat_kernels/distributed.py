"""Data-parallel LR-QAT training under ``torchrun``: FSDP2 or DDP set-up, the sharded batch, the
reductions the wrappers do not make, distributed checkpoints (DCP) and the full model gathered on
rank 0.

``lrqat train`` started by ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` / ``RANK`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set) trains one model on ``N`` ranks:
:func:`setup` checks the launch and starts the process group, :func:`wrap` shards or replicates the
prepared model, :func:`lrqat_kernels.train.fit` takes the :class:`DistContext` and
:func:`gather_model` hands rank 0 a plain single-process model for ``save_pretrained`` /
``convert``. ``--distributed auto`` (the default) is DDP when ``WORLD_SIZE > 1`` (every rank holds
the whole model; no gathers): ``fsdp`` is for models whose ``Phi0`` and optimizer state do not fit
one GPU, at the price of an all-gather per decoder layer in the forward and the backward.

What each mode does with the tensors of an :class:`~lrqat_kernels.modules.LRQATLinear`:

* ``fsdp``: ``fully_shard`` on every decoder layer and on the root, ``MixedPrecisionPolicy(
  param_dtype=None, reduce_dtype=float32)``: every tensor is gathered in its own dtype (scales stay
  fp32, bf16 factors stay bf16), gradients are reduced in fp32. FSDP2 asks one dtype of a group's
  trainable tensors; when the factors are bf16 the fp32 scales are ``ignored_params``: replicated
  (4 bytes per scale, plus grad and two AdamW moments), their gradients averaged by
  :meth:`DistContext.reduce_replicated`. The fp32 masters of bf16 factors are DTensor shards.
  ``Phi0`` (int8 / uint8 nibbles) becomes a frozen parameter of the same name, so FSDP2 shards it
  (1/N per rank, gathered per layer); ``zero_point`` (one int8 per group) stays a replicated buffer.
* ``ddp``: ``DistributedDataParallel(find_unused_parameters=False)``, no buffer sync per forward:
  frozen tensors are not reduced, the ``Phi0`` buffers are never broadcast (every rank rebuilds the
  same ``Phi0`` from the same seed; :func:`check_same_model` compares fingerprints once).

Every micro-batch is reduced (no ``no_sync``): the fp32 masters accumulate reduced gradients, and
the reduced tensors are only the trainable ones (small). Rank ``r`` takes samples
``r * b / N .. (r + 1) * b / N - 1`` of each global micro-batch of ``b``: the mean of the ranks' mean
losses is the 1-rank loss, so the gradients are the 1-rank ones up to summation order
(tests/test_distributed.py::test_two_ranks_follow_the_one_rank_loss_curve).

Tested with ``--method lrqat`` only (L4Q / PE-QAT layers under ranks: not yet).

Size: about 450 lines: the launch checks, the two wrappers, the checkpoint format and the gathered
model belong together (each depends on the others' choices: what is sharded decides what DCP
saves and how rank 0 gets the full model).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import inspect
import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "MODES",
    "BACKENDS",
    "DistContext",
    "DistributedError",
    "launch_env",
    "setup",
    "wrap",
    "check_same_model",
    "gather_model",
    "save_checkpoint",
    "prune_checkpoints",
    "load_checkpoint",
    "clip_grad_norm_",
    "meta_skeleton",
    "is_comm_error",
]

MODES = ("auto", "fsdp", "ddp")
BACKENDS = ("auto", "gloo", "nccl")
DCP_PREFIX = "dcp-step"


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or stalled past the process group's timeout."""


@dataclasses.dataclass
class DistContext:
    """One rank's view of the run: ``mode`` ("fsdp" / "ddp"), ``rank``, ``world_size``, ``local_rank``,
    ``backend``, ``device``; ``forward_model`` is what computes the loss (the DDP wrapper, or the
    FSDP2 model itself); ``replicated``: trainable tensors outside FSDP2 whose gradients
    :meth:`reduce_replicated` averages."""

    mode: str
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float
    owns_group: bool = False
    forward_model: nn.Module | None = None
    fingerprint: list | None = None  # of the whole Phi0, taken before sharding (check_same_model)
    phi_bytes: int = 0  # bytes of Phi0 this rank holds (FSDP2: its shards)
    replicated: list = dataclasses.field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def lost(self, e: BaseException, where: str) -> DistributedError:
        """The one-line error of a failed collective at ``where``."""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        timeout = f"the {self.timeout_s:g} s timeout" if self.owns_group else "the process group's timeout"
        return DistributedError(f"rank {self.rank} of {self.world_size}: a collective failed {where} ({first}); another "
                                f"rank died or stalled past {timeout}: see its log")

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (fp64 sum, then / world size)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    @torch.no_grad()
    def reduce_replicated(self) -> None:
        """Average the gradients of the tensors FSDP2 leaves replicated (after every backward)."""
        for p in self.replicated:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world_size)

    def barrier(self, where: str) -> None:
        try:
            dist.barrier()
        except (RuntimeError, dist.DistError) as e:
            raise self.lost(e, where) from None

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def launch_env(environ=None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or None when ``WORLD_SIZE`` is unset."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    values = {}
    for name, least in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        raw = environ.get(name, environ.get("RANK", "0") if name == "LOCAL_RANK" else None)
        try:
            values[name] = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an int >= {least} (set by torchrun), got {raw!r}") from None
        if values[name] < least:
            raise ValueError(f"{name} must be an int >= {least} (set by torchrun), got {raw!r}")
    if values["RANK"] >= values["WORLD_SIZE"]:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={values['WORLD_SIZE']}), got {values['RANK']}")
    return values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]


def setup(distributed: str, backend: str, device: str | None, batch_size: int, timeout_s: float,
          environ=None) -> DistContext | None:
    """Check the launch and start the process group (every check runs on every rank before any
    collective: a bad launch fails on all of them, never hangs). None: a single-process run.

    Args:
        distributed: "auto" (DDP when ``WORLD_SIZE > 1``, else one process), "fsdp" or "ddp".
        backend: "auto" (nccl on CUDA, gloo on CPU), "gloo" or "nccl".
        device: ``--device`` (None: cuda when available, else cpu); CUDA ranks use ``cuda:LOCAL_RANK``.
        batch_size: the global micro-batch; each rank takes ``batch_size / WORLD_SIZE`` samples.
        timeout_s: the process group's timeout: a dead peer is an error after at most this long.
    """
    environ = os.environ if environ is None else environ
    if distributed not in MODES:
        raise ValueError(f"distributed must be one of {', '.join(MODES)}, got {distributed!r}")
    if backend not in BACKENDS:
        raise ValueError(f"dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"dist_timeout must be a number of seconds > 0, got {timeout_s!r}")
    env = launch_env(environ)
    if env is None or (distributed == "auto" and env[1] == 1):
        if distributed != "auto":
            raise ValueError(f"--distributed {distributed} needs torchrun's WORLD_SIZE / RANK / MASTER_ADDR / MASTER_PORT: "
                             "run it as torchrun --nproc_per_node N -m lrqat_kernels train ...")
        return None
    rank, world, local_rank = env
    mode = "ddp" if distributed == "auto" else distributed
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not divisible by WORLD_SIZE={world}: each rank takes batch_size / "
                         f"WORLD_SIZE samples of every micro-batch; use a multiple of {world}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch.cuda.is_available() is False here; use --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and (dev.type != "cuda" or not dist.is_nccl_available()):
        raise ValueError(f"--dist-backend nccl is not available here (device {dev}, NCCL "
                         f"{'built' if dist.is_nccl_available() else 'not built'}): it needs CUDA devices; use gloo on CPU")
    if backend == "gloo" and not dist.is_gloo_available():
        raise ValueError("--dist-backend gloo is not available in this torch build; use nccl on CUDA")
    ctx = DistContext(mode, rank, world, local_rank, backend, dev, float(timeout_s))
    if dist.is_initialized():  # a caller (a test, a notebook) started the group: use it, leave it open
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise ValueError(f"the process group already started is rank {dist.get_rank()} of {dist.get_world_size()}, "
                             f"the environment says rank {rank} of {world}")
        return ctx
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not set: run under torchrun, which sets them")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world)
    ctx.owns_group = True
    return ctx


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: a HF model's ``*DecoderLayer`` modules, else
    the children of its largest ``nn.ModuleList``."""
    layers = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Shard (fsdp; ``model`` may be on the CPU: each layer moves to ``ctx.device`` as it is sharded)
    or replicate (ddp) the prepared ``model`` on ``ctx.device``; sets
    ``ctx.forward_model`` and returns it. ``model`` keeps its names and attributes (FSDP2 shards in
    place; DDP wraps it)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if ctx.mode == "ddp":
        model.to(ctx.device)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # no buffer broadcast before every forward (Phi0 is the same on every rank; DDP's construction syncs once)
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}
        ctx.forward_model = DDP(model, device_ids=ids, find_unused_parameters=False, **no_sync)
        ctx.phi_bytes = _phi_bytes_here(model)
        return ctx.forward_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    ignored = set()
    if len({p.dtype for _, p in trainable}) > 1:  # bf16 factors, fp32 scales: FSDP2 wants one dtype per group
        ctx.replicated = [p for n, p in trainable if n.rsplit(".", 1)[-1] == "scale"]
        ignored = set(ctx.replicated)
        rest = {p.dtype for _, p in trainable if p not in ignored}
        if len(rest) > 1:
            raise ValueError(f"fsdp: the trainable tensors besides the scales have several dtypes ({sorted(map(str, rest))})")
    # Phi0 as a frozen parameter: FSDP2 shards parameters, not buffers, and gathers it with its layer
    # (mixed dtypes travel as bytes). Same name, so state dicts and checkpoints do not change.
    for m in model.modules():
        phi = m._buffers.get("phi") if "phi" in m._buffers else None
        if isinstance(phi, torch.Tensor) and not phi.is_floating_point():
            del m._buffers["phi"]
            m.register_parameter("phi", nn.Parameter(phi, requires_grad=False))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    # fully_shard moved each group's tensors to the device one layer at a time (a model prepared on
    # the CPU never sits whole on a GPU); what it does not manage follows: ignored scales, buffers
    with torch.no_grad():
        for p in ignored:
            p.data = p.data.to(ctx.device)
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None and b.device != ctx.device:
                    m._buffers[name] = b.to(ctx.device)
    ctx.forward_model = model
    ctx.phi_bytes = _phi_bytes_here(model)
    return model


def _phi_bytes_here(model: nn.Module) -> int:
    """Bytes of ``Phi0`` held by this rank (a DTensor: its local shard)."""
    total = 0
    for m in model.modules():
        t = m._parameters.get("phi") if "phi" in m._parameters else m._buffers.get("phi")
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
    return total


def check_same_model(ctx: DistContext, fingerprint) -> None:
    """Every rank must have built the same frozen ``Phi0`` (same ``--model``, same seed): ValueError
    on every rank otherwise."""
    seen = [None] * ctx.world_size
    try:
        dist.all_gather_object(seen, fingerprint)
    except (RuntimeError, dist.DistError) as e:
        raise ctx.lost(e, "while comparing the ranks' models") from None
    ctx.fingerprint = fingerprint
    bad = [r for r, f in enumerate(seen) if f != seen[0]]
    if bad:
        raise ValueError(f"ranks {bad} built a different frozen Phi0 than rank 0 (a different --model or files changed "
                         "while loading?): every rank must load the same model")


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, ctx: DistContext) -> torch.Tensor:
    """L2 clipping of gradients some of which are DTensor shards: the squared norms of the shards
    are summed over the ranks, those of replicated (plain) gradients counted once. Same
    coefficient as ``torch.nn.utils.clip_grad_norm_`` (``max_norm / (norm + 1e-6)``, at most 1)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = torch.zeros((), dtype=torch.float32, device=ctx.device)
    plain = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().float().pow(2).sum()
        else:
            plain += g.float().pow(2).sum()
    dist.all_reduce(sharded)
    total = (sharded + plain).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total


def _tensor_state(named_trainable, opt) -> dict:
    """The tensors of a resume point keyed by model name: the model's trainable tensors, the fp32
    masters and AdamW's moments (created as zeros when the optimizer has not stepped yet, so a
    load has tensors to fill). The optimizer holds the masters, not the model's tensors, so its
    state is keyed here by the model's names (``get_optimizer_state_dict`` maps the model's)."""
    masters = getattr(opt, "lrqat_masters", None)
    out = {"model": {}, "masters": {}, "optim": {}}
    for n, p in named_trainable:
        m = masters.master(p) if masters is not None else p
        out["model"][n] = p
        if m is not p:
            out["masters"][n] = m
        st = opt.state[m]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        out["optim"][n] = {k: st[k] for k in ("step", "exp_avg", "exp_avg_sq")}
    return out


def save_checkpoint(ckpt_dir: str, step: int, named_trainable, opt, ctx: DistContext | None) -> str:
    """Write the tensors of the resume point with ``torch.distributed.checkpoint`` (each rank its
    shards) into ``<ckpt_dir>/dcp-step<step>``; returns that name. The caller then writes
    ``trainer_state.pt`` on rank 0, which names it: that write is the commit point (an interrupted
    save leaves the previous state and its directory whole), then :func:`prune_checkpoints`."""
    import torch.distributed.checkpoint as dcp

    name = f"{DCP_PREFIX}{step}"
    path = os.path.join(ckpt_dir, name)
    if ctx is None or ctx.main:
        shutil.rmtree(path, ignore_errors=True)  # a leftover of a run that died before committing it
        os.makedirs(ckpt_dir, exist_ok=True)
    try:
        if ctx is not None:
            dist.barrier()
        dcp.save(_tensor_state(named_trainable, opt), checkpoint_id=path)
    except (RuntimeError, dist.DistError) as e:
        if ctx is None:
            raise
        raise ctx.lost(e, f"while saving the checkpoint of step {step}") from None
    return name


def prune_checkpoints(ckpt_dir: str, keep: str) -> None:
    """Remove the ``dcp-step*`` directories other than ``keep`` (rank 0, after the commit)."""
    for entry in os.listdir(ckpt_dir):
        if entry.startswith(DCP_PREFIX) and entry != keep:
            shutil.rmtree(os.path.join(ckpt_dir, entry), ignore_errors=True)


def load_checkpoint(ckpt_dir: str, name: str, named_trainable, opt, ctx: DistContext | None) -> None:
    """Fill the trainable tensors, masters and AdamW moments from ``<ckpt_dir>/<name>``; DCP
    reshards, so the run may have another number of ranks (one process included) than the one
    that saved it."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(ckpt_dir, name)
    if not os.path.isdir(path):
        raise ValueError(f"cannot resume: {path}, named by {ckpt_dir}/trainer_state.pt, does not exist")
    state = _tensor_state(named_trainable, opt)
    try:
        dcp.load(state, checkpoint_id=path)
    except (RuntimeError, dist.DistError) as e:
        if ctx is None or any(w in str(e).lower() for w in ("missing key", "size mismatch", "shape")):
            raise ValueError(f"cannot resume: {path} does not hold this model's trainable tensors ({str(e)[:200]})") from None
        raise ctx.lost(e, "while loading the checkpoint") from None
    with torch.no_grad():  # DCP may have replaced a tensor object instead of filling it: copy into place
        for n, p in named_trainable:
            if state["model"][n] is not p:
                p.copy_(state["model"][n])
        masters = getattr(opt, "lrqat_masters", None)
        for n, p in named_trainable:
            m = masters.master(p) if masters is not None else p
            if n in state["masters"] and state["masters"][n] is not m:
                m.copy_(state["masters"][n])
            for k, v in state["optim"][n].items():
                if opt.state[m][k] is not v:
                    opt.state[m][k].copy_(v)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and persistent buffers are on the meta device (no
    memory): rank 0 loads the gathered full state into it (:func:`gather_model`)."""
    memo = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in m.named_buffers(recurse=False):
            if b is not None and name not in m._non_persistent_buffers_set and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def gather_model(model: nn.Module, ctx: DistContext, skeleton: nn.Module | None) -> nn.Module | None:
    """The trained model as one plain single-process module on rank 0, None on the others (FSDP2:
    on the CPU; DDP: where it trained).
    DDP: the wrapped module itself. FSDP2: the full state dict gathered
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, a collective: every rank
    calls it) and loaded into ``skeleton`` (:func:`meta_skeleton`, made before sharding)."""
    if ctx.mode == "ddp":
        return model if ctx.main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    try:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    except (RuntimeError, dist.DistError) as e:
        raise ctx.lost(e, "while gathering the trained model") from None
    if not ctx.main:
        return None
    skeleton.load_state_dict(full, strict=True, assign=True)
    for name, p in skeleton.named_parameters():  # assign=True takes the loaded tensors' flags
        p.requires_grad_(model.get_parameter(name).requires_grad)
    if hasattr(skeleton, "tie_weights") and getattr(getattr(skeleton, "config", None), "tie_word_embeddings", False):
        skeleton.tie_weights()
    return skeleton  # on the CPU: a model FSDP2 had to shard need not fit rank 0's GPU whole


def is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` came from a collective (a dead or stalled peer), not from the computation."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection", "timed out", "socket",
                                                                   "peer", "broken pipe"))
