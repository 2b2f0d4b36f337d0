"""Op budgets of one training step and the sync-free ZeRO-1/2 step of alectra/training/zero.py (issue 12).

Ops are counted by benchmarks/bench_ops.py (a TorchDispatchMode; views, detach and empty* left out; on a CPU
the count is the GPU's launch count and does not depend on the batch size): the tiny preset, batch 2 x 32,
the step after two warm-up steps, through the engine `build_engine` builds and the trainer's own step code,
bf16 forced in the DeepSpeed config. Everything runs in this process on one gloo rank.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package; bench_ops imports its siblings

import bench_ops  # noqa: E402

ARGS = SimpleNamespace(batch=2, seq_len=32, warmup=2)
ENGINE_OVERHEAD = (
    150  # issue 12 item 2: backward hooks + optimizer step over loss.backward, clip, fused AdamW
)
FORWARD_OVERHEAD = 5  # DeepSpeed's forward wrapper dispatches nothing today
TRAINER_BUDGET = 40  # the trainer's per-step bookkeeping (non-finite flag, metric sums, flag all-reduce): 25


def ds_json(name: str) -> Path:
    return ROOT / "ds_configs" / f"{name}.json"


@pytest.fixture(scope="module")
def bare_bf16(single_process_group) -> bench_ops.Counts:
    return bench_ops.count_bare(ARGS, "tiny", "bf16")


@pytest.fixture(scope="module")
def engine_bf16(single_process_group) -> dict[str, bench_ops.Counts]:
    return {name: bench_ops.count_engine(ARGS, "tiny", ds_json(name), "bf16") for name in ("zero1", "zero2")}


def assert_within_budget(engine: bench_ops.Counts, bare: bench_ops.Counts) -> None:
    overhead = bench_ops.engine_overhead(engine, bare)
    assert overhead <= ENGINE_OVERHEAD, (overhead, engine.names["backward"], engine.names["step"])
    assert engine.ops["forward"] - bare.ops["forward"] <= FORWARD_OVERHEAD, engine.names["forward"]
    assert engine.ops["trainer"] <= TRAINER_BUDGET, engine.names["trainer"]
    # The model's own syncs (today its data-dependent masked positions) are the bare loop's too; the engine's
    # forward, backward and step add none.
    assert engine.syncs["forward"] == bare.syncs["forward"], engine.sync_names
    assert engine.syncs["backward"] == 0 and engine.syncs["step"] == 0, engine.sync_names


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_engine_adds_at_most_150_ops_and_no_host_sync(bare_bf16, engine_bf16, name):
    engine = engine_bf16[name]
    assert bare_bf16.ops["backward"] > 100 and bare_bf16.names["step"]["aten._fused_adamw_"] == 2  # counted
    assert engine.names["step"]["aten._fused_adamw_"] == 2  # the engine's update is the fused AdamW kernel
    assert_within_budget(engine, bare_bf16)


def test_stock_deepspeed_step_breaks_the_budget(bare_bf16, monkeypatch):
    """The budget test catches the overhead coming back: DeepSpeed's own ZeRO-2 optimizer fails it."""
    from alectra.training import zero

    monkeypatch.setattr(zero, "initialize", functools.partial(zero.initialize, fused=False))
    stock = bench_ops.count_engine(ARGS, "tiny", ds_json("zero2"), "bf16")
    assert bench_ops.engine_overhead(stock, bare_bf16) > 5 * ENGINE_OVERHEAD
    assert stock.sync_names["step"]["aten._local_scalar_dense"] >= 1  # has_overflow's .item()
    with pytest.raises(AssertionError):
        assert_within_budget(stock, bare_bf16)


# ---- the step's semantics ----------------------------------------------------------------------------------


def build(tmp_path: Path, name: str, precision: str, bucket: int | None = None, **train: float):
    """(engine, cfg, batch) for the tiny preset; `train` overrides RunConfig.train fields, `bucket` the
    JSON's zero_optimization.reduce_bucket_size."""
    from alectra.training.build import build_engine

    cfg = bench_ops.run_config(ARGS, "tiny", str(tmp_path))
    cfg.train.global_batch_size = ARGS.batch * torch.distributed.get_world_size()
    for key, value in train.items():
        setattr(cfg.train, key, value)
    plan = bench_ops.resolved_plan(cfg, ds_json(name), precision)
    if bucket is not None:
        plan.config["zero_optimization"]["reduce_bucket_size"] = bucket
    model = bench_ops.build_model(cfg, torch.device("cpu"))
    engine = build_engine(model, cfg, plan.config, offload=plan.offload_optimizer)
    return engine, cfg, bench_ops.synthetic_batch(ARGS)


def train_step(engine, batch, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    out = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], seed=seed)
    engine.backward(out.loss)
    engine.step()
    return out.loss.detach()


def snapshot(engine) -> dict[str, torch.Tensor]:
    """Everything a skipped step must leave alone: weights, fp32 master partitions, Adam state."""
    tensors = {f"param/{n}": p.detach().clone() for n, p in engine.module.named_parameters()}
    for i, fp32 in enumerate(engine.optimizer.single_partition_of_fp32_groups):
        tensors[f"fp32/{i}"] = fp32.detach().clone()
        for key, value in engine.optimizer.optimizer.state[fp32].items():
            tensors[f"state/{i}/{key}"] = value.detach().clone()
    return tensors


@pytest.mark.parametrize(
    ("name", "precision", "bad", "optimizer"),
    [
        ("zero1", "bf16", "nan", "adamw"),
        ("zero2", "bf16", "inf", "adamw"),
        ("zero2", "fp32", "nan", "adamw"),
        ("zero1", "fp32", "inf", "lamb"),
        ("zero2", "bf16", "nan", "lamb"),
    ],
)
def test_nonfinite_gradient_skips_the_step_on_the_device(
    single_process_group, tmp_path, name, precision, bad, optimizer
):
    """An inf/NaN in one gradient: weights, master weights and optimizer state untouched, the step counted as
    skipped, the LR schedule advanced (GradScaler convention), the optimizer's step count only counting
    applied steps; the next clean step applies. AdamW (torch's fused kernel) and LAMB (alectra.optim)."""
    engine, cfg, batch = build(tmp_path, name, precision, lr=1e-2, warmup_steps=0, optimizer=optimizer)
    try:
        assert engine.optimizer.fused
        if optimizer == "lamb":
            assert engine.optimizer.optimizer.layouts  # per-parameter norms over the partitions
        train_step(engine, batch, seed=0)
        assert engine.was_step_applied() and engine.skipped_steps == 0
        before = snapshot(engine)
        weight = engine.module.discriminator.base_model.encoder.layer[0].attention.self.query.weight
        hook = weight.register_hook(lambda grad: torch.full_like(grad, float(bad)))
        train_step(engine, batch, seed=1)
        hook.remove()
        assert not engine.was_step_applied()
        assert engine.skipped_steps == 1
        after = snapshot(engine)
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value), key
        assert not torch.isfinite(engine.get_global_grad_norm())
        schedule = engine.lr_scheduler.lr_lambdas[0]
        assert engine.get_lr()[0] == pytest.approx(cfg.train.lr * schedule(2))  # two steps taken

        train_step(engine, batch, seed=2)
        assert engine.was_step_applied() and engine.skipped_steps == 1
        assert not torch.equal(snapshot(engine)["fp32/0"], before["fp32/0"])
        for key, value in snapshot(engine).items():  # nothing left of the bad step, alignment padding too
            assert torch.isfinite(value).all(), key
        for state in engine.optimizer.optimizer.state.values():
            assert float(state["step"]) == 2  # bias correction: the two applied steps
        assert getattr(engine.optimizer.optimizer, "found_inf", None) is None  # not left set after the step
    finally:
        engine.destroy()


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_clipping_uses_the_bare_models_global_norm(single_process_group, tmp_path, name):
    """fp32, clipping active (norm ~100 > 0.05): the engine's global norm is torch.nn.utils.clip_grad_norm_'s
    on the bare model, and the clipped update the same, up to fp32 rounding."""
    from alectra.training.optim import build_optimizer, build_scheduler

    engine, cfg, batch = build(tmp_path, name, "fp32", lr=1e-2, warmup_steps=0, clip_grad_norm=0.05)
    model = bench_ops.build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.train, offload=False)
    scheduler = build_scheduler(optimizer, cfg.train)
    try:
        for seed in range(2):
            engine_loss = train_step(engine, batch, seed)
            torch.manual_seed(seed)
            out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], seed=seed)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            bare_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            torch.testing.assert_close(engine_loss, out.loss.detach(), rtol=1e-6, atol=0)
            assert bare_norm > 10 * cfg.train.clip_grad_norm  # clipping is active
            torch.testing.assert_close(engine.get_global_grad_norm(), bare_norm, rtol=1e-6, atol=0)
        for (key, ours), theirs in zip(engine.module.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=key)
    finally:
        engine.destroy()


def test_chunked_reduction_matches_one_chunk(single_process_group, tmp_path):
    """ZeRO-2 with a reduce_bucket_size that cuts the groups into many chunks trains like one chunk each."""
    losses = {}
    for bucket in (50_000_000, 5_000):
        engine, _, batch = build(tmp_path / str(bucket), "zero2", "fp32", bucket, lr=1e-2, warmup_steps=0)
        try:
            chunks = len(engine.optimizer._chunks)
            assert chunks == 2 if bucket > 10**6 else chunks > 20, chunks  # 2 groups: decay, no decay
            losses[bucket] = [float(train_step(engine, batch, seed)) for seed in range(3)]
        finally:
            engine.destroy()
    assert losses[5_000] == pytest.approx(losses[50_000_000], rel=1e-6)


def two_rank_worker(out: Path) -> None:
    """Run by `test_two_ranks_chunks_and_skip` under torchrun: ZeRO-2 fp32 on 2 ranks with different batches,
    one chunk per group and >20 chunks (many outside this rank's partition), 2 clean steps, then a step with
    a NaN gradient on rank 1 only. Writes out/rank<r>.json."""
    bench_ops.init_process_group()
    rank = torch.distributed.get_rank()
    result: dict[str, object] = {}
    for bucket in (50_000_000, 5_000):
        engine, _, batch = build(out / str(bucket), "zero2", "fp32", bucket, lr=1e-2, warmup_steps=0)
        ids = batch["input_ids"]  # (B, T): other tokens on each rank
        other = torch.Generator().manual_seed(rank)
        ids[:, 1:8] = torch.randint(999, 30000, (ids.shape[0], 7), generator=other)
        losses, norms = [], []
        for seed in range(2):
            losses.append(float(train_step(engine, batch, seed)))
            norms.append(float(engine.get_global_grad_norm()))
        before = snapshot(engine)
        weight = engine.module.generator.base_model.encoder.layer[0].output.dense.weight
        hook = weight.register_hook(lambda grad: grad * float("nan") if rank == 1 else grad)
        train_step(engine, batch, seed=2)
        hook.remove()
        untouched = all(torch.equal(value, snapshot(engine)[key]) for key, value in before.items())
        result[str(bucket)] = {
            "chunks": len(engine.optimizer._chunks),
            "losses": losses,
            "norms": norms,
            "applied": engine.was_step_applied(),
            "skipped": engine.skipped_steps,
            "untouched": untouched,
        }
        engine.destroy()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_two_ranks_chunks_and_skip(tmp_path):
    """Across 2 ranks: many chunks train like one chunk per group, the norm is global (the same on both
    ranks), and a NaN gradient on one rank skips the step on both."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        one, many = result["50000000"], result["5000"]
        assert one["chunks"] == 2 and many["chunks"] > 20
        assert many["losses"] == pytest.approx(one["losses"], rel=1e-6)
        assert many["norms"] == pytest.approx(one["norms"], rel=1e-6)
        for run in (one, many):
            assert not run["applied"] and run["skipped"] == 1 and run["untouched"]
    assert ranks[0]["5000"]["losses"] != ranks[1]["5000"]["losses"]  # the ranks saw different batches
    assert ranks[0]["5000"]["norms"] == ranks[1]["5000"]["norms"]  # one global norm


# ---- the DeepSpeed internals alectra/training/zero.py overrides or relies on -----------------------------

ZERO = "DeepSpeedZeroOptimizer"
PINNED = {  # module -> qualified name -> sha256 of its source (first 16 hex digits)
    "deepspeed.runtime.zero.stage_1_and_2": {
        # overridden by FusedZeroOptimizer (zero.py replaces what these do on its path)
        f"{ZERO}.step": "9520884fd916d178",
        f"{ZERO}.process_gradients": "a05fe9cac73c6432",
        f"{ZERO}.reduce_gradients": "385b8e94b1d3cee7",
        f"{ZERO}.overlapping_partition_gradients_reduce_epilogue": "7a5f8e7981c0e2c9",
        f"{ZERO}.independent_gradient_partition_epilogue": "26ceef6d75b34b97",
        # relied on: the flat layout, the hooks calling process_gradients, the fp32 partitions' hp links
        f"{ZERO}.__init__": "faa9fe03f2209e81",
        f"{ZERO}.create_gradient_handling_hooks": "b84ceb8d3356fbed",
        f"{ZERO}._lazy_init_hp_params_optimizer_state": "45e666d78112a891",
        f"{ZERO}.zero_grad": "f303979da7baa514",
    },
    "deepspeed.runtime.utils": {"all_gather_dp_groups": "87c5e3c4215b8194"},
    # the engine: which optimizer methods run when, what it reads after step(), how it is built
    "deepspeed.runtime.engine": {
        "DeepSpeedEngine.allreduce_gradients": "89aab0f80f1a80b3",
        "DeepSpeedEngine._take_model_step": "c4c6e01aa1fc4e7d",
        "DeepSpeedEngine.was_step_applied": "beb1e1c559ad7f6e",
        "DeepSpeedEngine._configure_zero_optimizer": "f31cf07a5d4f4170",
    },
    "deepspeed": {"initialize": "82505af39fb2e68e"},
}


def _source_digest(module: str, qualname: str) -> str:
    import importlib

    obj = importlib.import_module(module)
    for attr in qualname.split("."):
        obj = getattr(obj, attr)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def test_deepspeed_internals_are_the_pinned_ones():
    """alectra/training/zero.py was written against these sources of DeepSpeed 0.19.8. A different version
    or a changed source: re-read each changed one against zero.py (and its module docstring), then update."""
    import deepspeed

    from alectra.training import zero

    assert deepspeed.__version__ == zero.DEEPSPEED_VERSION
    changed = {
        f"{module}.{name}": digest
        for module, names in PINNED.items()
        for name, pinned in names.items()
        if (digest := _source_digest(module, name)) != pinned
    }
    assert changed == {}


if __name__ == "__main__":
    two_rank_worker(Path(sys.argv[1]))
