"""The results table in the seed's format (ELECTRA paper, Table 8), as Markdown and JSON, and its parser.

Cells are medians over fine-tuning seeds of the dev score x 100: Matthews correlation for CoLA, Spearman
for STS-B, accuracy elsewhere (MNLI: matched), as in the ELECTRA paper; F1, Pearson and MNLI mismatched
are in the detail table and the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from alectra.glue.finetune import RunResult
from alectra.glue.tasks import TASKS
from alectra.storage.atomic import write_text_atomic

TABLE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
HEADLINE_METRIC = {"cola": "mcc", "stsb": "spearman"}  # accuracy for the others
MISSING = "–"


def headline_metric(task: str) -> str:
    return HEADLINE_METRIC.get(task, "accuracy")


def format_params(n: int) -> str:
    """13_548_800 -> "13.5M", 334_092_288 -> "334M", 96_000 -> "96K"."""
    if n >= 100e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def summarize(runs: list[RunResult]) -> dict[str, dict[str, float | list[float]]]:
    """{metric: {"median", "mean", "std", "min", "max", "values"}} over the seeds of one task."""
    summary = {}
    for key in runs[0].metrics:
        values = np.array([r.metrics[key] for r in runs])
        summary[key] = {
            "median": float(np.median(values)),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()),
            "max": float(values.max()),
            "values": values.tolist(),
        }
    return summary


def build_report(
    *, model_name: str, model_path: str, n_params: int, runs: list[RunResult], config: dict
) -> dict:
    """Everything the Markdown and JSON files hold, keyed by task; table cells are x100 medians."""
    tasks = {}
    for name in dict.fromkeys(r.task for r in runs):
        task_runs = [r for r in runs if r.task == name]
        tasks[name] = {
            "headline_metric": headline_metric(name),
            "summary": summarize(task_runs),
            "runs": [dataclasses.asdict(r) for r in task_runs],
        }
    row: dict[str, float | None] = {
        TASKS[t].column: 100 * tasks[t]["summary"][headline_metric(t)]["median"] if t in tasks else None
        for t in TABLE_TASKS
    }
    present = [v for v in row.values() if v is not None]
    row["Avg"] = float(np.mean(present)) if present else None
    return {
        "model": model_name,
        "model_path": model_path,
        "params": n_params,
        "table": row,
        "seeds": sorted({r.seed for r in runs}),
        "config": config,
        "tasks": tasks,
    }


def _cell(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def to_markdown(report: dict) -> str:
    columns = [TASKS[t].column for t in TABLE_TASKS] + ["Avg"]
    header = ["Model", "# Params", *columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| "
        + " | ".join(
            [report["model"], format_params(report["params"])] + [_cell(report["table"][c]) for c in columns]
        )
        + " |",
        "",
        f"Dev-set medians over {len(report['seeds'])} seed(s) {report['seeds']}, x100: CoLA Matthews "
        "corr., STS Spearman, MNLI matched accuracy, accuracy elsewhere; Avg over the tasks run.",
        "",
        "| Task | Metric | Median | Mean | Std | Min | Max | Seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, task in report["tasks"].items():
        for metric, s in task["summary"].items():
            stats = [_cell(100 * s[k]) for k in ("median", "mean", "std", "min", "max")]
            lines.append(
                f"| {TASKS[name].column} | {metric} | " + " | ".join(stats) + f" | {len(s['values'])} |"
            )
    return "\n".join(lines) + "\n"


def parse_results_table(markdown: str) -> list[dict[str, str | float | None]]:
    """Rows of the main table (the one starting "| Model |") as {column: value}; scores as floats."""
    lines = [ln.strip() for ln in markdown.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| Model |")), None)
    if start is None:
        raise ValueError("no results table (a line starting '| Model |') in the text")
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            raise ValueError(f"table row has {len(cells)} cells, header has {len(header)}: {line}")
        row: dict[str, str | float | None] = dict(zip(header[:2], cells[:2], strict=True))
        row.update(
            {h: None if c == MISSING else float(c) for h, c in zip(header[2:], cells[2:], strict=True)}
        )
        rows.append(row)
    return rows


def write_report(report: dict, output_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """`<output_dir>/glue_results.md` and `glue_results.json`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    md, js = output_dir / "glue_results.md", output_dir / "glue_results.json"
    write_text_atomic(md, to_markdown(report))
    write_text_atomic(js, json.dumps(report, indent=2) + "\n")
    return md, js
