"""Unit tests of alectra.distributed: SLURM node-list expansion, launcher environment discovery, hostfiles."""

import os
import shutil
import subprocess
import sys

import pytest

from alectra.distributed import (
    DistEnv,
    discover,
    expand_nodelist,
    init_distributed_env,
    master_port_for_job,
    write_hostfile,
)


def _no_mpi():
    raise AssertionError("MPI must not be initialised when the environment already answers")


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("n[1-2],login5", ["n1", "n2", "login5"]),
        ("a[1-2]-b[3-4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),
        ("n[8-10],x[008-010]", ["n8", "n9", "n10", "x008", "x009", "x010"]),
        ("node-7", ["node-7"]),
        ("n1,n1", ["n1", "n1"]),
        ("rack[1-2]n[01,03],c", ["rack1n01", "rack1n03", "rack2n01", "rack2n03", "c"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "n[1-2", "n1-2]", "n[2-1]", "n[a-b]", "n[1-]", "n[[1]]", "n1,,n2"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(bad)


def test_master_port_is_deterministic_and_in_range():
    ports = {master_port_for_job(str(job)) for job in range(1000, 1200)}
    assert all(20000 <= p < 30000 for p in ports)
    assert len(ports) > 190  # few collisions between neighbouring job ids
    assert master_port_for_job("4242") == master_port_for_job("4242")
    assert master_port_for_job("4242", "0") != master_port_for_job("4242", "1")


def _srun_env(procid, localid, ntasks=4, nodelist="localhost,n[2-3]", **extra):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_JOB_NODELIST": nodelist,
    }
    env.update(extra)
    return env


def test_srun_task_fills_torch_variables():
    env = _srun_env(3, 1)
    dist_env = init_distributed_env(env)
    assert dist_env == DistEnv(
        rank=3,
        local_rank=1,
        world_size=4,
        master_addr="localhost",
        master_port=master_port_for_job("4242", "0"),
        launcher="slurm",
    )
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    assert env["MASTER_ADDR"] == "localhost"
    assert env["MASTER_PORT"] == str(master_port_for_job("4242", "0"))


def test_all_srun_tasks_agree_on_master():
    envs = [discover(_srun_env(r, r % 2), mpi_factory=_no_mpi) for r in range(4)]
    assert {(e.master_addr, e.master_port, e.world_size) for e in envs} == {
        ("localhost", master_port_for_job("4242", "0"), 4)
    }
    assert [e.rank for e in envs] == [0, 1, 2, 3]


def test_explicit_variables_are_never_overridden():
    env = _srun_env(1, 1, MASTER_ADDR="10.0.0.5", MASTER_PORT="31337")
    dist_env = init_distributed_env(env)
    assert (dist_env.master_addr, dist_env.master_port, dist_env.rank) == ("10.0.0.5", 31337, 1)
    assert env["MASTER_ADDR"] == "10.0.0.5" and env["MASTER_PORT"] == "31337"


def test_unresolvable_master_without_scontrol_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no SLURM client on PATH
    with pytest.raises(ValueError, match="export MASTER_ADDR"):
        discover(_srun_env(0, 0, nodelist="no-such-host-xq[1-2]"))


def test_batch_script_python_is_a_single_process():
    # inside the sbatch script but not under srun: SLURM_NTASKS=4 must not make rank 0 wait for 3 peers
    env = _srun_env(0, 0)
    del env["SLURM_STEP_ID"]
    assert discover(env).world_size == 1


@pytest.mark.parametrize(
    ("extra", "launcher"),
    [
        ({"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}, "torchrun"),
        ({"CROSS_RANK": "0", "LOCAL_SIZE": "2"}, "deepspeed"),
        ({}, "env"),
    ],
)
def test_launcher_variables_left_alone(extra, launcher):
    # srun variables present too (deepspeed --hostfile inside a SLURM job): the launcher's values win
    env = _srun_env(
        0, 0, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="h0", MASTER_PORT="29600", **extra
    )
    before = dict(env)
    dist_env = init_distributed_env(env)
    assert env == before
    assert (dist_env.rank, dist_env.world_size, dist_env.master_addr, dist_env.launcher) == (
        1,
        2,
        "h0",
        launcher,
    )


def test_openmpi_with_given_master_needs_no_mpi_init():
    env = {
        "OMPI_COMM_WORLD_RANK": "2",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "MASTER_ADDR": "head",
        "MASTER_PORT": "23456",
        # mpirun inside an allocation: these describe the daemon step, not the ranks
        **_srun_env(0, 0, ntasks=2),
    }
    dist_env = discover(env, mpi_factory=_no_mpi)
    assert (dist_env.rank, dist_env.local_rank, dist_env.world_size, dist_env.launcher) == (2, 0, 4, "mpi")
    assert (dist_env.master_addr, dist_env.master_port) == ("head", 23456)


def test_srun_pmi2_uses_slurm_without_mpi_init():
    env = _srun_env(1, 1, PMI_RANK="1", PMI_SIZE="4")
    assert discover(env, mpi_factory=_no_mpi).launcher == "slurm"


def test_bad_integer_is_one_clear_error():
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        discover(_srun_env("x", 0))


def test_distenv_validates_fields():
    with pytest.raises(ValueError, match="rank"):
        DistEnv(rank=2, local_rank=0, world_size=2, master_addr="h", master_port=1, launcher="env")
    with pytest.raises(ValueError, match="launcher"):
        DistEnv(rank=0, local_rank=0, world_size=1, master_addr="h", master_port=1, launcher="pdsh")


def test_hostfile_round_trips_through_deepspeed_parser(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    path = write_hostfile(expand_nodelist("gpu[01-03,07]"), 8, tmp_path / "hostfile")
    assert list(fetch_hostfile(str(path)).items()) == [("gpu01", 8), ("gpu02", 8), ("gpu03", 8), ("gpu07", 8)]
    assert [p.name for p in tmp_path.iterdir()] == ["hostfile"]  # no temporary left behind
    with pytest.raises(ValueError, match="listed twice"):
        write_hostfile(["n1", "n1"], 1, tmp_path / "dup")
    with pytest.raises(ValueError, match="slots"):
        write_hostfile(["n1"], 0, tmp_path / "zero")


def test_cli_hostfile_and_error(tmp_path):
    out = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [sys.executable, "-m", "alectra.distributed", "hostfile", "--nodelist", "n[1-2]", "--slots", "2"]
    subprocess.run([*cmd, "--output", str(out)], check=True, env=env, capture_output=True)
    assert out.read_text() == "n1 slots=2\nn2 slots=2\n"
    bad = subprocess.run(
        [sys.executable, "-m", "alectra.distributed", "hostnames", "n[1-2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: invalid SLURM node list 'n[1-2': '[' without ']'"]


def test_single_process_store_binds_its_own_port(tmp_path):
    """A lone process must not fail with EADDRINUSE: not on torch's 29500 held by another job, and not on a
    port chosen free and taken by someone else before the store bound it (seen: two runs side by side).
    Its rendezvous port is 0, and a gloo group starts on it while 29500 is held."""
    import socket

    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # someone else holds it already: the same situation
        dist_env = discover({})
        assert dist_env.launcher == "single" and dist_env.world_size == 1
        assert dist_env.master_port == 0
        code = (
            "import torch, torch.distributed as d; d.init_process_group('gloo'); t = torch.ones(1); "
            "d.all_reduce(t); d.destroy_process_group(); print('ok', int(t))"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
        run = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, **dist_env.as_environ()},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0 and run.stdout.strip() == "ok 1", run.stderr[-2000:]
    with pytest.raises(ValueError, match=r"master_port must be in \[1, 65535\]"):
        DistEnv(rank=0, local_rank=0, world_size=2, master_addr="h", master_port=0, launcher="srun")


def test_single_rank_mpirun_needs_no_mpi_init():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    dist_env = discover(env, mpi_factory=_no_mpi)
    assert (dist_env.world_size, dist_env.local_rank, dist_env.launcher) == (1, 0, "mpi")


def test_the_process_group_uses_the_port_discovery_chose():
    """A single process gets port 0 from discovery (its store binds a port of its own), and joining the
    process group (alectra.training.build.init_process_group) keeps it instead of picking one. In a fresh
    interpreter: this pytest process may hold another test module's group, which must not be replaced or
    destroyed here."""
    code = """
import os, torch.distributed
from alectra.distributed import init_distributed_env
from alectra.training.build import init_process_group
chosen = init_distributed_env().master_port
assert chosen == 0 and os.environ["MASTER_PORT"] == "0", (chosen, os.environ["MASTER_PORT"])
init_process_group()
assert os.environ["MASTER_PORT"] == "0"
store = torch.distributed.distributed_c10d._get_default_store()
while hasattr(store, "underlying_store"):  # PrefixStores over the rendezvous TCPStore
    store = store.underlying_store
assert store.port > 0, store.port  # bound by the store itself
torch.distributed.destroy_process_group()
print("ok")
"""
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_run_on_rank0_returns_and_raises_on_every_rank(single_process_group):
    """With one process, rank 0 runs the function; its exception reaches the caller (the others would get a
    RuntimeError naming it, after the broadcast that keeps them from waiting forever)."""
    from alectra.distributed import run_on_rank0

    assert run_on_rank0(lambda x, y=0: x + y, 2, y=3) == 5
    with pytest.raises(OSError, match="disk full"):
        run_on_rank0(lambda: (_ for _ in ()).throw(OSError("disk full")))
