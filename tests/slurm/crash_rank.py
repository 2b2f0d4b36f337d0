"""A training entry point that fails the way real ones do, for the template's crash handling tests.

    python tests/slurm/crash_rank.py --exit-code N   # every rank exits N at once (e.g. 2 = bad configuration)
    python tests/slurm/crash_rank.py --kill-rank 1   # rank 1 is SIGKILLed (OOM killer); the others hang as
                                                     # if blocked in a collective, until srun --wait ends them
Other arguments (the template's --deepspeed/--output_dir/...) are accepted and ignored.
"""

import argparse
import os
import signal
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--exit-code", type=int)
parser.add_argument("--kill-rank", type=int)
args, _ = parser.parse_known_args()
rank = int(os.environ["SLURM_PROCID"])
print(f"crash_rank: rank {rank} started", flush=True)
if args.exit_code is not None:
    sys.exit(args.exit_code)
if rank == args.kill_rank:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(600)
