"""Kernel benchmark: fused Triton kernels vs PyTorch, next to the card's copy bandwidth (GPU only).

    python benchmarks/bench_kernels.py                 # default shapes, bf16 and fp32
    python benchmarks/bench_kernels.py --dtype bf16    # one dtype
    python benchmarks/bench_kernels.py --sweep         # plus other launch configurations, largest shapes

Before timing a shape, each kernel's forward and backward are checked against its reference on that same
input (loss, counts, gradients within per-dtype tolerances; sampling: the same samples, since both draw the
same Philox noise); a mismatch aborts the run. Times are `triton.testing.do_bench` medians (ms) of forward +
backward, measured in this process side by side:

- rtd_loss: ours (`kernels.rtd_loss.rtd_loss`) vs `rtd_loss_reference` (eager PyTorch, autograd backward).
  GB/s counts the bytes the fused forward must move (logits, int64 labels, bool mask in; fp32 gradient out)
  plus the backward rescale (fp32 gradient in, logits-dtype gradient out); three launches in all.
- sampling + generator CE at vocabulary 30522: ours vs two PyTorch baselines:
  `sample_and_cross_entropy_reference` (bit-exact Philox emulation, many small kernels) and an eager torch
  baseline (torch.rand Gumbel noise, F.cross_entropy), what a plain PyTorch implementation would do. GB/s
  counts two reads of the logits and one write of the gradient (the fused kernel's minimum) plus the backward
  rescale.
- copy: `dst.copy_(src)` of 1 GiB, read + write bytes: the practical bandwidth ceiling of the card.

Sampling is timed with an int64 seed tensor on the GPU and a `valid` mask (ELECTRA's padded slots), the form a
compiled training step uses; the check also covers `valid`.

On a machine without CUDA the timing part says so and exits 0; the static compile figures (registers, spills,
shared memory for sm_80/sm_90) come from `python -m kernels.compile_check` instead.

    python benchmarks/bench_kernels.py --count-ops     # any machine: dispatched ops per eager call

`--count-ops` counts, with a `TorchDispatchMode`, the ops one eager call of each op dispatches (forward, then
backward; views, `detach` and `empty*` left out, as in issue 12's table) and, separately, what runs inside the
custom op: aten ops and Triton launches of the launch functions. On CPU it runs the kernels in the Triton
interpreter (it sets TRITON_INTERPRET=1 before importing them) and leaves out the interpreter's own tensor
copies inside a launch; the counts do not depend on the shapes.
"""

import argparse
import collections
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VOCAB = 30522
DEVICE = "cuda"
# Shapes: RTD token counts, sampling rows (masked positions; 19 per 128-token sequence), sweep sizes.
RTD_SIZES = (32 * 128, 128 * 128, 256 * 512, 1 << 24, 1 << 26)
SAMPLING_ROWS = (32 * 19, 128 * 19, 8192)
SWEEP_N, SWEEP_M = 1 << 26, 8192


def copy_bandwidth_gbs(do_bench) -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE)  # 1 GiB
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


def eager_sampling_baseline(logits, targets, *, seed: int, temperature=1.0):
    """Plain PyTorch: CE with autograd, Gumbel-max with torch.rand noise (materialised in fp32)."""
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        gen = torch.Generator(device=logits.device).manual_seed(seed)
        u = torch.rand(logits.shape, generator=gen, device=logits.device).clamp_(1e-20, 1.0 - 2**-24)
        samples = (logits.float() / temperature - torch.log(-torch.log(u))).argmax(dim=-1)
        n_correct = (logits.argmax(dim=-1) == targets).sum()
    return loss, samples, n_correct


# Launch configurations swept at the largest shape of each kernel: (elements per tile, warps, programs per SM;
# 0 = one program per tile) for the RTD loss, (vocabulary block, warps) for sampling. The first of each is the
# shipped default.
RTD_CONFIGS = (
    (512, 4, 16),
    (1024, 4, 0),
    (2048, 8, 0),
    (1024, 4, 4),
    (1024, 4, 8),
    (1024, 4, 16),
    (2048, 8, 4),
)
SAMPLING_CONFIGS = ((1024, 4), (2048, 8), (4096, 8), (2048, 4), (2048, 16))
# Per-dtype tolerances of the correctness check (relative, on gradients scaled by the element count).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def check_rtd(logits, labels, mask) -> str:
    """Ours vs the reference on this input: loss, counts, gradient; raises on a mismatch."""
    from kernels.rtd_loss import rtd_loss, rtd_loss_reference

    results = []
    for fn in (rtd_loss, rtd_loss_reference):
        leaf = logits.detach().requires_grad_(True)
        loss, counts = fn(leaf, labels, mask)
        loss.backward()
        results.append((loss.float(), counts, leaf.grad.float() * mask.sum()))
    (loss, counts, grad), (ref_loss, ref_counts, ref_grad) = results
    tol = TOLERANCE[logits.dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=1e-5)
    return f"ok (grad max diff {float((grad - ref_grad).abs().max()):.1e})"


def sampling_valid(rows: int, device) -> torch.Tensor:
    """(M,) bool: 90 % of the slots real, as with ELECTRA's padded masked positions (fixed pattern)."""
    return torch.arange(rows, device=device) % 10 != 9


def device_seed(value: int, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


def check_sampling(logits, targets) -> str:
    """Ours vs the bit-exact-noise reference: loss, argmax count, gradient, samples; raises on a mismatch."""
    from kernels.sampling import sample_and_cross_entropy, sample_and_cross_entropy_reference

    valid = sampling_valid(logits.shape[0], logits.device)
    results = []
    for fn in (sample_and_cross_entropy, sample_and_cross_entropy_reference):
        leaf = logits.detach().requires_grad_(True)
        loss, samples, n_correct = fn(leaf, targets, seed=device_seed(7, logits.device), valid=valid)
        loss.backward()
        results.append((loss.float(), samples, n_correct, leaf.grad.float() * valid.sum()))
    (loss, samples, correct, grad), (ref_loss, ref_samples, ref_correct, ref_grad) = results
    tol = TOLERANCE[logits.dtype]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(correct, ref_correct, rtol=0, atol=0)
    # Softmax entries are ~1/V: an absolute tolerance near the relative one would accept any gradient.
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=1e-6)
    # Same Philox noise, so the same samples, except where fused multiply-add rounding flips a near-tie.
    differ = float((samples != ref_samples).float().mean())
    if differ > 1e-3:
        raise AssertionError(f"samples differ from the reference's in {100 * differ:.2f} % of rows")
    return f"ok (samples differ {100 * differ:.3f} %)"


def bench_rtd(do_bench, dtype, copy_gbs) -> list[str]:
    from kernels.rtd_loss import rtd_loss, rtd_loss_reference

    rows = []
    for n in RTD_SIZES:
        logits = torch.randn(n, device=DEVICE, dtype=dtype)
        labels = (torch.rand(n, device=DEVICE) < 0.15).long()
        mask = torch.rand(n, device=DEVICE) < 0.9
        checked = check_rtd(logits, labels, mask)
        ours = do_bench(fwd_bwd(rtd_loss, logits, labels, mask))
        ref = do_bench(fwd_bwd(rtd_loss_reference, logits, labels, mask))
        gbs = rtd_bytes(logits, labels) / ours / 1e6
        rows.append(
            f"| rtd_loss | N={n} | {dtype_name(dtype)} | {ours:.4f} | {ref:.4f} | {ref / ours:.2f}x | "
            f"- | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {checked} |"
        )
    return rows


def rtd_bytes(logits, labels) -> int:
    """Bytes the fused forward must move (logits, labels, bool mask in; fp32 gradient out) plus the backward
    rescale (fp32 gradient in, logits-dtype gradient out)."""
    n = logits.numel()
    return n * (logits.element_size() + labels.element_size() + 1 + 4) + n * (4 + logits.element_size())


def sampling_bytes(logits) -> int:
    """Two reads of the logits and one write of the gradient (the fused kernel's minimum) plus the backward
    rescale (read and write of the gradient)."""
    return 5 * logits.numel() * logits.element_size()


def bench_sampling(do_bench, dtype, copy_gbs) -> list[str]:
    from kernels.sampling import sample_and_cross_entropy, sample_and_cross_entropy_reference

    rows = []
    for m in SAMPLING_ROWS:
        logits = torch.randn(m, VOCAB, device=DEVICE, dtype=dtype)
        targets = torch.randint(0, VOCAB, (m,), device=DEVICE)
        checked = check_sampling(logits, targets)
        kwargs = {"seed": device_seed(1, DEVICE), "valid": sampling_valid(m, DEVICE)}
        ours = do_bench(fwd_bwd(sample_and_cross_entropy, logits, targets, **kwargs))
        ref = do_bench(fwd_bwd(sample_and_cross_entropy_reference, logits, targets, **kwargs))
        eager = do_bench(fwd_bwd(eager_sampling_baseline, logits, targets, seed=1))
        gbs = sampling_bytes(logits) / ours / 1e6
        rows.append(
            f"| sample+CE | M={m} V={VOCAB} | {dtype_name(dtype)} | {ours:.4f} | {ref:.4f} | "
            f"{ref / ours:.2f}x | {eager / ours:.2f}x | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {checked} |"
        )
    return rows


def sweep(do_bench, dtype, copy_gbs) -> list[str]:
    """Forward + backward launches (no autograd) of each launch configuration at the largest shapes."""
    from kernels.rtd_loss import rtd_loss_backward, rtd_loss_forward
    from kernels.sampling import sample_and_cross_entropy_backward, sample_and_cross_entropy_forward

    rows = []
    n = SWEEP_N
    logits = torch.randn(n, device=DEVICE, dtype=dtype)
    labels = (torch.rand(n, device=DEVICE) < 0.15).long()
    mask = torch.rand(n, device=DEVICE) < 0.9
    one = torch.ones((), device=DEVICE)
    for block, warps, per_sm in RTD_CONFIGS:

        def rtd_run(block=block, warps=warps, per_sm=per_sm):
            _, counts, grad = rtd_loss_forward(
                logits, labels, mask, block=block, num_warps=warps, programs_per_sm=per_sm
            )
            rtd_loss_backward(grad, counts, one, dtype)

        ms = do_bench(rtd_run)
        gbs = rtd_bytes(logits, labels) / ms / 1e6
        rows.append(
            f"| rtd_loss | N={n} block={block} warps={warps} programs/SM={per_sm or 'one per tile'} | "
            f"{dtype_name(dtype)} | {ms:.4f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |"
        )
    m = SWEEP_M
    logits = torch.randn(m, VOCAB, device=DEVICE, dtype=dtype)
    targets = torch.randint(0, VOCAB, (m,), device=DEVICE)
    seed = device_seed(1, DEVICE)
    valid = sampling_valid(m, DEVICE)
    for block_v, warps in SAMPLING_CONFIGS:

        def sampling_run(block_v=block_v, warps=warps):
            _, _, _, grad = sample_and_cross_entropy_forward(
                logits,
                targets,
                seed,
                valid,
                temperature=1.0,
                positions=None,
                disc_input_ids=None,
                replaced_labels=None,
                block_v=block_v,
                num_warps=warps,
            )
            sample_and_cross_entropy_backward(grad, one)

        ms = do_bench(sampling_run)
        gbs = sampling_bytes(logits) / ms / 1e6
        rows.append(
            f"| sample+CE | M={m} V={VOCAB} block_v={block_v} warps={warps} | {dtype_name(dtype)} | "
            f"{ms:.4f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |"
        )
    return rows


class OpCounter(TorchDispatchMode):
    """Counts, while active, the ops dispatched at the top (a custom op is one) in `dispatched`, and the
    device work in `device`: aten ops wherever they run, inside the alectra custom ops too, plus the Triton
    launches of the kernels given to `launches_of`. Views, detach and empty* are left out of both."""

    def __init__(self):
        super().__init__()
        self.dispatched = collections.Counter()
        self.device = collections.Counter()
        self.custom_op_depth = 0
        self.launch_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        counted = not (self.launch_depth or func.is_view or "empty" in name or "detach" in name)
        if counted and not self.custom_op_depth:
            self.dispatched[name] += 1
        if func.namespace == "alectra":
            # Run the op's Python implementation with this mode active again, so the ops it dispatches are
            # seen (a mode is switched off while its handler runs). OPDEFS: torch's registry of custom_op.
            self.custom_op_depth += 1
            try:
                with self:
                    return torch._library.custom_ops.OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            finally:
                self.custom_op_depth -= 1
        if counted:
            self.device[name] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def launches_of(self, *kernels):
        """Count each launch of these @triton.jit kernels as device work, and nothing dispatched inside it
        (the interpreter copies tensors through numpy; a GPU launch dispatches nothing)."""

        def counted(name, run):
            def launch(*args, **kwargs):
                self.device[f"triton:{name}"] += 1
                self.launch_depth += 1
                try:
                    return run(*args, **kwargs)
                finally:
                    self.launch_depth -= 1

            return launch

        for kernel in kernels:
            kernel.run = counted(kernel.__name__.strip("_"), kernel.run)
        try:
            yield self
        finally:
            for kernel in kernels:
                del kernel.run  # back to the class's run


def project_kernels() -> tuple:
    """Every @triton.jit kernel the ops launch, for `OpCounter.launches_of`."""
    from kernels import rtd_loss as rtd
    from kernels import sampling

    return (
        sampling._sample_ce_fwd_kernel,
        sampling._sample_ce_finish_kernel,
        rtd._rtd_loss_fwd_kernel,
        rtd._rtd_loss_finish_kernel,
        rtd._rtd_loss_bwd_kernel,
    )


def count_ops(device) -> list[str]:
    """Table rows: dispatched ops and device work of one eager call of each op, forward and backward."""
    from kernels import rtd_loss as rtd
    from kernels import sampling

    kernels = project_kernels()
    gen = torch.Generator().manual_seed(0)
    batch, seq, slots, vocab = 2, 32, 5, 128  # M = 2 x 5 slots: the counts do not depend on the shapes
    rows, tokens = batch * slots, batch * seq
    logits = torch.randn(rows, vocab, generator=gen).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    positions = torch.randperm(tokens, generator=gen)[:rows].to(device)
    valid = sampling_valid(rows, device)
    disc_logits = torch.randn(tokens, generator=gen).to(device)
    labels = torch.rand(tokens, generator=gen).to(device) < 0.15
    mask = torch.rand(tokens, generator=gen).to(device) < 0.9

    def sampler(noise, seed, with_valid):
        """noise None: the Triton path; seed: an int, or a tensor made before counting (as a step would)."""
        fn = sampling.sample_and_cross_entropy
        kwargs = {"valid": valid} if with_valid else {}
        if noise is not None:
            fn, kwargs["noise"] = sampling.sample_and_cross_entropy_reference, noise
        seed = device_seed(5, device) if seed == "tensor" else 5

        def make(leaf):
            ids = torch.zeros(tokens, dtype=torch.int64, device=device)
            replaced = torch.zeros(tokens, dtype=torch.int64, device=device)
            return lambda: fn(
                leaf,
                targets,
                seed=seed,
                positions=positions,
                disc_input_ids=ids,
                replaced_labels=replaced,
                **kwargs,
            )

        return logits, make

    def rtd_call(use_triton):
        return disc_logits, lambda leaf: lambda: rtd.rtd_loss(leaf, labels, mask, use_triton=use_triton)

    cases = {
        "sample_and_cross_entropy Triton, int seed, valid=None (the model today)": sampler(
            None, "int", False
        ),
        "sample_and_cross_entropy Triton, seed tensor + valid": sampler(None, "tensor", True),
        "rtd_loss Triton": rtd_call(True),
        "reference inverse_cdf, int seed, valid=None (the model on CPU today)": sampler(
            "inverse_cdf", "int", False
        ),
        "reference inverse_cdf, seed tensor + valid": sampler("inverse_cdf", "tensor", True),
        "reference philox, seed tensor + valid": sampler("philox", "tensor", True),
        "rtd_loss_reference": rtd_call(False),
    }
    out = []
    for name, (inputs, make) in cases.items():
        leaf = inputs.detach().requires_grad_(True)
        make(leaf)()[0].backward()  # warm-up: kernels compiled (or interpreted) once
        leaf.grad = None
        call = make(leaf)
        one = torch.ones((), device=device)
        with OpCounter() as forward, forward.launches_of(*kernels):
            loss = call()[0]
        with OpCounter() as backward, backward.launches_of(*kernels):
            loss.backward(one)
        out.append(
            f"| {name} | {sum(forward.dispatched.values())} | {sum(forward.device.values())} | "
            f"{sum(backward.dispatched.values())} | {sum(backward.device.values())} | "
            f"{_op_summary(forward.device)} / {_op_summary(backward.device)} |"
        )
    return out


def _op_summary(ops: collections.Counter) -> str:
    names = ((name.removeprefix("aten::"), n) for name, n in ops.most_common())
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in names)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fused kernels vs PyTorch on a CUDA GPU.")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), action="append", help="repeatable; default bf16 fp32"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also time other launch configurations at the largest shapes"
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="count the ops one eager call of each op dispatches (any machine; CPU runs the interpreter)",
    )
    args = parser.parse_args(argv)
    if args.count_ops:
        device = torch.device(DEVICE if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and triton) are imported
        name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, Triton interpreter"
        print(f"device: {name}; views, detach and empty* not counted")
        print(
            "| call | forward: dispatched | forward: device ops | backward: dispatched "
            "| backward: device ops | device ops (forward / backward) |"
        )
        print("|---|---|---|---|---|---|")
        for row in count_ops(device):
            print(row, flush=True)
        return 0
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
    dtypes = [DTYPES[name] for name in args.dtype or ["bf16", "fp32"]]
    print(
        "| kernel | shape | dtype | ours ms | reference ms | reference / ours | eager torch / ours | "
        "ours GB/s | of copy BW | check vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for row in bench_rtd(do_bench, dtype, copy_gbs) + bench_sampling(do_bench, dtype, copy_gbs):
            print(row, flush=True)
    if args.sweep:
        print("\nLaunch configurations (forward + backward launches, no autograd):")
        print("| kernel | shape / config | dtype | ms | GB/s | of copy BW |")
        print("|---|---|---|---|---|---|")
        for dtype in dtypes:
            for row in sweep(do_bench, dtype, copy_gbs):
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
