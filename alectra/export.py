"""DeepSpeed checkpoint -> Hugging Face folders (discriminator, generator, tokenizer).

The engine calls `write_model_metadata` once at start, so a checkpoint folder is self-describing:

    <run>/checkpoints/alectra_model.json   ModelConfig, vocab size, special-token ids
    <run>/checkpoints/tokenizer/           the tokenizer files the run trained with
    <run>/checkpoints/latest               DeepSpeed's pointer to the newest tag
    <run>/checkpoints/step_<N>/            DeepSpeed tag (ZeRO-0/1/2/3 shards)

`python -m alectra.export <run dir | checkpoints dir | tag dir> <out dir>` (or `alectra-export`) rebuilds the
model, loads the fp32 weights (DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` for ZeRO shards,
the module state for ZeRO-0) and writes `<out>/discriminator/` (token classification, loadable by
`*ForSequenceClassification` with all encoder weights) and `<out>/generator/` (`*ForMaskedLM`), each with the
tokenizer files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from alectra.model import ElectraPretrainingModel
from alectra.presets import ModelConfig
from alectra.storage.atomic import write_dir_atomically, write_text_atomic
from alectra.training.checkpoint import verify_checkpoint

METADATA_NAME = "alectra_model.json"
METADATA_FORMAT = "alectra-model/1"
TOKENIZER_SUBDIR = "tokenizer"


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


def export_checkpoint(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export a DeepSpeed checkpoint (run dir, checkpoints dir with `latest`, or a tag dir) to HF folders."""
    checkpoints_dir, tag = _resolve_checkpoint(Path(checkpoint_path))
    verify_checkpoint(checkpoints_dir / tag)  # unfinished or damaged: CheckpointError (a ValueError, exit 2)
    metadata = _read_metadata(checkpoints_dir)
    model = ElectraPretrainingModel(
        ModelConfig(**metadata["model_config"]),
        vocab_size=metadata["vocab_size"],
        special_token_ids=metadata["special_token_ids"],
    )
    _load_weights(model, _read_fp32_state_dict(checkpoints_dir, tag), source=checkpoints_dir / tag)
    tokenizer_dir = checkpoints_dir / TOKENIZER_SUBDIR
    files = [p for p in sorted(tokenizer_dir.iterdir()) if p.is_file()] if tokenizer_dir.is_dir() else []
    model.save_pretrained_parts(out_dir, extra_files=files)
    return Path(out_dir)


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
    if metadata.get("format") != METADATA_FORMAT:
        raise ValueError(f"{path}: format {metadata.get('format')!r} is not {METADATA_FORMAT!r}")
    return metadata


def _read_fp32_state_dict(checkpoints_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    tag_dir = checkpoints_dir / tag
    # ZeRO writes [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt; stage 0 writes only model states.
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
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
    """`python -m alectra.export <checkpoint> <out>`: write <out>/discriminator and <out>/generator."""
    parser = argparse.ArgumentParser(prog="alectra-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or a checkpoints/step_<N> tag dir")
    parser.add_argument("out", help="output folder; receives discriminator/ and generator/")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"alectra-export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'discriminator'} and {out / 'generator'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
