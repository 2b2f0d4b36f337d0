"""`python -m alectra.glue` / `alectra-glue`: fine-tune a discriminator on GLUE and print the results table.

    python -m alectra.glue --model runs/small/export --tasks cola,sst2,mrpc,rte \
        --data-dir ../shared/data/glue --seeds 5 --output-dir runs/small/glue
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

from alectra.glue.finetune import (
    HEADS,
    LOSS_REDUCTIONS,
    FinetuneConfig,
    count_encoder_parameters,
    finetune_task,
)
from alectra.glue.report import build_report, to_markdown, write_report
from alectra.glue.tasks import load_hub_task, load_local_task, parse_task_list
from alectra.storage.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="alectra-glue", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        type=pathlib.Path,
        help="HF model folder, an export folder holding discriminator/, or a training checkpoint/run dir",
    )
    p.add_argument(
        "--tasks", default="cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte", help="comma-separated GLUE tasks"
    )
    p.add_argument(
        "--data-dir",
        type=pathlib.Path,
        help="GLUE TSV layout (<dir>/CoLA/train.tsv, ...); default: the nyu-mll/glue hub dataset",
    )
    p.add_argument(
        "--output-dir",
        type=pathlib.Path,
        default=pathlib.Path("glue_results"),
        help="where glue_results.md and glue_results.json go (default: ./glue_results)",
    )
    p.add_argument("--name", help="model name in the table (default: the --model folder name)")
    p.add_argument(
        "--seeds", type=int, default=1, help="fine-tuning runs per task; the table shows the median"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed; runs use seed, seed+1, ...")
    recipe = p.add_argument_group("recipe overrides (defaults: ELECTRA-Small's GLUE recipe)")
    defaults = FinetuneConfig()
    for field in dataclasses.fields(FinetuneConfig):
        if field.name in ("head", "double_unordered", "device", "loss_reduction"):
            continue
        default = getattr(defaults, field.name)
        kind = (
            int
            if field.name.startswith("max_") or field.name in ("batch_size", "eval_batch_size", "data_seed")
            else float
        )
        recipe.add_argument(
            "--" + field.name.replace("_", "-"), type=kind, default=default, help=f"default: {default}"
        )
    recipe.add_argument(
        "--head",
        choices=HEADS,
        default=defaults.head,
        help="electra: dropout + linear on [CLS] (reference); mean: the same on the mean over real tokens; "
        "auto: the architecture's own HF head",
    )
    recipe.add_argument(
        "--loss-reduction",
        choices=LOSS_REDUCTIONS,
        default=defaults.loss_reduction,
        help="sum: per-example losses summed over the batch before clipping (reference); mean: averaged",
    )
    recipe.add_argument(
        "--no-double-unordered",
        action="store_true",
        help="do not add swapped-order copies of MRPC/STS-B training pairs",
    )
    recipe.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N")
    return p.parse_args(argv)


def resolve_model_dir(model: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path:
    """The HF folder to fine-tune: `model`, its discriminator/, or a checkpoint exported into `scratch`."""
    if (model / "config.json").is_file():
        return model
    if (model / "discriminator" / "config.json").is_file():
        return model / "discriminator"
    if not model.is_dir():
        raise ValueError(
            f"--model {model}: no such folder (give an HF model folder, an export or a checkpoint)"
        )
    from alectra.export import export_checkpoint

    print(f"[glue] exporting checkpoint {model} to {scratch}", file=sys.stderr)
    export_checkpoint(model, scratch)
    if not (scratch / "discriminator" / "config.json").is_file():
        raise ValueError(f"--model {model}: exporting it gave no discriminator/config.json")
    return scratch / "discriminator"


def run(args: argparse.Namespace) -> dict:
    config = FinetuneConfig(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(FinetuneConfig)
            if f.name != "double_unordered"
        },
        double_unordered=not args.no_double_unordered,
    )
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    tasks = parse_task_list(args.tasks)
    # Load every task's data first, so a missing file fails in seconds, not after hours of fine-tuning.
    data = {t.name: load_local_task(t, args.data_dir) if args.data_dir else load_hub_task(t) for t in tasks}
    with tempfile.TemporaryDirectory(prefix="alectra-glue-") as scratch:
        model_dir = resolve_model_dir(args.model, pathlib.Path(scratch))
        tokenizer = load_tokenizer(model_dir)
        n_params = count_encoder_parameters(model_dir)
        start = time.perf_counter()
        runs = [
            finetune_task(model_dir, tokenizer, task, *data[task.name], seed=args.seed + i, config=config)
            for task in tasks
            for i in range(args.seeds)
        ]
    name = args.name or (
        args.model.name if args.model.name not in ("export", "discriminator") else str(args.model)
    )
    config_record = dataclasses.asdict(config) | {
        "data": str(args.data_dir or "hub:nyu-mll/glue"),
        "seconds": time.perf_counter() - start,
    }
    return build_report(
        model_name=name, model_path=str(args.model), n_params=n_params, runs=runs, config=config_record
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Loading an encoder out of a *ForTokenClassification export reports the dropped RTD head as
    # "UNEXPECTED" keys on every run: expected here, so only errors are shown.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"alectra-glue: error: {exc}", file=sys.stderr)
        return 2
    markdown = to_markdown(report)
    md, js = write_report(report, args.output_dir)
    print(markdown)
    print(f"[glue] wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
