"""Atomic writes of files and directories: the one place for the rule.

A write goes to a temporary sibling first and is renamed over the target only once complete and
fsynced, so an interrupted or failing write never leaves a half-written file or checkpoint. What
lands gets the permissions a plain ``open()`` / ``os.makedirs`` would give (0o666 / 0o777 minus the
umask), not the owner-only ones ``mkstemp`` / ``mkdtemp`` create their temporaries with: on a
shared cluster others must be able to read a checkpoint as they can read an HF one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Callable


def umask() -> int:
    """The process umask (read from /proc on Linux: setting and restoring it is racy in threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in directory ``path`` durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable, *, binary: bool = False) -> str:
    """Write ``path`` by ``write(f)`` into a temporary sibling, then rename it over ``path``.

    Returns the absolute path. On any error the temporary is removed and ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return path


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk_size`` (1 MB) chunks: memory stays flat for any size."""
    h = hashlib.sha256()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def json_safe(obj):
    """A copy of ``obj`` (dicts, lists, tuples, scalars) with every non-finite float (NaN, +-inf) as None:
    JSON has no NaN / Infinity (``json.dump`` writes bare ``NaN``, which strict parsers refuse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int = 2, sort_keys: bool = False) -> str:
    """:func:`atomic_write` of ``obj`` as strict JSON (and a final newline).

    A non-finite float is refused (ValueError naming ``path``; nothing is written): pass the
    object through :func:`json_safe` first to write them as null.
    """

    def write(f):
        try:
            text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e} (NaN / Infinity are not JSON; write null, see json_safe)") from None
        f.write(text)
        f.write("\n")

    return atomic_write(path, write)


def temp_dir_for(final_dir: str) -> str:
    """A new empty directory beside ``final_dir`` to build it in (see :func:`atomic_replace_dir`),
    with the permissions ``os.makedirs`` would give. A symlinked ``final_dir`` is resolved: the
    temporary goes beside the link's target (same filesystem), which is what gets replaced. Missing
    parent directories are created (the caller removes them if it gives up)."""
    final_dir = os.path.realpath(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(final_dir) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def atomic_replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing an existing directory.

    The old directory is renamed aside first and removed only after the new one is in place,
    so a crash leaves either the old or the new complete directory (plus a ``.old`` leftover).
    A symlinked ``final_dir`` is resolved as in :func:`temp_dir_for`: the link's target is
    replaced and the link keeps pointing to it (``tests/test_export.py::test_overwrite_through_a_symlink``).
    """
    final_dir = os.path.realpath(final_dir)
    backup = None
    if os.path.lexists(final_dir):
        if not os.path.isdir(final_dir):
            raise ValueError(f"{final_dir} exists and is not a directory")
        backup = final_dir + f".old-{os.getpid()}"
        if os.path.islink(backup) or os.path.isfile(backup):
            os.unlink(backup)  # rmtree refuses a symlink
        elif os.path.lexists(backup):
            shutil.rmtree(backup)
        os.replace(final_dir, backup)
    os.replace(tmp_dir, final_dir)
    fsync_dir(os.path.dirname(final_dir))
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
