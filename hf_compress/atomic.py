"""Files and folders that are whole or absent, with the permissions `save_pretrained` gives.

Every writer of hf_compress goes through the two helpers here: [`atomic_output_dir`] for a folder (a new folder is
written beside the old one and swapped in whole; nothing is merged) and [`atomic_file`] / [`write_text`] for one
file. Temporary names come from `tempfile` (mode 0600 / 0700), and transformers 5's `save_pretrained` writes
`model.safetensors` with mode 0600; the helpers give the result the ordinary modes (`0o666 & ~umask` for files,
`0o777 & ~umask` for folders, as `open` and `os.makedirs` give), so another user of a shared machine or a serving
container can read the weights as it reads `config.json`.

A folder written by hf_compress holds [`OUTPUT_MARKER`], a small JSON file listing the files that run wrote.
[`is_own_output`] reads it: the pipeline's `--overwrite` only replaces a folder that holds the marker and nothing
else than the files it lists.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import threading

OUTPUT_MARKER = ".hf_compress_output"
_TMP_PREFIXES = (".tmp", ".report-")
_UMASK_LOCK = threading.Lock()
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def current_umask() -> int:
    """The process umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file, as `open(path, "w")` and `save_pretrained` give it: `0o666 & ~umask`."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder, as `os.makedirs` gives it: `0o777 & ~umask`."""
    return 0o777 & ~current_umask()


def is_temporary_name(name: str) -> bool:
    """Whether `name` is one of the helpers' temporary or bookkeeping names (never pushed, never counted)."""
    # Our temporary names: `.tmp-<name>.XXXX` (files), `.<name>.tmp-XXXX` / `.<name>.old-XXXX` (folders), `.report-*`.
    hidden_tmp = name.startswith(".") and (".tmp-" in name or ".old-" in name)
    return name == OUTPUT_MARKER or name.startswith(_TMP_PREFIXES) or hidden_tmp


def _exchange(a: str, b: str) -> bool:
    """Swap the folders `a` and `b` in one `renameat2(RENAME_EXCHANGE)`; False where the system has no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange; fall back
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(new: str, dest: str) -> None:
    """
    Put the finished folder `new` at `dest`, replacing an existing `dest` whole.

    On Linux an existing `dest` is swapped with `new` in one atomic rename (`renameat2(RENAME_EXCHANGE)`), so every
    reader sees the whole old folder or the whole new one; elsewhere the old folder is renamed aside first (a moment
    with no `dest`, never a mixed one). The old content is then deleted. A `dest` that appears after the check (another
    process's folder) is never replaced: the rename fails (`OSError`) and that folder stays as it is.
    """
    new, dest = os.path.abspath(new), os.path.abspath(dest)
    if not os.path.lexists(dest):
        os.rename(new, dest)
        return
    if os.path.isdir(dest) and not os.path.islink(dest) and _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old content
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old-", dir=os.path.dirname(dest))
    os.rename(dest, os.path.join(aside, "x"))
    os.rename(new, dest)
    shutil.rmtree(aside, ignore_errors=True)


def normalize_modes(folder: str) -> None:
    """Give `folder`, its sub-folders and its files the ordinary modes ([`dir_mode`], [`file_mode`]). Needed even
    after `save_pretrained`: transformers 5 writes `model.safetensors` with mode 0600 (config.json gets 0644)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(folder, dmode)
    for dirpath, dirnames, names in os.walk(folder):
        for d in dirnames:
            if not os.path.islink(os.path.join(dirpath, d)):
                os.chmod(os.path.join(dirpath, d), dmode)
        for n in names:
            if not os.path.islink(os.path.join(dirpath, n)):
                os.chmod(os.path.join(dirpath, n), fmode)


def write_marker(folder: str) -> None:
    """Record in `folder/OUTPUT_MARKER` that hf_compress wrote `folder` and which files it holds."""
    files = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames.sort()
        files += [os.path.relpath(os.path.join(dirpath, n), folder).replace(os.sep, "/") for n in sorted(names)
                  if n != OUTPUT_MARKER]
    with atomic_file(os.path.join(folder, OUTPUT_MARKER)) as tmp:
        with open(tmp, "w") as f:
            json.dump({"written_by": "hf_compress", "files": files}, f, indent=1)


def foreign_files(folder: str) -> list[str] | None:
    """
    The files of `folder` that hf_compress did not write: `None` when `folder` holds no readable marker (nothing in
    it is known to be ours), else the files present that the marker does not list (empty: the folder is ours).
    """
    try:
        with open(os.path.join(folder, OUTPUT_MARKER)) as f:
            listed = set(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames.sort()
        present += [os.path.relpath(os.path.join(dirpath, n), folder).replace(os.sep, "/") for n in sorted(names)
                    if n != OUTPUT_MARKER]
    return [p for p in present if p not in listed]


def is_own_output(folder: str) -> bool:
    """Whether `folder` is an earlier output of hf_compress, unchanged but for files removed (see [`foreign_files`])."""
    return foreign_files(folder) == []


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = True, marker: bool = False):
    """
    Yield a temporary folder beside `path`; on success it replaces `path` whole ([`replace_dir`]), on any error it
    is deleted and `path` is left as it was. An interrupted export therefore never leaves a half-written `path`, and
    nothing of an older `path` survives in the new one (no stale shard, index or tokenizer file).

    The folder and everything in it get the ordinary modes ([`normalize_modes`]: `0o777 & ~umask` for folders,
    `0o666 & ~umask` for files), not `tempfile`'s 0700 or the 0600 that transformers 5 gives `model.safetensors`.

    Args:
        path (`str`): the final folder.
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing `path`; otherwise raise.
        marker (`bool`, *optional*, defaults to `False`): write [`OUTPUT_MARKER`] listing the files, so that the
            folder is known as hf_compress's own (exports and the pipeline output set it).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"Output folder {path} already exists; pass `overwrite=True` or choose another folder.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"Output folder {path} is a file; pass a folder path.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        if marker:
            write_marker(tmp)
        normalize_modes(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str):
    """
    Yield a temporary file name beside `path` (in the same folder, so the final rename is atomic); on success it
    gets the ordinary mode (`0o666 & ~umask`) and replaces `path` in one `os.replace`, on any error it is removed
    and `path` is left as it was.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}.", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` through [`atomic_file`]; returns `path`."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return path


def write_json(path: str, obj, **kwargs) -> str:
    """Write `obj` as JSON (`json.dump(obj, f, **kwargs)`, then a newline) to `path` through [`atomic_file`]."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, **kwargs)
            f.write("\n")
    return path


__all__ = [
    "OUTPUT_MARKER",
    "atomic_file",
    "atomic_output_dir",
    "dir_mode",
    "file_mode",
    "foreign_files",
    "is_own_output",
    "is_temporary_name",
    "normalize_modes",
    "replace_dir",
    "write_json",
    "write_marker",
    "write_text",
]
