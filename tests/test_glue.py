"""GLUE fine-tuning: TSV loading and its errors, metrics vs hand-computed values, the ELECTRA recipe
(layer-wise LR, schedule, optimizer), learning on synthetic tasks, and the whole command on a tiny model."""

import json
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from alectra.glue import metrics
from alectra.glue.__main__ import main, resolve_model_dir
from alectra.glue.finetune import (
    FinetuneConfig,
    build_classifier,
    finetune_task,
    layer_depths,
    parameter_groups,
    training_examples,
)
from alectra.glue.report import parse_results_table
from alectra.glue.tasks import (
    TASKS,
    GlueDataError,
    GlueExample,
    examples_from_hf_rows,
    load_local_task,
    parse_task_list,
    read_glue_tsv,
)
from alectra.optim import AdamWeightDecay, electra_multiplier
from tests import waiting

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
WORDS = "the a movie film was is plot actor story fun dull and but not very".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---------------------------------------------------------------- fixtures: a tiny model, GLUE-layout files


def _train_vocab() -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS + ["great"]) for _ in range(8)) for _ in range(200)]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS))
    return tokenizer.get_vocab()


def _save_tiny_discriminator(folder: pathlib.Path, arch: str, vocab: dict[str, int]) -> pathlib.Path:
    """The form alectra.export writes: *ForTokenClassification, num_labels=1, plus vocab.txt."""
    from transformers import (
        AlbertConfig,
        AlbertForTokenClassification,
        BertTokenizer,
        BertTokenizerFast,
        ElectraConfig,
        ElectraForTokenClassification,
    )

    sizes = dict(vocab_size=len(vocab), embedding_size=16, hidden_size=32, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=64, num_labels=1,
                 id2label={0: "replaced"}, label2id={"replaced": 0})  # fmt: skip
    torch.manual_seed(0)
    if arch == "electra":
        model = ElectraForTokenClassification(ElectraConfig(num_hidden_layers=2, **sizes))
    else:
        model = AlbertForTokenClassification(AlbertConfig(num_hidden_layers=3, num_hidden_groups=1, **sizes))
    model.save_pretrained(folder)
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    ordered = sorted(vocab, key=vocab.get)
    (folder / "vocab.txt").write_text("\n".join(ordered) + "\n")
    assert BertTokenizer.from_pretrained(folder).tokenize("the movie was great") == [
        "the",
        "movie",
        "was",
        "great",
    ]
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    vocab = _train_vocab()
    return {arch: _save_tiny_discriminator(root / arch, arch, vocab) for arch in ("electra", "albert")}


def _sentiment(rng: random.Random, n: int) -> list[tuple[str, int]]:
    """Label 1 iff the sentence contains "great": learnable by a tiny model in a few dozen steps."""
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(6)]
        label = int(rng.random() < 0.5)
        if label:
            words[rng.randrange(6)] = "great"
        rows.append((" ".join(words), label))
    return rows


def _similarity(rng: random.Random, n: int) -> list[tuple[str, str, float]]:
    """Score = 5/3 x the number of "great" in the first sentence (0..3): a learnable regression."""
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(6)]
        count = rng.randrange(4)
        for i in rng.sample(range(6), count):
            words[i] = "great"
        rows.append((" ".join(words), " ".join(rng.choice(WORDS) for _ in range(4)), 5.0 * count / 3))
    return rows


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def write_glue_fixture(root: pathlib.Path, n_train: int = 96, n_dev: int = 48) -> pathlib.Path:
    """SST-2 (single sentence), MRPC (pair, BOM), STS-B (regression), CoLA (no header, no final newline)."""
    rng = random.Random(1)
    for split, n in (("train", n_train), ("dev", n_dev)):
        sst = _sentiment(rng, n)
        _write(root / "SST-2" / f"{split}.tsv", "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in sst))
        cola = _sentiment(rng, n)
        _write(root / "CoLA" / f"{split}.tsv", "\n".join(f"gj04\t{y}\t\t{s}." for s, y in cola))
        mrpc = [
            (a, a if y else b, y)
            for (a, y), (b, _) in zip(_sentiment(rng, n), _sentiment(rng, n), strict=True)
        ]
        _write(
            root / "MRPC" / f"{split}.tsv",
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            + "".join(f"{y}\t{i}\t{i + 1}\t{a}\t{b}\n" for i, (a, b, y) in enumerate(mrpc)),
        )
        sts = _similarity(rng, n)
        _write(
            root / "STS-B" / f"{split}.tsv",
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            + "".join(
                f"{i}\tmain\tf\t2012\t{i:04d}\tnone\tnone\t{a}\t{b}\t{s:.3f}\n"
                for i, (a, b, s) in enumerate(sts)
            ),
        )
    return root


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> pathlib.Path:
    return write_glue_fixture(tmp_path_factory.mktemp("glue"))


# ---------------------------------------------------------------- metrics vs hand-computed values


def test_metrics_match_hand_computed_values():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p = np.array([1, 1, 0, 0, 0, 1, 0, 1])  # tp=3, fp=1, fn=1, tn=3
    assert metrics.accuracy(p, y) == pytest.approx(6 / 8)
    assert metrics.f1_score(p, y) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert metrics.matthews_corrcoef(p, y) == pytest.approx((3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4))
    # Unbalanced case: tp=1, fp=2, fn=0, tn=2 -> (1*2 - 2*0) / sqrt(3*1*4*2) = 2 / sqrt(24).
    assert metrics.matthews_corrcoef(np.array([1, 1, 1, 0, 0]), np.array([1, 0, 0, 0, 0])) == pytest.approx(
        2 / np.sqrt(24)
    )
    # A constant prediction has no defined MCC: scored 0 (sklearn's convention), F1 with no tp is 0.
    assert metrics.matthews_corrcoef(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0
    assert metrics.f1_score(np.zeros(4), np.array([0, 1, 0, 1])) == 0.0

    x, z = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0])
    # Pearson by hand: centred (-1.5,-.5,.5,1.5) and (-3,-1,0,4); cross sum 11; squared norms 5 and 26.
    assert metrics.pearson_corrcoef(x, z) == pytest.approx(11 / np.sqrt(5 * 26))
    # Ties get their average rank: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4].
    assert metrics.average_ranks(np.array([10, 20, 20, 30])).tolist() == [1, 2.5, 2.5, 4]
    # Spearman = Pearson of ranks (1,2.5,2.5,4) vs (1,2,3,4): centred (-1.5,0,0,1.5) and (-1.5,-.5,.5,1.5),
    # cross sum 2.25+0+0+2.25 = 4.5, squared norms 4.5 and 5.
    assert metrics.spearman_corrcoef(np.array([10, 20, 20, 30]), np.array([1, 2, 3, 4])) == pytest.approx(
        4.5 / np.sqrt(4.5 * 5)
    )
    assert metrics.spearman_corrcoef(
        np.array([3.0, 1.0, 2.0]), np.array([30.0, 10.0, 20.0])
    ) == pytest.approx(1)
    with pytest.raises(ValueError, match="equal non-empty"):
        metrics.accuracy(np.array([1, 0]), np.array([1]))


# ---------------------------------------------------------------- reading GLUE files


def test_reads_glue_layout_quirks(glue_dir):
    train, dev = load_local_task(TASKS["cola"], glue_dir)  # no header, no trailing newline
    assert len(train) == 96 and len(dev["dev"]) == 48
    assert train[0].text_b is None and train[0].text_a.endswith(".") and train[0].label in (0, 1)
    train, _ = load_local_task(TASKS["mrpc"], glue_dir)  # header starts with a byte-order mark
    assert len(train) == 96 and train[0].text_b is not None
    train, _ = load_local_task(TASKS["stsb"], glue_dir)
    assert all(isinstance(e.label, float) and 0 <= e.label <= 5 for e in train)
    # Quoting is off: an unbalanced double quote is text, and the next row is still its own example.
    path = glue_dir / "quotes" / "train.tsv"
    _write(path, 'sentence\tlabel\nhe said " hello \t1\nnext row \t0\n')
    rows = read_glue_tsv(TASKS["sst2"], path)
    assert [(e.text_a, e.label) for e in rows] == [('he said " hello ', 1), ("next row ", 0)]


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tlabel\ngood \t1\nbad\n", r"bad\.tsv line 3: expected 2 tab-separated fields, found 1"),
        ("sentence\tlabel\ngood \t7\n", r"bad\.tsv line 2: label '7' is not one of \['0', '1'\]"),
        ("text\tlabel\ngood \t1\n", r"bad\.tsv: header has no column 'sentence'"),
        ("sentence\tlabel\n", r"bad\.tsv: no examples"),
    ],
)
def test_malformed_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    _write(path, content)
    with pytest.raises(GlueDataError, match=message):
        read_glue_tsv(TASKS["sst2"], path)


def test_missing_task_errors(glue_dir, tmp_path):
    with pytest.raises(GlueDataError, match=r"GLUE task folder not found: .*RTE \(needed for --tasks rte\)"):
        load_local_task(TASKS["rte"], glue_dir)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(GlueDataError, match=r"GLUE file not found: .*RTE/train\.tsv"):
        load_local_task(TASKS["rte"], tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        parse_task_list("cola,sts")
    assert [t.name for t in parse_task_list("RTE, cola,rte")] == ["rte", "cola"]


def test_hub_rows_use_electra_label_order():
    from datasets import ClassLabel, Dataset, Features, Value

    # nyu-mll/glue's MNLI names its classes entailment/neutral/contradiction; ELECTRA's order differs.
    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }  # fmt: skip
    )
    rows = Dataset.from_dict({"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [0, 2]}, features)
    examples = examples_from_hf_rows(TASKS["mnli"], rows, features["label"].names)
    assert [TASKS["mnli"].labels[e.label] for e in examples] == ["entailment", "contradiction"]
    assert examples[1] == GlueExample(text_a="p1", text_b="h1", label=0)


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"GLUE data not present at {SHARED_GLUE}")
def test_reads_every_shared_glue_file():
    # Row counts from the folder's README (computed with quoting off).
    expected = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
                "rte": (2490, 277)}  # fmt: skip
    for name, (n_train, n_dev) in expected.items():
        train, dev = load_local_task(TASKS[name], SHARED_GLUE)
        assert (len(train), len(dev["dev"])) == (n_train, n_dev), name
    assert len(read_glue_tsv(TASKS["qnli"], SHARED_GLUE / "QNLI" / "dev.tsv")) == 5463


# ---------------------------------------------------------------- the recipe


def test_layerwise_lr_electra_follows_reference_depths(tiny_models):
    model = build_classifier(tiny_models["electra"], 2, FinetuneConfig())
    depths, n_layers = layer_depths(model)
    assert n_layers == 2
    assert depths["encoder.embeddings.word_embeddings.weight"] == 0
    assert depths["encoder.embeddings_project.weight"] == 0
    assert depths["encoder.encoder.layer.0.attention.self.query.weight"] == 1
    assert depths["encoder.encoder.layer.1.output.dense.weight"] == 2
    assert depths["classifier.weight"] == 4
    lrs = {g["depth"]: g["lr"] for g in parameter_groups(model, FinetuneConfig(learning_rate=1.0))}
    assert lrs == pytest.approx({0: 0.8**4, 1: 0.8**3, 2: 0.8**2, 4: 1.0})
    assert sum(len(g["params"]) for g in parameter_groups(model, FinetuneConfig())) == len(
        list(model.parameters())
    )


def test_layerwise_lr_albert_shared_group_and_auto_head(tiny_models):
    model = build_classifier(tiny_models["albert"], 3, FinetuneConfig(head="auto"))
    depths, n_layers = layer_depths(model)
    assert n_layers == 1  # one shared layer group, whatever num_hidden_layers (3) is
    assert depths["model.albert.embeddings.word_embeddings.weight"] == 0
    assert depths["model.albert.encoder.embedding_hidden_mapping_in.weight"] == 0
    shared = [n for n in depths if "albert_layer_groups.0." in n]
    assert shared and all(depths[n] == 1 for n in shared)
    assert depths["model.albert.pooler.weight"] == 3 and depths["model.classifier.weight"] == 3


@pytest.mark.parametrize(
    "arch, head", [("electra", "electra"), ("albert", "electra"), ("electra", "auto"), ("albert", "auto")]
)
def test_classifier_keeps_encoder_and_gets_a_fresh_head(tiny_models, arch, head):
    from safetensors.torch import load_file

    saved = load_file(tiny_models[arch] / "model.safetensors")
    model = build_classifier(tiny_models[arch], 1, FinetuneConfig(head=head))
    state = model.base_model.state_dict()
    word = f"{arch}.embeddings.word_embeddings.weight"
    assert torch.equal(state["embeddings.word_embeddings.weight"], saved[word])
    layer = (
        "encoder.layer.1.output.dense.weight"
        if arch == "electra"
        else next(k for k in state if "ffn.weight" in k)
    )
    assert torch.equal(state[layer], saved[f"{arch}.{layer}"])
    # The 1-unit RTD head has the regression head's shape: it must not be loaded as the task head.
    head_weight = dict(model.named_parameters())[
        "classifier.weight"
        if head == "electra"
        else ("model.classifier.weight" if arch == "albert" else "model.classifier.out_proj.weight")
    ]
    assert head_weight.shape[0] == 1 and not torch.equal(head_weight, saved["classifier.weight"])
    assert model(
        input_ids=torch.tensor([[2, 10, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long)
    ).shape == (1, 1)


def test_schedule_and_optimizer_follow_electra():
    # polynomial_decay(power 1) x min(1, step / warmup) with 10 steps, 1 warmup step.
    lr_factor = electra_multiplier
    assert [round(lr_factor(s, total_steps=10, warmup_steps=1.0), 6) for s in (0, 1, 5, 10)] == [
        0.0,
        0.9,
        0.5,
        0.0,
    ]
    assert lr_factor(2, total_steps=10, warmup_steps=4.0) == pytest.approx(0.8 * 0.5)
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = AdamWeightDecay(
        [{"params": [param], "lr": 0.1, "weight_decay": 0.5}], lr=0.1, betas=(0.9, 0.999), eps=1e-6
    )
    param.grad = torch.tensor([0.2, 0.4])
    optimizer.step()
    # No bias correction: m = 0.1 g, v = 0.001 g^2, update = m / (sqrt(v) + eps) + wd * p.
    m, v = 0.1 * torch.tensor([0.2, 0.4]), 0.001 * torch.tensor([0.2, 0.4]) ** 2
    expected = torch.tensor([1.0, -2.0]) - 0.1 * (m / (v.sqrt() + 1e-6) + 0.5 * torch.tensor([1.0, -2.0]))
    assert torch.allclose(param.detach(), expected, atol=1e-6)


def test_training_set_subsampling_and_order_doubling():
    train = [GlueExample(text_a=f"a{i}", text_b=f"b{i}", label=i % 2) for i in range(10)]
    config = FinetuneConfig(max_train_examples=4, data_seed=3)
    doubled = training_examples(TASKS["mrpc"], train, config)
    assert len(doubled) == 8 and doubled[4:] == [
        GlueExample(text_a=e.text_b, text_b=e.text_a, label=e.label) for e in doubled[:4]
    ]
    assert doubled[:4] == training_examples(TASKS["rte"], train, config)  # same subset, no doubling for RTE
    assert len(training_examples(TASKS["mrpc"], train, FinetuneConfig(double_unordered=False))) == 10
    with pytest.raises(ValueError, match="layerwise_lr_decay must be in"):
        FinetuneConfig(layerwise_lr_decay=0)
    with pytest.raises(ValueError, match="head must be one of"):
        FinetuneConfig(head="mlp")


def test_loss_is_summed_over_the_batch_as_the_reference():
    """run_finetuning.py: `self.loss = tf.reduce_sum(per-example losses)`, then the clip at 1.0."""
    from alectra.glue.finetune import task_loss

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert FinetuneConfig().loss_reduction == "sum"
    torch.testing.assert_close(task_loss(logits, labels, False, reduction="sum"), per_example.sum())
    torch.testing.assert_close(task_loss(logits, labels, False, reduction="mean"), per_example.mean())
    scores, targets = torch.randn(8, 1, generator=g), torch.rand(8, generator=g)
    torch.testing.assert_close(
        task_loss(scores, targets, True, reduction="sum"), ((scores.squeeze(-1) - targets) ** 2).sum()
    )
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        FinetuneConfig(loss_reduction="max")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_finetune_task_uses_the_configured_reduction(tiny_models, glue_dir, monkeypatch, reduction):
    from transformers import AutoTokenizer

    import alectra.glue.finetune as finetune

    seen, original = [], finetune.task_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["reduction"])
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "task_loss", spy)
    train, dev = load_local_task(TASKS["sst2"], glue_dir)
    config = FinetuneConfig(max_steps=2, batch_size=4, loss_reduction=reduction, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["electra"])
    finetune_task(tiny_models["electra"], tokenizer, TASKS["sst2"], train, dev, seed=0, config=config)
    assert seen == [reduction, reduction]


@pytest.mark.parametrize("task, arch", [("sst2", "electra"), ("stsb", "albert")])
def test_finetuning_learns_a_synthetic_task(tiny_models, glue_dir, task, arch):
    from transformers import AutoTokenizer

    train, dev = load_local_task(TASKS[task], glue_dir)
    config = FinetuneConfig(learning_rate=1e-3, batch_size=16, epochs=8, max_steps=48, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    result = finetune_task(tiny_models[arch], tokenizer, TASKS[task], train, dev, seed=0, config=config)
    assert result.steps == 48
    if task == "sst2":
        assert result.metrics["accuracy"] >= 0.9, result.metrics
    else:
        assert result.metrics["spearman"] >= 0.8 and result.metrics["pearson"] >= 0.8, result.metrics


# ---------------------------------------------------------------- the command


def test_whole_command_writes_and_parses_the_table(tiny_models, glue_dir, tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "discriminator").symlink_to(
        tiny_models["electra"]
    )  # an export folder, as alectra.export writes
    out = tmp_path / "results"
    argv = ["--model", str(export), "--tasks", "sst2,mrpc,stsb", "--data-dir", str(glue_dir), "--seeds", "3",
            "--max-steps", "4", "--max-train-examples", "32", "--output-dir", str(out),
            "--name", "tiny-electra", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    markdown = (out / "glue_results.md").read_text()
    report = json.loads((out / "glue_results.json").read_text())
    assert markdown in printed
    [row] = parse_results_table(markdown)
    assert row["Model"] == "tiny-electra" and row["# Params"].endswith("K")
    assert row["CoLA"] is None and row["QQP"] is None and row["RTE"] is None
    medians = {t: 100 * np.median([r["metrics"][m] for r in report["tasks"][t]["runs"]])
               for t, m in (("sst2", "accuracy"), ("mrpc", "accuracy"), ("stsb", "spearman"))}  # fmt: skip
    assert row["SST"] == pytest.approx(medians["sst2"], abs=0.05)
    assert row["MRPC"] == pytest.approx(medians["mrpc"], abs=0.05)
    assert row["STS"] == pytest.approx(medians["stsb"], abs=0.05)
    assert row["Avg"] == pytest.approx(np.mean([row["SST"], row["MRPC"], row["STS"]]), abs=0.1)
    assert report["seeds"] == [0, 1, 2] and report["config"]["learning_rate"] == 3e-4
    runs = report["tasks"]["mrpc"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and all(
        r["steps"] == 4 and r["train_examples"] == 64 for r in runs
    )
    assert set(runs[0]["metrics"]) == {"accuracy", "f1"}
    assert "| MRPC | f1 |" in markdown
    assert not list(out.glob(".*tmp"))  # written under temporary names, then renamed


def test_command_errors_are_one_line(tiny_models, glue_dir, tmp_path, capsys):
    cases = [
        (["--tasks", "rte", "--data-dir", str(glue_dir)], "GLUE task folder not found"),
        (["--tasks", "cola,wnli", "--data-dir", str(glue_dir)], "unknown GLUE task"),
        (["--tasks", "sst2", "--data-dir", str(glue_dir), "--seeds", "0"], "--seeds must be >= 1"),
        (["--tasks", "sst2", "--data-dir", str(glue_dir), "--warmup-proportion", "2"], "warmup_proportion"),
    ]
    for extra, message in cases:
        assert main(["--model", str(tiny_models["electra"]), "--output-dir", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("alectra-glue: error: ") and message in err[-1], err
    with pytest.raises(ValueError, match="no such folder"):
        resolve_model_dir(tmp_path / "missing", tmp_path)
    # Entry point as users run it: one error line, exit status 2, nothing written.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alectra.glue",
            "--model",
            str(tmp_path / "nope"),
            "--tasks",
            "sst2",
            "--data-dir",
            str(glue_dir),
            "--output-dir",
            str(tmp_path / "o"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=waiting.deadline(120),
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "alectra-glue: error: --model"
    )
    assert not (tmp_path / "o").exists()


def test_mean_head_pools_over_real_tokens_only(tiny_models):
    torch.manual_seed(0)
    model = build_classifier(tiny_models["electra"], 2, FinetuneConfig(head="mean", dropout=0.0)).eval()
    ids, mask = torch.tensor([[2, 10, 11, 3, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (1, 6, H)
    expected = model.classifier(hidden[0, :4].mean(0))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask)[0], expected)
    # [CLS] pooling (the reference head) gives something else on the same encoder.
    assert not torch.allclose(model.classifier(hidden[0, 0]), expected)


def _glue_bench():
    """benchmarks/glue_pretraining_helps.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "glue_pretraining_helps.py"
    spec = importlib.util.spec_from_file_location("glue_pretraining_helps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["electra", "albert"])
def test_rescaled_copy_matches_the_scale_and_keeps_the_function(tiny_models, tmp_path, arch):
    from transformers import AutoModelForTokenClassification

    bench = _glue_bench()
    src = tiny_models[arch]
    reference = tmp_path / "reference"  # the same architecture with embedding tables 5x larger
    model = AutoModelForTokenClassification.from_pretrained(src)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    model.save_pretrained(reference)
    out = bench.rescaled_copy(src, reference, tmp_path / "rescaled")

    assert bench.embedding_scale(out) == pytest.approx(bench.embedding_scale(reference), rel=1e-5)
    original, rescaled = (AutoModelForTokenClassification.from_pretrained(d).eval() for d in (src, out))
    ids = torch.tensor([[2, 10, 11, 12, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(
            rescaled(input_ids=ids, attention_mask=mask).logits,
            original(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-4,
            atol=1e-5,
        )
    for name in bench.EMBEDDING_TABLES:  # all three tables scaled by the same factor, nothing else touched
        a = getattr(original.base_model.embeddings, name).weight
        b = getattr(rescaled.base_model.embeddings, name).weight
        torch.testing.assert_close(b, a * 5.0)
    torch.testing.assert_close(rescaled.classifier.weight, original.classifier.weight)
    assert (out / "vocab.txt").read_text() == (src / "vocab.txt").read_text()
