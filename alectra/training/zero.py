"""The ONE place that extends DeepSpeed's ZeRO internals: a ZeRO-1/2 gradient path and step with a fixed,
small number of device ops per optimizer step and no host sync (written against DeepSpeed 0.19.8; pinned
there by tests/test_op_budget.py, which fails when a DeepSpeed method this relies on changes).

Why (issue 12; benchmarks/RESULTS.md, "Issue 12 (engine)"): at ELECTRA-Small's size a training step is
bound by kernel launches, and DeepSpeed 0.19.8's `DeepSpeedZeroOptimizer` spends ~6,100 ops per step on the
400 parameter tensors (runtime/zero/stage_1_and_2.py): the bf16 overflow check per gradient
(`has_overflow_partitioned_grads_serial` -> runtime/utils.py `has_inf_or_nan`: amax, amin, 2 x isfinite, ...),
one fp64 norm per gradient (`get_grad_norm_direct`), a copy per gradient into the reduction bucket (ZeRO-2
`reduce_independent_p_g_buckets_and_remove_grads`) or back from it (ZeRO-1 `allreduce_and_copy`); and it reads
the overflow flag on the host (`has_overflow`: `.item()`, `is_invalid_grad_norm`: `bool()`), so every step
waits for the device.

What `FusedZeroOptimizer` does instead (ZeRO-1/2 in bf16 or fp32 without offload; every other configuration
keeps DeepSpeed's own code, see `_fused_path_supported`):

- Gradients are reduced in chunks: runs of parameters that are contiguous in DeepSpeed's flat parameter buffer
  (`bit16_groups_flat`), at most `reduce_bucket_size` elements each. A chunk is reduced with one `cat` of its
  gradients (on one rank straight into the flat fp32 gradient partition), then, on more ranks, one
  all-reduce and one write or `add_` of this rank's slice into the partition; its gradients are freed.
  ZeRO-2 reduces a chunk as soon as its last gradient has arrived (DeepSpeed's per-parameter hooks,
  `process_gradients`), on every micro-batch, so gradients stay partitioned at chunk granularity; ZeRO-1
  reduces at the accumulation boundary. Communication is DeepSpeed's default (an all-reduce of the bucket,
  `use_multi_rank_bucket_allreduce`); gradients are averaged over ranks and accumulated over micro-batches in
  fp32 (DeepSpeed accumulates ZeRO-2 partitions in the model's dtype).
- The step: one global L2 norm over the flat fp32 partitions, computed as `clip_grad_norm_` does (one
  `_foreach_norm` over each parameter's view of them, then the norm of those; one fp32 sum over a whole
  14M-element partition loses ~1e-4 relative on a CPU), squares summed over ranks; clipping as
  `torch.nn.utils.clip_grad_norm_` does it (one `_foreach_mul_`); and the non-finite decision on the device:
  `found_inf` (1.0 when the norm is inf/NaN) is handed to the inner optimizer, which skips the update
  without touching weights or state (torch's fused AdamW follows this GradScaler protocol, and
  alectra.optim.Lamb the same; Adam's step count, and with it the bias correction, counts applied steps
  only). DeepSpeed's rule for when to skip is
  kept: fp32 always; bf16 unless `bf16.check_grad_overflow` is false.
- The host never learns whether a step was skipped, so `overflow` stays False and DeepSpeed's engine steps the
  LR schedule on every optimizer step, skipped ones included: the schedule follows the optimizer step count
  (torch GradScaler's convention; it equals the trainer's `TrainState.step`, so a resumed run continues the
  same schedule). Before, DeepSpeed held the schedule back one step per skipped step.

`Engine` (DeepSpeed's engine) reports what happened when asked, reading the device then (a sync, so only
when asked: the trainer asks after a non-finite loss): `was_step_applied()` and `skipped_steps` (also saved in
and restored from checkpoints, as DeepSpeed does with its host counter).

LAMB (alectra.optim.Lamb) needs one trust ratio per parameter, but ZeRO hands it flat partitions holding
pieces of several parameters: `segment_layouts` maps each partition element to its parameter (from
DeepSpeed's flat-buffer bookkeeping; the same on DeepSpeed's path and on this one); `initialize` installs it.

Not on this path: `safe_get_full_grad` and the other `_hp_mapping` gradient views (they read DeepSpeed's
per-parameter `averaged_gradients`, which this path does not build); and with `overlap_comm` a chunk's
all-reduce runs on the current stream inside the backward hook, not on DeepSpeed's side stream (at the small
presets' size a step is bound by launches, not communication; not measured on several GPUs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import deepspeed
import deepspeed.runtime.engine
import torch
from deepspeed import comm as dist
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.utils import all_gather_dp_groups
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from alectra.optim import Lamb, SegmentLayout

DEEPSPEED_VERSION = "0.19.8"


_ABSENT = object()


def _honours_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` skips the update when `optimizer.found_inf` is 1: torch's GradScaler
    protocol (fused Adam/AdamW declare `_step_supports_amp_scaling`) or alectra's LAMB (the same skip, no
    grad_scale)."""
    return getattr(optimizer, "_step_supports_amp_scaling", False) or isinstance(optimizer, Lamb)


@dataclass(eq=False)
class Chunk:
    """Parameters of group `group` reduced together: [start, end) of the group's flat buffer."""

    group: int
    params: list[torch.nn.Parameter]
    start: int
    end: int
    pending: int = 0
    """Gradients not yet arrived in this backward."""
    reduced: bool = False
    """Reduced in this backward."""
    written: bool = False
    """Written into the fp32 partition in this accumulation window (later micro-batches add to it)."""


class FusedZeroOptimizer(DeepSpeedZeroOptimizer):
    """DeepSpeed's ZeRO-1/2 optimizer with the chunked gradient path and the sync-free step of this module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fused = self._fused_path_supported()
        self.skipped_steps_on_device: torch.Tensor | None = None
        self.skipped_last_step: torch.Tensor | None = None
        if not self.fused:
            return
        device = self.single_partition_of_fp32_groups[0].device
        self.skipped_steps_on_device = torch.zeros((), dtype=torch.float32, device=device)
        self._chunks = [chunk for i in range(len(self.bit16_groups)) for chunk in self._group_chunks(i)]
        self._chunk_of = {id(p): chunk for chunk in self._chunks for p in chunk.params}
        # fp32 (partition_size[i],) per group; the tail past the last parameter (alignment) stays zero
        self._grad_partitions = [
            torch.zeros(int(size), dtype=torch.float32, device=fp32.device)
            for size, fp32 in zip(self.partition_size, self.single_partition_of_fp32_groups, strict=True)
        ]
        # Each parameter's part of them (flat views): norm and clipping run over these, never over the
        # alignment padding, which no backward writes (a NaN clip factor there would stay for good).
        self._param_grads = [view for i in range(len(self.bit16_groups)) for view in self._param_views(i)]
        self._new_backward()

    def _fused_path_supported(self) -> bool:
        """The configurations this module's path covers; anything else runs DeepSpeed's own code."""
        groups = range(len(self.bit16_groups))
        return (
            self.dtype in (torch.bfloat16, torch.float32)
            and self.gradient_accumulation_dtype == self.dtype
            and self.master_weights_and_grads_dtype == torch.float32
            and not (self.cpu_offload or self.zenflow or self.has_moe_layers or self.custom_loss_scaler)
            and not self.dynamic_loss_scale
            and self.loss_scale == 1.0
            and self.compute_grad_norm
            and self.model_parallel_world_size == 1
            and self.sequence_parallel_size == 1
            and self.gradient_average
            and self.postscale_gradients
            and self.gradient_predivide_factor == 1.0
            and self.torch_autocast_gradscaler is None
            and not any(any(self.round_robin_bit16_padding[i]) for i in groups)
            and _honours_found_inf(self.optimizer)
        )

    def _param_views(self, i: int) -> Iterator[torch.Tensor]:
        """Each parameter's part of group i's fp32 gradient partition, as a flat view."""
        first, size = self._partition_range(i)
        params, offsets = self.round_robin_bit16_groups[i], self.round_robin_bit16_offsets[i]
        for param, offset in zip(params, offsets, strict=True):
            lo, hi = max(offset, first), min(offset + param.numel(), first + size)
            if lo < hi:
                yield self._grad_partitions[i].narrow(0, lo - first, hi - lo)

    def _group_chunks(self, i: int) -> Iterator[Chunk]:
        """Runs of consecutive parameters of group i (flat order) of at most reduce_bucket_size elements."""
        params, offsets = self.round_robin_bit16_groups[i], self.round_robin_bit16_offsets[i]
        chunk: Chunk | None = None
        for param, offset in zip(params, offsets, strict=True):
            if chunk is not None and offset + param.numel() - chunk.start > self.reduce_bucket_size:
                yield chunk
                chunk = None
            if chunk is None:
                chunk = Chunk(group=i, params=[], start=offset, end=offset)
            chunk.params.append(param)
            chunk.end = offset + param.numel()
        if chunk is not None:
            yield chunk

    # ---- gradients -------------------------------------------------------------------------------------

    def _new_backward(self) -> None:
        for chunk in self._chunks:
            chunk.pending, chunk.reduced = len(chunk.params), False

    def process_gradients(self, param: torch.nn.Parameter, i: int) -> None:
        """DeepSpeed's per-parameter gradient hook (ZeRO-2; ZeRO-1 with overlap_comm/contiguous_gradients)."""
        if not self.fused:
            return super().process_gradients(param, i)
        if not (self.partition_gradients or self.is_gradient_accumulation_boundary()):
            return None  # ZeRO-1 reduces at the accumulation boundary; until then autograd accumulates
        chunk = self._chunk_of[id(param)]
        if chunk.reduced:  # DeepSpeed asserts the same ("Gradient computed twice for this partition")
            raise RuntimeError(
                f"a gradient of {param.shape} arrived after its chunk was reduced in this backward; "
                f"gradients computed twice in one backward are not supported"
            )
        chunk.pending -= 1
        if chunk.pending == 0:
            self._reduce_chunk(chunk)
        return None

    def reduce_gradients(self, pipeline_parallel: bool = False) -> None:
        """ZeRO-1 at the accumulation boundary (engine.allreduce_gradients)."""
        if not self.fused:
            return super().reduce_gradients(pipeline_parallel)
        return self._reduce_remaining()

    def overlapping_partition_gradients_reduce_epilogue(self) -> None:
        """ZeRO-2 after every backward (engine.allreduce_gradients)."""
        if not self.fused:
            return super().overlapping_partition_gradients_reduce_epilogue()
        return self._reduce_remaining()

    def _reduce_remaining(self) -> None:
        """Reduce the chunks whose hooks did not complete them (no hooks, unused parameters), in flat order
        so that every rank issues the same collectives."""
        for chunk in self._chunks:
            if not chunk.reduced:
                self._reduce_chunk(chunk)
        self._new_backward()

    def _reduce_chunk(self, chunk: Chunk) -> None:
        """Its gradients, summed over ranks and divided by their number, written (first time in this
        accumulation window) or added into this rank's slice of the fp32 partition; the gradients freed."""
        i = chunk.group
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in chunk.params]
        world, first, size = self.partition_count[i], *self._partition_range(i)
        lo, hi = max(chunk.start, first), min(chunk.end, first + size)  # the chunk's part in this partition
        if world == 1 and not chunk.written:  # one pass: the chunk is its own slice of the partition
            torch.cat(grads, out=self._grad_partitions[i].narrow(0, chunk.start, chunk.end - chunk.start))
        else:
            flat = torch.cat(grads)  # (end - start,)
            if world > 1:
                if flat.dtype != self.communication_data_type:
                    flat = flat.to(self.communication_data_type)
                dist.all_reduce(flat, group=self.real_dp_process_group[i])
            if lo < hi:
                target = self._grad_partitions[i].narrow(0, lo - first, hi - lo)
                mine = flat.narrow(0, lo - chunk.start, hi - lo)
                if chunk.written:
                    target.add_(mine, alpha=1.0 / world)
                else:
                    torch.mul(mine, 1.0 / world, out=target)
        for p in chunk.params:
            p.grad = None
        chunk.reduced = chunk.written = True

    def _partition_range(self, i: int) -> tuple[int, int]:
        """(first flat index, size) of this rank's partition of group i."""
        size = int(self.partition_size[i])
        return dist.get_rank(group=self.real_dp_process_group[i]) * size, size

    # ---- the step ----------------------------------------------------------------------------------------

    def _global_norm(self) -> torch.Tensor:
        """fp32 L2 norm of all gradients of all ranks (as torch.nn.utils.clip_grad_norm_ computes it)."""
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self._param_grads)))
        if dist.get_world_size(group=self.dp_process_group) > 1:
            squared = norm.square()
            dist.all_reduce(squared, group=self.dp_process_group)
            norm = squared.sqrt()
        return norm

    def step(self, closure: Any = None) -> None:
        """Norm, clip, device-side non-finite skip, fused optimizer step, bit16 copy and all-gather."""
        if not self.fused:
            return super().step(closure)
        grads = self._grad_partitions
        if not any(chunk.written for chunk in self._chunks):  # a step without a backward: no gradient
            torch._foreach_zero_(grads)
        for chunk in self._chunks:
            chunk.written = False  # the next backward opens a new accumulation window
        norm = self._global_norm()
        if self.clip_grad > 0:  # torch.nn.utils.clip_grad_norm_'s arithmetic
            torch._foreach_mul_(self._param_grads, (self.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        skip_nonfinite = self.dtype != torch.bfloat16 or self.check_grad_overflow  # DeepSpeed's step()
        found_inf = torch.isfinite(norm).logical_not().float() if skip_nonfinite else torch.zeros_like(norm)
        for fp32, grad in zip(self.single_partition_of_fp32_groups, grads, strict=True):
            fp32.grad = grad
        previous = self.optimizer.__dict__.get("found_inf", _ABSENT)
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            if previous is _ABSENT:  # torch's GradScaler deletes it after the step, too
                del self.optimizer.found_inf
            else:  # alectra.optim.Lamb keeps the attribute (None: no skip)
                self.optimizer.found_inf = previous
            for fp32 in self.single_partition_of_fp32_groups:
                fp32.grad = None
        self._lazy_init_hp_params_optimizer_state()  # links optimizer state for universal checkpoints
        for i, fp32 in enumerate(self.single_partition_of_fp32_groups):
            partition_id = dist.get_rank(group=self.real_dp_process_group[i])
            self.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(fp32.data)
        all_gather_dp_groups(
            groups_flat=self.bit16_groups_flat,
            partitioned_param_groups=self.parallel_partitioned_bit16_groups,
            dp_process_group=self.real_dp_process_group,
            start_alignment_factor=self.nccl_start_alignment_factor,
            allgather_bucket_size=self.allgather_bucket_size,
        )
        self._global_grad_norm = norm
        self.skipped_steps_on_device.add_(found_inf)
        self.skipped_last_step = found_inf
        self.overflow = False  # decided on the device; see the module docstring
        return None


class Engine(DeepSpeedEngine):
    """DeepSpeed's engine; a step its ZeRO optimizer skipped on the device is reported when asked."""

    def was_step_applied(self) -> bool:
        """False when the last step() skipped the update; reads the device (a sync) on this path."""
        skipped = getattr(self.optimizer, "skipped_last_step", None)
        return super().was_step_applied() and not (skipped is not None and bool(skipped))

    @property
    def skipped_steps(self) -> int:
        """Skipped optimizer steps: DeepSpeed's host count + the device count (read here: a sync)."""
        counter = getattr(self.__dict__.get("optimizer"), "skipped_steps_on_device", None)
        return self._skipped_steps_host + (0 if counter is None else int(counter))

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:  # DeepSpeed: 0 in __init__, the saved count on load
        self._skipped_steps_host = int(value)
        counter = getattr(self.__dict__.get("optimizer"), "skipped_steps_on_device", None)
        if counter is not None:
            counter.zero_()


@contextlib.contextmanager
def _installed() -> Iterator[None]:
    """deepspeed.initialize builds `Engine` (module global in deepspeed/__init__.py) and the engine's
    `_configure_zero_optimizer` builds `FusedZeroOptimizer` (module global in runtime/engine.py)."""
    saved = deepspeed.DeepSpeedEngine, deepspeed.runtime.engine.DeepSpeedZeroOptimizer
    deepspeed.DeepSpeedEngine = Engine
    deepspeed.runtime.engine.DeepSpeedZeroOptimizer = FusedZeroOptimizer
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine, deepspeed.runtime.engine.DeepSpeedZeroOptimizer = saved


def initialize(*, fused: bool = True, **kwargs: Any) -> DeepSpeedEngine:
    """`deepspeed.initialize(**kwargs)`'s engine, built with this module's classes (`fused=False`: DeepSpeed's
    own, the baseline benchmarks/bench_ops.py --stock measures); a LAMB optimizer gets the layout of ZeRO's
    flat partitions (`segment_layouts`) for its per-parameter trust ratios."""
    if deepspeed.__version__ != DEEPSPEED_VERSION:
        raise RuntimeError(
            f"alectra.training.zero extends DeepSpeed {DEEPSPEED_VERSION}'s internals, found "
            f"{deepspeed.__version__}: pip install deepspeed=={DEEPSPEED_VERSION}"
        )
    with _installed() if fused else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(**kwargs)
    if isinstance(kwargs.get("optimizer"), Lamb):
        kwargs["optimizer"].layouts = segment_layouts(engine.optimizer)
    return engine


# ---- where each parameter lies in the flat fp32 partitions (LAMB) ------------------------------------------


def segment_layouts(zero_optimizer: Any) -> dict[torch.Tensor, SegmentLayout]:
    """{flat fp32 partition: its SegmentLayout} for a DeepSpeed ZeRO stage-1/2 optimizer on this rank.

    Follows `DeepSpeedZeroOptimizer.__init__` (runtime/zero/stage_1_and_2.py): each optimizer parameter group
    `i` becomes one flat buffer `bit16_groups_flat[i]`, the parameters in `round_robin_bit16_groups[i]` order,
    parameter `k` at element `round_robin_bit16_offsets[i][k]` with `round_robin_bit16_meta[i][k].numel()`
    elements, alignment padding between parameters and at the end; rank `r` of `real_dp_process_group[i]` owns
    elements `[r * partition_size[i], (r + 1) * partition_size[i])`, copied to fp32 as
    `single_partition_of_fp32_groups[i]`, the one tensor of group `i` the inner optimizer ever sees (on
    DeepSpeed's path and on `FusedZeroOptimizer`'s). Each element gets its parameter's index within its group
    (the same numbering on every rank), padding an extra index, and the group to all-reduce per-parameter
    sums over, so LAMB computes the per-parameter norms of a partitioned model exactly.
    """
    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        raise ValueError(
            f"LAMB's per-parameter norms need DeepSpeed's ZeRO stage 1 or 2 optimizer, got "
            f"{type(zero_optimizer).__name__}; use ds_configs/zero1.json or zero2.json"
        )
    layouts = {}
    for i, partition in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        group = zero_optimizer.real_dp_process_group[i]
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        size = int(zero_optimizer.partition_size[i])
        if partition.numel() != size or zero_optimizer.bit16_groups_flat[i].numel() != size * world:
            raise RuntimeError(
                f"unexpected ZeRO layout in group {i}: partition {partition.numel()} elements, "
                f"partition_size {size}, flat buffer {zero_optimizer.bit16_groups_flat[i].numel()} "
                f"over {world} ranks"
            )
        ids = _group_segment_ids(
            [meta.numel() for meta in zero_optimizer.round_robin_bit16_meta[i]],
            zero_optimizer.round_robin_bit16_offsets[i],
            total=size * world,
        )
        layouts[partition] = SegmentLayout(
            segment_ids=ids[rank * size : (rank + 1) * size].to(partition.device),
            num_segments=len(zero_optimizer.round_robin_bit16_meta[i]),
            process_group=group if world > 1 else None,
        )
    return layouts


def _group_segment_ids(numels: list[int], offsets: list[int], *, total: int) -> torch.Tensor:
    """(total,) int32: k on parameter k's elements [offsets[k], offsets[k] + numels[k]), len(numels) on
    padding. Built once at start, so a loop over the parameters is fine here."""
    ids = torch.full((total,), len(numels), dtype=torch.int32)
    for k, (numel, offset) in enumerate(zip(numels, offsets, strict=True)):
        if offset + numel > total:
            raise RuntimeError(f"parameter {k} ends at {offset + numel}, past the flat buffer ({total})")
        ids[offset : offset + numel] = k
    return ids
