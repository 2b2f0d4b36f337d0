"""Who may write into an output folder: an fcntl lock per build, workers that die with their parent, and the
clean-up of temporary files whose writer is dead.

``build.lock`` in the output folder carries POSIX record locks (``fcntl.lockf``), which the kernel releases
when the holding process dies, however it dies (also over NFS where locking works):

- byte 0 **exclusive**: a build that has the folder to itself (``--num-shards 1``; under MPI, rank 0 holds it
  for the whole world). Any other build started meanwhile is refused.
- byte 0 **shared** + byte ``1 + i`` exclusive: job ``i`` of a SLURM-array build (``--num-shards n``). The
  jobs of an array run side by side (they write disjoint shards); the same job index started twice, or a
  whole-folder build, is refused.

The file also says who holds it (pid, host, ``n``) for the refusal message; the record is advisory, the
locks decide.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
from pathlib import Path

from data_prep.errors import DataPrepError

LOCK_NAME = "build.lock"
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_HOLDER_BYTES = 4096


def _try_lock(fd: int, kind: int, byte: int) -> bool:
    """Take (or convert to) lock ``kind`` on one byte without waiting; False if another process holds it."""
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB, 1, byte)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


class BuildLock:
    """This process's claim on an output folder (module docstring); ended by `release` or its death."""

    def __init__(self, fd: int | None, *, exclusive: bool) -> None:
        self._fd: int | None = fd
        self.exclusive = exclusive
        """True when no other build can be writing into the folder (a failed build's claim may be reset)."""

    @classmethod
    def acquire(cls, out: Path, *, num_shards: int, shard_index: int) -> BuildLock:
        """Lock ``out`` for this build or raise `DataPrepError` saying who holds it."""
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            whole = num_shards == 1
            try:
                free = _try_lock(fd, fcntl.LOCK_EX if whole else fcntl.LOCK_SH, 0)
            except OSError as exc:  # a network file system without working locks: build as before
                if exc.errno not in _NO_LOCKING:
                    raise
                print(
                    f"warning: {out}: cannot lock ({exc.strerror}); a second build into this folder would "
                    "not be noticed",
                    file=sys.stderr,
                )
                os.close(fd)
                return cls(None, exclusive=False)
            if not free:
                raise DataPrepError(
                    f"{out}: another build is writing into this folder ({_describe(_read_holder(fd))}); "
                    "wait for it to finish or use another --output-dir"
                )
            if not whole and not _try_lock(fd, fcntl.LOCK_EX, 1 + shard_index):
                raise DataPrepError(
                    f"{out}: job --shard-index {shard_index} of --num-shards {num_shards} is already running "
                    "into this folder; wait for it to finish"
                )
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "num_shards": num_shards}
            # one fixed-size write: array jobs write it side by side, a reader sees one whole record
            os.pwrite(fd, json.dumps(holder).encode().ljust(_HOLDER_BYTES), 0)
            return cls(fd, exclusive=whole)
        except BaseException:
            os.close(fd)  # releases whatever was taken
            raise

    def __enter__(self) -> BuildLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, _HOLDER_BYTES, 0) or b"{}")
    except ValueError:
        return {}  # being rewritten right now
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "holder unknown"
    jobs = f", an array of {holder['num_shards']} jobs" if holder.get("num_shards", 1) > 1 else ""
    return f"pid {holder['pid']} on {holder.get('host', '?')}{jobs}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs; a zombie -- killed, not yet reaped -- does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the name in parentheses may hold spaces
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process receive SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    ``kill -9`` of a build leaves no worker writing; exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)
