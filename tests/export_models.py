"""Small models for the tests: ``tiny_llama`` (training and CLI tests), ``tiny_hf`` and
``converted`` (the export tests, tests/test_export*.py).

``converted(...)`` builds a random tiny HF causal LM, prepares it for LR-QAT, gives the LoRA
factors random values (so ``C != 0`` and rounding decisions differ from RTN), optionally moves the
scales off their initial values, and converts it: a model whose ``W_int``, ``s`` and ``z`` look like
a trained one's.
"""

from __future__ import annotations

import torch

import lrqat_kernels as L


def tiny_llama(seed: int = 0, *, hidden: int = 32, heads: int = 2, vocab: int = 256, max_pos: int = 64):
    """A random ``LlamaForCausalLM`` in fp32 (train mode): 2 layers, MLP 2 x hidden, no GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def tiny_hf(arch: str = "llama", *, seed: int = 0, tie: bool = False, hidden: int = 64, layers: int = 2,
            heads: int = 4, kv_heads: int = 2, vocab: int = 256, max_pos: int = 128, bias: bool = False):
    """A random LLaMA / Mistral / Qwen2 causal LM in fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
              tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if arch == "llama":
        kw["attention_bias"] = bias
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a wrong norm mapping shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def converted(arch: str = "llama", *, bits: int = 4, group_size: int | None = None, symmetric: bool = True,
              tie: bool = False, seed: int = 0, exclude=("lm_head",), **hf_kw):
    """A converted tiny model (stage ``"quantized"``) with trained-looking integers."""
    model = tiny_hf(arch, seed=seed, tie=tie, **hf_kw)
    cfg = L.LRQATConfig(bits=bits, group_size=group_size, symmetric=symmetric, rank=4, phi_format="fp32",
                        range_method="minmax", exclude=list(exclude))
    L.prepare(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    for _, layer in L.api.lrqat_layers(model):
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.5)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
        layer.scale.mul_(torch.exp(torch.randn(layer.scale.shape, generator=g) * 0.05))
    L.convert(model)
    return model.eval()
