"""Runs alectra/pretrain.py with one fault injected, for tests/test_faults.py (not a test module itself).

    ALECTRA_FAULT=raise@3 python tests/fault_inject.py <pretrain.py arguments>   # RuntimeError before step 3
    ALECTRA_FAULT=raise@3@1 ...       # the same on rank 1 only (RANK from torchrun)
    ALECTRA_FAULT=kill-in-save@4 ...  # SIGKILL when DeepSpeed has written step_4, before the commit mark

It prints `fault-injected-at <unix time>` on stderr when the fault fires, so a test can time the exit.
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

PRETRAIN = Path(__file__).resolve().parents[1] / "alectra" / "pretrain.py"
kind, step_text, *rank_text = os.environ["ALECTRA_FAULT"].split("@")
STEP = int(step_text)
RANK = int(rank_text[0]) if rank_text else None


def fires() -> bool:
    if RANK is not None and int(os.environ.get("RANK", "0")) != RANK:
        return False
    print(f"fault-injected-at {time.time()}", file=sys.stderr, flush=True)
    return True


if kind == "raise":
    from alectra.training.trainer import Trainer

    train_step = Trainer._train_step

    def _train_step(self, batches):
        if self.state.step + 1 == STEP and fires():
            raise RuntimeError(f"injected fault before step {STEP}")
        return train_step(self, batches)

    Trainer._train_step = _train_step
elif kind == "kill-in-save":
    from deepspeed.runtime.engine import DeepSpeedEngine

    save_checkpoint = DeepSpeedEngine.save_checkpoint

    def _save_checkpoint(self, save_dir, tag=None, **kwargs):
        result = save_checkpoint(self, save_dir, tag=tag, **kwargs)
        if tag == f"step_{STEP}" and fires():
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    DeepSpeedEngine.save_checkpoint = _save_checkpoint
else:
    raise SystemExit(f"ALECTRA_FAULT={os.environ['ALECTRA_FAULT']!r}: unknown fault {kind!r}")

sys.argv = [str(PRETRAIN), *sys.argv[1:]]
runpy.run_path(str(PRETRAIN), run_name="__main__")
