"""Fine-tune one encoder on one GLUE task with google-research/electra's recipe, then score the dev set(s).

Recipe (ELECTRA `configure_finetuning.py`, `model/optimization.py`, `run_finetuning.py`, paper Table 7, small
model): Adam without bias correction (beta 0.9/0.999, eps 1e-6), lr 3e-4 decayed linearly to 0 and multiplied
by a linear warmup over the first 10% of steps, layer-wise LR decay 0.8, weight decay 0 (LayerNorm and biases
excluded when set), the loss summed over the batch, then global-norm clipping at 1.0, batch 32, 3 epochs (10
for RTE and STS-B), max length 128, MRPC and STS-B trained on both sentence orders, and the head
"dropout(0.1) + dense" on the final [CLS] vector (ELECTRA's `get_pooled_output()` is `sequence_output[:, 0]`,
with no tanh pooler). The paper's lr 3e-4 and weight decay 0 differ from the code's defaults (1e-4, 0.01):
docs/glue.md.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from alectra.glue import metrics
from alectra.glue.tasks import STSB_MAX_SCORE, GlueExample, GlueTask
from alectra.optim import AdamWeightDecay, lr_multiplier, uses_weight_decay

HEADS = ("electra", "mean", "auto")
LOSS_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tuning hyper-parameters; defaults are ELECTRA-Small's GLUE recipe."""

    learning_rate: float = 3e-4
    """Peak learning rate of the task head (ELECTRA-Small: 3e-4; Base 1e-4; Large 5e-5)."""
    layerwise_lr_decay: float = 0.8
    """Depth d of L+2 gets lr * decay^(L+2-d): embeddings d=0, layer i d=i+1, head d=L+2. 1.0 turns it off."""
    weight_decay: float = 0.0
    """Decoupled weight decay (ELECTRA's AdamWeightDecayOptimizer); never applied to LayerNorm or biases."""
    batch_size: int = 32
    """Training examples per optimizer step."""
    eval_batch_size: int = 128
    """Examples per forward pass when scoring (does not change results)."""
    epochs: float | None = None
    """Training epochs for every task; None = the task's ELECTRA default (3, or 10 for RTE and STS-B)."""
    warmup_proportion: float = 0.1
    """Fraction of the optimizer steps over which the learning rate ramps up linearly from 0."""
    max_seq_length: int = 128
    """Tokens per example after [CLS]/[SEP]; pairs are truncated longest-first as in ELECTRA."""
    adam_epsilon: float = 1e-6
    """Adam epsilon (ELECTRA uses 1e-6, not torch's 1e-8)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (ELECTRA `create_optimizer`); 0 disables clipping."""
    loss_reduction: str = "sum"
    """"sum": the batch's per-example losses summed, as the reference (`run_finetuning.py`,
    `self.loss = tf.reduce_sum(...)`), so the clip at max_grad_norm acts on batch_size times the mean's
    gradient and bounds nearly every step; "mean": torch's usual average (the GLUE runs recorded in
    benchmarks/RESULTS.md before this option used it)."""
    dropout: float | None = None
    """Dropout inside the encoder and before the head; None keeps the model config's hidden_dropout_prob."""
    head: str = "electra"
    """"electra": dropout + linear on the [CLS] vector (the reference); "mean": the same on the mean of the
    final hidden states over the real tokens; "auto": the architecture's own
    AutoModelForSequenceClassification head (BERT/ALBERT: tanh pooler; ELECTRA: dense+gelu)."""
    double_unordered: bool = True
    """Train MRPC and STS-B on both sentence orders (ELECTRA's `double_unordered`)."""
    max_train_examples: int | None = None
    """Train on a random subset of this many examples (fixed by `data_seed`, the same for every run)."""
    max_eval_examples: int | None = None
    """Score on a random subset of each dev set (quick checks only: results are then not GLUE dev scores)."""
    max_steps: int | None = None
    """Cap on optimizer steps; the LR schedule is laid out over the capped number."""
    data_seed: int = 0
    """Seed of the subsets chosen by max_train_examples / max_eval_examples."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""

    def __post_init__(self) -> None:
        positive = {
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "adam_epsilon": self.adam_epsilon,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("epochs", "max_train_examples", "max_eval_examples", "max_steps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or unset), got {value}")
        if not 0 < self.layerwise_lr_decay <= 1:
            raise ValueError(f"layerwise_lr_decay must be in (0, 1], got {self.layerwise_lr_decay}")
        if not 0 <= self.warmup_proportion <= 1:
            raise ValueError(f"warmup_proportion must be in [0, 1], got {self.warmup_proportion}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(
                f"weight_decay and max_grad_norm must be >= 0, got {self.weight_decay}, {self.max_grad_norm}"
            )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")

    def epochs_for(self, task: GlueTask) -> float:
        return self.epochs if self.epochs is not None else task.default_epochs


@dataclasses.dataclass(kw_only=True)
class RunResult:
    """Scores of one fine-tuning run (one task, one seed)."""

    task: str
    """Task key, e.g. "rte"."""
    seed: int
    """Seed of the head initialisation, dropout and data order."""
    metrics: dict[str, float]
    """Dev metrics as fractions, e.g. {"accuracy": 0.71, "f1": 0.80}; MNLI adds "accuracy_mm"."""
    train_examples: int
    """Training inputs seen per epoch (after subsampling and sentence-order doubling)."""
    steps: int
    """Optimizer steps taken."""
    seconds: float
    """Wall time of training plus evaluation."""


class LinearHeadClassifier(nn.Module):
    """ELECTRA's fine-tuning head: dropout + dense on the encoder's final [CLS] vector (pooling="cls"), or
    on the mean of the final hidden states over the real tokens (pooling="mean")."""

    def __init__(self, encoder: nn.Module, num_outputs: int, dropout: float, pooling: str = "cls") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_outputs)
        # tf.layers.dense's default kernel initializer is Glorot uniform, with zero bias.
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(**inputs).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, H)
        else:
            real = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1)  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, K)


class SequenceClassifier(nn.Module):
    """An AutoModelForSequenceClassification seen through the same `forward -> logits` interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def base_model(self) -> nn.Module:
        return self.model.base_model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits  # (B, K)


def _hf_config(model_dir: pathlib.Path, config: FinetuneConfig):
    """The folder's config.json, with the hidden dropout overridden when --dropout is given."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    if config.dropout is not None:
        hf_config.hidden_dropout_prob = config.dropout
    return hf_config


def build_classifier(model_dir: pathlib.Path, num_outputs: int, config: FinetuneConfig) -> nn.Module:
    """Pretrained encoder from `model_dir` (any HF encoder folder) + a freshly initialised task head.

    The caller seeds torch first: the head initialisation is part of what a fine-tuning seed varies.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    hf_config = _hf_config(model_dir, config)
    if config.head in ("electra", "mean"):
        # ELECTRA has no pooler; BERT/ALBERT ones are unused by this head, so they are not built.
        encoder_class = MODEL_MAPPING[type(hf_config)]
        no_pooler = (
            {"add_pooling_layer": False}
            if "add_pooling_layer" in encoder_class.__init__.__code__.co_varnames
            else {}
        )
        encoder = AutoModel.from_pretrained(model_dir, config=hf_config, **no_pooler)
        dropout = config.dropout if config.dropout is not None else hf_config.hidden_dropout_prob
        pooling = "cls" if config.head == "electra" else "mean"
        return LinearHeadClassifier(encoder, num_outputs, dropout, pooling)
    # A folder may hold a discriminator with its RTD head (an export's rtd/, a round-1 export, a hub
    # *ForTokenClassification): from_pretrained on a *ForSequenceClassification would load a 1-unit
    # "classifier" as the STS-B regression head (same name and shape for ALBERT/BERT), so the task model is
    # built fresh and only the encoder weights are copied in.
    hf_config.num_labels = num_outputs
    hf_config.id2label = {i: str(i) for i in range(num_outputs)}
    hf_config.label2id = {str(i): i for i in range(num_outputs)}
    model = AutoModelForSequenceClassification.from_config(hf_config)
    encoder_state = AutoModel.from_pretrained(model_dir, config=hf_config).state_dict()
    missing, unexpected = model.base_model.load_state_dict(encoder_state, strict=False)
    if unexpected or any("pooler" not in k for k in missing):
        raise ValueError(
            f"{model_dir}: encoder weights do not fit {type(model).__name__} ({missing + unexpected})"
        )
    return SequenceClassifier(model)


# Parameter names of transformer layers: BERT/ELECTRA/RoBERTa "encoder.layer.<i>.", ALBERT's shared
# "encoder.albert_layer_groups.<g>.".
_LAYER = re.compile(r"(?:^|\.)(?:layer|albert_layer_groups)\.(\d+)\.")


def layer_depths(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: depth}, number of layers L) for ELECTRA's layer-wise LR decay.

    Depths follow google-research/electra `_get_layer_lrs`: embeddings (and their projection) 0, layer i
    i+1, task-specific parameters L+2. Parameters outside the pretrained encoder, and a pooler (never
    trained by replaced-token detection), are task-specific. ALBERT shares one set of layer weights across
    all L applications: depth counts distinct weights, so L is the number of layer groups (1 for ALBERT
    and ALECTRA), the shared group sits at depth 1 and gets lr * decay^2 like the top layer of an unshared
    model, and the embeddings get lr * decay^3.
    """
    base = model.base_model
    hf_config = base.config
    n_layers = (
        hf_config.num_hidden_groups if hf_config.model_type == "albert" else hf_config.num_hidden_layers
    )
    base_params = {id(p) for p in base.parameters()}
    depths = {}
    for name, param in model.named_parameters():
        layer = _LAYER.search(name)
        if id(param) not in base_params or ".pooler." in f".{name}":
            depths[name] = n_layers + 2
        elif layer is not None:
            depths[name] = int(layer.group(1)) + 1
        else:
            depths[name] = 0
    return depths, n_layers


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict]:
    """Optimizer groups, one per (depth, weight-decay) pair, each with its own learning rate."""
    depths, n_layers = layer_depths(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        depth, decay = depths[name], config.weight_decay > 0 and uses_weight_decay(name)
        group = groups.setdefault(
            (depth, decay),
            {
                "params": [],
                "lr": config.learning_rate * config.layerwise_lr_decay ** (n_layers + 2 - depth),
                "weight_decay": config.weight_decay if decay else 0.0,
                "depth": depth,
            },
        )
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def usable_length(model: nn.Module, max_seq_length: int) -> int:
    """max_seq_length, capped (with a note) at the size of the model's position-embedding table."""
    positions = getattr(model.base_model.config, "max_position_embeddings", max_seq_length)
    if positions < max_seq_length:
        print(
            f"[glue] note: max_seq_length {max_seq_length} exceeds the model's {positions} positions",
            file=sys.stderr,
        )
    return min(positions, max_seq_length)


def _subsample(examples: list[GlueExample], limit: int | None, seed: int) -> list[GlueExample]:
    if limit is None or limit >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=limit, replace=False))
    return [examples[i] for i in keep]


def training_examples(task: GlueTask, train: list[GlueExample], config: FinetuneConfig) -> list[GlueExample]:
    """Subsampled training set, with swapped-order copies appended for MRPC/STS-B (ELECTRA)."""
    examples = _subsample(train, config.max_train_examples, config.data_seed)
    if config.double_unordered and task.double_unordered:
        examples = examples + [dataclasses.replace(e, text_a=e.text_b, text_b=e.text_a) for e in examples]
    return examples


class Encoded:
    """Tokenised examples, padded per batch to the batch's longest row."""

    def __init__(
        self, tokenizer, examples: list[GlueExample], max_seq_length: int, is_regression: bool
    ) -> None:
        texts_b = [e.text_b for e in examples]
        encoding = tokenizer(
            [e.text_a for e in examples],
            texts_b if texts_b[0] is not None else None,
            truncation="longest_first",  # ELECTRA `_truncate_seq_pair`: drop from the longer sentence
            max_length=max_seq_length,
        )
        self.input_ids: list[list[int]] = encoding["input_ids"]
        self.token_type_ids: list[list[int]] | None = encoding.get("token_type_ids")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        labels = [e.label for e in examples]
        # STS-B: ELECTRA regresses score / 5 (classification_tasks.RegressionTask._add_features).
        self.labels = (
            torch.tensor(labels, dtype=torch.float32) / STSB_MAX_SCORE
            if is_regression
            else torch.tensor(labels)
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(indices), width), dtype=torch.long)  # (B, T)
        types = torch.zeros((len(indices), width), dtype=torch.long)  # (B, T)
        for row, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            mask[row, :n] = 1
            if self.token_type_ids is not None:
                types[row, :n] = torch.tensor(self.token_type_ids[i])
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = types
        return {k: v.to(device) for k, v in inputs.items()}


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches over fresh permutations; a batch may span two epochs, so every step is full."""
    buffer: list[int] = []
    while True:
        buffer.extend(torch.randperm(n, generator=generator).tolist())
        while len(buffer) >= batch_size:
            yield buffer[:batch_size]
            buffer = buffer[batch_size:]


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, is_regression: bool, *, reduction: str
) -> torch.Tensor:
    """Squared error (regression, ELECTRA's) or cross-entropy per example, summed or averaged over the
    batch."""
    if is_regression:
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels, reduction=reduction)
    return nn.functional.cross_entropy(logits.float(), labels, reduction=reduction)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def predict(
    model: nn.Module, data: Encoded, batch_size: int, device: torch.device, is_regression: bool
) -> np.ndarray:
    """Class indices (N,) or regression outputs (N,) for every encoded example, in order."""
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        logits = model(**data.batch(list(range(start, min(start + batch_size, len(data)))), device))  # (B, K)
        outputs.append((logits.squeeze(-1) if is_regression else logits.argmax(-1)).float().cpu().numpy())
    return np.concatenate(outputs)


def score(task: GlueTask, split: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics of one dev split; keys get the suffix "_mm" for MNLI mismatched."""
    suffix = "_mm" if split.endswith("mismatched") else ""
    if task.is_regression:
        values = {
            "spearman": metrics.spearman_corrcoef(predictions, labels),
            "pearson": metrics.pearson_corrcoef(predictions, labels),
        }
    elif task.name == "cola":
        values = {"mcc": metrics.matthews_corrcoef(predictions, labels)}
    else:
        values = {"accuracy": metrics.accuracy(predictions, labels)}
        if task.name in ("mrpc", "qqp"):
            values["f1"] = metrics.f1_score(predictions, labels)
    return {k + suffix: v for k, v in values.items()}


def finetune_task(
    model_dir: pathlib.Path,
    tokenizer,
    task: GlueTask,
    train: list[GlueExample],
    dev: dict[str, list[GlueExample]],
    *,
    seed: int,
    config: FinetuneConfig,
) -> RunResult:
    """One fine-tuning run: train on `train`, return the metrics on every dev split."""
    start = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(seed)
    model = build_classifier(model_dir, task.num_outputs, config).to(device)
    max_length = usable_length(model, config.max_seq_length)
    train_data = Encoded(tokenizer, training_examples(task, train, config), max_length, task.is_regression)
    # ELECTRA: num_train_steps = int(epochs * n_train / batch_size).
    total_steps = max(1, int(config.epochs_for(task) * len(train_data) / config.batch_size))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = total_steps * config.warmup_proportion
    optimizer = AdamWeightDecay(
        parameter_groups(model, config), lr=config.learning_rate, betas=(0.9, 0.999), eps=config.adam_epsilon
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier("electra", total_steps=total_steps, warmup_steps=warmup_steps)
    )
    generator = torch.Generator().manual_seed(seed)
    batches = _shuffled_batches(len(train_data), min(config.batch_size, len(train_data)), generator)
    model.train()
    for _ in range(total_steps):
        indices = next(batches)
        logits = model(**train_data.batch(indices, device))  # (B, K)
        labels = train_data.labels[indices].to(device)
        loss = task_loss(logits, labels, task.is_regression, reduction=config.loss_reduction)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{task.name} seed {seed}: loss is {loss.item()} (lower --learning-rate?)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
    results: dict[str, float] = {}
    for split, examples in dev.items():
        examples = _subsample(examples, config.max_eval_examples, config.data_seed)
        dev_data = Encoded(tokenizer, examples, max_length, task.is_regression)
        predictions = predict(model, dev_data, config.eval_batch_size, device, task.is_regression)
        results.update(score(task, split, predictions, dev_data.labels.numpy()))
    seconds = time.perf_counter() - start
    print(
        f"[glue] {task.name} seed {seed}: {total_steps} steps, {seconds:.1f} s, "
        + ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
        file=sys.stderr,
    )
    return RunResult(
        task=task.name,
        seed=seed,
        metrics=results,
        train_examples=len(train_data),
        steps=total_steps,
        seconds=seconds,
    )


def count_encoder_parameters(model_dir: pathlib.Path) -> int:
    """Parameters of the pretrained encoder alone (no pooler, no task head), as the seed's tables count."""
    model = build_classifier(model_dir, 1, FinetuneConfig(device="cpu"))
    return sum(p.numel() for p in model.base_model.parameters())
