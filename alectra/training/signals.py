"""SIGTERM / SIGUSR1 -> "save at the next step boundary and exit with EXIT_REQUEUE".

SLURM sends SIGTERM at preemption and, with `#SBATCH --signal=USR1@120`, SIGUSR1 before the time limit.
The handler only sets a flag (nothing else is async-signal-safe); the trainer reduces the flag over ranks at
each step boundary so that all ranks stop at the same step even if only one of them got the signal.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_OK = 0
EXIT_REQUEUE = 75  # BSD EX_TEMPFAIL: a checkpoint was saved after SIGTERM/SIGUSR1; requeue the job
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StopRequest:
    """Installs the handlers on construction; `close()` restores the previous ones.

    Ctrl-C (SIGINT) keeps Python's behaviour, a KeyboardInterrupt where the main thread is, and also sets
    `interrupted`, which the trainer checks at every step end: a KeyboardInterrupt raised while Python runs a
    finalizer (`__del__`, a weakref callback, as when a tensor or a DataLoader iterator is freed) is printed
    as "Exception ignored" and dropped, and the run would go on. A process that inherited SIGINT ignored (a
    job started with `&` from a script, `nohup`) keeps ignoring it, as Python itself does."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.interrupted = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signum = signum

    def _interrupt(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.interrupted = True
        raise KeyboardInterrupt

    @property
    def received(self) -> bool:
        """Whether this process got a stop signal."""
        return self.signum is not None

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def init_worker(worker_id: int, *, parent_pid: int) -> None:  # noqa: ARG001 - worker_init_fn signature
    """DataLoader `worker_init_fn` (bind `parent_pid=os.getpid()` with functools.partial in the trainer).

    Workers ignore SIGTERM/SIGUSR1 so that the trainer, not the signal, ends them: SLURM signals every
    process of the job step, and torch's workers otherwise die on SIGTERM (`_set_worker_signal_handlers`
    re-raises it), which breaks the batch the trainer is waiting for. So that an ignored SIGTERM never keeps
    a worker alive after its trainer: the kernel sends it SIGKILL when the parent dies (PR_SET_PDEATHSIG,
    prctl(2); it fires when the thread that forked the worker ends, and the trainer iterates its loaders
    from the main thread), and the trainer kills its workers on every exit path (Trainer.train)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
