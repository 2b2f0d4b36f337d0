"""`train.compile` (alectra.training.compile) through the real DeepSpeed engine on CPU (issue 12, item 4).

The trainer is built in this process exactly as `pretrain.py` builds it (`check`, `build_trainer`: 1 rank,
gloo, ZeRO-2, fp32, `train.compile` applied to the engine), on the demo corpus cut into the seed's line pairs
at length 32, so every micro-batch is padded differently and masks a different number of tokens. The
trainer's own step (`Trainer._train_step`: device seed tensor, forward, backward, step), compiled with
"aot_eager" (the capture without code generation: seconds to compile on a CPU), 30 optimizer steps:
- Dynamo captures the model's forward as one graph, no graph break, and AOTAutograd its backward as one;
- nothing recompiles (the seed is a device tensor; shapes are static);
- losses and the final weights match the eager engine's (rtol 1e-5) on the same batches: ZeRO's hooks saw
  every gradient the compiled backward produced.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters

from alectra.config import COMPILE_MODES, ConfigError, load_config
from alectra.training.compile import COMPILE_OPTIONS, compile_engine

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30


@pytest.mark.parametrize(("value", "mode"), [("off", "off"), ("false", "off"), ("on", "on"), ("true", "on")])
def test_yaml_booleans_name_the_modes(value, mode):
    assert load_config(None, ["--train.compile", value]).train.compile == mode


def test_every_mode_has_its_options_and_off_is_the_default():
    assert set(COMPILE_OPTIONS) == set(COMPILE_MODES) - {"off"}
    assert load_config().train.compile == "off"


def test_bad_value_is_one_line_and_exit_2(capsys):
    from alectra.pretrain import main

    assert main(["--train.compile", "max-autotune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: train.compile must be one of {COMPILE_MODES}, got 'max-autotune'"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--train.compile", "cuda-graphs"],
            "train.compile cuda-graphs needs a CUDA GPU; this run is on cpu",
        ),
        (
            ["--train.compile", "on", "--deepspeed", str(ROOT / "ds_configs" / "zero3.json")],
            "train.compile on is for",
        ),
    ],
)
def test_impossible_combination_stops_before_deepspeed_starts(args, message, capsys):
    """pretrain.py says it in one line, exit 2, from its checks: build (DeepSpeed) is never reached."""
    from alectra.pretrain import main
    from alectra.training import build

    never = AssertionError("DeepSpeed started")
    with (
        mock.patch.object(build, "init_process_group", side_effect=never),
        mock.patch.object(build, "build_trainer", side_effect=never),
    ):
        assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}"), line


def test_help_lists_the_switch(capsys):
    from alectra.pretrain import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--train.compile STR Graph capture of the model's forward and backward" in text
    assert "(default: 'off')" in text


@pytest.mark.parametrize(
    ("mode", "zero_stage", "message"),
    [("cuda-graphs", 2, "needs a CUDA GPU"), ("aot_eager", 3, "is for ZeRO stages 0-2")],
)
def test_combinations_that_cannot_work_are_config_errors(mode, zero_stage, message):
    class NeverCompiled:
        def compile(self, **kwargs):
            raise AssertionError("compiled")

    with pytest.raises(ConfigError, match=message):
        compile_engine(NeverCompiled(), mode, device_type="cpu", zero_stage=zero_stage)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from data_prep import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("data") / "demo", vocab_size=1000, max_documents=120)


def train(demo: Path, out: Path, mode: str) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """STEPS optimizer steps of the trainer's own step with `train.compile` = mode (applied by build_trainer);
    per step (loss, masked slots, real tokens), and the final weights."""

    from alectra.pretrain import check
    from alectra.training import build

    overrides = {
        "output_dir": out,
        "data.paths": f"[{demo}]",
        "data.max_seq_length": 32,
        "data.examples": "line_pairs",
        "data.num_workers": 0,
        "data.valid_fraction": 0.05,
        "model.overrides": "{masking: bernoulli}",
        "train.steps": STEPS,
        "train.global_batch_size": 4,
        "train.compile": mode,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        "logging.csv": "false",
    }
    args = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    cfg, plan, data = check(None, args, str(ROOT / "ds_configs" / "zero2.json"))
    trainer = build.build_trainer(cfg, plan, data)
    loader = trainer._loader(trainer.train_dataset, 0, workers=0)
    batches = [batch for batch, _ in zip(loader, range(STEPS), strict=False)]
    rows = []
    try:
        for batch in batches:
            trainer._train_step(iter([batch]))
            trainer.state.step += 1
            sums = dict(zip(trainer.sums.keys, trainer.sums.sums.tolist(), strict=True))
            trainer.sums.sums.zero_()
            rows.append([sums["loss"], sums["gen_total"], float(batch["attention_mask"].sum())])
        weights = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    finally:
        with mock.patch.object(
            torch.distributed, "destroy_process_group"
        ):  # conftest's, kept for later modules
            trainer.close()
    return rows, weights


def test_compiled_engine_is_one_graph_never_recompiles_and_trains_like_eager(
    demo, single_process_group, tmp_path
):
    eager_losses, eager_weights = train(demo, tmp_path / "eager", "off")
    torch._dynamo.reset()
    counters.clear()
    losses, weights = train(demo, tmp_path / "compiled", "aot_eager")
    assert not counters["graph_break"], dict(counters["graph_break"])
    # A recompile (a guard failing on a new seed, padding or masked count) would capture a second graph and
    # compile a second joint forward + backward.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 1 forward capture in 30 steps
    assert counters["aot_autograd"]["ok"] == 1, dict(counters["aot_autograd"])  # its joint fwd+bwd graph

    _, masked, real = zip(*eager_losses, strict=True)
    assert len(set(masked)) > 5 and len(set(real)) > 5  # masked counts and padding vary from step to step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert eager_losses[-1][0] < eager_losses[0][0]


def test_modes_map_to_torch_compile_arguments():
    calls = []

    @dataclasses.dataclass
    class Recorder:
        def compile(self, **kwargs):
            calls.append(kwargs)

    compile_engine(Recorder(), "off", device_type="cpu", zero_stage=2)
    compile_engine(Recorder(), "on", device_type="cpu", zero_stage=1)
    compile_engine(Recorder(), "cuda-graphs", device_type="cuda", zero_stage=2)
    assert calls == [
        {"backend": "inductor", "compile_kwargs": {"dynamic": False}},
        {"backend": "inductor", "compile_kwargs": {"dynamic": False, "mode": "reduce-overhead"}},
    ]
