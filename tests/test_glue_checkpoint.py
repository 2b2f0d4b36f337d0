"""`--model` given a training checkpoint: a real DeepSpeed (ZeRO-2, one CPU process, gloo) checkpoint of an
ALECTRA `tiny` model is exported with alectra.export and fine-tuned, without an export step by the user."""

import dataclasses

import pytest
import torch

from alectra.glue.__main__ import main, resolve_model_dir
from alectra.glue.report import parse_results_table
from tests.test_glue import _train_vocab, write_glue_fixture


@pytest.fixture(scope="module")
def alectra_run(tmp_path_factory, single_process_group):
    """A run dir `<run>/checkpoints/{alectra_model.json, tokenizer/, latest, step_2/}` and its module."""
    import deepspeed
    from transformers import BertTokenizerFast

    from alectra.export import write_model_metadata
    from alectra.model import ElectraPretrainingModel
    from alectra.presets import get_preset
    from alectra.seeds import step_seed
    from alectra.training.checkpoint import Checkpointer

    root = tmp_path_factory.mktemp("run")
    tokenizer = BertTokenizerFast(vocab=_train_vocab(), do_lower_case=True)
    tokenizer.save_pretrained(root / "tokenizer")
    specials = {name: getattr(tokenizer, f"{name}_token_id") for name in ("cls", "sep", "pad", "mask", "unk")}
    config = dataclasses.replace(get_preset("tiny"), discriminator_arch="albert", kernels="torch")
    torch.manual_seed(0)
    model = ElectraPretrainingModel(config, vocab_size=len(tokenizer), special_token_ids=specials)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}},
    )
    batch = tokenizer(["the movie was great"] * 4, padding="max_length", max_length=16, return_tensors="pt")
    for step in range(2):
        out = engine(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], seed=step_seed(0, step, 0)
        )
        engine.backward(out.loss)
        engine.step()
    checkpoints = root / "run" / "checkpoints"
    write_model_metadata(
        checkpoints,
        model_config=config,
        vocab_size=len(tokenizer),
        special_token_ids=specials,
        tokenizer_dir=root / "tokenizer",
    )
    Checkpointer(checkpoints, every=1, keep_last=1, zero_stage=2).save(engine, 2, {})  # with its commit mark
    return root / "run", engine.module


def test_checkpoint_is_exported_then_fine_tuned(alectra_run, tmp_path, capsys):
    from transformers import AutoModel

    run_dir, module = alectra_run
    discriminator = resolve_model_dir(run_dir, tmp_path / "scratch")
    encoder = AutoModel.from_pretrained(discriminator)
    assert encoder.config.model_type == "albert"
    trained = module.discriminator.base_model.state_dict()
    for name, value in encoder.state_dict().items():
        if "pooler" not in name:  # *ForTokenClassification has no pooler; AutoModel adds a fresh one
            torch.testing.assert_close(value, trained[name], msg=name)

    glue_dir = write_glue_fixture(tmp_path / "glue", n_train=32, n_dev=16)
    out = tmp_path / "results"
    argv = [
        "--model",
        str(run_dir),
        "--name",
        "alectra-tiny",
        "--tasks",
        "sst2",
        "--data-dir",
        str(glue_dir),
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    [row] = parse_results_table((out / "glue_results.md").read_text())
    assert row["Model"] == "alectra-tiny" and 0 <= row["SST"] <= 100
    assert "exporting checkpoint" in capsys.readouterr().err
