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

`--arm tapt` (task-adaptive pretraining, Gururangan et al. 2020): instead of the demo corpus (Python
documentation), pretrain on the unlabeled sentences of the GLUE *train* files (CoLA, SST-2, MRPC, STS-B,
RTE: text columns only, never labels, never dev files), written as plain-text documents of 20 consecutive
sentences (one per line, blank-line separated) under `<work-dir>/tapt/corpus`, with a WordPiece vocabulary
trained on them (`python -m data_prep train-tokenizer`) and shards built with `python -m data_prep build
--sentence-split lines`. `--pretrain-args` carries the model overrides (e.g. a wider/deeper `tiny`).
`--per-task` fine-tunes each task into its own folder, so several calls (`--tasks rte` and
`--tasks cola,sst2,mrpc`) can share the cores; the table stage merges them.

`--models ...,rescaled` adds a control: the pretrained weights with the word, position and token-type
embedding tables multiplied by one factor so that their scale matches random init's. The network computes
the same function (the tables' sum is LayerNorm'ed; checked when the copy is made), but Adam's relative
step on the embeddings changes with their scale, and pretraining grows them (RESULTS.md: that alone cost
the pretrained models 10 points of SST-2). Pretrained vs rescaled separates the scale from the content.

    OMP_NUM_THREADS=1 python benchmarks/glue_pretraining_helps.py --arm tapt --work-dir /tmp/glue_tapt \
        --pretrain-steps 1400 --pretrain-minutes 22 --tasks cola,sst2,mrpc,rte --seeds 3 \
        --max-train-examples 2500 --per-task --pretrain-args "--model.overrides... --train.lr 1e-3 ..."

(the full `--pretrain-args` of the recorded run are in benchmarks/RESULTS.md (GLUE section)).
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
        help="which to fine-tune in this call (two calls can run side by side; a third prints the table); "
        "add `rescaled` for the pretrained weights with their embedding tables scaled to random init's",
    )
    p.add_argument("--glue-args", default="", help="extra alectra.glue flags, e.g. '--epochs 2'")
    p.add_argument(
        "--arm",
        choices=("demo", "tapt"),
        default="demo",
        help="pretraining text: demo = the built-in demo corpus (configs/demo.yaml); tapt = the unlabeled "
        "sentences of the GLUE train files (task-adaptive pretraining)",
    )
    p.add_argument("--tapt-vocab-size", type=int, default=8192, help="--arm tapt: WordPiece vocabulary size")
    p.add_argument("--tapt-doc-sentences", type=int, default=20, help="--arm tapt: sentences per document")
    p.add_argument(
        "--per-task",
        action="store_true",
        help="fine-tune each task into glue_<model>/<task> (parallel calls)",
    )
    return p.parse_args()


# --arm tapt: the text columns of the GLUE train files (header name, or position for header-less CoLA).
TAPT_SOURCES = {
    "CoLA": [3],
    "SST-2": ["sentence"],
    "MRPC": ["#1 String", "#2 String"],
    "STS-B": ["sentence1", "sentence2"],
    "RTE": ["sentence1", "sentence2"],
}


def tapt_sentences(glue_dir: pathlib.Path) -> dict[str, list[str]]:
    """Per task, the unlabeled train sentences in file order (label columns are never read)."""
    out = {}
    for task, columns in TAPT_SOURCES.items():
        lines = (glue_dir / task / "train.tsv").read_text(encoding="utf-8-sig").splitlines()
        if isinstance(columns[0], str):
            header, rows = lines[0].split("\t"), lines[1:]
            positions = [header.index(c) for c in columns]
        else:
            positions, rows = columns, lines
        sentences = []
        for row in rows:
            fields = row.split("\t")
            sentences += [" ".join(fields[i].split()) for i in positions if fields[i].strip()]
        out[task] = sentences
    return out


def build_tapt_data(args: argparse.Namespace, tapt: pathlib.Path) -> pathlib.Path:
    """Corpus -> WordPiece tokenizer -> shards under `tapt` (skipped if built); returns the dataset."""
    corpus, tokenizer, shards = tapt / "corpus", tapt / "tokenizer", tapt / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    corpus.mkdir(parents=True, exist_ok=True)
    stats = {}
    for task, sentences in tapt_sentences(args.glue_dir).items():
        seen, unique = set(), []
        for s in sentences:  # RTE/MRPC/STS-B repeat some sentences across pairs: keep the first
            if s not in seen:
                seen.add(s)
                unique.append(s)
        n = args.tapt_doc_sentences
        docs = ["\n".join(unique[i : i + n]) for i in range(0, len(unique), n)]
        (corpus / f"{task}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        words = sum(len(s.split()) for s in unique)
        stats[task] = {"sentences": len(unique), "documents": len(docs), "words": words}
    (tapt / "corpus_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"[bench] tapt corpus: {json.dumps(stats)}", file=sys.stderr)
    dp = [sys.executable, "-m", "data_prep"]
    for command in (
        [
            *dp,
            "train-tokenizer",
            "--input",
            str(corpus),
            "--vocab-size",
            str(args.tapt_vocab_size),
            "-o",
            str(tokenizer),
        ],
        [
            *dp,
            "build",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tokenizer),
            "--sentence-split",
            "lines",
            "--no-progress",
            "-o",
            str(shards),
        ],
    ):
        print("[bench] " + " ".join(command), file=sys.stderr)
        subprocess.run(command, cwd=ROOT, check=True)
    return shards


def pretrain(args: argparse.Namespace, run_dir: pathlib.Path, data: pathlib.Path | None = None) -> float:
    """Run the engine for `--pretrain-steps` or until `--pretrain-minutes`; returns the wall seconds."""
    command = [
        sys.executable,
        str(ROOT / "alectra" / "pretrain.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        *(["--data.paths", f"[{data}]"] if data is not None else []),
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


def save_beside(model, source: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """`model` saved to `out` (atomically) with `source`'s tokenizer and other non-weight files."""
    from alectra.storage.atomic import write_dir_atomically

    extra = [
        f
        for f in source.iterdir()
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "config.json"
    ]

    def write(tmp: pathlib.Path) -> None:
        model.save_pretrained(tmp)
        for f in extra:
            shutil.copy2(f, tmp / f.name)

    write_dir_atomically(out, write)
    return out


def random_copy(discriminator: pathlib.Path, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Same config and tokenizer files, freshly initialised weights (the model class's own initialiser)."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_config(AutoConfig.from_pretrained(discriminator))
    # A private temporary folder per call: side-by-side calls (`--models random-init` and `--models
    # pretrained`) both build it, the same seed gives the same weights, and neither trips over the other.
    return save_beside(model, discriminator, out)


EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def embedding_scale(model_dir: pathlib.Path) -> float:
    """Mean L2 norm of the word-embedding table's rows."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(model_dir)
    return model.get_input_embeddings().weight.norm(dim=-1).mean().item()


def rescaled_copy(discriminator: pathlib.Path, reference: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """`discriminator` with its word, position and token-type embedding tables multiplied by one factor, so
    that its word table's mean row norm equals `reference`'s: the control that separates what pretraining
    put into the weights from the scale it gave the embeddings.

    BERT, ELECTRA and ALBERT sum the three tables and LayerNorm the sum, so the network computes the same
    function (checked below on random token ids); only the fine-tune changes: Adam moves a weight by about
    the learning rate whatever its size, so embeddings c times larger move c times less relative to
    themselves (RESULTS.md, GLUE section: that alone cost the pretrained models 10 points of SST-2)."""
    import torch
    from transformers import AutoModelForTokenClassification

    if (out / "config.json").is_file():
        return out
    model = AutoModelForTokenClassification.from_pretrained(discriminator).eval()
    embeddings = model.base_model.embeddings
    tables = [getattr(embeddings, name, None) for name in EMBEDDING_TABLES]
    if any(t is None for t in tables) or not hasattr(embeddings, "LayerNorm"):
        raise SystemExit(
            f"{discriminator}: rescaling needs word, position and token-type embeddings followed by a "
            f"LayerNorm (BERT, ELECTRA, ALBERT); {type(embeddings).__name__} has another layout"
        )
    factor = embedding_scale(reference) / tables[0].weight.norm(dim=-1).mean().item()  # no second load
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (4, 16), generator=generator)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for table in tables:
            table.weight.mul_(factor)
        after = model(input_ids=ids).logits
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-4 * before.abs().max().item()):
        raise SystemExit(
            f"{discriminator}: scaling the embedding tables by {factor:.4g} changed the outputs "
            f"(max difference {(before - after).abs().max().item():.3g}): not function-preserving here"
        )
    return save_beside(model, discriminator, out)


def finetune(model_dir: pathlib.Path, name: str, args: argparse.Namespace, out: pathlib.Path) -> dict:
    from alectra.glue import __main__ as glue_cli
    from alectra.glue.report import write_report

    if args.per_task:
        reports = [
            finetune(
                model_dir, name, argparse.Namespace(**{**vars(args), "tasks": t, "per_task": False}), out / t
            )
            for t in args.tasks.split(",")
        ]
        merged = dict(reports[0])
        merged["tasks"] = {k: v for r in reports for k, v in r["tasks"].items()}
        cells = {
            k: next((r["table"][k] for r in reports if r["table"].get(k) is not None), None)
            for k in reports[0]["table"]
            if k != "Avg"
        }
        scores = [v for v in cells.values() if v is not None]
        merged["table"] = {**cells, "Avg": sum(scores) / len(scores) if scores else None}
        return merged
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


def last_eval(run_dir: pathlib.Path, metric: str) -> float | None:
    """The last held-out value of `metric` the engine's CSV monitor wrote (`logs/*/eval_<metric>.csv`)."""
    files = sorted(run_dir.glob(f"logs/*/eval_{metric}.csv"))
    rows = files[-1].read_text().split() if files else []
    return float(rows[-1].split(",")[1]) if len(rows) > 1 else None


def discriminator_check(run_dir: pathlib.Path) -> str:
    """Did the discriminator learn anything? Its held-out accuracy against calling every token "original"
    (1 - replaced fraction) and its loss against the entropy of the labels: a discriminator sitting at
    both base rates has learned nothing a fine-tune could use (see RESULTS.md, GLUE section)."""
    import math

    accuracy, loss, replaced = (
        last_eval(run_dir, m) for m in ("disc_accuracy", "disc_loss", "replaced_fraction")
    )
    if None in (accuracy, loss, replaced) or not 0 < replaced < 1:
        return f"discriminator check: no held-out metrics under {run_dir}/logs"
    entropy = -(replaced * math.log(replaced) + (1 - replaced) * math.log(1 - replaced))
    learned = accuracy - (1 - replaced) > 0.005 and loss < 0.98 * entropy
    verdict = "above the base rate" if learned else 'AT THE BASE RATE: no better than always-"original"'
    return (
        f"discriminator check (held-out, end of pretraining): accuracy {100 * accuracy:.2f} % vs "
        f'{100 * (1 - replaced):.2f} % for always-"original"; loss {loss:.4f} vs label entropy '
        f"{entropy:.4f} -> {verdict}"
    )


def token_spread(model_dir: pathlib.Path, glue_dir: pathlib.Path, n: int = 256) -> float:
    """Mean over hidden units of the standard deviation, across the first `n` SST-2 dev sentences, of the
    final hidden state at token position 3: ~0 means the encoder maps every input to the same vector
    (representation collapse), which no short fine-tune undoes."""
    import csv

    import torch
    from transformers import AutoModel, AutoTokenizer

    with open(glue_dir / "SST-2" / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    tokenizer, encoder = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(
        [r["sentence"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state  # (n, T, H)
    return hidden[:, 3].std(dim=0).mean().item()


def comparison_table(random_report: dict, pretrained_report: dict, label: str = "Pretrained") -> str:
    """Per task and metric: median [min, max] over seeds for both models, difference and ratio."""
    lines = [
        f"| Task | Metric | Random init | {label} | Δ (points) | {label} / random |",
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
        data = None
        if args.arm == "tapt":
            start = time.perf_counter()
            data = build_tapt_data(args, work / "tapt")
            timings["tapt_data_s"] = time.perf_counter() - start
        timings["pretrain_s"] = pretrain(args, source, data)
        (work / "timings_pretrain.json").write_text(json.dumps(timings, indent=2) + "\n")
        print("[bench] " + discriminator_check(source), file=sys.stderr)
    discriminator = export_discriminator(source, work / "export")
    models = {"random-init": random_copy(discriminator, work / "random_init"), "pretrained": discriminator}
    if "rescaled" in selected or (work / "rescaled" / "config.json").is_file():
        models["rescaled"] = rescaled_copy(discriminator, models["random-init"], work / "rescaled")
    reports = {}
    for name, model_dir in models.items():
        if name not in selected:
            continue
        results = [work / f"glue_{name}" / "glue_results.json"]
        if args.per_task:
            results = [work / f"glue_{name}" / t / "glue_results.json" for t in args.tasks.split(",")]
        start, done = time.perf_counter(), all(r.is_file() for r in results)
        reports[name] = finetune(model_dir, name, args, work / f"glue_{name}")
        if not done:
            timings[f"finetune_{name}_s"] = time.perf_counter() - start
    (
        work
        / f"timings_{'_'.join(selected)}{'_' + args.tasks.replace(',', '_') if args.per_task else ''}.json"
    ).write_text(json.dumps(timings, indent=2) + "\n")
    if "random-init" not in reports or "pretrained" not in reports:
        return 0
    from alectra.glue.report import to_markdown

    tables = [to_markdown(reports[n]).split("\n\n")[0] for n in reports]
    header, rule = tables[0].splitlines()[:2]
    text = "\n".join([header, rule, *[t.splitlines()[2] for t in tables]]) + "\n\n"
    text += comparison_table(reports["random-init"], reports["pretrained"])
    if "rescaled" in reports:
        text += "\n" + comparison_table(reports["random-init"], reports["rescaled"], "Rescaled")
    if (source / "logs").is_dir():
        text += "\n" + discriminator_check(source) + "\n"
    spread = {n: token_spread(models[n], args.glue_dir) for n in reports}
    text += (
        "token representation spread (std across 256 SST-2 dev sentences of the final hidden state at "
        "position 3, mean over units): " + ", ".join(f"{n} {v:.3f}" for n, v in spread.items()) + "\n"
    )
    scale = {n: embedding_scale(models[n]) for n in reports}
    text += (
        "word-embedding scale (mean row norm; Adam's relative step on the embeddings goes as its inverse): "
        + ", ".join(f"{n} {v:.3f}" for n, v in scale.items())
        + "\n"
    )
    rounded = {k: round(v) for k, v in timings.items()}
    text += f"\nseeds {reports['pretrained']['seeds']}; timings (s): {json.dumps(rounded)}\n"
    (work / "comparison.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
