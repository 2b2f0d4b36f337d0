"""SIGTERM / SIGUSR1 -> "save at the next step boundary and exit with EXIT_REQUEUE".

SLURM sends SIGTERM at preemption and, with `#SBATCH --signal=USR1@120`, SIGUSR1 before the time limit.
The handler only sets a flag (nothing else is async-signal-safe); the trainer reduces the flag over ranks at
each step boundary so that all ranks stop at the same step even if only one of them got the signal.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_OK = 0
EXIT_REQUEUE = 75  # BSD EX_TEMPFAIL: a checkpoint was saved after SIGTERM/SIGUSR1; requeue the job


class StopRequest:
    """Installs the handlers on construction; `close()` restores the previous ones."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signum = signum

    @property
    def received(self) -> bool:
        """Whether this process got a stop signal."""
        return self.signum is not None

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader worker_init_fn signature
    """DataLoader `worker_init_fn`: workers ignore SIGTERM/SIGUSR1 so that the trainer, not the signal, ends
    them. SLURM signals every process of the job step, and torch's workers otherwise die on SIGTERM
    (`_set_worker_signal_handlers` re-raises it), which breaks the batch the trainer is waiting for."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
