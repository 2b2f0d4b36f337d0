"""Does pretraining help? GLUE dev scores of a discriminator pretrained for a fixed budget on the demo
corpus vs the same architecture randomly initialised, both fine-tuned with the same recipe, data and seeds.

    OMP_NUM_THREADS=2 python benchmarks/glue_pretraining_helps.py --pretrain-steps 3000 \
        --pretrain-minutes 30 --tasks cola,sst2,mrpc,rte --seeds 3 --max-train-examples 4000 \
        --work-dir runs/glue_bench

Stages (each skipped when its output exists, so a rerun resumes): (1) pretrain with the engine
(`python alectra/pretrain.py --config configs/demo.yaml`, preset `--preset`), stopped by SIGTERM after
`--pretrain-minutes` if it has not finished (the engine saves a checkpoint and exits 75); or take
`--pretrained` (a run dir, checkpoint or export); (2) export the discriminator with `alectra.export`;
(3) save a randomly initialised copy of the same architecture and tokenizer; (4) fine-tune both with
`alectra.glue` on the GLUE TSV files in `--glue-dir` (default ../shared/data/glue from the project root;
the script explains and exits 0 when that folder is absent); (5) print the side-by-side table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_GLUE = ROOT.parent / "shared" / "data" / "glue"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=pathlib.Path, default=ROOT / "runs" / "glue_bench")
    p.add_argument("--glue-dir", type=pathlib.Path, default=DEFAULT_GLUE)
    p.add_argument("--pretrained", type=pathlib.Path, help="use this run dir / checkpoint / export instead")
    p.add_argument("--preset", default="tiny", help="model preset to pretrain (tiny, alectra-small, ...)")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="optimizer steps of pretraining")
    p.add_argument(
        "--pretrain-minutes", type=float, default=30.0, help="wall-clock cap (SIGTERM -> checkpoint)"
    )
    p.add_argument("--pretrain-args", default="", help="extra engine overrides, e.g. '--train.lr 2e-3'")
    p.add_argument("--tasks", default="cola,sst2,mrpc,rte")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-train-examples", type=int, default=4000)
    p.add_argument(
        "--models",
        default="random-init,pretrained",
        help="which to fine-tune in this call (two calls can run side by side; a third prints the table)",
    )
    p.add_argument("--glue-args", default="", help="extra alectra.glue flags, e.g. '--epochs 2'")
    return p.parse_args()


def pretrain(args: argparse.Namespace, run_dir: pathlib.Path) -> float:
    """Run the engine for `--pretrain-steps` or until `--pretrain-minutes`; returns the wall seconds."""
    command = [
        sys.executable,
        str(ROOT / "alectra" / "pretrain.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--output_dir",
        str(run_dir),
        "--model.preset",
        args.preset,
        "--train.steps",
        str(args.pretrain_steps),
        *args.pretrain_args.split(),
    ]
    print("[bench] " + " ".join(command), file=sys.stderr)
    start = time.perf_counter()
    with open(run_dir.parent / "pretrain.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.pretrain_minutes * 60)
        except subprocess.TimeoutExpired:
            print(
                "[bench] pretraining budget reached: SIGTERM (the engine checkpoints and exits 75)",
                file=sys.stderr,
            )
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    if proc.returncode not in (0, 75):
        raise SystemExit(
            f"pretraining failed with exit code {proc.returncode}; see {run_dir.parent / 'pretrain.log'}"
        )
    return time.perf_counter() - start


def export_discriminator(source: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The HF discriminator folder of a run dir / checkpoint / export."""
    for candidate in (source, source / "discriminator", source / "export" / "discriminator"):
        if (candidate / "config.json").is_file() and not (source / "checkpoints").is_dir():
            return candidate
    from alectra.export import export_checkpoint

    if not (out / "discriminator" / "config.json").is_file():
        export_checkpoint(source, out)
    return out / "discriminator"


def random_copy(discriminator: pathlib.Path, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Same config and tokenizer files, freshly initialised weights (the model class's own initialiser)."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_config(AutoConfig.from_pretrained(discriminator))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in discriminator.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def finetune(model_dir: pathlib.Path, name: str, args: argparse.Namespace, out: pathlib.Path) -> dict:
    from alectra.glue import __main__ as glue_cli
    from alectra.glue.report import write_report

    if (out / "glue_results.json").is_file():
        return json.loads((out / "glue_results.json").read_text())
    argv = [
        "--model",
        str(model_dir),
        "--name",
        name,
        "--tasks",
        args.tasks,
        "--data-dir",
        str(args.glue_dir),
        "--seeds",
        str(args.seeds),
        "--max-train-examples",
        str(args.max_train_examples),
        "--device",
        "cpu",
        "--output-dir",
        str(out),
        *args.glue_args.split(),
    ]
    report = glue_cli.run(glue_cli.parse_args(argv))
    write_report(report, out)
    return report


def comparison_table(random_report: dict, pretrained_report: dict) -> str:
    """Per task and metric: median [min, max] over seeds for both models, difference and ratio."""
    lines = [
        "| Task | Metric | Random init | Pretrained | Δ (points) | Pretrained / random |",
        "|---|---|---|---|---|---|",
    ]
    for task, entry in pretrained_report["tasks"].items():
        for metric, ours in entry["summary"].items():
            base = random_report["tasks"][task]["summary"][metric]

            def cell(s: dict) -> str:
                return f"{100 * s['median']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"

            ratio = f"{ours['median'] / base['median']:.2f}" if abs(base["median"]) > 1e-9 else "n/a"
            delta = 100 * (ours["median"] - base["median"])
            lines.append(f"| {task} | {metric} | {cell(base)} | {cell(ours)} | {delta:+.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    if not (args.glue_dir / "CoLA" / "train.tsv").is_file():
        print(f"[bench] skipped: no GLUE TSV files at {args.glue_dir} (pass --glue-dir)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for path in sorted(work.glob("timings*.json")):
        timings |= json.loads(path.read_text())
    selected = args.models.split(",")
    source = args.pretrained or work / "pretrain"
    if args.pretrained is None and not (source / "checkpoints" / "latest").is_file():
        timings["pretrain_s"] = pretrain(args, source)
    discriminator = export_discriminator(source, work / "export")
    models = {"random-init": random_copy(discriminator, work / "random_init"), "pretrained": discriminator}
    reports = {}
    for name, model_dir in models.items():
        if name not in selected:
            continue
        start, done = time.perf_counter(), (work / f"glue_{name}" / "glue_results.json").is_file()
        reports[name] = finetune(model_dir, name, args, work / f"glue_{name}")
        if not done:
            timings[f"finetune_{name}_s"] = time.perf_counter() - start
    (work / f"timings_{'_'.join(selected)}.json").write_text(json.dumps(timings, indent=2) + "\n")
    if len(reports) < 2:
        return 0
    from alectra.glue.report import to_markdown

    tables = [to_markdown(reports[n]).split("\n\n")[0] for n in models]
    header, rule = tables[0].splitlines()[:2]
    text = "\n".join([header, rule, *[t.splitlines()[2] for t in tables]]) + "\n\n"
    text += comparison_table(reports["random-init"], reports["pretrained"])
    rounded = {k: round(v) for k, v in timings.items()}
    text += f"\nseeds {reports['pretrained']['seeds']}; timings (s): {json.dumps(rounded)}\n"
    (work / "comparison.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
