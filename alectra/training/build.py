"""Build everything a run needs, in order: distributed init -> data -> model -> DeepSpeed engine -> resume.

Each step is a small function so that `build_trainer` reads as the recipe; `alectra/pretrain.py` calls it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed

from alectra.config import ConfigError, RunConfig, save_config
from alectra.training import zero
from alectra.training.checkpoint import (
    Checkpointer,
    CheckpointInfo,
    find_resume,
    restore_param_groups,
    universal_checkpoint,
)
from alectra.training.ds_config import (
    Hardware,
    gradient_accumulation_steps,
    load_ds_json,
    offloads_optimizer,
    precision_of,
    resolve_ds_config,
    write_ds_config,
    zero_stage,
)
from alectra.training.metrics import MetricsReporter
from alectra.training.optim import build_optimizer, build_scheduler
from alectra.training.trainer import Trainer, TrainState, set_rng_states

log = logging.getLogger(__name__)


def init_distributed() -> None:
    """Fill RANK/WORLD_SIZE/... from SLURM, MPI, torchrun or the deepspeed launcher, then init the group
    (gloo on CPU, nccl on GPU: DeepSpeed's accelerator picks)."""
    from alectra.distributed import init_distributed_env

    port_given = "MASTER_PORT" in os.environ
    if init_distributed_env().launcher == "single" and not port_given:
        os.environ["MASTER_PORT"] = str(
            _free_port()
        )  # two single-process runs on one machine must not collide
    deepspeed.init_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collective_on_rank0(fn, *args, **kwargs) -> Any:
    """Run `fn` on rank 0 while the others wait; a failure on rank 0 is raised on every rank."""
    result, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # raised below, after the others learned of it, so no rank hangs
            error = exc
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise RuntimeError(f"rank 0 failed: {box[0]}")
    return result


def dataset_paths(cfg: RunConfig) -> list[str]:
    """`data.paths`, or the demo dataset, built by rank 0 if it is not there yet."""
    if cfg.data.paths:
        return list(cfg.data.paths)
    from data_prep import prepare_demo

    def build() -> None:
        if not (Path(cfg.data.demo_dir) / "manifest.json").is_file():
            log.info("building the demo dataset in %s (once; later runs reuse it)", cfg.data.demo_dir)
        prepare_demo(
            cfg.data.demo_dir, vocab_size=cfg.data.demo_vocab_size, max_documents=cfg.data.demo_max_documents
        )

    _collective_on_rank0(build)
    return [cfg.data.demo_dir]


def _tokenizer_location(cfg: RunConfig, manifest: dict) -> str:
    """data.tokenizer, else the manifest's name_or_path (a relative folder is tried from the dataset too)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    recorded = manifest["tokenizer"]["name_or_path"]
    beside = Path(manifest["_dir"]) / "tokenizer"
    return str(beside) if not Path(recorded).exists() and beside.is_dir() else recorded


def load_and_check_tokenizer(cfg: RunConfig, paths: list[str]) -> tuple[Any, dict]:
    """The tokenizer, checked against every dataset's manifest; returns (tokenizer, first manifest)."""
    from alectra.data import check_tokenizer, load_manifest
    from data_prep.tokenizer import load_tokenizer

    try:
        manifests = [load_manifest(p) for p in paths]
        location = _tokenizer_location(cfg, manifests[0])
        tokenizer = load_tokenizer(location)
        for manifest in manifests:
            check_tokenizer(manifest, tokenizer)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    tokenizer.name_or_path = location
    return tokenizer, manifests[0]


def _hardware(dp_size: int) -> Hardware:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return Hardware(
        accelerator=accel.device_name(), bf16_supported=accel.is_bf16_supported(), dp_size=dp_size
    )


def _device(hardware: Hardware) -> torch.device:
    if hardware.accelerator == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(hardware.accelerator)


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


def pretraining_datasets(cfg: RunConfig, paths: list[str]) -> tuple[Any, Any]:
    """(train, valid) datasets of a run: which samples, in which order, follows from the run config alone."""
    from alectra.data import build_pretraining_datasets

    return build_pretraining_datasets(
        paths,
        cfg.data.weights,
        max_seq_length=cfg.data.max_seq_length,
        seed=cfg.train.seed,
        valid_fraction=cfg.data.valid_fraction,
        num_train_samples=cfg.train.steps * cfg.train.global_batch_size,
    )


def build_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: dict[str, Any]) -> Any:
    """The DeepSpeed engine around `model` (already on its device): optimizer, LR schedule, ZeRO wrapper."""
    optimizer = build_optimizer(model, cfg.train, offload=offloads_optimizer(ds_config))
    return zero.initialize(  # deepspeed.initialize with alectra's ZeRO-1/2 step (alectra/training/zero.py)
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, cfg.train), config=ds_config
    )


def build_trainer(cfg: RunConfig, ds_json_path: str | os.PathLike) -> Trainer:
    """Everything up to the first step; collective (call on every rank)."""
    from alectra.export import export_checkpoint, write_model_metadata
    from alectra.model import ElectraPretrainingModel

    ds_json = load_ds_json(ds_json_path)
    init_distributed()
    rank, dp_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    hardware = _hardware(dp_size)
    ds_config = resolve_ds_config(ds_json, cfg, hardware)
    grad_accum = gradient_accumulation_steps(cfg, dp_size)

    paths = dataset_paths(cfg)
    tokenizer, manifest = load_and_check_tokenizer(cfg, paths)
    special = manifest["tokenizer"]["special_tokens"]
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    train_ds, valid_ds = pretraining_datasets(cfg, paths)

    resume = find_resume(cfg.checkpoint_dir, cfg.checkpoint.resume)
    same_world = resume is None or resume.world_size == dp_size
    if not same_world:
        ds_config["checkpoint"] = {"load_universal": True}
        resume = CheckpointInfo(
            path=universal_checkpoint(resume),
            step=resume.step,
            world_size=resume.world_size,
            zero_stage=resume.zero_stage,
        )

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and every start
    model_config = cfg.model.model_config()
    model = ElectraPretrainingModel(model_config, vocab_size=vocab_size, special_token_ids=special)
    flops_per_token = model.flops_per_token(cfg.data.max_seq_length)
    model.to(_device(hardware))
    engine = build_engine(model, cfg, ds_config)
    state = TrainState() if resume is None else _restore(engine, resume, same_world)

    if rank == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "run_config.yaml")
        write_ds_config(ds_config, out / "ds_config.json")
        tokenizer_dir = tokenizer.name_or_path if Path(tokenizer.name_or_path).is_dir() else None
        write_model_metadata(
            cfg.checkpoint_dir,
            model_config=model_config,
            vocab_size=vocab_size,
            special_token_ids=special,
            tokenizer_dir=tokenizer_dir,
        )
        what = f"resuming from {resume.path} (step {state.step})" if resume else "starting fresh"
        log.info(
            "%s; %d rank(s), grad-accum %d, ZeRO-%d, %s",
            what,
            dp_size,
            grad_accum,
            zero_stage(ds_config),
            precision_of(ds_config),
        )
    reporter = MetricsReporter(
        engine=engine,
        is_rank0=rank == 0,
        total_steps=cfg.train.steps,
        start_step=state.step,
        tokens_per_step=cfg.train.global_batch_size * cfg.data.max_seq_length,
        samples_per_step=cfg.train.global_batch_size,
        flops_per_token=flops_per_token,
        precision=precision_of(ds_config),
        progress_bar=cfg.logging.progress_bar,
    )
    checkpointer = Checkpointer(
        cfg.checkpoint_dir,
        every=cfg.checkpoint.every,
        keep_last=cfg.checkpoint.keep_last,
        zero_stage=zero_stage(ds_config),
    )
    return Trainer(
        cfg=cfg,
        engine=engine,
        train_dataset=train_ds,
        valid_dataset=valid_ds,
        state=state,
        checkpointer=checkpointer,
        reporter=reporter,
        grad_accum=grad_accum,
        export=lambda tag_dir: export_checkpoint(tag_dir, Path(cfg.output_dir) / "export"),
        last_checkpoint=None if resume is None else resume.path,
    )
