"""Fail-stop: a run that fails ends every one of its processes within seconds, with one line and an exit code.

`exit_process(main)` runs an entry point and ends the process; what it prints and returns (docs/training.md):

    0    finished                                   75   checkpoint saved after SIGTERM/SIGUSR1: requeue
    2    the user can fix it: configuration, a path, damaged data or checkpoint, disk full (one `error:` line)
    1    a bug (traceback, then one `error:` line), a non-finite loss, or a collective that failed because
         another rank stopped (that rank printed the cause)
    130  Ctrl-C (128 + SIGINT, what a shell reports)

slurm/pretrain.sh requeues 75, gives up at once on 2, and retries anything else a bounded number of times;
srun returns the highest exit code of the step's tasks, so a rank's 2 is not hidden by its peers' 1.

Why a failed run used to hang (issue 14): DataLoader workers ignore SIGTERM (SLURM signals every process of a
step; see signals.init_worker), so Python's exit handler, which terminates daemonic children with SIGTERM and
then joins them (multiprocessing/util.py `_exit_function`), waited forever for a worker the failed trainer
had not stopped. Now (1) the trainer stops its workers on every exit path, (2) every worker gets SIGKILL when
its parent dies (PR_SET_PDEATHSIG), (3) a failed process leaves with `os._exit` after flushing its output,
skipping exit handlers and C++ destructors that could block or abort, and a deadline timer does the same if
anything before it hangs. A rank that exits closes its sockets, so its peers' pending gloo collectives fail
at once ("Connection closed by peer") and they exit 1 too; torchrun, the deepspeed launcher and srun then end
(NCCL does not notice a dead peer: there the launcher, or srun --wait in the SLURM template, ends them).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn

from alectra.training.signals import EXIT_OK, EXIT_REQUEUE

EXIT_BUG = 1
EXIT_USER = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_DEADLINE_S = 20.0
"""Seconds a failed process may spend on its way out (closing the trainer, flushing) before it is ended."""

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# gloo's messages when a peer's process is gone (transport/tcp/pair.cc) or silent past the timeout
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")
_BUG = " (a bug: the traceback is above)"


class DiskFullError(OSError):
    """A write failed because its file system is full; the message names the folder and the space needed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions a user causes and can fix (exit 2): configuration, paths, damaged inputs or checkpoints."""
    from alectra.config import ConfigError
    from alectra.storage.indexed import IndexFormatError
    from alectra.storage.tokenizer import TokenizerError
    from alectra.training.checkpoint import CheckpointError

    paths = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    return (ConfigError, TokenizerError, IndexFormatError, CheckpointError, DiskFullError, *paths)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def out_of_space(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error in `exc`'s cause chain, if any."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS), None)


def peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank stopped (or the network failed)."""
    import torch.distributed

    if isinstance(exc, torch.distributed.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _PEER_GONE)


def classify(exc: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> tuple[int, str]:
    """(exit code, the one line that names the cause) for an exception that ended a run."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)"
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, user_error_types() + tuple(user_errors)):
        return EXIT_USER, first_line
    space = out_of_space(exc)
    if space is not None:
        folder = os.path.dirname(space.filename) if space.filename else "?"
        return EXIT_USER, f"disk full writing in {folder}: {space.strerror}; free space there, then resume"
    if "torch.distributed" in sys.modules and peer_failure(exc):
        return EXIT_BUG, (
            f"a collective operation failed, most likely because another rank stopped (its error names the "
            f"cause): {type(exc).__name__}: {first_line}"
        )
    trainer = sys.modules.get("alectra.training.trainer")
    if trainer is not None and isinstance(exc, trainer.NonFiniteLossError):
        return EXIT_BUG, first_line
    return EXIT_BUG, f"{type(exc).__name__}: {first_line}{_BUG}"


def report_failure(exc: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Print the traceback of a bug, then one line naming the cause (with the rank when there are several);
    return the exit code."""
    code, line = classify(exc, user_errors)
    if line.endswith(_BUG):
        traceback.print_exception(exc)
    rank = f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{'' if code == EXIT_INTERRUPTED else 'error: '}{rank}{line}", file=sys.stderr, flush=True)
    return code


_deadline: threading.Timer | None = None


def on_failure(exc: BaseException, seconds: float = EXIT_DEADLINE_S) -> None:
    """Called where a run first sees its failure, before it cleans up: a second Ctrl-C ends the process at
    once, and the process ends with the failure's exit code after `seconds` if it has not ended by then."""
    global _deadline
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _deadline is not None:
        return
    code = classify(exc)[0]

    def expire() -> None:
        print(f"error: still alive {seconds:.0f} s after failing; exiting with {code}", file=sys.stderr)
        _hard_exit(code)

    _deadline = threading.Timer(seconds, expire)
    _deadline.daemon = True
    _deadline.start()


def _hard_exit(code: int) -> NoReturn:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def exit_process(main: Callable[[], int], user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Run an entry point and end the process with its exit code.

    0 and 75 leave through the normal interpreter exit (the trainer has closed everything). Any other code,
    and any exception (mapped by `classify`, reported by `report_failure`; `user_errors` adds exit-2 types),
    leaves with `os._exit` once the output is flushed: no exit handler or C++ destructor can block or abort
    it."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's usage errors (2) and explicit exits keep their code
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else EXIT_BUG if exc.code else EXIT_OK
    except BaseException as exc:  # noqa: BLE001 - the one place every failure of the run becomes an exit code
        on_failure(exc)
        code = report_failure(exc, user_errors)
    if code in (EXIT_OK, EXIT_REQUEUE):
        sys.exit(code)
    _hard_exit(code)


def stop_loader_workers(batches: object) -> None:
    """Stop the worker processes of a DataLoader iterator (no-op for `num_workers=0`).

    torch stops them in the iterator's `__del__` (`_MultiProcessingDataLoaderIter._shutdown_workers`,
    torch/utils/data/dataloader.py: a None on each index queue, a join of up to 5 s each, then SIGTERM), but a
    failing trainer's frames keep the iterator alive until the process exits, and our workers ignore SIGTERM.
    So the trainer calls this on every exit path: torch's shutdown first (it also takes the workers off its
    SIGCHLD watch, which would otherwise turn a killed worker into a new exception hiding the first), then
    SIGKILL for any worker still alive."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
        worker.join()
