"""Graph capture of the model a DeepSpeed engine trains: the `train.compile` switch (alectra.config).

| `train.compile` | torch.compile backend, options | what runs |
|---|---|---|
| `off` | - | eager PyTorch (the default) |
| `on` | inductor | generated Triton (GPU) or C++ (CPU) kernels for the forward and the backward |
| `cuda-graphs` | inductor, `mode="reduce-overhead"` | as `on`, each graph replayed as a CUDA graph (GPU) |
| `aot_eager` | aot_eager | the same forward/backward graphs run op by op by eager aten (no code generation) |

It uses DeepSpeed's own `DeepSpeedEngine.compile` (deepspeed/runtime/engine.py, 0.19.8): without DeepCompile
in the JSON, that is `nn.Module.compile` in place on the module the engine wraps, so the engine's forward,
`engine.backward` and `engine.step` are unchanged around it. Dynamo captures the model's forward (masking,
both encoders, the Triton kernels as registered custom ops, the losses: one graph,
tests/test_model_compile.py) and AOTAutograd compiles its backward as one graph. The parameters'
AccumulateGrad nodes stay outside the compiled backward, so ZeRO-1/2's gradient hooks
(`register_post_accumulate_grad_hook`, deepspeed/utils/torch.py `register_grad_hook`) see every gradient as
in eager mode (tests/test_compile.py).

Shapes are static (`dynamic=False`): every micro-batch is (micro_batch_size, max_seq_length) with
B x max_predictions masked slots, and the seed is a device tensor, so the training step compiles once; an
evaluation (no grad, dropout off) compiles its own graph once. `on` and `cuda-graphs` draw dropout masks from
inductor's RNG (seeded from torch's, so a fixed seed still repeats a run), not the masks eager draws;
`aot_eager` draws eager's.
"""

from __future__ import annotations

from typing import Any

from alectra.config import ConfigError

COMPILE_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "on": ("inductor", {"dynamic": False}),
    "cuda-graphs": ("inductor", {"dynamic": False, "mode": "reduce-overhead"}),
    "aot_eager": ("aot_eager", {"dynamic": False}),
}
"""`train.compile` value -> (torch.compile backend, its keyword arguments); "off" compiles nothing."""


def check_compile(mode: str, *, device_type: str, zero_stage: int) -> None:
    """Raise ConfigError (one line, exit 2) for a `train.compile` that cannot work on this run, before
    DeepSpeed starts (alectra.pretrain.check): CUDA graphs without a GPU, and ZeRO-3, whose parameters are
    gathered by module hooks around each submodule's forward (a graph break at every layer: DeepSpeed's
    DeepCompile is the way to compile it, not this switch)."""
    if mode == "off":
        return
    if mode == "cuda-graphs" and device_type != "cuda":
        raise ConfigError(
            f"train.compile cuda-graphs needs a CUDA GPU; this run is on {device_type}: use on or aot_eager"
        )
    if zero_stage == 3:
        raise ConfigError(
            f"train.compile {mode} is for ZeRO stages 0-2; with ZeRO-3 set train.compile off "
            "(or use ds_configs/zero2.json)"
        )


def compile_engine(engine: Any, mode: str, *, device_type: str, zero_stage: int) -> None:
    """Compile the model `engine` wraps, in place, as `train.compile` = `mode` asks (nothing for "off"),
    after `check_compile`."""
    check_compile(mode, device_type=device_type, zero_stage=zero_stage)
    if mode == "off":
        return
    backend, options = COMPILE_OPTIONS[mode]
    engine.compile(backend=backend, compile_kwargs=options)
