"""A throw-away SLURM cluster on this machine for the tests: one slurmctld and two slurmd (fake nodes n1, n2).

Everything lives in a temporary folder: slurm.conf, state, logs. The daemons run in the foreground
(`-D`) as our children and are stopped by process id; jobs are cancelled first because slurmstepd
ignores TERM and would outlive slurmd. `auth/none` + `cred/none` (both shipped in Debian's slurm-wlm
22.05) mean no munged is needed. Ports are picked free above 16800, away from SLURM's 6817/6818.

Settings that make requeue tests take seconds, not minutes (tested on these machines):
`AuthInfo=cred_expire=5` (the delay before a requeued job may start again, default 120 s) and
`SchedulerParameters=sched_interval=2,bf_interval=1`. `SlurmdParameters=config_overrides` lets each fake
node advertise the configured CPUs/memory instead of the VM's.

Usage by hand:  python -m tests.slurm.cluster   (starts, prints `export SLURM_CONF=...`, waits for Ctrl-C)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests import waiting

# What a launcher exports for one process group; never meaningful for a job submitted from the tests.
_LAUNCHER_VARIABLES = frozenset(
    {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
)

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
NODES = ("n1", "n2")
CPUS_PER_NODE = 4
MEM_PER_NODE_MB = 8000


def slurm_available() -> bool:
    return all(shutil.which(b) for b in SLURM_BINARIES) and os.geteuid() == 0


def _free_port_block(count: int, start: int = 16800, stop: int = 17800) -> int:
    """First port p in [start, stop) with p..p+count-1 all free on 0.0.0.0 (slurmd binds 0.0.0.0)."""
    for base in range(start, stop, count):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports in [{start}, {stop})")


def _die_with_parent() -> None:
    """In the forked daemon: get SIGTERM when the test process dies, so that a pytest killed before its
    teardown (timeout, Ctrl-C twice) leaves no slurmctld/slurmd behind (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class SlurmCluster:
    """Start/stop a two-node loopback SLURM cluster rooted at `root`; `env` runs clients against it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        # Jobs inherit the submitter's environment (--export=ALL): leave out any rendezvous a process-local
        # test left behind, or every job would meet at the same MASTER_PORT.
        inherited = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
        return {**inherited, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        for sub in ("etc", "state/ctld", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        port = _free_port_block(1 + len(NODES))
        r = self.root
        lines = [
            "ClusterName=alectratest",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "AuthInfo=cred_expire=5",
            "MailProg=/bin/true",
            f"StateSaveLocation={r}/state/ctld",
            f"SlurmdSpoolDir={r}/state/d-%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=300",
            "Waittime=0",
            "SlurmdParameters=config_overrides",
        ]
        for i, node in enumerate(NODES, start=1):
            lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 Port={port + i} CPUs={CPUS_PER_NODE} "
                f"RealMemory={MEM_PER_NODE_MB} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, cmd: list[str], log_name: str) -> None:
        log = open(self.root / "log" / log_name, "wb")  # noqa: SIM115 - kept open for the daemon's lifetime
        self.procs.append(
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, preexec_fn=_die_with_parent
            )
        )

    def start(self, timeout: float = 60.0) -> None:
        self._write_conf()
        # -i: ignore saved state (a stale state dir would bring back old jobs and ids)
        self._spawn(["slurmctld", "-D", "-i"], "slurmctld.out")
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node], f"slurmd-{node}.out")
        deadline = time.monotonic() + waiting.deadline(timeout)
        while time.monotonic() < deadline:
            idle = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False).stdout.split()
            if set(NODES) <= set(idle):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.25)
        logs = "".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*")))
        self.stop()
        raise RuntimeError(f"SLURM test cluster did not come up; daemon logs:\n{logs}")

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, check=check, timeout=waiting.deadline(timeout)
        )

    def stop(self) -> None:
        if self.procs and self.procs[0].poll() is None:
            self.run(["scancel", "--user=root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        # slurmd before slurmctld, each TERM then KILL after 10 s; only our own children, by pid
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    import tempfile

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the daemons too
    with tempfile.TemporaryDirectory(prefix="alectra-slurm-") as tmp, slurm_cluster(Path(tmp)) as c:
        print(f"export SLURM_CONF={c.conf}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
