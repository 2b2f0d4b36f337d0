"""ElectraPretrainingModel: real tying, unique parameters, architecture pairs, masked-only projection,
initial losses, metrics, presets."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AlbertConfig, BertConfig, ElectraConfig

from alectra.masking import mask_tokens
from alectra.model import ElectraPretrainingModel, finalize_metrics
from alectra.presets import ModelConfig, get_preset
from alectra.seeds import Stream, derive_seed

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 1000


def make_batch(batch=4, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, seq_len), generator=g)
    ids[:, 0] = SPECIALS["cls"]
    ids[:, -1] = SPECIALS["sep"]
    attention_mask = torch.ones_like(ids)
    ids[1, 20:] = SPECIALS["pad"]
    ids[1, 19] = SPECIALS["sep"]
    attention_mask[1, 20:] = 0
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, seq_len // 2 :] = 1
    return ids, attention_mask * 1, token_type_ids * attention_mask


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny"), **{"kernels": "torch", **overrides})


def build(config=None, *, vocab_size=VOCAB, **kwargs) -> ElectraPretrainingModel:
    torch.manual_seed(0)
    return ElectraPretrainingModel(
        config or tiny(), vocab_size=vocab_size, special_token_ids=SPECIALS, **kwargs
    )


def test_embeddings_are_one_module_and_parameters_unique():
    model = build(tiny(generator_hidden_size=48))  # != embedding_size 32: the generator gets a projection
    gen_base, disc_base = model.generator.base_model, model.discriminator.base_model
    assert gen_base.embeddings is disc_base.embeddings
    shared = disc_base.embeddings
    assert model.generator.get_output_embeddings().weight is shared.word_embeddings.weight
    # Each network keeps its own embedding -> hidden projection.
    assert gen_base.embeddings_project is not disc_base.embeddings_project
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    names = [n for n, _ in model.named_parameters()]
    assert sum("word_embeddings" in n for n in names) == 1
    assert sum("position_embeddings" in n for n in names) == 1
    assert sum("embeddings.LayerNorm.weight" in n for n in names) == 1


def train_steps(model, optimizer, steps: int) -> None:
    """`steps` optimizer steps on the fixed test batch, one seed per step."""
    ids, attention_mask, token_type_ids = make_batch()
    for step in range(steps):
        out = model(ids, attention_mask, token_type_ids, seed=step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


def test_tying_holds_after_adamw_steps():
    model = build()
    shared = model.shared_embeddings
    before = shared.word_embeddings.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    train_steps(model, optimizer, 3)
    word = shared.word_embeddings.weight
    assert not torch.equal(word.detach(), before), "the shared embeddings did not train"
    gen_base, disc_base = model.generator.base_model, model.discriminator.base_model
    for attr in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        assert torch.equal(
            getattr(gen_base.embeddings, attr).weight, getattr(disc_base.embeddings, attr).weight
        )
    assert torch.equal(model.generator.get_output_embeddings().weight, word)
    # The generator's output bias is its own parameter and trained too.
    assert model.generator.get_output_embeddings().bias.abs().sum() > 0


def test_untied_generator_embeddings_train_separately():
    """The reference's `untied_generator_embeddings`: two embedding sets, each network trains its own, and
    the generator's output layer stays tied to the generator's word embeddings."""
    model = build(tiny(embedding_tying="untied"))
    gen_emb, disc_emb = model.generator.base_model.embeddings, model.discriminator.base_model.embeddings
    assert gen_emb is not disc_emb
    assert model.generator.get_output_embeddings().weight is gen_emb.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum("word_embeddings" in n for n in names) == 2
    before = {k: e.word_embeddings.weight.detach().clone() for k, e in (("gen", gen_emb), ("disc", disc_emb))}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 2)
    for key, emb in (("gen", gen_emb), ("disc", disc_emb)):
        assert not torch.equal(emb.word_embeddings.weight.detach(), before[key]), f"{key} embeddings idle"
    assert not torch.equal(gen_emb.word_embeddings.weight, disc_emb.word_embeddings.weight)
    assert torch.equal(model.generator.get_output_embeddings().weight, gen_emb.word_embeddings.weight)


def test_word_embeddings_get_gradient_from_both_networks():
    grads = {}
    for disc_weight in (0.0, 50.0):  # same init (build seeds torch), same batch and seed
        model = build(tiny(disc_weight=disc_weight)).eval()
        model(*make_batch(), seed=1).loss.backward()
        grads[disc_weight] = model.shared_embeddings.word_embeddings.weight.grad
    assert grads[0.0].abs().sum() > 0, "the generator adds nothing to the shared embeddings"
    assert not torch.allclose(grads[50.0], grads[0.0]), "the discriminator adds nothing to them"


def test_masked_only_projection_equals_full_projection():
    model = build().eval()  # no dropout: both paths see the same network
    ids, attention_mask, token_type_ids = make_batch()
    seed = 11
    out = model(ids, attention_mask, token_type_ids, seed=seed)
    masked = mask_tokens(
        ids,
        attention_mask,
        seed=derive_seed(seed, Stream.MASKING),
        special_token_ids=SPECIALS,
        max_predictions=model.config.max_predictions_for(ids.shape[1]),
    )
    with torch.no_grad():
        full = model.generator(masked.input_ids, attention_mask, token_type_ids).logits  # (B, T, V)
    want = F.cross_entropy(full[masked.masked], ids[masked.masked])
    torch.testing.assert_close(out.gen_loss, want, atol=1e-5, rtol=1e-5)
    assert out.metrics["gen_total"] == masked.masked.sum()
    assert out.metrics["gen_correct"] == (full[masked.masked].argmax(-1) == ids[masked.masked]).sum()


def test_initial_losses_match_theory_and_metrics_add_up():
    model = build(tiny(kernels="auto")).eval()  # on CPU: RTD reference + torch-RNG sampler
    ids, attention_mask, token_type_ids = make_batch(batch=8, seq_len=64)
    out = model(ids, attention_mask, token_type_ids, seed=3)
    assert abs(out.gen_loss.item() - math.log(VOCAB)) < 0.05 * math.log(VOCAB)
    assert abs(out.disc_loss.item() - math.log(2)) < 0.05
    torch.testing.assert_close(out.loss, out.gen_loss + 50.0 * out.disc_loss)
    assert out.loss.dtype == torch.float32 and out.loss.requires_grad and not out.gen_loss.requires_grad
    m = out.metrics
    assert m["disc_total"] == attention_mask.sum()
    assert m["replaced_total"] == m["replaced_tp"] + m["replaced_fn"] <= m["gen_total"]
    final = finalize_metrics({k: v.item() for k, v in m.items()})
    assert 0.0 <= final["replaced_fraction"] <= 0.2
    assert final["disc_accuracy"] == pytest.approx(m["disc_correct"].item() / m["disc_total"].item())


def test_forward_is_deterministic_in_seed():
    model = build().eval()
    batch = make_batch()
    a, b, c = (model(*batch, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.loss, b.loss)
    assert not torch.equal(a.gen_loss, c.gen_loss)


@pytest.mark.parametrize(
    ("gen_arch", "disc_arch", "overrides"),
    [
        ("bert", "albert", {}),  # BERT generator (hidden = embedding 32) with an ALBERT discriminator
        ("albert", "electra", {}),
        ("electra", "bert", {"discriminator_hidden_size": 32}),
        ("electra", "albert", {}),  # ALECTRA
    ],
)
def test_mixed_pairs_share_embeddings_and_train(gen_arch, disc_arch, overrides):
    model = build(tiny(generator_arch=gen_arch, discriminator_arch=disc_arch, **overrides))
    assert model.generator.config.model_type == gen_arch
    assert model.discriminator.config.model_type == disc_arch
    assert model.generator.base_model.embeddings is model.discriminator.base_model.embeddings
    out = model(*make_batch(), seed=0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.shared_embeddings.word_embeddings.weight.grad.abs().sum() > 0


def _hf(cls, **kwargs):
    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64
    )
    return cls(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("generator", "discriminator", "message"),
    [
        (
            _hf(ElectraConfig, embedding_size=16),
            _hf(AlbertConfig, embedding_size=32, num_labels=1),
            "embedding size",
        ),
        (_hf(BertConfig, vocab_size=999), _hf(ElectraConfig, embedding_size=32, num_labels=1), "vocab_size"),
        (
            _hf(BertConfig),
            _hf(BertConfig, max_position_embeddings=128, num_labels=1),
            "max_position_embeddings",
        ),
        (_hf(BertConfig), _hf(BertConfig, type_vocab_size=1, num_labels=1), "type_vocab_size"),
    ],
)
def test_incompatible_pairs_raise_clear_errors(generator, discriminator, message):
    if generator.vocab_size != VOCAB:  # the tokenizer-size check fires first; test the pair check directly
        from alectra.model import check_compatible

        with pytest.raises(ValueError, match=message):
            check_compatible(generator, discriminator)
        return
    with pytest.raises(ValueError, match=message):
        build(hf_configs=(generator, discriminator))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="embedding_size"):
        tiny(generator_arch="bert", generator_hidden_size=64)
    with pytest.raises(ValueError, match="kernels"):
        tiny(kernels="cuda")
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("electra-huge")
    with pytest.raises(ValueError, match="lacks"):
        ElectraPretrainingModel(tiny(), vocab_size=VOCAB, special_token_ids={"cls": 2})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build()(*make_batch(seq_len=200), seed=0)


def test_preset_parameter_counts():
    counts = {}
    for name in ("electra-small", "alectra-small", "electra-base"):
        with torch.device("meta"):
            counts[name] = build(get_preset(name), vocab_size=30522).parameter_counts()
    # Paper (Clark et al. 2020, Table 1/8): ELECTRA-Small 14M, Base 110M (discriminator incl. embeddings).
    assert 13.0e6 < counts["electra-small"]["discriminator"] < 14.5e6
    assert 105e6 < counts["electra-base"]["discriminator"] < 112e6
    # ALECTRA-Small: 12 layers share one group, so the discriminator encoder is one ELECTRA-Small layer
    # (plus projection, biases, LayerNorms); the ELECTRA RTD head adds dense(256) + dense(1).
    layer, head = 4 * 256 * 256 + 2 * 256 * 1024, (256 * 256 + 256) + (256 + 1)
    assert layer < counts["alectra-small"]["discriminator_only"] - head < 1.1 * layer
    assert get_preset("electra-small").generator_hidden_size == 64
    assert get_preset("electra-base").generator_hidden_size == 256


def test_flops_per_token_counts_layer_applications():
    with torch.device("meta"):
        small = build(get_preset("electra-small"))
        alectra = build(get_preset("alectra-small"))
    # ALBERT shares weights, not compute: the same FLOPs as ELECTRA-Small.
    assert alectra.flops_per_token(128) == pytest.approx(small.flops_per_token(128), rel=1e-3)
    # 6 * N rule of thumb on the non-embedding matmul weights, plus attention: within a few percent.
    d = 12 * (4 * 256**2 + 2 * 256 * 1024) + 128 * 256
    g = 12 * (4 * 64**2 + 2 * 64 * 256) + 128 * 64
    assert small.flops_per_token(128) == pytest.approx(6 * (d + g), rel=0.25)
    assert small.flops_per_token(512) > small.flops_per_token(128)


def test_torch_noise_sampler_matches_softmax_and_is_deterministic():
    """The CPU default (kernels="auto"): the reference with torch's RNG instead of the kernel's Philox."""
    from kernels.sampling import sample_and_cross_entropy_reference

    vocab, rows = 8, 20000
    logits = torch.randn(1, vocab).repeat(rows, 1).requires_grad_()
    targets = torch.zeros(rows, dtype=torch.int64)

    def run(seed):
        disc_ids, labels = torch.full((rows,), -1), torch.zeros(rows, dtype=torch.int64)
        out = sample_and_cross_entropy_reference(
            logits,
            targets,
            seed=seed,
            noise="torch",
            positions=torch.arange(rows),
            disc_input_ids=disc_ids,
            replaced_labels=labels,
        )
        return out, disc_ids, labels

    (loss, samples, _), disc_ids, labels = run(3)
    assert torch.equal(run(3)[0][1], samples) and not torch.equal(run(4)[0][1], samples)
    assert torch.equal(disc_ids, samples) and torch.equal(labels, (samples != 0).long())
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    expected = torch.softmax(logits[0].detach(), -1) * rows
    chi2 = float(((torch.bincount(samples, minlength=vocab) - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, chi2  # 7 dof: P(chi2 > 30) ~ 1e-4


def test_torch_noise_sampler_never_draws_a_zero_probability_token_and_follows_temperature():
    from kernels.sampling import sample_from_softmax_reference

    rows = 20000
    row = torch.tensor([0.5, float("-inf"), 0.0, -1.0, float("-inf")])
    samples = sample_from_softmax_reference(
        row.expand(rows, 5).contiguous(), seed=11, temperature=0.5, noise="torch"
    )
    counts = torch.bincount(samples, minlength=5)
    assert counts[1] == 0 and counts[4] == 0
    keep = torch.tensor([0, 2, 3])
    expected = torch.softmax(row[keep] / 0.5, -1) * rows
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, chi2  # 2 dof: P(chi2 > 13.8) ~ 1e-3


def test_seed_tensor_gives_the_int_seeds_step_and_bad_seeds_are_clear_errors():
    model = build(tiny(kernels="auto")).eval()
    batch = make_batch()
    by_int = model(*batch, seed=2**62 + 3)
    by_tensor = model(*batch, seed=torch.tensor(2**62 + 3))
    assert torch.equal(by_int.loss, by_tensor.loss)
    assert all(torch.equal(by_int.metrics[k], by_tensor.metrics[k]) for k in by_int.metrics)
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
        model(*batch, seed=torch.tensor([1]))
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
        model(*batch, seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor or an int"):
        model(*batch, seed=2**63)


def test_a_deep_copy_runs_its_own_generator_head():
    """The MLM head is looked up on the module at each call, so a copy does not keep running the original's
    head (a stored closure did: the compiled-vs-eager comparison trains a deep copy)."""
    import copy

    model = build().eval()
    twin = copy.deepcopy(model)
    batch = make_batch()
    before = twin(*batch, seed=4).gen_loss
    with torch.no_grad():
        model.generator.generator_predictions.dense.weight.mul_(3.0)
    assert torch.equal(twin(*batch, seed=4).gen_loss, before)
    assert not torch.equal(model(*batch, seed=4).gen_loss, before)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_encoders_4d_mask_gives_hfs_own_result(implementation):
    """The model hands each encoder a ready 4-D mask (alectra.model.encoder_attention_mask) so that HF does
    not read the 2-D mask on the host; the hidden states at real tokens equal HF's own masking's."""
    from alectra.model import build_hf_configs, encoder_attention_mask

    generator, discriminator = build_hf_configs(tiny(discriminator_arch="albert"), VOCAB)
    for hf_config in (generator, discriminator):
        hf_config._attn_implementation = implementation
    model = build(tiny(discriminator_arch="albert"), hf_configs=(generator, discriminator)).eval()
    ids, attention_mask, token_type_ids = make_batch()
    attention_mask[2, 5:] = 0
    real = attention_mask.bool()
    for network in (model.generator.base_model, model.discriminator.base_model):
        assert network.config._attn_implementation == implementation
        mask = encoder_attention_mask(network.config, attention_mask, torch.float32)
        with torch.no_grad():
            ours = network(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids)
            hfs = network(input_ids=ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        torch.testing.assert_close(ours.last_hidden_state[real], hfs.last_hidden_state[real])


def test_a_checkpoint_with_the_old_head_alias_still_loads():
    """Before the head was looked up per call, a BERT/ALBERT generator's MLM head was also registered as
    `_mlm_head` and saved twice; such a state dict loads strictly, and the alias is not saved any more."""
    model = build(tiny(generator_arch="albert"))
    state = model.state_dict()
    assert not any(k.startswith("_mlm_head.") for k in state)
    old = {**state, **{f"_mlm_head.{k}": v for k, v in model.generator.predictions.state_dict().items()}}
    build(tiny(generator_arch="albert")).load_state_dict(old, strict=True)
