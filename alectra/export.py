"""DeepSpeed checkpoint -> Hugging Face folders (encoder with a model card, RTD discriminator, generator).

The engine calls `write_model_metadata` once at start, so a checkpoint folder is self-describing:

    <run>/checkpoints/alectra_model.json   ModelConfig, vocab size, special-token ids
    <run>/checkpoints/tokenizer/           the tokenizer files the run trained with
    <run>/checkpoints/latest               DeepSpeed's pointer to the newest tag
    <run>/checkpoints/step_<N>/            DeepSpeed tag (ZeRO-0/1/2/3 shards, the run's config and step)

`python -m alectra.export <run dir | checkpoints dir | tag dir> <out dir> [--glue-results glue_results.json]`
(or `alectra-export`) rebuilds the model, loads the fp32 weights (DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` for ZeRO shards, the module state for ZeRO-0) and writes, each
folder with the tokenizer files:

    <out>/discriminator/  the discriminator's encoder alone (`AlbertModel`, `ElectraModel`, `BertModel`)
                          and README.md, the model card: what the seed published.
                          `*ForSequenceClassification.from_pretrained(dir, num_labels=k)` loads every encoder
                          weight and adds a fresh head.
    <out>/rtd/            the discriminator with its replaced-token-detection head, as trained:
                          `ElectraForPreTraining` (ELECTRA head on an ELECTRA encoder) or
                          `*ForTokenClassification` (the linear head, 2 labels). Not written for the ELECTRA
                          head on a BERT/ALBERT encoder, which no Hugging Face class holds.
    <out>/generator/      the generator, `*ForMaskedLM`.

DeepSpeed's own `zero_to_fp32.py --safe_serialization` refuses our checkpoints: the tied embeddings are one
tensor under several names ("Some tensors share memory"). Use this exporter (safetensors), or
`zero_to_fp32.py` without the flag (a `pytorch_model.bin` of the whole two-network module, bit-equal).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alectra.presets import ModelConfig
from alectra.storage.atomic import write_dir_atomically, write_text_atomic
from alectra.training import ds_env
from alectra.training.checkpoint import verify_checkpoint

if TYPE_CHECKING:  # imported where used, so that `--help` and a bad path answer at once
    import torch
    from torch import nn

    from alectra.model import ElectraPretrainingModel

METADATA_NAME = "alectra_model.json"
# 2: ModelConfig gained discriminator_head and embedding_tying (round 1's 1-logit linear head is gone).
METADATA_FORMAT = "alectra-model/2"
TOKENIZER_SUBDIR = "tokenizer"
SEQUENCE_CLASSIFIERS = {
    "albert": "AlbertForSequenceClassification",
    "bert": "BertForSequenceClassification",
    "electra": "ElectraForSequenceClassification",
}


def write_model_metadata(
    checkpoints_dir: str | os.PathLike,
    *,
    model_config: ModelConfig | dict,
    vocab_size: int,
    special_token_ids: dict,
    tokenizer_dir: str | os.PathLike | None,
) -> Path:
    """Write `checkpoints_dir/alectra_model.json`; copy the tokenizer files to `checkpoints_dir/tokenizer/`.

    Both are written under temporary names and renamed when complete. Returns the metadata path.
    """
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    config_dict = (
        dataclasses.asdict(model_config) if isinstance(model_config, ModelConfig) else dict(model_config)
    )
    ModelConfig(**config_dict)  # validate before anything is written
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        files = [p for p in sorted(tokenizer_dir.iterdir()) if p.is_file()] if tokenizer_dir.is_dir() else []
        if not files:
            raise ValueError(f"tokenizer_dir {str(tokenizer_dir)!r} is not a folder with tokenizer files")
        write_dir_atomically(checkpoints_dir / TOKENIZER_SUBDIR, lambda tmp: _copy_files(files, tmp))
    metadata = {
        "format": METADATA_FORMAT,
        "model_config": config_dict,
        "vocab_size": int(vocab_size),
        "special_token_ids": {k: int(v) for k, v in special_token_ids.items()},
    }
    path = checkpoints_dir / METADATA_NAME
    write_text_atomic(path, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path


def export_checkpoint(
    checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, glue_results: Path | None = None
) -> Path:
    """Export a DeepSpeed checkpoint (run dir, checkpoints dir with `latest`, or a tag dir) to HF folders;
    `glue_results`: a `python -m alectra.glue` glue_results.json whose table goes into the model card."""
    checkpoints_dir, tag = _resolve_checkpoint(Path(checkpoint_path))
    verify_checkpoint(checkpoints_dir / tag)  # unfinished or damaged: CheckpointError (a ValueError, exit 2)
    metadata = _read_metadata(checkpoints_dir)
    glue = _read_glue_results(glue_results) if glue_results is not None else None
    model_config = ModelConfig(**metadata["model_config"])
    from alectra.model import ElectraPretrainingModel  # after the cheap checks: a bad path answers at once

    model = ElectraPretrainingModel(
        model_config, vocab_size=metadata["vocab_size"], special_token_ids=metadata["special_token_ids"]
    )
    tokenizer_dir = checkpoints_dir / TOKENIZER_SUBDIR
    files = [p for p in sorted(tokenizer_dir.iterdir()) if p.is_file()] if tokenizer_dir.is_dir() else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ds_env.quiet_output():  # DeepSpeed's consolidation and HF's save print progress bars
        _load_weights(model, _read_fp32_state_dict(checkpoints_dir, tag), source=checkpoints_dir / tag)
        card = model_card(
            model,
            run=_read_run_record(checkpoints_dir / tag),
            tokenizer_class=_tokenizer_class(files),
            glue=glue,
            name=out_dir.name,
        )
        _write_hf_folder(out_dir / "discriminator", encoder_for_fine_tuning(model), files, card=card)
        rtd = rtd_discriminator(model)
        if rtd is not None:
            _write_hf_folder(out_dir / "rtd", rtd, files)
        elif (out_dir / "rtd").is_dir():
            shutil.rmtree(out_dir / "rtd")  # an older export's, of another model
        _write_hf_folder(out_dir / "generator", _fp32_copy(model.generator), files)
    return out_dir


def _fp32_copy(network: nn.Module) -> nn.Module:
    # deepcopy of one network copies a shared embedding module into a private one; the generator keeps its
    # output layer tied to its (copied) word embeddings, which HF re-ties on load.
    import torch

    return copy.deepcopy(network).to(torch.float32).cpu()


def encoder_for_fine_tuning(model: ElectraPretrainingModel) -> nn.Module:
    """The discriminator's encoder (no RTD head, no pooler) with a config that says nothing about the RTD
    task: `*ForSequenceClassification.from_pretrained` then finds no head to mismatch and defaults to 2
    labels."""
    encoder = _fp32_copy(model.discriminator.base_model)
    encoder.config = copy.deepcopy(encoder.config)
    encoder.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}  # PretrainedConfig's defaults
    encoder.config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    return encoder


def rtd_discriminator(model: ElectraPretrainingModel) -> nn.Module | None:
    """The discriminator with its RTD head, if a Hugging Face class holds it (see the module docstring)."""
    if not hasattr(model.discriminator, "save_pretrained"):  # ElectraHeadDiscriminator (ALBERT/BERT encoder)
        return None
    return _fp32_copy(model.discriminator)


def _write_hf_folder(target: Path, network: nn.Module, files: list[Path], *, card: str | None = None) -> None:
    def write(tmp: Path) -> None:
        network.save_pretrained(tmp)
        _copy_files(files, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)

    write_dir_atomically(target, write)


# ---- the model card ---------------------------------------------------------------------------------------


def _read_run_record(tag_dir: Path) -> dict[str, Any]:
    """The run config and train state the trainer stores in the checkpoint's client state ({} if absent)."""
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    if not model_states:
        return {}
    import torch

    state = torch.load(model_states[0], map_location="cpu", weights_only=False)
    return {k: state[k] for k in ("config", "train_state") if k in state}


def _tokenizer_class(files: list[Path]) -> str:
    """The slow-tokenizer class name the card shows (`BertTokenizer` for our WordPiece folders)."""
    config = next((f for f in files if f.name == "tokenizer_config.json"), None)
    name = json.loads(config.read_text()).get("tokenizer_class") if config is not None else None
    return name.removesuffix("Fast") if isinstance(name, str) and name.isidentifier() else "AutoTokenizer"


def _read_glue_results(path: Path) -> dict[str, Any]:
    """A `python -m alectra.glue` glue_results.json, checked for the table the card shows."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--glue-results {path}: cannot read a JSON report ({err})") from None
    if not isinstance(report, dict) or not isinstance(report.get("table"), dict) or "seeds" not in report:
        raise ValueError(f"--glue-results {path}: not a glue_results.json written by python -m alectra.glue")
    return report


def model_card(
    model: ElectraPretrainingModel,
    *,
    run: dict[str, Any],
    tokenizer_class: str,
    glue: dict[str, Any] | None,
    name: str,
) -> str:
    """README.md of the discriminator folder, in the shape of the seed's ALECTRA-Small-OWT card: what the
    model is, how to load it, the training parameters, its size and the tokens it saw, GLUE dev results if
    given."""
    config = model.config
    arch = model.discriminator.base_model.config.model_type
    classifier = SEQUENCE_CLASSIFIERS.get(arch, "AutoModelForSequenceClassification")
    tokenizer = tokenizer_class
    n_encoder = sum(p.numel() for p in model.discriminator.base_model.parameters())
    gen = model.generator.config
    lines = [
        f"# {name}",
        "",
        f"An ELECTRA-style discriminator: an {arch.upper()} encoder ({n_encoder:,} parameters, "
        f"hidden {config.discriminator_hidden_size}, embedding {config.embedding_size}, "
        f"{config.discriminator_num_layers} layers"
        + (
            f" sharing {config.discriminator_num_hidden_groups} parameter group(s)"
            if arch == "albert"
            else ""
        )
        + ") pretrained with replaced-token detection by alectra (ELECTRA, Clark et al. 2020, "
        "https://openreview.net/forum?id=r1xMH1BtvB; ALECTRA: an ALBERT discriminator).",
        "",
        "## Pretraining task",
        "",
        f"A small generator ({gen.model_type} masked LM, {gen.num_hidden_layers} layers x {gen.hidden_size}) "
        "fills masked positions with samples; the discriminator classifies every token as original or "
        f"replaced. Loss = generator cross-entropy + {config.disc_weight:g} x discriminator loss.",
        "",
        "## Usage",
        "",
        "```python",
        f"from transformers import {classifier}, {tokenizer}",
        "",
        f'tokenizer = {tokenizer}.from_pretrained("path/to/discriminator")',
        f'model = {classifier}.from_pretrained("path/to/discriminator", num_labels=2)',
        "```",
        "",
        "This folder holds the encoder only (no task head): every encoder weight loads and the "
        "classification head is new. The discriminator with its replaced-token-detection head is in "
        "`../rtd/` when a Hugging Face class holds it; the generator is in `../generator/`.",
        "",
        "## Training parameters",
        "",
        *_training_lines(config, run),
    ]
    if glue is not None:
        lines += ["", "## Downstream tasks", "", "#### GLUE Dev results", "", *_glue_lines(glue)]
    return "\n".join(lines) + "\n"


def _training_lines(config: ModelConfig, run: dict[str, Any]) -> list[str]:
    model = [
        f"- `discriminator: {config.discriminator_arch}, head {config.discriminator_head}`",
        f"- `generator: {config.generator_arch}, {config.generator_num_layers} layers x "
        f"{config.generator_hidden_size}`",
        f"- `embedding_tying: {config.embedding_tying}`",
        f"- `mask_prob: {config.mask_prob:g}`",
    ]
    cfg, state = run.get("config"), run.get("train_state")
    if not cfg:
        return [
            "The checkpoint holds no run configuration (it was not written by alectra's trainer).",
            *model,
        ]
    train, data = cfg["train"], cfg["data"]
    lines = [
        f"- `preset: {cfg['model']['preset']}`",
        f"- `batch_size: {train['global_batch_size']}`",
        f"- `training_steps: {train['steps']}`",
        f"- `warmup_steps: {train['warmup_steps']}`",
        f"- `learning_rate: {train['lr']:g}`",
        f"- `optimizer: {train['optimizer']}, weight decay {train['weight_decay']:g}, eps "
        f"{train['adam_eps']:g}, clip {train['clip_grad_norm']:g}`",
        f"- `lr_schedule: {train.get('lr_schedule', 'electra')}`",
        f"- `max_seq_length: {data['max_seq_length']}`",
        *model,
    ]
    if state:
        positions = state["consumed_samples"] * data["max_seq_length"]
        lines += [
            f"- `steps_done: {state['step']}`",
            f"- tokens seen: {positions:,} sequence positions ({state['consumed_samples']:,} sequences of "
            f"{data['max_seq_length']}, padding included)",
        ]
    return lines


def _glue_lines(report: dict[str, Any]) -> list[str]:
    columns = list(report["table"])
    cells = ["–" if report["table"][c] is None else f"{report['table'][c]:.1f}" for c in columns]
    params = report.get("params")
    return [
        "| Model | # Params | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
        f"| {report.get('model', '?')} | "
        + (f"{params / 1e6:.2g}M" if isinstance(params, int) else "?")
        + " | "
        + " | ".join(cells)
        + " |",
        "",
        f"Dev-set medians over {len(report['seeds'])} fine-tuning seed(s), x100 (CoLA: Matthews corr., STS: "
        "Spearman, MNLI: matched accuracy, accuracy elsewhere), from `python -m alectra.glue`.",
    ]


def _resolve_checkpoint(path: Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir with `latest`, or a tag dir."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if (path / "checkpoints").is_dir() and not (path / "latest").exists():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if not (path / tag).is_dir():
            raise FileNotFoundError(f"{path / 'latest'} names tag {tag!r}, but {path / tag} does not exist")
        return path, tag
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(
        f"{str(path)!r} is neither a DeepSpeed tag folder (*model_states.pt) nor a folder with "
        "a `latest` file; "
        "pass <run>/checkpoints or <run>/checkpoints/step_<N>"
    )


def _read_metadata(checkpoints_dir: Path) -> dict:
    path = checkpoints_dir / METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the trainer writes it with alectra.export.write_model_metadata at start"
        )
    metadata = json.loads(path.read_text())
    if metadata.get("format") == "alectra-model/1":
        raise ValueError(
            f"{path}: written by an alectra before discriminator heads were configurable (format "
            "alectra-model/1, a 1-logit linear RTD head); export it with that version (git history before "
            "ModelConfig.discriminator_head)"
        )
    if metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r} is not {METADATA_FORMAT!r}")
    return metadata


def _read_fp32_state_dict(checkpoints_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    import torch

    tag_dir = checkpoints_dir / tag
    # ZeRO writes [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt; stage 0 writes only model states.
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        ds_env.prepare()  # before DeepSpeed's import: its accelerator choice without the warning
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # ZeRO-1/2/3: the fp32 master weights live in the optimizer shards; DeepSpeed's own consolidation.
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)
    model_states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not model_states:
        raise FileNotFoundError(f"{tag_dir} holds no mp_rank_*_model_states.pt: not a DeepSpeed checkpoint")
    state = torch.load(model_states[0], map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


def _load_weights(
    model: ElectraPretrainingModel, state_dict: dict[str, torch.Tensor], *, source: Path
) -> None:
    """Load, accepting a tied parameter under any one of its names (they are one tensor, so loading one
    name loads all); anything else missing or unexpected is an error."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    loaded = set(state_dict)
    really_missing = [
        names[0]
        for names in names_by_tensor.values()
        if not loaded.intersection(names) and names[0] in missing
    ]
    if really_missing or unexpected:
        raise ValueError(
            f"{source} does not match alectra_model.json: missing {really_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def _copy_files(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dest / f.name)


def main(argv: list[str] | None = None) -> int:
    """`python -m alectra.export <checkpoint> <out>`: write <out>/discriminator, rtd and generator."""
    parser = argparse.ArgumentParser(prog="alectra-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or a checkpoints/step_<N> tag dir")
    parser.add_argument("out", help="output folder; receives discriminator/, rtd/ and generator/")
    parser.add_argument(
        "--glue-results",
        type=Path,
        help="glue_results.json of `python -m alectra.glue` on this model, for the model card's table",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, glue_results=args.glue_results)
    except (FileNotFoundError, ValueError) as err:
        print(f"alectra-export: error: {err}", file=sys.stderr)
        return 2
    written = [d for d in ("discriminator", "rtd", "generator") if (out / d).is_dir()]
    card = out / "discriminator" / "README.md"
    print(f"wrote {', '.join(str(out / d) for d in written)} (model card: {card})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
