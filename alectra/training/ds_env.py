"""The process set up for DeepSpeed before it is imported, and the library output nobody asked for, silenced
at its source: one place, called by the entry points that use DeepSpeed (`alectra/pretrain.py`,
`alectra.export` when it reads ZeRO shards).

What `prepare()` does, each for a named reason (DeepSpeed 0.19.8, torch 2.13):

- **Accelerator.** DeepSpeed picks its accelerator on first use (`deepspeed/accelerator/real_accelerator.py`,
  `get_accelerator`): DS_ACCELERATOR if set, else the first of xpu, npu, sdaa, mps, hpu, mlu, supa, klxpu,
  cuda it finds, else the CPU with a warning ("Setting accelerator to CPU ...") printed by every process
  that imports it. `accelerator_name()` makes the same choice without importing DeepSpeed; when it is the
  CPU fallback, `prepare()` exports DS_ACCELERATOR=cpu (inherited by DataLoader workers and the
  `ds_to_universal` subprocess), which is the same choice made explicitly, so nothing is printed.
- **torch.distributed deprecations.** DeepSpeed's comm backend (`deepspeed/comm/torch.py`) calls
  `all_gather_into_tensor` / `reduce_scatter_tensor`, which torch 2.13 marks deprecated: a FutureWarning at
  every ZeRO-3 step that the user cannot act on. Ignored by exact message.
- **ZeRO-3's output hook.** ZeRO-3 registers backward hooks on the tensors a module returns
  (`deepspeed/runtime/zero/utils.py`, `apply_to_tensors_only`) and warns once that it cannot see inside
  `alectra.model.ElectraOutput`. Only the root module returns one, and the root holds no parameters of its
  own (they all sit in its submodules, which return plain tensors), so there is nothing for that hook to
  fetch: the warning is dropped for that class only.
- **"untested optimizer".** DeepSpeed warns on rank 0 (`engine.py`, `_do_optimizer_sanity_check`) for any
  ZeRO optimizer not on its list; the only one alectra hands it is `alectra.optim.Lamb`, whose ZeRO-1/2
  runs are tested against a reference LAMB (tests/test_lamb_zero.py), and the config key that lets it
  through (`zero_allow_untested_optimizer`) is set by alectra, not by the user: the warning is dropped.

`quiet_output()` captures what a library prints to stdout/stderr during one call (DeepSpeed's progress
prints and tqdm bars in `zero_to_fp32`, its "op built successfully" line, Hugging Face's "Writing model
shards" bars) and shows it only if the call fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# DeepSpeed's detection order after DS_ACCELERATOR (real_accelerator.py): the vendor packages whose presence
# alone makes it pick that accelerator. xpu, mps and cuda are asked through torch below.
_VENDOR_PACKAGES = {
    "npu": "torch_npu",
    "sdaa": "torch_sdaa",
    "hpu": "habana_frameworks",
    "mlu": "torch_mlu",
    "supa": "torch_supa",
    "klxpu": "torch_xmlir",
}
_TORCH_DEPRECATIONS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
_ZERO3_OUTPUT_WARNING = "A module has unknown inputs or outputs type (<class 'alectra.model.ElectraOutput'>)"
_UNTESTED_OPTIMIZER_WARNING = "**** You are using ZeRO with an untested optimizer"

_prepared: str | None = None


def accelerator_name() -> str:
    """The accelerator DeepSpeed will choose here ("cuda", "cpu", "xpu", ...), without importing DeepSpeed."""
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"]
    import torch

    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    for name, package in _VENDOR_PACKAGES.items():
        if importlib.util.find_spec(package) is not None:
            return name  # DeepSpeed's own checks decide the details (e.g. supa before cuda)
    if torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.device_count() > 0 and torch.cuda.is_available():
        return "cuda"
    return "cpu"


class _DropMessage(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def prepare() -> str:
    """Set up this process for DeepSpeed (see the module docstring), once; returns the accelerator name."""
    global _prepared
    if _prepared is None:
        _prepared = accelerator_name()
        if _prepared == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        warnings.filterwarnings("ignore", message=_TORCH_DEPRECATIONS, category=FutureWarning)
        # The logger DeepSpeed creates on import (deepspeed/utils/logging.py: logging.getLogger("DeepSpeed"));
        # a filter added before that survives its setLevel/addHandler.
        dropped = _DropMessage(_ZERO3_OUTPUT_WARNING, _UNTESTED_OPTIMIZER_WARNING)
        logging.getLogger("DeepSpeed").addFilter(dropped)
    return _prepared


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Capture Python-level stdout and stderr for the block; replay them on stderr if the block raises."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
