"""Masked-token sampling fused with the generator's cross-entropy.

For each row of generator logits (one row per masked slot) one program

1. reads the row once, in BLOCK_V vocabulary blocks, keeping an online max / sum-of-exp (the logsumexp), the
   argmax of the logits (for the generator accuracy) and the Gumbel-max argmax of `logits / T + g`, where
   `g = -log(-log(u))` and `u` is counter-based Philox noise, nothing stored (Triton tutorial
   04-low-memory-dropout): word `col % 4` of `tl.rand4x(seed, row * ceil(V / 4) + col // 4)`, so one
   Philox-4x32-10 evaluation serves four columns (Philox's integer work, not memory, bounds this kernel on
   a GPU: benchmarks/RESULTS.md). google-research/electra samples the same way
   (`pretrain_helpers.sample_from_softmax`: Gumbel noise added to `logits / temperature`, then argmax);
2. writes the sampled id, the per-row loss `lse - x[target]` and `argmax == target`, and optionally scatters
   the sample into the discriminator input and `replaced = sample != target` into the label buffer;
3. reads the row a second time, now that the logsumexp is known, and writes `d(mean CE) / d logits =
   (softmax(x) - onehot(target)) / n` into a gradient buffer (Liger-Kernel `ops/cross_entropy.py` does the
   same two passes and also writes the gradient during the forward). Backward is a rescale by `grad_output`.

A one-program kernel then writes the mean loss and the argmax count. No host synchronisation anywhere:

- The seed is an int64 0-dim tensor on the device, read inside the kernel (`tl.load`), so a new seed per
  step is neither a recompile nor a host -> device copy (a CUDA graph replays it as it is).
- Static rows: every batch has M = B x max_predictions rows; `valid` (M,) bool marks the real ones. The loss
  is the sum over valid rows divided by n = max(1, #valid), counted on the device (`valid.sum()`) and read by
  the kernels, which scale the gradient by 1 / n. Invalid rows read no logits, write a zero gradient row,
  sample -1, scatter nothing and never count as correct (google-research/electra pads its masked positions
  the same way, with `masked_lm_weights` 0).

Noise and comparisons are fp32 whatever the logits dtype, and `u` is clamped into (0, 1): with fp16 noise,
`-log(-log(u))` hits `log(0)` and the Gumbel-softmax fp16 NaN appears.

`sample_and_cross_entropy_reference` defines the same math in plain (torch.compile-traceable) PyTorch; it
re-implements `tl.rand4x` (Philox-4x32-10 exactly as in triton/language/random.py), so both paths draw the
same uniforms for the same seed.

Legend for shape comments: M = masked slots (rows), V = vocabulary size, BT = batch * sequence length.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._device import check_triton_device

# Vocabulary columns per block: 1024 across 4 warps (8 per thread) was the fastest configuration swept on an
# H100 (benchmarks/RESULTS.md, bench_kernels.py --sweep); V = 30522 is 30 blocks.
SAMPLING_BLOCK_V = 1024
SAMPLING_NUM_WARPS = 4
# Rows the finishing kernel sums per iteration, in one program.
SAMPLING_FINISH_BLOCK = 1024

# u is clamped into [U_MIN, U_MAX] before -log(-log(u)). tl.rand can return exactly 0 (log(0) = -inf);
# its largest value is 1 - 2^-24, where -log(u) = 6e-8 is still a normal fp32 number.
U_MIN = tl.constexpr(1.0e-20)
U_MAX = tl.constexpr(1.0 - 2.0**-24)

# Philox-4x32 constants and the uint -> float scale of triton/language/random.py (triton 3.x).
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
_UINT32_TO_UNIFORM = 4.6566127342e-10
_MASK32 = 0xFFFFFFFF
# Logits per chunk of the reference's noise: bounds its int64 Philox temporaries to ~100 MiB.
_REFERENCE_CHUNK_ELEMENTS = 1 << 21
# The sample reported for an invalid row.
INVALID_SAMPLE = tl.constexpr(-1)


# seed_ptr is a pointer: Triton never specialises on the value behind it. do_not_specialize also drops the
# 16-byte alignment specialisation, so a seed that is an element of a larger tensor (8-byte aligned) shares
# the one compiled kernel; and n_rows never becomes the constant 1 or gets a divisibility variant.
@triton.jit(do_not_specialize=["seed_ptr", "n_rows"])
def _sample_ce_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    targets_ptr,
    seed_ptr,
    valid_ptr,
    n_valid_ptr,
    loss_ptr,
    samples_ptr,
    correct_ptr,
    positions_ptr,
    disc_ids_ptr,
    replaced_ptr,
    n_rows,
    vocab_size,
    inv_temperature,
    HAS_VALID: tl.constexpr,
    SCATTER: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: sample, loss, argmax check, optional scatter, gradient.

    logits_ptr: (M, V) any float dtype, column stride 1, row stride `logits_row_stride`.
    grad_ptr: (M, V) logits dtype, row stride `grad_row_stride`; receives (softmax(x) - onehot) / n, zero on
    invalid rows.  targets_ptr: (M,) integer original token ids (read only on valid rows).
    seed_ptr: (1,) int64 Philox seed.  valid_ptr: (M,) uint8 (a bool tensor viewed as uint8), 0 = padding
    slot; n_valid_ptr: (1,) int64 number of valid rows (both read only when HAS_VALID; else all n_rows valid).
    loss_ptr: (M,) fp32 per-row CE (lse - x[target]), 0 on invalid rows.
    samples_ptr: (M,) int64 Gumbel-max samples, INVALID_SAMPLE on invalid rows.
    correct_ptr: (M,) int32 (argmax(x) == target) on valid rows, 0 on invalid rows.
    positions_ptr: (M,) int64 flat indices into disc_ids_ptr / replaced_ptr (read only when SCATTER, and
    only on valid rows).  disc_ids_ptr: (BT,) integer; receives the sample at positions[row].
    replaced_ptr: (BT,) numeric; receives (sample != target) at positions[row].
    n_rows: M.  vocab_size: V.  inv_temperature: 1 / T (fp32).
    HAS_VALID: read valid_ptr / n_valid_ptr.  SCATTER: write the two scatter outputs.
    BLOCK_V: vocabulary columns per block (power of two).
    """
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * logits_row_stride
    row_grad = grad_ptr + row * grad_row_stride
    if HAS_VALID:
        is_valid = tl.load(valid_ptr + row) != 0
        n_valid = tl.load(n_valid_ptr)
    else:
        is_valid = row < n_rows
        n_valid = n_rows
    grad_scale = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)
    # -1 on invalid rows: no column matches it, so their one-hot, argmax check and gradient are all zero.
    target = tl.where(is_valid, tl.load(targets_ptr + row).to(tl.int64), -1)
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    groups = tl.arange(0, BLOCK_V // 4)  # (BLOCK_V / 4,) Philox counters of one block
    row_counter = row * ((vocab_size + 3) // 4)

    # Pass 1 (valid rows only: an invalid row's loop is empty): online logsumexp, argmax of x, Gumbel-max
    # argmax of x / T + g.
    row_columns = tl.where(is_valid, vocab_size, 0)
    running_max = -float("inf")
    running_sum = 0.0
    best_logit = -float("inf")
    best_logit_idx = 0
    best_score = -float("inf")
    best_score_idx = 0
    for start in range(0, row_columns, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab_size
        x = tl.load(row_logits + offs, mask=in_row, other=-float("inf")).to(tl.float32)  # (BLOCK_V,)

        block_max = tl.max(x, axis=0)
        new_max = tl.maximum(running_max, block_max)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max

        # Strict '>' keeps the first occurrence across blocks, tl.argmax the first within one block:
        # torch.argmax's rule.
        block_arg = tl.argmax(x, axis=0)
        better = block_max > best_logit
        best_logit_idx = tl.where(better, start + block_arg, best_logit_idx)
        best_logit = tl.where(better, block_max, best_logit)

        # Column start + 4g + k takes word k of counter g: interleaving (u0, u2) and (u1, u3), then the two,
        # gives u0[0], u1[0], u2[0], u3[0], u0[1], ... (BLOCK_V is a multiple of 4, so start // 4 is exact).
        u0, u1, u2, u3 = tl.rand4x(seed, row_counter + start // 4 + groups)  # 4 x (BLOCK_V / 4,) in [0, 1)
        u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))  # (BLOCK_V,)
        u = tl.minimum(tl.maximum(u, U_MIN), U_MAX)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(in_row, x * inv_temperature + gumbel, -float("inf"))
        block_best = tl.max(score, axis=0)
        block_best_arg = tl.argmax(score, axis=0)
        better = block_best > best_score
        best_score_idx = tl.where(better, start + block_best_arg, best_score_idx)
        best_score = tl.where(better, block_best, best_score)

    # Everything relative to the row max: lse - x[t] = (max - x[t]) + log(sum), so a loss of log(V) survives
    # logits near fp16/bf16's max, where max + log(sum) would round back to max. An invalid row keeps max 0,
    # log(sum) 0 and x[t] 0: loss 0, and pass 2 below sees only masked-out (-inf) logits.
    row_max = tl.where(is_valid, running_max, 0.0)
    log_sum = tl.log(tl.where(is_valid, running_sum, 1.0))
    target_logit = tl.load(row_logits + target, mask=is_valid, other=0.0).to(tl.float32)
    sample = tl.where(is_valid, best_score_idx.to(tl.int64), INVALID_SAMPLE)
    tl.store(loss_ptr + row, (row_max - target_logit) + log_sum)
    tl.store(samples_ptr + row, sample)
    tl.store(correct_ptr + row, (best_logit_idx == target).to(tl.int32))
    if SCATTER:
        position = tl.load(positions_ptr + row, mask=is_valid, other=0)
        tl.store(disc_ids_ptr + position, sample.to(disc_ids_ptr.dtype.element_ty), mask=is_valid)
        tl.store(replaced_ptr + position, (sample != target).to(replaced_ptr.dtype.element_ty), mask=is_valid)

    # Pass 2: the gradient of the mean cross-entropy, now that lse is known (zeros on an invalid row).
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        # row_columns is 0 on an invalid row: nothing read, zeros written.
        x = tl.load(row_logits + offs, mask=offs < row_columns, other=-float("inf")).to(tl.float32)
        grad = (tl.exp((x - row_max) - log_sum) - (offs == target).to(tl.float32)) * grad_scale
        tl.store(row_grad + offs, grad.to(grad_ptr.dtype.element_ty), mask=offs < vocab_size)


@triton.jit(do_not_specialize=["n_rows"])
def _sample_ce_finish_kernel(
    row_loss_ptr,
    correct_ptr,
    n_valid_ptr,
    loss_ptr,
    n_correct_ptr,
    n_rows,
    HAS_VALID: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: the fixed-order sums of the rows, the mean loss and the argmax count.

    row_loss_ptr: (M,) fp32 (0 on invalid rows).  correct_ptr: (M,) int32.  n_valid_ptr: (1,) int64 number
    of valid rows (read only when HAS_VALID; else n = n_rows).  loss_ptr: (1,) fp32; receives
    sum(row_loss) / max(n, 1).  n_correct_ptr: (1,) int64; receives sum(correct).  n_rows: M.
    BLOCK: rows per iteration (power of two).
    """
    offs = tl.arange(0, BLOCK)
    loss_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    correct_acc = tl.zeros((BLOCK,), dtype=tl.int32)  # a lane counts at most M / BLOCK rows
    for start in range(0, n_rows, BLOCK):
        idx = start + offs
        in_bounds = idx < n_rows
        loss_acc += tl.load(row_loss_ptr + idx, mask=in_bounds, other=0.0)
        correct_acc += tl.load(correct_ptr + idx, mask=in_bounds, other=0)
    if HAS_VALID:
        n_valid = tl.load(n_valid_ptr)
    else:
        n_valid = n_rows
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / tl.maximum(n_valid, 1).to(tl.float32))
    tl.store(n_correct_ptr, tl.sum(correct_acc.to(tl.int64), axis=0))


# The launch function is a torch custom op, so torch.compile keeps it as one opaque node of the graph (it
# traces the fake implementation below, never a Triton launch) and CUDA graphs capture it. custom_op rather
# than triton_op: triton_op lets the compiler trace into the launches, which it cannot do for a kernel run by
# the Triton interpreter (TRITON_INTERPRET=1: "Cannot access data pointer of Tensor (e.g. FakeTensor)"). The
# two scatter buffers are declared mutated (torch/_library/custom_ops.py, `custom_op`): functionalisation
# then knows the op writes them. Custom ops take no keyword-only tensors, hence their position.
@torch.library.custom_op(
    "alectra::sample_and_cross_entropy", mutates_args=("disc_input_ids", "replaced_labels")
)
def sample_and_cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    seed: torch.Tensor,
    valid: torch.Tensor | None,
    positions: torch.Tensor | None,
    disc_input_ids: torch.Tensor | None,
    replaced_labels: torch.Tensor | None,
    *,
    temperature: float,
    block_v: int = SAMPLING_BLOCK_V,
    num_warps: int = SAMPLING_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel and its reduction (plus `valid.sum()` when `valid` is given).

    seed: int64 0-dim tensor on the logits' device.  Returns (loss fp32 scalar, samples (M,) int64, n_correct
    int64 scalar, grad (M, V) logits dtype, already divided by the valid-row count). `block_v` / `num_warps`:
    launch configuration (benchmarks sweep them).
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    targets = targets.contiguous()
    rows, vocab_size = logits.shape
    device = logits.device
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (M, V)
    row_loss = torch.empty(rows, dtype=torch.float32, device=device)  # (M,)
    samples = torch.empty(rows, dtype=torch.int64, device=device)  # (M,)
    correct = torch.empty(rows, dtype=torch.int32, device=device)  # (M,)
    loss = torch.empty((), dtype=torch.float32, device=device)
    n_correct = torch.empty((), dtype=torch.int64, device=device)
    has_valid = valid is not None
    # Unused pointer arguments get any tensor of the device: the kernels never read them.
    n_valid = valid.sum() if has_valid else loss  # int64 0-dim, stays on the device
    valid_bytes = valid.contiguous().view(torch.uint8) if has_valid else loss
    scatter = positions is not None
    if rows > 0:
        _sample_ce_fwd_kernel[(rows,)](
            logits,
            logits.stride(0),
            grad,
            grad.stride(0),
            targets,
            seed,
            valid_bytes,
            n_valid,
            row_loss,
            samples,
            correct,
            positions.contiguous() if scatter else samples,
            disc_input_ids if scatter else samples,
            _as_storable(replaced_labels) if scatter else samples,
            rows,
            vocab_size,
            1.0 / temperature,
            HAS_VALID=has_valid,
            SCATTER=scatter,
            BLOCK_V=min(block_v, triton.next_power_of_2(vocab_size)),
            num_warps=num_warps,
        )
    _sample_ce_finish_kernel[(1,)](
        row_loss,
        correct,
        n_valid,
        loss,
        n_correct,
        rows,
        HAS_VALID=has_valid,
        BLOCK=SAMPLING_FINISH_BLOCK,
        num_warps=4,
    )
    return loss, samples, n_correct, grad


@sample_and_cross_entropy_forward.register_fake
def _(logits, *args, **kwargs):
    """What torch.compile traces: the outputs' shapes and dtypes, which follow from the logits alone."""
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty(logits.shape[0], dtype=torch.int64),
        logits.new_empty((), dtype=torch.int64),
        torch.empty_like(logits, memory_format=torch.contiguous_format),
    )


def sample_and_cross_entropy_backward(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The stored gradient is already d(mean CE)/d logits; the chain rule only rescales it by grad_output."""
    # Out of place, so a second backward (retain_graph=True) still sees the stored gradient.
    return grad * grad_output.float()


class SampleAndCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the custom op, backward is a rescale of the stored gradient.

    An autograd.Function rather than `register_autograd` on the op: torch refuses autograd formulas for ops
    that mutate an argument (`CustomOpDef.register_autograd`: "non-functional operator"); torch.compile
    traces this Function and the op inside it without a graph break (tests/test_kernels_torch_compile.py).
    """

    @staticmethod
    def forward(ctx, logits, targets, seed, valid, temperature, positions, disc_input_ids, replaced_labels):
        loss, samples, n_correct, grad = sample_and_cross_entropy_forward(
            logits, targets, seed, valid, positions, disc_input_ids, replaced_labels, temperature=temperature
        )
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(samples, n_correct)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of samples and n_correct
        return loss, samples, n_correct

    @staticmethod
    def backward(ctx, grad_loss, grad_samples, grad_n_correct):
        (grad,) = ctx.saved_tensors
        grad_logits = None if grad_loss is None else sample_and_cross_entropy_backward(grad, grad_loss)
        return grad_logits, None, None, None, None, None, None, None


def philox_uniform(seed: torch.Tensor | int, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.rand(seed, offsets)` in PyTorch, bit for bit: word 0 of `philox_uniform4`."""
    return philox_uniform4(seed, offsets)[..., 0]


def philox_uniform4(seed: torch.Tensor | int, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.rand4x(seed, offsets)` in PyTorch, bit for bit: Philox-4x32-10 on (offset_lo, offset_hi, 0, 0).

    seed: int64 0-dim tensor (or an int, the value of one). offsets: int64 tensor of counters (any shape);
    returns fp32 uniforms in [0, 1) of shape (*offsets.shape, 4), the four output words in order. Follows
    triton/language/random.py: key = (seed_lo, seed_hi); each word as int32, negative values bit-flipped,
    times 4.6566127342e-10 in fp32. 32-bit words live in int64 so that one int64 product of two 32-bit words
    is the exact 64-bit product (mod 2^64): its high half is `umulhi`, its low half `mul`. The words are kept
    in pairs, (c0, c2) and (c1, c3), so one round is 7 tensor ops.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64, device=offsets.device)
    zeros = torch.zeros_like(offsets)
    left = torch.stack((offsets & _MASK32, zeros), dim=-1)  # (..., 2) words (c0, c2)
    right = torch.stack(((offsets >> 32) & _MASK32, zeros), dim=-1)  # (..., 2) words (c1, c3)
    # The (2,) constants are made on the device: `torch.tensor` would copy them from the host on every call.
    first = torch.arange(2, device=offsets.device) == 0  # (2,) [True, False]
    multipliers = torch.where(first, _PHILOX_ROUND_A, _PHILOX_ROUND_B)  # (2,) int64
    key_steps = torch.where(first, _PHILOX_KEY_A, _PHILOX_KEY_B)  # (2,) int64
    key = torch.stack((seed & _MASK32, (seed >> 32) & _MASK32))  # (2,) (k0, k1)
    rounds = torch.arange(_PHILOX_ROUNDS, device=offsets.device)[:, None]  # (R, 1)
    keys = (key + rounds * key_steps) & _MASK32  # (R, 2): the key of each round
    for r in range(_PHILOX_ROUNDS):
        # (c2 B, c0 A): c0' = hi(c2 B) ^ c1 ^ k0, c2' = hi(c0 A) ^ c3 ^ k1, c1' = lo(c2 B), c3' = lo(c0 A).
        product = (left * multipliers).flip(-1)
        left = ((product >> 32) & _MASK32) ^ right ^ keys[r]
        right = product & _MASK32
    words = torch.stack((left[..., 0], right[..., 0], left[..., 1], right[..., 1]), dim=-1)  # (..., 4)
    # As int32, a negative value v becomes ~v: for a word w in [0, 2^32) that is min(w, w ^ 0xFFFFFFFF).
    flipped = torch.minimum(words, words ^ _MASK32)
    return flipped.to(torch.float32) * _UINT32_TO_UNIFORM


def gumbel_uniforms(seed: torch.Tensor | int, rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The kernel's uniforms for `rows` (R,) int64 and every column: (R, V) fp32, word `c % 4` of Philox
    counter `row * ceil(V / 4) + c // 4`."""
    n_groups = (vocab_size + 3) // 4
    groups = torch.arange(n_groups, device=rows.device)  # (G,)
    words = philox_uniform4(seed, rows[:, None] * n_groups + groups[None, :])  # (R, G, 4)
    return words.reshape(len(rows), 4 * n_groups)[:, :vocab_size]


def sample_from_softmax_reference(
    logits: torch.Tensor, *, seed: torch.Tensor | int, temperature: float, noise: str = "philox"
) -> torch.Tensor:
    """One sample per row from softmax(logits / T): logits (M, V) -> samples (M,) int64.

    seed: int64 0-dim tensor on the logits' device (or an int). Both noises are counter-based Philox streams
    of that seed, so the samples are a pure function of (logits, seed): no torch RNG state, nothing that
    torch.compile cannot trace.
    noise="philox": the kernel's Gumbel-max, argmax(logits / T + Gumbel noise), with the kernel's own noise
    bit for bit (`gumbel_uniforms`); 10 Philox rounds of int64 tensor ops per 4 logits, ~1 ms per row at
    V = 30522 on a CPU. noise="inverse_cdf" (alias "torch", the name before it left torch's RNG): the same
    distribution (not the kernel's samples) by inverse CDF, one uniform per row, `philox_uniform(seed, row)`
    (softmax, cumsum, searchsorted: ~60 ms for 608 x 30522 on one CPU core, where Gumbel noise for every
    logit cost ~400 ms).
    """
    rows, vocab_size = logits.shape
    device = logits.device
    inv_temperature = 1.0 / temperature
    if noise in ("inverse_cdf", "torch"):
        u = philox_uniform(seed, torch.arange(rows, device=device))[:, None]  # (M, 1) in [0, 1)
        cdf = torch.softmax(logits.float() * inv_temperature, dim=-1).cumsum_(dim=-1)  # (M, V)
        # Scaled by the row's last cdf value (cumsum rounding leaves it near, not at, 1) and kept strictly
        # below it: with right=True the first cdf entry above the draw is then always a token of positive
        # probability (a zero-probability token's cdf equals its left neighbour's).
        total = cdf[:, -1:]  # (M, 1)
        below_total = torch.nextafter(total, torch.zeros_like(total))
        draw = torch.minimum(u * total, below_total)  # (M, 1)
        # Non-finite logits (a diverged step, which the trainer then skips) make the cdf NaN, and searchsorted
        # puts NaN past the end: the clamp keeps every sample a valid id.
        return torch.searchsorted(cdf, draw, right=True).squeeze(1).clamp_(max=vocab_size - 1)
    if noise != "philox":
        raise ValueError(f"noise={noise!r}: choose 'philox' (the kernel's stream) or 'inverse_cdf'")
    chunk_rows = max(1, _REFERENCE_CHUNK_ELEMENTS // max(vocab_size, 1))
    samples = []
    for start in range(0, rows, chunk_rows):
        row_ids = torch.arange(start, min(start + chunk_rows, rows), device=device)  # (R,)
        u = gumbel_uniforms(seed, row_ids, vocab_size)  # (R, V)
        gumbel = -torch.log(-torch.log(u.clamp(min=U_MIN.value, max=U_MAX.value)))
        scores = logits[start : start + len(row_ids)].float() * inv_temperature + gumbel
        samples.append(scores.argmax(dim=-1))
    return torch.cat(samples) if samples else torch.empty(0, dtype=torch.int64, device=device)


def sample_and_cross_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: torch.Tensor | int,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    disc_input_ids: torch.Tensor | None = None,
    replaced_labels: torch.Tensor | None = None,
    noise: str = "philox",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The math in PyTorch (same arguments and results as `sample_and_cross_entropy`).

    loss = sum over valid rows of CE / max(1, #valid); samples of invalid rows are INVALID_SAMPLE; invalid
    rows scatter nothing and are not counted in n_correct. noise: "philox" draws the kernel's Gumbel noise bit
    for bit; "inverse_cdf" the same distribution from one Philox uniform per row, much cheaper on a CPU (see
    `sample_from_softmax_reference`).
    """
    _check_inputs(logits, targets, seed, temperature, valid, positions, disc_input_ids, replaced_labels)
    seed = _seed_tensor(seed, logits.device)
    rows = logits.shape[0]
    if valid is None:
        loss = F.cross_entropy(logits.float(), targets.long(), reduction="sum") / max(rows, 1)
    else:
        # Invalid rows may hold any target (a padding id, -100): they read target 0 and are then dropped.
        safe_targets = torch.where(valid, targets.long(), 0)
        row_loss = F.cross_entropy(logits.float(), safe_targets, reduction="none")  # (M,)
        loss = torch.where(valid, row_loss, 0.0).sum() / valid.sum().clamp(min=1)
    with torch.no_grad():
        samples = sample_from_softmax_reference(
            logits.detach(), seed=seed, temperature=temperature, noise=noise
        )
        correct = logits.detach().argmax(dim=-1) == targets
        if valid is not None:
            samples = torch.where(valid, samples, INVALID_SAMPLE.value)
            correct = correct & valid
        n_correct = correct.sum(dtype=torch.int64)
        if positions is not None:
            replaced = samples != targets
            _scatter_valid_rows(disc_input_ids, positions, samples, valid)
            _scatter_valid_rows(replaced_labels, positions, replaced, valid)
    return loss, samples, n_correct


def sample_and_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: torch.Tensor | int,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    disc_input_ids: torch.Tensor | None = None,
    replaced_labels: torch.Tensor | None = None,
    use_triton: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generator cross-entropy and Gumbel-max samples of the masked slots, in one fused pass.

    logits (M, V) generator logits at the masked slots only, any float dtype; targets (M,) original ids.
    seed: int64 0-dim tensor on the logits' device, one per step and rank; the noise of row r, column c is
    word c % 4 of Philox(seed, r * ceil(V / 4) + c // 4). An int in [0, 2^63) is accepted too and copied to
    the device (a host -> device copy per call: the form for callers not yet passing tensors).
    temperature: sampling temperature T > 0 (the loss always uses the raw logits, as in ELECTRA).
    valid: (M,) bool, True for a real masked slot, or None (all rows real). Invalid rows contribute no loss
    and no gradient, sample INVALID_SAMPLE, scatter nothing and do not count in n_correct.
    Returns loss (fp32 scalar, sum of the valid rows' CE / max(1, #valid), differentiable w.r.t. logits),
    samples (M,) int64 (no gradient) and n_correct (int64 scalar, #(valid and argmax == target)).
    Optional in-place outputs, all three or none: positions (M,) int64 flat indices into disc_input_ids (BT,)
    and replaced_labels (BT,), which receive the sample and (sample != target) at the valid rows' indices
    (distinct across valid rows; invalid rows' positions are never read).
    No host synchronisation and no value-dependent Python: only shapes, dtypes and devices are checked.
    `use_triton=False` runs `sample_and_cross_entropy_reference`.
    """
    if not use_triton:
        return sample_and_cross_entropy_reference(
            logits,
            targets,
            seed=seed,
            temperature=temperature,
            valid=valid,
            positions=positions,
            disc_input_ids=disc_input_ids,
            replaced_labels=replaced_labels,
        )
    _check_inputs(logits, targets, seed, temperature, valid, positions, disc_input_ids, replaced_labels)
    check_triton_device(logits, "sample_and_cross_entropy")
    return SampleAndCrossEntropyFunction.apply(
        logits,
        targets,
        _seed_tensor(seed, logits.device),
        valid,
        temperature,
        positions,
        disc_input_ids,
        replaced_labels,
    )


def _seed_tensor(seed: torch.Tensor | int, device: torch.device) -> torch.Tensor:
    """The seed as an int64 0-dim tensor on `device`: a tensor is used as it is; an int is copied over."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64, device=device)


def _scatter_valid_rows(
    buffer: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None
) -> None:
    """buffer[positions[r]] = values[r] for the valid rows r, without reading an invalid row's position."""
    values = values.to(buffer.dtype)
    if valid is None:
        buffer[positions] = values
        return
    # Invalid rows write into one extra slot past the end, which is then dropped: a boolean index would need
    # a host sync (nonzero), and writing an invalid row back to its own position could race with a valid
    # row holding the same position.
    spill = torch.where(valid, positions, buffer.numel())  # (M,)
    extended = torch.cat((buffer, buffer.new_empty(1)))  # (BT + 1,)
    extended[spill] = values
    buffer.copy_(extended[:-1])


def _as_storable(labels: torch.Tensor) -> torch.Tensor:
    """Triton stores bool through a uint8 view (same bytes, 0/1)."""
    return labels.view(torch.uint8) if labels.dtype == torch.bool else labels


def _check_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    seed: torch.Tensor | int,
    temperature: float,
    valid: torch.Tensor | None,
    positions: torch.Tensor | None,
    disc_input_ids: torch.Tensor | None,
    replaced_labels: torch.Tensor | None,
) -> None:
    """Shapes, dtypes, devices and Python arguments only: nothing here reads tensor data (no host sync)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"sample_and_cross_entropy: logits must be a 2-D float tensor (M, V), got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    rows = logits.shape[0]
    if targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"sample_and_cross_entropy: targets must be integer ids of shape ({rows},), got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0 or seed.device != logits.device:
            raise ValueError(
                f"sample_and_cross_entropy: seed must be an int64 0-dim tensor on {logits.device}, got "
                f"{seed.dtype} {tuple(seed.shape)} on {seed.device}"
            )
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(
            "sample_and_cross_entropy: seed must be an int64 0-dim tensor or an int in [0, 2**63), got "
            f"{seed!r}"
        )
    if not temperature > 0:
        raise ValueError(f"sample_and_cross_entropy: temperature must be > 0, got {temperature!r}")
    if valid is not None and (
        valid.dtype != torch.bool or valid.shape != (rows,) or valid.device != logits.device
    ):
        raise ValueError(
            f"sample_and_cross_entropy: valid must be a bool tensor of shape ({rows},) on {logits.device}, "
            f"got {valid.dtype} {tuple(valid.shape)} on {valid.device}"
        )
    given = [t is not None for t in (positions, disc_input_ids, replaced_labels)]
    if any(given) and not all(given):
        raise ValueError(
            "sample_and_cross_entropy: positions, disc_input_ids and replaced_labels go together; "
            "pass all three"
        )
    if positions is None:
        return
    if positions.shape != targets.shape or positions.dtype != torch.int64:
        raise ValueError(
            f"sample_and_cross_entropy: positions must be int64 of shape ({rows},), got "
            f"{positions.dtype} {tuple(positions.shape)}"
        )
    for name, buffer in (("disc_input_ids", disc_input_ids), ("replaced_labels", replaced_labels)):
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(
                f"sample_and_cross_entropy: {name} must be a contiguous 1-D (B*T,) tensor, got shape "
                f"{tuple(buffer.shape)}; pass a flat view such as input_ids.view(-1)"
            )
