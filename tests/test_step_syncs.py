"""The trainer's step never waits for the device between report steps (issue 12, item 3).

The real trainer (`build_trainer`, 1 rank, gloo, ZeRO-1 and ZeRO-2, fp32 on this CPU) runs its own loop
(`Trainer._train`) over 5 steps with a report, the checkpoint and the end at step 5; steps 2, 3 and 4 are
recorded by benchmarks/bench_ops.py's OpCounter, a TorchDispatchMode, from the start of step 2 to the start of
step 5. On a CPU every tensor is on the host, so the host/device boundary is invisible; the rule counts what
crosses it on a GPU:
- device -> host: `_local_scalar_dense` (`.item()`, `float()`, `bool()`, `int()` of a tensor), ops whose
  output size depends on the data (`nonzero`, a boolean index, `masked_select`, `unique`, ...), the Tensor
  methods that copy to the host (`tolist`, `numpy`, `cpu`) and DeepSpeed's `accelerator.synchronize()`;
- host -> device: `lift_fresh`, a tensor made from Python data (`torch.tensor(x, device=d)` builds it on the
  host and copies it over on a GPU). The batches come from the loader before the step (on a GPU: pinned
  memory, an asynchronous copy), so the test hands the loop batches collated beforehand.
Then step 5 (a report step) must read the device: the counter sees the read, so the rule is live.
"""

from __future__ import annotations

import signal
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package; bench_ops imports its siblings

import bench_ops  # noqa: E402

STEPS = 5
RECORDED = (2, 3, 4)  # not report, evaluation or checkpoint steps


class HostDeviceCounter(bench_ops.OpCounter):
    """bench_ops.OpCounter's syncs plus `lift_fresh` (a host -> device copy on a GPU), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.crossings: Counter = Counter()

    def _sync(self, what: str) -> None:
        super()._sync(what)
        if self.recording:
            self.crossings[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.recording and func.overloadpacket.__name__ == "lift_fresh":
            self.crossings["aten.lift_fresh (host -> device)"] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from data_prep import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("data") / "demo", vocab_size=1000, max_documents=120)


def build_trainer(demo: Path, out: Path, zero: str, **extra):
    """The trainer as pretrain.py builds it, 1 rank, on the demo corpus's line pairs at length 32."""
    from alectra.pretrain import check
    from alectra.training import build

    overrides = {
        "data.paths": f"[{demo}]",
        "data.max_seq_length": 32,
        "data.examples": "line_pairs",
        "data.num_workers": 0,
        "data.valid_fraction": 0.05,
        "train.steps": STEPS,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,  # 2 micro-batches per step
        "logging.every": STEPS,
        "logging.eval_every": 0,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        "checkpoint.every": 100,
        **extra,
    }
    overrides["output_dir"] = out
    args = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    cfg, plan, data = check(None, args, str(ROOT / "ds_configs" / f"{zero}.json"))
    return build.build_trainer(cfg, plan, data)


@pytest.mark.parametrize("zero", ["zero1", "zero2"])
def test_no_host_sync_between_report_steps(demo, single_process_group, tmp_path, zero):
    from alectra.training.trainer import Trainer

    trainer = build_trainer(demo, tmp_path, zero)
    loader = trainer._loader(trainer.train_dataset, 0, workers=0)
    batches = [batch for batch, _ in zip(loader, range(STEPS * trainer.grad_accum), strict=False)]

    counter = HostDeviceCounter()
    per_step: dict[int, Counter] = {}
    step_of_trainer = Trainer._train_step

    def recorded_step(self, batches):
        step = self.state.step + 1
        if counter.recording:  # the previous step is over, up to this one's start
            per_step[step - 1] = (counter.crossings.copy(), counter.counts.total)
            counter.crossings.clear()
            counter.counts = bench_ops.Counts()
        counter.recording = step in RECORDED
        return step_of_trainer(self, batches)

    try:
        with (
            mock.patch.object(Trainer, "_train_step", recorded_step),
            mock.patch.object(trainer, "export", lambda tag_dir: tag_dir),
            counter,
            counter.host_copies_counted(),
        ):
            counter.recording = False
            trainer._train(iter(batches))
            counter.recording = True
            final = trainer.health.read()  # a report step's read, seen by the same rule
            counter.recording = False
            read = counter.crossings.copy()
    finally:
        with mock.patch.object(
            torch.distributed, "destroy_process_group"
        ):  # conftest's, kept for later modules
            trainer.close()

    assert sorted(per_step) == list(RECORDED)
    for step, (crossings, ops) in per_step.items():
        assert not crossings, f"step {step} crossed host/device: {dict(crossings)}"
        assert ops > 500, f"step {step}: only {ops} ops recorded"  # the whole step ran under the counter
    assert read == {"Tensor.tolist": 1}, dict(read)  # a report step's read is seen
    assert final.total == 0 and trainer.state.step == STEPS


def test_stop_signal_acts_at_the_step_it_arrived_in(demo, single_process_group, tmp_path):
    """SIGTERM during step 2 of 5 with a report every 100 steps: the trainer reads the non-finite counters,
    then saves step 2 and returns EXIT_REQUEUE, without waiting for a report step (SLURM's grace period)."""
    from alectra.training.signals import EXIT_REQUEUE
    from alectra.training.trainer import Trainer

    trainer = build_trainer(demo, tmp_path, "zero2", **{"logging.every": 100})
    loader = trainer._loader(trainer.train_dataset, 0, workers=0)
    calls: list[str] = []
    step_of_trainer, read, save = Trainer._train_step, trainer.health.read, trainer.save

    def signalled_step(self, batches):
        if self.state.step + 1 == 2:
            signal.raise_signal(signal.SIGTERM)  # the handler sets the flag; the step goes on
        return step_of_trainer(self, batches)

    def recorded(name, fn):
        def call(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return call

    try:
        with (
            mock.patch.object(Trainer, "_train_step", signalled_step),
            mock.patch.object(trainer.health, "read", recorded("read", read)),
            mock.patch.object(trainer, "save", recorded("save", save)),
        ):
            code = trainer._train(iter(loader))
    finally:
        with mock.patch.object(
            torch.distributed, "destroy_process_group"
        ):  # conftest's, kept for later modules
            trainer.close()
    assert code == EXIT_REQUEUE and trainer.state.step == 2
    assert calls == ["read", "save"], calls  # the counters are read before the checkpoint
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_2"


def _stop_flags_rank(rank: int, port: int, signalled: int, answers) -> None:
    from alectra.training.signals import StopRequest
    from alectra.training.trainer import StopFlags

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    request = StopRequest()
    try:
        flags = StopFlags(request, world_size=2)
        first = flags.any()
        if rank == signalled:
            request.signum = signal.SIGTERM  # what the handler does
        answers.put((rank, first, flags.any(), flags.flag.device.type))
    finally:
        request.close()
        torch.distributed.destroy_process_group()


def test_stop_flags_agree_over_ranks_on_the_host():
    """Two ranks: a signal on rank 1 only is seen by both at the same call, through a CPU tensor."""
    import multiprocessing

    from alectra.distributed import free_port

    ctx = multiprocessing.get_context("spawn")
    answers = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_stop_flags_rank, args=(r, port, 1, answers)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        got = sorted(answers.get(timeout=300) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    assert got == [(0, False, True, "cpu"), (1, False, True, "cpu")]
    assert [proc.exitcode for proc in procs] == [0, 0]


def test_the_rule_sees_each_kind_of_crossing():
    counter = HostDeviceCounter()
    counter.recording = True
    with counter, counter.host_copies_counted():
        x = torch.tensor([0.0, 1.0, 2.0])  # lift_fresh
        float(x[1])  # _local_scalar_dense
        x.nonzero()
        x[x > 0]  # boolean index
        x.tolist()
        torch.zeros(()).fill_(3)  # not a crossing: a kernel with the value as its argument
    assert set(counter.crossings) == {
        "aten.lift_fresh (host -> device)",
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.index",
        "Tensor.tolist",
    }, dict(counter.crossings)


def test_health_counts_runs_of_nonfinite_steps_across_reads():
    """StepHealth's device counters between two reads: the run going on, the longest run (one that spans a
    read counts whole), the number of non-finite steps, an update applied with a non-finite loss."""
    from alectra.training.trainer import StepHealth

    health = StepHealth("cpu")
    good, bad = torch.tensor(1.0), torch.tensor(float("nan"))

    def steps(*losses, skipped=1.0):
        for loss in losses:
            health.add(good)  # a step's micro-batches: one non-finite loss makes the step non-finite
            health.add(loss)
            health.step_done(skipped)

    steps(good, bad, bad, good, bad)
    first = health.read()
    assert (first.consecutive, first.longest, first.total, first.lost) == (1, 2, 3, False)
    steps(bad, bad)
    second = health.read()  # the run of 3 started before the first read
    assert (second.consecutive, second.longest, second.total, second.lost) == (3, 3, 2, False)
    steps(good)
    steps(bad, skipped=torch.tensor(0.0))  # the engine applied the update of a non-finite step
    third = health.read()
    assert (third.consecutive, third.longest, third.total, third.lost) == (1, 1, 1, True)
    assert health.read().total == 0
