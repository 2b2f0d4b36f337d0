"""The recipe knobs of the model: RTD heads (ELECTRA's dense + act + dense(1); the seed's linear 2-way
softmax), embedding tying as the seed did it (copied at init), the seed's preset `alectra-small-owt`."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AlbertConfig, ElectraForPreTraining

from alectra.model import ElectraHeadDiscriminator, ElectraPretrainingModel, build_hf_configs, rtd_logits
from alectra.presets import ModelConfig, get_preset
from kernels.rtd_loss import rtd_loss_reference
from tests.test_model import SPECIALS, VOCAB, build, make_batch, tiny, train_steps


def test_electra_head_on_electra_is_hfs_electra_for_pretraining():
    model = build(tiny()).eval()
    assert type(model.discriminator) is ElectraForPreTraining
    ids, mask, types = make_batch()
    with torch.no_grad():
        hidden = model.discriminator.electra(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]
        head = model.discriminator.discriminator_predictions
        # the reference's dense(H, gelu) then dense(1)
        want = head.dense_prediction(F.gelu(head.dense(hidden))).squeeze(-1)
        got = rtd_logits(model.discriminator, input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(got, want)
    assert head.dense.out_features == model.config.discriminator_hidden_size


@pytest.mark.parametrize("arch", ["albert", "bert"])
def test_electra_head_on_other_encoders_keeps_electras_names(arch):
    overrides = {"discriminator_arch": arch}
    if arch == "bert":
        overrides["discriminator_hidden_size"] = 32  # BERT has no projection: hidden == embedding size
    model = build(tiny(**overrides)).eval()
    assert isinstance(model.discriminator, ElectraHeadDiscriminator)
    names = {n for n, _ in model.discriminator.named_parameters()}
    assert {n.split(".")[0] for n in names} == {arch, "discriminator_predictions"}
    assert not any("pooler" in n for n in names)  # no loss trains a pooler
    head = model.discriminator.discriminator_predictions
    assert head.dense_prediction.out_features == 1
    assert float(head.dense.weight.detach().std()) == pytest.approx(0.02, rel=0.2)  # HF: normal(0, 0.02)


def test_linear_head_two_way_softmax_equals_sigmoid_of_the_difference():
    """The seed's head (2 logits, cross-entropy over real tokens) and ours (its logit difference through the
    sigmoid RTD loss): same loss, same gradient on both logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 2, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (50,), generator=g)
    mask = torch.rand(50, generator=g) > 0.2
    seed_loss = F.cross_entropy(logits[mask], labels[mask])  # lmtuners AlbertForTokenClassification
    (seed_grad,) = torch.autograd.grad(seed_loss, logits)
    our_loss = rtd_loss_reference(logits[:, 1] - logits[:, 0], labels, mask)[0]
    (our_grad,) = torch.autograd.grad(our_loss, logits)
    torch.testing.assert_close(our_loss, seed_loss)
    torch.testing.assert_close(our_grad, seed_grad)


def test_linear_head_model_uses_the_logit_difference():
    model = build(tiny(discriminator_arch="albert", discriminator_head="linear")).eval()
    assert model.discriminator.classifier.out_features == 2
    assert model.discriminator.config.id2label == {0: "original", 1: "replaced"}
    ids, mask, types = make_batch()
    with torch.no_grad():
        inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
        two = model.discriminator(**inputs).logits  # (B, T, 2)
        got = rtd_logits(model.discriminator, input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(got, two[..., 1] - two[..., 0])


def test_copied_embeddings_start_equal_and_train_apart():
    """lmtuners utils.tie_weights: `output.weight = nn.Parameter(input.weight.clone())` -- a copy."""
    model = build(tiny(embedding_tying="copied"))
    gen, disc = model.generator.base_model.embeddings, model.discriminator.base_model.embeddings
    assert gen is not disc
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert getattr(gen, name).weight is not getattr(disc, name).weight
        assert torch.equal(getattr(gen, name).weight, getattr(disc, name).weight), name
    assert gen.LayerNorm is not disc.LayerNorm
    assert model.generator.get_output_embeddings().weight is gen.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum("word_embeddings" in n for n in names) == 2
    train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 2)
    assert not torch.equal(gen.word_embeddings.weight, disc.word_embeddings.weight)
    untied = build(tiny(embedding_tying="untied"))
    assert not torch.equal(
        untied.generator.base_model.embeddings.word_embeddings.weight,
        untied.discriminator.base_model.embeddings.word_embeddings.weight,
    )


def test_alectra_small_owt_is_the_seeds_model():
    """train_alectra_small.py at 86f31ba, lines 43-83, with AlbertConfig's defaults for what it leaves out."""
    config = get_preset("alectra-small-owt")
    gen, disc = build_hf_configs(config, vocab_size=30522)
    seed_gen = dict(
        hidden_size=256,
        embedding_size=128,
        num_hidden_layers=3,
        num_attention_heads=1,
        num_hidden_groups=1,
        intermediate_size=1024,
        max_position_embeddings=128,
    )
    seed_disc = dict(seed_gen, num_hidden_layers=12, num_attention_heads=4)
    for built, seed in ((gen, seed_gen), (disc, seed_disc)):
        assert built.model_type == "albert"
        assert {k: getattr(built, k) for k in seed} == seed
        for key in ("hidden_act", "layer_norm_eps", "type_vocab_size", "inner_group_num"):
            assert getattr(built, key) == getattr(AlbertConfig(), key), key  # gelu_new, 1e-12, 2, 1
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"):
            assert getattr(built, key) == 0.1
    assert disc.num_labels == 2  # the seed's AlbertForTokenClassification: default 2 labels
    assert (config.discriminator_head, config.embedding_tying) == ("linear", "copied")
    assert (config.mask_prob, config.disc_weight) == (0.15, 50.0)
    with torch.device("meta"):
        counts = build(config, vocab_size=30522).parameter_counts()
    # The card's "4M": 30522 x 128 word embeddings + one shared 256-wide layer + projection + head.
    assert 4.6e6 < counts["discriminator"] < 4.9e6


@pytest.mark.parametrize(
    ("field", "value"), [("discriminator_head", "mlp"), ("embedding_tying", "tied"), ("kernels", "cuda")]
)
def test_bad_choices_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ModelConfig.{field} must be one of"):
        ModelConfig(**{field: value})


def test_every_preset_builds_and_runs_one_step():
    for name in ("alectra-small-owt",):  # the others are built in tests/test_model.py
        config = dataclasses.replace(
            get_preset(name),
            kernels="torch",
            discriminator_num_layers=2,
            generator_num_layers=1,
        )
        model = ElectraPretrainingModel(config, vocab_size=VOCAB, special_token_ids=SPECIALS)
        out = model(*make_batch(), seed=0)
        out.loss.backward()
        assert torch.isfinite(out.loss) and model.discriminator.classifier.weight.grad.abs().sum() > 0
