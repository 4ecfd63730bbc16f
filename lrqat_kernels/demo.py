"""``lrqat demo``: LR-QAT end to end on a small LLaMA trained on the spot, offline, on CPU.

Data: the English text that ships with Python (``pydoc_data.topics``, the help texts of the
language reference, ~470 KB), byte-level tokens (vocab 256). Topics are sorted by name; every
tenth topic (index % 10 == 5) is held out for evaluation, the rest is training text.

Steps (fixed seeds, deterministic on a given machine):
  1. pretrain a tiny ``LlamaForCausalLM`` (FP32) on the training text;
  2. RTN baselines: W4 and W3 per-channel, symmetric, ``s0`` from the L^4 range estimator;
  3. LR-QAT W4 and W3 (Phi0 in Q4.4 / Q3.5 fixed point, rank 32, LoRA init, scales learned),
     a short training on the same text;
  4. ``convert`` each LR-QAT model to packed INT-b and check that ``W_int`` equals the training
     forward's bit for bit and that the perplexity is unchanged (exactly on the dequantise path;
     to ~1e-8 relative through the deployment GEMM ``int4_linear``, whose fp32 sums run in
     another order);
  5. print a table, write ``results.json``, ``demo.png`` (when matplotlib is installed; else a
     one-line note) and the INT4 checkpoint ``int4_model/``
     under ``--out`` (``runs/demo``).

Model: LLaMA architecture, hidden 128, 4 layers, 4 heads, MLP 352, context 128 (0.82 M params);
FP pretraining: 500 steps of 32 x 128 bytes, AdamW 3e-3. LR-QAT: AdamW (0.9, 0.95), lr 1e-3
for A/B and the scales, 10 % warm-up then linear decay, 80 steps (W4) / 120 steps (W3).
About 3 minutes on 2 idle cores (threads: the faster of 2 and 1 is picked and re-checked while
training, since OpenMP spin-waiting makes 2 threads slow when other processes load the cores).

Perplexity: token-level, non-overlapping windows of 128 bytes of the held-out topics.
"Fraction recovered" = (ppl_RTN - ppl_LRQAT) / (ppl_RTN - ppl_FP). On a model this small and
this briefly pretrained, LR-QAT's extra training steps also improve the model itself, so at W4
(a tiny RTN gap) the fraction can exceed 100 %.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

__all__ = ["run_demo", "DEMO_SETTINGS", "QUICK_SETTINGS", "demo_texts"]

DEMO_SETTINGS = dict(
    hidden=128, layers=4, heads=4, intermediate=352, seq_len=128,
    fp_steps=500, fp_batch=32, fp_lr=3e-3, fp_weight_decay=0.1,
    qat_steps={4: 80, 3: 120}, qat_batch=32, qat_lr=1e-3, qat_lr_scale=1e-3, rank=32,
    eval_windows=256, seed=0, wa_presets=("W4A8KV4",),
)
QUICK_SETTINGS = dict(
    hidden=64, layers=2, heads=2, intermediate=128, seq_len=64,
    fp_steps=30, fp_batch=8, fp_lr=3e-3, fp_weight_decay=0.1,
    qat_steps={4: 6, 3: 6}, qat_batch=8, qat_lr=1e-3, qat_lr_scale=1e-4, rank=8,
    eval_windows=16, seed=0, wa_presets=("W4A8KV4",),
)


def demo_texts() -> tuple[str, str]:
    """``(train_text, heldout_text)`` from ``pydoc_data.topics`` (every 10th topic held out)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    train = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 != 5)
    held = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 == 5)
    return train, held


def _byte_ids(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def build_model(s: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"], max_position_embeddings=s["seq_len"],
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(s["seed"])
    return LlamaForCausalLM(cfg)


def pretrain_fp(model: nn.Module, sampler, s: dict, progress: bool = True, step_hook=None) -> list[float]:
    """Plain FP pretraining: AdamW (0.9, 0.95), weight decay, 5 % warm-up, linear decay to 0."""
    from .train import linear_warmup_decay, progress_bar

    steps = s["fp_steps"]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s["fp_weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s["fp_lr"], betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps, max(1, steps // 20)))
    losses = []
    bar = progress_bar(total=steps, desc="FP pretraining", dynamic_ncols=True) if progress else None
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        x = sampler.batch(step * s["fp_batch"], s["fp_batch"])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step_hook is not None:
            step_hook(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses


@torch.no_grad()
def rtn_model(model: nn.Module, bits: int, range_method: str = "lp:4", exclude=("lm_head",),
              group_size: int | None = None) -> nn.Module:
    """Copy of ``model`` with every targeted ``nn.Linear`` weight replaced by its RTN quantization
    (symmetric, per channel or per group of ``group_size`` input columns)."""
    from .init import estimate_scale, rtn_quantize

    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and not any(name == e or name.endswith("." + e) for e in exclude):
            s0 = estimate_scale(mod.weight, bits, range_method, group_size=group_size)
            mod.weight.copy_(rtn_quantize(mod.weight, s0, bits=bits, group_size=group_size))
    return m


def _weight_bytes(model: nn.Module) -> int:
    from .modules import LRQATLinear, QuantizedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, (LRQATLinear, QuantizedLinear, nn.Linear)):
            for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                total += t.numel() * t.element_size()
    return total


def _check_exact(lrqat: nn.Module, quant: nn.Module) -> bool:
    """W_int of every converted layer equals the one the LR-QAT forward computes (eager reference)."""
    from .formats import decode_phi
    from .modules import LRQATLinear
    from .reference import lowrank_product, quantize_z

    qmods = dict(quant.named_modules())
    for name, layer in lrqat.named_modules():
        if isinstance(layer, LRQATLinear):
            z = decode_phi(layer.phi, layer.bits, layer.phi_format) + lowrank_product(layer.lora_A.detach(), layer.lora_B.detach(), layer.alpha)
            w_int, _ = quantize_z(z, layer.bits)
            if not torch.equal(w_int.to(torch.int8), qmods[name].w_int):
                return False
    return True


def _auto_threads(model: nn.Module, batch: torch.Tensor) -> int:
    """The faster of all cores and one thread for a training step of ``model`` (timed on a copy).

    On an idle machine all cores win; on a machine whose cores other processes keep busy,
    OpenMP's spin-waiting makes multi-threaded steps of a model this small several times slower
    than a single thread. Timing three steps each (~2 s) picks the right one.
    """
    import time as _time

    n = os.cpu_count() or 1
    if n == 1:
        return 1
    probe = copy.deepcopy(model)
    best, best_t = n, float("inf")
    for threads in (n, 1):
        torch.set_num_threads(threads)
        times = []
        for _ in range(3):
            t0 = _time.perf_counter()
            probe(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            times.append(_time.perf_counter() - t0)
        t = min(times[1:])
        if t < best_t:
            best, best_t = threads, t
    probe.zero_grad(set_to_none=True)
    return best


class ThreadTuner:
    """Keep the faster of all cores / one thread while training, as other processes come and go.

    Every ``every`` steps the other setting runs for ``trial`` steps; the faster median wins.
    Results can differ in their last bits between thread counts (fp32 summation order), which the
    lp range search of a later LR-QAT run can turn into another scale candidate for a few rows: two
    full runs whose tuner ended at 2 and at 1 thread differed by up to 0.007 ppl (W4A8KV4). Pass
    ``threads`` (``--threads``) for repeatable numbers.
    """

    def __init__(self, every: int = 40, trial: int = 3):
        self.n = os.cpu_count() or 1
        self.every, self.trial = every, trial
        self.current = torch.get_num_threads()
        self.recent: list[float] = []
        self.trial_times: list[float] = []
        self.in_trial: int | None = None
        self.count = 0

    def __call__(self, seconds: float) -> None:
        self.count += 1
        if self.n == 1:
            return
        if self.in_trial is not None:
            self.trial_times.append(seconds)
            if len(self.trial_times) >= self.trial:
                base = sorted(self.recent[-self.trial:])[len(self.recent[-self.trial:]) // 2] if self.recent else float("inf")
                alt = sorted(self.trial_times)[self.trial // 2]
                if alt < base:
                    self.current, self.recent = self.in_trial, list(self.trial_times)
                torch.set_num_threads(self.current)
                self.in_trial, self.trial_times = None, []
            return
        self.recent = (self.recent + [seconds])[-10:]
        if self.count % self.every == 0:
            self.in_trial = 1 if self.current != 1 else self.n
            torch.set_num_threads(self.in_trial)


def run_demo(out_dir: str = "runs/demo", quick: bool = False, *, progress: bool = True, threads: int | None = None,
             overrides: dict | None = None, plot: bool = True) -> dict:
    """Run the demo (see module docstring); returns the results dict also written to ``results.json``."""
    from .api import convert, prepare
    from .checkpoint import save_pretrained
    from .config import LRQATConfig
    from .data import ByteTokenizer, WindowSampler, evaluate_perplexity
    from .formats import BYTES_PER_WEIGHT
    from .modules import QuantizedLinear
    from .train import fit

    t_start = time.perf_counter()
    s = dict(QUICK_SETTINGS if quick else DEMO_SETTINGS)
    s["qat_steps"] = dict(s["qat_steps"])
    if overrides:
        s.update(overrides)
    plot = plot and _can_plot()  # told now, not after minutes of training
    prev_threads = torch.get_num_threads()
    try:
        train_text, held_text = demo_texts()
        train_ids, held_ids = _byte_ids(train_text), _byte_ids(held_text)
        sampler = WindowSampler(train_ids, s["seq_len"], seed=s["seed"])
        fp = build_model(s)
        auto_threads = threads is None
        threads = threads or _auto_threads(fp, sampler.batch(0, s["fp_batch"]))
        torch.set_num_threads(threads)

        def ppl(m):
            return evaluate_perplexity(m, held_ids, s["seq_len"], batch_size=32, max_windows=s["eval_windows"])["perplexity"]

        say = print if progress else (lambda *a, **k: None)
        say(f"[demo] data: pydoc_data.topics, {train_ids.numel():,} training bytes, {held_ids.numel():,} held-out bytes; threads={threads}")
        n_params = sum(p.numel() for p in fp.parameters())
        t0 = time.perf_counter()
        tuner = ThreadTuner() if auto_threads else None
        fp_losses = pretrain_fp(fp, sampler, s, progress=progress, step_hook=tuner)
        timings = {"fp_pretrain_s": time.perf_counter() - t0}
        rows = [{"method": "FP32", "bits": None, "ppl": ppl(fp)}]
        for bits in (4, 3):
            rows.append({"method": f"RTN W{bits} per-channel", "bits": bits, "ppl": ppl(rtn_model(fp, bits))})

        qat = {}
        for key in (4, 3, *s["wa_presets"]):
            if isinstance(key, str):  # weight-activation preset, e.g. "W4A8KV4": INT4 weights, 80 steps
                cfg = LRQATConfig.preset(key, rank=s["rank"], phi_format="fixed_point", range_method="lp:4", seed=s["seed"])
                bits, tag = cfg.bits, key
            else:
                cfg = LRQATConfig(bits=key, rank=s["rank"], phi_format="fixed_point", range_method="lp:4", seed=s["seed"])
                bits, tag = key, f"W{key}"
            m = prepare(copy.deepcopy(fp), cfg)
            ppl_init = ppl(m)
            qsampler = WindowSampler(train_ids, s["seq_len"], seed=s["seed"] + 1)
            t0 = time.perf_counter()
            res = fit(
                m, qsampler, steps=s["qat_steps"][bits], batch_size=s["qat_batch"], lr=s["qat_lr"],
                lr_scale=s["qat_lr_scale"], progress=progress, desc=f"LR-QAT {tag}", step_hook=tuner,
            )
            timings[f"lrqat_{tag.lower()}_s"] = time.perf_counter() - t0
            m.eval()
            ppl_qat = ppl(m)
            q = convert(copy.deepcopy(m))
            exact = _check_exact(m, q)
            ppl_q = ppl(q)  # deployment path: lrqat_kernels.int4_linear when present
            QuantizedLinear.use_int4_kernel = False
            try:
                ppl_q_exact = ppl(q)  # exact dequantise path: the same ops as the LR-QAT forward
            finally:
                QuantizedLinear.use_int4_kernel = True
            qat[key] = dict(model=m, quant=q, ppl_init=ppl_init, ppl=ppl_qat, ppl_converted=ppl_q, exact=exact,
                            ppl_converted_exact=ppl_q_exact, losses=[h["loss"] for h in res["history"]])
            wa = isinstance(key, str)
            rows.append({"method": f"LR-QAT {tag} per-channel (Q{bits}.{8 - bits})", "bits": bits, "ppl": ppl_qat,
                         "ppl_at_init": ppl_init, "steps": s["qat_steps"][bits], "weight_activation": wa})
            rows.append({"method": f"LR-QAT {tag} -> converted INT{bits} (packed)", "bits": bits, "ppl": ppl_q,
                         "ppl_exact_dequant": ppl_q_exact, "w_int_bit_exact": exact, "weight_bytes": _weight_bytes(q),
                         "weight_activation": wa})
        fp_ppl = rows[0]["ppl"]
        rtn = {r["bits"]: r["ppl"] for r in rows if r["method"].startswith("RTN")}
        for r in rows:
            r["gap_vs_fp"] = r["ppl"] - fp_ppl
            if r["method"].startswith("LR-QAT") and "converted" not in r["method"] and not r["weight_activation"]:
                gap = rtn[r["bits"]] - fp_ppl
                r["fraction_recovered"] = (rtn[r["bits"]] - r["ppl"]) / gap if gap > 0 else float("nan")
        rows[0]["weight_bytes"] = _weight_bytes(fp)

        out_dir = os.path.abspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        save_pretrained(qat[4]["quant"], os.path.join(out_dir, "int4_model"), tokenizer=ByteTokenizer())
        n_lin = sum(mm.weight.numel() for n, mm in fp.named_modules() if isinstance(mm, nn.Linear) and not n.endswith("lm_head"))
        phi_table = [{"phi_format": f, "bytes_per_weight": b, "phi0_bytes_this_model": int(b * n_lin)} for f, b in BYTES_PER_WEIGHT.items()]
        result = {
            "metric": f"perplexity, token = byte, non-overlapping windows of {s['seq_len']} tokens, "
                      f"{s['eval_windows']} windows max of the held-out pydoc topics",
            "model": {"arch": "LlamaForCausalLM", "params": n_params, "hidden": s["hidden"], "layers": s["layers"],
                      "quantized_linear_weights": n_lin},
            "settings": {k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}) for k, v in s.items()},
            "quick": quick,
            "threads": threads if tuner is None else {"start": threads, "end": tuner.current},
            "rows": rows,
            "phi_formats": phi_table,
            "fraction_recovered": {f"W{b}": next(r["fraction_recovered"] for r in rows if r.get("bits") == b and "fraction_recovered" in r) for b in (4, 3)},
            # W_int bit-identical and, on the exact dequantise path, the very same perplexity.
            "converted_equals_lrqat": {_tag(b): qat[b]["exact"] and qat[b]["ppl_converted_exact"] == qat[b]["ppl"] for b in qat},
            "converted_kernel_ppl_rel_diff": {_tag(b): abs(qat[b]["ppl_converted"] - qat[b]["ppl"]) / qat[b]["ppl"] for b in qat},
            # weight-activation LR-QAT vs weight-only W4 LR-QAT (same steps): perplexity difference
            "weight_activation_vs_w4": {k: qat[k]["ppl"] - qat[4]["ppl"] for k in qat if isinstance(k, str)},
            "timings_s": timings,
            "losses": {"fp": fp_losses, **{f"lrqat_{_tag(b).lower()}": qat[b]["losses"] for b in qat}},
        }
        result["timings_s"]["total_s"] = time.perf_counter() - t_start
        with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        if plot:
            _plot(result, os.path.join(out_dir, "demo.png"))
        if progress:
            print(format_table(result))
            print(f"[demo] wrote {out_dir}/results.json, {'demo.png, ' if plot else ''}int4_model/ in "
                  f"{result['timings_s']['total_s']:.0f} s")
        return result
    finally:
        torch.set_num_threads(prev_threads)


def _tag(key) -> str:
    return key if isinstance(key, str) else f"W{key}"


def format_table(result: dict) -> str:
    lines = [f"Metric: {result['metric']}", "",
             f"{'method':<44} {'ppl':>8} {'vs FP':>8} {'recovered':>10}  notes"]
    for r in result["rows"]:
        rec = f"{100 * r['fraction_recovered']:.0f}%" if "fraction_recovered" in r and math.isfinite(r["fraction_recovered"]) else ""
        notes = []
        if "ppl_at_init" in r:
            notes.append(f"init {r['ppl_at_init']:.4f}, {r['steps']} steps")
        if "w_int_bit_exact" in r:
            same = "identical" if r["ppl_exact_dequant"] == r["ppl"] else f"{r['ppl_exact_dequant']:.4f}"
            notes.append(f"W_int bit-exact: {r['w_int_bit_exact']}; exact-dequant ppl {same}; linear bytes {r['weight_bytes']:,}")
        lines.append(f"{r['method']:<44} {r['ppl']:>8.4f} {r['gap_vs_fp']:>+8.4f} {rec:>10}  {'; '.join(notes)}")
    lines += ["", "Phi0 storage (frozen base during LR-QAT):", f"{'phi_format':<12} {'bytes/weight':>12} {'this model':>12}"]
    for p in result["phi_formats"]:
        lines.append(f"{p['phi_format']:<12} {p['bytes_per_weight']:>12} {p['phi0_bytes_this_model']:>12,}")
    return "\n".join(lines)


def _can_plot() -> bool:
    """Whether matplotlib can draw ``demo.png``; if not, a one-line note on stderr. Rule: a missing
    optional package never costs the work (the plot step after minutes of training raised
    ModuleNotFoundError); tests/test_reliability.py::test_demo_without_matplotlib_skips_the_plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as e:
        print(f"[demo] note: no demo.png: matplotlib cannot be imported ({e}); pip install matplotlib for the plot",
              file=sys.stderr)
        return False
    return True


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["method"].replace(" per-channel", "").replace(" (packed)", "") for r in result["rows"]]
    vals = [r["ppl"] for r in result["rows"]]
    colors = ["tab:gray"] + ["tab:red"] * 2 + ["tab:blue", "tab:cyan"] * 2
    ax1.barh(range(len(vals)), vals, color=colors[: len(vals)])
    ax1.set_yticks(range(len(vals)), names, fontsize=8)
    ax1.invert_yaxis()
    lo = min(vals)
    ax1.set_xlim(lo * 0.97, max(vals) * 1.01)
    for i, v in enumerate(vals):
        ax1.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax1.set_xlabel("held-out perplexity (lower is better)")
    ax1.set_title("LR-QAT on a tiny LLaMA (pydoc topics, bytes)")
    for key, lab in (("lrqat_w4", "LR-QAT W4"), ("lrqat_w3", "LR-QAT W3")):
        ax2.plot(range(1, len(result["losses"][key]) + 1), result["losses"][key], label=lab)
    ax2.set_xlabel("LR-QAT step")
    ax2.set_ylabel("training loss (nats/byte)")
    ax2.legend()
    ax2.set_title("LR-QAT training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
