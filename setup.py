"""Build of the native extension ``lrqat_kernels._C``. Metadata lives in pyproject.toml.

Build (torch must already be installed: the extension is compiled against it, hence no
build isolation)::

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .      # or -e . to develop

What gets compiled
    * every ``csrc/**/*.cpp`` (CPU impls, ``csrc/registration.cpp`` with the schemas);
    * every ``csrc/**/*.cu`` when torch is a CUDA build (``torch.version.cuda``) and nvcc is
      found (``CUDA_HOME``), for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;8.6;8.9;9.0``).
    Sources are globbed: a new op family is a new ``csrc/<family>/`` folder, no edit here.

Environment switches
    LRQAT_SKIP_EXT=1       Python-only install: no ext_modules at all. ``import lrqat_kernels``
                           still works and the pure-PyTorch reference paths are used.
    LRQAT_SKIP_CUDA=1      build the extension with the CPU sources only.
    LRQAT_FORCE_CUDA=1     fail (instead of silently building CPU-only) when CUDA can't be built.
    CUDA_HOME / CUDA_PATH  toolkit root. If unset we look for a real toolkit (a ``bin/nvcc``
                           next to ``include/cuda_runtime.h``), since torch's own guess from
                           ``which nvcc`` is wrong when nvcc is a wrapper script.
    TORCH_CUDA_ARCH_LIST   e.g. ``"8.0;9.0"``; append ``+PTX`` to the last one for forward
                           compatibility with newer GPUs.
    MAX_JOBS               parallel compile jobs (default: CPUs, capped so each job has ~3 GiB RAM).
    NVCC_THREADS           ``nvcc --threads`` (parallel per-arch device compiles; default 2).

Per-file CPU ISA flags
    ``BuildExtension`` gives one set of C++ flags to all sources. A CPU source whose name ends
    in an ISA suffix gets extra flags on top of them (x86-64 only; see ``ISA_FLAGS``):

        csrc/**/*_avx512.cpp  -> -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma
        csrc/**/*_avx2.cpp    -> -mavx2 -mfma

    How: ``BuildExtensionWithISA.build_extension`` compiles each ISA group with the same
    compiler, includes, macros and flags as the rest (so through ninja too) plus the ISA
    flags, into ``build/temp*/isa_<isa>/``, and passes the objects to the link of ``_C`` as
    ``extra_objects``. One ``.so`` results; nothing changes for the other sources.
    On x86-64 the macros ``LRQAT_HAVE_AVX512`` / ``LRQAT_HAVE_AVX2`` are defined (=1) for
    all sources; elsewhere ISA files are left out and the macros are 0.

    Rules for ISA files, because they are linked into a library that must load and run on
    CPUs without that ISA:
      * keep them leaf kernels over raw pointers, with everything in an anonymous namespace
        except the entry points; include no ATen/torch headers and as little STL as
        possible: an inline function from a shared header compiled here with -mavx512f can
        be picked by the linker for the whole .so and crash older CPUs (ODR);
      * register no ops there; call the entry points from a plain ``.cpp`` after a runtime
        check, e.g. ``__builtin_cpu_supports("avx512bf16")``, guarded by
        ``#if LRQAT_HAVE_AVX512``.
"""

from __future__ import annotations

import copy
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "lrqat_kernels._C"
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0"

# Extra C++ flags by file-name suffix (``<stem>_<isa>.cpp``); x86-64 only.
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _log(msg: str) -> None:
    print(f"[lrqat_kernels setup] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _rel_sources(pattern: str) -> list[str]:
    # setuptools wants /-separated paths relative to setup.py.
    paths = glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT).replace(os.sep, "/") for p in paths)


def _isa_of(source: str) -> str | None:
    stem, ext = os.path.splitext(os.path.basename(source))
    if ext != ".cpp":
        return None
    for isa in ISA_FLAGS:
        if stem.endswith("_" + isa):
            return isa
    return None


def _default_cuda_home() -> None:
    """Set CUDA_HOME before torch.utils.cpp_extension reads it (at import)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            os.environ["CUDA_HOME"] = home
            return


def _default_max_jobs() -> None:
    if os.environ.get("MAX_JOBS"):
        return
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 4.0 * cpus
    # nvcc with several archs peaks at a few GiB per job; running out of RAM is far worse
    # than a slower build.
    os.environ["MAX_JOBS"] = str(max(1, min(cpus, int(mem_gib // 3))))


def _ensure_ninja_on_path() -> None:
    # `.venv/bin/pip install` without activating the venv leaves the venv's ninja off PATH,
    # and BuildExtension then silently falls back to a slow serial distutils build.
    try:
        import ninja  # the PyPI package that ships the binary

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        bin_dir = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(bin_dir, "ninja")):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _pip_cuda_include_dirs(cuda_home: str) -> list[str]:
    """cuBLAS/cuSPARSE headers from torch's nvidia-* wheels when the toolkit lacks them.

    ATen/cuda/CUDAContext.h includes cublas_v2.h and cusparse.h; a minimal CUDA toolkit
    (nvcc + cudart only) doesn't ship them, torch's pip dependencies do. These dirs are
    appended after CUDA_HOME/include, so the toolkit's own headers still win.
    """
    if os.path.isfile(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) or os.path.isfile(
                os.path.join(inc, "cusparse.h")
            ):
                dirs.append(inc)
    return dirs


def _extensions_and_cmdclass():
    if _env_flag("LRQAT_SKIP_EXT"):
        _log("LRQAT_SKIP_EXT=1: Python-only install, lrqat_kernels._C is not built.")
        return [], {}

    _default_cuda_home()
    _default_max_jobs()
    _ensure_ninja_on_path()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class BuildExtensionWithISA(BuildExtension):
        """BuildExtension plus per-file ISA flags for ``*_<isa>.cpp`` (see module docstring)."""

        def build_extension(self, ext):
            groups: dict[str, list[str]] = {}
            for src in ext.sources:
                isa = _isa_of(src)
                if isa is not None:
                    groups.setdefault(isa, []).append(src)
            if not groups:
                return super().build_extension(ext)

            macros = list(ext.define_macros or []) + [(m,) for m in ext.undef_macros or []]
            isa_objects = []
            for isa, srcs in sorted(groups.items()):
                args = copy.deepcopy(ext.extra_compile_args)
                if isinstance(args, dict):
                    args["cxx"] = list(args.get("cxx", [])) + ISA_FLAGS[isa]
                else:
                    args = list(args or []) + ISA_FLAGS[isa]
                # self.compiler.compile is BuildExtension's (ninja) wrapper at this point.
                isa_objects += self.compiler.compile(
                    srcs,
                    output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                    macros=macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=args,
                    depends=ext.depends,
                )
            saved = ext.sources, ext.extra_objects
            ext.sources = [s for s in ext.sources if _isa_of(s) is None]
            ext.extra_objects = list(ext.extra_objects or []) + isa_objects
            try:
                return super().build_extension(ext)
            finally:
                ext.sources, ext.extra_objects = saved

    cpp_sources = _rel_sources("*.cpp")
    cu_sources = _rel_sources("*.cu")
    if not IS_X86_64:
        skipped = [s for s in cpp_sources if _isa_of(s)]
        if skipped:
            _log(f"not x86-64: leaving out ISA-specific sources {skipped}")
        cpp_sources = [s for s in cpp_sources if not _isa_of(s)]

    if _env_flag("LRQAT_SKIP_CUDA"):
        why_no_cuda = "LRQAT_SKIP_CUDA=1"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        why_no_cuda = f"nvcc not found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME to the toolkit root"
    elif not cu_sources:
        why_no_cuda = "no csrc/**/*.cu sources"
    else:
        why_no_cuda = None
    with_cuda = why_no_cuda is None
    if not with_cuda and _env_flag("LRQAT_FORCE_CUDA"):
        raise RuntimeError(f"LRQAT_FORCE_CUDA=1 but the CUDA sources can't be built: {why_no_cuda}")

    define_macros = [
        ("LRQAT_WITH_CUDA", "1" if with_cuda else "0"),
        ("LRQAT_HAVE_AVX512", "1" if IS_X86_64 else "0"),
        ("LRQAT_HAVE_AVX2", "1" if IS_X86_64 else "0"),
    ]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-Wall", "-Wno-unused-function"]
    # -- OpenMP (added with csrc/int4_cpu): at::parallel_for is header-only, and its
    # `#pragma omp parallel` only forks when _C itself is compiled and linked with -fopenmp;
    # without it every at::parallel_for in _C silently runs on one thread. At run time the
    # libgomp.so.1 torch ships is already loaded and is reused (same soname).
    omp_flags = ["-fopenmp"] if platform.system() == "Linux" and "OpenMP" in torch.__config__.parallel_info() else []
    cxx_flags += omp_flags
    if with_cuda:
        nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2")]
        ext = CUDAExtension(
            EXT_NAME,
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=omp_flags,
        )
        ext.include_dirs += _pip_cuda_include_dirs(CUDA_HOME)  # after CUDA_HOME/include
        _log(
            f"building {EXT_NAME}: {len(cpp_sources)} C++ + {len(cu_sources)} CUDA sources, "
            f"CUDA_HOME={CUDA_HOME}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
            f"MAX_JOBS={os.environ['MAX_JOBS']}"
        )
    else:
        ext = CppExtension(
            EXT_NAME,
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=omp_flags,
        )
        _log(f"building {EXT_NAME}: {len(cpp_sources)} C++ sources, CPU only ({why_no_cuda})")
    return [ext], {"build_ext": BuildExtensionWithISA.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
