"""Masked-token sampling fused with the generator's cross-entropy.

For each row of generator logits (one row per masked position) one program

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
   (softmax(x) - onehot(target)) / M` into a gradient buffer (Liger-Kernel `ops/cross_entropy.py` does the
   same two passes and also writes the gradient during the forward). Backward is a rescale by `grad_output`.

Noise and comparisons are fp32 whatever the logits dtype, and `u` is clamped into (0, 1): with fp16 noise,
`-log(-log(u))` hits `log(0)` and the Gumbel-softmax fp16 NaN appears.

`sample_and_cross_entropy_reference` re-implements `tl.rand4x` (Philox-4x32-10 exactly as in
triton/language/random.py) in PyTorch, so both paths draw the same uniforms for the same seed.

Legend for shape comments: M = masked positions (rows), V = vocabulary size, BT = batch * sequence length.
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


# A new seed every step: without do_not_specialize, Triton would specialise (and compile) on the seed's
# value class (== 1, divisible by 16).
@triton.jit(do_not_specialize=["seed"])
def _sample_ce_fwd_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    targets_ptr,
    loss_ptr,
    samples_ptr,
    correct_ptr,
    positions_ptr,
    disc_ids_ptr,
    replaced_ptr,
    vocab_size,
    seed,
    inv_temperature,
    grad_scale,
    SCATTER: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: sample, loss, argmax check, optional scatter, gradient.

    logits_ptr: (M, V) any float dtype, column stride 1, row stride `logits_row_stride`.
    grad_ptr: (M, V) logits dtype, row stride `grad_row_stride`; receives (softmax(x) - onehot) * grad_scale.
    targets_ptr: (M,) integer original token ids.  loss_ptr: (M,) fp32 per-row CE (lse - x[target]).
    samples_ptr: (M,) int64 Gumbel-max samples.  correct_ptr: (M,) int32 (argmax(x) == target).
    positions_ptr: (M,) int64 flat indices into disc_ids_ptr / replaced_ptr (read only when SCATTER).
    disc_ids_ptr: (BT,) integer; receives the sample at positions[row].
    replaced_ptr: (BT,) numeric; receives (sample != target) at positions[row].
    vocab_size: V.  seed: Philox seed.  inv_temperature: 1 / T (fp32).  grad_scale: 1 / M (fp32).
    SCATTER: write the two scatter outputs.  BLOCK_V: vocabulary columns per block (power of two).
    """
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * logits_row_stride
    row_grad = grad_ptr + row * grad_row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    groups = tl.arange(0, BLOCK_V // 4)  # (BLOCK_V / 4,) Philox counters of one block
    row_counter = row * ((vocab_size + 3) // 4)

    # Pass 1: online logsumexp, argmax of x, Gumbel-max argmax of x / T + g.
    running_max = -float("inf")
    running_sum = 0.0
    best_logit = -float("inf")
    best_logit_idx = 0
    best_score = -float("inf")
    best_score_idx = 0
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        valid = offs < vocab_size
        x = tl.load(row_logits + offs, mask=valid, other=-float("inf")).to(tl.float32)  # (BLOCK_V,)

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
        score = tl.where(valid, x * inv_temperature + gumbel, -float("inf"))
        block_best = tl.max(score, axis=0)
        block_best_arg = tl.argmax(score, axis=0)
        better = block_best > best_score
        best_score_idx = tl.where(better, start + block_best_arg, best_score_idx)
        best_score = tl.where(better, block_best, best_score)

    # Everything relative to the row max: lse - x[t] = (max - x[t]) + log(sum), so a loss of log(V) survives
    # logits near fp16/bf16's max, where max + log(sum) would round back to max.
    log_sum = tl.log(running_sum)
    target_logit = tl.load(row_logits + target).to(tl.float32)
    sample = best_score_idx.to(tl.int64)
    tl.store(loss_ptr + row, (running_max - target_logit) + log_sum)
    tl.store(samples_ptr + row, sample)
    tl.store(correct_ptr + row, (best_logit_idx == target).to(tl.int32))
    if SCATTER:
        position = tl.load(positions_ptr + row)
        tl.store(disc_ids_ptr + position, sample.to(disc_ids_ptr.dtype.element_ty))
        tl.store(replaced_ptr + position, (sample != target).to(replaced_ptr.dtype.element_ty))

    # Pass 2: the gradient of the mean cross-entropy, now that lse is known.
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        valid = offs < vocab_size
        x = tl.load(row_logits + offs, mask=valid, other=-float("inf")).to(tl.float32)
        grad = (tl.exp((x - running_max) - log_sum) - (offs == target).to(tl.float32)) * grad_scale
        tl.store(row_grad + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def sample_and_cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: int,
    temperature: float,
    positions: torch.Tensor | None,
    disc_input_ids: torch.Tensor | None,
    replaced_labels: torch.Tensor | None,
    block_v: int = SAMPLING_BLOCK_V,
    num_warps: int = SAMPLING_NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel.

    Returns (loss fp32 scalar, samples (M,) int64, n_correct int64 scalar, grad (M, V) logits dtype).
    `block_v` / `num_warps`: launch configuration (benchmarks sweep them).
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
    scatter = positions is not None
    if rows > 0:
        _sample_ce_fwd_kernel[(rows,)](
            logits,
            logits.stride(0),
            grad,
            grad.stride(0),
            targets,
            row_loss,
            samples,
            correct,
            positions.contiguous() if scatter else samples,
            disc_input_ids if scatter else samples,
            _as_storable(replaced_labels) if scatter else samples,
            vocab_size,
            seed,
            1.0 / temperature,
            1.0 / rows,
            SCATTER=scatter,
            BLOCK_V=min(block_v, triton.next_power_of_2(vocab_size)),
            num_warps=num_warps,
        )
    loss = row_loss.sum() / max(rows, 1)
    return loss, samples, correct.sum(dtype=torch.int64), grad


def sample_and_cross_entropy_backward(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The stored gradient is already d(mean CE)/d logits; the chain rule only rescales it by grad_output."""
    # Out of place, so a second backward (retain_graph=True) still sees the stored gradient.
    return grad * grad_output.float()


class SampleAndCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the fused kernel, backward is a rescale of the stored gradient."""

    @staticmethod
    def forward(ctx, logits, targets, seed, temperature, positions, disc_input_ids, replaced_labels):
        loss, samples, n_correct, grad = sample_and_cross_entropy_forward(
            logits,
            targets,
            seed=seed,
            temperature=temperature,
            positions=positions,
            disc_input_ids=disc_input_ids,
            replaced_labels=replaced_labels,
        )
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(samples, n_correct)
        return loss, samples, n_correct

    @staticmethod
    def backward(ctx, grad_loss, grad_samples, grad_n_correct):
        (grad,) = ctx.saved_tensors
        return sample_and_cross_entropy_backward(grad, grad_loss), None, None, None, None, None, None


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.rand(seed, offsets)` in PyTorch, bit for bit: word 0 of `philox_uniform4`."""
    return philox_uniform4(seed, offsets)[..., 0]


def philox_uniform4(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """`tl.rand4x(seed, offsets)` in PyTorch, bit for bit: Philox-4x32-10 on (offset_lo, offset_hi, 0, 0).

    offsets: int64 tensor of counters (any shape); returns fp32 uniforms in [0, 1) of shape (*offsets.shape,
    4), the four output words in order. Follows triton/language/random.py: key = (seed_lo, seed_hi); each
    word as int32, negative values bit-flipped, times 4.6566127342e-10 in fp32. 32-bit words live in int64 so
    that one int64 product of two 32-bit words is the exact 64-bit product (mod 2^64): its high half is
    `umulhi`, its low half `mul`.
    """
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(_PHILOX_ROUNDS):
        product_b = c2 * _PHILOX_ROUND_B
        product_a = c0 * _PHILOX_ROUND_A
        c0 = ((product_b >> 32) & _MASK32) ^ c1 ^ k0
        c2 = ((product_a >> 32) & _MASK32) ^ c3 ^ k1
        c1 = product_b & _MASK32
        c3 = product_a & _MASK32
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    words = torch.stack([c0, c1, c2, c3], dim=-1)  # (..., 4)
    as_int32 = torch.where(words >= 1 << 31, words - (1 << 32), words)
    as_int32 = torch.where(as_int32 < 0, ~as_int32, as_int32)
    scale = torch.tensor(_UINT32_TO_UNIFORM, dtype=torch.float32, device=offsets.device)
    return as_int32.to(torch.float32) * scale


def gumbel_uniforms(seed: int, rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The kernel's uniforms for `rows` (R,) int64 and every column: (R, V) fp32, word `c % 4` of Philox
    counter `row * ceil(V / 4) + c // 4`."""
    n_groups = (vocab_size + 3) // 4
    groups = torch.arange(n_groups, device=rows.device)  # (G,)
    words = philox_uniform4(seed, rows[:, None] * n_groups + groups[None, :])  # (R, G, 4)
    return words.reshape(len(rows), 4 * n_groups)[:, :vocab_size]


def sample_from_softmax_reference(
    logits: torch.Tensor, *, seed: int, temperature: float, noise: str = "philox"
) -> torch.Tensor:
    """One sample per row from softmax(logits / T): logits (M, V) -> samples (M,) int64.

    noise="philox": the kernel's Gumbel-max, argmax(logits / T + Gumbel noise), with the kernel's own noise
    bit for bit (`gumbel_uniforms`); 10 Philox rounds of int64 tensor ops per 4 logits, ~2 ms per row at
    V = 30522 on a CPU. noise="torch": the same distribution (not the kernel's samples), drawn by
    inverse CDF with one `torch.Generator` uniform per row (softmax, cumsum, searchsorted: ~60 ms for
    608 x 30522 on one CPU core, where Gumbel noise for every logit cost ~400 ms).
    """
    rows, vocab_size = logits.shape
    inv_temperature = torch.tensor(1.0 / temperature, dtype=torch.float32, device=logits.device)
    if noise == "torch":
        generator = torch.Generator(device=logits.device).manual_seed(seed)
        cdf = torch.softmax(logits.float() * inv_temperature, dim=-1).cumsum_(dim=-1)  # (M, V)
        # Scale by the row's last cdf value (cumsum rounding leaves it near, not at, 1); right=True never
        # picks a zero-probability token (its cdf equals its left neighbour's).
        u = torch.rand(rows, 1, generator=generator, device=logits.device) * cdf[:, -1:]  # (M, 1)
        return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=vocab_size - 1)
    if noise != "philox":
        raise ValueError(f"noise={noise!r}: choose 'philox' (the kernel's stream) or 'torch'")
    chunk_rows = max(1, _REFERENCE_CHUNK_ELEMENTS // max(vocab_size, 1))
    samples = []
    for start in range(0, rows, chunk_rows):
        row_ids = torch.arange(start, min(start + chunk_rows, rows), device=logits.device)  # (R,)
        u = gumbel_uniforms(seed, row_ids, vocab_size)  # (R, V)
        gumbel = -torch.log(-torch.log(u.clamp(min=U_MIN.value, max=U_MAX.value)))
        scores = logits[start : start + len(row_ids)].float() * inv_temperature + gumbel
        samples.append(scores.argmax(dim=-1))
    return torch.cat(samples) if samples else torch.empty(0, dtype=torch.int64, device=logits.device)


def sample_and_cross_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: int,
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
    disc_input_ids: torch.Tensor | None = None,
    replaced_labels: torch.Tensor | None = None,
    noise: str = "philox",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The math in PyTorch (same arguments and results as `sample_and_cross_entropy`).

    noise: "philox" draws the kernel's Gumbel noise bit for bit; "torch" the same distribution by inverse CDF
    from torch's RNG, much cheaper on a CPU (see `sample_from_softmax_reference`).
    """
    _check_inputs(logits, targets, seed, temperature, positions, disc_input_ids, replaced_labels)
    rows = logits.shape[0]
    loss = F.cross_entropy(logits.float(), targets.long(), reduction="sum") / max(rows, 1)
    with torch.no_grad():
        samples = sample_from_softmax_reference(
            logits.detach(), seed=seed, temperature=temperature, noise=noise
        )
        n_correct = (logits.detach().argmax(dim=-1) == targets).sum(dtype=torch.int64)
        if positions is not None:
            disc_input_ids[positions] = samples.to(disc_input_ids.dtype)
            replaced_labels[positions] = (samples != targets).to(replaced_labels.dtype)
    return loss, samples, n_correct


def sample_and_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    seed: int,
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
    disc_input_ids: torch.Tensor | None = None,
    replaced_labels: torch.Tensor | None = None,
    use_triton: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generator cross-entropy and Gumbel-max samples of the masked positions, in one fused pass.

    logits (M, V) generator logits at the masked positions only, any float dtype; targets (M,) original ids.
    seed: int in [0, 2^63), one per step and rank; the noise of row r, column c is Philox(seed, r * V + c).
    temperature: sampling temperature T > 0 (the loss always uses the raw logits, as in ELECTRA).
    Returns loss (fp32 scalar, mean CE, differentiable w.r.t. logits), samples (M,) int64 (no gradient) and
    n_correct (int64 scalar, #(argmax == target)).
    Optional in-place outputs, all three or none: positions (M,) int64 flat indices into disc_input_ids (BT,)
    and replaced_labels (BT,), which receive the sample and (sample != target) at those indices.
    `use_triton=False` runs `sample_and_cross_entropy_reference`.
    """
    if not use_triton:
        return sample_and_cross_entropy_reference(
            logits,
            targets,
            seed=seed,
            temperature=temperature,
            positions=positions,
            disc_input_ids=disc_input_ids,
            replaced_labels=replaced_labels,
        )
    _check_inputs(logits, targets, seed, temperature, positions, disc_input_ids, replaced_labels)
    check_triton_device(logits, "sample_and_cross_entropy")
    return SampleAndCrossEntropyFunction.apply(
        logits, targets, seed, temperature, positions, disc_input_ids, replaced_labels
    )


def _as_storable(labels: torch.Tensor) -> torch.Tensor:
    """Triton stores bool through a uint8 view (same bytes, 0/1)."""
    return labels.view(torch.uint8) if labels.dtype == torch.bool else labels


def _check_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    seed: int,
    temperature: float,
    positions: torch.Tensor | None,
    disc_input_ids: torch.Tensor | None,
    replaced_labels: torch.Tensor | None,
) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(
            f"sample_and_cross_entropy: logits must be a 2-D float tensor (M, V), got {logits.dtype} "
            f"{tuple(logits.shape)}"
        )
    if targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"sample_and_cross_entropy: targets must be integer ids of shape ({logits.shape[0]},), got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"sample_and_cross_entropy: seed must be an int in [0, 2**63), got {seed!r}")
    if not temperature > 0:
        raise ValueError(f"sample_and_cross_entropy: temperature must be > 0, got {temperature!r}")
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
            f"sample_and_cross_entropy: positions must be int64 of shape ({targets.shape[0]},), got "
            f"{positions.dtype} {tuple(positions.shape)}"
        )
    for name, buffer in (("disc_input_ids", disc_input_ids), ("replaced_labels", replaced_labels)):
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(
                f"sample_and_cross_entropy: {name} must be a contiguous 1-D (B*T,) tensor, got shape "
                f"{tuple(buffer.shape)}; pass a flat view such as input_ids.view(-1)"
            )
