"""Atomic, durable writes: the one home of "write under a temporary name, fsync, rename into place".

A reader never sees a half-written file or folder under its final name: the content goes to a temporary
sibling, is flushed and fsynced, then `os.replace`d over the final name (atomic on POSIX), and the parent
folder is fsynced so that the rename itself survives a power loss (the ext4/XFS rule: a rename is durable
only once its directory is synced).

Temporary names are unique per writer (`.<name>.tmp-<pid>-<random>` in the same folder), so two writers of
the same file — a rerun beside a killed run's orphaned worker, two ranks — never rename or delete each
other's temporary file. `is_temporary(name)` recognises them for clean-up code.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_INFIX = ".tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh sibling name for writing `path`: `.<name>.tmp-<pid>-<8 hex>`, unique per call and process."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(name: str) -> bool:
    """Whether a file name is one `temporary_path` makes."""
    return name.startswith(".") and TMP_INFIX in name


def temporary_owner(name: str) -> int | None:
    """The process id recorded in a temporary name (None for other names)."""
    if not is_temporary(name):
        return None
    pid = name.rsplit(TMP_INFIX, 1)[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, creations) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's content to disk (for files written by libraries that do not fsync)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """`os.replace(tmp, path)`, then fsync the folder so the rename survives a crash."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically and durably."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically and durably."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Write `obj` as indented JSON (plus a final newline) atomically and durably."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_dir_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)`, fsync what it wrote, then rename tmp_dir to `target` (replacing an existing
    folder: the old one is renamed aside first and removed after). Returns `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    tmp.mkdir()
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                fsync_file(os.path.join(root, name))
            fsync_dir(root)
        if target.exists():
            old = temporary_path(target)
            os.replace(target, old)
            replace_durably(tmp, target)
            shutil.rmtree(old)
        else:
            replace_durably(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
