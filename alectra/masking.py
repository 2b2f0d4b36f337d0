"""Dynamic masking the way google-research/electra does it (`pretrain_helpers.mask`), vectorised.

Per sequence the reference masks num_to_predict = max(1, min(max_predictions, round(mask_prob * real tokens)))
positions drawn uniformly among the candidates (real tokens except [CLS], [SEP], [PAD], [MASK]); of those,
`mask_token_prob` (0.85) become [MASK] and the rest keep their original token (ELECTRA has no random-token
replacement: the generator does the replacing). The reference draws positions with replacement
(`tf.random.categorical`) and so sometimes masks fewer; we draw without replacement (random keys + top-k), so
the count is exact, capped only by the number of candidates.

Everything is a pure function of an int seed: the model's `derive_seed(seed, Stream.MASKING)` (alectra.seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alectra.storage.manifest import MODEL_SPECIAL_TOKENS


@dataclass(kw_only=True)
class MaskedBatch:
    """Result of `mask_tokens`; B = batch, T = sequence length."""

    input_ids: torch.Tensor
    """(B, T) int64: the generator's input, [MASK] at `mask_token_prob` of the masked positions."""
    masked: torch.Tensor
    """(B, T) bool: positions the generator must predict."""


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    seed: int,
    special_token_ids: dict[str, int],
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.85,
    max_predictions: int,
) -> MaskedBatch:
    """Choose and apply the masked positions of a batch; deterministic in `seed`, on the input's device.

    input_ids, attention_mask: (B, T). special_token_ids needs MODEL_SPECIAL_TOKENS ("cls", "sep", "pad",
    "mask"). max_predictions: `ModelConfig.max_predictions_for(T)`.
    """
    missing = set(MODEL_SPECIAL_TOKENS) - set(special_token_ids)
    if missing:
        raise ValueError(f"special_token_ids lacks {sorted(missing)}; pass the tokenizer's ids for them")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (batch, seq_len)"
        )
    B, T = input_ids.shape
    max_predictions = min(max_predictions, T)
    device = input_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)

    real = attention_mask.bool()  # (B, T)
    special = torch.tensor(
        [special_token_ids[k] for k in MODEL_SPECIAL_TOKENS], device=device, dtype=input_ids.dtype
    )
    candidates = real & ~torch.isin(input_ids, special)  # (B, T)

    # Reference: num_to_predict = max(1, min(N, round(num_tokens * mask_prob))), num_tokens counting
    # [CLS]/[SEP]. torch.round is round-half-even like tf.round.
    num_tokens = real.sum(dim=1).to(torch.float32)  # (B,)
    num_to_predict = torch.round(num_tokens * mask_prob).to(torch.int64).clamp(1, max_predictions)
    num_to_predict = torch.minimum(num_to_predict, candidates.sum(dim=1))  # (B,)

    # Uniform sampling without replacement: random keys, non-candidates pushed below every candidate,
    # the k largest per row win (equivalent to Gumbel top-k over a uniform distribution on candidates).
    keys = torch.rand((B, T), generator=generator, device=device)
    keys = keys.masked_fill(~candidates, -1.0)
    top = keys.topk(max_predictions, dim=1).indices  # (B, N)
    take = torch.arange(max_predictions, device=device).unsqueeze(0) < num_to_predict.unsqueeze(1)  # (B, N)
    masked = torch.zeros((B, T), dtype=torch.bool, device=device)
    masked.scatter_(1, top, take)

    use_mask_token = torch.rand((B, T), generator=generator, device=device) < mask_token_prob
    generator_input = input_ids.masked_fill(masked & use_mask_token, special_token_ids["mask"])
    return MaskedBatch(input_ids=generator_input, masked=masked)
