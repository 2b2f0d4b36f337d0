"""Rank, world size and rendezvous address discovery for SLURM, MPI, torchrun and the DeepSpeed launcher.

`init_distributed_env()` is called by `alectra/pretrain.py` before `deepspeed.init_distributed()`. It fills
`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (the five variables DeepSpeed's
`init_distributed` requires before it skips its own MPI discovery, deepspeed/comm/comm.py) from whichever
launcher started the process, and never overrides a variable that is already set:

- torchrun / `deepspeed` launcher / anything that exports `RANK` + `WORLD_SIZE`: left alone.
- OpenMPI `mpirun` (`OMPI_COMM_WORLD_*`) or a PMI launcher (`PMI_RANK`/`PMI_SIZE`: MPICH, Intel MPI,
  `srun --mpi=pmi2`): rank and size from those; rank 0's host name and a port free on it are broadcast
  with mpi4py, as DeepSpeed's `mpi_discovery` does, but by name rather than the first address of
  `hostname -I` (often a docker or management interface on multi-homed nodes).
- `srun` (`SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS` of a job step): the master is the first host of
  the step's node list, where SLURM places task 0 under its block and cyclic distributions.

Under srun the master port, when unset, is derived from the job id (and step id), so every rank computes
the same value without communicating and two jobs sharing a node do not collide.

Also a small CLI used by the sbatch templates:
    python -m alectra.distributed hostnames 'gpu[01-03,07]'
    python -m alectra.distributed hostfile --nodelist "$SLURM_JOB_NODELIST" --slots 8 --output hostfile
    python -m alectra.distributed env        # what init_distributed_env() would set, one VAR=value a line
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import zlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alectra.storage.atomic import write_text_atomic

# Ports 20000-29999: below Linux's ephemeral range (32768+, net.ipv4.ip_local_port_range), so a
# rendezvous port is not taken by some outgoing connection; it includes torch's default 29500.
_PORT_BASE = 20000
_PORT_SPAN = 10000
_DEFAULT_PORT = 29500  # torch.distributed / DeepSpeed default: RANK/WORLD_SIZE/MASTER_ADDR given, no port

LAUNCHERS = ("torchrun", "deepspeed", "env", "mpi", "slurm", "single")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits in the job and how it reaches rank 0."""

    rank: int
    """Global rank, 0 <= rank < world_size."""
    local_rank: int
    """Rank among the processes on this node; selects the GPU."""
    world_size: int
    """Number of processes in the job."""
    master_addr: str
    """Host name or address of rank 0, used for the torch.distributed TCP rendezvous."""
    master_port: int
    """TCP port of the rendezvous on master_addr; 0 for a single process: its store binds a port of its own
    (torch's TCPStore with port 0), so no other process can take the port between choosing and binding it."""
    launcher: str
    """Who started the process: one of LAUNCHERS."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"DistEnv.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistEnv.rank must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0 or self.local_rank > self.rank:
            raise ValueError(f"DistEnv.local_rank must be in [0, rank={self.rank}], got {self.local_rank}")
        if not self.master_addr:
            raise ValueError("DistEnv.master_addr must be a non-empty host name or address")
        lowest = 0 if self.world_size == 1 else 1
        if not lowest <= self.master_port <= 65535:
            raise ValueError(f"DistEnv.master_port must be in [{lowest}, 65535], got {self.master_port}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"DistEnv.launcher must be one of {LAUNCHERS}, got {self.launcher!r}")

    def as_environ(self) -> dict[str, str]:
        """The torch.distributed environment variables for this process."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


# ---------------------------------------------------------------------------------------------------------
# SLURM host lists


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets: 'n[1,3],m2' -> ['n[1,3]', 'm2']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"invalid SLURM node list {text!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"invalid SLURM node list {text!r}: ']' without '['")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"invalid SLURM node list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_range_set(ranges: str, nodelist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']; the width of the lower bound sets the zero padding
    (SLURM hostlist.c: `[08-10]` gives 08 09 10, `[8-10]` gives 8 9 10)."""
    out = []
    for item in ranges.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"invalid SLURM node list {nodelist!r}: bad range {item!r} (want N or N-M)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"invalid SLURM node list {nodelist!r}: range {item!r} runs backwards")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list the way `scontrol show hostnames` does, in order, duplicates kept.

    'gpu[01-03,07]' -> gpu01 gpu02 gpu03 gpu07; 'n[1-2],login5' -> n1 n2 login5;
    'a[1-2]-b[3-4]' -> a1-b3 a1-b4 a2-b3 a2-b4 (several brackets: cartesian product, first varies slowest).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        if not item:
            raise ValueError(f"invalid SLURM node list {nodelist!r}: empty entry")
        # pieces alternate literal, bracket body, literal, ...:
        # 'a[1-2]-b[3-4]' -> ['a', '1-2', '-b', '3-4', '']
        pieces = re.split(r"\[([^\]]*)\]", item)
        expanded = [""]
        for k, piece in enumerate(pieces):
            choices = _expand_range_set(piece, nodelist) if k % 2 else [piece]
            expanded = [prefix + choice for prefix in expanded for choice in choices]
        hosts.extend(expanded)
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Hosts of a SLURM node list: `expand_nodelist`, or `scontrol show hostnames` for a form it rejects.

    The Python expansion comes first: it agrees with scontrol on every form SLURM writes into
    SLURM_*NODELIST (tests/test_slurm.py compares them on a real cluster), and it spares each of thousands
    of ranks a subprocess that, on a configless cluster, also fetches slurm.conf from the controller.
    """
    try:
        return expand_nodelist(nodelist)
    except ValueError:
        hosts = _scontrol_hostnames(nodelist)
        if hosts is None:
            raise
        return hosts


def _scontrol_hostnames(nodelist: str) -> list[str] | None:
    scontrol = shutil.which("scontrol")
    if not scontrol:
        return None
    try:
        proc = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # scontrol prints "Invalid hostlist: ..." and still exits 0 on a list it cannot parse
    if (
        proc.returncode != 0
        or proc.stderr.strip()
        or "Invalid hostlist" in proc.stdout
        or not proc.stdout.strip()
    ):
        return None
    return proc.stdout.split()


def _resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def _slurm_node_addr(node: str) -> str | None:
    """NodeAddr of a SLURM node (`scontrol show node`): how SLURM itself reaches a node whose NodeName has
    no DNS entry. One controller RPC, so only used when the name does not resolve."""
    scontrol = shutil.which("scontrol")
    if not scontrol:
        return None
    try:
        proc = subprocess.run(
            [scontrol, "show", "node", "--oneliner", node], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bNodeAddr=(\S+)", proc.stdout)
    return match.group(1) if proc.returncode == 0 and match else None


def slurm_master_addr(nodelist: str) -> str:
    """Address of task 0 of a SLURM step: the first host of its node list, or that node's NodeAddr when
    the host name does not resolve."""
    first = slurm_hostnames(nodelist)[0]
    if _resolvable(first):
        return first
    addr = _slurm_node_addr(first)
    if addr and _resolvable(addr):
        return addr
    raise ValueError(
        f"cannot resolve the first host {first!r} of SLURM node list {nodelist!r}; "
        "export MASTER_ADDR=<address of that node> before srun"
    )


def master_port_for_job(job_id: str, step_id: str | None = None) -> int:
    """A rendezvous port in [20000, 30000) that is a pure function of the job (and step) id.

    Every rank of a step computes the same port without talking to the others; the step id separates
    concurrent or consecutive `srun` steps of one allocation (a retried step would otherwise meet the
    previous one's socket in TIME_WAIT). A requeued job keeps its id and gets the same port.
    """
    key = job_id if step_id is None else f"{job_id}.{step_id}"
    return _PORT_BASE + zlib.crc32(key.encode()) % _PORT_SPAN


def free_port() -> int:
    """A TCP port free on this host right now, for a rendezvous other processes must be told about (MPI's
    rank 0 broadcasts it). Another process may bind it before the store does; a single process therefore
    uses port 0 instead (DistEnv.master_port), which was seen to matter: two runs side by side on a loaded
    machine failed with EADDRINUSE on the port this returned."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))  # all interfaces, as torch's TCPStore server binds
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed hostfile


def format_hostfile(hosts: Sequence[str], slots: int) -> str:
    """DeepSpeed/OpenMPI hostfile text: one `host slots=N` line per host (deepspeed/launcher/runner.py)."""
    if slots < 1:
        raise ValueError(f"slots per host must be >= 1, got {slots}")
    if not hosts:
        raise ValueError("a hostfile needs at least one host")
    duplicates = sorted({h for h in hosts if list(hosts).count(h) > 1})
    if duplicates:
        raise ValueError(f"host(s) listed twice: {', '.join(duplicates)}; DeepSpeed rejects such hostfiles")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def write_hostfile(hosts: Sequence[str], slots: int, path: str | os.PathLike) -> Path:
    """Write a DeepSpeed hostfile atomically (temporary name, then rename) and return its path."""
    path = Path(path)
    text = format_hostfile(hosts, slots)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


# ---------------------------------------------------------------------------------------------------------
# Environment discovery


def _int_env(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _first_int(environ: Mapping[str, str], names: Sequence[str]) -> int | None:
    for name in names:
        if name in environ:
            return _int_env(environ, name)
    return None


class _Mpi:
    """The few mpi4py calls discovery needs, imported only when an MPI launcher is detected (importing
    mpi4py calls MPI_Init)."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD

    def bcast_from_root(self, value: object) -> object:
        return self.comm.bcast(value, root=0)

    def local_rank(self) -> int:
        # ranks sharing a node = ranks sharing memory (MPI-3 MPI_COMM_TYPE_SHARED)
        return self.comm.Split_type(self._mpi.COMM_TYPE_SHARED).Get_rank()


def _discover_explicit(environ: Mapping[str, str]) -> DistEnv:
    """torchrun / the DeepSpeed launcher / a user exported RANK and WORLD_SIZE: take them as they are."""
    if "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    elif "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:  # set by deepspeed/launcher/launch.py
        launcher = "deepspeed"
    else:
        launcher = "env"
    world_size = _int_env(environ, "WORLD_SIZE")
    rank = _int_env(environ, "RANK")
    if "MASTER_ADDR" not in environ and world_size > 1:
        raise ValueError(
            f"RANK and WORLD_SIZE={world_size} are set but MASTER_ADDR is not; export MASTER_ADDR"
        )
    return DistEnv(
        rank=rank,
        local_rank=_int_env(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
        world_size=world_size,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_env(environ, "MASTER_PORT")
        if "MASTER_PORT" in environ
        else (_DEFAULT_PORT if world_size > 1 else free_port()),
        launcher=launcher,
    )


def _discover_mpi(environ: Mapping[str, str], mpi_factory: Callable[[], _Mpi]) -> DistEnv:
    """OpenMPI (OMPI_COMM_WORLD_*) or PMI (PMI_RANK/PMI_SIZE: MPICH hydra, Intel MPI, srun --mpi=pmi2).

    MPI can talk before torch.distributed exists, so rank 0 broadcasts its host name and a port that is
    free on its host right now, instead of every rank guessing (MPICH exports no job id all ranks share).
    """
    if "OMPI_COMM_WORLD_RANK" in environ:
        rank = _int_env(environ, "OMPI_COMM_WORLD_RANK")
        world_size = _int_env(environ, "OMPI_COMM_WORLD_SIZE")
    else:
        rank = _int_env(environ, "PMI_RANK")
        world_size = _int_env(environ, "PMI_SIZE")
    local_rank = _first_int(
        environ,
        ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"),
    )
    given_addr, given_port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    need_rendezvous = world_size > 1 and (given_addr is None or given_port is None)
    mpi = mpi_factory() if world_size > 1 and (local_rank is None or need_rendezvous) else None
    if local_rank is None:
        local_rank = mpi.local_rank() if mpi is not None else 0
    if need_rendezvous:
        master_addr, master_port = mpi.bcast_from_root(
            (socket.gethostname(), free_port()) if rank == 0 else None
        )
    else:
        master_addr, master_port = "127.0.0.1", 0  # one process: its store binds a port of its own
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        master_addr=given_addr or master_addr,
        master_port=_int_env(environ, "MASTER_PORT") if given_port is not None else master_port,
        launcher="mpi",
    )


def _discover_slurm(environ: Mapping[str, str]) -> DistEnv:
    """A task of an `srun` step: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, master = first step host."""
    nodelist = (
        environ.get("SLURM_STEP_NODELIST")
        or environ.get("SLURM_JOB_NODELIST")
        or environ.get("SLURM_NODELIST")
    )
    world_size = _int_env(
        environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    )
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif world_size == 1:
        master_addr = "127.0.0.1"
    elif nodelist:
        master_addr = slurm_master_addr(nodelist)
    else:
        raise ValueError(
            "SLURM_PROCID is set but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; export MASTER_ADDR"
        )
    if "MASTER_PORT" in environ:
        master_port = _int_env(environ, "MASTER_PORT")
    else:
        master_port = master_port_for_job(environ["SLURM_JOB_ID"], environ.get("SLURM_STEP_ID"))
    return DistEnv(
        rank=_int_env(environ, "SLURM_PROCID"),
        local_rank=_int_env(environ, "SLURM_LOCALID"),
        world_size=world_size,
        master_addr=master_addr,
        master_port=master_port,
        launcher="slurm",
    )


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    """True for a task started by srun. The batch script itself also has SLURM_PROCID=0 and the job's
    SLURM_NTASKS, but no SLURM_STEP_ID: a `python` run directly in it is one process, not rank 0 of N."""
    return "SLURM_PROCID" in environ and "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" in environ


def _pmi_agrees_with_srun(environ: Mapping[str, str]) -> bool:
    """`srun --mpi=pmi2` sets PMI_RANK == SLURM_PROCID: SLURM alone answers, no MPI_Init needed. MPICH's
    mpirun inside an allocation starts one proxy per node with srun, so there SLURM_PROCID counts nodes
    and PMI_RANK/PMI_SIZE are the truth."""
    if "PMI_RANK" not in environ:
        return True
    return environ["PMI_RANK"] == environ["SLURM_PROCID"] and environ.get("PMI_SIZE") == environ.get(
        "SLURM_NTASKS"
    )


def discover(environ: Mapping[str, str], *, mpi_factory: Callable[[], _Mpi] = _Mpi) -> DistEnv:
    """Where this process sits, from `environ`, without changing it. Order: explicit RANK/WORLD_SIZE
    (torchrun, deepspeed launcher, user), then OpenMPI's mpirun (inside a SLURM allocation its ranks also
    carry SLURM_* variables of the step that started its daemons, which would be wrong), then srun, then
    PMI, then a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _discover_explicit(environ)
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _discover_mpi(environ, mpi_factory)
    if _in_srun_step(environ) and _pmi_agrees_with_srun(environ):
        return _discover_slurm(environ)
    if "PMI_RANK" in environ:
        return _discover_mpi(environ, mpi_factory)
    return DistEnv(
        rank=0,
        local_rank=0,
        world_size=1,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_env(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 0,  # see master_port
        launcher="single",
    )


def init_distributed_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """Discover this process's place in the job and export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/
    MASTER_PORT into `environ` (default `os.environ`) where they are not already set. Call it before
    `deepspeed.init_distributed()`."""
    environ = os.environ if environ is None else environ
    dist_env = discover(environ)
    for name, value in dist_env.as_environ().items():
        environ.setdefault(name, value)
    return dist_env


_T = TypeVar("_T")


def run_on_rank0(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
    """Run `fn` on rank 0 of the initialised process group while the others wait; rank 0 gets the result,
    the others None. A failure on rank 0 is raised on every rank (its own exception there, a RuntimeError
    naming it elsewhere), so no rank is left waiting."""
    import torch.distributed

    result, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # raised below, after the others learned of it
            error = exc
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise RuntimeError(f"rank 0 failed: {box[0]}")
    return result


# ---------------------------------------------------------------------------------------------------------
# CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alectra.distributed", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    hostnames = sub.add_parser("hostnames", help="expand a SLURM node list, one host a line")
    hostnames.add_argument("nodelist", nargs="?", help="default: $SLURM_JOB_NODELIST")
    hostfile = sub.add_parser("hostfile", help="write a DeepSpeed hostfile (`host slots=N`) from a node list")
    hostfile.add_argument("--nodelist", help="default: $SLURM_JOB_NODELIST")
    hostfile.add_argument("--slots", type=int, required=True, help="processes (GPUs) per host")
    hostfile.add_argument("--output", required=True, help="hostfile path to write")
    sub.add_parser("env", help="print what init_distributed_env() would export, one VAR=value a line")
    return parser


def _nodelist_or_env(value: str | None) -> str:
    nodelist = value or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("no node list given and SLURM_JOB_NODELIST is not set (run inside a SLURM job)")
    return nodelist


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "hostnames":
            print("\n".join(slurm_hostnames(_nodelist_or_env(args.nodelist))))
        elif args.command == "hostfile":
            hosts = slurm_hostnames(_nodelist_or_env(args.nodelist))
            print(write_hostfile(hosts, args.slots, args.output))
        else:
            dist_env = discover(os.environ)
            for name, value in dist_env.as_environ().items():
                print(f"{name}={os.environ.get(name, value)}")
            print(f"LAUNCHER={dist_env.launcher}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
