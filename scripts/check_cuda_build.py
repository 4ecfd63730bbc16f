#!/usr/bin/env python3
"""Prove that the built extension carries device code for the requested GPU architectures.

Reads the ``.nv_fatbin`` section of ``lrqat_kernels/_C*.so`` and lists its images (cubin =
SASS for one ``sm_XY``, or PTX). Exits non-zero when a required ``sm_XY`` has no cubin, or
when the library has no device code at all (i.e. the CUDA sources were not compiled).

No CUDA tools or GPU are needed: the ELF and fatbin headers are parsed here, in pure Python,
because a minimal toolkit (nvcc only) ships no ``cuobjdump``. When ``cuobjdump`` is on PATH
(or in ``$CUDA_HOME/bin``) its ``--list-elf`` output is printed as a cross-check.

Usage::

    python scripts/check_cuda_build.py                      # archs from TORCH_CUDA_ARCH_LIST
    python scripts/check_cuda_build.py --require 80,90 --so lrqat_kernels/_C.cpython-311-x86_64-linux-gnu.so

Fatbin layout (as written by nvcc's ``fatbinary``; see ``fatbinary_section.h``)::

    header : u32 magic 0xBA55ED50, u16 version, u16 header_size, u64 payload_size
    entries: u16 kind (1 = PTX, 2 = cubin), u16 ?, u32 header_size, u64 payload_size,
             u32 compressed_size, u32 ?, u16 minor, u16 major, u32 arch (e.g. 80, 90), ...
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import struct
import subprocess
import sys

FATBIN_MAGIC = 0xBA55ED50
KINDS = {1: "ptx", 2: "cubin"}


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """Name -> (file offset, size) of the sections of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
        return struct.unpack_from("<IIQQQQ", data, e_shoff + i * e_shentsize)

    strtab_off = header(e_shstrndx)[4]
    sections = {}
    for i in range(e_shnum):
        name_off, _, _, _, offset, size = header(i)
        end = data.index(b"\0", strtab_off + name_off)
        sections[data[strtab_off + name_off : end].decode()] = (offset, size)
    return sections


def fatbin_images(section: bytes) -> list[tuple[str, int]]:
    """(kind, arch) of every image of every fatbin in a .nv_fatbin section."""
    images = []
    pos = 0
    while pos + 16 <= len(section):
        magic, _version, header_size, payload_size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:  # padding between the fatbins of several objects
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + payload_size
        while entry + 32 <= end:
            kind, _, entry_header_size, entry_size = struct.unpack_from("<HHIQ", section, entry)
            arch, = struct.unpack_from("<I", section, entry + 28)
            images.append((KINDS.get(kind, f"kind{kind}"), arch))
            entry += entry_header_size + entry_size
        pos = end
    return images


def find_extension() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = sorted(glob.glob(os.path.join(root, "lrqat_kernels", "_C*.so")))
    if candidates:
        return candidates[0]
    try:  # an installed (non-editable) copy
        import importlib.util

        spec = importlib.util.find_spec("lrqat_kernels._C")
        if spec is not None and spec.origin:
            return spec.origin
    except ImportError:
        pass
    raise SystemExit("check_cuda_build: no lrqat_kernels/_C*.so found; build it first")


def required_from_env() -> list[int]:
    archs = []
    for item in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0").replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().split("+")[0]
        if item:
            major, _, minor = item.partition(".")
            archs.append(int(major) * 10 + int(minor.rstrip("a") or 0))
    return archs


def cuobjdump_cross_check(so_path: str) -> None:
    tool = shutil.which("cuobjdump")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if tool is None and cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "cuobjdump")):
        tool = os.path.join(cuda_home, "bin", "cuobjdump")
    if tool is None:
        print("check_cuda_build: (no cuobjdump available; fatbin parsed directly)")
        return
    out = subprocess.run([tool, "--list-elf", so_path], capture_output=True, text=True)
    print(f"check_cuda_build: {tool} --list-elf:\n{out.stdout.strip()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", help="path of the built extension (default: lrqat_kernels/_C*.so)")
    parser.add_argument("--require", help="comma-separated SM numbers, e.g. 80,90 (default: TORCH_CUDA_ARCH_LIST)")
    args = parser.parse_args(argv)

    so_path = args.so or find_extension()
    required = [int(a) for a in args.require.split(",")] if args.require else required_from_env()
    with open(so_path, "rb") as f:
        data = f.read()
    sections = elf_sections(data)
    if ".nv_fatbin" not in sections:
        print(f"check_cuda_build: FAIL: {so_path} has no .nv_fatbin section: the CUDA sources were not compiled")
        return 1
    offset, size = sections[".nv_fatbin"]
    images = fatbin_images(data[offset : offset + size])
    listing = ", ".join(f"{kind} sm_{arch}" for kind, arch in sorted(set(images), key=lambda x: (x[1], x[0])))
    print(f"check_cuda_build: {so_path}: {len(images)} images: {listing}")
    cuobjdump_cross_check(so_path)

    cubins = {arch for kind, arch in images if kind == "cubin"}
    missing = [a for a in required if a not in cubins]
    if missing:
        print(f"check_cuda_build: FAIL: no cubin for {', '.join(f'sm_{a}' for a in missing)} (required: {required})")
        return 1
    print(f"check_cuda_build: OK: cubins for {', '.join(f'sm_{a}' for a in required)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
