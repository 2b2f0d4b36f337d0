"""A small real training program with alectra/pretrain.py's launch contract, for testing the sbatch
templates independently of the engine: torch.distributed on gloo, rank discovery through
alectra.distributed.init_distributed_env, SIGUSR1/SIGTERM -> checkpoint at the next step boundary -> exit 75,
resume from the newest checkpoint, exit 0 when done.

    python tests/slurm/standin_train.py --output_dir DIR --train.steps 20 [--standin.step_seconds 0.2]

Per step it appends `step,loss` to DIR/logs/losses.csv (rank 0) and prints `world_size=N` at start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from alectra.distributed import init_distributed_env

EXIT_REQUEUE = 75


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed")
    parser.add_argument("--config")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train.steps", dest="steps", type=int, default=20)
    parser.add_argument("--standin.step_seconds", dest="step_seconds", type=float, default=0.0)
    parser.add_argument("--standin.fail", dest="fail", action="store_true", help="exit 3 at once (a crash)")
    args = parser.parse_args()
    if args.fail:
        print("standin: simulated crash", flush=True)
        return 3

    env = init_distributed_env()
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    print(f"standin: rank={env.rank} world_size={dist.get_world_size()} launcher={env.launcher}", flush=True)
    stop = {"signum": 0}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.update(signum=signum))

    out = Path(args.output_dir)
    ckpt = out / "checkpoints" / "latest.pt"
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"standin: resumed from step {step}", flush=True)

    losses = out / "logs" / "losses.csv"
    while step < args.steps:
        gen = torch.Generator().manual_seed(1000 * step + env.rank)  # data is a function of (step, rank)
        x = torch.randn(16, 8, generator=gen)
        loss = ((model(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= env.world_size
        opt.step()
        step += 1
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if env.rank == 0:
            losses.parent.mkdir(parents=True, exist_ok=True)
            with open(losses, "a") as f:
                f.write(f"{step},{mean_loss.item() / env.world_size:.8f}\n")
        time.sleep(args.step_seconds)
        flag = torch.tensor(stop["signum"])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if flag.item() and step < args.steps:
            if env.rank == 0:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
                os.replace(tmp, ckpt)
            dist.barrier()
            print(f"standin: checkpoint at step {step}, exiting {EXIT_REQUEUE}", flush=True)
            dist.destroy_process_group()
            return EXIT_REQUEUE
    print(f"standin: finished at step {step}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
