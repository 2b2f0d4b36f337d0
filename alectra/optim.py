"""Optimizers and learning-rate schedules of pretraining and fine-tuning: one home, plain arguments only.

- `uses_weight_decay` / `parameter_groups`: the one no-decay rule, google-research/electra's
  (`model/optimization.py`, `exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`, tested with
  `re.search` on the variable name). Hugging Face parameter names carry the same words as the TF variable
  names (`...LayerNorm.weight`, ALBERT's `...full_layer_layer_norm.weight`, `....bias`), so the reference's
  rule on our names is a case-sensitive substring test. (The seed, lmtuners, used ["bias",
  "LayerNorm.weight"], which also decays ALBERT's `full_layer_layer_norm.weight`; the GLUE code used to test
  `endswith("bias")`: the same groups on every model here, but one rule now.)
- Schedules, pure functions of the step returning the multiplier of the peak learning rate: ELECTRA's linear
  decay *times* linear warmup (`electra_multiplier`) and Hugging Face's linear warmup *then* linear decay
  (`linear_multiplier`, `get_linear_schedule_with_warmup`, the seed's).
- `Lamb`: cybertronai/pytorch-lamb as the seed ran it (no bias correction, weight norm clamped at 10, one
  trust ratio per parameter tensor), also on ZeRO's flat fp32 partitions (`SegmentLayout`), honouring the
  device-side skip flag `found_inf`, with no host synchronisation.
- `AdamWeightDecay`: ELECTRA's fine-tuning optimizer (Adam without bias correction, decoupled decay).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# google-research/electra model/optimization.py: exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]
NO_DECAY_PATTERNS = ("LayerNorm", "layer_norm", "bias")
OPTIMIZERS = ("adamw", "lamb")
SCHEDULES = ("electra", "linear")


def uses_weight_decay(name: str) -> bool:
    """Whether the parameter called `name` is decayed (reference `_do_use_weight_decay`)."""
    return not any(pattern in name for pattern in NO_DECAY_PATTERNS)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights and the LayerNorm/bias parameters without decay (tied weights once)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # named_parameters() yields a tied tensor once
        if param.requires_grad:
            (decay if uses_weight_decay(name) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ---- learning-rate schedules ---------------------------------------------------------------------------


def electra_multiplier(step: int, *, total_steps: int, warmup_steps: float) -> float:
    """google-research/electra `create_optimizer`: linear decay to 0 at `total_steps`, times
    min(1, step / warmup_steps). The warmup multiplies the decay, so the peak is 1 - warmup / total."""
    decay = 1.0 - min(step, total_steps) / total_steps
    return decay * (min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0)


def linear_multiplier(step: int, *, total_steps: int, warmup_steps: float) -> float:
    """transformers `get_linear_schedule_with_warmup` (the seed's): step / warmup during warmup, then a
    linear decay from 1 to 0 over the remaining steps."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def lr_multiplier(schedule: str, *, total_steps: int, warmup_steps: float) -> Callable[[int], float]:
    """The named schedule as `multiplier(step)` (a partial of the pure function, picklable for LambdaLR)."""
    functions = {"electra": electra_multiplier, "linear": linear_multiplier}
    if schedule not in functions:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return functools.partial(functions[schedule], total_steps=total_steps, warmup_steps=warmup_steps)


# ---- LAMB ------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SegmentLayout:
    """How one flat tensor handed to the optimizer splits into the model's parameters.

    ZeRO-1/2 give the optimizer one flat fp32 partition per parameter group: pieces of several parameters
    (the first and last possibly cut by the partition boundaries) and alignment padding. LAMB's trust ratio
    needs each *parameter's* norms, so every element carries the index of its parameter and the per-parameter
    sums of squares are added over the data-parallel ranks that hold the other pieces.
    """

    segment_ids: torch.Tensor
    """(numel,) int32 (or int64) on the tensor's device: parameter index of each element, `num_segments` for
    padding. int32 halves the index's memory (it is as long as the partition)."""
    num_segments: int
    """Parameters in the whole (unpartitioned) group; ids run over all of them, so ranks agree on them."""
    process_group: Any = None
    """Group over which the per-segment sums are all-reduced (the data-parallel group); None: local only."""

    def __post_init__(self) -> None:
        if self.segment_ids.dim() != 1 or self.segment_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("SegmentLayout.segment_ids must be a 1-D int32 or int64 tensor")


class Lamb(torch.optim.Optimizer):
    """LAMB exactly as cybertronai/pytorch-lamb `Lamb.step` computes it (the seed's optimizer):

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2            (no bias correction)
        u = m / (sqrt(v) + eps) + wd p
        w = min(||p||, 10);  r = ||u||;  trust = w / r, or 1 if w == 0 or r == 0
        p = p - lr trust u

    with one trust ratio per parameter tensor. A tensor registered in `layouts` (ZeRO's flat partitions, see
    alectra.training.zero.segment_layouts) is updated with per-segment norms in a fixed number of tensor
    operations (index_add + one all-reduce), whatever the number of parameters in it; any other tensor is one
    segment.
    On CUDA, index_add_ accumulates with atomics, so the per-parameter sums of squares are reproducible only
    up to their summation order (about 1e-7 relative) unless torch.use_deterministic_algorithms(True).

    Skip protocol (as torch's fused AdamW under GradScaler): if `self.found_inf` is set, a 0-dim fp32 tensor
    on the parameters' device, a value > 0 leaves every parameter and state tensor as it was. Nothing in
    `step` reads a tensor back to the host.
    """

    def __init__(
        self,
        params: Iterable,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_weight_norm: float = 10.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: bad lr={lr}, eps={eps}, weight_decay={weight_decay} or betas={betas}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_weight_norm=max_weight_norm
        )
        super().__init__(params, defaults)
        self.found_inf: torch.Tensor | None = None
        self.layouts: dict[torch.Tensor, SegmentLayout] = {}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 - torch.optim.Optimizer API
        if closure is not None:
            raise ValueError("Lamb.step takes no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32:
                    raise TypeError(
                        f"Lamb updates fp32 (master) weights, got {p.dtype}; under bf16/fp16 DeepSpeed's "
                        "ZeRO optimizer hands it fp32 partitions"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self._update(p, p.grad, state, group, self.layouts.get(p))

    def _skip_flag(self, device: torch.device) -> torch.Tensor:
        """0-dim bool on `device`: True = leave everything untouched this step."""
        if self.found_inf is None:
            return torch.zeros((), dtype=torch.bool, device=device)
        return self.found_inf.to(device=device, non_blocking=True) > 0

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, layout: SegmentLayout | None
    ) -> None:
        beta1, beta2 = group["betas"]
        skip = self._skip_flag(p.device)  # () bool
        keep = (~skip).to(torch.float32)  # () 1.0 = apply, 0.0 = skip
        # With skip, g = 0 and the decays are 1: m, v unchanged exactly (x * 1 + 0 == x), however
        # non-finite the incoming gradient is.
        g = torch.where(skip, 0.0, grad)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(torch.where(skip, 1.0, beta1)).add_(g, alpha=1 - beta1)
        v.mul_(torch.where(skip, 1.0, beta2)).addcmul_(g, g, value=1 - beta2)
        update = m / v.sqrt().add_(group["eps"])  # lamb.py: exp_avg / exp_avg_sq.sqrt().add(eps)
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        if layout is None:  # the whole tensor is one parameter
            squares = torch.stack([p.pow(2).sum(), update.pow(2).sum()]).unsqueeze(1)  # (2, 1)
        else:
            squares = _segment_squares(p, update, layout)  # (2, S + 1)
        weight_norm = squares[0].sqrt().clamp(0, group["max_weight_norm"])
        update_norm = squares[1].sqrt()
        trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
        # lamb.py: p.add_(adam_step, alpha=-lr * trust); the step factor is formed first, as there.
        factor = trust * -group["lr"] * keep  # (S + 1,) or (1,)
        p.addcmul_(update, factor if layout is None else factor.index_select(0, layout.segment_ids))
        state["step"].add_(keep)


def _segment_squares(p: torch.Tensor, update: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """(2, S + 1) per-parameter sums of p^2 and update^2 over all ranks (row S collects the padding)."""
    if layout.segment_ids.numel() != p.numel():
        raise ValueError(f"Lamb layout has {layout.segment_ids.numel()} ids for a tensor of {p.numel()}")
    squares = torch.zeros((2, layout.num_segments + 1), dtype=torch.float32, device=p.device)
    squares[0].index_add_(0, layout.segment_ids, p.pow(2))
    squares[1].index_add_(0, layout.segment_ids, update.pow(2))
    if layout.process_group is not None:
        torch.distributed.all_reduce(squares, group=layout.process_group)
    return squares


# ---- ELECTRA's fine-tuning optimizer -----------------------------------------------------------------------


class AdamWeightDecay(torch.optim.Optimizer):
    """ELECTRA's AdamWeightDecayOptimizer: Adam *without* bias correction, plus decoupled weight decay.

    update = m / (sqrt(v) + eps) + wd * param; param -= lr * update (`model/optimization.py`).
    """

    def __init__(self, params: list[dict], *, lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 - torch.optim.Optimizer API
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(param), torch.zeros_like(param)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(param, alpha=group["weight_decay"])
                param.add_(update, alpha=-group["lr"])


# ---- the pretraining optimizer ---------------------------------------------------------------------------


def create_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """The pretraining optimizer over `parameter_groups(model, weight_decay)`: "adamw" (torch's fused kernel)
    or "lamb". (With ZeRO-Offload, alectra.training.optim swaps in DeepSpeedCPUAdam over the same groups.)"""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    groups = parameter_groups(model, weight_decay)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    # Fused on CPU too (torch >= 2.4): one pass over memory per step instead of one per Adam operation. ZeRO
    # hands the optimizer one flat fp32 buffer per group (45 MB for electra-small), which the unfused loop
    # streams ~6 times: 62 ms vs 14 ms fused per step on this project's CPU (benchmarks/RESULTS.md, engine).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
