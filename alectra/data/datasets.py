"""Map-style datasets of ELECTRA examples: one dataset folder, its train/valid split, weighted blending."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from alectra.data import rules
from alectra.data.examples import ExampleBuilder, LinePairBuilder, load_or_build_plan
from alectra.storage.integrity import open_shards
from alectra.storage.manifest import load_manifest


class ExamplePool:
    """All planned examples of one dataset folder, shuffled once and split into train/valid."""

    def __init__(
        self,
        data_path: str,
        *,
        max_seq_length: int,
        seed: int,
        valid_fraction: float,
        examples: str = "electra",
    ) -> None:
        self.manifest = load_manifest(data_path)
        root = Path(self.manifest["_dir"])
        # sizes and counts every time, checksums and token range once per shard identity (ShardError)
        self.shards = open_shards(self.manifest)
        shard_ids = [s["bin_sha256"] for s in self.manifest["shards"]]
        wrapped = bool(self.manifest.get("special_tokens_in_sequences", False))
        self.plan = load_or_build_plan(
            self.shards,
            shard_ids,
            root / "plans",
            max_seq_length=max_seq_length,
            seed=seed,
            special_tokens_in_sequences=wrapped,
            examples=examples,
        )  # (E, 4); line pairs: (E, 3)
        builder = LinePairBuilder if examples == "line_pairs" else ExampleBuilder
        self.builder = builder(
            self.shards,
            max_seq_length=max_seq_length,
            special_tokens=self.manifest["tokenizer"]["special_tokens"],
            strip_special_tokens=wrapped,
        )
        # (E, 4) or (E, 3), same memory, without np.memmap's per-slice overhead
        self._rows = self.plan.view(np.ndarray)
        n = len(self.plan)
        # Deterministic split: one permutation of all examples from `seed`; the first part is validation.
        order = np.random.default_rng([seed, 0x5EED]).permutation(n)
        n_valid = int(round(n * valid_fraction))
        self.valid_ids, self.train_ids = order[:n_valid], order[n_valid:]
        if len(self.train_ids) == 0:
            raise ValueError(
                f"{data_path}: no training examples (dataset too small for valid_fraction={valid_fraction})"
            )

    def example(self, j: int) -> dict[str, np.ndarray]:
        """Example ``j`` of the plan: int64 arrays ``(L,)``."""
        return {k: v[0] for k, v in self.builder.build_batch(self._rows[j : j + 1]).items()}

    def examples(self, js: np.ndarray) -> dict[str, np.ndarray]:
        """Examples ``js`` of the plan: int64 arrays ``(B, L)``."""
        return self.builder.build_batch(self._rows[js])


class ElectraDataset(torch.utils.data.Dataset):
    """``ds[i]``: example ``ids[perm_e[i % n]]`` where ``e = i // n`` is the epoch (each epoch reshuffled)."""

    def __init__(
        self, pool: ExamplePool, ids: np.ndarray, *, num_samples: int | None, seed: int, shuffle_epochs: bool
    ):
        self.pool, self.ids = pool, ids
        self.num_samples = len(ids) if num_samples is None else int(num_samples)
        self.seed, self.shuffle_epochs = seed, shuffle_epochs
        if len(ids) == 0 and self.num_samples > 0:
            raise ValueError("dataset split is empty; use a larger dataset or another valid_fraction")

    def __len__(self) -> int:
        return self.num_samples

    @lru_cache(maxsize=4)  # noqa: B019 -- a few epochs' permutations per dataset object, on purpose
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0xE90C, epoch]).permutation(len(self.ids))

    def _plan_ids(self, idx: np.ndarray) -> np.ndarray:
        """Plan rows of samples ``idx`` (B,)."""
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"samples {idx.min()}..{idx.max()} out of range [0, {self.num_samples})")
        epoch, r = np.divmod(idx, len(self.ids))
        if self.shuffle_epochs:
            for e in np.unique(epoch[epoch > 0]):
                r[epoch == e] = self._epoch_order(int(e))[r[epoch == e]]
        return self.ids[r]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.pool.example(int(self._plan_ids(np.array([i], dtype=np.int64))[0]))

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        """A whole batch at once (torch's DataLoader calls this with the sampler's indices)."""
        return self.pool.examples(self._plan_ids(np.asarray(indices, dtype=np.int64)))


def blend_indices(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave datasets in proportion to ``weights``: ``(dataset_index (N,), sample_index (N,))``.

    Dataset d's j-th sample sits at position ``(j + 0.5) / w_d`` on a common axis; sorting all positions
    gives an evenly mixed order whose prefix of any length n holds ``w_d * n +- 1`` samples of d
    (the property Megatron's greedy ``build_blending_indices`` has), computed vectorized.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    pos, ds_idx, smp_idx = [], [], []
    for d, wd in enumerate(w):
        if wd <= 0:
            continue
        count = int(np.ceil(wd * num_samples)) + 1
        j = np.arange(count)
        pos.append((j + 0.5) / wd)
        ds_idx.append(np.full(count, d, dtype=np.int64))
        smp_idx.append(j)
    order = np.argsort(np.concatenate(pos), kind="stable")[:num_samples]
    return np.concatenate(ds_idx)[order], np.concatenate(smp_idx)[order].astype(np.int64)


class BlendedDataset(torch.utils.data.Dataset):
    """Several datasets mixed by weight (``blend_indices``)."""

    def __init__(
        self, datasets: list[torch.utils.data.Dataset], dataset_index: np.ndarray, sample_index: np.ndarray
    ):
        self.datasets, self.dataset_index, self.sample_index = datasets, dataset_index, sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        which, local = self.dataset_index[idx], self.sample_index[idx]
        out: dict[str, np.ndarray] = {}
        for d in np.unique(which):
            sel = np.flatnonzero(which == d)
            for k, v in self.datasets[int(d)].__getitems__(local[sel]).items():
                out.setdefault(k, np.empty((len(idx), v.shape[1]), dtype=v.dtype))[sel] = v
        return out


class ConcatExamples(torch.utils.data.ConcatDataset):
    """Validation sets of several datasets, one after the other (no weighting, no repetition)."""


def build_pretraining_datasets(
    data_paths: list[str],
    weights: list[float] | None,
    *,
    max_seq_length: int,
    seed: int,
    valid_fraction: float,
    num_train_samples: int | None,
    examples: str = "electra",
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """``(train_ds, valid_ds)`` over the dataset folders in ``data_paths`` (see docs/architecture.md).

    ``ds[i]`` is a dict of int64 arrays ``(max_seq_length,)``: ``input_ids``, ``attention_mask``,
    ``token_type_ids``; a pure function of ``(seed, i)``. ``num_train_samples`` larger than the data repeats
    it in reshuffled epochs; ``weights`` (one per path) mix several datasets. ``examples``: ``"electra"``
    (google-research/electra's packing) or ``"line_pairs"`` (the seed's recipe; alectra.data.examples).
    """
    if not data_paths:
        raise ValueError("data_paths is empty; pass at least one dataset folder built by data_prep")
    rules.check_weights(weights, len(data_paths))
    rules.check_valid_fraction(valid_fraction)
    if num_train_samples is not None and num_train_samples < 1:
        raise ValueError(f"num_train_samples={num_train_samples}: must be positive or None")
    kw = dict(max_seq_length=max_seq_length, seed=seed, valid_fraction=valid_fraction, examples=examples)
    pools = [ExamplePool(p, **kw) for p in data_paths]
    _check_same_tokenizer(pools, data_paths)
    valid_parts = [
        ElectraDataset(p, p.valid_ids, num_samples=None, seed=seed, shuffle_epochs=False) for p in pools
    ]
    valid_ds = valid_parts[0] if len(pools) == 1 else ConcatExamples(valid_parts)
    if len(pools) == 1:
        train_ds = ElectraDataset(
            pools[0], pools[0].train_ids, num_samples=num_train_samples, seed=seed, shuffle_epochs=True
        )
        return train_ds, valid_ds
    w = np.asarray(weights if weights is not None else [len(p.train_ids) for p in pools], dtype=np.float64)
    total = num_train_samples if num_train_samples is not None else sum(len(p.train_ids) for p in pools)
    dataset_index, sample_index = blend_indices(w, total)
    counts = np.bincount(dataset_index, minlength=len(pools))
    parts = [
        ElectraDataset(p, p.train_ids, num_samples=int(c), seed=seed + 1000003 * d, shuffle_epochs=True)
        for d, (p, c) in enumerate(zip(pools, counts, strict=True))
    ]
    return BlendedDataset(parts, dataset_index, sample_index), valid_ds


def _check_same_tokenizer(pools: list[ExamplePool], paths: list[str]) -> None:
    first = pools[0].manifest["tokenizer"]
    for p, path in zip(pools[1:], paths[1:], strict=True):
        if p.manifest["tokenizer"]["vocab_sha256"] != first["vocab_sha256"]:
            raise ValueError(
                f"{path}: built with another tokenizer than {paths[0]}; blend datasets of one tokenizer"
            )
