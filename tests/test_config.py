"""RunConfig loading/overrides, DeepSpeed-JSON filling and batch checks, optimizer groups, LR schedule,
checkpoint discovery: fast, in-process, no process group."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from alectra.config import ConfigError, RunConfig, load_config
from alectra.optim import electra_multiplier, parameter_groups
from alectra.training.checkpoint import COMPLETE_MARK, find_resume
from alectra.training.ds_config import Hardware, load_ds_json, resolve_ds_config

ROOT = Path(__file__).resolve().parents[1]
CPU1 = Hardware(accelerator="cpu", bf16_supported=False, dp_size=1)


def test_demo_yaml_is_the_builtin_default():
    assert load_config(ROOT / "configs" / "demo.yaml") == RunConfig()


@pytest.mark.parametrize(
    "name", ["alectra_small_owt", "alectra_small_electra_recipe", "electra_small_owt", "electra_base"]
)
def test_recipes_load_with_their_numbers(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    google = ("adamw", "electra", 1.0, "auto")  # optimizer, schedule, clip, precision
    seed = ("lamb", "linear", 0.0, "fp32")
    expected = {
        # the seed's script (lmtuners 86f31ba) at the card's numbers: LAMB, HF linear schedule, no clipping
        "alectra_small_owt": ("alectra-small-owt", 512, 500_000, 40_000, 2e-3, seed),
        "alectra_small_electra_recipe": ("alectra-small", 512, 500_000, 40_000, 2e-3, google),
        "electra_small_owt": ("electra-small", 128, 1_000_000, 10_000, 5e-4, google),
        "electra_base": ("electra-base", 256, 766_000, 10_000, 2e-4, google),
    }[name]
    t = cfg.train
    assert (cfg.model.preset, t.global_batch_size, t.steps, t.warmup_steps, t.lr) == expected[:5]
    assert (t.optimizer, t.lr_schedule, t.clip_grad_norm, t.precision) == expected[5]
    assert (t.adam_eps, t.weight_decay, t.adam_beta1, t.adam_beta2) == (1e-6, 0.01, 0.9, 0.999)
    assert cfg.data.max_seq_length == (512 if name == "electra_base" else 128)


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "--train.lr",
            "1e-3",
            "--train.steps=7",
            "--model.overrides.kernels",
            "torch",
            "--data.paths",
            "[a, b]",
            "--checkpoint.dir",
            "null",
            "--logging.csv",
            "false",
        ],
    )
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML alone reads "1e-3" as a string
    assert cfg.train.steps == 7
    assert cfg.model.model_config().kernels == "torch"
    assert cfg.data.paths == ["a", "b"] and cfg.checkpoint.dir is None and cfg.logging.csv is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train.lr", "fast"], "train.lr must be a number"),
        (["--train.steps", "1.5"], "train.steps must be an integer"),
        (["--train.stpes", "5"], "unknown config key(s) ['train.stpes']"),
        (["--model.preset", "huge"], "model.preset: unknown 'huge'"),
        (["--model.overrides.hiden_size", "3"], "unknown ModelConfig field(s) ['hiden_size']"),
        (
            ["--train.global_batch_size", "10", "--train.micro_batch_size", "4"],
            "train.global_batch_size=10 is not a multiple of train.micro_batch_size=4",
        ),
        (["--train.optimizer", "sgd"], "train.optimizer must be one of"),
        (["--checkpoint.resume", "/no/such/dir"], "neither 'auto', 'none' nor an existing checkpoint folder"),
        (["--train.lr"], "has no value"),
    ],
)
def test_bad_values_name_the_field(args, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert message in str(err.value)


def test_cli_error_is_one_line(capsys):
    from alectra.pretrain import main

    assert main(["--train.global_batch_size", "10", "--train.micro_batch_size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.global_batch_size=10")


def test_auto_values_are_filled_from_the_run_config(caplog):
    cfg = load_config(
        None,
        [
            "--train.global_batch_size",
            "64",
            "--train.micro_batch_size",
            "8",
            "--train.clip_grad_norm",
            "0.5",
            "--output_dir",
            "/tmp/x",
        ],
    )
    with caplog.at_level(logging.WARNING):
        ds = resolve_ds_config(
            load_ds_json(ROOT / "ds_configs" / "zero2.json"),
            cfg,
            Hardware(accelerator="cpu", bf16_supported=True, dp_size=4),
        )
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (64, 8, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "bf16 disabled: no GPU" in caplog.text
    assert ds["csv_monitor"] == {"enabled": True, "output_path": "/tmp/x/logs", "job_name": "train"}
    assert "auto" not in json.dumps(ds)


def test_precision_on_gpus():
    cfg = RunConfig()
    ds_json = load_ds_json(ROOT / "ds_configs" / "zero1.json")
    ampere = Hardware(accelerator="cuda", bf16_supported=True, dp_size=1)
    assert resolve_ds_config(ds_json, cfg, ampere)["bf16"]["enabled"] is True
    volta = Hardware(accelerator="cuda", bf16_supported=False, dp_size=1)
    assert resolve_ds_config(ds_json, cfg, volta)["bf16"]["enabled"] is False
    fp16 = load_config(None, ["--train.precision", "fp16"])
    ds = resolve_ds_config(ds_json, fp16, volta)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    with pytest.raises(ConfigError, match="has no bf16"):
        resolve_ds_config(ds_json, load_config(None, ["--train.precision", "bf16"]), volta)


@pytest.mark.parametrize(
    ("change", "hw_dp", "message"),
    [
        ({}, 3, "not a multiple of train.micro_batch_size=16 x data-parallel size=3"),
        ({"train_batch_size": 64}, 1, "train_batch_size=64 disagrees with the run config (16)"),
        ({"optimizer": {"type": "Adam"}}, 1, "has an 'optimizer' block; remove it"),
        ({"zero_optimization": {"stage": 3}, "_lamb": True}, 1, "lamb supports ZeRO stage 1 and 2"),
        ({"zero_optimization": {"stage": 0}}, 1, "stage 0 with adamw"),
        ({"zero_optimization": {"stage": 0}, "_lamb": True}, 1, "stage 0 with lamb"),
        (
            {"zero_allow_untested_optimizer": False, "_lamb": True},
            1,
            "zero_allow_untested_optimizer=False disagrees",
        ),
    ],
)
def test_ds_config_errors(change, hw_dp, message):
    ds_json = load_ds_json(ROOT / "ds_configs" / "zero2.json")
    cfg = load_config(None, ["--train.optimizer", "lamb"] if change.pop("_lamb", False) else [])
    ds_json.update(change)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(ds_json, cfg, Hardware(accelerator="cuda", bf16_supported=True, dp_size=hw_dp))
    assert message in str(err.value)


def test_every_shipped_ds_config_resolves():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        resolve_ds_config(load_ds_json(path), RunConfig(), CPU1)


def test_lr_schedule_is_warmup_times_linear_decay():
    def factor(step):
        return electra_multiplier(step, total_steps=100, warmup_steps=10)

    # google-research/electra: lr = peak * (1 - step/total) * min(1, step/warmup)
    assert factor(0) == 0.0
    assert factor(5) == pytest.approx(0.95 * 0.5)
    assert factor(10) == pytest.approx(0.9)
    assert factor(50) == pytest.approx(0.5)
    assert factor(100) == 0.0


def test_weight_decay_skips_layernorm_and_bias():
    from alectra.model import ElectraPretrainingModel
    from alectra.presets import get_preset

    model = ElectraPretrainingModel(
        get_preset("tiny"),
        vocab_size=100,
        special_token_ids={"cls": 1, "sep": 2, "pad": 0, "mask": 3, "unk": 4},
    )
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("LayerNorm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert not any("LayerNorm" in names[id(p)] or names[id(p)].endswith("bias") for p in decay["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied embeddings counted once


def test_find_resume_ignores_uncommitted_tags(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"step_{step}").mkdir()
    for step in (2, 4):
        mark = {"step": step, "world_size": 1, "zero_stage": 2}
        (tmp_path / f"step_{step}" / COMPLETE_MARK).write_text(json.dumps(mark))
    assert find_resume(tmp_path, "none") is None
    assert find_resume(tmp_path, "auto").step == 4  # no `latest`: newest committed, step_6 is half-written
    (tmp_path / "latest").write_text("step_6")
    assert find_resume(tmp_path, "auto").step == 4  # `latest` naming a half-written tag is not trusted
    (tmp_path / "latest").write_text("step_2")
    assert find_resume(tmp_path, "auto").step == 2
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_resume(tmp_path, str(tmp_path / "step_6"))
    assert find_resume(tmp_path / "empty", "auto") is None


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lamb_resolves_with_zero_1_and_2_in_fp32_and_bf16(stage, precision):
    """The old restriction (LAMB only at ZeRO-0 in fp32) is gone: ZeRO-1/2 partitions are handled."""
    cfg = load_config(
        None, ["--train.optimizer", "lamb", "--train.precision", precision, "--train.micro_batch_size", "8"]
    )
    ds_json = load_ds_json(ROOT / "ds_configs" / f"zero{stage}.json")
    ds = resolve_ds_config(ds_json, cfg, Hardware(accelerator="cuda", bf16_supported=True, dp_size=2))
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"]["enabled"] is (precision == "bf16")


def test_lr_schedule_choice_is_checked():
    assert load_config(None, ["--train.lr_schedule", "linear"]).train.lr_schedule == "linear"
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of"):
        load_config(None, ["--train.lr_schedule", "cosine"])
