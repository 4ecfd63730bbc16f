"""Hostile arguments, property-based (issue 22, item 3): the ``lrqat`` sub-commands and the public
functions over values drawn from bad and edge cases. docs/RELIABILITY.md lists what each test tries.

Rules checked on every example:
* ``lrqat_kernels.cli.main(argv)``: exit status 0, or 2 with one error line ``lrqat <cmd>: error: ...``
  naming one of the arguments drawn (by flag, name or value); argparse's own refusals (a value of
  the wrong type, an unknown choice) print the usage block and then that one line. No traceback.
* the public functions: a result equal to what the same function gives on contiguous copies and to
  the reference (``lrqat_kernels.reference``) on contiguous copies (exact for the fake-quantised and
  codec outputs; within the stated fp32 / bf16 / fp16 accumulation bound for the GEMMs), or a
  one-line ``ValueError`` / ``TypeError`` / ``RuntimeError`` naming an argument. Meta tensors: the
  reference's shape and dtype. No crash in native code, no silent wrong answer.

The eager CPU path runs (tests/conftest.py's Triton interpreter would make a sweep slow), except in
``test_fake_quant_weight_interpreted_non_contiguous``: a few examples through the interpreted kernel.
``derandomize=True``: the examples are the same on every run (CI is reproducible).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrqat_kernels as lk
import lrqat_kernels.cli as lk_cli
from lrqat_kernels import reference

SWEEP = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch, request):
    """Run the eager CPU path (tests/conftest.py enables the Triton interpreter for kernel tests)."""
    if "interpreted" in request.node.name:
        yield
        return
    from lrqat_kernels.ops import _launch

    with _launch.use_kernels(False):
        yield


# ------------------------------------------------------------------------------------------ the CLI

INTS = ["-1", "0", "1", "2", "3", "7", "9", "2147483648", "99999999999999999999", "nan", "inf", "1e3", "", "x", "0x10", "-0"]
FLOATS = ["-1", "0", "1e-300", "1e300", "nan", "inf", "-inf", "NaN", "", "x", "1", "0.5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF model, its LR-QAT checkpoint and the converted one, a text file, a plain file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("hostile")
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(d / "model"))
    torch.manual_seed(0)
    m = lk.prepare(LlamaForCausalLM(cfg), lk.LRQATConfig(rank=4, range_method="minmax"))
    lk.save_pretrained(m, str(d / "lrqat"))
    lk.convert(m)
    lk.save_pretrained(m, str(d / "int4"))
    (d / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (d / "a_file").write_text("x")
    (d / "empty").mkdir()
    return d


def _paths(files):
    return [str(files / "missing" / "dir"), str(files / "a_file"), str(files / "empty"), str(files / "text.txt"), "",
            str(files / "model"), str(files / "lrqat"), str(files / "int4")]


# per sub-command: the required arguments (good values) and the options drawn, with their value pools
def _commands(files):
    p = _paths(files)
    return {
        "train": ({"--model": str(files / "model"), "--data": str(files / "text.txt"), "--seq-len": "16", "--batch-size": "2",
                   "--steps": "2", "--rank": "4", "--range-method": "minmax"},
                  {"--model": p, "--data": p, "--bits": INTS, "--group-size": INTS + ["None", "none", "-1", "8"],
                   "--rank": INTS, "--alpha": FLOATS, "--phi-format": ["packed_int", "fp8", "", "FP32"],
                   "--range-method": ["minmax", "lp:4", "lp:0", "lp:-1", "lp:nan", "lp:", "lp:x", "mse", ""],
                   "--init": ["svd", "lora", "qr"], "--svd-steps": INTS, "--compute-dtype": ["float32", "bf16", "int8", "x", ""],
                   "--act-bits": INTS, "--kv-bits": INTS, "--lr": FLOATS, "--lr-scale": FLOATS, "--steps": INTS,
                   "--batch-size": INTS, "--grad-accum": INTS, "--seq-len": INTS, "--warmup-ratio": FLOATS,
                   "--max-grad-norm": FLOATS, "--seed": INTS, "--save-every": INTS, "--stop-after": INTS,
                   "--eval-data": p, "--eval-seq-len": INTS, "--device": ["cpu", "cuda", "cuda:7", "tpu", "meta", ""],
                   "--exclude": ["lm_head", "", "*"], "--target-modules": ["q_proj", "nope", ""]}),
        "eval": ({"--model": str(files / "int4"), "--data": str(files / "text.txt"), "--max-windows": "2"},
                 {"--model": p, "--data": p, "--seq-len": INTS, "--batch-size": INTS, "--max-windows": INTS,
                  "--device": ["cpu", "cuda", "tpu", ""], "--out": p + [str(files / "r.json")]}),
        "convert": ({"--model": str(files / "lrqat")},
                    {"--model": p, "--scale-dtype": ["float16", "bfloat16", "float32", "x"]}),
        "export": ({"--model": str(files / "int4"), "--format": "compressed-tensors"},
                   {"--model": p, "--format": ["compressed-tensors", "gguf", "gptq", "onnx", ""],
                    "--tokenizer": p, "--scale-dtype": ["float32", "bfloat16", "float16", "int8"],
                    "--gguf-type": ["auto", "Q4_0", "Q8_0", "F32", "Q2_K"], "--gptq-format": ["gptq", "gptq_v2", "v3"]}),
        "demo": ({}, {"--threads": INTS, "--wa-presets": ["W4A8KV4", "", "W4A8", "W9A9", ",", "x"],
                      "--model": ["smollm2-135m", "gpt2"], "--steps": INTS}),
    }


# Values whose refusal does not meet the rule yet (a traceback, or a line naming no argument): listed
# under "Not covered" in docs/RELIABILITY.md with the fix each needs; drawn again once it is in.
_OPEN: dict = {}  # values still refused without naming the argument: none (the sweep draws every value)


def _pool(command, flag, values):
    drop = _OPEN.get((command, flag), set())
    return [v for v in values if v not in drop and os.path.basename(v) not in drop]


class _Reached(Exception):
    """Raised by the stand-ins for training / the demo: the arguments were accepted."""


def _argument_named(line: str, drawn: dict) -> bool:
    for flag, value in drawn.items():
        name = flag.lstrip("-")
        for token in (flag, name, name.replace("-", "_")):
            if re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", line):
                return True
        if value and len(value) > 1 and value in line:
            return True
    return False


@pytest.mark.parametrize("command", ["train", "eval", "convert", "export", "demo"])
def test_cli_hostile_arguments(command, files, tmp_path, monkeypatch):
    """Each sub-command with 1-3 options drawn from bad and edge values (negative, zero, huge, NaN
    strings, missing paths, files for directories, unknown choices), run in process. Training and
    the demo are replaced by stand-ins that stop once the arguments are accepted."""
    import lrqat_kernels.demo as demo
    import lrqat_kernels.train as train

    def reached(*a, **k):
        raise _Reached

    monkeypatch.setattr(train, "fit", reached)
    monkeypatch.setattr(demo, "run_demo", reached)
    import lrqat_kernels.demo_smollm2 as real_demo

    monkeypatch.setattr(real_demo, "run_real_demo", reached)
    required, pools = _commands(files)[command]
    pools = {f: _pool(command, f, v) for f, v in pools.items()}
    counter = iter(range(10**6))
    outcomes = {}

    @SWEEP
    @given(st.data())
    def run(data):
        flags = data.draw(st.lists(st.sampled_from(sorted(pools)), min_size=1, max_size=3, unique=True))
        drawn = {f: data.draw(st.sampled_from(pools[f])) for f in flags}
        args = dict(required, **drawn)
        out = str(tmp_path / f"out{next(counter)}")
        argv = [command] + [x for kv in args.items() for x in kv]
        if command in ("train", "convert", "export"):
            argv += ["--out", out]
        if command == "train":
            argv += ["--no-progress"]
        if command == "demo":
            argv += ["--out", out, "--no-progress", "--quick"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = lk.cli.main(argv)
            except SystemExit as e:  # argparse
                status = e.code
            except _Reached:
                status = 0
        text = err.getvalue().replace("\r", "\n")
        assert "Traceback" not in text, (argv, text)
        lines = [x for x in text.splitlines() if x.strip() and not x.startswith(("Loading weights", "Writing model shards"))
                 and not x.startswith("warning: ") and "UserWarning" not in x and not x.startswith("  ")]
        outcomes[status] = outcomes.get(status, 0) + 1
        if status == 0:
            return
        assert status == 2, (argv, status, text)
        if lines and lines[0].startswith("usage:"):  # argparse: the usage block, then the error line
            lines = [lines[-1]]
        assert len(lines) == 1 and lines[0].startswith(f"lrqat {command}: error: "), (argv, text)
        assert _argument_named(lines[0], args), (argv, lines[0])

    import lrqat_kernels.cli  # noqa: F401  (lk.cli)

    run()
    assert outcomes.get(0, 0) > 0 and outcomes.get(2, 0) > 0, outcomes  # both accepted and refused examples


# ------------------------------------------------------------------------ tensors: shapes / dtypes / strides

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int8, torch.uint8, torch.bool]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "offset"]
ERRORS = (ValueError, TypeError, RuntimeError)


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """A view of the same shape as ``t`` with the given memory layout (values as ``t``, except
    "expanded", which repeats t's first row / element: the reference sees the same view)."""
    if t.dim() == 0 or t.numel() == 0 or how == "contiguous":
        return t
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "sliced":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == "expanded":
        return t[:1].expand_as(t)
    if how == "offset":
        big = torch.zeros(t.numel() + 3, dtype=t.dtype)
        v = big[3:].view(t.shape)
        v.copy_(t)
        return v
    return t


def _named(e: BaseException, names) -> None:
    msg = str(e)
    assert msg.strip() and "\n" not in msg.strip(), f"not one line: {type(e).__name__}: {msg}"
    assert any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", msg) for n in names), f"names no argument {names}: {msg}"


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw), None
    except ERRORS as e:
        return None, e


def _copies(v):
    if isinstance(v, torch.Tensor):
        return v.contiguous().clone()
    return v


def _same(got, want, *, gemm_k=None) -> None:
    """``got`` equals ``want`` (NaN where NaN), or for a GEMM within the fp32 / bf16 / fp16
    accumulation bound ``K * eps * max|want|`` (the strided operand may take another BLAS path)."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w, gemm_k=gemm_k)
        return
    if want is None:
        assert got is None
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if got.device.type == "meta":
        return
    if gemm_k is None or not want.is_floating_point():
        assert torch.equal(torch.nan_to_num(got.double(), nan=1234.5), torch.nan_to_num(want.double(), nan=1234.5))
        return
    if want.numel() == 0:
        return
    eps = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[want.dtype]
    tol = 4 * max(gemm_k, 1) * eps * float(want.double().abs().max().nan_to_num(0)) + 1e-30
    g, w = got.double(), want.double()
    assert torch.equal(g.isnan(), w.isnan()) and float((g - w).nan_to_num(0).abs().max()) <= tol


OUTCOMES: dict = {}


def _check(fn, ref, kwargs, *, names, device, gemm_k=None):
    """Call ``fn(**kwargs)`` (tensors as drawn) and the oracles on contiguous CPU copies; check the rule."""
    r = _check_one(fn, ref, kwargs, names=names, device=device, gemm_k=gemm_k)
    OUTCOMES.setdefault(fn.__name__, set()).add(r)
    return r


def _both_outcomes(*names):
    """Each function returned a result and refused something in the sweep just run."""
    for n in names:
        assert {"result", "refused"} <= OUTCOMES.get(n, set()), (n, OUTCOMES.get(n))


def _check_one(fn, ref, kwargs, *, names, device, gemm_k=None):
    got, err = _call(fn, **kwargs)
    if err is not None:
        _named(err, names)
        return "refused"
    cpu = kwargs
    if device == "meta":  # the oracle on zeros of the same shapes and dtypes
        cpu = {k: (torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    contiguous = {k: _copies(v) for k, v in cpu.items()}
    want, werr = _call(ref, **contiguous)
    assert werr is None, f"accepted what the reference refuses ({type(werr).__name__}: {werr})"
    if device == "meta":
        got_meta = got if isinstance(got, tuple) else (got,)
        want_t = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got_meta, want_t):
            if w is not None:
                assert g.shape == w.shape and g.dtype == w.dtype
        return "meta"
    _same(got, want, gemm_k=gemm_k)
    if ref is not fn:
        again, aerr = _call(fn, **contiguous)
        assert aerr is None
        _same(got, again, gemm_k=gemm_k)
    return "result"


def _tensor(shape, dtype, layout, device, gen_fn):
    t = gen_fn(shape)
    if dtype == torch.bool:
        t = t != 0
    else:
        t = t.to(dtype)
    t = _layout(t, layout)
    return t.to("meta") if device == "meta" else t


def _names(fn, *extra):
    return [p for p in inspect.signature(fn).parameters] + list(extra)


_VALID_BITS = {"packed_int": [2, 3, 4], "fixed_point": [2, 3, 4, 7], "bf16": [2, 4, 8], "fp16": [3, 4, 8], "fp32": [2, 4, 8]}
# hostile changes to a valid problem: each example takes 0-2 of them
_HOSTILE = {
    "out": [0, 1], "inn": [2, 7], "rank": [0], "bits": [0, 1, 9, 16], "phi_format": ["int8", "nf4", ""],
    "group_size": [0, -1, 3, 5, 1000], "lora": [torch.float64, torch.int32, torch.bool], "scale": [torch.float64, torch.int32, torch.bfloat16],
    "zp": [torch.float64, torch.int8, torch.bool], "alpha": [0.0, -2.0, float("nan"), float("inf")], "device": ["meta"],
}


@st.composite
def _weight_problem(draw):
    phi_format = draw(st.sampled_from(lk.PHI_FORMATS))
    p = dict(out=draw(st.sampled_from([1, 2, 3, 5])), inn=draw(st.sampled_from([8, 16, 32])), rank=draw(st.sampled_from([1, 3])),
             phi_format=phi_format, bits=draw(st.sampled_from(_VALID_BITS[phi_format])), group_size=draw(st.sampled_from([None, 8])),
             zp=draw(st.booleans()), device="cpu", lora=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
             scale=torch.float32, zp_dtype=torch.float32, alpha=draw(st.sampled_from([1.0, 16.0])))
    for k in draw(st.lists(st.sampled_from(sorted(_HOSTILE)), max_size=2, unique=True)):
        p["zp_dtype" if k == "zp" else k] = draw(st.sampled_from(_HOSTILE[k]))
        if k == "zp":
            p["zp"] = True
    p["lay"] = {k: draw(st.sampled_from(LAYOUTS)) for k in ("phi", "A", "B", "scale", "zp")}
    return p


def _build_weight(p, seed):
    out, inn, rank, phi_format, bits, group_size = p["out"], p["inn"], p["rank"], p["phi_format"], p["bits"], p["group_size"]
    lay = p["lay"]
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if not group_size or group_size < 0 or inn % group_size else inn // group_size
    try:
        phi = lk.encode_phi(torch.rand(out, inn, generator=g) * 20 - 6, bits, phi_format)
    except (ValueError, TypeError):  # bits / format the codec refuses: hand over an int8 or fp32 Phi0 instead
        phi = (torch.rand(out, inn, generator=g) * 20 - 6).to(torch.int8 if phi_format == "int8" else torch.float32)
    phi = _layout(phi, lay["phi"])
    A = _tensor((rank, inn), p["lora"], lay["A"], "cpu", lambda s: torch.randn(*s, generator=g))
    B = _tensor((out, rank), p["lora"], lay["B"], "cpu", lambda s: torch.randn(*s, generator=g))
    scale = _tensor((out, n_groups), p["scale"], lay["scale"], "cpu", lambda s: torch.rand(*s, generator=g) * 0.1 + 0.01)
    zero = _tensor((out, n_groups), p["zp_dtype"], lay["zp"], "cpu",
                   lambda s: torch.randint(-2, 3, s, generator=g).float()) if p["zp"] else None
    to = (lambda t: t if t is None else t.to("meta")) if p["device"] == "meta" else (lambda t: t)
    return dict(phi=to(phi), lora_A=to(A), lora_B=to(B), scale=to(scale), bits=bits, phi_format=phi_format, alpha=p["alpha"],
                zero_point=to(zero), group_size=group_size)


def test_fake_quant_weight_merge_weight_and_lrqat_linear_hostile():
    """Shapes 0 / 1 / odd, bits and formats in and out of range, group sizes 0 / -1 / not dividing,
    lora / scale / zero-point dtypes (fp64, int, bool), transposed / sliced / expanded / offset
    views, meta tensors, NaN / inf / negative alpha."""
    seen = {}

    @SWEEP
    @given(_weight_problem(), st.integers(0, 2**16), st.sampled_from(LAYOUTS), st.sampled_from([None, "bias"]))
    def run(p, seed, x_layout, bias):
        kw = _build_weight(p, seed)
        dev = p["device"]
        r = _check(lk.fake_quant_weight, reference.fake_quant_weight, kw, names=_names(lk.fake_quant_weight), device=dev)
        seen[("fake_quant_weight", r)] = seen.get(("fake_quant_weight", r), 0) + 1
        if dev != "meta":  # merge_weight checks W_int for NaN: it needs values (a meta tensor has none)
            r = _check(lk.merge_weight, reference.merge_weight, kw, names=_names(lk.merge_weight), device=dev)
            seen[("merge_weight", r)] = seen.get(("merge_weight", r), 0) + 1
        g = torch.Generator().manual_seed(seed + 1)
        out, inn = p["out"], p["inn"]
        x = _layout(torch.randn(3, inn, generator=g), x_layout)
        x = x.to(kw["lora_A"].dtype) if kw["lora_A"].dtype.is_floating_point else x
        b = torch.randn(out, generator=g).to(x.dtype) if bias else None
        if dev == "meta":
            x, b = x.to("meta"), (None if b is None else b.to("meta"))
        r = _check(lk.lrqat_linear, reference.lrqat_linear, dict(kw, x=x, bias=b), names=_names(lk.lrqat_linear),
                   device=dev, gemm_k=inn)
        seen[("lrqat_linear", r)] = seen.get(("lrqat_linear", r), 0) + 1

    run()
    for f in ("fake_quant_weight", "merge_weight", "lrqat_linear"):
        assert seen.get((f, "result"), 0) and seen.get((f, "refused"), 0), seen  # both outcomes were reached


@SWEEP
@given(shape=st.sampled_from([(0, 8), (1, 1), (3, 7), (2, 3, 8), (4, 0), (5,)]), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), bits=st.sampled_from([4, 8, 2, 16, 0]), symmetric=st.sampled_from([True, False, 1, "yes"]),
       eps=st.sampled_from([1e-6, 0.0, -1.0, float("nan")]), device=st.sampled_from(["cpu", "cpu", "meta"]),
       w_dtype=st.sampled_from([None, torch.float64, torch.bfloat16, torch.int32]), seed=st.integers(0, 2**16))
def _activation_case(shape, dtype, layout, bits, symmetric, eps, device, w_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: _tensor(shape, dtype, layout, device, lambda s: torch.randn(*s, generator=g) * 3)  # noqa: E731
    x, up = mk(), mk()
    w = torch.rand(shape[-1], generator=g) + 0.5
    w = (w.to(w_dtype) if w_dtype else w.to(x.dtype) if x.dtype.is_floating_point else w).to(x.device)
    _check(lk.fake_quant_activation, reference.fake_quant_activation, dict(x=x, bits=bits, symmetric=symmetric),
           names=_names(lk.fake_quant_activation), device=device)
    _check(lk.rms_norm_fake_quant, reference.rms_norm_fake_quant, dict(x=x, weight=w, eps=eps, bits=bits, symmetric=symmetric),
           names=_names(lk.rms_norm_fake_quant), device=device)
    _check(lk.swiglu_fake_quant, reference.swiglu_fake_quant, dict(gate=x, up=up, bits=bits, symmetric=symmetric),
           names=_names(lk.swiglu_fake_quant), device=device)


def test_activation_quantisers_hostile():
    """fake_quant_activation, rms_norm_fake_quant and swiglu_fake_quant over 0-size / 1-D / 3-D /
    odd shapes, every dtype, views, meta, bits 0 / 2 / 16, non-bool symmetric, eps 0 / -1 / NaN."""
    OUTCOMES.clear()
    _activation_case()
    _both_outcomes("fake_quant_activation", "rms_norm_fake_quant", "swiglu_fake_quant")


def _int4_reference(x, qweight, scale, zero_point=None, group_size=None, bias=None):
    """``x @ (scale * (W_int - z))^T + bias`` in fp64 from the bytes (checked by the same argument rules)."""
    w = lk.unpack_nibbles(qweight).double()
    K = w.shape[1]
    n_groups = scale.shape[1]
    gsz = K // n_groups if n_groups else K
    s = scale.double().repeat_interleave(gsz, dim=1)
    z = 0.0 if zero_point is None else zero_point.double().repeat_interleave(gsz, dim=1)
    y = x.double() @ (s * (w - z)).T
    return (y if bias is None else y + bias.double()).to(x.dtype)


@SWEEP
@given(M=st.sampled_from([0, 1, 3]), N=st.sampled_from([0, 1, 5, 16]), K=st.sampled_from([2, 7, 16, 64]),
       group_size=st.sampled_from([None, 8, 16, 3, 0, -1, 64]), zp=st.booleans(), bias=st.booleans(),
       x_dtype=st.sampled_from(DTYPES), s_dtype=st.sampled_from(DTYPES[:4] + [torch.int32]),
       q_dtype=st.sampled_from([torch.uint8, torch.uint8, torch.int8, torch.int32]),
       layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3), device=st.sampled_from(["cpu"]),
       seed=st.integers(0, 2**16))
def _int4_case(M, N, K, group_size, zp, bias, x_dtype, s_dtype, q_dtype, layouts, device, seed):
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if not group_size or group_size < 0 or not K or K % group_size else K // group_size
    qw = _tensor((N, K // 2), q_dtype, layouts[0], device, lambda s: torch.randint(0, 256, s, generator=g))
    x = _tensor((M, K), x_dtype, layouts[1], device, lambda s: torch.randn(*s, generator=g))
    scale = _tensor((N, n_groups), s_dtype, layouts[2], device, lambda s: torch.rand(*s, generator=g) * 0.1 + 0.01)
    z = torch.randint(-8, 8, (N, n_groups), generator=g, dtype=torch.int8).to(qw.device) if zp else None
    b = torch.randn(N, generator=g).to(x.dtype if x.dtype.is_floating_point else torch.float32).to(qw.device) if bias else None
    with torch.no_grad():
        _check(lk.int4_linear, _int4_reference, dict(x=x, qweight=qw, scale=scale, zero_point=z, group_size=group_size, bias=b),
               names=_names(lk.int4_linear, "K", "N"), device=device, gemm_k=K)


def test_int4_linear_hostile():
    """int4_linear (the C++ CPU kernels) over 0-size / odd K, group sizes 0 / -1 / not dividing, x /
    scale / qweight dtypes, views: the fp64 sum from the bytes (fp32 / bf16 / fp16
    accumulation bound), or a one-line error naming the argument."""
    OUTCOMES.clear()
    _int4_case()
    _both_outcomes("int4_linear")


@SWEEP
@given(shape=st.sampled_from([(0,), (0, 4), (1, 2), (3, 5), (3, 8), (2, 3, 4), (6,)]), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), bits=st.sampled_from([1, 2, 3, 4, 7, 8, 9]),
       phi_format=st.sampled_from(lk.PHI_FORMATS + ("nf4",)), device=st.sampled_from(["cpu", "cpu", "meta"]),
       seed=st.integers(0, 2**16))
def test_nibble_and_phi_codecs_hostile(shape, dtype, layout, bits, phi_format, device, seed):
    """pack_nibbles / unpack_nibbles / encode_phi / decode_phi over shapes (0-size, odd last dim,
    1-D, 3-D), every dtype, out-of-range values, views, meta; a result round-trips."""
    g = torch.Generator().manual_seed(seed)
    w = _tensor(shape, dtype, layout, device, lambda s: torch.randint(-9, 9, s, generator=g))
    names = ["w_int", "in", "values", "[-8, 7]"]
    packed, err = (None, None) if device == "meta" else _call(lk.pack_nibbles, w)  # meta: the range check needs values
    if err is not None:
        _named(err, names)
    elif device != "meta":
        assert torch.equal(lk.unpack_nibbles(packed), w.to(torch.int8)), "pack -> unpack lost values"
        assert torch.equal(packed, lk.pack_nibbles(w.contiguous()))
    p = _tensor(shape, dtype, layout, device, lambda s: torch.randint(0, 256, s, generator=g))
    un, err = _call(lk.unpack_nibbles, p)
    if err is not None:
        _named(err, ["packed"])
    elif device != "meta":
        assert torch.equal(un, lk.unpack_nibbles(p.contiguous()))
        assert torch.equal(lk.pack_nibbles(un), p.contiguous())
    if device == "meta":  # encode_phi checks values (NaN, range): a meta tensor has none
        return
    x = _tensor(shape, dtype, layout, device, lambda s: torch.rand(*s, generator=g) * 40 - 20)
    phi, err = _call(lk.encode_phi, x, bits, phi_format)
    if err is not None:
        _named(err, ["x", "bits", "phi_format"])
        return
    back, err = _call(lk.decode_phi, phi, bits, phi_format)
    assert err is None, f"decode_phi refuses what encode_phi made: {err}"
    assert torch.equal(phi, lk.encode_phi(x.contiguous(), bits, phi_format))
    assert back.dtype == torch.float32 and back.shape == x.shape
    # within the format's grid: the decoded value is what the format can hold of x (1/2 grid step for
    # the integer formats, the float format's rounding otherwise), inside the representable range
    hi = 2.0 ** (bits - 1)
    inside = (x.float() >= -hi + 0.5) & (x.float() <= hi - 1.5)
    step = {"packed_int": 0.5, "fixed_point": 0.5 / 2 ** (7 - bits) if bits < 8 else 0.5, "bf16": 2.0**-7, "fp16": 2.0**-10, "fp32": 0.0}[phi_format]
    rel = x.float().abs() * (step if phi_format in ("bf16", "fp16") else 0.0)
    err_abs = (back - x.float()).abs()
    bound = (step if phi_format not in ("bf16", "fp16") else 0.0) + rel + 1e-6
    assert torch.all(err_abs[inside] <= bound[inside] if bound.dim() else err_abs[inside] <= bound), phi_format


@SWEEP
@given(shape=st.sampled_from([(0, 8), (1, 1), (3, 7), (4, 16), (2, 3, 8), (5,)]), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), bits=st.sampled_from([2, 4, 8, 1, 17]),
       method=st.sampled_from(["minmax", "lp:4", "lp:2.5", "lp:0", "lp:nan", "mse", ""]),
       group_size=st.sampled_from([None, 4, 8, 3, 0, -1]), symmetric=st.booleans(),
       seed=st.integers(0, 2**16))
def test_estimate_scale_and_rtn_quantize_hostile(shape, dtype, layout, bits, method, group_size, symmetric, seed):
    """estimate_scale / rtn_quantize over shapes, dtypes, views, bits 1 / 17, range methods that do
    not parse, group sizes 0 / -1 / not dividing: a strided input gives what its contiguous copy
    gives (bit for bit), or a one-line error naming the argument."""
    g = torch.Generator().manual_seed(seed)
    w = _tensor(shape, dtype, layout, "cpu", lambda s: torch.randn(*s, generator=g))
    names = _names(lk.estimate_scale, "w", "lp", "p")
    res, err = _call(lk.estimate_scale, w, bits, method, group_size, symmetric)
    if err is not None:
        _named(err, names)
        return
    again = lk.estimate_scale(w.contiguous(), bits, method, group_size, symmetric)
    _same(res, again)
    scale, zero = res if isinstance(res, tuple) else (res, None)
    q, err = _call(lk.rtn_quantize, w, scale, bits=bits, zero_point=zero, group_size=group_size)
    if err is not None:
        _named(err, _names(lk.rtn_quantize))
        return
    _same(q, lk.rtn_quantize(w.contiguous(), scale, bits=bits, zero_point=zero, group_size=group_size))


# --------------------------------------------------------------------- the Triton kernel, interpreted


@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(layouts=st.tuples(*[st.sampled_from(["transposed", "sliced", "offset", "expanded"])] * 3),
       group_size=st.sampled_from([None, 32]), phi_format=st.sampled_from(["packed_int", "fixed_point", "fp32"]),
       seed=st.integers(0, 2**16))
def test_fake_quant_weight_interpreted_non_contiguous(layouts, group_size, phi_format, seed):
    """fake_quant_weight through the Triton kernel (interpreted) with non-contiguous lora_A, lora_B and
    scale: equal to the reference on contiguous copies except where fp32 summation order decides a
    rounding tie (there within one step)."""
    from lrqat_kernels.ops._launch import interpreting

    assert interpreting(), "tests/conftest.py sets TRITON_INTERPRET=1 on CPU"
    g = torch.Generator().manual_seed(seed)
    out, inn, rank, bits = 5, 64, 3, 4
    grid = torch.rand(out, inn, generator=g) * 18 - 9
    phi = lk.encode_phi(grid, bits, phi_format)
    n_groups = 1 if group_size is None else inn // group_size
    A = _layout(torch.randn(rank, inn, generator=g), layouts[0])
    B = _layout(torch.randn(out, rank, generator=g), layouts[1])
    s = _layout(torch.rand(out, n_groups, generator=g) * 0.02 + 0.01, layouts[2])
    kw = dict(bits=bits, phi_format=phi_format, alpha=1.0, group_size=group_size)
    got = lk.fake_quant_weight(phi, A, B, s, **kw)
    want = reference.fake_quant_weight(phi, A.contiguous(), B.contiguous(), s.contiguous(), **kw)
    step = s.contiguous().repeat_interleave(inn // n_groups, dim=1)
    diff = (got - want).abs()
    assert torch.all(diff <= step * 1.0001), float(diff.max())
    assert float((diff > 0).float().mean()) <= 0.02  # only near-ties differ
    assert math.isfinite(float(got.sum()))


# ------------------------------------------------------------------ cases the sweep found, pinned
# Each was a traceback or an error not naming the argument (docs/RELIABILITY.md, "Hostile arguments").


def _run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = lk_cli.main([str(a) for a in argv])
        except BaseException as e:  # a traceback
            return "raised", f"{type(e).__name__}: {e}"
    lines = [x for x in err.getvalue().splitlines() if x.strip() and not x.startswith("Loading weights")]
    return status, lines


def _train_args(files, *extra):
    return ["train", "--model", files / "model", "--data", files / "text.txt", "--out", files / "run", "--seq-len", "16",
            "--batch-size", "2", "--steps", "1", "--range-method", "minmax", "--no-progress", *extra]


@pytest.mark.parametrize("extra, name", [(["--rank", "2147483648"], "rank"), (["--rank", "99999999999999999999"], "rank"),
                                         (["--seed", "99999999999999999999"], "seed"), (["--device", "tpu"], "device")])
def test_train_refuses_in_one_line_naming_the_argument(files, extra, name):
    status, lines = _run_cli(_train_args(files, *extra))
    assert status == 2 and len(lines) == 1 and re.search(rf"\b-*{name}\b", lines[0]), (status, lines)


@pytest.mark.parametrize("case", ["device", "data", "out"])
def test_eval_refuses_in_one_line_naming_the_argument(files, case):
    args = {"--model": files / "int4", "--data": files / "text.txt", "--max-windows": "2"}
    if case == "device":
        args["--device"] = "tpu"
    if case == "data":
        args["--data"] = files / "a_file"
    if case == "out":
        args["--out"] = files / "empty"
    status, lines = _run_cli(["eval", *[x for kv in args.items() for x in kv]])
    assert status == 2 and len(lines) == 1 and (f"--{case}" in lines[0] or str(args[f"--{case}"]) in lines[0]), (status, lines)


def test_convert_empty_model_names_the_argument(files):
    status, lines = _run_cli(["convert", "--model", "", "--out", files / "c"])
    assert status == 2 and len(lines) == 1 and "--model" in lines[0], (status, lines)


def _named_error(fn, *a, names, **k):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as e:
        fn(*a, **k)
    msg = str(e.value)
    assert "\n" not in msg and any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", msg) for n in names), msg


@pytest.mark.parametrize("group_size", [None, 8])
def test_fake_quant_weight_with_zero_input_columns(group_size):
    phi = torch.zeros(3, 0)
    A, B = torch.zeros(2, 0), torch.zeros(3, 2)
    s = torch.ones(3, 1 if group_size is None else 0)
    try:
        out = lk.fake_quant_weight(phi, A, B, s, bits=4, phi_format="fp32", alpha=1.0, group_size=group_size)
    except (ValueError, TypeError, RuntimeError) as e:
        assert "\n" not in str(e) and re.search(r"phi|lora_A|scale|group_size|in", str(e)), e
    else:
        assert out.shape == (3, 0)


def test_value_checking_functions_on_meta_name_the_argument():
    meta = torch.device("meta")
    phi = torch.zeros(2, 8, device=meta)
    A, B, s = torch.zeros(1, 8, device=meta), torch.zeros(2, 1, device=meta), torch.ones(2, 1, device=meta)
    _named_error(lk.merge_weight, phi, A, B, s, bits=4, phi_format="fp32", alpha=1.0, names=["phi", "lora_A", "lora_B", "scale"])
    _named_error(lk.encode_phi, torch.zeros(2, 8, device=meta), 4, "fp32", names=["x"])
    _named_error(lk.pack_nibbles, torch.zeros(2, 8, dtype=torch.int8, device=meta), names=["w_int"])
    _named_error(lk.estimate_scale, torch.zeros(2, 8, device=meta), 4, names=["w"])


def test_int4_linear_checks_arguments_on_every_device():
    meta = torch.device("meta")
    x = torch.zeros(1, 2, device=meta)
    _named_error(lk.int4_linear, x, torch.zeros(3, 1, dtype=torch.int8, device=meta), torch.ones(3, 1, device=meta), names=["qweight"])
    _named_error(lk.int4_linear, torch.zeros(0, 2, device=meta), torch.zeros(0, 1, dtype=torch.uint8, device=meta),
                 torch.ones(0, 1, device=meta), group_size=8, names=["group_size"])
    _named_error(lk.int4_linear, torch.zeros(1, 0), torch.zeros(3, 0, dtype=torch.uint8), torch.ones(3, 1), names=["qweight", "x", "K"])
