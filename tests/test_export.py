"""Export round trip: real DeepSpeed checkpoints (ZeRO-2 and ZeRO-3, one CPU process, gloo) -> HF folders.

The exported discriminator must load with `*ForSequenceClassification` with every encoder weight present,
give the same token-classification logits as the trained module, and carry a working tokenizer.
"""

import dataclasses
import json

import pytest
import torch
from tokenizers import BertWordPieceTokenizer
from transformers import (
    AlbertForSequenceClassification,
    AutoModelForMaskedLM,
    AutoModelForTokenClassification,
    BertTokenizer,
    BertTokenizerFast,
    ElectraForSequenceClassification,
)

from alectra.export import export_checkpoint, main, write_model_metadata
from alectra.masking import step_seed
from alectra.model import ElectraPretrainingModel
from alectra.presets import get_preset
from alectra.training.checkpoint import Checkpointer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "replaced token detection trains a discriminator on every input token",
    "a small generator proposes plausible replacements for masked words",
    "memory mapped datasets keep the corpus on disk and out of the way",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(CORPUS, vocab_size=200, min_frequency=1)
    BertTokenizerFast(tokenizer_object=wordpiece._tokenizer).save_pretrained(path)
    return path


def _batch(tokenizer, n=4, seq_len=24):
    enc = tokenizer(
        CORPUS[:n], padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


@pytest.mark.parametrize(
    ("stage", "disc_arch", "seq_cls"),
    [(3, "albert", AlbertForSequenceClassification), (2, "electra", ElectraForSequenceClassification)],
)
def test_export_round_trip(tmp_path, tokenizer_dir, single_process_group, stage, disc_arch, seq_cls):
    import deepspeed

    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_dir)
    specials = {
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
    }
    config = dataclasses.replace(get_preset("tiny"), discriminator_arch=disc_arch, kernels="torch")
    torch.manual_seed(0)
    model = ElectraPretrainingModel(config, vocab_size=len(tokenizer), special_token_ids=specials)
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    input_ids, attention_mask, token_type_ids = _batch(tokenizer)
    for step in range(2):
        out = engine(input_ids, attention_mask, token_type_ids, seed=step_seed(0, step, 0))
        engine.backward(out.loss)
        engine.step()

    engine.eval()
    with torch.no_grad():
        want_disc = engine.module.discriminator(input_ids, attention_mask, token_type_ids).logits
        want_gen = engine.module.generator(input_ids, attention_mask, token_type_ids).logits
    ckpt_dir = tmp_path / "run" / "checkpoints"
    write_model_metadata(
        ckpt_dir,
        model_config=config,
        vocab_size=len(tokenizer),
        special_token_ids=specials,
        tokenizer_dir=tokenizer_dir,
    )
    Checkpointer(ckpt_dir, every=1, keep_last=1, zero_stage=stage).save(engine, 2, {})  # with its commit mark
    assert (
        json.loads((ckpt_dir / "alectra_model.json").read_text())["model_config"]["discriminator_arch"]
        == disc_arch
    )

    out_dir = tmp_path / "export"
    export_checkpoint(tmp_path / "run", out_dir)

    disc = AutoModelForTokenClassification.from_pretrained(out_dir / "discriminator").eval()
    gen = AutoModelForMaskedLM.from_pretrained(out_dir / "generator").eval()
    with torch.no_grad():
        torch.testing.assert_close(disc(input_ids, attention_mask, token_type_ids).logits, want_disc)
        torch.testing.assert_close(gen(input_ids, attention_mask, token_type_ids).logits, want_gen)
    # The exported generator's output layer is tied to its own embedding copy, as in training.
    assert gen.get_output_embeddings().weight.data_ptr() == gen.get_input_embeddings().weight.data_ptr()

    # Fine-tuning with another label count replaces the 1-logit RTD head: ignore_mismatched_sizes=True.
    _, info = seq_cls.from_pretrained(
        out_dir / "discriminator", num_labels=2, ignore_mismatched_sizes=True, output_loading_info=True
    )
    # Only the new head is missing: the classifier, and for BERT/ALBERT the pooler, which ELECTRA's
    # objective (no next-sentence task) never trains; every embedding and encoder weight is loaded.
    head = [k for k in info["missing_keys"] if k.startswith("classifier") or ".pooler." in k]
    assert set(info["missing_keys"]) == set(head), info["missing_keys"]
    assert all(k[0].startswith("classifier") for k in info["mismatched_keys"]), info["mismatched_keys"]

    round_trip = BertTokenizer.from_pretrained(out_dir / "discriminator")
    text = CORPUS[1]
    assert round_trip(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert round_trip.mask_token_id == specials["mask"]


def test_export_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "ckpt").mkdir()
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "latest" in capsys.readouterr().err
