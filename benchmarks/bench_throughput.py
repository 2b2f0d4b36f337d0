"""Training throughput of the real job: `alectra/pretrain.py` (DeepSpeed, 1 rank) per preset, in tokens/s,
samples/s, TFLOP/s and MFU, with the time the full ELECTRA-Small recipe would take at that rate.

Each preset runs `pretrain.py` in its own subprocess with the given DeepSpeed config (bf16 where the GPU
has it), micro batch = global batch, a metrics report every `--log-every` steps; the figures are the
medians of the reports after the first (which holds the warm-up: CUDA context, Triton compilation, allocator
growth). The FLOP count is the trainer's (`ElectraPretrainingModel.flops_per_token`: generator and
discriminator, forward and backward); MFU divides by the card's dense bf16 peak from its data sheet
(`alectra.training.metrics`).

Data: the demo corpus tokenized with a BERT-sized vocabulary, so the generator's output layer and sampling
work over 30,522 entries as in the recipes: the demo WordPiece vocabulary (the demo corpus is too small to
learn 30,522 pieces) followed by `[unusedN]` entries up to `--vocab-size`, like the `[unusedN]` slots of
BERT's own vocabulary. Built into `--data-dir` on first use (seconds), reused afterwards.

    python benchmarks/bench_throughput.py                                    # electra-small, alectra-small
    python benchmarks/bench_throughput.py --presets electra-small --kernels auto torch   # Triton vs PyTorch
    python benchmarks/bench_throughput.py --presets tiny --batch 8 --steps 6 --log-every 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_pretrain import ROOT, cli_overrides, engine_run

RECIPE_TOKENS = 1_000_000 * 128 * 128  # ELECTRA-Small: 1M steps of 128 sequences of 128 tokens
COLUMNS = (
    "tokens_per_s",
    "samples_per_s",
    "tflops_per_gpu",
    "mfu_pct",
    "data_wait_pct",
    "peak_mem_gib",
    "loss",
)


def build_bench_data(out: Path, vocab_size: int) -> Path:
    """The demo corpus under a `vocab_size` vocabulary (demo WordPiece + [unusedN] padding); idempotent."""
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text())["tokenizer"]["vocab_size"] == vocab_size:
        return out
    from transformers import BertTokenizerFast

    from alectra.storage.atomic import write_json_atomic
    from alectra.storage.tokenizer import load_tokenizer
    from data_prep import prepare_demo
    from data_prep.build import BuildConfig, build
    from data_prep.sources import DemoSource

    with tempfile.TemporaryDirectory() as tmp:
        demo = prepare_demo(Path(tmp) / "demo")  # trains the demo WordPiece vocabulary (8,192 pieces)
        vocab = load_tokenizer(str(demo / "tokenizer")).get_vocab()
        if len(vocab) > vocab_size:
            raise SystemExit(f"--vocab-size {vocab_size} is below the demo vocabulary's {len(vocab)} entries")
        vocab.update({f"[unused{i}]": len(vocab) + i for i in range(vocab_size - len(vocab))})
        tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
        tok_dir = out / "tokenizer"
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(tok_dir)
    cfg = BuildConfig(
        output_dir=out,
        tokenizer=str(tok_dir),
        sentence_split="rules",
        docs_per_shard=500,
        command=f"benchmarks/bench_throughput.py build_bench_data(vocab_size={vocab_size})",
        progress=False,
    )
    result = build(cfg, DemoSource())
    write_json_atomic(manifest, result)
    return out


def run_preset(args, preset: str, kernels: str, data_dir: Path) -> dict[str, float]:
    """pretrain.py for one preset; medians of its reports after the first."""
    with tempfile.TemporaryDirectory() as out:
        overrides = {
            "output_dir": out,
            "model.preset": preset,
            "model.overrides": f"{{kernels: {kernels}}}",
            "data.paths": f"[{data_dir}]",
            "data.max_seq_length": args.seq_len,
            "data.num_workers": 2,
            "train.steps": args.steps,
            "train.global_batch_size": args.batch,
            "train.micro_batch_size": args.batch,
            "logging.every": args.log_every,
            "logging.eval_every": 0,
            "logging.progress_bar": "false",
            "logging.tensorboard": "false",
            "checkpoint.every": 10**9,
        }
        start = time.perf_counter()
        reports = engine_run(cli_overrides(overrides), out, deepspeed=args.deepspeed, columns=COLUMNS)
        wall = time.perf_counter() - start
    steps = sorted(reports["tokens_per_s"])[1:]  # the first report holds the warm-up
    if not steps:
        raise SystemExit(f"{preset}: fewer than two reports; raise --steps or lower --log-every")
    row = {name: statistics.median(col[s] for s in steps) for name, col in reports.items() if name != "loss"}
    row["first_loss"] = reports["loss"][min(reports["loss"])]
    row["last_loss"] = reports["loss"][max(reports["loss"])]
    row["wall_s"] = wall
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["electra-small", "alectra-small"])
    parser.add_argument(
        "--kernels", nargs="+", default=["auto"], help="model.kernels values to compare (auto, triton, torch)"
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero2.json"))
    parser.add_argument("--data-dir", default=None, help="default: data/bench_vocab<vocab-size>")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    data_dir = build_bench_data(
        Path(args.data_dir or ROOT / "data" / f"bench_vocab{args.vocab_size}"), args.vocab_size
    )

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    print(
        f"device: {device}; batch {args.batch} x {args.seq_len}, {args.steps} steps, report every "
        f"{args.log_every} (medians of the reports after the first), vocabulary {args.vocab_size}, "
        f"{Path(args.deepspeed).name}",
        flush=True,
    )
    print(
        "| preset | kernels | tokens/s | samples/s | TFLOP/s | MFU | data-wait | peak mem GiB "
        "| loss first -> last | ELECTRA-Small recipe (16.4B tokens) at this rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for preset in args.presets:
        for kernels in args.kernels:
            row = run_preset(args, preset, kernels, data_dir)
            rows.append({"preset": preset, "kernels": kernels, "device": device, **row})
            hours = RECIPE_TOKENS / row["tokens_per_s"] / 3600
            tflops = f"{row['tflops_per_gpu']:.1f}" if "tflops_per_gpu" in row else "-"
            mfu = f"{row['mfu_pct']:.1f} %" if "mfu_pct" in row else "-"
            print(
                f"| {preset} | {kernels} | {row['tokens_per_s']:,.0f} | {row['samples_per_s']:,.0f} | "
                f"{tflops} | {mfu} | {row['data_wait_pct']:.2f} % | {row['peak_mem_gib']:.2f} | "
                f"{row['first_loss']:.2f} -> {row['last_loss']:.2f} | {hours:,.1f} h |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
