"""Atomic writes of files and directories: the one place for the rule.

A write goes to a temporary sibling first and is renamed over the target only once complete and
fsynced, so an interrupted or failing write never leaves a half-written file or checkpoint. What
lands gets the permissions a plain ``open()`` / ``os.makedirs`` would give (0o666 / 0o777 minus the
umask), not the owner-only ones ``mkstemp`` / ``mkdtemp`` create their temporaries with: on a
shared cluster others must be able to read a checkpoint as they can read an HF one.
"""

from __future__ import annotations

import errno
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


def sha256_content(obj) -> str:
    """Hex sha256 of a nested value (dicts in their order, lists, tuples, tensors, numbers, strings,
    None) as it reads back: two objects that ``torch.save`` then ``torch.load`` turn into equal
    values have the same digest, whatever bytes the file holds. A tensor counts by dtype, shape and
    the bytes of its values (read in place, no copy through numpy)."""
    import ctypes

    import torch

    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            if t.numel():
                h.update((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr()))
        elif isinstance(x, dict):
            h.update(f"D{len(x)}:".encode())
            for k, v in x.items():
                feed(k)
                feed(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__[0]}{len(x)}:".encode())
            for v in x:
                feed(v)
        else:
            r = repr(x)
            h.update(f"S{type(x).__name__}{len(r)}:{r}".encode())

    feed(obj)
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


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and every directory in it (``path`` included), before the tree
    is renamed into place: what the rename publishes is on disk, whoever wrote the files (HF's
    ``save_pretrained`` and tokenizers do not fsync)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            with open(full, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the system or the filesystem cannot (no ``renameat2`` in the C library, EINVAL /
    ENOSYS / ENOTSUP): the caller falls back to two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"{os.strerror(err)}: exchanging {a} and {b}")


def _remove_old(path: str, marker: str | None) -> None:
    """Remove a replaced directory, its ``marker`` file first: a kill halfway leaves a directory
    that no longer reads as complete."""
    if marker is not None:
        try:
            os.unlink(os.path.join(path, marker))
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def atomic_replace_dir(tmp_dir: str, final_dir: str, *, marker: str | None = None) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir``, replacing an existing directory.

    Every file of ``tmp_dir`` is fsynced first (:func:`fsync_tree`). An existing ``final_dir`` is
    swapped with ``tmp_dir`` in one step where Linux can (``renameat2(RENAME_EXCHANGE)``), so a kill
    at any point leaves the old or the new complete directory at ``final_dir`` (the old one then sits
    at ``tmp_dir``, a hidden ``.<name>.tmp-*`` sibling, until it is removed). Elsewhere the old
    directory is renamed aside to ``<name>.old-<pid>`` first and removed after the new one is in
    place. ``marker``: the file that marks the directory complete (``lrqat_config.json`` of a
    checkpoint), removed first from the old directory. Rule and test: tests/test_faults.py::test_sigkill_at_every_write_of_save_pretrained_over_a_checkpoint.
    A symlinked ``final_dir`` is resolved as in :func:`temp_dir_for`: the link's target is
    replaced and the link keeps pointing to it (``tests/test_export.py::test_overwrite_through_a_symlink``).
    """
    final_dir = os.path.realpath(final_dir)
    fsync_tree(tmp_dir)
    backup = None
    if os.path.lexists(final_dir):
        if not os.path.isdir(final_dir):
            raise ValueError(f"{final_dir} exists and is not a directory")
        if _exchange(tmp_dir, final_dir):
            fsync_dir(os.path.dirname(final_dir))
            _remove_old(tmp_dir, marker)  # the old directory now
            return
        backup = final_dir + f".old-{os.getpid()}"
        if os.path.islink(backup) or os.path.isfile(backup):
            os.unlink(backup)  # rmtree refuses a symlink
        elif os.path.lexists(backup):
            shutil.rmtree(backup)
        os.replace(final_dir, backup)
    os.replace(tmp_dir, final_dir)
    fsync_dir(os.path.dirname(final_dir))
    if backup is not None:
        _remove_old(backup, marker)
