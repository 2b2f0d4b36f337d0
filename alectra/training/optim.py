"""The run config's optimizer and LR schedule: `train.*` fields in, `alectra.optim` objects out.

No math here: `alectra.optim` holds the optimizers, the no-decay rule and the schedules.
"""

from __future__ import annotations

import torch
from torch import nn

from alectra.config import TrainSection
from alectra.optim import create_optimizer, lr_multiplier, parameter_groups


def build_optimizer(model: nn.Module, train: TrainSection, *, offload: bool) -> torch.optim.Optimizer:
    """`train.optimizer` over the model's decay / no-decay groups (see alectra.optim.create_optimizer);
    DeepSpeedCPUAdam over the same groups when ZeRO offloads the optimizer to the CPU."""
    betas = (train.adam_beta1, train.adam_beta2)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        groups = parameter_groups(model, train.weight_decay)
        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=betas, eps=train.adam_eps, adamw_mode=True)
    return create_optimizer(
        model,
        name=train.optimizer,
        lr=train.lr,
        betas=betas,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSection
) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.lr_schedule` as a LambdaLR that DeepSpeed steps (only on applied steps) and checkpoints."""
    multiplier = lr_multiplier(train.lr_schedule, total_steps=train.steps, warmup_steps=train.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
