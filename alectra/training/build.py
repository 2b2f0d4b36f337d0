"""Build everything a run needs, in order: process group -> data -> model -> DeepSpeed engine -> resume.

`alectra/pretrain.py` checks the run config, the DeepSpeed JSON (`DeepSpeedPlan`) and the datasets
(`RunData`) before calling anything here; each step is a small function so that `build_trainer` reads as
the recipe.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed

from alectra.config import RunConfig, save_config
from alectra.training import ds_env, zero
from alectra.training.checkpoint import (
    Checkpointer,
    CheckpointInfo,
    find_resume,
    restore_param_groups,
    universal_checkpoint,
)
from alectra.training.compile import compile_engine
from alectra.training.data import RunData, pretraining_datasets
from alectra.training.ds_config import DeepSpeedPlan, write_ds_config
from alectra.training.metrics import MetricsReporter
from alectra.training.optim import build_optimizer, build_scheduler
from alectra.training.trainer import Trainer, TrainState, set_rng_states

log = logging.getLogger(__name__)


def init_process_group() -> None:
    """Join the process group of the ranks `alectra.distributed.init_distributed_env` described (gloo on CPU,
    nccl on GPU: DeepSpeed's accelerator picks); the CUDA device follows LOCAL_RANK."""
    with ds_env.quiet_output():  # its CPU comm op prints "... built successfully" on every start
        deepspeed.init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _device(plan: DeepSpeedPlan) -> torch.device:
    if plan.accelerator == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(plan.accelerator)


def _restore(engine: Any, info: CheckpointInfo, same_world: bool) -> TrainState:
    load_path, client = engine.load_checkpoint(
        str(info.path.parent), tag=info.path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {info.path}")
    state = TrainState(**client["train_state"])
    if same_world:  # the per-step reseeding makes this redundant for our code; it covers anything else
        set_rng_states(client["rng_states"][torch.distributed.get_rank()])
    else:
        restore_param_groups(engine, info.path)  # DeepSpeed's ZeRO-3 universal load merges them
    return state


def build_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: dict[str, Any], *, offload: bool) -> Any:
    """The DeepSpeed engine around `model` (already on its device): optimizer, LR schedule, ZeRO wrapper
    (`zero.initialize`: deepspeed.initialize with alectra's ZeRO-1/2 step; LAMB gets its per-parameter
    layout of the flat partitions there)."""
    optimizer = build_optimizer(model, cfg.train, offload=offload)
    return zero.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.train), config=ds_config
    )


def build_trainer(cfg: RunConfig, plan: DeepSpeedPlan, data: RunData) -> Trainer:
    """Everything up to the first step; collective (call on every rank after `init_process_group`).

    `cfg` is the run config at this world size (`RunConfig.at_world_size`), `plan` its resolved DeepSpeed
    JSON, `data` its checked dataset folders."""
    from alectra.export import export_checkpoint, write_model_metadata
    from alectra.model import ElectraPretrainingModel

    rank, dp_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if dp_size != plan.batch.dp_size:
        raise RuntimeError(f"the plan is for {plan.batch.dp_size} ranks, the process group has {dp_size}")
    ds_config = plan.config
    train_ds, valid_ds = pretraining_datasets(cfg, data.paths)

    resume = find_resume(cfg.checkpoint_dir, cfg.checkpoint.resume)
    same_world = resume is None or resume.world_size == dp_size
    if not same_world:
        ds_config = {**ds_config, "checkpoint": {"load_universal": True}}
        resume = CheckpointInfo(
            path=universal_checkpoint(resume),
            step=resume.step,
            world_size=resume.world_size,
            zero_stage=resume.zero_stage,
        )

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every start
    model_config = cfg.model.model_config()
    special = data.special_token_ids
    model = ElectraPretrainingModel(model_config, vocab_size=data.vocab_size, special_token_ids=special)
    flops_per_token = model.flops_per_token(cfg.data.max_seq_length)
    model.to(_device(plan))
    engine = build_engine(model, cfg, ds_config, offload=plan.offload_optimizer)
    compile_engine(engine, cfg.train.compile, device_type=plan.accelerator, zero_stage=plan.zero_stage)
    state = TrainState() if resume is None else _restore(engine, resume, same_world)

    if rank == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "run_config.yaml")
        write_ds_config(ds_config, out / "ds_config.json")
        tokenizer_dir = Path(data.tokenizer.name_or_path)
        write_model_metadata(
            cfg.checkpoint_dir,
            model_config=model_config,
            vocab_size=data.vocab_size,
            special_token_ids=special,
            tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
        )
        what = f"resuming from {resume.path} (step {state.step})" if resume else "starting fresh"
        log.info(
            "%s; %d rank(s), micro-batch %d, grad-accum %d, ZeRO-%d, %s",
            what,
            dp_size,
            plan.batch.micro_batch_size,
            plan.batch.grad_accum,
            plan.zero_stage,
            plan.precision,
        )
    reporter = MetricsReporter(
        engine=engine,
        is_rank0=rank == 0,
        total_steps=cfg.train.steps,
        start_step=state.step,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.max_seq_length,
        samples_per_step=cfg.train.global_batch_size,
        flops_per_token=flops_per_token,
        precision=plan.precision,
        progress_bar=cfg.logging.progress_bar,
        every=cfg.logging.every,
    )
    checkpointer = Checkpointer(
        cfg.checkpoint_dir,
        every=cfg.checkpoint.every,
        keep_last=cfg.checkpoint.keep_last,
        zero_stage=plan.zero_stage,
    )
    return Trainer(
        cfg=cfg,
        engine=engine,
        train_dataset=train_ds,
        valid_dataset=valid_ds,
        state=state,
        checkpointer=checkpointer,
        reporter=reporter,
        plan=plan,
        export=lambda tag_dir: export_checkpoint(tag_dir, Path(cfg.output_dir) / "export"),
        last_checkpoint=None if resume is None else resume.path,
    )
