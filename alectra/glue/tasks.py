"""GLUE task definitions and loaders (local TSV files in the GLUE layout, or the `datasets` hub copy).

Column choices, label lists and the STS-B target scaling follow google-research/electra
`finetune/classification/classification_tasks.py`; the TSV files are read with quoting off, as the
reference (`csv.reader(..., quotechar=None)`) and the official GLUE loaders do, because several files hold
unbalanced double quotes that are part of the text.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import sys
from collections.abc import Callable, Sequence

csv.field_size_limit(sys.maxsize)  # a few GLUE rows (MNLI parses) exceed csv's 128 KiB default


class GlueDataError(ValueError):
    """A GLUE data file is missing or malformed; the message names the file (and line) to fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlueExample:
    """One GLUE example."""

    text_a: str
    """First sentence (or the only one)."""
    text_b: str | None
    """Second sentence of a pair task, None for single-sentence tasks."""
    label: int | float
    """Class index into `GlueTask.labels`, or the regression target for STS-B."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GlueTask:
    """How one GLUE task is stored, labelled and scored."""

    name: str
    """Command-line key, e.g. "sst2"."""
    column: str
    """Column header in the results table (the seed's naming: "SST", "STS", ...)."""
    folder: str
    """Folder name in the GLUE TSV layout, e.g. "SST-2"."""
    text_a: str | int
    """Column holding the first sentence: a header name, or an index for header-less files (CoLA)."""
    text_b: str | int | None
    """Column holding the second sentence, None for single-sentence tasks."""
    label: str | int
    """Column holding the gold label (or the STS-B score)."""
    labels: tuple[str, ...] | None
    """Label strings in class-index order (ELECTRA's label lists), None for regression (STS-B)."""
    has_header: bool = True
    """False only for CoLA, whose train/dev files have no header line."""
    dev_splits: tuple[str, ...] = ("dev",)
    """Evaluation files (without .tsv); MNLI has matched and mismatched dev sets."""
    hf_config: str = ""
    """Config name in the `nyu-mll/glue` hub dataset."""
    hf_fields: tuple[str, str | None] = ("sentence", None)
    """Text field names in the hub dataset."""
    hf_dev_splits: tuple[str, ...] = ("validation",)
    """Hub split names matching `dev_splits`, in the same order."""
    double_unordered: bool = False
    """Train on both sentence orders (ELECTRA's `double_unordered` for MRPC and STS-B)."""
    default_epochs: float = 3.0
    """ELECTRA's fine-tuning epochs: 3, but 10 for the small RTE and STS-B training sets."""

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_outputs(self) -> int:
        return 1 if self.labels is None else len(self.labels)


# STS-B scores lie in [0, 5]; ELECTRA trains on score / 5 ("simple normalization of the label").
STSB_MAX_SCORE = 5.0

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            name="cola",
            column="CoLA",
            folder="CoLA",
            text_a=3,
            text_b=None,
            label=1,
            labels=("0", "1"),
            has_header=False,
            hf_config="cola",
        ),
        GlueTask(
            name="sst2",
            column="SST",
            folder="SST-2",
            text_a="sentence",
            text_b=None,
            label="label",
            labels=("0", "1"),
            hf_config="sst2",
        ),
        GlueTask(
            name="mrpc",
            column="MRPC",
            folder="MRPC",
            text_a="#1 String",
            text_b="#2 String",
            label="Quality",
            labels=("0", "1"),
            hf_config="mrpc",
            hf_fields=("sentence1", "sentence2"),
            double_unordered=True,
        ),
        GlueTask(
            name="stsb",
            column="STS",
            folder="STS-B",
            text_a="sentence1",
            text_b="sentence2",
            label="score",
            labels=None,
            hf_config="stsb",
            hf_fields=("sentence1", "sentence2"),
            double_unordered=True,
            default_epochs=10.0,
        ),
        GlueTask(
            name="qqp",
            column="QQP",
            folder="QQP",
            text_a="question1",
            text_b="question2",
            label="is_duplicate",
            labels=("0", "1"),
            hf_config="qqp",
            hf_fields=("question1", "question2"),
        ),
        GlueTask(
            name="mnli",
            column="MNLI",
            folder="MNLI",
            text_a="sentence1",
            text_b="sentence2",
            label="gold_label",
            labels=("contradiction", "entailment", "neutral"),
            dev_splits=("dev_matched", "dev_mismatched"),
            hf_config="mnli",
            hf_fields=("premise", "hypothesis"),
            hf_dev_splits=("validation_matched", "validation_mismatched"),
        ),
        GlueTask(
            name="qnli",
            column="QNLI",
            folder="QNLI",
            text_a="question",
            text_b="sentence",
            label="label",
            labels=("entailment", "not_entailment"),
            hf_config="qnli",
            hf_fields=("question", "sentence"),
        ),
        GlueTask(
            name="rte",
            column="RTE",
            folder="RTE",
            text_a="sentence1",
            text_b="sentence2",
            label="label",
            labels=("entailment", "not_entailment"),
            hf_config="rte",
            hf_fields=("sentence1", "sentence2"),
            default_epochs=10.0,
        ),
    )
}


def parse_task_list(spec: str) -> list[GlueTask]:
    """ "cola,sst2" -> tasks in the given order; unknown names raise one line listing the valid ones."""
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown GLUE task(s) {unknown or spec!r}: choose from {','.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]


def _column_index(task: GlueTask, column: str | int, header: list[str] | None, path: pathlib.Path) -> int:
    if isinstance(column, int):
        return column
    assert header is not None
    if column not in header:
        raise GlueDataError(
            f"{path}: header has no column {column!r} (found {header}); is this the {task.folder} file?"
        )
    return header.index(column)


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    if task.labels is None:
        try:
            score = float(raw)
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= STSB_MAX_SCORE:
            raise GlueDataError(f"{where}: score {raw!r} is not a number in [0, {STSB_MAX_SCORE:g}]")
        return score
    if raw not in task.labels:
        raise GlueDataError(f"{where}: label {raw!r} is not one of {list(task.labels)}")
    return task.labels.index(raw)


def read_glue_tsv(task: GlueTask, path: pathlib.Path) -> list[GlueExample]:
    """Reads one GLUE TSV file; every row must have the header's field count and a valid label."""
    if not path.is_file():
        raise GlueDataError(
            f"GLUE file not found: {path} (expected the GLUE TSV layout <data-dir>/{task.folder}/)"
        )
    # utf-8-sig drops the byte-order mark that starts MRPC's header; newline="" lets csv handle line ends.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows.pop(0) if task.has_header and rows else None
    if not rows:
        raise GlueDataError(f"{path}: no examples in the file")
    width = len(header) if header is not None else 4  # CoLA: source, label, original label, sentence
    cols = [
        _column_index(task, c, header, path) for c in (task.text_a, task.text_b, task.label) if c is not None
    ]
    examples = []
    first_line = 2 if header is not None else 1
    for line_no, row in enumerate(rows, start=first_line):
        where = f"{path} line {line_no}"
        if len(row) != width:
            raise GlueDataError(
                f"{where}: expected {width} tab-separated fields, found {len(row)} (truncated or edited?)"
            )
        text_a = row[cols[0]]
        text_b = row[cols[1]] if task.text_b is not None else None
        examples.append(
            GlueExample(text_a=text_a, text_b=text_b, label=_parse_label(task, row[cols[-1]], where))
        )
    return examples


def load_local_task(
    task: GlueTask, data_dir: pathlib.Path
) -> tuple[list[GlueExample], dict[str, list[GlueExample]]]:
    """(train examples, {dev split: examples}) from `<data_dir>/<folder>/{train,dev*}.tsv`."""
    folder = data_dir / task.folder
    if not folder.is_dir():
        raise GlueDataError(f"GLUE task folder not found: {folder} (needed for --tasks {task.name})")
    train = read_glue_tsv(task, folder / "train.tsv")
    dev = {split: read_glue_tsv(task, folder / f"{split}.tsv") for split in task.dev_splits}
    return train, dev


def examples_from_hf_rows(
    task: GlueTask, rows: Sequence[dict], label_names: Sequence[str] | None
) -> list[GlueExample]:
    """Hub rows -> examples, mapping the hub's class ids to ELECTRA's label order through the label names."""
    field_a, field_b = task.hf_fields
    examples = []
    for row in rows:
        if task.labels is None:
            label: int | float = float(row["label"])
        else:
            # The hub's binary tasks name their classes (e.g. "not_equivalent"); ids 0/1 already equal the
            # TSV labels "0"/"1". NLI tasks use named classes in another order than ELECTRA's list.
            hub_id = int(row["label"])
            name = str(hub_id) if task.labels == ("0", "1") else label_names[hub_id]
            label = task.labels.index(name)
        examples.append(
            GlueExample(text_a=row[field_a], text_b=row[field_b] if field_b else None, label=label)
        )
    return examples


def load_hub_task(
    task: GlueTask, load_dataset: Callable | None = None
) -> tuple[list[GlueExample], dict[str, list[GlueExample]]]:
    """(train, {dev split: examples}) from the `nyu-mll/glue` hub dataset (needs network)."""
    if load_dataset is None:
        from datasets import load_dataset
    try:
        ds = load_dataset("nyu-mll/glue", task.hf_config)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure gets the same advice
        raise GlueDataError(
            f"could not load GLUE task {task.name} from the hub (nyu-mll/glue: {type(exc).__name__}); "
            "offline, pass --data-dir with the GLUE TSV layout (<dir>/CoLA/train.tsv, ...)"
        ) from exc
    label_feature = ds["train"].features["label"]
    names = getattr(label_feature, "names", None)
    train = examples_from_hf_rows(task, ds["train"], names)
    dev = {
        split: examples_from_hf_rows(task, ds[hf_split], names)
        for split, hf_split in zip(task.dev_splits, task.hf_dev_splits, strict=True)
    }
    return train, dev
