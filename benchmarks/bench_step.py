"""Tokens/s of one full ELECTRA training step (forward, backward, AdamW) of ElectraPretrainingModel against a
naive Hugging Face baseline of the same size, side by side in one run.

Baseline (what a straightforward HF implementation does): `ElectraForMaskedLM` projecting ALL B*T positions
onto the vocabulary, a separate discriminator (`ElectraForPreTraining`; `AlbertForTokenClassification` for
alectra-small), untied embeddings (two copies in the optimizer), torch softmax + multinomial sampling and
`F.cross_entropy(ignore_index=-100)` over the full (B, T, V) logits. Both use the same masking.

Each measurement runs in its own subprocess (so peak RSS is per model), alternating ours / baseline
`--repeats` times; the table shows the median. Besides wall-clock tokens/s it shows tokens per CPU-second of
the worker process: with OMP_NUM_THREADS=1 that figure does not count the time other jobs on a shared
machine take the core away, so it is the steadier one there (it still feels their cache and memory traffic).
The load average is printed before and after each preset.

`--compile` compiles the encoders of BOTH sides the same way (`compile_networks`), so its ratio against an
eager run shows how much of a gain is compilation and how much is the model.

    OMP_NUM_THREADS=1 python benchmarks/bench_step.py                       # electra-small, alectra-small
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py --presets electra-small --compile
    python benchmarks/bench_step.py --presets electra-small --batch 8 --steps 2 --repeats 1
    python benchmarks/bench_step.py --device cuda --batch 128 --steps 20      # GPU: bf16 autocast, both sides

On a GPU (`--device cuda`) both sides run under `torch.autocast(bfloat16)` with fused AdamW, the clock stops
after `torch.cuda.synchronize()`, and peak memory is `torch.cuda.max_memory_allocated` (MiB columns); the
CPU-second columns then only say how busy the launching thread was.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable

SPECIALS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
VOCAB = 30522


def make_batch(batch: int, seq_len: int, device: str = "cpu"):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(999, VOCAB, (batch, seq_len), generator=g)
    ids[:, 0] = SPECIALS["cls"]
    ids[:, seq_len // 2] = SPECIALS["sep"]
    ids[:, -1] = SPECIALS["sep"]
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, seq_len // 2 + 1 :] = 1
    return ids.to(device), torch.ones_like(ids).to(device), token_type_ids.to(device)


def compile_networks(networks: Iterable) -> None:
    """torch.compile (inductor) each HF network in place, so parameter names and the module tree stay as they
    are. `fallback_random` keeps dropout on torch's RNG: inductor's own CPU dropout was ~30% slower per step
    here, and with it a fixed seed gives eager's dropout masks, so compiled and eager losses can be compared.
    """
    import torch

    torch._inductor.config.fallback_random = True
    for network in networks:
        network.compile()


class NaiveBaseline:
    """Untied generator + discriminator, full-vocabulary projection at every position, torch sampling."""

    def __init__(self, preset: str, device: str):
        import torch
        from transformers import AlbertForTokenClassification, ElectraForMaskedLM, ElectraForPreTraining

        from alectra.model import build_hf_configs
        from alectra.presets import get_preset

        self.config = get_preset(preset)
        gen_cfg, disc_cfg = build_hf_configs(self.config, VOCAB)
        self.generator = ElectraForMaskedLM(gen_cfg)
        disc_cls = AlbertForTokenClassification if disc_cfg.model_type == "albert" else ElectraForPreTraining
        self.discriminator = disc_cls(disc_cfg)
        self.generator.to(device)
        self.discriminator.to(device)
        params = list(self.generator.parameters()) + list(self.discriminator.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device == "cuda")
        self.generator.train()
        self.discriminator.train()
        self.networks = (self.generator, self.discriminator)

    def step(self, ids, attention_mask, token_type_ids, seed: int) -> float:
        import torch
        import torch.nn.functional as F

        from alectra.masking import mask_tokens

        masked = mask_tokens(
            ids,
            attention_mask,
            seed=seed,
            special_token_ids=SPECIALS,
            max_predictions=self.config.max_predictions_for(ids.shape[1]),
        )
        logits = self.generator(masked.input_ids, attention_mask, token_type_ids).logits  # (B, T, V)
        labels = ids.masked_fill(~masked.masked, -100)
        gen_loss = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
        with torch.no_grad():
            probs = torch.softmax(logits[masked.masked].float() / self.config.temperature, dim=-1)  # (M, V)
            samples = torch.multinomial(probs, 1).squeeze(1)
        disc_ids = ids.clone()
        disc_ids[masked.masked] = samples
        replaced = (disc_ids != ids).float()
        disc_logits = self.discriminator(disc_ids, attention_mask, token_type_ids).logits  # (B, T[, 1])
        disc_logits = disc_logits.view(ids.shape)  # (B, T)
        per_token = F.binary_cross_entropy_with_logits(disc_logits, replaced, reduction="none")
        disc_loss = (per_token * attention_mask).sum() / attention_mask.sum()
        loss = gen_loss + self.config.disc_weight * disc_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class Ours:
    def __init__(self, preset: str, device: str):
        import torch

        from alectra.model import ElectraPretrainingModel
        from alectra.presets import get_preset

        self.model = ElectraPretrainingModel(get_preset(preset), vocab_size=VOCAB, special_token_ids=SPECIALS)
        self.model.to(device)
        self.model.train()
        # The encoders + heads that `--compile` compiles; masking, gathers, sampling and loss stay eager.
        self.networks = (self.model.generator.base_model, self.model.discriminator)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, weight_decay=0.01, fused=device == "cuda"
        )

    def step(self, ids, attention_mask, token_type_ids, seed: int) -> float:
        out = self.model(ids, attention_mask, token_type_ids, seed=seed)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        return out.loss.item()


def worker(
    kind: str, preset: str, batch: int, seq_len: int, steps: int, compile: bool, device: str = "cpu"
) -> dict:
    """Build one model, one warm-up step (compiles, with `compile`), then time `steps` steps; return tokens
    per wall-second and per CPU-second of this process, peak memory (RSS on CPU, allocated on a GPU) and the
    warm-up step's seconds."""
    import contextlib

    import torch

    torch.manual_seed(0)
    runner = (Ours if kind == "ours" else NaiveBaseline)(preset, device)
    if compile:
        compile_networks(runner.networks)
    ids, attention_mask, token_type_ids = make_batch(batch, seq_len, device)
    cuda = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def memory_mib() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    idle_rss = memory_mib()
    warmup_start = time.perf_counter()
    with autocast:
        runner.step(ids, attention_mask, token_type_ids, seed=0)
    warmup_s = time.perf_counter() - warmup_start
    start, cpu_start = time.perf_counter(), time.process_time()
    with autocast:
        for step in range(steps):
            runner.step(ids, attention_mask, token_type_ids, seed=step + 1)
    if cuda:
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = memory_mib()
    tokens = batch * seq_len * steps
    return {
        "tokens_per_s": tokens / elapsed,
        "tokens_per_cpu_s": tokens / cpu,
        "peak_mib": peak,
        "step_mib": peak - idle_rss,
        "warmup_s": warmup_s,
    }


def run_worker(kind: str, args, preset: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--presets", preset, "--batch", str(args.batch)]
    cmd += ["--seq-len", str(args.seq_len), "--steps", str(args.steps), "--device", args.device]
    cmd += ["--compile"] * args.compile
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="electra-small,alectra-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--repeats", type=int, default=2, help="alternating ours/baseline subprocess runs")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the encoders of both sides (compile_networks)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worker", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(
            args.worker, args.presets, args.batch, args.seq_len, args.steps, args.compile, args.device
        )
        print(json.dumps(result))
        return

    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"batch {args.batch} x {args.seq_len}, {args.steps} timed steps, median of {args.repeats}, "
        f"{'compiled (both sides)' if args.compile else 'eager'}"
        + (f"; {torch.cuda.get_device_name()}, bf16 autocast" if args.device == "cuda" else "")
    )
    columns = {
        "preset": 14,
        "ours tok/s": 11,
        "base tok/s": 11,
        "speedup": 8,
        "ours tok/CPU-s": 15,
        "base tok/CPU-s": 15,
        "CPU speedup": 12,
        "ours peak MiB": 14,
        "base peak MiB": 14,
        "ours step MiB": 14,
        "base step MiB": 14,
        "warm-up s ours/base": 20,
        "load avg before/after": 22,
    }
    print(" ".join(f"{name:>{width}}" for name, width in columns.items()))
    for preset in args.presets.split(","):
        load_before = os.getloadavg()[0]
        runs = {"ours": [], "baseline": []}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(run_worker(kind, args, preset))
        ours, base = (
            {k: statistics.median(r[k] for r in runs[kind]) for k in runs[kind][0]} for kind in runs
        )
        cells = [
            preset,
            f"{ours['tokens_per_s']:.0f}",
            f"{base['tokens_per_s']:.0f}",
            f"{ours['tokens_per_s'] / base['tokens_per_s']:.2f}x",
            f"{ours['tokens_per_cpu_s']:.0f}",
            f"{base['tokens_per_cpu_s']:.0f}",
            f"{ours['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f}x",
            f"{ours['peak_mib']:.0f}",
            f"{base['peak_mib']:.0f}",
            f"{ours['step_mib']:.0f}",
            f"{base['step_mib']:.0f}",
            f"{ours['warmup_s']:.0f}/{base['warmup_s']:.0f}",
            f"{load_before:.1f}/{os.getloadavg()[0]:.1f}",
        ]
        row = zip(cells, columns.values(), strict=True)
        print(" ".join(f"{cell:>{width}}" for cell, width in row), flush=True)


if __name__ == "__main__":
    main()
