"""Kernel benchmark: fused Triton kernels vs PyTorch, next to the card's copy bandwidth (GPU only).

    python benchmarks/bench_kernels.py                 # default shapes, bf16 and fp32
    python benchmarks/bench_kernels.py --dtype bf16    # one dtype

Times are `triton.testing.do_bench` medians (ms) of forward + backward, measured in this process side by side:

- rtd_loss: ours (`kernels.rtd_loss.rtd_loss`) vs `rtd_loss_reference` (eager PyTorch, autograd backward).
  GB/s counts the bytes the fused forward must move (logits, int64 labels, bool mask in; fp32 gradient out)
  plus the backward rescale (fp32 gradient in, logits-dtype gradient out).
- sampling + generator CE at vocabulary 30522: ours vs two PyTorch baselines:
  `sample_and_cross_entropy_reference` (bit-exact Philox emulation, many small kernels) and an eager torch
  baseline (torch.rand Gumbel noise, F.cross_entropy), what a plain PyTorch implementation would do. GB/s
  counts two reads of the logits and one write of the gradient (the fused kernel's minimum) plus the backward
  rescale.
- copy: `dst.copy_(src)` of 1 GiB, read + write bytes: the practical bandwidth ceiling of the card.

On a machine without CUDA the script says so and exits 0; the static compile figures (registers, spills,
shared memory for sm_80/sm_90) come from `python -m kernels.compile_check` instead.
"""

import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VOCAB = 30522


def copy_bandwidth_gbs(do_bench) -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def fwd_bwd(fn, logits, *args, **kwargs):
    """A closure running fn forward and backward on a fresh leaf of logits."""
    leaf = logits.detach().requires_grad_(True)

    def run():
        leaf.grad = None
        fn(leaf, *args, **kwargs)[0].backward()

    return run


def eager_sampling_baseline(logits, targets, *, seed, temperature=1.0):
    """Plain PyTorch: CE with autograd, Gumbel-max with torch.rand noise (materialised in fp32)."""
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        gen = torch.Generator(device=logits.device).manual_seed(seed)
        u = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_(1e-20, 1.0 - 2**-24)
        samples = (logits.float() / temperature - torch.log(-torch.log(u))).argmax(dim=-1)
        n_correct = (logits.argmax(dim=-1) == targets).sum()
    return loss, samples, n_correct


def bench_rtd(do_bench, dtype, copy_gbs) -> list[str]:
    from kernels.rtd_loss import rtd_loss, rtd_loss_reference

    rows = []
    for n in (32 * 128, 256 * 512, 1 << 24):
        logits = torch.randn(n, device="cuda", dtype=dtype)
        labels = (torch.rand(n, device="cuda") < 0.15).long()
        mask = torch.rand(n, device="cuda") < 0.9
        ours = do_bench(fwd_bwd(rtd_loss, logits, labels, mask))
        ref = do_bench(fwd_bwd(rtd_loss_reference, logits, labels, mask))
        item = logits.element_size()
        moved = n * (item + 8 + 1 + 4) + n * (4 + item)
        gbs = moved / ours / 1e6
        rows.append(
            f"| rtd_loss | N={n} | {dtype_name(dtype)} | {ours:.4f} | {ref:.4f} | {ref / ours:.2f}x | "
            f"- | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |"
        )
    return rows


def bench_sampling(do_bench, dtype, copy_gbs) -> list[str]:
    from kernels.sampling import sample_and_cross_entropy, sample_and_cross_entropy_reference

    rows = []
    for m in (32 * 19, 256 * 19, 8192):
        logits = torch.randn(m, VOCAB, device="cuda", dtype=dtype)
        targets = torch.randint(0, VOCAB, (m,), device="cuda")
        ours = do_bench(fwd_bwd(sample_and_cross_entropy, logits, targets, seed=1))
        ref = do_bench(fwd_bwd(sample_and_cross_entropy_reference, logits, targets, seed=1))
        eager = do_bench(fwd_bwd(eager_sampling_baseline, logits, targets, seed=1))
        item = logits.element_size()
        moved = 3 * m * VOCAB * item + 2 * m * VOCAB * item
        gbs = moved / ours / 1e6
        rows.append(
            f"| sample+CE | M={m} V={VOCAB} | {dtype_name(dtype)} | {ours:.4f} | {ref:.4f} | "
            f"{ref / ours:.2f}x | {eager / ours:.2f}x | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |"
        )
    return rows


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fused kernels vs PyTorch on a CUDA GPU.")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), action="append", help="repeatable; default bf16 fp32"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels.py needs a CUDA GPU and found none; nothing timed. Static compile figures "
            "(registers, spills, shared memory for sm_80/sm_90): python -m kernels.compile_check"
        )
        return 0
    from triton.testing import do_bench

    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(do_bench)
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {copy_gbs:.0f} GB/s (1 GiB copy_)")
    print(
        "| kernel | shape | dtype | ours ms | reference ms | reference / ours | eager torch / ours | "
        "ours GB/s | of copy BW |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.dtype or ["bf16", "fp32"]:
        for row in bench_rtd(do_bench, DTYPES[name], copy_gbs) + bench_sampling(
            do_bench, DTYPES[name], copy_gbs
        ):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
