"""The deployment INT4 GEMM ``y = x @ (scale * W_int)^T`` against torch's INT4 GEMM and dense ``F.linear``.

Per shape ``N x K``, M (tokens) and device one group; its impls:

    lrqat-<isa>      CPU: ``lrqat_kernels.int4_linear(..., isa=<isa>)``, the C++ kernel forced to one
                     instruction set (scalar, avx2, avx512: those the CPU lacks skip), on the weight it
                     prepacks once and caches (what a model's decode loop runs)
    lrqat-auto       CUDA: ``int4_linear`` as a model calls it (the dispatcher's choice)
    lrqat-triton     CUDA: ``int4_linear(..., backend="triton")``
    torch_int4pack   torch's W4A16: ``_weight_int4pack_mm_for_cpu`` on CPU (weight from
                     ``_convert_weight_to_int4pack_for_cpu``), ``_weight_int4pack_mm`` (tinygemm) on CUDA
    linear_bf16 / linear_fp32   ``F.linear`` with the dequantised weight, dense bf16 / fp32

Weight: INT4 symmetric, fp32 scales in groups of 128 along K; x bf16 (fp32 for linear_fp32).
The weight is the same every call (hot in the caches that hold it: the 4096 x 4096 INT4 weight is
8 MiB); ``bench/bench_int4_cpu.py`` also times weights rotated through more than the last-level
cache. Each case first checks its product against ``x @ W_hat^T`` in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import check_same_product, time_case

import lrqat_kernels as lk
from lrqat_kernels.formats import pack_nibbles

GROUP = 128
ISAS = ("scalar", "avx2", "avx512")
IMPLS = {
    "cpu": [*(f"lrqat-{isa}" for isa in ISAS), "torch_int4pack", "linear_bf16", "linear_fp32"],
    "cuda": ["lrqat-auto", "lrqat-triton", "torch_int4pack", "linear_bf16", "linear_fp32"],
}
_LAYERS: dict = {}


def _layer(N: int, K: int, device: str) -> dict:
    """W_int, its packed form, scales and the dense fp32 ``W_hat``, built once per shape and device."""
    key = (N, K, device)
    if key not in _LAYERS:
        _LAYERS.clear()  # one shape at a time: full-size dense copies are hundreds of MB
        gen = torch.Generator().manual_seed(0)
        w_int = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
        scale = torch.rand(N, K // GROUP, generator=gen) * 0.01 + 0.001
        w_hat = w_int.float() * scale.repeat_interleave(GROUP, 1)
        _LAYERS[key] = {k: v.to(device) for k, v in
                        dict(w_int=w_int, qweight=pack_nibbles(w_int), scale=scale, w_hat=w_hat).items()}
    return _LAYERS[key]


def _torch_int4pack(layer: dict, x: torch.Tensor):
    """torch's W4A16 on ``layer``: unsigned nibbles ``W_int + 8`` and ``qScaleAndZeros`` ``[K/g, N, 2]``
    in x's dtype with ``w = (W_u4 - 8) * scale + zero``, zero = 0 (a symmetric grid)."""
    w_int, scale = layer["w_int"], layer["scale"]
    sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).to(x.dtype).contiguous()
    if x.is_cuda:
        u4 = (w_int.int() + 8).to(torch.uint8)
        packed = ((u4[:, 0::2] << 4) | u4[:, 1::2]).contiguous()  # tinygemm: column 2j in the HIGH nibble
        w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        return lambda: torch.ops.aten._weight_int4pack_mm(x, w, GROUP, sz)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu((w_int.int() + 8).contiguous(), 1)
    return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, GROUP, sz)


def _lrqat(impl: str, layer: dict, x: torch.Tensor):
    path = impl.split("-", 1)[1]
    args = (x, layer["qweight"], layer["scale"], None, GROUP)
    if x.is_cuda:
        backend = None if path == "auto" else path
        return lambda: lk.int4_linear(*args, backend=backend)
    from lrqat_kernels import _ext
    from lrqat_kernels.ops.int4_linear import cpu_isas

    if not _ext.load_extension():
        pytest.skip(f"lrqat_kernels._C is not built: int4_linear would run its dequantise fallback "
                    f"({_ext.extension_error()})")
    if path not in cpu_isas():
        pytest.skip(f"this CPU has no {path} path (it has {', '.join(cpu_isas())})")
    return lambda: lk.int4_linear(*args, isa=path)


@pytest.mark.parametrize("impl", sorted({i for v in IMPLS.values() for i in v}, key=lambda i: (i[0] != "l", i)))
def test_int4_linear(benchmark, device, int4_shape, m, impl):
    name, N, K = int4_shape
    if impl not in IMPLS[device]:
        pytest.skip(f"{impl} is not a {device} impl")
    layer = _layer(N, K, device)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(device)
    if impl.startswith("lrqat"):
        fn = _lrqat(impl, layer, x)
    elif impl == "torch_int4pack":
        fn = _torch_int4pack(layer, x)
    else:
        dtype = torch.bfloat16 if impl == "linear_bf16" else torch.float32
        w, xd = layer["w_hat"].to(dtype), x.to(dtype)
        fn = lambda: F.linear(xd, w)  # noqa: E731
    with torch.no_grad():
        check_same_product(fn(), x.float() @ layer["w_hat"].t(), f"int4 {impl}")
        weight_bytes = {"linear_bf16": 2 * N * K, "linear_fp32": 4 * N * K}.get(impl, N * K // 2)
        time_case(benchmark, fn, device=device, group=f"int4_linear {N}x{K} M={m} {device}",
                  baselines=("torch_int4pack", "linear_bf16"), op="int4_linear", impl=impl, mode="fwd", shape=name,
                  N=N, K=K, M=m, group_size=GROUP, x_dtype="fp32" if impl == "linear_fp32" else "bf16",
                  weight_bytes=weight_bytes, weights="hot")
