"""compressed-tensors ``pack-quantized`` writer (vLLM, llm-compressor, transformers).

Per quantised linear ``<m>`` (``o = 2^(b-1)``; facts sheet ``shared/design/EXPORTS.md`` section 1):

- ``<m>.weight_packed`` int32 ``[out, ceil(in * b / 32)]``: codes ``W_int + o``, a dense LSB-first
  bitstream along the input dim (:func:`~._common.pack_bitstream`; compressed-tensors >= 0.18).
- ``<m>.weight_scale`` ``[out, G]`` in ``scale_dtype`` (fp32 by default: exact).
- ``<m>.weight_zero_point`` int32 ``[ceil(out * b / 32), G]`` (asymmetric layers only): codes
  ``z + o`` packed the same way along the OUTPUT dim.
- ``<m>.weight_shape`` int64 ``[2]`` = ``[out, in]``; ``<m>.bias`` when the layer has one.

Every other tensor of the model (embeddings, norms, an excluded head) is written under its HF name
in its own dtype; a head tied to the input embedding is written once, as HF writes it. Readers
compute ``weight_scale * (unpacked - zero_point)`` in the scale's dtype, so with fp32 scales the
dequantised weight equals :meth:`~._common.QuantLayer.w_hat` bit for bit
(``tests/test_export_ct.py::test_decompressor_bit_exact``).
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
import torch.nn as nn

from .._io import atomic_write_json
from ._common import ExportError, QuantLayer, check_options, pack_bitstream, plan_head, save_safetensors, scale_rounding

__all__ = ["write", "validate_options", "OPTIONS", "MAX_SHARD_BYTES", "SCALE_DTYPES", "WEIGHTS_NAME", "INDEX_NAME"]

#: The writer's options and their defaults (anything else is refused).
OPTIONS = {"scale_dtype": "float32"}
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: A checkpoint larger than this is written as ``model-0000k-of-0000n.safetensors`` shards plus
#: ``model.safetensors.index.json`` (a layer's tensors stay in one shard).
MAX_SHARD_BYTES = 2 * 1024**3
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

#: Earliest compressed-tensors release whose ``unpack_from_int32`` reads what this writer packs.
#: b in {1, 2, 4, 8}: the dense bitstream equals the older "32 // b codes per word" layout; other
#: b (3, 5, 6, 7) need the dense layout of 0.18.0 (commit 66e631f6). Zero points packed along the
#: output dim: 0.9.4 and later.
_DENSE_LAYOUT_SINCE = "0.18.0"
_PACKED_ZP_SINCE = "0.9.4"
_PACK_QUANTIZED_SINCE = "0.9.0"

# vLLM's W{4,8}A16 kernels (facts sheet 1.6): what each refuses or serves slower.
_VLLM_BITS = (4, 8)
_VLLM_ASYM_BITS = (4,)
_MARLIN_GROUPS = (None, 32, 64, 128)
_MARLIN_OUT, _MARLIN_IN = 64, 128
# vLLM fuses these sibling projections into one layer: all must share one scheme (or all be ignored).
_FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _ct():
    """The installed compressed-tensors package (its validator and version are part of the export)."""
    try:
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as e:
        raise ExportError(f"format compressed-tensors needs the compressed-tensors package (pip install "
                          f"'compressed-tensors>=0.18'): {e}") from None
    return compressed_tensors.__version__, QuantizationConfig


def _scale_dtype(value) -> torch.dtype:
    if value is None:
        value = OPTIONS["scale_dtype"]
    if isinstance(value, torch.dtype):
        names = {v: k for k, v in SCALE_DTYPES.items()}
        if value in names:
            return value
    elif isinstance(value, str) and value.replace("torch.", "") in SCALE_DTYPES:
        return SCALE_DTYPES[value.replace("torch.", "")]
    raise ExportError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {value!r}")


def validate_options(options: dict) -> torch.dtype:
    """Refuse unknown option names and bad values (``export()`` calls this before loading the
    model); returns the scale dtype."""
    check_options("compressed-tensors", options, OPTIONS)
    return _scale_dtype(options.get("scale_dtype"))


def _names(names: list[str], first: int = 3) -> str:
    """``'5 layers (a, b, c, ...)'``: a compact list for warnings."""
    shown = ", ".join(names[:first]) + (", ..." if len(names) > first else "")
    return f"{len(names)} layer{'s' if len(names) != 1 else ''} ({shown})"


def _scheme_key(layer: QuantLayer) -> tuple:
    return (layer.bits, layer.group_size, layer.symmetric)


def _weights_args(key: tuple) -> dict:
    """compressed-tensors ``QuantizationArgs`` of a scheme, only long-standing keys (readers with
    ``extra="forbid"`` refuse unknown ones)."""
    bits, group_size, symmetric = key
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size is None else "group",
        "group_size": group_size,
        "dynamic": False,
    }


def _high_precision_linears(model: nn.Module, quantised: set[str]) -> list[str]:
    """Names of the model's ``nn.Linear`` modules that stay in high precision: the ``ignore`` list."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantised]


def quantization_config(layers: list[QuantLayer], ignore: list[str], version: str) -> dict:
    """The ``quantization_config`` entry of ``config.json``.

    One ``config_groups`` entry per distinct ``(bits, group_size, symmetric)``, in order of first
    appearance. Its ``targets`` is ``["Linear"]`` when a single scheme covers every quantised layer
    (every other ``nn.Linear`` is in ``ignore``), else the exact module names as anchored regexes.
    """
    schemes: dict[tuple, list[str]] = {}
    for layer in layers:
        schemes.setdefault(_scheme_key(layer), []).append(layer.name)
    groups = {}
    for i, (key, names) in enumerate(schemes.items()):
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{re.escape(n)}$" for n in names]
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": _weights_args(key),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": version,
    }


def _validate(qc: dict, QuantizationConfig) -> None:
    """Parse ``qc`` with compressed-tensors' own model; every scheme must read back as written."""
    try:
        parsed = QuantizationConfig.model_validate(qc)
    except Exception as e:  # pydantic.ValidationError and whatever an older release raises
        first = str(e).strip().splitlines()
        raise ExportError(f"compressed-tensors refuses the quantization_config: {' '.join(first[:3])}") from None
    for name, group in qc["config_groups"].items():
        w = parsed.config_groups[name].weights
        want = group["weights"]
        got = (w.num_bits, str(getattr(w.strategy, "value", w.strategy)), w.group_size, w.symmetric)
        exp = (want["num_bits"], want["strategy"], want["group_size"], want["symmetric"])
        if got[:2] != exp[:2] or got[3] != exp[3] or (exp[2] is not None and got[2] != exp[2]):
            raise ExportError(f"compressed-tensors reads config group {name} as {got}, written {exp}")
    if parsed.quantization_status != "compressed" and getattr(parsed.quantization_status, "value", None) != "compressed":
        raise ExportError(f"compressed-tensors reads quantization_status as {parsed.quantization_status!r}")


def _layer_tensors(layer: QuantLayer, sdt: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed tensors of one layer (the bias comes with the dense tensors)."""
    o = 1 << (layer.bits - 1)
    out = {
        f"{layer.name}.weight_packed": pack_bitstream(layer.w_int.to(torch.int16) + o, layer.bits),
        f"{layer.name}.weight_scale": layer.scale.to(sdt).contiguous(),
        f"{layer.name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if layer.zero_point is not None:
        zc = (layer.zero_point.to(torch.int16) + o).t()
        out[f"{layer.name}.weight_zero_point"] = pack_bitstream(zc, layer.bits).t().contiguous()
    return out


def _layer_nbytes(layer: QuantLayer, sdt: torch.dtype) -> int:
    b, n_out, n_in, g = layer.bits, layer.out_features, layer.in_features, layer.scale.shape[1]
    size = 4 * n_out * math.ceil(n_in * b / 32) + sdt.itemsize * n_out * g + 16
    if layer.zero_point is not None:
        size += 4 * math.ceil(n_out * b / 32) * g
    return size


def _plan(model, layers, dense, sdt) -> list[tuple[str, int, object]]:
    """Entries ``(name, nbytes, payload)`` in state-dict order; payload is a tensor or a QuantLayer."""
    by_name = {l.name: l for l in layers}
    entries, done = [], set()
    for key in list(model.state_dict().keys()) + list(dense):
        mod, _, leaf = key.rpartition(".")
        if mod in by_name and leaf != "bias":
            if mod not in done:
                done.add(mod)
                entries.append((mod, _layer_nbytes(by_name[mod], sdt), by_name[mod]))
        elif key in dense and key not in done:
            done.add(key)
            t = dense[key]
            entries.append((key, t.numel() * t.element_size(), t))
    for l in layers:  # a layer the state dict does not list (should not happen): still written
        if l.name not in done:
            entries.append((l.name, _layer_nbytes(l, sdt), l))
    return entries


def _shards(entries, limit: int) -> list[list]:
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size + e[1] > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e[1]
    if cur or not shards:
        shards.append(cur)
    return shards


def _write_weights(entries, sdt: torch.dtype, out_dir: str, skip: set[str]) -> tuple[list[str], int]:
    """Write the safetensors file(s); returns (file names, total bytes of tensors)."""
    shards = _shards(entries, MAX_SHARD_BYTES)
    files, weight_map, total = [], {}, 0
    for k, shard in enumerate(shards):
        fname = WEIGHTS_NAME if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, _, payload in shard:
            if name in skip:
                continue
            items = _layer_tensors(payload, sdt) if isinstance(payload, QuantLayer) else {name: payload}
            for key, t in items.items():
                tensors[key] = t
                total += t.numel() * t.element_size()
                weight_map[key] = fname
        save_safetensors(tensors, os.path.join(out_dir, fname))  # shared storage written as copies
        files.append(fname)
    if len(shards) > 1:
        atomic_write_json(os.path.join(out_dir, INDEX_NAME),
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        files.append(INDEX_NAME)
    return files, total


def _warnings(model, layers: list[QuantLayer], ignore: list[str], model_dtype: torch.dtype | None,
              quantised_head: str | None) -> list[str]:
    """One line per reason vLLM would refuse or degrade the checkpoint (facts sheet 1.6)."""
    reasons: dict[str, list[str]] = {}

    def add(reason, name):
        reasons.setdefault(reason, []).append(name)

    for l in layers:
        if l.bits not in _VLLM_BITS:
            add(f"{l.bits}-bit weights: vLLM's compressed-tensors WNA16 scheme takes 4 and 8 bits (Marlin, Machete, "
                f"Exllama); a vLLM build that serves {l.bits}-bit was not verified", l.name)
        elif not l.symmetric and l.bits not in _VLLM_ASYM_BITS:
            add(f"asymmetric {l.bits}-bit: vLLM takes zero points for 4 bits (Marlin); 8-bit zero points only "
                "through Machete on SM90, else 'Asymmetric quantization not supported'", l.name)
        if l.group_size not in _MARLIN_GROUPS:
            add(f"group_size {l.group_size}: vLLM's Marlin kernel takes per-channel or groups of 32, 64, 128 "
                "(Machete: per-channel or 128)", l.name)
        if l.out_features % _MARLIN_OUT or l.in_features % _MARLIN_IN:
            add(f"shape not a multiple of out {_MARLIN_OUT} / in {_MARLIN_IN}: vLLM's Marlin kernel refuses it "
                "(also after a tensor-parallel split); other kernels are slower or fp16-only", l.name)
    out = [f"{reason}: {_names(names)}" for reason, names in reasons.items()]
    if quantised_head is not None:
        out.append(f"quantised output head {quantised_head}: vLLM builds the head as a ParallelLMHead, which its "
                   "compressed-tensors integration does not quantise (source read, not run): it would look for a dense "
                   "weight; keep lm_head excluded (the LRQATConfig default) to serve with vLLM")

    # Sibling projections vLLM fuses (qkv_proj, gate_up_proj) must share one scheme.
    status = {l.name: f"{l.bits}-bit g={l.group_size} {'sym' if l.symmetric else 'asym'}" for l in layers}
    status.update({n: "high precision" for n in ignore})
    mixed = []
    for parent in sorted({n.rpartition(".")[0] for n in status}):
        for sibs in _FUSED_SIBLINGS:
            kinds = {status[f"{parent}.{s}"] for s in sibs if f"{parent}.{s}" in status}
            if len(kinds) > 1:
                mixed.append(f"{parent}.{{{','.join(sibs)}}}")
    if mixed:
        out.append(f"vLLM fuses these projections into one layer and needs one scheme for all of them, but they "
                   f"differ: {_names(mixed)}")

    # vLLM keeps weight_scale in the model dtype (fp16 / bf16): served scales are rounded.
    all_s = torch.cat([l.scale.reshape(-1) for l in layers]) if layers else torch.zeros(0)
    dtypes = [model_dtype] if model_dtype in (torch.float16, torch.bfloat16) else [torch.bfloat16, torch.float16]
    parts = []
    for dt in dtypes:
        r = scale_rounding(all_s, dt)
        if r["inexact"]:
            parts.append(f"in {r['dtype']} {r['inexact']} of {r['total']} scales change (max relative error "
                         f"{r['max_rel_error']:.3g}{', ' + str(r['overflow']) + ' overflow' if r['overflow'] else ''})")
    if parts:
        out.append("vLLM casts weight_scale to the served dtype (fp16/bf16), so vLLM's weights are not bit-exact "
                   "to the fp32 scales: " + "; ".join(parts))
    return out


def _transformers_note(layers: list[QuantLayer], n_schemes: int) -> str:
    """How transformers loads the export (checked with transformers 5.25 and compressed-tensors 0.20.1:
    ``tests/test_export_ct.py::test_transformers_logits_bit_exact``)."""
    if all(l.symmetric for l in layers):
        return "AutoModelForCausalLM.from_pretrained(dir)"
    if n_schemes == 1:
        return ("AutoModelForCausalLM.from_pretrained(dir, quantization_config=CompressedTensorsConfig(dequantize=True)): "
                "the default path refuses packed asymmetric zero points (compressed-tensors 0.20.1 expects them unpacked)")
    return ("not loadable by transformers 5.25: its default path refuses packed asymmetric zero points and its "
            "dequantize=True path decompresses every layer with the first config group's scheme (load fails)")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def write(model: nn.Module, layers: list[QuantLayer], dense: dict[str, torch.Tensor], out_dir: str, **options) -> dict:
    """Write a ``pack-quantized`` compressed-tensors checkpoint into ``out_dir``.

    Args:
        model: the converted model (for its ``nn.Linear`` names, tied head and dtype).
        layers: its quantised layers (:func:`~._common.collect_layers`).
        dense: its high-precision tensors by HF name (:func:`~._common.dense_state`).
        out_dir: directory holding ``config.json`` (from ``export()``); ``quantization_config`` is
            added to it and the weights are written beside it.
        scale_dtype: ``"float32"`` (default, exact), ``"bfloat16"`` or ``"float16"`` (the scales
            are rounded; the report gives how many and the largest relative error).

    Returns:
        The format's part of the report: scale dtype and rounding, exactness, config groups,
        ignore list, files, the compressed-tensors versions that read it, warnings.
    """
    sdt = validate_options(options)
    version, QuantizationConfig = _ct()

    if not layers:
        raise ExportError("compressed-tensors export needs at least one quantised layer")
    # The layers' integers, bits and shapes were checked by collect_layers (QuantLayer.check).
    rounding = scale_rounding(torch.cat([l.scale.reshape(-1) for l in layers]), sdt)
    if rounding["overflow"]:
        bad = [l.name for l in layers if scale_rounding(l.scale, sdt)["overflow"]]
        raise ExportError(f"scale_dtype {rounding['dtype']} cannot hold the scales of {_names(bad)}: "
                          f"{rounding['overflow']} become inf or 0; use float32")

    quantised = {l.name for l in layers}
    ignore = _high_precision_linears(model, quantised)
    qc = quantization_config(layers, ignore, version)
    _validate(qc, QuantizationConfig)

    cfg_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ExportError(f"{cfg_path} is missing: compressed-tensors needs the model's HF config.json")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    head = plan_head(model, dense, layers, config.get("tie_word_embeddings", False))
    notes, skip = [], set()
    if head.untie:
        config["tie_word_embeddings"] = False
        notes.append(head.note())
    if head.omit:
        skip.add(head.key)

    entries = _plan(model, layers, dense, sdt)
    files, total = _write_weights(entries, sdt, out_dir, skip)
    config["quantization_config"] = qc
    atomic_write_json(cfg_path, config, indent=2, sort_keys=True)

    keys = list(qc["config_groups"])
    schemes = {}
    for l in layers:
        schemes.setdefault(_scheme_key(l), []).append(l.name)
    odd_bits = sorted({l.bits for l in layers if 32 % l.bits})
    reads_since = (_DENSE_LAYOUT_SINCE if odd_bits else
                   _PACKED_ZP_SINCE if any(not l.symmetric for l in layers) else _PACK_QUANTIZED_SINCE)
    warns = _warnings(model, layers, ignore, _model_dtype(model),
                      head.key.rpartition(".")[0] if head.how == "quantised" else None)
    if rounding["inexact"]:
        warns.insert(0, f"weight_scale stored in {rounding['dtype']}: {rounding['inexact']} of {rounding['total']} "
                        f"scales rounded (max relative error {rounding['max_rel_error']:.3g}); the checkpoint "
                        f"dequantises to {rounding['dtype']}(s) * (W_int - z), not the trained fp32 W_hat")
    if odd_bits:
        warns.append(f"{'/'.join(map(str, odd_bits))}-bit weights use the dense bit layout of compressed-tensors "
                     f">= {_DENSE_LAYOUT_SINCE}; older releases (and vLLM builds pinning them) read another layout "
                     "and refuse the packed shape (or, for in/out < 160, may misread it)")
    return {
        "scale_dtype": rounding["dtype"],
        "scale_rounding": rounding,
        # fp32 scales: compressed-tensors' decompressor gives s * (W_int - z) bit for bit.
        "exact": rounding["inexact"] == 0,
        "compressed_tensors_version": version,
        "readers": {
            "compressed-tensors": f">= {reads_since}",
            "note": "dense LSB-first bitstream; the 3/5/6/7-bit layout changed in compressed-tensors 0.18.0",
            "transformers": _transformers_note(layers, len(schemes)),
        },
        "config_groups": {k: {"bits": key[0], "group_size": key[1], "symmetric": key[2], "layers": len(names)}
                          for k, (key, names) in zip(keys, schemes.items())},
        "ignore": ignore,
        "tied_head_omitted": head.key if head.omit else None,
        "weights_files": files,
        "weights_bytes": total,
        "sharded": len(files) > 1,
        "notes": notes,
        "warnings": warns,
    }
