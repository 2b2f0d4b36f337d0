"""LAMB under DeepSpeed ZeRO-1 and ZeRO-2, fp32 and bf16, 1 and 2 ranks (real gloo processes): the fp32 master
weights after 20 steps equal a reference LAMB (pytorch-lamb's math, copied below) run on the unflattened
parameters in this process.

ZeRO hands LAMB flat partitions holding pieces of several parameters (the toy model's sizes are odd so that
partition boundaries cut parameters); the per-parameter norms must come out as if each tensor were whole.
With 2 ranks every rank gets its own batch, so the reference averages the two gradients.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from alectra.distributed import free_port
from tests.test_optim import reference_lamb_step

STEPS = 20
LR = 1e-2
# "deepspeed": DeepSpeed's own ZeRO optimizer; "fused": the one build_engine installs
# (alectra/training/zero.py FusedZeroOptimizer: chunked reduction into the fp32 partitions, found_inf skip).
CASES = [
    (path, stage, dtype) for path in ("deepspeed", "fused") for stage in (1, 2) for dtype in ("fp32", "bf16")
]


class Toy(nn.Module):
    """Odd sizes, a LayerNorm and biases (the no-decay group), two groups of unequal size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 13)
        self.dense = nn.Linear(13, 29)
        self.LayerNorm = nn.LayerNorm(29)
        self.out = nn.Linear(29, 7)

    def forward(self, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.LayerNorm(nn.functional.gelu(self.dense(self.embed(ids))))
        return (self.out(h).float() - target).pow(2).mean()


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 11, (3, 5), generator=g), torch.randn(3, 5, 7, generator=g)


def initial_model() -> Toy:
    torch.manual_seed(0)
    return Toy()


def reference_run(world: int, dtype: str) -> dict[str, torch.Tensor]:
    """fp32 masters after STEPS reference steps. In bf16, as DeepSpeed's bf16 mode: the masters start from
    the bf16-rounded initial weights, forward/backward run on a bf16 copy of them, and the (bf16) gradients
    are averaged in bf16."""
    from alectra.optim import parameter_groups

    master = initial_model()
    if dtype == "bf16":
        master = master.to(torch.bfloat16).float()
    groups = parameter_groups(master, 0.01)
    state: dict = {}
    for step in range(STEPS):
        work = master if dtype == "fp32" else Toy().to(torch.bfloat16)
        if dtype == "bf16":
            work.load_state_dict({k: v.to(torch.bfloat16) for k, v in master.state_dict().items()})
        grads = []
        for rank in range(world):
            work.zero_grad()
            work(*batch(step, rank)).backward()
            grads.append({n: p.grad.clone() for n, p in work.named_parameters()})
        for n, p in master.named_parameters():  # summed in the gradients' dtype, as ZeRO's all-reduce does
            p.grad = (sum(g[n] for g in grads) / world).float()
        reference_lamb_step(groups, state, lr=LR)
    return {n: p.detach().clone() for n, p in master.named_parameters()}


# ---- DeepSpeed worker (one process per rank) ---------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from alectra.optim import Lamb, parameter_groups
    from alectra.training import zero

    # The reference runs here, in a fresh interpreter, before any engine exists: an in-process ZeRO-3 engine
    # (tests/test_export.py) leaves torch.nn.functional.linear replaced by DeepSpeed's zero3_linear_wrap,
    # which rounds bf16 differently, for the rest of a pytest session.
    references = {dtype: reference_run(world, dtype) for dtype in ("fp32", "bf16")} if rank == 0 else {}
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    results = {}
    for path, stage, dtype in CASES:
        model = initial_model()
        lamb = Lamb(parameter_groups(model, 0.01), lr=LR, weight_decay=0.01)
        config = {
            "train_micro_batch_size_per_gpu": 3,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": dtype == "bf16"},
            "zero_allow_untested_optimizer": True,
        }
        if path == "fused":
            engine = zero.initialize(model=model, optimizer=lamb, config=config)  # installs lamb.layouts
            assert engine.optimizer.fused, "LAMB did not get the fused ZeRO path"
        else:
            engine, *_ = deepspeed.initialize(model=model, optimizer=lamb, config=config)
            lamb.layouts = zero.segment_layouts(engine.optimizer)
        for step in range(STEPS):
            ids, target = batch(step, rank)
            engine.backward(engine(ids, target))
            engine.step()
        results[(path, stage, dtype)] = {
            n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()
        }
        engine.destroy()
    if rank == 0:
        torch.save({"zero": results, "reference": references}, os.path.join(out_dir, "results.pt"))


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def zero_runs(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"lamb_zero_{world}")
    mp.start_processes(_worker, args=(world, free_port(), str(out)), nprocs=world, start_method="spawn")
    return world, torch.load(out / "results.pt")


# The one difference is the order of the sums of squares (index_add over a partition plus an all-reduce,
# vs one .sum() per tensor): ~1e-7 relative, measured max 2.4e-7 after 20 steps in fp32 and 1.2e-7 in bf16
# (the reference reproduces DeepSpeed's bf16 arithmetic: bf16-rounded initial masters, bf16 forward and
# backward, bf16 gradient sum). bf16 gets more room: a 1e-7 master difference that lands on a bf16 rounding
# boundary changes one weight of the bf16 copy by an ulp (0.4 %) and that step's gradients with it.
TOLERANCE = {"fp32": dict(atol=2e-6, rtol=1e-5), "bf16": dict(atol=1e-4, rtol=0.0)}


@pytest.mark.parametrize(("path", "stage", "dtype"), CASES, ids=[f"{p}-zero{s}-{d}" for p, s, d in CASES])
def test_lamb_under_zero_matches_reference(zero_runs, path, stage, dtype):
    world, results = zero_runs
    got, want = results["zero"][(path, stage, dtype)], results["reference"][dtype]
    initial = initial_model() if dtype == "fp32" else initial_model().to(torch.bfloat16).float()
    for name, value in want.items():
        moved = (value - initial.get_parameter(name)).abs().max()
        assert moved > LR, f"{name} barely trained ({moved}); the comparison would prove nothing"
        torch.testing.assert_close(
            got[name], value, **TOLERANCE[dtype], msg=f"{name} ({path}, {stage=}, {dtype})"
        )
