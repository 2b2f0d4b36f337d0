"""Masking follows google-research/electra `pretrain_helpers.mask` (exact counts, never special tokens, 85/15
[MASK]/keep split, uniform over candidates, deterministic in the seed) or the seed's Bernoulli masking
(plan/recipe_spec.md §5.1), into static slots, from a device seed tensor."""

import math

import pytest
import torch

from alectra.masking import mask_tokens
from alectra.presets import ModelConfig, get_preset
from alectra.seeds import _GOLDEN, _MASK64, _signed, _splitmix64, random_bits

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


# ---- static slots, device seeds ------------------------------------------------------------------------


def test_slots_are_static_distinct_and_carry_the_targets():
    ids, attention_mask = make_batch(32, 64, seed=4)
    n = ModelConfig().max_predictions_for(64)
    out = run_mask(ids, attention_mask)
    assert out.positions.shape == out.valid.shape == out.targets.shape == (32, n)
    assert out.positions.dtype == torch.int64 and out.valid.dtype == torch.bool
    for row in out.positions:  # distinct within a row, invalid slots included
        assert len(set(row.tolist())) == n
    assert torch.equal(out.targets, ids.gather(1, out.positions))
    assert torch.equal(out.masked.sum(1), out.valid.sum(1))
    special = torch.isin(ids, torch.tensor(list(SPECIALS.values())))
    assert not (special.gather(1, out.positions) & out.valid).any()


def test_tensor_seed_equals_int_seed_and_touches_no_torch_rng(monkeypatch):
    ids, attention_mask = make_batch(8, 32)
    by_int = run_mask(ids, attention_mask, seed=2**62 + 5)
    state = torch.random.get_rng_state()

    def no_generator(*args, **kwargs):
        raise AssertionError("masking created a torch.Generator")

    monkeypatch.setattr(torch, "Generator", no_generator)
    by_tensor = run_mask(ids, attention_mask, seed=torch.tensor(2**62 + 5))
    assert torch.equal(torch.random.get_rng_state(), state), "masking drew from torch's global RNG"
    for name in ("input_ids", "positions", "valid", "targets"):
        assert torch.equal(getattr(by_int, name), getattr(by_tensor, name)), name


def test_bad_seed_and_masking_are_clear_errors():
    ids, attention_mask = make_batch(2, 16)
    with pytest.raises(ValueError, match="int64 0-dim tensor"):
        run_mask(ids, attention_mask, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="int64 0-dim tensor"):
        run_mask(ids, attention_mask, seed=torch.tensor(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="int in \\[0, 2\\*\\*63\\)"):
        run_mask(ids, attention_mask, seed=-1)
    with pytest.raises(ValueError, match="masking must be one of"):
        run_mask(ids, attention_mask, masking="random")
    with pytest.raises(ValueError, match="ModelConfig.masking must be one of"):
        ModelConfig(masking="bert")


def test_random_bits_are_splitmix64_outputs():
    """seeds.random_bits on int64 tensors = SplitMix64 on Python ints (output counter + 1 from state seed)."""
    seed = 0x0123456789ABCDEF
    counters = torch.tensor([0, 1, 2, 1000, 2**40 + 7])
    want = [_signed(_splitmix64((seed + c * _GOLDEN) & _MASK64)) for c in counters.tolist()]
    assert random_bits(torch.tensor(seed), counters).tolist() == want
    # Output 1 of SplitMix64 seeded 0 (Vigna's splitmix64.c / Java SplittableRandom): 0xE220A8397B1DCDAF.
    assert _signed(0xE220A8397B1DCDAF) == random_bits(torch.tensor(0), torch.tensor([0])).item()


def uniforms_and_token_draws(seed: int, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented random numbers, from Python ints: per position b, t the SplitMix64 output b * T + t of
    the seed; u = (bits 24-63 as a signed integer + 2^39) / 2^40 (float64, exact) and w = bits 0-23."""
    u = torch.empty(batch, seq_len, dtype=torch.float64)
    w = torch.empty(batch, seq_len, dtype=torch.int64)
    for b in range(batch):
        for t in range(seq_len):
            bits = _signed(_splitmix64((seed + (b * seq_len + t) * _GOLDEN) & _MASK64))
            u[b, t] = ((bits >> 24) + 2**39) / 2**40
            w[b, t] = bits & (2**24 - 1)
    return u, w


def reference_bernoulli(ids, attention_mask, *, seed, mask_prob, mask_token_prob, max_predictions):
    """plan/recipe_spec.md §5.1's pseudo-code, with the documented uniforms in place of torch.rand."""
    u, w = uniforms_and_token_draws(seed, *ids.shape)
    specials = torch.tensor([SPECIALS[k] for k in ("cls", "sep", "pad", "mask")])
    candidates = attention_mask.bool() & ~torch.isin(ids, specials)
    masked = candidates & (u < mask_prob)
    keys = torch.where(masked, u, 2.0)
    keep = keys.topk(max_predictions, largest=False).indices
    masked = torch.zeros_like(masked).scatter_(1, keep, keys.gather(1, keep) < 2.0)
    use_mask_token = masked & (w / 2**24 < mask_token_prob)
    return masked, ids.masked_fill(use_mask_token, SPECIALS["mask"])


@pytest.mark.parametrize(
    ("mask_prob", "mask_token_prob", "max_predictions"),
    [(0.15, 1.0, 40), (0.5, 1.0, 4), (0.3, 0.85, 6)],  # the seed's; truncating often; [MASK] or kept
)
def test_bernoulli_equals_the_specs_reference(mask_prob, mask_token_prob, max_predictions):
    ids, attention_mask = make_batch(24, 48, seed=6)
    seed = 987654321987654321
    out = run_mask(
        ids,
        attention_mask,
        seed=seed,
        masking="bernoulli",
        mask_prob=mask_prob,
        mask_token_prob=mask_token_prob,
        max_predictions=max_predictions,
    )
    masked, generator_input = reference_bernoulli(
        ids,
        attention_mask,
        seed=seed,
        mask_prob=mask_prob,
        mask_token_prob=mask_token_prob,
        max_predictions=max_predictions,
    )
    assert torch.equal(out.masked, masked)
    assert torch.equal(out.input_ids, generator_input)
    if max_predictions == 4:
        assert (masked.sum(1) == 4).sum() >= 12, "the truncating case did not truncate"


def test_electra_equals_a_reference_from_the_description():
    """Exactly num_to_predict candidates, those with the largest u; [MASK] where w / 2^24 < 0.85."""
    ids, attention_mask = make_batch(24, 48, seed=7)
    seed, n = 31337, ModelConfig().max_predictions_for(48)
    out = run_mask(ids, attention_mask, seed=seed)
    u, w = uniforms_and_token_draws(seed, *ids.shape)
    specials = torch.tensor(list(SPECIALS.values()))
    candidates = attention_mask.bool() & ~torch.isin(ids, specials)
    count = torch.round(attention_mask.sum(1).float() * 0.15).long().clamp(1, n)
    count = torch.minimum(count, candidates.sum(1))
    masked = torch.zeros_like(candidates)
    for b in range(len(ids)):
        order = torch.where(candidates[b], u[b], -1.0).argsort(descending=True)
        masked[b, order[: count[b]]] = True
    assert torch.equal(out.masked, masked)
    assert torch.equal(out.input_ids, ids.masked_fill(masked & (w / 2**24 < 0.85), SPECIALS["mask"]))


def test_bernoulli_statistics():
    """Every candidate independently with probability 0.15: per-position rates equal, the per-row count
    Binomial(candidates, 0.15) (chi-square), no minimum of one, never a special token."""
    rows, candidates = 4000, 30
    ids = torch.tensor([[2] + list(range(10, 10 + candidates)) + [3]]).repeat(rows, 1)
    out = run_mask(ids, torch.ones_like(ids), seed=11, masking="bernoulli", max_predictions=candidates)
    assert not out.masked[:, [0, -1]].any()
    per_position = out.masked[:, 1:-1].sum(0).double()  # (30,)
    expected = per_position.sum() / candidates
    chi2 = float(((per_position - expected) ** 2 / expected).sum())
    assert chi2 < 70.0, chi2  # 29 dof: P(chi2 > 70) ~ 3e-5
    rate = float(per_position.sum()) / (rows * candidates)
    assert abs(rate - 0.15) < 5 * math.sqrt(0.15 * 0.85 / (rows * candidates)), rate
    counts = torch.bincount(out.valid.sum(1), minlength=candidates + 1).double()
    pmf = torch.tensor([math.comb(candidates, k) * 0.15**k * 0.85 ** (candidates - k) for k in range(31)])
    bins = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 31)]  # expected >= 20
    observed = torch.tensor([float(counts[a:b].sum()) for a, b in bins])
    want = torch.tensor([float(pmf[a:b].sum()) * rows for a, b in bins])
    chi2 = float(((observed - want) ** 2 / want).sum())
    assert chi2 < 33.0, (chi2, observed, want)  # 9 dof: P(chi2 > 33) ~ 1.3e-4
    assert counts[0] > 0, "Bernoulli masking has no minimum of one: some rows mask nothing"


def test_bernoulli_capacity_truncates_below_one_in_a_million():
    config = ModelConfig(masking="bernoulli")

    def tail(n: int, k: int) -> float:  # P(Binomial(n, 0.15) > k), exact
        return sum(math.comb(n, i) * 0.15**i * 0.85 ** (n - i) for i in range(k + 1, n + 1))

    for seq_len in (32, 64, 128, 512):
        cap = config.max_predictions_for(seq_len)
        assert tail(seq_len - 2, cap) <= 1e-6 < tail(seq_len - 2, cap - 1), seq_len
    assert config.max_predictions_for(128) == 40  # recipe_spec §5.1 (b): P(> 40) = 5e-7 at n = 125
    assert ModelConfig(masking="bernoulli", max_predictions=7).max_predictions_for(128) == 7
    assert get_preset("alectra-small-owt").max_predictions_for(128) == 40
