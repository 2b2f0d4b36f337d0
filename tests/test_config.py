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
CPU = Hardware(accelerator="cpu", bf16_supported=False)
ZERO2 = ROOT / "ds_configs" / "zero2.json"


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
        plan = resolve_ds_config(
            load_ds_json(ROOT / "ds_configs" / "zero2.json"),
            cfg,
            Hardware(accelerator="cpu", bf16_supported=True),
            4,
        )
    ds = plan.config
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (64, 8, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "disabled" not in caplog.text  # precision "auto": fp32 is what a CPU means, nothing to warn about
    asked = load_config(None, ["--train.precision", "bf16"])
    with caplog.at_level(logging.WARNING):
        explicit = resolve_ds_config(
            load_ds_json(ZERO2), asked, Hardware(accelerator="cpu", bf16_supported=True), 1
        )
    assert explicit.precision == "fp32" and "bf16 disabled: no GPU" in caplog.text
    assert ds["csv_monitor"] == {"enabled": True, "output_path": "/tmp/x/logs", "job_name": "train"}
    assert "auto" not in json.dumps(ds)
    assert (plan.zero_stage, plan.precision, plan.offload_optimizer, plan.accelerator) == (
        2,
        "fp32",
        False,
        "cpu",
    )
    assert (plan.batch.global_batch_size, plan.batch.micro_batch_size) == (64, 8)
    assert (plan.batch.grad_accum, plan.batch.dp_size) == (2, 4)


def test_precision_on_gpus():
    cfg = RunConfig()
    ds_json = load_ds_json(ROOT / "ds_configs" / "zero1.json")
    ampere = Hardware(accelerator="cuda", bf16_supported=True)
    plan = resolve_ds_config(ds_json, cfg, ampere, 1)
    assert plan.config["bf16"]["enabled"] is True and plan.precision == "bf16"
    volta = Hardware(accelerator="cuda", bf16_supported=False)
    assert resolve_ds_config(ds_json, cfg, volta, 1).config["bf16"]["enabled"] is False
    fp16 = load_config(None, ["--train.precision", "fp16"])
    plan = resolve_ds_config(ds_json, fp16, volta, 1)
    assert (
        plan.config["fp16"]["enabled"] is True and plan.config["fp16"]["loss_scale"] == 0
    )  # dynamic scaling
    assert plan.precision == "fp16"
    with pytest.raises(ConfigError, match="has no bf16"):
        resolve_ds_config(ds_json, load_config(None, ["--train.precision", "bf16"]), volta, 1)


@pytest.mark.parametrize(
    ("change", "hw_dp", "message"),
    [
        (
            {"_args": ["--train.global_batch_size", "16", "--train.micro_batch_size", "16"]},
            3,
            "not a multiple of train.micro_batch_size=16 x data-parallel size=3",
        ),
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
    overrides = ["--train.optimizer", "lamb"] if change.pop("_lamb", False) else []
    cfg = load_config(None, overrides + change.pop("_args", []))
    ds_json.update(change)
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(ds_json, cfg, Hardware(accelerator="cuda", bf16_supported=True), hw_dp)
    assert message in str(err.value)


def test_every_shipped_ds_config_resolves():
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        plan = resolve_ds_config(load_ds_json(path), RunConfig(), CPU, 1)
        assert plan.zero_stage == int(path.stem.removeprefix("zero").split("_")[0])
        assert plan.offload_optimizer == ("offload" in path.stem)


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
    ds = resolve_ds_config(ds_json, cfg, Hardware(accelerator="cuda", bf16_supported=True), 2).config
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"]["enabled"] is (precision == "bf16")


def test_lr_schedule_choice_is_checked():
    assert load_config(None, ["--train.lr_schedule", "linear"]).train.lr_schedule == "linear"
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of"):
        load_config(None, ["--train.lr_schedule", "cosine"])


@pytest.mark.parametrize(
    ("overrides", "dp", "expected"),  # expected: (global, micro, grad-accum)
    [
        ([], 1, (16, 16, 1)),
        ([], 2, (16, 8, 1)),
        ([], 3, (18, 6, 1)),  # the demo on 3 ranks: 16 rounded up to whole micro-batches
        (["--train.micro_batch_size", "4"], 1, (16, 4, 4)),
        (["--train.micro_batch_size", "4"], 3, (24, 4, 2)),
        (["--train.global_batch_size", "32"], 2, (32, 16, 1)),
        (["--train.global_batch_size", "12", "--train.micro_batch_size", "2"], 3, (12, 2, 2)),
    ],
)
def test_batch_sizes_follow_the_world_size(overrides, dp, expected):
    """The one batch arithmetic: a micro-batch the user did not give follows the world size, and the run
    config at that size and the DeepSpeed JSON carry the same numbers."""
    cfg = load_config(None, overrides)
    batch = cfg.train.batch_sizes(dp)
    assert (batch.global_batch_size, batch.micro_batch_size, batch.grad_accum, batch.dp_size) == (
        *expected,
        dp,
    )
    assert batch.global_batch_size == batch.micro_batch_size * batch.grad_accum * dp
    resolved = cfg.at_world_size(dp)
    assert (resolved.train.global_batch_size, resolved.train.micro_batch_size) == expected[:2]
    assert resolved.at_world_size(dp) == resolved  # resolving twice changes nothing
    ds = resolve_ds_config(load_ds_json(ZERO2), cfg, CPU, dp).config
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (expected)


def test_a_global_batch_the_ranks_cannot_share_is_one_clear_error():
    cfg = load_config(None, ["--train.global_batch_size", "16"])
    with pytest.raises(ConfigError) as err:
        cfg.at_world_size(3)
    assert str(err.value) == (
        "train.global_batch_size=16 cannot be split over 3 data-parallel ranks; "
        "make it a multiple of 3 or set train.micro_batch_size"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.paths", "[a, b]", "--data.weights", "[1.0]"], "data.weights=[1.0] for 2 path(s): need one"),
        (
            ["--data.paths", "[a]", "--data.weights", "[0.0]"],
            "non-negative weight per data path, not all zero",
        ),
        (["--data.max_seq_length", "5"], "data.max_seq_length must be at least 8, got 5"),
        (["--data.valid_fraction", "1.0"], "data.valid_fraction must be in [0, 1), got 1.0"),
        (["--data.valid_fraction", "0"], "data.valid_fraction=0 holds nothing out to evaluate"),
    ],
)
def test_data_values_are_checked_with_the_data_layers_rules(args, message):
    """The config checks data values with alectra.data.rules, the functions the dataset builders use."""
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    assert message in str(err.value)


def test_zero_weight_and_no_held_out_data_are_allowed():
    cfg = load_config(None, ["--data.paths", "[a, b]", "--data.weights", "[1, 0]"])
    assert cfg.data.weights == [1.0, 0.0]
    cfg = load_config(None, ["--data.valid_fraction", "0", "--logging.eval_every", "0"])
    assert cfg.data.valid_fraction == 0.0


def test_one_path_needs_no_brackets():
    assert load_config(None, ["--data.paths", "data/owt"]).data.paths == ["data/owt"]


def test_pretrain_options_keep_their_order_and_pass_unknown_ones_on():
    from alectra.pretrain import parse_args

    args = parse_args(
        ["--train.lr", "1e-3", "--model.overrides.kernels", "torch", "--train.steps=7", "--resume", "none"]
    )
    assert args.overrides == [
        "--train.lr",
        "1e-3",
        "--train.steps",
        "7",
        "--model.overrides.kernels",
        "torch",
        "--checkpoint.resume",
        "none",
    ]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.train.lr, cfg.train.steps, cfg.checkpoint.resume) == (1e-3, 7, "none")


def test_pretrain_help_lists_every_field_with_its_default(capsys):
    import dataclasses

    from alectra.pretrain import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            assert f"--{section.name} STR" in text
            continue
        for f in dataclasses.fields(value):
            assert f"--{section.name}.{f.name} " in text, f.name
    assert "--train.lr FLOAT Peak learning rate" in text and "(default: 0.001)" in text
    assert "--train.micro_batch_size INT|null" in text and "(default: null)" in text
    assert "docs/training.md" in text


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--data.paths", "/no/such/dataset"], {}, "error: /no/such/dataset/manifest.json: no manifest"),
        (["--deepspeed", "{bad}"], {}, "error: DeepSpeed JSON has an 'optimizer' block; remove it"),
        (
            ["--train.global_batch_size", "16"],
            {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
            "error: train.global_batch_size=16 cannot be split over 3 data-parallel ranks",
        ),
    ],
    ids=["data-paths", "ds-json", "world-size"],
)
def test_pretrain_reports_bad_input_before_deepspeed_starts(tmp_path, args, env, message):
    """A bad dataset path, DeepSpeed JSON or batch split for the launcher's world size: exit 2 with one line,
    and DeepSpeed was never imported (python -X importtime lists every module the process imported)."""
    import os
    import subprocess
    import sys

    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({**load_ds_json(ZERO2), "optimizer": {"type": "Adam"}}))
    args = [str(bad_json) if a == "{bad}" else a for a in args]
    cmd = [sys.executable, "-X", "importtime", str(ROOT / "alectra" / "pretrain.py"), *args]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, **env}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert "deepspeed" not in imported
