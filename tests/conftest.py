"""Test-wide settings: fully offline, Triton in interpreter mode where there is no GPU, one DeepSpeed op cache
per Python environment, built before any test starts.

TRITON_INTERPRET must be in the environment before any module defining a @triton.jit kernel is
imported (set later, launches fail with "0 active drivers"), so it is set here, at collection time.

DeepSpeed compiles its CPU communication op on first use into torch's extension cache, which by default
(~/.cache/torch_extensions/py311_cpu) every Python environment of the machine shares: a second environment
rebuilds it for its own torch, then the first rebuilds it back (4 rebuilds in 25 minutes were seen). Here
TORCH_EXTENSIONS_DIR (unless set) names a folder of this environment's own, and the op is built once, under
a lock, before the first test runs, so no test's deadline includes a 1-4 minute compile and no two
processes race to build it. Set ALECTRA_TEST_TIMEOUT_SCALE for a loaded machine (tests/waiting.py).
"""

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.waiting import deadline  # noqa: E402


def extensions_dir() -> Path:
    """This environment's torch extension cache: ~/.cache/torch_extensions/<env>-<hash of sys.prefix>/<torch's
    own py311_cpu-style folder>, so environments never share (and rebuild) each other's ops."""
    env = f"{Path(sys.prefix).name}-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]}"
    build = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_{build}"
    return Path.home() / ".cache" / "torch_extensions" / env / tag


os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))

# What every CPU training run loads (deepspeed/comm/torch.py, build_shm_op); loaded exactly as DeepSpeed does.
_BUILD_SHM_OP = """
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and builder.is_compatible():
    builder.load(verbose=False)
"""


@pytest.fixture(scope="session", autouse=True)
def deepspeed_cpu_op():
    """Build DeepSpeed's CPU communication op into TORCH_EXTENSIONS_DIR once, before any test (no-op when it
    is there or a GPU is visible: then the op is not used). A lock file in the folder makes concurrent
    sessions of this environment wait for one build instead of starting their own."""
    root = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if torch.cuda.is_available() or list(root.glob("deepspeed_shm_comm/*.so")):
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".alectra-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not list(root.glob("deepspeed_shm_comm/*.so")):
            print(f"\nbuilding DeepSpeed's CPU comm op once into {root} (1-4 minutes)", file=sys.stderr)
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            done = subprocess.run(
                [sys.executable, "-c", _BUILD_SHM_OP],
                env=env,
                capture_output=True,
                text=True,
                timeout=deadline(900),
            )
            assert done.returncode == 0, f"DeepSpeed's CPU op did not build:\n{done.stderr[-4000:]}"
    yield


def _restored_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# Each test module and each test starts from the same environment: an in-process DeepSpeed /
# torch.distributed setup (in a test or a module-scoped fixture) exports RANK/MASTER_PORT/... into os.environ,
# and a later subprocess (a srun job, another training run) must not inherit that rendezvous: the port is
# still held by this process's store.
_restore_module_environment = pytest.fixture(scope="module", autouse=True)(_restored_environment)
_restore_test_environment = pytest.fixture(autouse=True)(_restored_environment)


@pytest.fixture(scope="module")
def single_process_group():
    """A one-process gloo group in this pytest process, for in-process DeepSpeed engines (module-scoped, so
    the environment it exports is restored when the module ends)."""
    import deepspeed

    # port 0: the store binds a port of its own (alectra.distributed.DistEnv.master_port)
    rendezvous = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",
    }
    os.environ.update({k: os.environ.get(k, v) for k, v in rendezvous.items()})
    deepspeed.init_distributed(dist_backend="gloo")
    yield
