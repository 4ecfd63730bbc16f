"""``lrqat demo --compare-methods``: LR-QAT, L4Q and PE-QAT head to head on the demo's model.

One FP model (the demo's tiny LLaMA pretrained on ``pydoc_data.topics``), then each method with the
same data, steps, batch, learning rates and LoRA rank:

* W4 per-channel: RTN, LR-QAT, L4Q;
* W4 groups of 32: RTN, LR-QAT, L4Q (L4Q's paper uses groups);
* W4A4 (activations per token for LR-QAT, static and smoothed for PE-QAT): LR-QAT, PE-QAT.

Each row reports the held-out perplexity of the trained model and of its converted INT4 form (the
exact dequantise path), the trainable parameters, the median training step time on this CPU, and
the training memory the method needs at LLaMA-7B shapes (:func:`memory_7b`: weights, LoRA factors
and their optimizer state, the quantiser tensors; activations excluded, the same for every method).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time

import torch
import torch.nn as nn

__all__ = ["run_compare", "memory_7b", "METHOD_ROWS"]

#: (row name, LRQATConfig keyword arguments). ``rank`` and ``seed`` come from the demo settings.
METHOD_ROWS = [
    ("LR-QAT W4 per-channel", dict(method="lrqat", bits=4, phi_format="fixed_point")),
    ("L4Q W4 per-channel", dict(method="l4q", bits=4)),
    ("LR-QAT W4 g32", dict(method="lrqat", bits=4, group_size=32, phi_format="fixed_point")),
    ("L4Q W4 g32", dict(method="l4q", bits=4, group_size=32)),
    ("LR-QAT W4A4 (per-token A4)", dict(method="lrqat", bits=4, act_bits=4, act_symmetric=True, phi_format="fixed_point")),
    ("PE-QAT W4A4 (static A4)", dict(method="peqat", bits=4, act_bits=4)),
]

#: LLaMA-7B linear shapes ``(out, in)`` per decoder layer, 32 layers; embeddings and head stay bf16.
_LLAMA7B = dict(layers=32, linears=[(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)], vocab=32000, hidden=4096)


def memory_7b(method: str, *, rank: int = 32, group_size: int | None = None, phi_format: str = "fixed_point") -> dict:
    """Training bytes of ``method`` at LLaMA-7B shapes, exact accounting (no activations).

    Frozen base weight per element: LR-QAT's ``Phi0`` (``packed_int`` 0.5 B, ``fixed_point`` 1 B),
    L4Q's and PE-QAT's bf16 ``W0`` (2 B). Trainable tensor bytes per element: bf16 value + bf16
    gradient + fp32 master + two fp32 AdamW moments = 16 B for the LoRA factors; fp32 value + fp32
    gradient + two moments = 16 B for the quantiser tensors (scales; L4Q's offsets; PE-QAT's
    smoothing factors and clip thresholds). Embeddings and head: bf16, frozen.
    """
    from .formats import BYTES_PER_WEIGHT

    base_b = BYTES_PER_WEIGHT[phi_format] if method == "lrqat" else 2.0
    base = factors = quant = 0
    for out_f, in_f in _LLAMA7B["linears"]:
        groups = 1 if group_size is None else in_f // group_size
        base += out_f * in_f * base_b
        factors += rank * (in_f + out_f) * 16
        per_layer_q = {"lrqat": out_f * groups, "l4q": 2 * out_f * groups, "peqat": in_f + 1}[method]
        quant += per_layer_q * 16
    n = _LLAMA7B["layers"]
    emb = 2 * _LLAMA7B["vocab"] * _LLAMA7B["hidden"] * 2
    total = n * (base + factors + quant) + emb
    return {"base_weights_gb": n * base / 1e9, "lora_gb": n * factors / 1e9, "quantizer_gb": n * quant / 1e9,
            "embeddings_gb": emb / 1e9, "total_gb": total / 1e9}


def run_compare(out_dir: str = "runs/compare", quick: bool = False, *, progress: bool = True,
                threads: int | None = None, overrides: dict | None = None) -> dict:
    """Run the comparison (module docstring); returns the results also written to ``results.json``."""
    from .api import convert, prepare, trainable_parameters
    from .data import WindowSampler, evaluate_perplexity
    from .demo import DEMO_SETTINGS, QUICK_SETTINGS, _byte_ids, build_model, demo_texts, pretrain_fp, rtn_model
    from .config import LRQATConfig
    from .modules import QuantizedLinear
    from .train import fit

    t_start = time.perf_counter()
    s = dict(QUICK_SETTINGS if quick else DEMO_SETTINGS)
    if overrides:
        s.update(overrides)
    steps = s["qat_steps"][4]
    prev_threads = torch.get_num_threads()
    say = print if progress else (lambda *a, **k: None)
    try:
        torch.set_num_threads(threads or 1)
        train_text, held_text = demo_texts()
        train_ids, held_ids = _byte_ids(train_text), _byte_ids(held_text)
        sampler = WindowSampler(train_ids, s["seq_len"], seed=s["seed"])

        def ppl(m):
            return evaluate_perplexity(m, held_ids, s["seq_len"], batch_size=32, max_windows=s["eval_windows"])["perplexity"]

        fp = build_model(s)
        pretrain_fp(fp, sampler, s, progress=progress)
        rows = [{"method": "FP32", "ppl": ppl(fp)}]
        for g in (None, 32):
            rows.append({"method": f"RTN W4 {'per-channel' if g is None else f'g{g}'}", "ppl": ppl(rtn_model(fp, 4, group_size=g))})
        calib = sampler.batch(10_000, 8)
        for name, kw in METHOD_ROWS:
            say(f"[compare] {name}")
            cfg = LRQATConfig(rank=s["rank"], seed=s["seed"], **kw)
            m = prepare(copy.deepcopy(fp), cfg, calibration=calib if kw["method"] == "peqat" else None)
            counts = trainable_parameters(m)
            res = fit(m, WindowSampler(train_ids, s["seq_len"], seed=s["seed"] + 1), steps=steps,
                      batch_size=s["qat_batch"], lr=s["qat_lr"], lr_scale=s["qat_lr_scale"], progress=progress,
                      desc=name)
            step_s = [s["qat_batch"] * s["seq_len"] / h["tokens_per_s"] for h in res["history"] if h.get("tokens_per_s")]
            m.eval()
            row = {"method": name, "config": cfg.to_dict(), "ppl": ppl(m), "steps": steps,
                   "trainable_params": counts["trainable"], "step_s_median": statistics.median(step_s) if step_s else None,
                   "memory_7b": memory_7b(kw["method"], rank=32, group_size=kw.get("group_size"),
                                          phi_format=kw.get("phi_format") or "fixed_point")}
            q = convert(copy.deepcopy(m))
            QuantizedLinear.use_int4_kernel = False
            try:
                row["ppl_converted"] = ppl(q)  # exact dequantise path: the trained numerics
            finally:
                QuantizedLinear.use_int4_kernel = True
            rows.append(row)
        result = {
            "what": "LR-QAT vs L4Q vs PE-QAT on the demo's model: same FP model, data, steps, batch, lr, rank",
            "metric": f"perplexity, byte tokens, {s['eval_windows']} windows of {s['seq_len']} of held-out pydoc topics",
            "settings": {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in s.items()},
            "threads": threads or 1, "quick": quick, "rows": rows,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "total_s": time.perf_counter() - t_start,
        }
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        if progress:
            print(format_compare(result))
        return result
    finally:
        torch.set_num_threads(prev_threads)


def format_compare(result: dict) -> str:
    """The comparison as a text table."""
    lines = [f"Metric: {result['metric']}", "",
             f"{'method':<30} {'ppl':>8} {'converted':>10} {'trainable':>10} {'step s':>7} {'7B GB':>6}"]
    for r in result["rows"]:
        conv = f"{r['ppl_converted']:.4f}" if "ppl_converted" in r else ""
        tp = f"{r['trainable_params']:,}" if "trainable_params" in r else ""
        st = f"{r['step_s_median']:.3f}" if r.get("step_s_median") else ""
        mem = f"{r['memory_7b']['total_gb']:.2f}" if "memory_7b" in r else ""
        lines.append(f"{r['method']:<30} {r['ppl']:>8.4f} {conv:>10} {tp:>10} {st:>7} {mem:>6}")
    return "\n".join(lines)
