"""Exact LR-QAT training-memory accounting for LLaMA-2-7B shapes, without a GPU.

An accounting, not a timing: it stays a script (its output is the memory table of
bench/RESULTS.md and ``bench/results/memory_cpu.csv``); timings are the pytest-benchmark suite's
(``pytest bench --benchmark-only``, see bench/conftest.py).

Setting (paper Figure 1): LLaMA-2 7B, batch 1, sequence 1024, rank r = 32, BF16 compute,
W4 per-channel, AdamW. One full-size ``LlamaDecoderLayer`` (hidden 4096, MLP 11008, 32 heads,
SDPA attention) is built on the CPU in bf16, swapped to LR-QAT with ``lrqat_kernels.prepare``,
and run forward once at sequence 1024 under ``torch.autograd.graph.saved_tensors_hooks``;
every tensor autograd saves for backward is recorded and de-duplicated by storage (a storage
saved twice counts once; parameters and buffers are counted as weights, not activations).
The embedding, final norm, LM head and loss are measured the same way. Per-layer numbers are
multiplied by 32 layers.

Counted, per category:
  weights      Phi0 buffers (fixed_point: 1 B/weight, packed_int: 0.5 B/weight) + frozen bf16
               norms + frozen bf16 embeddings and LM head
  trainable    lora_A, lora_B (bf16) + scales (fp32)
  gradients    one per trainable parameter, in its dtype (fp32 for the bf16 ones: they live on the
               master copies, the bf16 gradients are freed when moved there)
  optimizer    AdamW: 2 fp32 states per trainable parameter (exp_avg, exp_avg_sq), plus the fp32
               master copy of every bf16 one (train.MasterWeights)
  activations  tensors saved for backward (see above)
  transient    the largest temporary of the backward: max(one W_hat + one dL/dW_hat of the
               largest linear in bf16 (what the recomputing Function materialises, one layer at
               a time), dL/dlogits + softmax in fp32 at the head)

Two LR-QAT linear implementations are measured:
  "current"    ``lrqat_kernels.lrqat_linear`` as installed: the fused dispatcher
               (``functions.LRQATLinearFunction``), which saves only its inputs (x, phi, lora_A,
               lora_B, scale, zero_point) and recomputes W_hat in the backward (the paper's
               checkpointing of W_hat); on CPU it runs eager math with the same saving rule;
  "reference"  ``lrqat_kernels.reference.lrqat_linear``: plain autograd over the eager ops, which
               keeps per-weight intermediates (clip mask, W_int, expanded scale, W_hat).
With layer checkpointing, a layer keeps only its input; during backward one layer's saved
tensors are rebuilt at a time (counted once as "recompute").

Usage:  PYTHONPATH=. python bench/bench_memory.py [--layers 32] [--seq 1024] [--quick]
Writes bench/results/memory_cpu.csv (one row per configuration, bytes and GB).

``--fsdp``: per-GPU memory of ``lrqat train --distributed fsdp`` (lrqat_kernels.distributed) on
N = 1, 2, 4, 8 GPUs for LLaMA-2-7B, LLaMA-2-13B and LLaMA-2-70B shapes (batch 1 per GPU, seq 1024,
r = 32, bf16, W4 per-channel, layer checkpointing, the current lrqat_linear), where each byte goes:
  Phi0         frozen Phi0: sharded (1/N; lrqat_kernels.distributed makes it a frozen parameter,
               since FSDP2 does not shard buffers)
  root         embeddings, final norm, LM head: FSDP2's root group, gathered from the forward to
               the end of the backward (the root is not resharded after its forward): whole
  norms        the decoder layers' norms: sharded (1/N)
  factors      lora_A / lora_B (bf16), their fp32 masters, fp32 gradients, 2 AdamW moments: 1/N
  scales       fp32 scales beside bf16 factors: FSDP2's ignored_params (one dtype per group), so
               replicated with their gradient and 2 moments (16 B per scale)
  FSDP buffers two layers' gathered Phi0 + norms + factors (current and prefetched) and one
               layer's unsharded factor gradients in bf16 and in fp32 (reduce dtype)
  activations  checkpointed layer inputs + one layer's recompute + head and loss (per GPU: batch 1)
  transient    as above (one W_hat + dL/dW_hat of the largest linear, or the head's fp32 logits)
Parameter and state bytes are exact (the tensors of LRQATLinear built structurally, no weights);
the saved-for-backward bytes of one layer are measured on a structural layer of the real width at
two short sequence lengths (they must scale linearly, checked) and scaled to seq.
Writes bench/results/memory_fsdp.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import lrqat_kernels  # noqa: E402
from lrqat_kernels import LRQATConfig, LRQATLinear, prepare  # noqa: E402
from lrqat_kernels import reference  # noqa: E402

GB = 1e9  # decimal GB, as the paper's "20.5 GB"
PAPER_Q44_GB = 20.5


def llama2_7b_config(seq: int, quick: bool):
    from transformers import LlamaConfig

    if quick:  # a scaled-down shape for the test suite (seconds)
        return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                           num_key_value_heads=4, num_hidden_layers=32, max_position_embeddings=seq,
                           attn_implementation="sdpa")
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, num_hidden_layers=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, attn_implementation="sdpa")


class SavedTensorCounter:
    """Record tensors saved for backward; de-duplicate by storage; split weights from activations."""

    def __init__(self, weight_storages: set[int]):
        self.weight_storages = weight_storages
        self.storages: dict[int, int] = {}
        self.weight_hits: dict[int, int] = {}
        self.count = 0

    def pack(self, t: torch.Tensor):
        self.count += 1
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.weight_storages:
            self.weight_hits[key] = st.nbytes()
        else:
            self.storages[key] = max(self.storages.get(key, 0), st.nbytes())
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def activation_bytes(self) -> int:
        return sum(self.storages.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_layer(cfg, phi_format: str, seed: int = 0):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(seed)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
    layer = layer.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0)
    # Range estimation does not change memory: minmax keeps the 7B-shape setup fast.
    prepare(layer, LRQATConfig(bits=4, rank=32, phi_format=phi_format, range_method="minmax", compute_dtype="bfloat16"))
    return layer


def measure_layer(layer, cfg, seq: int, path: str) -> dict:
    """Saved-activation bytes of one decoder layer forward (input requires grad, as for layers 2..32)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, seq, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq)[None]
    cos, sin = rope(x, pos)
    counter = SavedTensorCounter(_storages(layer) | {x.untyped_storage().data_ptr()})
    # Patch where LRQATLinear looks the op up (the package, and lrqat_kernels.functions if loaded).
    targets = [m for m in (lrqat_kernels, sys.modules.get("lrqat_kernels.functions")) if m is not None and hasattr(m, "lrqat_linear")]
    originals = [(m, m.lrqat_linear) for m in targets]
    if path == "reference":
        for m in targets:
            m.lrqat_linear = reference.lrqat_linear
    try:
        t0 = time.perf_counter()
        with counter.hooks():
            out = layer(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
        dt = time.perf_counter() - t0
    finally:
        for m, fn in originals:
            m.lrqat_linear = fn
    out = out[0] if isinstance(out, tuple) else out
    input_bytes = x.numel() * x.element_size()
    # The layer input is saved too (by the first norm / the first linears): count it once.
    act = counter.activation_bytes + input_bytes
    del out
    return {"saved_bytes": act, "input_bytes": input_bytes, "n_saved": counter.count, "forward_s": dt}


def measure_head(cfg, seq: int) -> dict:
    """Frozen bf16 embedding + final norm + LM head, and what the head + loss save for backward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.loss.loss_utils import ForCausalLMLoss

    with torch.device("meta"):
        embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    embed = embed.to_empty(device="cpu").to(torch.bfloat16).requires_grad_(False)
    head = head.to_empty(device="cpu").to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02)
    norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps).to(torch.bfloat16).requires_grad_(False)
    weights = _bytes(list(embed.parameters()) + list(head.parameters()) + list(norm.parameters()))
    h = torch.randn(1, seq, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (1, seq))
    counter = SavedTensorCounter(_storages(head) | _storages(norm) | {h.untyped_storage().data_ptr()})
    with counter.hooks():
        logits = head(norm(h))
        loss = ForCausalLMLoss(logits, labels, vocab_size=cfg.vocab_size)
    act = counter.activation_bytes + h.numel() * h.element_size()
    del loss, logits, embed, head
    return {"weights_bytes": weights, "saved_bytes": act}


def layer_param_bytes(layer) -> dict:
    phi, frozen, lora, scale = 0, 0, 0, 0
    lora_n, scale_n, master_n = 0, 0, 0
    for m in layer.modules():
        if isinstance(m, LRQATLinear):
            phi += _bytes([m.phi]) + (0 if m.zero_point is None else _bytes([m.zero_point]))
            lora += _bytes([m.lora_A, m.lora_B])
            lora_n += m.lora_A.numel() + m.lora_B.numel()
            if m.lora_A.dtype == torch.bfloat16:
                master_n += m.lora_A.numel() + m.lora_B.numel()
            scale += _bytes([m.scale])
            scale_n += m.scale.numel()
            if m.bias is not None:
                frozen += _bytes([m.bias])
    lrqat_ids = {id(t) for m in layer.modules() if isinstance(m, LRQATLinear) for t in m.parameters(recurse=False)}
    frozen += _bytes([p for p in layer.parameters() if id(p) not in lrqat_ids])
    return {"phi": phi, "frozen": frozen, "lora": lora, "scale": scale, "trainable_n": lora_n + scale_n, "master_n": master_n}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="scaled-down shapes (hidden 256) for tests")
    ap.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory_cpu.csv"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = llama2_7b_config(args.seq, args.quick)
    L, seq = args.layers, args.seq
    head = measure_head(cfg, seq)
    rows = []
    measured = {}
    for phi_format in ("fixed_point", "packed_int"):
        layer = build_layer(cfg, phi_format)
        pb = layer_param_bytes(layer)
        for path in ("current", "reference"):
            if path == "reference" and phi_format == "packed_int" and ("reference", "fixed_point") in measured:
                m = measured[("reference", "fixed_point")]  # the reference's saved tensors do not depend on the Phi0 format
            else:
                m = measure_layer(layer, cfg, seq, path)
            measured[(path, phi_format)] = m
            for ckpt in (False, True):
                weights = L * (pb["phi"] + pb["frozen"]) + head["weights_bytes"]
                trainable = L * (pb["lora"] + pb["scale"])
                grads = trainable + L * pb["master_n"] * 2  # bf16 ones: fp32 gradients on the masters
                optim = L * (pb["trainable_n"] * 2 * 4 + pb["master_n"] * 4)
                if ckpt:
                    acts = L * m["input_bytes"] + m["saved_bytes"] + head["saved_bytes"]
                else:
                    acts = L * m["saved_bytes"] + head["saved_bytes"]
                largest = max(m_.in_features * m_.out_features for m_ in layer.modules() if isinstance(m_, LRQATLinear))
                transient = max(2 * largest * 2, 2 * seq * cfg.vocab_size * 4)
                total = weights + trainable + grads + optim + acts + transient
                rows.append({
                    "model": "LLaMA-2-7B" if not args.quick else "LLaMA-7B-layout(quick, hidden 256)",
                    "phi_format": phi_format, "lrqat_linear": path, "layer_checkpointing": ckpt,
                    "layers": L, "batch": 1, "seq": seq, "rank": 32, "compute_dtype": "bfloat16",
                    "weights_bytes": weights, "trainable_bytes": trainable, "gradients_bytes": grads,
                    "optimizer_bytes": optim, "activations_bytes": acts, "transient_bytes": transient, "total_bytes": total,
                    "total_gb": round(total / GB, 3),
                    "per_layer_saved_bytes": m["saved_bytes"], "per_layer_input_bytes": m["input_bytes"],
                    "head_saved_bytes": head["saved_bytes"],
                    "torch": torch.__version__, "lrqat_kernels": lrqat_kernels.__version__,
                    "lrqat_linear_impl": f"{getattr(lrqat_kernels.lrqat_linear, '__module__', '?')}.{getattr(lrqat_kernels.lrqat_linear, '__name__', '?')}",
                    "cpu": platform.processor() or platform.machine(),
                })
        del layer
    print_table(rows)
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {args.csv}")
    return rows


# LLaMA-2 shapes (70B: grouped-query attention, 8 KV heads); vocabulary 32000.
FSDP_SHAPES = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                        num_hidden_layers=40),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        num_hidden_layers=80),
}
FSDP_QUICK_SHAPES = {"quick-a": dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4,
                                     num_hidden_layers=4),
                     "quick-b": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2,
                                     num_hidden_layers=8)}
AIMS = ((1, 80e9), (8, 24e9))  # 70B packed INT4: one 80 GB GPU; 8 x 24 GB with FSDP2


def structural_layer(cfg, phi_format: str, device="cpu"):
    """A decoder layer whose linears are LRQATLinear built structurally (zeros, no range
    estimation): the tensors and the saved-for-backward shapes of a prepared layer, no weights
    (``device="meta"``: the tensors' sizes only)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
    for name, m in list(layer.named_modules()):
        if isinstance(m, nn.Linear):
            parent, leaf = name.rsplit(".", 1)
            setattr(layer.get_submodule(parent), leaf, LRQATLinear(
                m.in_features, m.out_features, bits=4, rank=32, phi_format=phi_format, bias=m.bias is not None,
                dtype=torch.bfloat16, device="meta"))
    layer = layer.to(torch.bfloat16)  # norms bf16; scales and Phi0 keep their dtypes (LRQATLinear._keep_dtypes)
    if device != "meta":
        layer = layer.to_empty(device=device)
        with torch.no_grad():
            for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
                t.fill_(1 if name.endswith(("weight", "scale")) else 0)
    layer.requires_grad_(False)
    for m in layer.modules():
        if isinstance(m, LRQATLinear):
            for t in (m.lora_A, m.lora_B, m.scale):
                t.requires_grad_(True)
    return layer


def fsdp_accounting(name: str, shape: dict, seq: int, world_sizes=(1, 2, 4, 8), probes=(16, 32)) -> list[dict]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000 if not name.startswith("quick") else 512, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, attn_implementation="sdpa", **shape)
    L, H, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    layer = structural_layer(cfg, "packed_int")
    saved = {p: measure_layer(layer, cfg, p, "current")["saved_bytes"] for p in probes}
    linear_in_seq = saved[probes[1]] * probes[0] == saved[probes[0]] * probes[1]
    per_layer_saved = saved[probes[0]] * seq // probes[0]
    head = measure_head(cfg, seq)
    lin = [m for m in layer.modules() if isinstance(m, LRQATLinear)]
    lora_n = sum(m.lora_A.numel() + m.lora_B.numel() for m in lin)
    scale_n = sum(m.scale.numel() for m in lin)
    norms = _bytes([p for n, p in layer.named_parameters() if "norm" in n])
    largest = max(m.in_features * m.out_features for m in lin)
    rows = []
    for phi_format in ("fixed_point", "packed_int"):
        phi_layer = sum(_bytes([m.phi]) for m in structural_layer(cfg, phi_format, "meta").modules()
                        if isinstance(m, LRQATLinear))
        for n in world_sizes:
            parts = {
                "phi": L * phi_layer // n,
                "root": head["weights_bytes"],
                "norms": L * norms // n,
                # bf16 factor + fp32 master + fp32 gradient (on the master) + 2 fp32 moments = 18 B each
                "factors": L * lora_n * (2 + 4 + 4 + 8) // n,
                "scales": L * scale_n * (4 + 4 + 8),  # replicated: the scale, its gradient, 2 moments
                "fsdp_buffers": 0 if n == 1 else 2 * (phi_layer + norms + lora_n * 2) + lora_n * (2 + 4),
                "activations": L * seq * H * 2 + per_layer_saved + head["saved_bytes"],
                "transient": max(2 * largest * 2, 2 * seq * V * 4),
            }
            total = sum(parts.values())
            rows.append({"model": name, "phi_format": phi_format, "gpus": n, **{f"{k}_bytes": v for k, v in parts.items()},
                         "total_bytes": total, "total_gb": round(total / GB, 3), "seq": seq, "batch_per_gpu": 1,
                         "per_layer_saved_bytes": per_layer_saved, "saved_linear_in_seq": linear_in_seq})
    del layer
    return rows


def fsdp_main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description="per-GPU memory of LR-QAT under FSDP2 (lrqat train --distributed fsdp)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="two small shapes (seconds), for tests")
    ap.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory_fsdp.csv"))
    args = ap.parse_args(argv)
    rows = []
    for name, shape in (FSDP_QUICK_SHAPES if args.quick else FSDP_SHAPES).items():
        rows += fsdp_accounting(name, shape, args.seq)
    cols = ("phi", "root", "norms", "factors", "scales", "fsdp_buffers", "activations", "transient")
    hdr = f"{'model':<12} {'Phi0':<12} {'GPUs':>4} " + " ".join(f"{c[:9]:>9}" for c in cols) + f" {'TOTAL':>8}"
    print(f"LR-QAT per-GPU memory under FSDP2 (GB = 1e9 B), batch 1 per GPU, seq {args.seq}, r=32, bf16, W4 per-channel, "
          "layer checkpointing; GPUs 1 = one process, no FSDP2")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model']:<12} {r['phi_format']:<12} {r['gpus']:>4} " + " ".join(f"{r[c + '_bytes'] / GB:>9.2f}" for c in cols)
              + f" {r['total_bytes'] / GB:>8.2f}")
    bad = sorted({r["model"] for r in rows if not r["saved_linear_in_seq"]})
    print(f"\nsaved-for-backward bytes linear in seq (probes 16, 32): {'yes' if not bad else 'NO for ' + ', '.join(bad)}")
    for n, cap in AIMS:
        r = next((r for r in rows if r["model"] == "LLaMA-2-70B" and r["phi_format"] == "packed_int" and r["gpus"] == n), None)
        if r is not None:
            print(f"aim: 70B, packed INT4 Phi0, {n} GPU(s) of {cap / GB:.0f} GB: {r['total_bytes'] / GB:.1f} GB per GPU -> "
                  f"{'holds' if r['total_bytes'] <= cap else 'does NOT hold'}"
                  )
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {args.csv}")
    return rows


def print_table(rows) -> None:
    hdr = (f"{'Phi0':<12} {'lrqat_linear':<13} {'ckpt':<5} {'weights':>8} {'train':>7} {'grads':>7} {'AdamW':>7} "
           f"{'activ.':>8} {'transient':>9} {'TOTAL':>8}")
    print(f"LR-QAT training memory, {rows[0]['model']}, batch 1, seq {rows[0]['seq']}, r=32, bf16 (GB = 1e9 B)")
    print(f"paper (Q4.4, fig. 1): {PAPER_Q44_GB} GB; targets: <= 13 GB fixed_point, <= 10 GB packed_int\n")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['phi_format']:<12} {r['lrqat_linear']:<13} {'yes' if r['layer_checkpointing'] else 'no':<5} "
            f"{r['weights_bytes'] / GB:>8.2f} {r['trainable_bytes'] / GB:>7.2f} {r['gradients_bytes'] / GB:>7.2f} "
            f"{r['optimizer_bytes'] / GB:>7.2f} {r['activations_bytes'] / GB:>8.2f} {r['transient_bytes'] / GB:>9.2f} "
            f"{r['total_bytes'] / GB:>8.2f}"
        )
    r0 = rows[0]
    print(f"\nsaved for backward per decoder layer: current lrqat_linear ({r0['lrqat_linear_impl']}) "
          f"{rows[0]['per_layer_saved_bytes'] / 1e6:.1f} MB; eager reference {rows[2]['per_layer_saved_bytes'] / 1e6:.1f} MB; "
          f"layer input {r0['per_layer_input_bytes'] / 1e6:.1f} MB; head + loss {r0['head_saved_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    if "--fsdp" in sys.argv[1:]:
        fsdp_main([a for a in sys.argv[1:] if a != "--fsdp"])
    else:
        main()
