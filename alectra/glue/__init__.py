"""GLUE fine-tuning of exported discriminators and the results table (`python -m alectra.glue`)."""

from alectra.glue.finetune import FinetuneConfig, RunResult, finetune_task, layer_depths, parameter_groups
from alectra.glue.report import build_report, parse_results_table, to_markdown
from alectra.glue.tasks import TASKS, GlueDataError, GlueExample, GlueTask, load_local_task, parse_task_list

__all__ = [
    "TASKS",
    "FinetuneConfig",
    "GlueDataError",
    "GlueExample",
    "GlueTask",
    "RunResult",
    "build_report",
    "finetune_task",
    "layer_depths",
    "load_local_task",
    "parameter_groups",
    "parse_results_table",
    "parse_task_list",
    "to_markdown",
]
