"""Masking follows google-research/electra `pretrain_helpers.mask`: exact counts, never special tokens,
85/15 [MASK]/keep split, uniform over candidates, deterministic in the seed."""

import math

import pytest
import torch

from alectra.masking import mask_tokens
from alectra.presets import ModelConfig, get_preset

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 300


def make_batch(batch: int, seq_len: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] tokens [SEP] [PAD]... with random real lengths, a few literal [MASK] and [SEP] inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq_len), generator=g)
    lengths = torch.randint(3, seq_len + 1, (batch,), generator=g)
    positions = torch.arange(seq_len).unsqueeze(0)
    real = positions < lengths.unsqueeze(1)
    ids[torch.rand((batch, seq_len), generator=g) < 0.03] = SPECIALS["mask"]
    ids[:, seq_len // 2] = SPECIALS["sep"]  # a segment boundary inside most sequences
    ids[:, 0] = SPECIALS["cls"]
    ids[torch.arange(batch), lengths - 1] = SPECIALS["sep"]
    ids = ids.masked_fill(~real, SPECIALS["pad"])
    return ids, real.long()


def run_mask(ids, attention_mask, seed=1234, **kwargs):
    """mask_tokens with the model's max_predictions for this length (ModelConfig.max_predictions_for)."""
    kwargs.setdefault("max_predictions", ModelConfig().max_predictions_for(ids.shape[1]))
    return mask_tokens(ids, attention_mask, seed=seed, special_token_ids=SPECIALS, **kwargs)


def test_max_predictions_matches_reference():
    assert get_preset("electra-small").max_predictions_for(128) == 19  # int((0.15 + 0.005) * 128)
    assert get_preset("electra-small").max_predictions_for(512) == 79
    assert get_preset("electra-large").max_predictions_for(512) == 130  # mask_prob 0.25


def test_counts_and_excluded_tokens():
    ids, attention_mask = make_batch(64, 128)
    out = run_mask(ids, attention_mask)
    special = torch.isin(ids, torch.tensor(list(SPECIALS.values())))
    candidates = attention_mask.bool() & ~special
    real_tokens = attention_mask.sum(1).float()
    want = torch.round(real_tokens * 0.15).long().clamp(1, 19)
    want = torch.minimum(want, candidates.sum(1))
    assert torch.equal(out.masked.sum(1), want)
    assert not (out.masked & special).any(), "a [CLS]/[SEP]/[PAD]/[MASK] position was masked"
    assert not (out.masked & ~attention_mask.bool()).any()
    # Outside the masked positions the input is untouched; masked ones are [MASK] or the original.
    assert torch.equal(out.input_ids[~out.masked], ids[~out.masked])
    changed = out.input_ids[out.masked]
    assert ((changed == SPECIALS["mask"]) | (changed == ids[out.masked])).all()


def test_short_sequences_mask_at_least_one_and_never_more_than_candidates():
    ids = torch.tensor([[2, 7, 3, 0, 0], [2, 3, 0, 0, 0], [2, 9, 10, 11, 3]])
    attention_mask = (ids != 0).long()
    out = run_mask(ids, attention_mask)
    assert out.masked.sum(1).tolist() == [1, 0, 1]  # the [CLS][SEP] row has no candidate at all


def test_mask_token_fraction_within_binomial_bounds():
    ids, attention_mask = make_batch(512, 128, seed=3)
    out = run_mask(ids, attention_mask, seed=99)
    n = int(out.masked.sum())
    became_mask = int((out.input_ids[out.masked] == SPECIALS["mask"]).sum())
    # Originals that already were [MASK] are never candidates, so became_mask counts only our [MASK]s.
    sigma = math.sqrt(n * 0.85 * 0.15)
    assert abs(became_mask - 0.85 * n) < 5 * sigma, (became_mask, n)
    out_all = run_mask(ids, attention_mask, seed=99, mask_token_prob=1.0)
    assert (out_all.input_ids[out_all.masked] == SPECIALS["mask"]).all()


def test_positions_uniform_over_candidates():
    # One fixed sequence masked under many seeds: every candidate position equally likely (chi-square).
    ids = torch.tensor([[2] + list(range(10, 40)) + [3]]).repeat(2000, 1)  # 30 candidates, 5 masked each
    attention_mask = torch.ones_like(ids)
    out = run_mask(ids, attention_mask, seed=5)
    counts = out.masked[:, 1:-1].sum(0).double()
    expected = counts.sum() / 30
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70.0, chi2  # 29 dof: P(chi2 > 70) ~ 3e-5
    assert not out.masked[:, [0, -1]].any()


def test_deterministic_in_seed_and_vectorised_rows_differ():
    ids, attention_mask = make_batch(16, 64)
    a, b = run_mask(ids, attention_mask, seed=7), run_mask(ids, attention_mask, seed=7)
    assert torch.equal(a.masked, b.masked) and torch.equal(a.input_ids, b.input_ids)
    c = run_mask(ids, attention_mask, seed=8)
    assert not torch.equal(a.masked, c.masked)
    same_rows = make_batch(1, 64)[0].repeat(8, 1)
    d = run_mask(same_rows, (same_rows != 0).long(), seed=7)
    assert len({tuple(row.tolist()) for row in d.masked}) > 1, "identical rows got identical masks"


def test_missing_special_token_is_a_clear_error():
    ids, attention_mask = make_batch(2, 16)
    with pytest.raises(ValueError, match="lacks \\['mask'\\]"):
        mask_tokens(
            ids, attention_mask, seed=0, special_token_ids={"cls": 2, "sep": 3, "pad": 0}, max_predictions=2
        )
