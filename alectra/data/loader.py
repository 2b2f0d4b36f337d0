"""Megatron-style resumable sampling and the DataLoader the trainer consumes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class MegatronPretrainingSampler:
    """Batches of indices for one data-parallel rank, starting at ``consumed_samples``.

    As Megatron-LM's ``MegatronPretrainingSampler``: global batch k covers samples
    ``consumed + k*mbs*dp ... + mbs*dp``; rank r takes its slice ``[r*mbs, (r+1)*mbs)``. Resuming with the
    ``consumed_samples`` saved in a checkpoint continues exactly where training stopped.
    """

    def __init__(
        self,
        total_samples: int,
        *,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"dataset is empty (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples}: must be in [0, {total_samples}] (dataset size)"
            )
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.dp = micro_batch_size, dp_rank, dp_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total - self.consumed
        global_batch = self.mbs * self.dp
        return remaining // global_batch if self.drop_last else -(-remaining // global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.mbs * self.dp
        lo, hi = self.rank * self.mbs, (self.rank + 1) * self.mbs
        for start in range(self.consumed, self.total, global_batch):
            batch = list(range(start, min(start + global_batch, self.total)))
            if len(batch) == global_batch:
                yield batch[lo:hi]
            elif not self.drop_last and batch[lo:hi]:
                yield batch[lo:hi]


def collate_examples(samples: list[dict[str, np.ndarray]] | dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Int64 tensors ``(B, T)`` from a batch built by ``__getitems__`` (a dict) or from a list of examples."""
    if isinstance(samples, dict):
        return {k: torch.from_numpy(v) for k, v in samples.items()}
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


def build_dataloader(
    dataset: torch.utils.data.Dataset,
    *,
    micro_batch_size: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int,
    drop_last: bool = True,
) -> torch.utils.data.DataLoader:
    """DataLoader of dicts of int64 ``(micro_batch_size, max_seq_length)`` tensors (docs/architecture.md)."""
    sampler = MegatronPretrainingSampler(
        len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        drop_last=drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_examples,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
