"""Dynamic masking into a static number of slots per sequence, sync-free, from a seed tensor on the device.

Two rules (`ModelConfig.masking`); both choose among the same candidates, the real tokens other than [CLS],
[SEP], [PAD] and [MASK]:

- "electra", google-research/electra `pretrain_helpers.mask`: per sequence exactly
  num_to_predict = max(1, min(N, round(mask_prob * real tokens))) positions drawn uniformly among the
  candidates (capped by their number). The reference draws with replacement (`tf.random.categorical`) and so
  sometimes masks fewer; we draw without replacement (random keys + top-k), so the count is exact.
- "bernoulli", the seed's (shoarora/lmtuners `utils/masked_lm.py:4-31`, plan/recipe_spec.md §5.1): every
  candidate independently with probability mask_prob, no minimum of one. At most N are kept: when more are
  drawn, the N with the smallest uniforms (a uniformly random subset of them) stay masked and the rest keep
  their token and are not predicted. `ModelConfig.max_predictions_for` picks N so that this happens to fewer
  than one sequence in a million (docs/model.md).

Of the masked positions, `mask_token_prob` become [MASK] (0.85 in ELECTRA, 1 in the seed's recipe) and the
rest keep their original token (no random-token replacement: the generator does the replacing).

Static slots (issue 12): every sequence gets exactly N slots, `positions` (B, N) with a `valid` flag, so the
generator always sees B x N rows and no step reads a count back to the host (no `nonzero`, no boolean index,
no `.item()`): invalid slots (a sequence with fewer candidates, or fewer masked) are carried along and
weighted 0.

Random numbers: `alectra.seeds.random_bits(seed, b * T + t)`, 64 SplitMix64 bits per position computed by
torch ops on the seed's device (counter based, so a captured graph replays with whatever value the seed
tensor holds, and neither torch's global RNG nor a torch.Generator is touched). Bits 24-63, as a signed
40-bit integer, order the positions (a uniformly random order, the same as uniforms u = (key + 2^39) / 2^40);
bits 0-23 decide [MASK] or kept. The seed is the model's `derive_seed(seed, Stream.MASKING)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alectra.seeds import random_bits
from alectra.storage.manifest import MODEL_SPECIAL_TOKENS

MASKING_CHOICES = ("electra", "bernoulli")
KEY_BITS = 40
"""Bits 24-63 of a position's random bits: its sort key, a signed integer in [-2^39, 2^39)."""
TOKEN_BITS = 24
"""Bits 0-23: the [MASK]-or-kept draw, an integer in [0, 2^24)."""
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(kw_only=True)
class MaskedBatch:
    """Result of `mask_tokens`; B = batch, T = sequence length, N = slots per sequence."""

    input_ids: torch.Tensor
    """(B, T) int64: the generator's input, [MASK] at `mask_token_prob` of the masked positions."""
    positions: torch.Tensor
    """(B, N) int64: the slots' positions in their sequence, distinct within a row (invalid slots too)."""
    valid: torch.Tensor
    """(B, N) bool: True where the slot is a masked position the generator must predict."""
    targets: torch.Tensor
    """(B, N) int64: the original token at each slot (`input_ids` before masking, gathered at `positions`)."""

    @property
    def masked(self) -> torch.Tensor:
        """(B, T) bool: the masked positions (for tests and inspection; the model uses the slots)."""
        return torch.zeros_like(self.input_ids, dtype=torch.bool).scatter_(1, self.positions, self.valid)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    seed: int | torch.Tensor,
    special_token_ids: dict[str, int],
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.85,
    max_predictions: int,
    masking: str = "electra",
) -> MaskedBatch:
    """Choose and apply the masked positions of a batch; deterministic in `seed`, on the input's device.

    input_ids, attention_mask: (B, T). seed: int64 0-dim tensor on the input's device (an int in [0, 2^63)
    is copied there). special_token_ids needs MODEL_SPECIAL_TOKENS ("cls", "sep", "pad", "mask").
    max_predictions: N, `ModelConfig.max_predictions_for(T)` (at most T slots are used). masking: "electra"
    or "bernoulli" (module docstring). Only shapes, dtypes and devices are checked: nothing reads tensor data.
    """
    missing = set(MODEL_SPECIAL_TOKENS) - set(special_token_ids)
    if missing:
        raise ValueError(f"special_token_ids lacks {sorted(missing)}; pass the tokenizer's ids for them")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (batch, seq_len)"
        )
    if masking not in MASKING_CHOICES:
        raise ValueError(f"masking must be one of {MASKING_CHOICES}, got {masking!r}")
    B, T = input_ids.shape
    N = min(max_predictions, T)
    device = input_ids.device
    seed = seed_tensor(seed, device)

    real = attention_mask.bool()  # (B, T)
    candidates = real
    for token_id in sorted({special_token_ids[k] for k in MODEL_SPECIAL_TOKENS}):
        candidates = candidates & (input_ids != token_id)  # (B, T); scalar compares: no host -> device copy

    bits = random_bits(seed, torch.arange(B * T, device=device).view(B, T))  # (B, T) int64
    key = bits >> (64 - KEY_BITS)  # (B, T) signed 40-bit (arithmetic shift): a uniformly random order
    if masking == "electra":
        positions, valid = _exact_count(key, candidates, attention_mask, mask_prob, N)
    else:
        positions, valid = _bernoulli(key, candidates, mask_prob, N)

    token_draw = (bits & ((1 << TOKEN_BITS) - 1)).gather(1, positions)  # (B, N) in [0, 2^24)
    use_mask_token = valid & (token_draw < math.ceil(mask_token_prob * 2**TOKEN_BITS))  # (B, N)
    targets = input_ids.gather(1, positions)  # (B, N)
    replacement = torch.where(use_mask_token, special_token_ids["mask"], targets)  # (B, N)
    generator_input = input_ids.scatter(1, positions, replacement)  # (B, T)
    return MaskedBatch(input_ids=generator_input, positions=positions, valid=valid, targets=targets)


def _exact_count(
    key: torch.Tensor, candidates: torch.Tensor, attention_mask: torch.Tensor, mask_prob: float, N: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELECTRA: the num_to_predict candidates with the largest keys (uniform without replacement)."""
    # Reference: num_to_predict = max(1, min(N, round(num_tokens * mask_prob))), num_tokens counting
    # [CLS]/[SEP]. torch.round is round-half-even like tf.round.
    num_tokens = attention_mask.sum(dim=1, dtype=torch.float32)  # (B,)
    num_to_predict = torch.round(num_tokens * mask_prob).to(torch.int64).clamp_(1, N)  # (B,)
    num_to_predict = torch.minimum(num_to_predict, candidates.sum(dim=1))  # (B,)
    # Non-candidates sort below every candidate, so the first num_to_predict slots are candidates.
    positions = torch.where(candidates, key, _INT64_MIN).topk(N, dim=1).indices  # (B, N), keys descending
    valid = torch.arange(N, device=key.device) < num_to_predict.unsqueeze(1)  # (B, N)
    return positions, valid


def _bernoulli(
    key: torch.Tensor, candidates: torch.Tensor, mask_prob: float, N: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's: each candidate masked iff its uniform u = (key + 2^39) / 2^40 < mask_prob; of more than N
    masked, the N smallest u stay masked."""
    # u < p  <=>  key + 2^39 < p * 2^40  <=>  key < ceil(p * 2^40) - 2^39 (p * 2^40 is exact in float64).
    threshold = math.ceil(mask_prob * 2**KEY_BITS) - 2 ** (KEY_BITS - 1)
    selected = candidates & (key < threshold)  # (B, T)
    positions = torch.where(selected, key, _INT64_MAX).topk(N, dim=1, largest=False, sorted=False).indices
    return positions, selected.gather(1, positions)  # (B, N), (B, N)


def seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`seed` as an int64 0-dim tensor on `device`: a tensor is checked (metadata only) and used as it is; an
    int in [0, 2^63) is copied over (a host -> device copy: for tests and callers that hold ints)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0 or seed.device != torch.device(device):
            raise ValueError(
                f"seed must be an int64 0-dim tensor on {device}, got {seed.dtype} {tuple(seed.shape)} on "
                f"{seed.device}"
            )
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int64 0-dim tensor or an int in [0, 2**63), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64, device=device)
