"""Test-wide settings: fully offline, Triton in interpreter mode where there is no GPU.

TRITON_INTERPRET must be in the environment before any module defining a @triton.jit kernel is
imported (set later, launches fail with "0 active drivers"), so it is set here, at collection time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
    import socket

    import deepspeed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rendezvous = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    os.environ.update({k: os.environ.get(k, v) for k, v in {**rendezvous, "MASTER_PORT": str(port)}.items()})
    deepspeed.init_distributed(dist_backend="gloo")
    yield
