"""Where each model parameter lies in the flat fp32 partitions DeepSpeed ZeRO-1/2 give the optimizer.

DeepSpeed-internals code (to be folded into alectra/training/zero.py, the one place that reads ZeRO's
private state). It follows `DeepSpeedZeroOptimizer.__init__` of deepspeed/runtime/zero/stage_1_and_2.py:

- each optimizer parameter group `i` becomes one flat buffer `bit16_groups_flat[i]`: the parameters in
  `round_robin_bit16_groups[i]` order, parameter `k` at element `round_robin_bit16_offsets[i][k]` with
  `round_robin_bit16_meta[i][k].numel()` elements, alignment padding between parameters and at the end (the
  buffer is a multiple of 2 x data-parallel size);
- rank `r` of the data-parallel group `real_dp_process_group[i]` owns elements
  `[r * partition_size[i], (r + 1) * partition_size[i])`, copied to fp32 as
  `single_partition_of_fp32_groups[i]`, the one tensor of group `i` the inner optimizer ever sees
  (`param_group['params'] = [single_partition_of_fp32_groups[i]]`).

`segment_layouts` turns that into one `alectra.optim.SegmentLayout` per partition: each element's parameter
index within its group (the same numbering on every rank), padding mapped to an extra index, and the group
to all-reduce per-parameter sums over. LAMB then computes per-parameter norms of a partitioned model exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed

from alectra.optim import SegmentLayout


def segment_layouts(zero_optimizer: Any) -> dict[torch.Tensor, SegmentLayout]:
    """{flat fp32 partition: its SegmentLayout} for a DeepSpeed ZeRO stage-1/2 optimizer on this rank."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer):
        raise ValueError(
            f"LAMB's per-parameter norms need DeepSpeed's ZeRO stage 1 or 2 optimizer, got "
            f"{type(zero_optimizer).__name__}; use ds_configs/zero1.json or zero2.json"
        )
    layouts = {}
    for i, partition in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        group = zero_optimizer.real_dp_process_group[i]
        rank = torch.distributed.get_rank(group=group)
        world = torch.distributed.get_world_size(group=group)
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
